"""Errors of the fleet simulator, under the shared tree of :mod:`edgeops_core`."""

from __future__ import annotations

from edgeops_core import EdgeopsError, InputError

__all__ = ["ScenarioError", "SimError"]


class ScenarioError(InputError):
    """A scenario file is malformed or asks for something impossible (exit code 2, one line)."""


class SimError(EdgeopsError):
    """The simulation could not run (a broker that does not start, a host that cannot be spawned)."""
