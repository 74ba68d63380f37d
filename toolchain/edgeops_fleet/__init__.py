"""edgeops_fleet: the fleet console (state, rollouts, OTA serving, autopilot).

It speaks to devices only through the contract in :mod:`edgeops_core` and never imports
:mod:`edgeops_agent` or the toolchain. Today it holds the over-the-air block server
(:mod:`edgeops_fleet.ota`, ADR 0012), the :class:`Deployer` behind ``edgeops fleet deploy``
(:mod:`edgeops_fleet.deploy`) and the retained-state view behind ``edgeops fleet status``
(:mod:`edgeops_fleet.status`); the console's store comes with the fleet console issue.
paho is imported only when a connection is made.
"""

from edgeops_fleet.deploy import DEVICE_OUTCOMES, Deployer, DeviceReport, new_deploy_id
from edgeops_fleet.errors import BrokerError, FleetError, SenderError
from edgeops_fleet.link import BrokerUrl, parse_broker_url
from edgeops_fleet.ota import BlockServer, DeviceStats, TokenBucket, announce
from edgeops_fleet.status import DeviceStatus, fleet_status

__all__ = [
    "DEVICE_OUTCOMES",
    "BlockServer",
    "BrokerError",
    "BrokerUrl",
    "Deployer",
    "DeviceReport",
    "DeviceStats",
    "DeviceStatus",
    "FleetError",
    "SenderError",
    "TokenBucket",
    "announce",
    "fleet_status",
    "new_deploy_id",
    "parse_broker_url",
]
