"""edgeops_agent: what ships to a device.

It depends on :mod:`edgeops_core` and device-safe libraries only: never torch, tensorflow or
the toolchain (a test imports it in a fresh interpreter and checks ``sys.modules``).

The public API is what docs/agent.md tells users to call::

    from edgeops_agent import Agent, DataDir, install_bundle
    agent = Agent(DataDir(Path("/var/lib/edgeops")))
    agent.predict([0.1, 0.2, ...])          # -> Prediction(label, class_index, logits, latency_ms, id, task, ...)

``edgeops-agent`` (:mod:`edgeops_agent.cli`) wraps the same API: ``verify``, ``trust add``,
``install``, ``status``, ``predict`` and ``run`` (the daemon: MQTT, the local socket,
telemetry, drift). Names are imported on first use (PEP 562), so ``import edgeops_agent``
and ``edgeops-agent --help`` stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "Agent": "edgeops_agent.agent",
    "AgentConfig": "edgeops_agent.config",
    "AgentError": "edgeops_agent.errors",
    "TrialPendingError": "edgeops_agent.errors",
    "StateMissingError": "edgeops_agent.errors",
    "ModelSwitchError": "edgeops_agent.errors",
    "ModelOutputError": "edgeops_agent.errors",
    "DataDirLockedError": "edgeops_agent.errors",
    "ActiveSlotDamagedError": "edgeops_agent.errors",
    "ConfigError": "edgeops_agent.errors",
    "FeedbackError": "edgeops_agent.errors",
    "Daemon": "edgeops_agent.daemon",
    "DataDir": "edgeops_agent.store",
    "InstallRejectedError": "edgeops_agent.errors",
    "InstallResult": "edgeops_agent.install",
    "LoadedModel": "edgeops_agent.model",
    "ModelLoadError": "edgeops_agent.errors",
    "Prediction": "edgeops_agent.model",
    "RollbackError": "edgeops_agent.errors",
    "RuntimeUnavailableError": "edgeops_agent.errors",
    "SelfTestError": "edgeops_agent.errors",
    "StateCorruptedError": "edgeops_agent.errors",
    "TensorInputError": "edgeops_agent.errors",
    "WrongTargetError": "edgeops_agent.errors",
    "install_bundle": "edgeops_agent.install",
    "load_config": "edgeops_agent.config",
}

__all__ = [
    "ActiveSlotDamagedError",
    "Agent",
    "AgentConfig",
    "AgentError",
    "ConfigError",
    "Daemon",
    "DataDir",
    "DataDirLockedError",
    "FeedbackError",
    "InstallRejectedError",
    "InstallResult",
    "LoadedModel",
    "ModelLoadError",
    "ModelOutputError",
    "ModelSwitchError",
    "Prediction",
    "RollbackError",
    "RuntimeUnavailableError",
    "SelfTestError",
    "StateCorruptedError",
    "StateMissingError",
    "TensorInputError",
    "TrialPendingError",
    "WrongTargetError",
    "__version__",
    "install_bundle",
    "load_config",
]

if TYPE_CHECKING:
    from edgeops_agent.agent import Agent
    from edgeops_agent.config import AgentConfig, load_config
    from edgeops_agent.daemon import Daemon
    from edgeops_agent.errors import (
        ActiveSlotDamagedError,
        AgentError,
        ConfigError,
        DataDirLockedError,
        FeedbackError,
        InstallRejectedError,
        ModelLoadError,
        ModelOutputError,
        ModelSwitchError,
        RollbackError,
        RuntimeUnavailableError,
        SelfTestError,
        StateCorruptedError,
        StateMissingError,
        TensorInputError,
        TrialPendingError,
        WrongTargetError,
    )
    from edgeops_agent.install import InstallResult, install_bundle
    from edgeops_agent.model import LoadedModel, Prediction
    from edgeops_agent.store import DataDir


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeops_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
