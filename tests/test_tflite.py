"""TFLite export (litert-torch PT2E), the LiteRT and TFLite Micro runtimes, and mobile/wearable builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import Built, run_edgeops
from edgeops_agent.errors import ModelLoadError
from edgeops_agent.runtime import LiteRtRuntime, ModelRunner, TflmRuntime
from edgeops_core import Manifest, load_public_key, read_members, verify_bundle
from edgeops_toolchain.errors import ExportError
from edgeops_toolchain.tflite_export import export_tflite, quantize_tflite, tflite_io, tflite_mac_count, tflite_ops
from edgeops_toolchain.validate import minimum_tflm_arena, tflm_arena_fits


def _mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)


def test_int8_tflite_runs_alike_in_litert_and_tflm(calibration: np.ndarray) -> None:
    model = _mlp(32)
    fp32 = export_tflite(model, 12, 4)
    q = quantize_tflite(model, calibration, 4)
    assert tflite_ops(q) == {"FULLY_CONNECTED"}
    assert tflite_mac_count(q) == 12 * 32 + 32 * 4
    (d_in, q_in), (d_out, q_out) = tflite_io(q)
    assert (d_in, d_out) == ("int8", "int8") and q_in is not None and q_out is not None  # int8 model I/O
    assert tflite_io(fp32)[0] == ("float32", None)
    with torch.no_grad():
        ref = model(torch.from_numpy(calibration)).numpy()
    float_rt = LiteRtRuntime(fp32, 1)
    float_out = np.stack([float_rt.invoke(calibration[i : i + 1])[0] for i in range(64)])
    assert np.abs(float_out - ref).max() < 1e-4  # float TFLite matches torch
    lite, micro = LiteRtRuntime(q, 2), TflmRuntime(q)
    spec_in, spec_out = lite.input, lite.output
    assert micro.input == spec_in and micro.output == spec_out
    from edgeops_core import TensorSpec

    runner = ModelRunner(lite, TensorSpec("f", "int8", (1, 12), q_in), TensorSpec("l", "int8", (1, 4), q_out))
    diffs, errors = [], []
    for i in range(64):
        raw = runner.quantize_input(calibration[i : i + 1])
        diffs.append(np.abs(lite.invoke(raw).astype(int) - micro.invoke(raw).astype(int)).max())
        errors.append(np.abs(runner.dequantize_output(lite.invoke(raw)) - ref[i]).max())
    assert max(diffs) <= 2  # the two runtimes agree within 2 LSB
    assert max(errors) < 0.1 * np.abs(ref).max()  # and int8 stays close to float


def test_tflm_arena_is_measured_and_grows_with_the_model(calibration: np.ndarray) -> None:
    small = TflmRuntime(quantize_tflite(_mlp(16), calibration, 4)).arena_bytes
    big = TflmRuntime(quantize_tflite(_mlp(512), calibration, 4)).arena_bytes
    assert 0 < small < big
    model = quantize_tflite(_mlp(16), calibration, 4)
    need = minimum_tflm_arena(model, small)
    # The recorder counts what stays allocated, not allocation's own temporaries: the real
    # need is larger, and found to the byte step by loading the model in fresh processes.
    assert small < need <= 4 * small and need % 16 == 0
    assert TflmRuntime(model, arena_size=need).arena_bytes == small  # the minimum is enough...
    assert not tflm_arena_fits(model, need - 16)  # ...one step less is not (it may crash TFLM: a subprocess)
    with pytest.raises(ModelLoadError, match="below the minimum"):  # TFLM itself would crash here
        TflmRuntime(model, arena_size=256)


class _BooleanMask(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x[x > 0].sum()


def test_conversion_failure_names_the_module(calibration: np.ndarray) -> None:
    model = nn.Sequential(nn.Linear(12, 8), _BooleanMask(), nn.Linear(8, 4)).eval()
    with pytest.raises(ExportError, match=r"litert-torch conversion of Sequential failed in module 1 \(_BooleanMask\)"):
        export_tflite(model, 12, 4)
    with pytest.raises(ExportError, match=r"int8 quantization of Sequential failed in module 1 \(_BooleanMask\)"):
        quantize_tflite(model, calibration, 4)


@pytest.fixture(scope="session")
def built_tflite(built: Built, small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """mobile and wearable builds of the session's project, in the ECU build's home (so data and train are cached)."""
    out = tmp_path_factory.mktemp("dist-tflite")
    results = {}
    for target in ("mobile", "wearable"):
        proc = run_edgeops(
            "build", "-t", target, "-p", small_project, "-o", out, "-k", built.private_key, "--json",
            env={"EDGEOPS_HOME": str(built.home)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        results[target] = json.loads(proc.stdout)
    return results


@pytest.mark.parametrize("target", ["mobile", "wearable"])
def test_tflite_targets_leave_verified_bundles(built: Built, built_tflite: dict[str, dict[str, object]], target: str) -> None:
    result = built_tflite[target]
    # The ECU build's trained model was reused; wearable also reuses mobile's int8 TFLite.
    assert result["cached_steps"] == {"mobile": ["data", "train"], "wearable": ["data", "train", "export", "quantize"]}[target]
    verified = verify_bundle(Path(str(result["bundle"])), [load_public_key(built.public_key)])
    m = verified.manifest
    assert m.target == target and m.model_file == "model.tflite"
    assert m.runtime == {"mobile": "litert", "wearable": "tflite-micro"}[target]
    assert m.inputs[0].dtype == "int8" and m.outputs[0].dtype == "int8"
    assert m.inputs[0].quantization is not None and m.outputs[0].quantization is not None
    assert m.metrics["accuracy_drop_points"] <= 1.0 and m.metrics["runtime_max_lsb"] <= 2
    assert m.metrics["top1_agreement"] >= 0.97  # int8 and float agree on almost every test row (measured 0.9985)
    rows = {r["name"]: r for r in result["budgets"]}  # type: ignore[attr-defined]
    assert rows["TFLM vs LiteRT"]["passed"] and rows["operator set"]["measured_text"] == "all supported"
    if target == "wearable":
        # The arena TFLite Micro measured is in the manifest, and within the RAM budget.
        assert 0 < m.metrics["arena_bytes"] <= 65_536
        assert rows["tensor arena (measured)"]["measured"] == m.metrics["arena_bytes"]
        assert m.metrics["arena_recorded_bytes"] < m.metrics["arena_bytes"]  # print_allocations' figure undershoots
        assert rows["model size (flash)"]["passed"]


@pytest.mark.parametrize("target", ["mobile", "wearable"])
def test_self_test_vectors_pass_on_the_target_runtime(built_tflite: dict[str, dict[str, object]], target: str) -> None:
    """What the device's health check will do: run the manifest's self-test through the agent's runner."""
    members = read_members(Path(str(built_tflite[target]["bundle"])).read_bytes())
    m = Manifest.from_json(members["manifest.json"])
    runner = ModelRunner.from_manifest(m, members["model.tflite"])
    for v in m.self_test.vectors:
        out = runner.predict(np.asarray(v.input, dtype=np.float32))
        assert np.abs(out - np.asarray(v.expected)).max() <= m.self_test.atol
        assert int(out.argmax()) == v.label


def _profile(tmp_path: Path, old: str, new: str) -> Path:
    from edgeops_toolchain.resources import builtin_targets_dir

    folder = tmp_path / "targets"
    folder.mkdir(exist_ok=True)
    text = (builtin_targets_dir() / "wearable.toml").read_text()
    assert old in text
    (folder / "wearable.toml").write_text(text.replace(old, new))
    return folder


def test_unsupported_tflm_operator_is_named(tmp_path: Path, built: Built, small_project: Path) -> None:
    targets = _profile(tmp_path, '"FULLY_CONNECTED", "CONV_2D"', '"CONV_2D"')
    out = tmp_path / "out"
    proc = run_edgeops(
        "build", "-t", "wearable", "-p", small_project, "-o", out, "--targets-dir", targets, env={"EDGEOPS_HOME": str(built.home)}
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and "operator set" in proc.stderr and "unsupported: FULLY_CONNECTED" in proc.stderr
    assert not out.exists()


def test_arena_over_budget_fails_naming_it(tmp_path: Path, built: Built, small_project: Path) -> None:
    targets = _profile(tmp_path, "ram_bytes = 65_536", "ram_bytes = 2_048")
    out = tmp_path / "out"
    proc = run_edgeops(
        "build", "-t", "wearable", "-p", small_project, "-o", out, "--targets-dir", targets, "--json",
        env={"EDGEOPS_HOME": str(built.home)},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "tensor arena (measured): measured" in proc.stderr and "limit <= 2.0 KiB" in proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["budgets"]}
    assert not rows["tensor arena (measured)"]["passed"] and rows["tensor arena (measured)"]["measured"] > 2048
    assert not out.exists()
