"""The device-side command verifies bundles with edgeops_core alone."""

from __future__ import annotations

from pathlib import Path

from conftest import Built, run_agent
from edgeops_core import pack_bundle, read_members


def test_agent_verify(tmp_path: Path, built: Built) -> None:
    ok = run_agent("verify", built.bundle, "--key", built.public_key)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK ") and "release 1 for ecu" in ok.stdout
    members = read_members(built.bundle.read_bytes())
    members["model.onnx"] = members["model.onnx"][:-1] + bytes([members["model.onnx"][-1] ^ 0xFF])
    bad = tmp_path / "bad.edgeops"
    bad.write_bytes(pack_bundle(members))
    rejected = run_agent("verify", bad, "--key", built.public_key)
    assert rejected.returncode == 4
    assert "model.onnx" in rejected.stderr and "Traceback" not in rejected.stderr
