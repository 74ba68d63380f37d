"""Dependency direction: device code never pulls in host libraries."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO

HOST_ONLY = (
    "torch", "tensorflow", "onnx", "model_signing", "onnxscript", "edgeops_toolchain", "litert_torch", "torchao", "jax",
    "matplotlib", "sklearn",
)  # fmt: skip
#: Device runtimes: the agent may use them, but only once a bundle needs one (never at import).
RUNTIMES = ("onnxruntime", "ai_edge_litert", "tflite_micro")


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


@pytest.mark.parametrize(
    "module",
    [
        "edgeops_core",
        "edgeops_agent",
        "edgeops_agent.cli",
        "edgeops_agent.runtime",
        "edgeops_agent.agent",
        "edgeops_agent.daemon",
        "edgeops_sim.cli",
        "edgeops_sim.host",
    ],
)
def test_device_packages_import_no_host_library(module: str) -> None:
    loaded = _loaded_after_import(module)
    assert module.split(".")[0] in loaded
    assert not loaded & set(HOST_ONLY), f"{module} pulled in {sorted(loaded & set(HOST_ONLY))}"
    assert not loaded & set(RUNTIMES), f"{module} loaded a runtime at import: {sorted(loaded & set(RUNTIMES))}"


def test_cli_entry_stays_light() -> None:
    """`edgeops --help` must not import torch or onnx: heavy modules load inside steps."""
    loaded = _loaded_after_import("edgeops_toolchain.cli")
    assert not loaded & {"torch", "onnx", "onnxruntime", "model_signing", "tensorflow"}


def _imports(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_agent_sources_never_import_host_code() -> None:
    """Static check of every file under agent/, including lazy imports inside functions."""
    files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "agent").rglob("*.py"))
    assert files
    for path in files:
        bad = _imports(path) & set(HOST_ONLY)
        assert not bad, f"{path} imports {sorted(bad)}"
    core = [p for p in files if p.startswith("agent/edgeops_core/")]
    for path in core:
        assert "edgeops_agent" not in _imports(path), f"{path}: edgeops_core must not depend on edgeops_agent"


def test_sim_sources_depend_on_the_agent_and_core_only() -> None:
    """firmware-sim runs the device code: edgeops_core <- edgeops_agent <- edgeops_sim, no host package."""
    files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "firmware-sim").rglob("*.py"))
    assert files
    for path in files:
        bad = _imports(path) & {*HOST_ONLY, "edgeops_fleet", "sqlalchemy", "starlette"}
        assert not bad, f"{path} imports {sorted(bad)}"


#: The contract's public names. Changing them is a decision: update this list with the docs.
CORE_API = [
    "BLOCK_HEADER_BYTES",
    "BLOCK_MAGIC",
    "BLOCK_REFUSALS",
    "DEFAULT_BLOCK_BYTES",
    "DEPLOY_COMMAND",
    "MAX_BLOCKS",
    "MAX_BLOCK_BYTES",
    "MAX_REQUEST_BLOCKS",
    "MAX_REQUEST_BYTES",
    "MIN_BLOCK_BYTES",
    "OTA_FINAL_EVENTS",
    "OTA_PHASES",
    "OTA_REASONS",
    "BlockError",
    "BlockFrame",
    "BlockRequest",
    "Deploy",
    "OtaOutcome",
    "OtaProgress",
    "choose_block_size",
    "deploy_command",
    "commit_command",
    "rollback_command",
    "Budgets",
    "BundleError",
    "BundleFormatError",
    "BundleInfo",
    "COMMAND_TYPES",
    "COMMAND_WINDOW_S",
    "Command",
    "CommandError",
    "DEFAULT_PREFIX",
    "DigestMismatchError",
    "DriftReference",
    "EVENT_TYPES",
    "EdgeopsError",
    "Event",
    "ExpiredBundleError",
    "FORMATS_BY_RUNTIME",
    "FeatureReference",
    "FIELD_FORMAT",
    "FieldDataError",
    "FieldDataset",
    "FieldReader",
    "HOLDOUT_FRACTION",
    "MAX_FIELD_ROWS",
    "Provenance",
    "UNLABELLED",
    "load_field_dataset",
    "HEALTH_STATES",
    "InputError",
    "KeyFileError",
    "LEAVES",
    "Lineage",
    "MANIFEST_MEMBER",
    "MAX_BUNDLE_BYTES",
    "MESSAGE_SCHEMA",
    "MODEL_MEMBERS",
    "Manifest",
    "ManifestError",
    "MessageError",
    "ModelRef",
    "Preprocessing",
    "ProfileError",
    "QuantParams",
    "SCHEMA_VERSION",
    "SIGNATURE_MEMBER",
    "TASKS",
    "Samples",
    "SelfTest",
    "SelfTestVector",
    "SignatureError",
    "State",
    "TargetProfile",
    "Task",
    "Telemetry",
    "TensorSpec",
    "TrustError",
    "TrustedKey",
    "UnknownTargetError",
    "VerifiedBundle",
    "VerifiedBundleFile",
    "__version__",
    "apply_preprocessing",
    "check_device_id",
    "device_topic",
    "find_profile",
    "format_time",
    "list_profiles",
    "load_profile",
    "load_public_key",
    "load_toml",
    "pack_bundle",
    "parse_command",
    "parse_time",
    "parse_topic",
    "read_bundle_file",
    "read_members",
    "set_clock_skew",
    "utc_now_text",
    "verify_bundle",
    "verify_bundle_file",
    "verify_members",
    "verify_signature",
    "write_atomically",
]

#: The agent's public API (docs/agent.md). Changing it is a decision: update this list with the docs.
AGENT_API = [
    "ActiveSlotDamagedError", "DataDirLockedError", "ModelOutputError", "ModelSwitchError",
    "StateMissingError", "TrialPendingError",
    "Agent", "AgentConfig", "AgentError", "ConfigError", "Daemon", "DataDir", "FeedbackError", "InstallRejectedError",
    "InstallResult",
    "LoadedModel", "ModelLoadError", "Prediction", "RollbackError", "RuntimeUnavailableError", "SelfTestError",
    "StateCorruptedError", "TensorInputError", "WrongTargetError", "__version__", "install_bundle", "load_config",
]  # fmt: skip


def test_public_surface_is_pinned() -> None:
    """Each package's ``__all__`` is exactly the pinned list, and every name in it resolves."""
    import edgeops_agent
    import edgeops_core

    assert sorted(edgeops_core.__all__) == sorted(CORE_API)
    assert sorted(edgeops_agent.__all__) == sorted(AGENT_API)
    for package in (edgeops_core, edgeops_agent):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"


def test_agent_api_resolves_lazily() -> None:
    """``import edgeops_agent`` stays light; a public name loads its module on first use."""
    code = (
        "import sys, edgeops_agent; light = 'numpy' not in sys.modules; "
        "from edgeops_agent import Agent, install_bundle; print(light, Agent.__module__, install_bundle.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "edgeops_agent.agent", "edgeops_agent.install"]
