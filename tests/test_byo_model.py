"""Bring your own model: a trained PyTorch state_dict or an ONNX file instead of training.

The must-show builds are real and go through the CLI (``examples/byo-vibration`` for ecu,
mobile and wearable, an ONNX made from the same weights for ecu), are verified by ``edgeops verify`` and
installed and served by the agent. They share one home (key, registry, cache) per module.
The bad-input tests call the loaders in-process: every one fails before an exporter runs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_edgeops
from edgeops_agent.agent import Agent
from edgeops_agent.install import install_bundle
from edgeops_agent.store import DataDir
from edgeops_core import Manifest, ManifestError, read_members
from edgeops_toolchain.data import check_data, load_dataset
from edgeops_toolchain.errors import DataError, ProjectError
from edgeops_toolchain.project import Project, load_project

EXAMPLE = REPO / "examples" / "byo-vibration"
N_FEATURES, N_CLASSES = 106, 5


def _copy_example(dest: Path) -> Path:
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _state_dict() -> dict[str, object]:
    import torch

    return dict(torch.load(EXAMPLE / "model.pt", weights_only=True))


def _onnx_from_weights(state: dict[str, object], *, n_features: int = N_FEATURES, two_inputs: bool = False) -> bytes:
    """The example's MLP as a hand-written ONNX graph, as another framework would save it:
    its own tensor names (``x``, ``y``) and a symbolic batch dimension."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = [np.asarray(state[f"{i}.weight"]) for i in (0, 2, 4)]
    biases = [np.asarray(state[f"{i}.bias"]) for i in (0, 2, 4)]
    weights[0] = weights[0][:, :n_features]
    nodes, inits, current = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out if i == 2 else f"g{i}"], transB=1))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        current = out
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_features])]
    if two_inputs:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", n_features]))
    graph = helper.make_graph(
        nodes, "mlp", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N_CLASSES])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _build(project: Path, target: str, out: Path, home: Path) -> dict[str, object]:
    proc = run_edgeops("build", "-t", target, "-p", project, "-o", out, "--json", env={"EDGEOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def byo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Builds of one home: PyTorch ecu, mobile, wearable, ecu unchanged, ecu with a changed model; ONNX ecu."""
    import torch

    root = tmp_path_factory.mktemp("byo")
    home = root / "home"
    project = _copy_example(root / "project")
    onnx_project = root / "onnx-project"
    onnx_project.mkdir()
    shutil.copy2(EXAMPLE / "data.npz", onnx_project / "data.npz")
    (onnx_project / "model.onnx").write_bytes(_onnx_from_weights(_state_dict()))
    (onnx_project / "edgeops.toml").write_text(
        '[project]\nname = "byo-onnx"\nversion = "1.0.0"\n[model]\nonnx = "model.onnx"\n[data]\nnpz = "data.npz"\n'
    )
    builds = {
        "ecu": _build(project, "ecu", root / "out-ecu", home),
        "mobile": _build(project, "mobile", root / "out-mobile", home),
        "wearable": _build(project, "wearable", root / "out-wearable", home),
        "ecu-again": _build(project, "ecu", root / "out-again", home),
        "onnx-ecu": _build(onnx_project, "ecu", root / "out-onnx", home),
    }
    first_digest = "sha256:" + hashlib.sha256((project / "model.pt").read_bytes()).hexdigest()
    state = _state_dict()
    state["4.bias"] = state["4.bias"] + 0.01  # type: ignore[operator]
    torch.save(state, project / "model.pt")
    builds["ecu-changed"] = _build(project, "ecu", root / "out-changed", home)
    return {"builds": builds, "home": home, "first_digest": first_digest, "project": project}


def _manifest(result: dict[str, object]) -> Manifest:
    return Manifest.from_json(read_members(Path(str(result["bundle"])).read_bytes())["manifest.json"])


@pytest.mark.parametrize("which", ["ecu", "mobile", "wearable", "onnx-ecu"])
def test_byo_bundle_verifies_installs_and_serves_its_self_test(byo: dict[str, object], which: str, tmp_path: Path) -> None:
    result = byo["builds"][which]  # type: ignore[index]
    home = Path(str(byo["home"]))
    public = home / "keys" / "dev-signing.pub.pem"
    proc = run_edgeops("verify", result["bundle"], "--key", public, env={"EDGEOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    m = _manifest(result)
    assert m.metrics["accuracy_deployed"] >= 0.9 and m.metrics["accuracy_drop_points"] <= 1.0
    assert m.lineage.hyperparameters["model"] == (
        {"onnx": "model.onnx"} if which == "onnx-ecu" else {"entry": "byo_model:build_model", "weights": "model.pt"}
    )
    assert "train" not in m.lineage.hyperparameters
    data = DataDir(tmp_path / "device")
    data.add_trusted_key(public)
    install_bundle(data, Path(str(result["bundle"])), target=m.target)
    agent = Agent(data)
    for v in m.self_test.vectors:
        got = agent.predict(np.asarray(v.input, dtype=np.float32))
        assert got.class_index == v.label
        assert np.abs(np.asarray(got.logits) - np.asarray(v.expected)).max() <= m.self_test.atol


def test_onnx_build_has_no_torch_parity_row(byo: dict[str, object]) -> None:
    builds = byo["builds"]  # type: ignore[index]
    assert "parity_max_abs_diff" not in builds["onnx-ecu"]["metrics"]
    assert builds["ecu"]["metrics"]["parity_max_abs_diff"] <= 1e-3
    assert builds["onnx-ecu"]["metrics"]["accuracy_float"] == builds["ecu"]["metrics"]["accuracy_float"]


def test_lineage_has_the_model_digest_and_the_cache_keys_on_the_file(byo: dict[str, object]) -> None:
    builds = byo["builds"]  # type: ignore[index]
    first, again, changed = _manifest(builds["ecu"]), _manifest(builds["ecu-again"]), _manifest(builds["ecu-changed"])
    assert first.lineage.model_digest == byo["first_digest"]
    # Unchanged: the cached release, nothing rebuilt.
    assert builds["ecu-again"]["reused_bundle"] and again.release == first.release
    # The mobile build loaded nothing again: data and train (the loaded model) came from the cache.
    assert builds["mobile"]["cached_steps"] == ["data", "train"]
    # Changed model bytes: the model is loaded again and a new release carries the new digest.
    project = Path(str(byo["project"]))
    assert changed.lineage.model_digest == "sha256:" + hashlib.sha256((project / "model.pt").read_bytes()).hexdigest()
    assert changed.release > first.release and changed.lineage.model_digest != first.lineage.model_digest
    assert builds["ecu-changed"]["cached_steps"] == ["data"]
    onnx_digest = _manifest(builds["onnx-ecu"]).lineage.model_digest
    assert onnx_digest is not None and onnx_digest.startswith("sha256:")


def test_old_manifests_without_model_digest_still_parse(byo: dict[str, object]) -> None:
    m = _manifest(byo["builds"]["ecu"])  # type: ignore[index]
    raw = json.loads(m.to_json())
    del raw["lineage"]["model_digest"]
    assert Manifest.from_json(json.dumps(raw).encode()).lineage.model_digest is None
    raw["lineage"]["model_digest"] = "md5:abc"
    with pytest.raises(ManifestError, match=r"lineage\.model_digest"):
        Manifest.from_json(json.dumps(raw).encode())


def test_onnx_for_a_tflite_target_exits_2_naming_the_supported_conversion(tmp_path: Path) -> None:
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy2(EXAMPLE / "data.npz", project / "data.npz")
    (project / "model.onnx").write_bytes(_onnx_from_weights(_state_dict()))
    (project / "edgeops.toml").write_text(
        '[project]\nname = "x"\nversion = "1.0.0"\n[model]\nonnx = "model.onnx"\n[data]\nnpz = "data.npz"\n'
    )
    proc = run_edgeops("build", "-t", "wearable", "-p", project, "-o", tmp_path / "out")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "model.onnx" in line and "PyTorch models to TFLite" in line and "not ONNX" in line


# -- bad input, in-process: each stops before an exporter runs ---------------------------------


def _load(project: Project) -> object:
    from edgeops_toolchain.pretrained import load_pretrained

    ds = load_dataset(project)
    report = check_data(ds, project.checks, project.preprocessing)
    data = Path(str(project.model_file)).read_bytes()
    return load_pretrained(project, data, ds, report.preprocessing)


def _variant(tmp_path: Path, *, model: str | None = None, payload: bytes | None = None, name: str = "model.pt") -> Project:
    project = _copy_example(tmp_path / "p")
    if payload is not None:
        (project / name).write_bytes(payload)
    if model is not None:
        text = (project / "edgeops.toml").read_text()
        start, end = text.index("[model]"), text.index("[data]")
        (project / "edgeops.toml").write_text(text[:start] + "[model]\n" + model + "\n\n" + text[end:])
    return load_project(project)


def test_state_dict_for_other_shapes_names_the_field_and_n_features(tmp_path: Path) -> None:
    import io

    import torch

    state = _state_dict()
    state["0.weight"] = state["0.weight"][:, :100]  # type: ignore[index]
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(
        ProjectError, match=r"model\.weights \(model\.pt\): does not fit .*n_features=106, n_classes=5.*size mismatch"
    ):
        _load(_variant(tmp_path, payload=buf.getvalue()))


def test_onnx_for_other_shapes_names_the_field(tmp_path: Path) -> None:
    wrong = _onnx_from_weights(_state_dict(), n_features=100)
    with pytest.raises(ProjectError, match=r"model\.onnx.*shape \[batch, 100\], expected \[batch, 106\] \(n_features=106"):
        _load(_variant(tmp_path, model='onnx = "model.onnx"', payload=wrong, name="model.onnx"))


class _Payload:
    """An object whose unpickling would run code: weights_only must refuse it, not run it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickling ran code",))


def _torch_saved(obj: object) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x00garbage\xff" * 10, r"not a torch\.save file of tensors"),
        ((EXAMPLE / "model.pt").read_bytes()[:20_000], ""),
        (pickle.dumps(ProjectError("boom")), r"not a torch\.save file of tensors"),
        (_torch_saved({"0.weight": _Payload()}), r"it pickles Python objects besides tensors \(print;"),
        (_torch_saved(ProjectError("boom")), r"it pickles Python objects besides tensors"),
    ],
    ids=["garbage", "truncated", "plain-pickle", "code-in-pickle", "object"],
)
def test_state_dict_that_does_not_load_names_the_field(
    tmp_path: Path, payload: bytes, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ProjectError, match=rf"model\.weights \(model\.pt\): does not load as a state_dict .*{expected}"):
        _load(_variant(tmp_path, payload=payload))
    assert "ran code" not in capsys.readouterr().out


def test_onnx_with_two_inputs_or_garbage_is_refused(tmp_path: Path) -> None:
    two = _onnx_from_weights(_state_dict(), two_inputs=True)
    with pytest.raises(ProjectError, match=r"model\.onnx \(model\.onnx\): has 2 input\(s\) \(x, mask\)"):
        _load(_variant(tmp_path / "a", model='onnx = "model.onnx"', payload=two, name="model.onnx"))
    with pytest.raises(ProjectError, match=r"model\.onnx \(model\.onnx\): does not load as an ONNX model"):
        _load(_variant(tmp_path / "b", model='onnx = "model.onnx"', payload=b"\x08\x07garbage", name="model.onnx"))


def test_program_of_the_wrong_arity_is_refused(tmp_path: Path) -> None:
    import io

    import torch

    class Two(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a[:, :N_CLASSES] + b[:, :N_CLASSES]

    buf = io.BytesIO()
    torch.export.save(torch.export.export(Two(), (torch.zeros(1, N_FEATURES), torch.zeros(1, N_FEATURES))), buf)
    with pytest.raises(ProjectError, match=r"model\.program \(model\.pt2\): takes 2 input\(s\) and returns 1 output"):
        _load(_variant(tmp_path, model='program = "model.pt2"', payload=buf.getvalue(), name="model.pt2"))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ('entry = "byo_model:build_model"\nweights = "missing.pt"', r"field 'model\.weights': file 'missing\.pt' does not exist"),
        ('onnx = "../model.onnx"', r"field 'model\.onnx' must be a file path relative to the project folder"),
        ('weights = "model.pt"', r"field 'model\.entry' must be the module:function"),
        ('program = "model.pt"\nentry = "byo_model:build_model"', r"field 'model\.entry' must be absent"),
        ('weights = "model.pt"\nonnx = "model.pt"\nentry = "byo_model:build_model"', r"at most one of weights, program or onnx"),
    ],
    ids=["missing-file", "outside", "weights-without-entry", "program-with-entry", "two-files"],
)
def test_project_file_errors_name_the_field(tmp_path: Path, model: str, expected: str) -> None:
    with pytest.raises(ProjectError, match=expected):
        _variant(tmp_path, model=model)


def test_train_table_with_a_trained_model_is_refused(tmp_path: Path) -> None:
    project = _copy_example(tmp_path / "p")
    with (project / "edgeops.toml").open("a") as fh:
        fh.write("\n[train]\nepochs = 3\nbatch_size = 8\nlearning_rate = 0.01\n")
    with pytest.raises(ProjectError, match=r"\[train\] is not used when model\.weights gives a trained model"):
        load_project(project)


def _npz(tmp_path: Path, **change: object) -> Project:
    project = _copy_example(tmp_path / "p")
    with np.load(EXAMPLE / "data.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(project / "data.npz", **arrays)  # type: ignore[arg-type]
    return load_project(project)


def test_bad_npz_names_the_array(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.npz data\.npz: array 'y_val' is missing"):
        load_dataset(_npz(tmp_path / "a", y_val=None))
    with pytest.raises(DataError, match=r"array 'label_names' cannot be read without pickle"):
        load_dataset(_npz(tmp_path / "b", label_names=np.array(["a", 1], dtype=object)))
    with pytest.raises(DataError, match=r"data\.npz data\.npz: x_test must have shape \[rows, 106\]"):
        load_dataset(_npz(tmp_path / "c", x_test=np.zeros((4, 3), dtype=np.float32)))
    with pytest.raises(DataError, match=r"unexpected array 'extra'"):
        load_dataset(_npz(tmp_path / "d", extra=np.zeros(3)))
    (tmp_path / "e").mkdir()
    bad = _copy_example(tmp_path / "e" / "p")
    (bad / "data.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz file"):
        load_dataset(load_project(bad))


def test_npz_with_nan_fails_the_existing_data_check(tmp_path: Path) -> None:
    with np.load(EXAMPLE / "data.npz", allow_pickle=False) as npz:
        x = npz["x_train"].copy()
    x[3, 7] = np.nan
    project = _npz(tmp_path, x_train=x)
    with pytest.raises(DataError, match=r"x_train has 1 NaN/inf value\(s\); first at row 3"):
        check_data(load_dataset(project), project.checks, project.preprocessing)


def test_onnx_with_an_odd_input_shape_is_refused(tmp_path: Path) -> None:
    import onnx

    proto = onnx.load_model_from_string(_onnx_from_weights(_state_dict()))
    proto.graph.input[0].type.tensor_type.shape.dim.add().dim_value = 1  # [batch, 106, 1]
    with pytest.raises(ProjectError, match=r"input 'x' has shape \[batch, 106, 1\], expected \[batch, 106\]"):
        _load(_variant(tmp_path, model='onnx = "model.onnx"', payload=proto.SerializeToString(), name="model.onnx"))


def test_program_with_a_static_batch_of_one_loads_and_runs_row_by_row(tmp_path: Path) -> None:
    import io

    import torch

    from edgeops_toolchain.train import TrainResult

    sys.path.insert(0, str(EXAMPLE))
    try:
        from byo_model import build_model
    finally:
        sys.path.remove(str(EXAMPLE))
    model = build_model(N_FEATURES, N_CLASSES)
    model.load_state_dict(_state_dict())
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model.eval(), (torch.zeros(1, N_FEATURES),)), buf)
    program = _load(_variant(tmp_path / "a", model='program = "model.pt2"', payload=buf.getvalue(), name="model.pt2"))
    weights = _load(_variant(tmp_path / "b"))
    assert isinstance(program, TrainResult) and isinstance(weights, TrainResult)
    assert program.rowwise and not weights.rowwise
    assert program.val_accuracy == weights.val_accuracy and program.parameters == weights.parameters == 9093


def _tiny_program() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.export.save(torch.export.export(torch.nn.Linear(N_FEATURES, N_CLASSES).eval(), (torch.zeros(1, N_FEATURES),)), buf)
    return buf.getvalue()


def _rewrite_archive(archive: bytes, change: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> bytes:
    """``archive`` with members (named after the root folder) replaced, dropped (``None``) or added."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            data = change[rel] if rel in change else zin.read(info.filename)
            if data is not None:
                zout.writestr(info.filename, data)
        for rel, data in (add or {}).items():
            with warnings.catch_warnings():  # zipfile warns on a duplicate name, which one case wants
                warnings.simplefilter("ignore")
                zout.writestr(f"{root}/{rel}", data)
    return out.getvalue()


class _Payload:
    """Writes ``marker`` when unpickled: the file must never be loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"(open({self.marker!r}, 'w').write('ran'), __import__('torch').zeros({N_CLASSES}))[1]",))


@pytest.mark.parametrize(
    "where", ["use-pickle-weight", "custom-object-constant", "sample-inputs", "aotinductor", "duplicate-member"]
)
def test_program_archive_that_would_unpickle_code_is_refused_unloaded(tmp_path: Path, where: str) -> None:
    import io

    import torch

    marker = tmp_path / "PWNED"
    evil = io.BytesIO()
    torch.save(_Payload(marker), evil)
    clean = _tiny_program()
    if where == "use-pickle-weight":  # the review's mk_evil_pt2.py: the bias becomes a pickled object
        import zipfile

        with zipfile.ZipFile(io.BytesIO(clean)) as z:
            name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
            config = json.loads(z.read(name))
        entry = config["config"]["bias"]
        entry["use_pickle"] = True
        archive = _rewrite_archive(
            clean,
            {
                "data/weights/model_weights_config.json": json.dumps(config).encode(),
                f"data/weights/{entry['path_name']}": evil.getvalue(),
            },
        )
        expected = r"entry 'bias' of 'data/weights/model_weights_config\.json' is a pickled or custom object"
    elif where == "custom-object-constant":
        config = {"config": {"obj": {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": None}}}
        archive = _rewrite_archive(
            clean,
            {"data/constants/model_constants_config.json": json.dumps(config).encode()},
            {"data/constants/custom_obj_0": evil.getvalue()},
        )
        expected = r"holds 'data/constants/custom_obj_0', which torch\.export\.load would unpickle"
    elif where == "sample-inputs":
        archive = _rewrite_archive(clean, {"data/sample_inputs/model.pt": evil.getvalue()})
        expected = (
            r"member 'data/sample_inputs/model\.pt' of the \.pt2 archive does not load with torch\.load\(weights_only=True\)"
        )
    elif where == "duplicate-member":  # zipfile would check the second config, torch read the first
        archive = _rewrite_archive(clean, {}, {"data/weights/model_weights_config.json": b"{}"})
        expected = r"is a \.pt2 archive with two members of the same name"
    else:
        archive = _rewrite_archive(clean, {}, {"data/aotinductor/model/model.so": b"\x7fELF"})
        expected = r"holds 'data/aotinductor/model/model\.so'"
    with pytest.raises(ProjectError, match=r"model\.program \(model\.pt2\): " + expected):
        _load(_variant(tmp_path, model='program = "model.pt2"', payload=archive, name="model.pt2"))
    assert not marker.exists()
    _load(_variant(tmp_path / "clean", model='program = "model.pt2"', payload=clean, name="model.pt2"))


def test_field_data_for_a_brought_model_is_refused(tmp_path: Path) -> None:
    project = _copy_example(tmp_path / "p")
    with pytest.raises(ProjectError, match=r"--field-data is not accepted when model\.weights gives a trained model: a brought"):
        load_project(project).with_field_data([tmp_path / "field.npz"])
    assert load_project(project).with_field_data([]).field_data == ()
    text = (project / "edgeops.toml").read_text().replace("[data]\n", '[data]\nfield = ["field.npz"]\n')
    (project / "edgeops.toml").write_text(text)
    with pytest.raises(
        ProjectError, match=r"field 'data\.field' is not accepted when model\.weights .* not retrained by edgeops"
    ):
        load_project(project)


def test_nan_logits_are_refused_naming_the_field(tmp_path: Path) -> None:
    import io

    import torch

    state = _state_dict()
    bias = next(k for k in reversed(list(state)) if k.endswith("bias"))
    state[bias] = torch.as_tensor(state[bias]).clone()
    state[bias][0] = float("nan")  # type: ignore[index]
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(ProjectError, match=r"model\.weights \(model\.pt\): returns 2 NaN/inf logit\(s\) for a \[2, 106\] input"):
        _load(_variant(tmp_path / "a", payload=buf.getvalue()))
    nan = np.zeros(N_CLASSES, dtype=np.float32)
    nan[0] = np.nan
    onnx_nan = _tiny_onnx([("Add", ["t", "n"], "y")], {"n": nan})
    with pytest.raises(
        ProjectError, match=r"model\.onnx \(model\.onnx\): returns \d+ NaN/inf logit\(s\) for the validation rows"
    ):
        _load(_variant(tmp_path / "b", model='onnx = "model.onnx"', payload=onnx_nan, name="model.onnx"))


def _tiny_onnx(
    after: list[tuple[str, list[str], str]],
    inits: dict[str, np.ndarray],
    *,
    opset: int = 17,
    domain: str = "",
) -> bytes:
    """``x[batch, 106] @ W -> t``, then the nodes ``after`` (op, inputs, output; the last writes ``y``)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = {"W": np.ones((N_FEATURES, N_CLASSES), dtype=np.float32), **inits}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"])]
    nodes += [
        helper.make_node(op, ins, [out], domain=domain if op == "FusedMatMul" else "", **({"axis": 0} if op == "Concat" else {}))
        for op, ins, out in after
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N_CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("after", "opset", "domain", "expected"),
    [
        ([("Identity", ["t"], "y")], 9, "", r"uses default-domain opset 9, edgeops needs opset 13 or later"),
        ([("FusedMatMul", ["t", "I"], "y")], 17, "com.microsoft", r"uses operator 'FusedMatMul' of domain 'com\.microsoft'"),
        (
            [
                ("Shape", ["t"], "s"),
                ("Slice", ["s", "one", "two"], "s1"),
                ("Slice", ["s", "zero", "one"], "s0"),
                ("Concat", ["s1", "s0"], "s2"),
                ("Reshape", ["t", "s2"], "y"),
            ],
            17,
            "",
            r"returns \[5, 1\] for one row, whatever its graph declares; expected \[1, n_classes\]",
        ),
    ],
    ids=["opset-9", "contrib-op", "declared-batch-5-returns-5x1"],
)
def test_onnx_the_quantizer_cannot_take_is_refused_early(
    tmp_path: Path, after: list[tuple[str, list[str], str]], opset: int, domain: str, expected: str
) -> None:
    from edgeops_toolchain.pretrained import normalize_onnx

    inits = {"I": np.eye(N_CLASSES, dtype=np.float32)}
    inits |= {k: np.array([v], dtype=np.int64) for k, v in (("zero", 0), ("one", 1), ("two", 2))}
    payload = _tiny_onnx(after, inits, opset=opset, domain=domain)
    project = _variant(tmp_path, model='onnx = "model.onnx"', payload=payload, name="model.onnx")
    with pytest.raises(ProjectError, match=r"model\.onnx \(model\.onnx\): " + expected):
        normalize_onnx(project, payload, N_FEATURES, N_CLASSES)


def test_symlink_out_of_the_project_and_an_oversized_model_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeops_toolchain import project as project_module

    outside = tmp_path / "outside.pt"
    shutil.copy(EXAMPLE / "model.pt", outside)
    linked = _copy_example(tmp_path / "a")
    (linked / "model.pt").unlink()
    (linked / "model.pt").symlink_to(outside)
    with pytest.raises(
        ProjectError, match=r"field 'model\.weights': file 'model\.pt' is a symbolic link to .*outside the project"
    ):
        load_project(linked)
    inside = _copy_example(tmp_path / "b")
    (inside / "model.pt").rename(inside / "real.pt")
    (inside / "model.pt").symlink_to("real.pt")
    assert load_project(inside).model_file == inside.resolve() / "model.pt"
    monkeypatch.setattr(project_module, "MODEL_FILE_MAX_BYTES", 1000)
    with pytest.raises(ProjectError, match=r"field 'model\.weights': file 'model\.pt' is \d+ bytes, more than the 1000 bytes"):
        load_project(inside)
