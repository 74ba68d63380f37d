"""The second example (scikit-learn's 8x8 digits, a tiny CNN) builds for every target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_edgeops
from edgeops_core import load_public_key, read_members, verify_bundle


@pytest.mark.slow
def test_digits_cnn_builds_for_all_three_targets(tmp_path: Path) -> None:
    from edgeops_toolchain.onnx_export import op_types
    from edgeops_toolchain.tflite_export import tflite_ops

    home = tmp_path / "home"
    env = {"EDGEOPS_HOME": str(home)}
    results = {}
    for target in ("ecu", "mobile", "wearable"):
        proc = run_edgeops("build", "-t", target, "-p", REPO / "examples" / "digits", "-o", tmp_path / "dist", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        results[target] = json.loads(proc.stdout)
    key = load_public_key(home / "keys" / "dev-signing.pub.pem")
    for target, result in results.items():
        bundle = Path(result["bundle"])
        m = verify_bundle(bundle, [key]).manifest
        assert m.name == "digits-cnn" and m.target == target and len(m.labels) == 10
        assert m.feature_names == ("intensity",) and m.inputs[0].shape == (1, 1, 8, 8)  # an N-d input: one channel
        assert m.metrics["accuracy_deployed"] >= 0.9 and m.metrics["accuracy_drop_points"] <= 1.0
        model = read_members(bundle.read_bytes())[m.model_file]
        ops = op_types(model) if m.model_file == "model.onnx" else tflite_ops(model)
        assert ops & {"Conv", "CONV_2D", "DEPTHWISE_CONV_2D"}, ops  # convolutions, not the vibration MLP
    assert results["mobile"]["cached_steps"] == ["data", "train"]  # one training for all targets
    assert results["wearable"]["metrics"]["arena_bytes"] <= 65_536
