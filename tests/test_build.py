"""End-to-end builds through the real CLI: the must-shows and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import REPO, Built, make_small_project, run_edgeops
from edgeops_core import Manifest, load_public_key, parse_time, read_members, verify_bundle


def test_build_meets_the_ecu_contract(built: Built) -> None:
    result = built.result
    assert result["ok"] is True
    assert result["target"] == "ecu" and result["release"] == 1
    manifest = verify_bundle(built.bundle, [load_public_key(built.public_key)]).manifest
    metrics = manifest.metrics
    # int8 at most 0.30 x the fp32 bytes, at most 1 point of accuracy lost on held-out data.
    assert metrics["model_bytes"] <= 0.30 * metrics["fp32_model_bytes"]
    assert metrics["size_ratio"] == pytest.approx(metrics["model_bytes"] / metrics["fp32_model_bytes"])
    assert metrics["accuracy_drop_points"] <= 1.0
    assert metrics["accuracy_deployed"] >= 0.90
    assert metrics["parity_max_abs_diff"] <= 1e-3
    assert metrics["model_bytes"] == len(read_members(built.bundle.read_bytes())["model.onnx"])
    rows = {row["name"]: row for row in result["budgets"]}  # the closing table, as JSON
    assert rows["model size"]["passed"] and rows["accuracy drop"]["passed"]
    assert rows["size vs fp32"]["measured"] == pytest.approx(metrics["size_ratio"])
    assert set(result["timings_s"]) == {"data", "train", "export", "quantize", "validate", "package", "sign", "report"}
    assert result["cached_steps"] == [] and result["reused_bundle"] is False


def test_manifest_carries_the_contract(built: Built) -> None:
    m = verify_bundle(built.bundle, [load_public_key(built.public_key)]).manifest
    assert m.runtime == "onnxruntime" and m.precision == "int8"
    assert m.inputs[0].shape == (1, 106) and m.outputs[0].shape == (1, 5)
    assert m.inputs[0].quantization is not None and m.outputs[0].quantization is not None
    assert m.labels == ("normal", "imbalance", "misalignment", "bearing_outer", "looseness")
    assert m.preprocessing.kind == "standardize" and len(m.preprocessing.mean) == 106
    assert len(m.drift_reference.features) == 106 and m.drift_reference.sample_count == 1500
    assert len(m.self_test.vectors) == 10
    assert {v.label for v in m.self_test.vectors} == set(range(5))  # one per class at least
    assert len(m.lineage.dataset_digest) == 64 and len(m.lineage.code_digest) == 64
    assert m.lineage.hyperparameters["train"]["epochs"] == 10
    assert m.lineage.parent_release is None
    assert m.expires_at > parse_time(m.created) and m.release == 1


def test_self_test_vectors_reproduce_on_onnxruntime(built: Built) -> None:
    """What the device health check will do: raw input → preprocessing → model → expected."""
    import numpy as np
    import onnxruntime as ort

    from edgeops_core import apply_preprocessing

    verified = verify_bundle(built.bundle, [load_public_key(built.public_key)])
    m = verified.manifest
    session = ort.InferenceSession(verified.model, providers=["CPUExecutionProvider"])
    for v in m.self_test.vectors:
        x = apply_preprocessing(m.preprocessing, np.asarray([v.input]))
        out = session.run(None, {"features": x})[0][0]
        assert np.abs(out - np.asarray(v.expected)).max() <= m.self_test.atol
        assert int(out.argmax()) == v.label


def test_rebuild_elsewhere_is_reproducible_and_increments_release(tmp_path: Path, built: Built, small_project: Path) -> None:
    """The same project copied to another folder rebuilds to the same model bytes."""
    copy = tmp_path / "elsewhere" / "project"
    shutil.copytree(small_project, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"EDGEOPS_HOME": str(built.home)}
    proc = run_edgeops(
        "build", "-t", "ecu", "-p", copy, "-o", tmp_path / "out", "-k", built.private_key, "--no-cache", "--json", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cached_steps"] == []  # --no-cache ran every step
    members = read_members(Path(json.loads(proc.stdout)["bundle"]).read_bytes())
    manifest = Manifest.from_json(members["manifest.json"])
    assert manifest.release == 2 and manifest.lineage.parent_release == 1
    first = verify_bundle(built.bundle, [load_public_key(built.public_key)])
    assert manifest.lineage.dataset_digest == first.manifest.lineage.dataset_digest
    assert manifest.lineage.code_digest == first.manifest.lineage.code_digest
    assert members["model.onnx"] == first.model  # deterministic training, path-free export


def _assert_one_line_error(proc: object, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    err: str = proc.stderr  # type: ignore[attr-defined]
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_unknown_target(tmp_path: Path) -> None:
    proc = run_edgeops("build", "--target", "toaster", "--out", tmp_path / "out")
    _assert_one_line_error(proc, 2, "unknown target 'toaster'", "ecu, mobile, wearable")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ("epochs = 10", "epochs = = 10", ("edgeops.toml: malformed TOML", "line")),
        ("epochs = 10", "epochs = 0", ("'train.epochs' must be an integer >= 1",)),
    ],
)
def test_bad_project_file(tmp_path: Path, old: str, new: str, needles: tuple[str, ...]) -> None:
    project = make_small_project(tmp_path / "p")
    (project / "edgeops.toml").write_text((project / "edgeops.toml").read_text().replace(old, new))
    proc = run_edgeops("build", "-t", "ecu", "-p", project, "-o", tmp_path / "out")
    _assert_one_line_error(proc, 2, *needles)
    assert not (tmp_path / "out").exists()


def _project_with(tmp_path: Path, module: str, source: str, old_entry: str, new_entry: str) -> Path:
    """A small project (one epoch) whose entry point ``old_entry`` is replaced by ``source``."""
    project = make_small_project(tmp_path / "p", n_train=600, epochs=1)
    (project / f"{module}.py").write_text(source)
    toml = project / "edgeops.toml"
    assert f'"{old_entry}"' in toml.read_text()
    toml.write_text(toml.read_text().replace(f'"{old_entry}"', f'"{new_entry}"'))
    return project


NAN_DATA = """
import numpy as np
from vibration_data import load_dataset as _load

def load_dataset(**params):
    d = _load(**params)
    d["x_train"][17, 3] = np.nan
    return d
"""

SHAPE_DATA = """
from vibration_data import load_dataset as _load

def load_dataset(**params):
    d = _load(**params)
    d["x_test"] = d["x_test"][:, :-1]
    return d
"""


@pytest.mark.parametrize(
    ("module", "needles"),
    [
        (NAN_DATA, ("x_train has 1 NaN/inf value(s); first at row 17, feature 'x_band03_96_128hz'",)),
        (SHAPE_DATA, ("x_test must have shape [rows, 106]", "got [800, 105]")),
    ],
)
def test_bad_dataset(tmp_path: Path, module: str, needles: tuple[str, ...]) -> None:
    project = _project_with(tmp_path, "bad_data", module, "vibration_data:load_dataset", "bad_data:load_dataset")
    proc = run_edgeops("build", "-t", "ecu", "-p", project, "-o", tmp_path / "out")
    _assert_one_line_error(proc, 2, *needles)
    assert not (tmp_path / "out").exists()


UNEXPORTABLE_MODEL = """
import torch
from torch import nn

class DataDependent(nn.Module):
    def __init__(self, n_features, n_classes):
        super().__init__()
        self.a = nn.Linear(n_features, n_classes)
        self.b = nn.Linear(n_features, n_classes)

    def forward(self, x):
        # Python control flow on tensor values cannot be captured in a static graph.
        if x.sum().item() > 0:
            return self.a(x)
        return self.b(x)

def build_model(n_features, n_classes, **_):
    return DataDependent(n_features, n_classes)
"""


@pytest.mark.slow
def test_model_that_does_not_export(tmp_path: Path) -> None:
    project = _project_with(tmp_path, "bad_model", UNEXPORTABLE_MODEL, "vibration_model:build_model", "bad_model:build_model")
    proc = run_edgeops("build", "-t", "ecu", "-p", project, "-o", tmp_path / "out")
    _assert_one_line_error(proc, 2, "ONNX export of DataDependent failed")
    assert not (tmp_path / "out").exists()


WRONG_WIDTH_MODEL = """
from torch import nn

def build_model(n_features, n_classes, **_):
    return nn.Linear(n_features, n_classes + 2)
"""


def test_model_with_wrong_output_width(tmp_path: Path) -> None:
    project = _project_with(tmp_path, "wide", WRONG_WIDTH_MODEL, "vibration_model:build_model", "wide:build_model")
    proc = run_edgeops("build", "-t", "ecu", "-p", project, "-o", tmp_path / "out")
    _assert_one_line_error(proc, 2, "returns [2, 7] for a [2, 106] input, expected [2, 5] (one logit per label)")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_budget_exceeded_names_budget_and_writes_nothing(tmp_path: Path, small_project: Path) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    text = (REPO / "targets" / "ecu.toml").read_text().replace("model_bytes = 262_144", "model_bytes = 50_000")
    assert '"Gemm", ' in text
    (targets / "tiny-ecu.toml").write_text(text.replace('"Gemm", ', ""))
    proc = run_edgeops("build", "-t", "tiny-ecu", "--targets-dir", targets, "-p", small_project, "-o", tmp_path / "out")
    _assert_one_line_error(
        proc, 3, "2 budget(s) exceeded: model size: measured", "limit <= 48.8 KiB", "operator set: measured unsupported: Gemm"
    )
    assert "FAIL" in proc.stdout  # the closing table is still shown
    assert not (tmp_path / "out").exists()
    as_json = run_edgeops(
        "build", "-t", "tiny-ecu", "--targets-dir", targets, "-p", small_project, "-o", tmp_path / "out", "--json"
    )
    assert as_json.returncode == 3
    payload = json.loads(as_json.stdout)
    failed = [row["name"] for row in payload["budgets"] if not row["passed"]]
    assert failed == ["model size", "operator set"]
    assert not (tmp_path / "out").exists()


def test_missing_and_unusable_keys(tmp_path: Path) -> None:
    proc = run_edgeops("build", "-t", "ecu", "-k", tmp_path / "nope.pem", "-o", tmp_path / "out")
    _assert_one_line_error(proc, 2, "nope.pem: cannot read private key")
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    proc = run_edgeops("build", "-t", "ecu", "-k", bad, "-o", tmp_path / "out")
    _assert_one_line_error(proc, 2, "bad.pem: not a PEM private key")
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_text("x")
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        proc = run_edgeops("build", "-t", "ecu", "-k", unreadable, "-o", tmp_path / "out")
        _assert_one_line_error(proc, 2, "cannot read private key")
    assert not (tmp_path / "out").exists()


def test_keys_generate(tmp_path: Path) -> None:
    proc = run_edgeops("keys", "generate", tmp_path / "k")
    assert proc.returncode == 0, proc.stderr
    private = tmp_path / "k" / "edgeops-signing.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    load_public_key(tmp_path / "k" / "edgeops-signing.pub.pem")
    again = run_edgeops("keys", "generate", tmp_path / "k")
    _assert_one_line_error(again, 2, "already exists; pass --force")
    before = private.read_bytes()
    forced = run_edgeops("keys", "generate", tmp_path / "k", "--force")
    assert forced.returncode == 0
    assert private.read_bytes() != before


def test_init_creates_a_buildable_project(tmp_path: Path) -> None:
    from edgeops_toolchain.project import load_project

    proc = run_edgeops("init", tmp_path / "My Sensor")
    assert proc.returncode == 0, proc.stderr
    project = load_project(tmp_path / "My Sensor")
    assert project.name == "my-sensor"
    assert project.model_entry == "vibration_model:build_model"
    again = run_edgeops("init", tmp_path / "My Sensor")
    _assert_one_line_error(again, 2, "is not empty")
