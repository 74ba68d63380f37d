"""The device-side command verifies bundles with edgeops_core alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Built
from edgeops_core import pack_bundle, read_members

AGENT = [sys.executable, "-c", "from edgeops_agent.cli import main; main()"]


def _agent(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def test_agent_verify(tmp_path: Path, built: Built) -> None:
    ok = _agent("verify", built.bundle, "--key", built.public_key)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK ") and "release 1 for ecu" in ok.stdout
    members = read_members(built.bundle.read_bytes())
    members["model.onnx"] = members["model.onnx"][:-1] + bytes([members["model.onnx"][-1] ^ 0xFF])
    bad = tmp_path / "bad.edgeops"
    bad.write_bytes(pack_bundle(members))
    rejected = _agent("verify", bad, "--key", built.public_key)
    assert rejected.returncode == 4
    assert "model.onnx" in rejected.stderr and "Traceback" not in rejected.stderr
