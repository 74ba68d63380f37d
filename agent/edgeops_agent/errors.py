"""Errors of the device agent, under the shared tree of :mod:`edgeops_core`::

EdgeopsError
├── InputError
│   ├── TensorInputError     an inference input has the wrong shape, dtype or NaN/inf
│   └── ConfigError          agent.toml is missing, malformed or invalid
├── BundleError              (edgeops_core) tampered, untrusted, expired, malformed bundle
└── AgentError               the agent cannot do what was asked
    ├── RuntimeUnavailableError  the bundle's runtime is not installed (names the extra)
    ├── ModelLoadError           the runtime refuses the model bytes
    ├── StateCorruptedError      state.json is damaged (never reset silently)
    └── InstallRejectedError     a verified bundle is not acceptable here
        ├── WrongTargetError     built for another target
        ├── RollbackError        release not newer than the highest ever installed
        └── SelfTestError        the model does not reproduce its self-test vectors
"""

from __future__ import annotations

from edgeops_core import EdgeopsError, InputError

__all__ = [
    "AgentError",
    "ConfigError",
    "InstallRejectedError",
    "ModelLoadError",
    "RollbackError",
    "RuntimeUnavailableError",
    "SelfTestError",
    "StateCorruptedError",
    "TensorInputError",
    "WrongTargetError",
]


class TensorInputError(InputError):
    """An inference input does not match the model's input spec."""


class ConfigError(InputError):
    """The agent configuration file is missing, malformed or invalid."""


class AgentError(EdgeopsError):
    """The agent cannot do what was asked (not the caller's input, not the bundle's trust)."""


class RuntimeUnavailableError(AgentError):
    """The runtime a bundle needs is not installed on this device."""


class ModelLoadError(AgentError):
    """The runtime refuses to load the model bytes."""


class StateCorruptedError(AgentError):
    """The persisted state file is damaged or of another version."""


class InstallRejectedError(AgentError):
    """A bundle that verified is still not acceptable on this device."""


class WrongTargetError(InstallRejectedError):
    """The bundle was built for another target."""


class RollbackError(InstallRejectedError):
    """The bundle's release is not newer than the highest release ever installed."""


class SelfTestError(InstallRejectedError):
    """The model does not reproduce its self-test vectors on this device."""
