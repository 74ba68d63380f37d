"""Errors of the device agent, under the shared tree of :mod:`edgeops_core`::

EdgeopsError
├── InputError
│   └── TensorInputError     an inference input has the wrong shape, dtype or NaN/inf
└── AgentError               the agent cannot do what was asked
    ├── RuntimeUnavailableError  the bundle's runtime is not installed (names the extra)
    └── ModelLoadError           the runtime refuses the model bytes
"""

from __future__ import annotations

from edgeops_core import EdgeopsError, InputError

__all__ = ["AgentError", "ModelLoadError", "RuntimeUnavailableError", "TensorInputError"]


class TensorInputError(InputError):
    """An inference input does not match the model's input spec."""


class AgentError(EdgeopsError):
    """The agent cannot do what was asked (not the caller's input, not the bundle's trust)."""


class RuntimeUnavailableError(AgentError):
    """The runtime a bundle needs is not installed on this device."""


class ModelLoadError(AgentError):
    """The runtime refuses to load the model bytes."""
