"""Field samples with labels (issue 11): labelled rows on the device, their selection, the ``samples`` message.

A real agent serves the session's ECU bundle; nominal inputs come from the example's own
sensor physics (the simulator's), drifted ones are pushed far outside the drift reference.
The one MQTT test runs the agent as its own process against a real Mosquitto.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import Broker
from conftest import REPO, Built
from edgeops_agent.agent import Agent, SampleSelection
from edgeops_agent.config import load_config
from edgeops_agent.drift import RARITY_MAX, DriftConfig
from edgeops_agent.errors import ConfigError, FeedbackError
from edgeops_agent.install import install_bundle
from edgeops_agent.store import DataDir
from edgeops_core import Manifest, MessageError, ModelRef, Samples, read_members
from edgeops_core.messages import DEFAULT_SAMPLE_ROWS, MAX_SAMPLE_ROWS, parse_command
from edgeops_sim.physics import Sensors, load_generator
from test_agent_mqtt import Collector, _ask, _device, _validate
from test_ota_agent import resign

GENERATOR = REPO / "examples" / "vibration" / "vibration_data.py"
TS = "2026-11-28T15:00:00.123456Z"


@pytest.fixture
def device(tmp_path: Path, built: Built) -> DataDir:
    data = DataDir(tmp_path / "device")
    data.add_trusted_key(built.public_key)
    install_bundle(data, built.bundle, target="ecu")
    return data


def _windows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sensor windows of the example's physics (float32 rows) and their true classes."""
    x, y = Sensors(load_generator(GENERATOR), seed).batch([{}] * n)
    return np.asarray(x, dtype=np.float32), np.asarray(y)


def _far(agent: Agent, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows 20 reference standard deviations above the mean in every feature."""
    assert agent.model is not None
    ref = agent.model.manifest.drift_reference.features
    mean = np.array([f.mean for f in ref])
    std = np.array([f.std for f in ref])
    noise = np.random.default_rng(seed).normal(size=(n, len(ref)))
    return (mean + (20 + noise) * std).astype(np.float32)


def _is_far(agent: Agent, rows: np.ndarray) -> np.ndarray:
    assert agent.model is not None
    high = np.array([f.max for f in agent.model.manifest.drift_reference.features])
    return np.asarray((rows > high).all(axis=1))


# -- labelled rows on the device ------------------------------------------------------------------


def test_feedback_keeps_the_row_labelled_newest_first(device: DataDir) -> None:
    agent = Agent(device)
    assert agent.model is not None
    names = agent.model.labels
    x, y = _windows(40)
    predictions = agent.predict_batch(x[:20]) + [agent.predict(row) for row in x[20:]]  # both serving paths
    labelled = [3, 25, 11, 39]  # the order the labels arrive in
    for i in labelled:
        agent.feedback(predictions[i].id, names[int(y[i])] if i % 2 else int(y[i]))  # by name and by index
    picked = agent.samples(10)
    newest_first = labelled[::-1]
    assert picked.labels[:4] == tuple(names[int(y[i])] for i in newest_first)
    assert picked.labels[4:] == (None,) * 6
    assert np.array_equal(picked.rows[:4], x[newest_first])  # the very float32 inputs
    assert picked.predicted[:4].tolist() == [predictions[i].class_index for i in newest_first]
    assert picked.rows.dtype == np.float32 and picked.rows.shape == (10, agent.model.n_features)
    assert picked.model is agent.model and picked.scores.shape == (10,) and (picked.scores >= 0).all()
    assert agent.telemetry(1.0)["inference"]["feedback"]["labelled"] == 4


def test_a_label_whose_row_left_the_ring_counts_but_keeps_no_row(device: DataDir) -> None:
    agent = Agent(device, drift=DriftConfig(input_ring=8))
    x, y = _windows(30)
    predictions = agent.predict_batch(x)
    right = agent.feedback(predictions[0].id, int(y[0]))  # 29 predictions ago: the row is gone
    assert right == (predictions[0].class_index == int(y[0]))
    assert agent.samples(50).labels.count(None) == 30  # only the reservoir's unlabelled rows
    agent.feedback(predictions[22].id, int(y[22]))  # 7 predictions ago: still in the ring
    picked = agent.samples(50)
    assert picked.labels[0] is not None and picked.labels[1:].count(None) == 29  # x[22] is sent once
    assert np.array_equal(picked.rows[0], x[22])
    assert agent.telemetry(1.0)["inference"]["feedback"] == {"labelled": 2, "correct": right + 0 + int(
        predictions[22].class_index == int(y[22])), "rejected": 0}  # fmt: skip
    off = Agent(device, drift=DriftConfig(input_ring=0, labelled_rows=0))  # keeps no rows at all
    p = off.predict(x[0])
    off.feedback(p.id, 0)
    assert off.samples(5).labels == (None,)


def test_the_labelled_fifo_keeps_the_newest(device: DataDir) -> None:
    agent = Agent(device, drift=DriftConfig(labelled_rows=5, reservoir=0))
    x, y = _windows(12)
    predictions = agent.predict_batch(x)
    for p, truth in zip(predictions, y, strict=True):
        agent.feedback(p.id, int(truth))
    picked = agent.samples(DEFAULT_SAMPLE_ROWS)
    assert len(picked.rows) == 5 and None not in picked.labels
    assert np.array_equal(picked.rows, x[[11, 10, 9, 8, 7]])
    assert np.array_equal(agent.samples(2).rows, x[[11, 10]])  # max_rows cuts the labelled rows too


def test_rows_labelled_before_a_drift_alarm_are_not_uploaded(device: DataDir) -> None:
    agent = Agent(device, drift=DriftConfig(window=50, reservoir=0))
    x, y = _windows(40)
    for p, truth in zip(agent.predict_batch(x), y, strict=True):
        agent.feedback(p.id, int(truth))
    assert len(agent.samples(DEFAULT_SAMPLE_ROWS).rows) == 40
    far = _far(agent, 600)
    late = agent.predict_batch(far)[-20:]
    agent.flush_drift()
    assert agent.detector is not None and agent.detector.alarm
    for p in late:
        agent.feedback(p.id, 0)
    picked = agent.samples(DEFAULT_SAMPLE_ROWS)
    # The world changed: only the 20 rows labelled since the alarm rose are training data now.
    assert len(picked.rows) == 20 and _is_far(agent, picked.rows).all()
    assert np.array_equal(picked.rows, far[-1:-21:-1])


def test_a_model_change_empties_the_rows(tmp_path: Path, built: Built, device: DataDir) -> None:
    agent = Agent(device)
    x, y = _windows(20)
    predictions = agent.predict_batch(x)
    for p, truth in zip(predictions[:5], y[:5], strict=True):
        agent.feedback(p.id, int(truth))
    assert agent.samples(30).labels.count(None) == 15  # the labelled rows are not sent again from the reservoir
    agent.install(resign(built, tmp_path, "r2", {"release": 2, "version": "1.1.0"}), target="ecu")
    empty = agent.samples(30)
    assert len(empty.rows) == 0 and empty.model is agent.model and empty.model.manifest.release == 2  # type: ignore[union-attr]
    with pytest.raises(FeedbackError, match="unknown here"):
        agent.feedback(predictions[6].id, 0)  # made by the replaced model
    later = agent.predict(x[7])
    agent.feedback(later.id, int(y[7]))
    picked = agent.samples(30)
    assert picked.labels == (agent.model.labels[int(y[7])],) and np.array_equal(picked.rows, x[[7]])  # type: ignore[union-attr]


def test_a_prediction_that_straddles_a_model_change_keeps_no_row(tmp_path: Path, built: Built, device: DataDir) -> None:
    """The model is replaced while a prediction runs: that prediction's label is refused, never misfiled."""
    agent = Agent(device)
    x, _ = _windows(3)
    first = agent.predict(x[0])
    old = agent.model
    assert old is not None
    bundle = resign(built, tmp_path, "r2", {"release": 2, "version": "1.1.0"})
    real = old.invoke

    def swap(tensor: np.ndarray) -> np.ndarray:
        old.invoke = real
        agent.install(bundle, target="ecu")
        return real(tensor)

    old.invoke = swap  # type: ignore[method-assign]
    straddling = agent.predict(x[1])
    assert agent.model is not old
    with pytest.raises(FeedbackError, match="replaced"):
        agent.feedback(straddling.id, 0)
    with pytest.raises(FeedbackError, match="unknown here"):
        agent.feedback(first.id, 0)
    assert len(agent.samples(10).rows) == 0


# -- selection --------------------------------------------------------------------------------------


def test_selection_puts_labelled_first_and_favours_far_out_of_range_rows(device: DataDir) -> None:
    agent = Agent(device, drift=DriftConfig(reservoir=1024))  # the reservoir holds every row
    assert agent.model is not None and agent.detector is not None
    x, y = _windows(500, seed=3)
    far = _far(agent, 50)
    rows = np.concatenate([x, far])
    order = np.random.default_rng(4).permutation(len(rows))
    predictions = agent.predict_batch(rows[order])
    labelled = [i for i, k in enumerate(order) if k < 500][:3]  # three nominal rows get labels
    for i in labelled:
        agent.feedback(predictions[i].id, int(y[order[i]]))

    picks = far_picks = 0
    for seed in range(20):
        picked = agent.samples(13, seed=seed)
        assert picked.labels[:3] != (None,) * 3 and picked.labels[3:] == (None,) * 10
        assert np.array_equal(picked.rows[:3], rows[order[labelled[::-1]]])
        picks += 10
        far_picks += int(_is_far(agent, picked.rows[3:]).sum())
    # A uniform draw would give ~18 of the 200 (50 of 550 rows); weights 1 + rarity + uncertainty
    # give a row far out in every feature ~33 against ~2.
    assert far_picks > picks // 2, f"{far_picks} of {picks} picks were far out of range"
    assert far_picks < picks, "weighted, not deterministic: nominal rows keep a chance"
    assert agent.samples(13, seed=7).rows.tobytes() == agent.samples(13, seed=7).rows.tobytes()  # a seed repeats

    every = agent.samples(MAX_SAMPLE_ROWS)
    assert len(every.rows) == 550  # all of them, when there is room; the 3 labelled ones once
    rarity = agent.detector.rarity(every.rows)
    out = _is_far(agent, every.rows)
    assert np.allclose(rarity[out], RARITY_MAX) and np.abs(rarity[~out] - 1).max() < 0.5
    # The score is rarity + uncertainty, the model's 1 - top softmax probability for the row.
    logits = np.array([agent.predict(row).logits for row in every.rows[:40]], dtype=np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(every.scores[:40] - rarity[:40], 1 - (p / p.sum(axis=1, keepdims=True)).max(axis=1), atol=1e-5)


def test_an_upload_counts_no_inference_and_moves_no_drift_statistic(device: DataDir) -> None:
    agent = Agent(device)
    assert agent.detector is not None
    x, y = _windows(300)
    predictions = agent.predict_batch(x)
    agent.feedback(predictions[-1].id, int(y[-1]))
    agent.flush_drift()
    counters, status = agent.counters(), agent.detector.status()
    psi, recent = agent.detector.psi(), agent.telemetry(1.0)
    picked = agent.samples(DEFAULT_SAMPLE_ROWS)
    assert len(picked.rows) >= 256 and picked.labels[0] is not None
    assert agent.counters() == counters
    assert agent.detector.status() == status and np.array_equal(agent.detector.psi(), psi)
    quiet = agent.telemetry(1.0)
    assert quiet["inference"]["window_count"] == 0 and quiet["latency_ms"]["p50"] is None
    assert quiet["inference"]["count"] == recent["inference"]["count"] == 300


def test_max_rows_is_bounded() -> None:
    assert (DEFAULT_SAMPLE_ROWS, MAX_SAMPLE_ROWS) == (512, 2048)
    assert parse_command(b'{"id":"s","type":"sample_upload","args":{"max_rows":2048}}').args["max_rows"] == 2048
    with pytest.raises(MessageError, match=r"sample_upload 'max_rows' must be an integer 0\.\.2048"):
        parse_command(b'{"id":"s","type":"sample_upload","args":{"max_rows":2049}}')


def test_samples_refuses_max_rows_out_of_range(device: DataDir) -> None:
    agent = Agent(device)
    for bad in (0, MAX_SAMPLE_ROWS + 1, True):
        with pytest.raises(ValueError, match=r"max_rows must be an integer 1\.\.2048"):
            agent.samples(bad)


def test_wire_rows_are_short_and_the_same_float32() -> None:
    rng = np.random.default_rng(9)
    values = (rng.normal(size=(64, 106)) * 10.0 ** rng.integers(-30, 30, size=(64, 106))).astype(np.float32)
    values[0, :8] = [0.0, -0.0, 1e-45, -3.4028235e38, 0.1, 1806.7764, 1.17549435e-38, 16777217.0]
    n = len(values)
    picked = SampleSelection(None, values, (None,) * n, np.zeros(n, dtype=np.int64), np.full(n, 1 / 3))
    wire = picked.wire_rows()
    assert np.array_equal(np.asarray(wire, dtype=np.float32), values)  # exactly the device's float32 values
    text = json.dumps(wire, separators=(",", ":"))
    assert text.startswith("[[0.0,-0.0,1e-45,-3.4028235e+38,0.1,1806.7764,1.1754944e-38,16777216.0,")
    # As short as numpy's shortest text of each float32 (within 2%), where tolist() writes doubles.
    assert sum(len(repr(v)) for row in wire for v in row) <= 1.02 * sum(len(str(v)) for v in values.ravel())
    assert len(text) < 0.7 * len(json.dumps(values.tolist(), separators=(",", ":")))
    assert picked.wire_scores() == (0.3333,) * n


# -- the samples message ----------------------------------------------------------------------------


def _samples(**change: Any) -> dict[str, Any]:
    body = {
        "device_id": "ecu-1", "ts": TS, "command_id": "c-1", "model": ModelRef("m", 1), "feature_names": ("a", "b"),
        "rows": ((1.0, 2.0), (3.0, 4.5)), "labels": ("ok", None), "label_names": ("ok", "bad"), "scores": (0.5, 31.0),
    }  # fmt: skip
    return {**Samples(**body).to_dict(), **change}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"labels": [None]}, "samples.labels must be a list of 2 labels"),
        ({"labels": ["ok", None, None]}, "samples.labels must be a list of 2 labels"),
        ({"labels": ["worse", None]}, "samples.labels[0] must be one of label_names or null"),
        ({"labels": [None, 1]}, "samples.labels[1]"),
        ({"rows": [[1.0, 2.0], [3.0]]}, "samples.rows[1] must be a list of 2 numbers"),
        ({"rows": [[1.0, 2.0], [3.0, "4"]]}, "samples.rows[1] must be finite numbers"),
        ({"rows": [[1.0, 2.0]] * (MAX_SAMPLE_ROWS + 1)}, "samples.rows must be a list of at most 2048 rows"),
        ({"scores": [0.5]}, "samples.scores must be a list of 2 scores"),
        ({"scores": [0.5, -1]}, "samples.scores[1] must be a finite number >= 0"),
        ({"scores": [float("nan"), 0]}, "samples.scores[0] must be a finite number >= 0"),
        ({"scores": [0, float("inf")]}, "samples.scores[1]"),
        ({"label_names": ["ok", "ok"]}, "samples.label_names must be distinct names"),
        ({"label_names": ["ok", 3]}, "samples.label_names must be a list of strings"),
    ],
)
def test_a_malformed_samples_payload_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageError) as info:
        Samples.from_dict(_samples(**change))
    assert field in str(info.value)
    if all(math.isfinite(v) for v in change.get("scores", []) if isinstance(v, float)):
        with pytest.raises(MessageError, match=re.escape(field)):
            Samples.from_json(json.dumps(_samples(**change)))  # the same from the wire


def test_an_old_samples_payload_parses_as_unlabelled() -> None:
    old = {k: v for k, v in _samples().items() if k not in ("labels", "label_names", "scores")}  # an agent before issue 11
    message = Samples.from_json(json.dumps(old))
    assert message.labels == (None, None) and message.label_names == () and message.scores == (0, 0)
    assert message.rows == ((1.0, 2.0), (3.0, 4.5))
    partial = {k: v for k, v in _samples().items() if k != "scores"}
    with pytest.raises(MessageError, match=r"missing fields \['scores'\]"):
        Samples.from_dict(partial)


def test_a_full_upload_stays_a_few_megabytes(device: DataDir) -> None:
    """2 048 rows of 106 features: about 2.2 MB of JSON, which Mosquitto (no limit by default) and
    the console's bounded parser (edgeops_core._json: depth only) take whole."""
    agent = Agent(device)
    assert agent.model is not None
    x, _ = _windows(MAX_SAMPLE_ROWS)
    agent.predict_batch(x)
    big = Agent(device, drift=DriftConfig(reservoir=MAX_SAMPLE_ROWS))
    big.predict_batch(x)
    picked = big.samples(MAX_SAMPLE_ROWS)
    assert picked.model is not None
    message = Samples(
        device_id="ecu-1", ts=TS, command_id="c-1", model=ModelRef("m", 1), feature_names=picked.model.manifest.feature_names,
        rows=picked.wire_rows(), labels=picked.labels, label_names=tuple(picked.model.labels), scores=picked.wire_scores(),
    )  # fmt: skip
    payload = message.to_json()
    assert len(message.rows) == MAX_SAMPLE_ROWS and len(payload) < 3_000_000, len(payload)
    back = Samples.from_json(payload)
    assert np.array_equal(np.asarray(back.rows, dtype=np.float32), picked.rows)


# -- configuration ----------------------------------------------------------------------------------


def test_ring_and_fifo_sizes_are_configured_and_validated(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "agent.toml"

    def config(drift: str) -> Path:
        path.write_text(f'device_id = "dev-1"\ntarget = "ecu"\ndata_dir = "data"\n[drift]\n{drift}\n')
        return path

    defaults = load_config(config("")).drift
    assert (defaults.input_ring, defaults.labelled_rows) <= (1024, 256)
    loaded = load_config(config("input_ring = 64\nlabelled_rows = 0")).drift
    assert (loaded.input_ring, loaded.labelled_rows) == (64, 0)
    for text, message in [
        ("input_ring = 16385", "field 'drift.input_ring' must be an integer 0..16384, got int 16385"),
        ("input_ring = -1", "field 'drift.input_ring' must be an integer >= 0"),
        ("labelled_rows = 2049", "field 'drift.labelled_rows' must be an integer 0..2048, got int 2049"),
        ('labelled_rows = "many"', "field 'drift.labelled_rows' must be an integer"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(config(text))
        assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ValueError, match=r"input_ring must be 0\.\.16384"):
        DriftConfig(input_ring=1 << 15)


# -- over MQTT --------------------------------------------------------------------------------------


def test_sample_upload_over_mosquitto_carries_labels(tmp_path: Path, built: Built, broker: Broker) -> None:
    dev = _device(tmp_path, built, broker, "ecu-fs", interval=5.0)
    dev.start()
    console = Collector(broker, "ecu-fs").start()
    try:
        console.wait(lambda c: any(s["online"] for s in c.of("state")), what="online")
        x, y = _windows(12)
        sock = dev.socket()
        answers = [_ask(sock, {"op": "predict", "features": row.tolist()}) for row in x]
        label_names = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"]).labels
        for i in (2, 9):
            done = _ask(sock, {"op": "feedback", "prediction_id": answers[i]["prediction_id"], "label": label_names[int(y[i])]})
            assert done["ok"], done
        sock.close()
        command = {"id": "up-1", "type": "sample_upload", "args": {"max_rows": 6}}
        console.client.publish("edgeops/v1/ecu-fs/cmd", json.dumps(command), qos=1)
        console.wait(lambda c: len(c.of("samples")) == 1, what="samples")
        payload = console.of("samples")[0]
        _validate("Samples", payload)
        message = Samples.from_dict(payload)
        assert message.command_id == "up-1" and message.label_names == tuple(label_names)
        assert message.labels[:2] == (label_names[int(y[9])], label_names[int(y[2])]) and message.labels[2:] == (None,) * 4
        assert np.array_equal(np.asarray(message.rows[:2], dtype=np.float32), x[[9, 2]])
        assert len(message.rows) == len(message.scores) == 6 and all(len(r) == 106 for r in message.rows)
        console.wait(
            lambda c: any(e["type"] == "command_done" and e["detail"]["id"] == "up-1" for e in c.of("events")), what="done"
        )
        done_event = next(e for e in console.of("events") if e["type"] == "command_done" and e["detail"]["id"] == "up-1")
        assert done_event["detail"]["rows"] == 6 and done_event["detail"]["labelled"] == 2
    finally:
        console.stop()
        assert "Traceback" not in dev.stop()
