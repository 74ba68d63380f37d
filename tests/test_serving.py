"""The serving path on real bundles of every target: concurrency, hostile input, batching.

Every target's bundle (ecu: onnxruntime, mobile: LiteRT, wearable: TFLite Micro; the last
two with int8 input and output) is installed into a data directory and served through the
real :class:`Agent`, the real socket endpoint and the real ``edgeops-agent predict``.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import AGENT, Built, run_edgeops
from edgeops_agent.agent import Agent
from edgeops_agent.errors import ModelOutputError, TensorInputError
from edgeops_agent.install import install_bundle
from edgeops_agent.model import LoadedModel
from edgeops_agent.runtime import ModelRunner, quantize
from edgeops_agent.server import EndpointServer, recv_frame, send_frame
from edgeops_agent.store import DataDir
from edgeops_core import Manifest, apply_preprocessing, read_members

TARGETS = ("ecu", "mobile", "wearable")


@pytest.fixture(scope="module")
def bundles(built: Built, small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each target's bundle file (all signed with the session's key).

    mobile and wearable are built in a copy of the ECU build's home (data and train come
    from its cache): importing test_tflite's ``built_tflite`` fixture here would register
    a second session fixture, whose fully cached rebuild breaks test_tflite's
    ``cached_steps`` check when this module runs first.
    """
    home = tmp_path_factory.mktemp("serving-home") / "home"
    shutil.copytree(built.home, home)
    out = tmp_path_factory.mktemp("dist-serving")
    found = {"ecu": built.bundle}
    for target in ("mobile", "wearable"):
        proc = run_edgeops(
            "build", "-t", target, "-p", small_project, "-o", out, "-k", built.private_key, "--json",
            env={"EDGEOPS_HOME": str(home)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        found[target] = Path(json.loads(proc.stdout)["bundle"])
    return found


@pytest.fixture(scope="module")
def devices(bundles: dict[str, Path], built: Built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DataDir]:
    """A data directory per target with that target's bundle installed."""
    out = {}
    for target, bundle in bundles.items():
        data = DataDir(tmp_path_factory.mktemp(f"device-{target}") / "device")
        data.add_trusted_key(built.public_key)
        install_bundle(data, bundle, target=target)
        out[target] = data
    return out


def _rows(manifest: Manifest, n: int, seed: int = 0) -> np.ndarray:
    """``n`` realistic raw rows: the training distribution per feature, plus the self-test inputs."""
    rng = np.random.default_rng(seed)
    ref = manifest.drift_reference.features
    mean = np.array([f.mean for f in ref])
    std = np.array([max(f.std, 1e-3) for f in ref])
    rows = rng.normal(mean, 1.5 * std, size=(n, len(ref))).astype(np.float32)
    vectors = np.array([v.input for v in manifest.self_test.vectors], dtype=np.float32)
    rows[: len(vectors)] = vectors
    return rows


# -- int8 bundles served through the agent, and the device's preprocessing -----------------


@pytest.mark.parametrize("target", TARGETS)
def test_installed_bundle_serves_its_self_test_and_equals_the_raw_runtime(
    devices: dict[str, DataDir], bundles: dict[str, Path], target: str
) -> None:
    agent = Agent(devices[target])
    assert agent.model is not None
    m = agent.model.manifest
    if target != "ecu":
        assert m.inputs[0].dtype == "int8" and m.outputs[0].dtype == "int8"
    members = read_members(bundles[target].read_bytes())
    raw = ModelRunner.from_manifest(Manifest.from_json(members["manifest.json"]), members[m.model_file])
    for v in m.self_test.vectors:
        got = agent.predict(np.asarray(v.input, dtype=np.float32))
        assert got.class_index == v.label and got.label == m.labels[v.label]
        assert np.abs(np.asarray(got.logits) - np.asarray(v.expected)).max() <= m.self_test.atol
        # The raw runtime through core's apply_preprocessing + quantize: the same numbers, exactly.
        assert got.logits == raw.predict(np.asarray(v.input, dtype=np.float32)).tolist()


@pytest.mark.parametrize("target", TARGETS)
def test_device_preprocessing_is_bit_identical_to_core(devices: dict[str, DataDir], target: str) -> None:
    """The agent's precomputed path gives exactly apply_preprocessing (+ quantize for int8 inputs)."""
    model = Agent(devices[target]).model
    assert model is not None
    m = model.manifest
    rows = _rows(m, 20_000, seed=1)
    # Rows that land exactly on rounding ties of the input quantization are where a fused
    # multiply-add differed from the two-step form: include many of them.
    spec = m.inputs[0]
    if spec.dtype == "int8" and spec.quantization is not None and m.preprocessing.kind == "standardize":
        k = np.random.default_rng(2).integers(-100, 100, size=(5_000, rows.shape[1])) + 0.5
        ties = k * np.float32(spec.quantization.scale) * np.asarray(m.preprocessing.std) + np.asarray(m.preprocessing.mean)
        rows = np.vstack([rows, ties.astype(np.float32)])
    expect = apply_preprocessing(m.preprocessing, rows)
    if spec.dtype == "int8" and spec.quantization is not None:
        expect = quantize(expect, spec.quantization, spec.dtype)
    single = np.stack([model.prepare(r)[1].reshape(-1) for r in rows])
    assert single.dtype == expect.dtype and np.array_equal(single, expect)
    _, batch = model.prepare_batch(rows)
    assert np.array_equal(batch.reshape(len(rows), -1), expect)


# -- concurrency (defect 10) ---------------------------------------------------------------


def _sequential(agent: Agent, rows: np.ndarray) -> list[tuple[int, list[float]]]:
    return [(p.class_index, p.logits) for p in (agent.predict(r) for r in rows)]


@pytest.mark.parametrize("target", TARGETS)
def test_eight_threads_get_the_sequential_answers(devices: dict[str, DataDir], target: str) -> None:
    agent = Agent(devices[target])
    assert agent.model is not None
    rows = _rows(agent.model.manifest, 200)
    expected = _sequential(agent, rows)

    def worker(k: int) -> list[tuple[int, list[float]]]:
        order = np.random.default_rng(k).permutation(len(rows))
        got: list[tuple[int, list[float]]] = [(0, [])] * len(rows)
        for _ in range(2):
            for i in order:
                p = agent.predict(rows[i])
                got[i] = (p.class_index, p.logits)
        return got

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert all(r == expected for r in results)
    t = agent.telemetry(1.0)["inference"]
    assert t["errors"] == {} and t["count"] == len(rows) * 17


def _client(path: Path, rows: list[list[float]], order: list[int], out: dict[int, tuple[int, list[float]]]) -> int:
    errors = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        for i in order:
            send_frame(sock, {"op": "predict", "features": rows[i], "id": i})
            reply = json.loads(recv_frame(sock) or b"{}")
            if not reply.get("ok") or reply.get("id") != i:
                errors += 1
                continue
            out[i] = (reply["index"], reply["logits"])
    return errors


@pytest.mark.parametrize("target", TARGETS)
def test_eight_socket_clients_get_the_sequential_answers(devices: dict[str, DataDir], target: str, tmp_path: Path) -> None:
    """Must show (issue 7): 8 concurrent socket clients x 1 000 predictions, 0 errors, sequential answers."""
    agent = Agent(devices[target])
    assert agent.model is not None
    rows = _rows(agent.model.manifest, 250, seed=3)
    expected = dict(enumerate(_sequential(agent, rows)))
    as_lists = rows.tolist()
    server = EndpointServer(tmp_path / "agent.sock", agent)
    server.start()
    try:
        outs: list[dict[int, tuple[int, list[float]]]] = [{} for _ in range(8)]
        orders = [[int(i) for i in np.random.default_rng(k).permutation(1000) % len(rows)] for k in range(8)]
        with ThreadPoolExecutor(8) as pool:
            errors = list(pool.map(_client, [server.path] * 8, [as_lists] * 8, orders, outs))
    finally:
        server.stop()
    assert errors == [0] * 8
    # JSON carries float32 logits as their shortest float repr: equal after the round trip.
    assert all(out == {i: expected[i] for i in out} and len(out) == len(rows) for out in outs)
    assert agent.telemetry(1.0)["inference"]["errors"] == {}


# -- non-finite outputs (defect 8, serving half) ----------------------------------------------


def _nan_onnx(n_features: int, n_labels: int) -> bytes:
    """An ONNX model whose every output is NaN (a weight matrix of NaN)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((n_features, n_labels), np.nan, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logits"])],
        "nan",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, n_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n_labels])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_non_finite_output_is_a_typed_counted_error(devices: dict[str, DataDir], tmp_path: Path) -> None:
    agent = Agent(devices["ecu"])
    assert agent.model is not None
    m = agent.model.manifest
    agent.model = LoadedModel(m, _nan_onnx(len(m.feature_names), len(m.labels)), digest="", signer="", expired=False)
    row = np.asarray(m.self_test.vectors[0].input, dtype=np.float32)
    with pytest.raises(ModelOutputError, match="non-finite output"):
        agent.predict(row)
    with pytest.raises(ModelOutputError, match=r"row 0: .*non-finite output"):
        agent.predict_batch(np.stack([row, row]))
    server = EndpointServer(tmp_path / "agent.sock", agent)
    server.start()
    try:
        reply = _ask(server.path, {"op": "predict", "features": row.tolist(), "id": 7})
    finally:
        server.stop()
    assert reply["ok"] is False and reply["error"]["type"] == "ModelOutputError" and reply["id"] == 7
    t = agent.telemetry(1.0)["inference"]
    assert t["errors"] == {"ModelOutputError": 3} and t["count"] == 0


# -- predict_batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_predict_batch_equals_single_predictions(devices: dict[str, DataDir], target: str, tmp_path: Path) -> None:
    agent = Agent(devices[target])
    assert agent.model is not None
    rows = _rows(agent.model.manifest, 300, seed=4)  # > DRIFT_BATCH: the drift buffer wraps
    single = _sequential(agent, rows)
    batch = agent.predict_batch(rows)
    assert [(p.class_index, p.logits) for p in batch] == single
    assert agent.telemetry(1.0)["inference"]["count"] == 600
    bad = rows[:4].copy()
    bad[2, 5] = np.nan
    with pytest.raises(TensorInputError, match=r"row 2: input feature 5 is nan"):
        agent.predict_batch(bad)
    with pytest.raises(TensorInputError, match=r"shape \[n, 106\]"):
        agent.predict_batch(rows[:, :5])
    server = EndpointServer(tmp_path / "agent.sock", agent)
    server.start()
    try:
        reply = _ask(server.path, {"op": "predict_batch", "rows": rows[:50].tolist(), "id": "b"})
        bad_reply = _ask(server.path, {"op": "predict_batch", "rows": [[1, "x"]], "id": "c"})
    finally:
        server.stop()
    assert reply["ok"] is True and reply["id"] == "b"
    assert [(p["index"], p["logits"]) for p in reply["predictions"]] == single[:50]
    assert bad_reply["ok"] is False and bad_reply["error"]["type"] == "TensorInputError"


# -- the socket endpoint under hostile clients (defect 15) ----------------------------------


def _ask(path: Path, request: object, *, raw: bytes | None = None) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        if raw is None:
            send_frame(sock, request)
        else:
            sock.sendall(struct.pack(">I", len(raw)) + raw)
        payload = recv_frame(sock)
    assert payload is not None, f"no reply to {str(request)[:80] if raw is None else raw[:80]!r}"
    reply: dict[str, object] = json.loads(payload)
    return reply


def test_hostile_requests_all_get_a_reply_and_print_nothing(
    devices: dict[str, DataDir], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    agent = Agent(devices["ecu"])
    server = EndpointServer(tmp_path / "agent.sock", agent)
    server.start()
    huge = 10**400
    deep = "[" * 100_000 + "]" * 100_000
    try:
        cases = {
            "huge int feature": (None, json.dumps({"op": "predict", "features": [huge] * 106}).encode()),
            "deep JSON": (None, deep.encode()),
            "deep features": (None, ('{"op": "predict", "features": ' + deep + "}").encode()),
            "deep id": (None, ('{"op": "status", "id": ' + deep + "}").encode()),
            "5000-digit id": (None, b'{"op": "nope", "id": ' + b"9" * 5000 + b"}"),
            "bool features": ({"op": "predict", "features": [True] * 106}, None),
            "rows not a list": ({"op": "predict_batch", "rows": 3}, None),
            "not utf-8": (None, b"\xff\xfe{"),
        }
        replies = {name: _ask(server.path, req, raw=raw) for name, (req, raw) in cases.items()}
        ok = _ask(server.path, {"op": "status"})
    finally:
        server.stop()
    for name, reply in replies.items():
        assert reply["ok"] is False, name
        assert isinstance(reply["error"], dict) and reply["error"]["type"] in ("RequestError", "TensorInputError"), name
    assert replies["huge int feature"]["error"]["type"] == "TensorInputError"  # type: ignore[index]
    assert ok["ok"] is True
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-2000:]


def test_listen_backlog_takes_a_burst_of_connects(devices: dict[str, DataDir], tmp_path: Path) -> None:
    # Not started: nothing accepts, so only the kernel's listen queue holds the connects.
    server = EndpointServer(tmp_path / "agent.sock", Agent(devices["ecu"]))
    socks, refused = [], 0
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            try:
                s.connect(str(server.path))
            except BlockingIOError:
                refused += 1
    finally:
        for s in socks:
            s.close()
        server.server_close()
        server.path.unlink(missing_ok=True)
    assert refused == 0


def test_connections_are_bounded_and_idle_ones_closed(devices: dict[str, DataDir], tmp_path: Path) -> None:
    agent = Agent(devices["ecu"])
    server = EndpointServer(tmp_path / "agent.sock", agent, max_connections=8, idle_timeout_s=2.0)
    server.start()
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(str(server.path))
            socks.append(s)
        send_frame(socks[0], {"op": "status"})
        assert json.loads(recv_frame(socks[0]) or b"{}")["ok"] is True
        # Past the bound: 40 more are refused with a reply, and no thread is started for them.
        busy = []
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(str(server.path))
            busy.append(json.loads(recv_frame(s) or b"{}"))
            s.close()
        assert all(r["ok"] is False and r["error"]["type"] == "Busy" for r in busy)
        assert threading.active_count() <= threads_before + 8
        assert server.refused == 40
        # Idle connections are closed by the server after the idle timeout (long enough that the
        # 40 refusals above never outlast it on a busy machine)...
        time.sleep(3.5)
        assert all(s.recv(1) == b"" for s in socks)
        # ...which frees their places.
        assert _ask(server.path, {"op": "status"})["ok"] is True
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_cli_predict_answers_every_line_and_exits_2(devices: dict[str, DataDir]) -> None:
    good = json.dumps([0.0] * 106)
    lines = [
        good,
        "[" + "1" * 400 + "]",  # a 400-digit integer
        "[" * 50_000 + "]" * 50_000,  # nested too deep
        '{"a": 1}',
        "[1, 2]",
        good,
    ]
    proc = subprocess.run(
        [*AGENT, "predict", "--data-dir", str(devices["ecu"].root)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["ok"] for o in out] == [True, False, False, False, False, True], proc.stderr
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
