"""N-dimensional inputs in the host toolchain: ``[rows, *sample_shape]`` data, per-channel
statistics pooled over the sample's positions, export in the data's own layout, brought
models of N-d shape, and the digits example as ``[1, 8, 8]`` images built into a bundle."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import REPO, run_edgeops
from edgeops_core import (
    UNLABELLED,
    FieldDataset,
    Preprocessing,
    Provenance,
    apply_preprocessing,
    load_public_key,
    read_members,
    verify_bundle,
)
from edgeops_toolchain.data import Dataset, channel_values, check_data, feature_reference, load_dataset
from edgeops_toolchain.errors import DataError, ProjectError
from edgeops_toolchain.project import Checks, Project, load_project

DIGITS = REPO / "examples" / "digits"
LOOSE = Checks(max_duplicate_fraction=0.0, min_class_fraction=0.0, max_abs_value=1e6)

# A data entry point of two-channel 4x6 samples; ``case`` breaks one thing.
ND_DATA = """
import numpy as np


def load(case="ok"):
    rng = np.random.default_rng(0)

    def images(n, shape=(2, 4, 6)):
        return rng.normal(size=(n, *shape)).astype(np.float32)

    out = {
        "x_train": images(40), "y_train": np.arange(40) % 2,
        "x_val": images(10), "y_val": np.arange(10) % 2,
        "x_test": images(10), "y_test": np.arange(10) % 2,
        "feature_names": ["red", "green"], "label_names": ["a", "b"],
    }
    if case == "val-shape":
        out["x_val"] = images(10, (2, 4, 5))
    elif case == "test-flat":
        out["x_test"] = images(10, (2,))
    elif case == "channels":
        out["feature_names"] = ["grey"]
    elif case == "rank":
        for split in ("train", "val", "test"):
            out[f"x_{split}"] = images(len(out[f"y_{split}"]), (2, 2, 2, 2, 2))
    elif case == "empty-axis":
        for split in ("train", "val", "test"):
            out[f"x_{split}"] = images(len(out[f"y_{split}"]), (2, 0, 6))
    return out
"""


def _project(dest: Path, *, data: str | None = None, model: str | None = None, epochs: int | None = None) -> Path:
    """A copy of examples/digits; ``data``/``model`` replace its ``[data]``/``[model]`` table bodies."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in DIGITS.glob("*.py"):
        shutil.copy2(path, dest / path.name)
    (dest / "nd_data.py").write_text(ND_DATA)
    text = (DIGITS / "edgeops.toml").read_text()
    if data is not None:
        text = re.sub(r"\[data\]\n(.*\n)*?\n", f"[data]\n{data}\n\n", text, count=1)
    if model is not None:
        text = re.sub(r"\[model\]\n(.*\n)*?\n", f"[model]\n{model}\n\n", text, count=1)
        text = re.sub(r"\[train\]\n(.*\n)*?\n", "", text, count=1)  # a brought model is not trained
    if epochs is not None:
        text = text.replace("epochs = 40", f"epochs = {epochs}")
    (dest / "edgeops.toml").write_text(text)
    return dest


def _nd_project(tmp_path: Path, case: str) -> Project:
    return load_project(_project(tmp_path / case, data=f'entry = "nd_data:load"\nparams = {{ case = "{case}" }}'))


# -- data: shapes -------------------------------------------------------------------------------


def test_nd_data_loads_with_its_sample_shape(tmp_path: Path) -> None:
    ds = load_dataset(_nd_project(tmp_path, "ok"))
    assert ds.x_train.shape == (40, 2, 4, 6) and ds.x_train.dtype == np.float32
    assert ds.sample_shape == (2, 4, 6) and ds.sample_ndim == 3 and ds.feature_names == ("red", "green")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("val-shape", r"dataset: x_val must have shape \[rows, 2, 4, 6\] \(x_train's sample shape\), got \[10, 2, 4, 5\]"),
        ("test-flat", r"dataset: x_test must have shape \[rows, 2, 4, 6\] \(x_train's sample shape\), got \[10, 2\]"),
        ("channels", r"dataset: x_train must have shape \[rows, 1\] .* or \[rows, 1, \.\.\.\] .*one channel per feature name"),
        ("rank", r"dataset: x_train must have shape .*at most 4 axes.*got \[40, 2, 2, 2, 2, 2\]"),
        ("empty-axis", r"dataset: x_train must have shape .*got \[40, 2, 0, 6\]"),
    ],
)
def test_nd_shape_errors_name_the_split_and_the_expected_shape(tmp_path: Path, case: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_dataset(_nd_project(tmp_path, case))


def test_field_data_is_refused_for_nd_samples(tmp_path: Path) -> None:
    provenance = Provenance(
        devices=("dev-1",),
        first_ts="2026-03-01T10:00:00Z",
        last_ts="2026-03-01T10:00:00Z",
        releases=(1,),
        group={},
        uploads=1,
        created="2026-03-01T10:00:00Z",
    )
    field = FieldDataset(
        feature_names=("red", "green"),
        label_names=("a", "b"),
        x=np.zeros((2, 2), dtype=np.float32),
        y=np.array([0, UNLABELLED]),
        device_index=np.zeros(2, dtype=np.int32),
        provenance=provenance,
    )
    with pytest.raises(DataError, match=r"field data \(f\.npz\) holds flat feature vectors.*shape \[2, 4, 6\].*flat"):
        load_dataset(_nd_project(tmp_path, "ok"), field_data=((Path("f.npz"), field),))


# -- data: values, per-channel statistics ----------------------------------------------------------


def _dataset(x_train: np.ndarray, names: tuple[str, ...] = ("red", "green")) -> Dataset:
    rows = x_train.shape[0]
    other = x_train[:2] + 100.0  # no test row repeats a training row
    y = np.arange(rows) % 2
    return Dataset(
        x_train=x_train,
        y_train=y,
        x_val=other,
        y_val=y[:2],
        x_test=other.copy(),
        y_test=y[:2],
        feature_names=names,
        label_names=("a", "b"),
    )


#: Three rows of two channels of two positions: channel 0 holds 1..6, channel 1 holds 0..50 by tens.
HAND = np.array([[[1, 2], [0, 10]], [[3, 4], [20, 30]], [[5, 6], [40, 50]]], dtype=np.float32)


def test_per_channel_statistics_pool_every_position_by_hand() -> None:
    report = check_data(_dataset(HAND), LOOSE, "standardize")
    pre = report.preprocessing
    # Channel 0: mean 3.5, variance 17.5 / 6; channel 1: mean 25, variance 1750 / 6.
    assert pre.mean == (3.5, 25.0)
    assert pre.std == pytest.approx((np.sqrt(17.5 / 6), np.sqrt(1750 / 6)), rel=1e-6)
    red, green = report.features
    assert (red.name, red.mean, red.min, red.max) == ("red", 3.5, 1.0, 6.0)
    # Deciles of 1..6 (linear interpolation): 1.5, 2.0, ... 5.5; the device bins searchsorted-right.
    assert red.bin_edges == (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5)
    sixth = round(1 / 6, 6)
    assert red.bin_fractions == (sixth, 0.0, sixth, 0.0, sixth, 0.0, sixth, 0.0, sixth, sixth)
    assert green.bin_edges == (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0)
    # The pooled layout the contract names, and the standardization the device applies.
    assert np.array_equal(channel_values(HAND), HAND.reshape(3, 2, -1).transpose(0, 2, 1).reshape(-1, 2))
    x = apply_preprocessing(pre, HAND, sample_ndim=2)
    assert np.allclose(x[:, 0], (HAND[:, 0] - 3.5) / np.sqrt(17.5 / 6)) and np.allclose(x[:, 1], (HAND[:, 1] - 25) / 17.078251)


def test_a_sample_of_one_position_profiles_like_the_flat_vector() -> None:
    rng = np.random.default_rng(1)
    flat = rng.normal(size=(50, 3)).astype(np.float32)
    names = ("a", "b", "c")
    a = check_data(_dataset(flat, names), LOOSE, "standardize")
    b = check_data(_dataset(flat.reshape(50, 3, 1), names), LOOSE, "standardize")
    assert a.preprocessing == b.preprocessing and a.features == b.features == feature_reference(flat, names)


def test_constant_channel_keeps_std_one() -> None:
    x = HAND.copy()
    x[:, 1] = 7.0
    report = check_data(_dataset(x), LOOSE, "standardize")
    assert report.constant_features == ("green",) and report.preprocessing.std[1] == 1.0


def test_nd_value_errors_name_the_channel_and_the_position() -> None:
    x = np.zeros((4, 2, 3, 3), dtype=np.float32)
    x[:, 0] += np.arange(4, dtype=np.float32)[:, None, None]  # rows differ: no duplicate
    ds = _dataset(x)
    ds.x_val[1, 1, 2, 0] = np.nan
    with pytest.raises(DataError, match=r"x_val has 1 NaN/inf value\(s\); first at row 1, channel 'green' at position \[2, 0\]"):
        check_data(ds, LOOSE, "none")
    ds = _dataset(x)
    ds.x_test[0, 0, 1, 2] = 5e7
    with pytest.raises(DataError, match=r"x_test\[0\] channel 'red' at position \[1, 2\] = 5e\+07 exceeds"):
        check_data(ds, LOOSE, "none")


def test_nd_duplicates_compare_whole_samples() -> None:
    x = np.random.default_rng(2).normal(size=(6, 1, 2, 2)).astype(np.float32)
    ds = _dataset(x, ("grey",))
    test = ds.x_test.copy()
    test[1] = x[4]
    with pytest.raises(DataError, match=r"1 of 2 test rows \(50\.0%\) also appear in train"):
        check_data(replace(ds, x_test=test), LOOSE, "none")
    test[1, 0, 1, 1] += 1.0  # one value differs: not a duplicate
    check_data(replace(ds, x_test=test), LOOSE, "none")


# -- export in the data's layout, brought N-d models ------------------------------------------


def _conv(channels: int = 2) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 6, 3)).eval()


def test_tflite_export_keeps_the_nchw_input_of_the_data() -> None:
    """litert-torch runs convolutions NHWC; the model's input must still be the data's [1, C, H, W]."""
    import torch
    from ai_edge_litert.interpreter import Interpreter

    from edgeops_toolchain.tflite_export import export_tflite

    model = _conv()
    data = export_tflite(model, (2, 4, 6), 3)
    it = Interpreter(model_content=data)
    it.allocate_tensors()
    detail = it.get_input_details()[0]
    assert list(detail["shape"]) == [1, 2, 4, 6]
    x = np.random.default_rng(3).normal(size=(1, 2, 4, 6)).astype(np.float32)
    it.set_tensor(detail["index"], x)
    it.invoke()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.allclose(it.get_tensor(it.get_output_details()[0]["index"]), want, atol=1e-5)


def _brought(tmp_path: Path, kind: str, payload: bytes) -> Project:
    name = {"weights": "model.pt", "onnx": "model.onnx"}[kind]
    line = 'entry = "digits_model:build_model"\nweights = "model.pt"' if kind == "weights" else 'onnx = "model.onnx"'
    root = _project(tmp_path / kind, model=line)
    (root / name).write_bytes(payload)
    return load_project(root)


def test_brought_state_dict_and_onnx_take_nd_samples(tmp_path: Path) -> None:
    import onnx as onnx_lib
    import torch

    from edgeops_toolchain.pretrained import load_pretrained

    sys.path.insert(0, str(DIGITS))
    try:
        from digits_model import build_model
    finally:
        sys.path.remove(str(DIGITS))
    torch.manual_seed(0)
    model = build_model((1, 8, 8), 10).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    project = _brought(tmp_path, "weights", buf.getvalue())
    ds = load_dataset(project)  # the digits images, [rows, 1, 8, 8]: the same for every project below
    result = load_pretrained(project, buf.getvalue(), ds, Preprocessing("none"))
    assert result.parameters == sum(p.numel() for p in model.parameters())

    onnx = _onnx((1, 8, 8), 10)
    project = _brought(tmp_path, "onnx", onnx)
    normalized = load_pretrained(project, onnx, ds, Preprocessing("none")).onnx
    assert normalized is not None
    graph_input = onnx_lib.load_model_from_string(normalized).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 1, 8, 8]  # batch fixed at 1
    flat = _onnx((64,), 10)
    project = _brought(tmp_path / "flat", "onnx", flat)
    with pytest.raises(ProjectError, match=r"input 'x' has shape \[batch, 64\], expected \[batch, 1, 8, 8\] \(sample_shape"):
        load_pretrained(project, flat, ds, Preprocessing("none"))


def _onnx(sample_shape: tuple[int, ...], n_classes: int) -> bytes:
    """A Flatten + MatMul ONNX model taking ``[batch, *sample_shape]`` (batch symbolic)."""
    from onnx import TensorProto, helper, numpy_helper

    n = int(np.prod(sample_shape))
    weights = numpy_helper.from_array(np.linspace(-1, 1, n * n_classes, dtype=np.float32).reshape(n, n_classes), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *sample_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_classes])],
        [weights],
    )
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())


# -- the digits example as [1, 8, 8] images, built for ecu --------------------------------------


@dataclass(frozen=True)
class DigitsBuild:
    home: Path
    bundle: Path


@pytest.fixture(scope="module")
def digits_ecu(tmp_path_factory: pytest.TempPathFactory) -> DigitsBuild:
    """examples/digits with 2 epochs, built for ecu against budgets that admit a barely trained model."""
    from edgeops_toolchain.resources import builtin_targets_dir

    project = _project(tmp_path_factory.mktemp("digits"), epochs=2)
    targets = tmp_path_factory.mktemp("targets")
    profile = (builtin_targets_dir() / "ecu.toml").read_text()
    profile = re.sub(r"(?m)^min_accuracy = .*$", "min_accuracy = 0.0", profile)
    profile = re.sub(r"(?m)^max_accuracy_drop_points = .*$", "max_accuracy_drop_points = 100.0", profile)
    (targets / "ecu.toml").write_text(profile)
    home = tmp_path_factory.mktemp("home")
    env = {"EDGEOPS_HOME": str(home)}
    proc = run_edgeops("build", "-t", "ecu", "-p", project, "-o", home / "dist", "--targets-dir", targets, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return DigitsBuild(home=home, bundle=Path(json.loads(proc.stdout)["bundle"]))


def test_digits_images_build_into_a_bundle_that_verifies(digits_ecu: DigitsBuild) -> None:
    import onnxruntime as ort

    from edgeops_toolchain.validate import Evaluator

    key = digits_ecu.home / "keys" / "dev-signing.pub.pem"
    proc = run_edgeops("verify", digits_ecu.bundle, "-k", key, env={"EDGEOPS_HOME": str(digits_ecu.home)})
    assert proc.returncode == 0 and proc.stdout.startswith("OK "), proc.stdout + proc.stderr
    m = verify_bundle(digits_ecu.bundle, [load_public_key(key)]).manifest
    assert m.inputs[0].shape == (1, 1, 8, 8) and m.sample_shape == (1, 8, 8) and m.feature_names == ("intensity",)
    assert [f.name for f in m.drift_reference.features] == ["intensity"]
    assert m.drift_reference.features[0].min == 0.0 and m.drift_reference.features[0].max == 16.0
    model = read_members(digits_ecu.bundle.read_bytes())["model.onnx"]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 8, 8]
    # Self-test inputs are the raw images flattened row-major; fed back as [1, 1, 8, 8] they give `expected`.
    runner = Evaluator(m.runtime, model, 1, spec=(m.inputs[0], m.outputs[0]))
    for v in m.self_test.vectors:
        assert len(v.input) == 64
        x = apply_preprocessing(m.preprocessing, np.float32(v.input).reshape(1, 1, 8, 8), sample_ndim=3)
        out = runner.predict(x)[0]
        assert np.abs(out - np.float32(v.expected)).max() <= m.self_test.atol and int(out.argmax()) == v.label


def test_digits_images_served_over_the_agent_socket_equal_the_runtime(digits_ecu: DigitsBuild, tmp_path: Path) -> None:
    """The must-show: an N-d model served by the agent over its socket answers exactly what the runtime does."""
    import socket

    import onnxruntime as ort
    from sklearn.datasets import load_digits

    from edgeops_agent.agent import Agent
    from edgeops_agent.install import install_bundle
    from edgeops_agent.server import EndpointServer, recv_frame, send_frame, send_tensor_frame
    from edgeops_agent.store import DataDir

    key = digits_ecu.home / "keys" / "dev-signing.pub.pem"
    device = DataDir(tmp_path / "device")
    device.add_trusted_key(key)
    install_bundle(device, digits_ecu.bundle, target="ecu")
    agent = Agent(device)
    assert agent.model is not None
    m = agent.model.manifest
    assert m.sample_shape == (1, 8, 8)
    model = read_members(digits_ecu.bundle.read_bytes())["model.onnx"]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    images = load_digits().images[:12].astype(np.float32).reshape(12, 1, 8, 8)
    x = apply_preprocessing(m.preprocessing, images, sample_ndim=3)
    expect = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(12)])

    server = EndpointServer(tmp_path / "agent.sock", agent)
    server.start()
    try:

        def ask(send: Any) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(server.path))
                send(sock)
                reply = recv_frame(sock)
            assert reply is not None
            return dict(json.loads(reply))

        for i in range(12):
            # JSON nested lists, [1, 8, 8] and [1, 1, 8, 8]; the binary form for the same image.
            for features in (images[i].tolist(), images[i][None].tolist()):
                reply = ask(lambda sock, f=features: send_frame(sock, {"op": "predict", "features": f}))
                assert reply["ok"] and reply["task"] == "classification" and reply["logits"] == expect[i].tolist()
            reply = ask(lambda sock, i=i: send_tensor_frame(sock, {"op": "predict", "id": i}, images[i]))
            assert reply["ok"] and reply["id"] == i and reply["logits"] == expect[i].tolist()
            assert reply["label"] == m.labels[int(np.argmax(expect[i]))]
        reply = ask(lambda sock: send_tensor_frame(sock, {"op": "predict_batch"}, images))
        assert [p["logits"] for p in reply["predictions"]] == expect.tolist()
        # An image of the wrong shape is refused, naming the shape the model takes.
        reply = ask(lambda sock: send_frame(sock, {"op": "predict", "features": images[0].reshape(-1).tolist()}))
        assert not reply["ok"] and "[1, 8, 8]" in reply["error"]["message"], reply
    finally:
        server.stop()
