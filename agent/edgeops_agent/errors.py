"""Errors of the device agent, under the shared tree of :mod:`edgeops_core`::

EdgeopsError
├── InputError
│   ├── TensorInputError     an inference input has the wrong shape, dtype or NaN/inf
│   ├── FeedbackError        a ground-truth label for an unknown/expired prediction, or a bad label
│   └── ConfigError          agent.toml is missing, malformed or invalid
├── BundleError              (edgeops_core) tampered, untrusted, expired, malformed bundle
└── AgentError               the agent cannot do what was asked
    ├── RuntimeUnavailableError  the bundle's runtime is not installed (names the extra)
    ├── ModelLoadError           the runtime refuses the model bytes
    ├── ModelOutputError         the model produced NaN or inf for a valid input
    ├── StateCorruptedError      state.json is damaged (never reset silently)
    │   └── StateMissingError    state.json is gone although the device has slots
    ├── DataDirLockedError       another process holds the data directory
    ├── ActiveSlotDamagedError   the active slot no longer loads (install to repair)
    ├── MetricsError             the [metrics] listener cannot start (address in use, extra missing)
    ├── CommandRejectedError     a valid command that does not apply now (commit of a deploy not held)
    ├── InjectedFaultError       (edgeops_agent.fault) a test-only injected prediction failure
    └── InstallRejectedError     a verified bundle is not acceptable here
        ├── WrongTargetError     built for another target
        ├── RollbackError        release not newer than the highest ever installed
        ├── ModelSwitchError     another model name, without an explicit switch
        ├── TrialPendingError    a trial activation awaits confirm or rollback
        └── SelfTestError        the model does not reproduce its self-test vectors
"""

from __future__ import annotations

from edgeops_core import EdgeopsError, InputError

__all__ = [
    "ActiveSlotDamagedError",
    "AgentError",
    "CommandRejectedError",
    "ConfigError",
    "DataDirLockedError",
    "FeedbackError",
    "InstallRejectedError",
    "MetricsError",
    "ModelLoadError",
    "ModelOutputError",
    "ModelSwitchError",
    "RollbackError",
    "RuntimeUnavailableError",
    "SelfTestError",
    "StateCorruptedError",
    "StateMissingError",
    "TensorInputError",
    "TrialPendingError",
    "WrongTargetError",
]


class TensorInputError(InputError):
    """An inference input does not match the model's input spec."""


class ConfigError(InputError):
    """The agent configuration file is missing, malformed or invalid."""


class AgentError(EdgeopsError):
    """The agent cannot do what was asked (not the caller's input, not the bundle's trust)."""


class FeedbackError(InputError):
    """A ground-truth label cannot be attached: an unknown or expired prediction id, a label
    the model does not have, or a prediction that already has its label."""


class RuntimeUnavailableError(AgentError):
    """The runtime a bundle needs is not installed on this device."""


class ModelLoadError(AgentError):
    """The runtime refuses to load the model bytes."""


class ModelOutputError(AgentError):
    """The model produced a non-finite output (NaN or inf) for a valid input."""


class StateCorruptedError(AgentError):
    """The persisted state file is damaged or of another version."""


class StateMissingError(StateCorruptedError):
    """``state.json`` is missing although the data directory holds slots: not a new device."""


class DataDirLockedError(AgentError):
    """Another process (a daemon, an install) holds the data directory's lock."""


class ActiveSlotDamagedError(AgentError):
    """The active slot is missing or changed since its install; installing a bundle repairs it."""


class MetricsError(AgentError):
    """The ``[metrics]`` listener cannot start: its address is in use or unusable, or ``prometheus_client`` is missing."""


class CommandRejectedError(AgentError):
    """A well-formed command that does not apply in the device's present state (``command_rejected``).

    E.g. ``commit`` or ``rollback`` for a deploy that is not held on this device.
    """


class InstallRejectedError(AgentError):
    """A bundle that verified is still not acceptable on this device."""


class WrongTargetError(InstallRejectedError):
    """The bundle was built for another target."""


class RollbackError(InstallRejectedError):
    """The bundle's release is not newer than the highest release ever installed."""


class ModelSwitchError(InstallRejectedError):
    """The bundle is of another model than the one this device is bound to (see ADR 0009)."""


class TrialPendingError(InstallRejectedError):
    """A trial activation is pending: it must be confirmed or rolled back first."""


class SelfTestError(InstallRejectedError):
    """The model does not reproduce its self-test vectors on this device."""
