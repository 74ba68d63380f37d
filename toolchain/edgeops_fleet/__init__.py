"""edgeops_fleet: the fleet console (state, rollouts, OTA serving, autopilot).

It speaks to devices only through the contract in :mod:`edgeops_core` and never imports
:mod:`edgeops_agent`. Today it holds the over-the-air block server (:mod:`edgeops_fleet.ota`,
ADR 0012); the console's CLI and store come with the fleet console issue.
"""

from edgeops_fleet.errors import FleetError, SenderError
from edgeops_fleet.ota import BlockServer, DeviceStats, TokenBucket, announce

__all__ = ["BlockServer", "DeviceStats", "FleetError", "SenderError", "TokenBucket", "announce"]
