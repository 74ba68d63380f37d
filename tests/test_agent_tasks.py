"""The agent with N-d inputs and the regression and anomaly tasks (issue 12, the device's side).

The bundles are made here, not by the toolchain's build: tiny ONNX models written with
``onnx.helper`` (an N-d ``[1, 2, 4, 4]`` classifier, the same with int8 input, a flat
regression with two outputs, an N-d anomaly scorer), a hand-made :class:`Manifest` with the
drift reference computed as the contract says (channels pooled over positions) and self-test
vectors from onnxruntime, signed with the toolchain's signing helper. Every answer is
checked against onnxruntime's own on the same preprocessed (and quantized) tensor, exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import struct
import threading
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from broker import Broker
from conftest import REPO
from edgeops_agent.agent import DRIFT_BATCH, Agent
from edgeops_agent.config import AgentConfig, load_config
from edgeops_agent.daemon import Daemon
from edgeops_agent.drift import DriftConfig, DriftDetector
from edgeops_agent.errors import (
    AgentError,
    ConfigError,
    FeedbackError,
    ModelLoadError,
    SelfTestError,
    TensorInputError,
)
from edgeops_agent.install import install_bundle
from edgeops_agent.model import LoadedModel
from edgeops_agent.mqtt import MqttSettings
from edgeops_agent.runtime import ModelRunner, quantize
from edgeops_agent.server import MAX_FRAME, EndpointServer, recv_frame, send_frame, send_tensor_frame, tensor_payload
from edgeops_agent.store import DataDir
from edgeops_core import (
    DriftReference,
    Event,
    FeatureReference,
    Lineage,
    Manifest,
    Preprocessing,
    QuantParams,
    SelfTest,
    SelfTestVector,
    Task,
    Telemetry,
    TensorSpec,
    apply_preprocessing,
    pack_bundle,
)
from edgeops_toolchain.signing import generate_keypair, sign_members

ASYNCAPI = json.loads((REPO / "docs" / "asyncapi.json").read_text())
SHAPE = (2, 4, 4)  # the N-d models' sample: 2 channels of 4 x 4
MEAN, STD = (0.5, -1.0), (2.0, 0.5)
DECILES = np.linspace(0.1, 0.9, 9)


def _validate(kind: str, payload: dict[str, Any]) -> None:
    jsonschema.validate(payload, {**ASYNCAPI["components"]["schemas"][kind], "components": ASYNCAPI["components"]})


# -- bundles made by hand --------------------------------------------------------------------


def _onnx(
    kind: str, sample: tuple[int, ...], n_out: int, *, int8_input: bool = False, seed: int = 0, dims: list[Any] | None = None
) -> bytes:
    """A tiny static-shape ONNX model: Flatten -> Gemm (classification, regression) or the mean
    squared value of the sample (anomaly); an int8 input is cast to float first. ``dims``: the
    input's declared dimensions instead of ``[1, *sample]`` (a symbolic batch axis, say)."""
    rng = np.random.default_rng(seed)
    n = math.prod(sample)
    nodes, inits = [], []
    src = "x"
    if int8_input:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        src = "xf"
    nodes.append(helper.make_node("Flatten", [src], ["flat"], axis=1))
    if kind == "anomaly":
        nodes += [
            helper.make_node("Mul", ["flat", "flat"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["y"], axes=[1], keepdims=1),
        ]
    else:
        w = rng.normal(size=(n, n_out)).astype(np.float32)
        b = rng.normal(size=n_out).astype(np.float32)
        inits = [
            helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, b.shape, b),
        ]
        nodes.append(helper.make_node("Gemm", ["flat", "w", "b"], ["y"]))
    graph = helper.make_graph(
        nodes,
        f"tiny-{kind}",
        [helper.make_tensor_value_info("x", TensorProto.INT8 if int8_input else TensorProto.FLOAT, dims or [1, *sample])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _reference(name: str, values: np.ndarray) -> FeatureReference:
    edges = np.quantile(values, DECILES)
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    fractions = np.round(counts / counts.sum(), 6)
    fractions[-1] = round(1.0 - float(fractions[:-1].sum()), 6)
    return FeatureReference(
        name, float(values.mean()), float(values.std()), float(values.min()), float(values.max()),
        tuple(float(e) for e in edges), tuple(float(f) for f in fractions),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Made:
    """A bundle made here: its file, its manifest, its model, a session on it, raw reference rows."""

    path: Path
    manifest: Manifest
    model: bytes
    session: ort.InferenceSession
    rows: np.ndarray  # raw samples [n, *sample_shape] like the reference's


def _tensor(m: Manifest, raw: np.ndarray) -> np.ndarray:
    """What the host computes for raw samples ``[n, *sample]``: apply_preprocessing, then quantize for int8 input."""
    pre = apply_preprocessing(m.preprocessing, raw, len(m.sample_shape))
    spec = m.inputs[0]
    if spec.dtype == "int8" and spec.quantization is not None:
        return quantize(pre, spec.quantization, "int8")
    return pre


def _ort(made: Made, raw: np.ndarray) -> np.ndarray:
    """onnxruntime's own outputs ``[n, outputs]`` for raw samples, one call per sample."""
    t = _tensor(made.manifest, raw)
    return np.concatenate([made.session.run(None, {"x": t[i : i + 1]})[0] for i in range(len(t))])


def _make(
    tmp: Path,
    key: Path,
    kind: str,
    *,
    sample: tuple[int, ...] = SHAPE,
    int8_input: bool = False,
    labels: tuple[str, ...] = ("a", "b", "c"),
    tamper_expected: float = 0.0,
) -> Made:
    """A signed bundle of a tiny ``kind`` model, with a drift reference and self-test vectors made as the build makes them."""
    channels = sample[0]
    mean, std = (MEAN, STD) if len(sample) > 1 else (tuple(float(c) for c in range(channels)), (1.0,) * channels)
    pre = Preprocessing("standardize", mean, std)
    q = QuantParams(scale=0.05, zero_point=-3) if int8_input else None
    model = _onnx(kind, sample, len(labels), int8_input=int8_input)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    bcast = (channels,) + (1,) * (len(sample) - 1)
    rows = (rng.normal(size=(400, *sample)) * np.reshape(std, bcast) + np.reshape(mean, bcast)).astype(np.float32)
    tensors = apply_preprocessing(pre, rows, len(sample))
    if q is not None:
        tensors = quantize(tensors, q, "int8")
    outs = np.concatenate([session.run(None, {"x": t[None]})[0] for t in tensors])
    # Channels pooled over every position (the contract's drift reference for N-d inputs).
    pooled = rows.reshape(len(rows), channels, -1).transpose(0, 2, 1).reshape(-1, channels)
    names = tuple(f"ch{c}" for c in range(channels))
    features = tuple(_reference(names[c], pooled[:, c]) for c in range(channels))
    if kind == "classification":
        fractions = np.bincount(outs.argmax(axis=1), minlength=len(labels)) / len(outs)
        drift = DriftReference(len(rows), features, tuple(float(f) for f in fractions))
        task = Task()
    else:
        drift = DriftReference(len(rows), features, (), tuple(_reference(labels[k], outs[:, k]) for k in range(len(labels))))
        task = Task(kind) if kind == "regression" else Task(kind, threshold=float(np.quantile(outs[:, 0], 0.99)), target_fpr=0.01)
    vectors = []
    for i in range(6):
        expected = [float(v) for v in outs[i]]
        label = int(np.argmax(outs[i])) if kind == "classification" else 0
        if kind == "anomaly":
            label = int(expected[0] > (task.threshold or 0.0))
        expected[0] += tamper_expected
        vectors.append(SelfTestVector(tuple(float(v) for v in rows[i].ravel()), tuple(expected), label))
    manifest = Manifest(
        name=f"tiny-{kind}", version="1.0.0", release=1, target="ecu", runtime="onnxruntime", model_file="model.onnx",
        precision="int8" if int8_input else "fp32",
        inputs=(TensorSpec("x", "int8" if int8_input else "float32", (1, *sample), q),),
        outputs=(TensorSpec("y", "float32", (1, len(labels))),),
        feature_names=names, labels=labels, preprocessing=pre, drift_reference=drift,
        self_test=SelfTest(atol=1e-4, vectors=tuple(vectors)), metrics={},
        lineage=Lineage("sha256:" + "0" * 64, "sha256:" + "1" * 64, {}, "test", None),
        created="2026-01-01T00:00:00Z", expires="2099-01-01T00:00:00Z", task=task,
    )  # fmt: skip
    body = {"manifest.json": manifest.to_json(), "model.onnx": model}
    path = tmp / f"tiny-{kind}{'-int8' if int8_input else ''}{'-off' if tamper_expected else ''}.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, key, subject=manifest.name)}))
    return Made(path, manifest, model, session, rows)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pair = generate_keypair(tmp_path_factory.mktemp("task-keys"))
    return pair.private, pair.public


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> dict[str, Made]:
    tmp = tmp_path_factory.mktemp("task-bundles")
    return {
        "classification": _make(tmp, keys[0], "classification"),
        "int8": _make(tmp, keys[0], "classification", int8_input=True),
        "regression": _make(tmp, keys[0], "regression", sample=(4,), labels=("temp_c", "rul_h")),
        "anomaly": _make(tmp, keys[0], "anomaly", labels=("anomaly_score",)),
    }


def _device(tmp: Path, made: Made, public: Path, name: str = "device") -> DataDir:
    data = DataDir(tmp / name)
    data.add_trusted_key(public)
    install_bundle(data, made.path, target="ecu")
    return data


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    """Start an endpoint for an agent: ``server(agent) -> socket path``."""
    started: list[EndpointServer] = []

    def start(agent: Agent, **kw: Any) -> Path:
        s = EndpointServer(tmp_path / f"agent{len(started)}.sock", agent, **kw)
        s.start()
        started.append(s)
        return s.path

    yield start
    for s in started:
        s.stop()


def _ask(path: Path, request: dict[str, Any] | None = None, *, binary: tuple[dict[str, Any], Any] | None = None) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        if binary is not None:
            send_tensor_frame(sock, *binary)
        else:
            send_frame(sock, request)
        reply = recv_frame(sock)
    assert reply is not None
    return json.loads(reply)


# -- N-d inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["classification", "int8"])
def test_nd_predictions_equal_onnxruntime_exactly_in_every_form(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, server: Any, which: str
) -> None:
    b = made[which]
    agent = Agent(_device(tmp_path, b, keys[1]))
    assert agent.model is not None and agent.model.sample_shape == SHAPE
    raw = b.rows[:40]
    expect = _ort(b, raw)
    # The device's tensors are the host's: apply_preprocessing (per channel), then quantize for int8 input.
    _, tensors = agent.model.prepare_batch(raw)
    host = _tensor(b.manifest, raw)
    assert tensors.dtype == host.dtype and np.array_equal(tensors.reshape(host.shape), host)
    for i in range(0, 40, 7):
        x = raw[i]
        for form in (x, x[None], x.tolist(), x[None].tolist(), x.astype(np.float64)):
            p = agent.predict(form)
            assert p.task == "classification" and p.logits == expect[i].tolist(), form.__class__
            assert p.class_index == int(np.argmax(expect[i])) and p.label == b.manifest.labels[p.class_index]
        _, tensor = agent.model.prepare(x)
        assert np.array_equal(tensor, host[i : i + 1])
    batch = agent.predict_batch(raw)
    assert [p.logits for p in batch] == expect.tolist()
    # The reference runner (core's apply_preprocessing + quantize) agrees too.
    runner = ModelRunner.from_manifest(b.manifest, b.model)
    assert runner.predict(raw[3]).tolist() == expect[3].tolist()

    path = server(agent)
    reply = _ask(path, {"op": "predict", "features": raw[5].tolist(), "id": 9})
    assert reply["ok"] and reply["id"] == 9 and reply["task"] == "classification" and reply["logits"] == expect[5].tolist()
    reply = _ask(path, binary=({"op": "predict", "id": "b1"}, raw[6][None]))
    assert reply["ok"] and reply["id"] == "b1" and reply["logits"] == expect[6].tolist()
    reply = _ask(path, binary=({"op": "predict"}, raw[7]))
    assert reply["logits"] == expect[7].tolist()
    reply = _ask(path, binary=({"op": "predict_batch", "id": 3}, raw[:16]))
    assert [p["logits"] for p in reply["predictions"]] == expect[:16].tolist()
    reply = _ask(path, {"op": "predict_batch", "rows": raw[:5].tolist()})
    assert [p["logits"] for p in reply["predictions"]] == expect[:5].tolist()


def test_wrong_shapes_are_refused_naming_the_shape(made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path) -> None:
    agent = Agent(_device(tmp_path, made["classification"], keys[1]))
    x = made["classification"].rows[0]
    cases = [
        (x.ravel(), r"input must have shape \[2, 4, 4\] or \[1, 2, 4, 4\], got \[32\]"),
        (x.reshape(1, 32), r"got \[1, 32\]"),
        (x.reshape(4, 2, 4), r"got \[4, 2, 4\]"),
        (np.stack([x, x]), r"got \[2, 2, 4, 4\]"),
        ([[1.0, 2.0], [3.0]], r"input must be a numeric array of shape \[2, 4, 4\] or \[1, 2, 4, 4\]"),
        (np.full(SHAPE, "a"), "must be numeric"),
    ]
    for bad, message in cases:
        with pytest.raises(TensorInputError, match=message):
            agent.predict(bad)
    nan = x.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(TensorInputError, match=r"input value at \[1, 2, 3\] is nan"):
        agent.predict(nan)
    with pytest.raises(TensorInputError, match=r"rows must have shape \[n, 2, 4, 4\] with n >= 1, got shape \[3, 32\]"):
        agent.predict_batch(np.zeros((3, 32), dtype=np.float32))
    rows = np.stack([x, nan])
    with pytest.raises(TensorInputError, match=r"row 1: input value at \[1, 2, 3\] is nan"):
        agent.predict_batch(rows)
    assert agent.telemetry(1.0)["inference"]["errors"] == {"TensorInputError": len(cases) + 3}
    assert agent.predict(x).task == "classification"  # still serving


def test_bad_binary_frames_get_typed_replies_and_never_hang(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, server: Any
) -> None:
    agent = Agent(_device(tmp_path, made["classification"], keys[1]))
    path = server(agent, idle_timeout_s=1.0)
    x = made["classification"].rows[0]
    good = tensor_payload({"op": "predict", "id": 1}, x[None])
    head_len = struct.unpack(">I", good[1:5])[0]

    def header(h: dict[str, Any], data: bytes) -> bytes:
        head = json.dumps(h).encode()
        return b"\x00" + struct.pack(">I", len(head)) + head + data

    f4 = x.astype("<f4").tobytes()
    bad = {
        "short data": (good[:-4], "TensorInputError", "needs 128 bytes of tensor data, got 124"),
        "long data": (good + b"\0\0\0\0", "TensorInputError", "got 132"),
        "big-endian": (header({"op": "predict", "dtype": ">f4", "shape": [1, 2, 4, 4]}, f4), "TensorInputError", "'<f4'"),
        "float64": (header({"op": "predict", "dtype": "<f8", "shape": [1, 2, 4, 4]}, f4), "TensorInputError", "float32"),
        "huge shape": (header({"op": "predict", "dtype": "<f4", "shape": [2**40, 2**40, 2**40]}, f4), "TensorInputError",
                       "needs"),
        "zero axis": (header({"op": "predict", "dtype": "<f4", "shape": [0, 32]}, f4), "TensorInputError", "positive"),
        "bool axis": (header({"op": "predict", "dtype": "<f4", "shape": [True, 32]}, f4), "TensorInputError", "positive"),
        "six axes": (header({"op": "predict", "dtype": "<f4", "shape": [1] * 6}, f4), "TensorInputError", "1 to 5"),
        "wrong shape": (header({"op": "predict", "dtype": "<f4", "shape": [32]}, f4), "TensorInputError",
                        r"input must have shape [2, 4, 4] or [1, 2, 4, 4], got [32]"),
        "preamble only": (b"\x00\x00\x00", "RequestError", "preamble"),
        "header past the end": (good[:5 + head_len - 1], "RequestError", "does not fit"),
        "header over the cap": (b"\x00" + struct.pack(">I", 1 << 20) + b"{}", "RequestError", "does not fit"),
        "header not json": (b"\x00" + struct.pack(">I", 3) + b"abc" + f4, "RequestError", "not UTF-8 JSON"),
        "header a list": (header([], f4), "RequestError", "JSON object"),  # type: ignore[arg-type]
        "unknown field": (header({"op": "predict", "dtype": "<f4", "shape": [1, 2, 4, 4], "x": 1}, f4), "RequestError",
                          "unknown fields ['x']"),
        "status op": (header({"op": "status", "dtype": "<f4", "shape": [1, 2, 4, 4]}, f4), "RequestError", "'predict'"),
    }  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        for name, (payload, kind, fragment) in bad.items():
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            reply = json.loads(recv_frame(sock) or b"null")
            assert reply["ok"] is False and reply["error"]["type"] == kind, (name, reply)
            assert fragment in reply["error"]["message"], (name, reply)
        sock.sendall(struct.pack(">I", len(good)) + good)  # the connection still serves
        assert json.loads(recv_frame(sock) or b"null")["ok"] is True
    # A frame that never completes (truncated on the wire): closed at the idle timeout, not held.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(struct.pack(">I", len(good)) + good[:10])
        start = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - start < 5
    # Over the frame limit: the connection is closed (the stream cannot be resynchronized).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(struct.pack(">I", MAX_FRAME + 1) + b"\x00")
        with contextlib.suppress(ConnectionResetError):  # closed with our byte unread: a reset, as good as an end
            assert sock.recv(1) == b""
    assert _ask(path, binary=({"op": "predict"}, x))["ok"] is True


def test_json_inputs_over_the_socket_are_checked(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, server: Any
) -> None:
    agent = Agent(_device(tmp_path, made["classification"], keys[1]))
    path = server(agent)
    x = made["classification"].rows[0]
    for features, fragment in [
        ([[[True] * 4] * 4] * 2, "numbers"),
        ([[["1"] * 4] * 4] * 2, "numbers"),
        ([[[1.0] * 4] * 4, [[1.0] * 3] * 4], "numbers"),  # ragged
        ([[[[[[1.0]]]]]], "numbers"),  # nested deeper than any input
        (x.ravel().tolist(), "[2, 4, 4] or [1, 2, 4, 4], got [32]"),
    ]:
        reply = _ask(path, {"op": "predict", "features": features})
        assert reply["ok"] is False and reply["error"]["type"] == "TensorInputError" and fragment in reply["error"]["message"]
    reply = _ask(path, {"op": "predict_batch", "rows": [x.tolist(), x[:1].tolist()]})
    assert reply["error"]["type"] == "TensorInputError" and "shape of row 0" in reply["error"]["message"]


def test_nd_model_uploads_no_field_samples_and_drift_pools_channels(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = made["classification"]
    with caplog.at_level("WARNING", logger="edgeops_agent.agent"):
        agent = Agent(_device(tmp_path, b, keys[1]), drift=DriftConfig(window=100))
    assert "field-sample upload is off for tiny-classification release 1: its input is N-d [1, 2, 4, 4]" in caplog.text
    with pytest.raises(AgentError, match=r"takes N-d input \[1, 2, 4, 4\], so its inputs are not uploaded"):
        agent.samples(10)
    agent.predict_batch(b.rows[:200])
    agent.flush_drift()
    calm = agent.telemetry(1.0)["drift"]
    assert calm["samples"] == 200 and calm["max_psi"] < 0.1 and not calm["alarm"]
    shifted = b.rows[200:400].copy()
    shifted[:, 1] += 1.5 * STD[1]  # channel 1 moves, at every position
    agent.predict_batch(shifted)
    agent.flush_drift()
    drift = agent.telemetry(1.0)["drift"]
    assert drift["alarm"] and drift["max_feature"] == "ch1" and drift["max_psi"] > 1.0


# -- N-d drift in bounded memory (review H3) --------------------------------------------------------


def _drift_ref(name: str, edges: Any) -> FeatureReference:
    e = tuple(float(v) for v in edges)
    return FeatureReference(name, 0.0, 1.0, -3.0, 3.0, e, (round(1 / (len(e) + 1), 6),) * (len(e) + 1))


def test_nd_drift_update_memory_is_bounded() -> None:
    """One drift hand-over (DRIFT_BATCH = 256 samples) of a [2, 64, 96] input (48 KiB a sample)
    peaked at ~72 MiB of numpy temporaries (a float64 copy of the batch, int64 offsets per value)
    and a [3, 224, 224] image at ~686 MiB; the ecu's whole RAM budget is 8 MiB. (From the review
    of issue 12, tests/test_review_issue12.py.)"""
    channels, positions, batch = 2, 64 * 96, 256
    detector = DriftDetector(
        DriftReference(1000, tuple(_drift_ref(f"c{i}", np.linspace(-1.2, 1.2, 9)) for i in range(channels)), (0.5, 0.5)),
        2,
        DriftConfig(reservoir=0, input_ring=0, labelled_rows=0),
        positions=positions,
    )
    rows = np.random.default_rng(0).normal(size=(batch, channels * positions)).astype(np.float32)
    tracemalloc.start()
    try:
        detector.update_batch(rows, np.zeros(batch, dtype=np.int64))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2 * rows.nbytes, f"drift update peak {peak / 2**20:.1f} MiB for a {rows.nbytes / 2**20:.0f} MiB batch"
    # Tighter than the review asked: the update's temporaries do not grow with the batch.
    assert peak <= 1 << 20, f"drift update peak {peak / 2**20:.2f} MiB"
    assert detector.status().samples == batch


@pytest.mark.parametrize(("channels", "positions"), [(3, 40), (2, 200), (20, 30), (3, 1500)])  # the ways of binning
def test_nd_drift_counts_are_searchsorted_on_the_pooled_channels(channels: int, positions: int) -> None:
    """Each channel's window histogram is numpy's searchsorted(edges, value, side="right") over every
    value of the channel, as the build computed the reference, for float32 samples (the agent's)
    and float64 ones, values on the edges and float32 neighbours of edges that float32 cannot
    hold included; one sample at a time or a batch, and feeding the per-sample counts gives the
    detector exactly the raw rows' state."""
    rng = np.random.default_rng(3)
    kinds = [np.sort(rng.normal(size=9)), np.array([0.1, 1 / 3, 1 / 3, 0.7]), np.array([-1e-3])]  # ragged, tied
    edges = [kinds[c % 3] for c in range(channels)]
    ref = DriftReference(1000, tuple(_drift_ref(f"c{c}", e) for c, e in enumerate(edges)), (0.5, 0.5))
    cfg = DriftConfig(window=10, reservoir=0, input_ring=0, labelled_rows=0)
    rows = rng.normal(size=(25, channels, positions)).astype(np.float32)
    exact = rows.astype(np.float64)
    for c, e in enumerate(edges):  # values on and around every edge, as float32 sees them
        near = np.concatenate([[np.nextafter(np.float32(v), np.float32(-np.inf)), np.float32(v), np.nextafter(
            np.float32(v), np.float32(np.inf))] for v in e]).astype(np.float32)  # fmt: skip
        rows[-1, c, : len(near)] = near  # float32(edge) is above or below the float64 edge
        exact[-1, c, : len(e)] = e  # float64 samples: exactly on the edges
    preds = np.zeros(len(rows), dtype=np.int64)
    for sample in (rows, exact):
        detector = DriftDetector(ref, 2, cfg, positions=positions)
        flat = sample.reshape(len(sample), -1)
        detector.update_batch(flat, preds)
        window = sample[-cfg.window :]
        for c, e in enumerate(edges):
            expected = np.bincount(np.searchsorted(e, window[:, c].ravel(), side="right"), minlength=len(e) + 1)
            assert detector._counts[c, : len(e) + 1].tolist() == expected.tolist(), (sample.dtype, c)
        counts = detector.channel_counts(flat)
        assert counts.shape == (len(flat), detector.count_width)
        assert np.array_equal(np.concatenate([detector.channel_counts(row) for row in flat]), counts)  # one at a time
        by_counts = DriftDetector(ref, 2, cfg, positions=positions)
        by_counts.update_counts(counts, preds)
        assert by_counts.status() == detector.status()
        assert np.array_equal(by_counts._up, detector._up) and np.array_equal(by_counts._down, detector._down)


def test_nd_agent_buffers_channel_histograms_not_samples(made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path) -> None:
    """The agent reduces each N-d sample to its channels' histograms when it predicts: the drift
    buffer holds [channels x bins] counts per sample, and one prediction at a time or a batch give
    the same drift statistics."""
    b = made["classification"]
    one = Agent(_device(tmp_path, b, keys[1], "one"), drift=DriftConfig(window=100))
    many = Agent(_device(tmp_path, b, keys[1], "many"), drift=DriftConfig(window=100))
    assert one._buf.nbytes <= DRIFT_BATCH * SHAPE[0] * 10 * 4 < DRIFT_BATCH * math.prod(SHAPE) * 4
    shifted = b.rows[:300].copy()
    shifted[150:, 1] += 1.5 * STD[1]
    for x in shifted:
        one.predict(x)
    many.predict_batch(shifted)
    for agent in (one, many):
        agent.flush_drift()
    assert one.telemetry(1.0)["drift"] == many.telemetry(1.0)["drift"]
    assert one.detector is not None and one.detector.status().max_feature == "ch1"


# -- model load and input checks (review) -------------------------------------------------------------


def test_a_model_whose_input_layout_differs_from_the_manifest_is_refused(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """prepare() reshapes by size: an NHWC model under an NCHW manifest would get scrambled channels."""
    b = made["classification"]
    for dims, shown in [([1, 4, 4, 2], r"\[1, 4, 4, 2\]"), ([1, 32], r"\[1, 32\]"), ([2, 2, 4, 4], r"\[2, 2, 4, 4\]")]:
        model = _onnx("classification", tuple(dims[1:]), 3, dims=dims)
        with pytest.raises(ModelLoadError, match=rf"input tensor has shape {shown}.*inputs\[0\]\.shape is \[1, 2, 4, 4\]"):
            LoadedModel(b.manifest, model, digest="x", signer="y", expired=False)
    # Installing such a bundle is refused, and names both shapes.
    body = {"manifest.json": b.manifest.to_json(), "model.onnx": _onnx("classification", (4, 4, 2), 3)}
    path = tmp_path / "nhwc.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, keys[0], subject=b.manifest.name)}))
    device = DataDir(tmp_path / "dev")
    device.add_trusted_key(keys[1])
    with pytest.raises(ModelLoadError, match=r"\[1, 4, 4, 2\].*\[1, 2, 4, 4\]"):
        install_bundle(device, path, target="ecu")
    # A symbolic (unfixed) axis is not compared: a batch axis named "N" loads and serves exactly.
    loose = LoadedModel(b.manifest, _onnx("classification", SHAPE, 3, dims=["N", *SHAPE]), digest="x", signer="y", expired=False)
    _, tensor = loose.prepare(b.rows[0])
    assert loose.output(loose.invoke(tensor)).tolist() == _ort(b, b.rows[:1])[0].tolist()


@pytest.mark.parametrize("which", ["classification", "int8"])
def test_a_finite_input_that_overflows_standardization_is_refused(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, which: str
) -> None:
    """3e38 in channel 1 (mean -1, std 0.5) is finite, but (x - mean) / std is not in float32: it
    is the input's fault, not the model's (not ModelOutputError "for a valid input"), and numpy
    warns nothing. A large value that standardizes to a finite one is served exactly."""
    b = made[which]
    agent = Agent(_device(tmp_path, b, keys[1]))
    x = b.rows[0].copy()
    x[1, 2, 3] = 3e38
    message = r"input value at \[1, 2, 3\] is 3e\+38: standardized .* overflows float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TensorInputError, match=message):
            agent.predict(x)
        with pytest.raises(TensorInputError, match=r"row 1: " + message):
            agent.predict_batch(np.stack([b.rows[1], x]))
        big = b.rows[0].copy()
        big[0, 1, 1] = 1e20  # (1e20 - 0.5) / 2: finite
        assert agent.predict(big).logits == _ort(b, big[None])[0].tolist()
        assert agent.predict_batch(big[None])[0].logits == _ort(b, big[None])[0].tolist()
        # A float64 value beyond float32's range is named as sent, not as the inf it would become.
        wide = b.rows[0].astype(np.float64)
        wide[0, 0, 1] = -1e300
        beyond = r"input value at \[0, 0, 1\] is -1e\+300, beyond float32's range"
        for form in (wide, wide.tolist()):
            with pytest.raises(TensorInputError, match=beyond):
                agent.predict(form)
        with pytest.raises(TensorInputError, match=r"row 0: " + beyond):
            agent.predict_batch(wide[None])
    assert agent.telemetry(1.0)["inference"]["errors"] == {"TensorInputError": 5}


# -- configuration (review) ---------------------------------------------------------------------------


def test_a_huge_anomaly_event_interval_is_a_config_error(tmp_path: Path) -> None:
    """``[telemetry] anomaly_event_s = 1e300`` passed load_config (finite, >= 0.5) and then
    ``Agent()`` died with OverflowError (int(1e300 * 1e9)): `run` could not start, with no field named.
    ``interval_s = 1e300`` made the daemon's telemetry timer die the same way (Event.wait)."""
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "agent.toml"
    head = f'data_dir = "{tmp_path / "data"}"\ndevice_id = "d1"\ntarget = "ecu"\n[telemetry]\n'

    def start() -> None:
        c = load_config(cfg)
        Agent(DataDir(tmp_path / "data"), anomaly_event_s=c.anomaly_event_s)

    for key in ("anomaly_event_s", "interval_s"):
        for value in ("1e300", "86400.5"):
            cfg.write_text(head + f"{key} = {value}\n")
            with pytest.raises(ConfigError, match=rf"telemetry\.{key}"):
                start()
        cfg.write_text(head + f"{key} = 86400\n")
        start()  # a day is the most
    with pytest.raises(ConfigError, match="anomaly_event_s"):
        Agent(DataDir(tmp_path / "data"), anomaly_event_s=1e300)


# -- tasks -------------------------------------------------------------------------------------


def test_regression_answers_its_outputs(made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, server: Any) -> None:
    b = made["regression"]
    agent = Agent(_device(tmp_path, b, keys[1]), drift=DriftConfig(window=100))
    expect = _ort(b, b.rows[:20])
    p = agent.predict(b.rows[0])
    assert p.task == "regression" and p.values == {"temp_c": expect[0][0], "rul_h": expect[0][1]}
    assert p.to_dict() == {"task": "regression", "values": p.values, "latency_ms": p.latency_ms, "prediction_id": p.id}
    assert [q.logits for q in agent.predict_batch(b.rows[:20])] == expect.tolist()
    reply = _ask(server(agent), {"op": "predict", "features": b.rows[1].tolist()})
    assert reply["task"] == "regression" and reply["values"] == {"temp_c": expect[1][0], "rul_h": expect[1][1]}
    with pytest.raises(FeedbackError, match="the active model is a regression model"):
        agent.feedback(p.id, 0)
    t = agent.telemetry(1.0)
    assert t["inference"]["task"] == "regression" and t["inference"]["predicted"] is None and "anomaly" not in t["inference"]
    assert t["inference"]["feedback"]["rejected"] == 1
    picked = agent.samples(5, seed=1)  # flat rows: uploaded, unlabelled, weighted by rarity only
    assert len(picked.rows) == 5 and picked.labels == (None,) * 5


def test_anomaly_score_verdict_rate_and_rate_limited_events(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, server: Any
) -> None:
    b = made["anomaly"]
    events: list[tuple[str, dict[str, Any]]] = []
    agent = Agent(
        _device(tmp_path, b, keys[1]), on_event=lambda k, d: events.append((k, d)), anomaly_event_s=0.5,
        drift=DriftConfig(window=100),
    )  # fmt: skip
    threshold = b.manifest.task.threshold
    assert threshold is not None
    normal, faulty = b.rows[:100], b.rows[100:110] * 3.0  # 9 x the squared deviation: far above the threshold
    expect = _ort(b, np.concatenate([normal, faulty]))
    answers = agent.predict_batch(normal)
    assert [p.logits for p in answers] == expect[:100].tolist()
    assert all(p.anomaly is (p.logits[0] > threshold) for p in answers)
    flagged_normal = sum(p.class_index for p in answers)
    assert [k for k, _ in events].count("anomaly") == (1 if flagged_normal else 0)
    events.clear()
    agent.telemetry(1.0)  # start a fresh interval
    time.sleep(0.6)
    first = agent.predict(faulty[0])
    assert first.to_dict() == {
        "task": "anomaly", "score": expect[100][0], "threshold": threshold, "anomaly": True,
        "latency_ms": first.latency_ms, "prediction_id": first.id,
    }  # fmt: skip
    assert events == [
        ("anomaly", {"count": 1, "score": expect[100][0], "threshold": threshold, "prediction_id": first.id,
                     "model": "tiny-anomaly", "release": 1}),
    ]  # fmt: skip
    for x in faulty[1:6]:  # within the rate limit: counted, not reported yet
        assert agent.predict(x).anomaly is True
    assert len(events) == 1
    reply = _ask(server(agent), binary=({"op": "predict"}, faulty[6]))
    assert reply["anomaly"] is True and reply["score"] == expect[106][0] and reply["threshold"] == threshold
    for x in normal[:4]:
        agent.predict(x)
    time.sleep(0.6)
    t = agent.telemetry(1.0)  # the held-back anomalies go out with the telemetry, none lost
    assert events[-1][0] == "anomaly" and events[-1][1]["count"] == 6 and events[-1][1]["prediction_id"] is None
    flagged = 7 + sum(agent.model.verdict(float(v)) for v in expect[:4, 0])  # type: ignore[union-attr]
    assert t["inference"]["task"] == "anomaly" and t["inference"]["predicted"] is None
    assert t["inference"]["anomaly"] == {"count": flagged, "rate": round(flagged / 11, 6)}
    assert t["inference"]["window_count"] == 11
    _validate(
        "Telemetry",
        Telemetry.from_dict({**t, "outbox": {"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0}}).to_dict(),
    )
    _validate("Event", Event(device_id="d1", ts=None, type="anomaly", detail=events[-1][1]).to_dict())
    with pytest.raises(FeedbackError, match="anomaly model"):
        agent.feedback(first.id, 0)


def test_output_drift_psi_reacts_to_shifted_scores(made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path) -> None:
    b = made["anomaly"]
    events: list[tuple[str, dict[str, Any]]] = []
    agent = Agent(_device(tmp_path, b, keys[1]), on_event=lambda k, d: events.append((k, d)), drift=DriftConfig(window=100))
    agent.predict_batch(b.rows[:300])  # the reference's own distribution
    agent.flush_drift()
    calm = agent.telemetry(1.0)["drift"]
    assert calm["output_psi"]["anomaly_score"] < 0.25 and calm["prediction_psi"] == calm["output_psi"]["anomaly_score"]
    assert not any(k == "drift_alarm" for k, _ in events)
    agent.predict_batch(b.rows[:300] * 1.3)  # scores 1.69 x: the distribution of the answers moved
    agent.flush_drift()
    drift = agent.telemetry(1.0)["drift"]
    assert drift["output_psi"]["anomaly_score"] > 1.0 and drift["alarm"]
    alarm = next(d for k, d in events if k == "drift_alarm")
    assert alarm["output_psi"]["anomaly_score"] > 0.25 and alarm["prediction_psi"] > 0.25


def test_self_test_checks_what_each_task_promises(made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path) -> None:
    def load(b: Made) -> LoadedModel:
        return LoadedModel(b.manifest, b.model, digest="x", signer="y", expired=False)

    assert all(load(made[k]).self_test() == 6 for k in made)
    tmp = tmp_path / "bundles"
    tmp.mkdir()
    off = _make(tmp, keys[0], "regression", sample=(4,), labels=("temp_c", "rul_h"), tamper_expected=1e-3)
    with pytest.raises(SelfTestError, match=r"self-test vector 0 fails on this device: max \|output - expected\|"):
        load(off).self_test()
    device = DataDir(tmp / "dev")
    device.add_trusted_key(keys[1])
    with pytest.raises(SelfTestError):
        install_bundle(device, off.path, target="ecu")
    # An anomaly vector's verdict is checked only when its score is clearly away from the threshold.
    b = made["anomaly"]
    v0 = b.manifest.self_test.vectors[0]
    assert v0.label == 0  # a normal row
    one = dataclasses.replace(b.manifest.self_test, vectors=(v0,))

    def with_threshold(t: float) -> LoadedModel:
        task = dataclasses.replace(b.manifest.task, threshold=t)
        return LoadedModel(
            dataclasses.replace(b.manifest, task=task, self_test=one), b.model, digest="x", signer="y", expired=False
        )

    assert with_threshold(v0.expected[0] - 1e-5).self_test() == 1  # the verdict flips within atol: not checked
    with pytest.raises(SelfTestError, match=r"gives verdict 1 .*expected 0"):
        with_threshold(v0.expected[0] - 0.5).self_test()  # clearly below the score: the device says anomaly


# -- through the daemon and a real broker ------------------------------------------------------


def test_daemon_reports_task_anomaly_rate_and_events_over_mqtt(
    made: dict[str, Made], keys: tuple[Path, Path], tmp_path: Path, broker: Broker
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    b = made["anomaly"]
    data = _device(tmp_path, b, keys[1])
    got: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        with lock:
            got.append((msg.topic.rsplit("/", 1)[-1], json.loads(msg.payload)))

    console = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="console-tasks", protocol=mqtt.MQTTv5)
    console.on_message = on_message
    console.connect("127.0.0.1", broker.port)
    console.subscribe("edgeops/v1/dev-a/#", qos=1)
    console.loop_start()
    config = AgentConfig(
        device_id="dev-a", target="ecu", data_dir=data.root, mqtt=MqttSettings(port=broker.port), telemetry_interval_s=0.5,
        anomaly_event_s=0.5, socket=tmp_path / "dev-a.sock",
    )  # fmt: skip
    daemon = Daemon(config)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        for x in b.rows[:20]:
            daemon.agent.predict(x)
        daemon.agent.predict(b.rows[20] * 3.0)

        def seen() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            with lock:
                tel = [m for leaf, m in got if leaf == "telemetry" and (m["inference"].get("anomaly") or {}).get("count")]
                return tel, [m for leaf, m in got if leaf == "events" and m["type"] == "anomaly"]

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(seen()):
            time.sleep(0.1)
        telemetry, anomalies = seen()
        assert anomalies and anomalies[0]["detail"]["count"] >= 1 and anomalies[0]["detail"]["model"] == "tiny-anomaly"
        assert telemetry and telemetry[0]["inference"]["task"] == "anomaly"
        assert 0 < telemetry[0]["inference"]["anomaly"]["rate"] <= 1
        _validate("Telemetry", telemetry[0])
        _validate("Event", anomalies[0])
    finally:
        daemon.stop()
        runner.join(timeout=20)
        console.loop_stop()
        console.disconnect()
