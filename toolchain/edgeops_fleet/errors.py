"""Errors of the fleet console, under the shared tree of :mod:`edgeops_core`::

EdgeopsError
├── SenderError         a bundle cannot be served (unreadable, changed since it was verified);
│                       defined in edgeops_core.ota_server with the block server, re-exported here
└── FleetError          the console cannot do what was asked
    ├── BrokerError     the broker cannot be reached or refuses the console
    ├── StoreError      the console's database is unreachable, locked, newer, or refuses a row
    └── ConsoleError    the CLI cannot reach the console's HTTP API, or it answers with an error
InputError
└── RunConflictError    an autopilot run is not in a state that allows the request (approve an ended run)
"""

from __future__ import annotations

from edgeops_core import EdgeopsError, InputError
from edgeops_core.ota_server import SenderError

__all__ = ["BrokerError", "ConsoleError", "FleetError", "RunConflictError", "SenderError", "StoreError"]


class FleetError(EdgeopsError):
    """The fleet console cannot do what was asked."""


class BrokerError(FleetError):
    """The MQTT broker cannot be reached or refuses the console's connection."""


class StoreError(FleetError):
    """The console's database cannot be opened, migrated, reached in time, or refuses a row."""


class ConsoleError(FleetError):
    """The console's HTTP API cannot be reached, refuses the request's token, or answers with an error."""


class RunConflictError(InputError):
    """An autopilot run is not in a state that allows the request (approving an ended run, ...)."""
