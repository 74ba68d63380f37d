"""Errors of the fleet console, under the shared tree of :mod:`edgeops_core`::

EdgeopsError
└── FleetError          the console cannot do what was asked
    ├── SenderError     a bundle cannot be served (unreadable, changed since it was verified)
    └── BrokerError     the broker cannot be reached or refuses the console
"""

from __future__ import annotations

from edgeops_core import EdgeopsError

__all__ = ["BrokerError", "FleetError", "SenderError"]


class FleetError(EdgeopsError):
    """The fleet console cannot do what was asked."""


class SenderError(FleetError):
    """A bundle cannot be served over the air."""


class BrokerError(FleetError):
    """The MQTT broker cannot be reached or refuses the console's connection."""
