"""Issue 9 on the device: ``[tags]`` in the state, ``inference.predicted`` in telemetry, the fault knob.

In-process checks use the real :class:`~edgeops_agent.Agent` on the session's one built
bundle; the end-to-end one runs a real ``edgeops-agent run`` against a real Mosquitto with
the rig of tests/test_ota_agent.py (no new model build).
"""

# ruff: noqa: F811 - the imported fixtures are requested by name as parameters

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from broker import Broker
from conftest import REPO, Built, run_agent
from edgeops_agent.agent import DRIFT_BATCH, Agent
from edgeops_agent.config import load_config
from edgeops_agent.errors import ConfigError
from edgeops_agent.fault import FAULT_ENV, InjectedFaultError, parse_fault
from edgeops_agent.install import install_bundle
from edgeops_agent.store import DataDir
from edgeops_core import MessageError, State, Telemetry
from test_ota_agent import FAST, Console, Device, _final, _online, releases  # noqa: F401

ASYNCAPI = json.loads((REPO / "docs" / "asyncapi.json").read_text())
OUTBOX = {"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0}


def _validate(kind: str, payload: dict[str, Any]) -> None:
    jsonschema.validate(payload, {**ASYNCAPI["components"]["schemas"][kind], "components": ASYNCAPI["components"]})


def _config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "dev-1"\ntarget = "ecu"\ndata_dir = "data"\n{extra}')
    return path


# -- [tags] ------------------------------------------------------------------------------------


def test_tags_are_read_and_validated_naming_the_key(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, '[tags]\nsite = "plant-a"\nline = "3"\n'))
    assert dict(config.tags) == {"site": "plant-a", "line": "3"}
    assert dict(load_config(_config(tmp_path)).tags) == {}
    bad = {
        "site = 3": "tags.site must be a string",
        'site = "plant a"': "tags.site must be a string of 1-64 characters",
        'site = ""': "tags.site",
        f'site = "{"x" * 65}"': "tags.site",
        '"bad key" = "x"': "tags key must be 1-64 characters",
        "site = { a = 1 }": "tags.site",
        "\n".join(f'k{i} = "v"' for i in range(33)): "at most 32 tags",
    }
    for body, fragment in bad.items():
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_config(_config(tmp_path, f"[tags]\n{body}\n"))
    with pytest.raises(ConfigError, match="tags"):
        load_config(_config(tmp_path, 'tags = "site=a"\n'))


def test_a_bad_tag_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    proc = run_agent("run", "--config", _config(tmp_path, '[tags]\nsite = "a/b"\n'))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "tags.site" in proc.stderr


def test_state_tags_round_trip_and_an_older_state_without_them_parses() -> None:
    head = {"device_id": "ecu-1", "ts": None, "online": True, "agent_version": "0.1.0", "target": "ecu", "runtime": None}
    body = {**head, "bundle": None, "health": "no_model", "last_error": None, "ota": None}
    state = State(**body, tags={"site": "a", "line": "3"})
    payload = state.to_dict()
    _validate("State", payload)
    assert payload["tags"] == {"site": "a", "line": "3"} and State.from_json(state.to_json()) == state
    old = State.from_dict({"schema": 1, **body})  # an agent from before issue 9
    assert dict(old.tags) == {} and old.to_dict()["tags"] == {}


# -- inference.predicted -----------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path, built: Built) -> Agent:
    data = DataDir(tmp_path / "dev")
    data.add_trusted_key(built.public_key)
    install_bundle(data, built.bundle, target="ecu")
    return Agent(data)


def _rows(agent: Agent, n: int) -> np.ndarray:
    assert agent.model is not None
    rng = np.random.default_rng(7)
    return rng.normal(size=(n, agent.model.n_features)).astype(np.float32) * 3


def test_predicted_counts_every_prediction_of_the_interval_by_label(agent: Agent) -> None:
    assert agent.model is not None
    rows = _rows(agent, DRIFT_BATCH + 51)
    chosen = [agent.predict(r).class_index for r in rows[:7]]  # single rows, then batches across the drift buffer
    chosen += [p.class_index for p in agent.predict_batch(rows[7 : 7 + DRIFT_BATCH])]
    chosen += [p.class_index for p in agent.predict_batch(rows[7 + DRIFT_BATCH :])]
    record = agent.telemetry(10.0)
    predicted = record["inference"]["predicted"]
    assert len(predicted) == len(agent.model.labels)
    assert sum(predicted) == record["inference"]["window_count"] == len(rows)
    want = collections.Counter(chosen)
    assert predicted == [want.get(i, 0) for i in range(len(predicted))]
    message = Telemetry.from_dict({**record, "outbox": OUTBOX})
    _validate("Telemetry", message.to_dict())
    assert Telemetry.from_json(message.to_json()) == message
    again = agent.telemetry(10.0)  # the next interval starts from zero
    assert again["inference"]["window_count"] == 0 and sum(again["inference"]["predicted"]) == 0
    agent.predict(rows[0])
    assert sum(agent.telemetry(10.0)["inference"]["predicted"]) == 1


def test_predicted_is_validated_and_optional() -> None:
    base = {
        "device_id": "ecu-1", "ts": None, "interval_s": 1.0, "model": None,
        "latency_ms": dict.fromkeys(("p50", "p95", "p99", "max")), "drift": None,
        "resources": {"rss_bytes": 1.0, "cpu_percent": 0.0}, "outbox": OUTBOX,
    }  # fmt: skip
    inference = {"count": 3, "window_count": 3, "errors": {}, "error_count": 0}
    for extra in ({}, {"predicted": None}, {"predicted": [1, 0, 2]}):
        message = Telemetry.from_dict({"schema": 1, **base, "inference": {**inference, **extra}})
        _validate("Telemetry", message.to_dict())
        assert Telemetry.from_json(message.to_json()) == message
    for bad in ([-1], [1.5], "3", [True], [0] * 4097):
        with pytest.raises(MessageError, match="predicted"):
            Telemetry.from_dict({"schema": 1, **base, "inference": {**inference, "predicted": bad}})


# -- the fault knob ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "release=2",
        "latency_ms=5",
        "release=0,latency_ms=5",
        "release=2,latency_ms=-1",
        "release=2,latency_ms=inf",
        "release=2,error_rate=1.5",
        "release=2,error_rate=x",
        "release=2,error_rate=0.1,error_rate=0.2",
        "release=2,speed=3",
        "release=2;latency_ms=5",
        "release=2,latency_ms=",
    ],
)
def test_a_malformed_fault_knob_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=FAULT_ENV):
        parse_fault(text)


def test_a_malformed_fault_knob_refuses_to_start_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "release=two,error_rate=0.5")
    proc = run_agent("run", "--config", _config(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and FAULT_ENV in proc.stderr and "release=two" in proc.stderr


def test_the_fault_knob_slows_and_fails_only_its_release(agent: Agent) -> None:
    rows = _rows(agent, 200)
    agent.injected_fault = parse_fault("release=2,latency_ms=50,error_rate=1")  # not the active release
    assert all(p.latency_ms < 50 for p in agent.predict_batch(rows[:20]))
    agent.telemetry(1.0)

    agent.injected_fault = parse_fault("release=1,error_rate=0.25")
    failed = 0
    for row in rows:
        try:
            agent.predict(row)
        except InjectedFaultError:
            failed += 1
    assert 25 <= failed <= 75  # about a quarter, from a seeded generator
    again = parse_fault("release=1,error_rate=0.25")  # the same seed: the same draws
    draws = 0
    for _ in rows:
        try:
            again.apply()
        except InjectedFaultError:
            draws += 1
    assert draws == failed
    agent.injected_fault = parse_fault("release=1,error_rate=1")
    with pytest.raises(InjectedFaultError):
        agent.predict_batch(rows[:3])  # one failing row fails the batch, counted once
    record = agent.telemetry(1.0)
    assert record["inference"]["errors"] == {"runtime": failed + 1}
    assert record["inference"]["window_count"] == len(rows) - failed

    agent.injected_fault = parse_fault("release=1,latency_ms=5")
    assert all(agent.predict(r).latency_ms >= 5 for r in rows[:3])
    assert agent.telemetry(1.0)["latency_ms"]["p50"] >= 5


# -- end to end: a real agent, a real broker ---------------------------------------------------


class _Listener(Console):
    """The test_ota_agent console, keeping every telemetry message too."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.telemetry: list[dict[str, Any]] = []
        super().__init__(broker, device)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/telemetry"):
            with self._lock:
                self.telemetry.append(json.loads(msg.payload))
        super()._on_message(client, userdata, msg)


def test_a_real_agent_reports_tags_and_predictions_and_its_fault_fails_the_faulty_release(
    tmp_path: Path, built: Built, broker: Broker, releases: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = Device(tmp_path, built, broker, "ecu-7", FAST + '[tags]\nsite = "plant-a"\nline = "3"\n')
    dev.config.write_text(dev.config.read_text().replace("interval_s = 5", "interval_s = 0.5"))
    console = _Listener(broker, "ecu-7")
    monkeypatch.setenv(FAULT_ENV, "release=2,error_rate=1")
    try:
        dev.start()
        console.wait(_online(console), "online state")
        state = console.states[-1]
        assert state["tags"] == {"site": "plant-a", "line": "3"}
        _validate("State", state)
        assert all(r["ok"] for r in dev.predict(40))  # release 1: the fault is not for it

        def counted() -> int:
            with console._lock:
                return sum(sum(t["inference"]["predicted"] or []) for t in console.telemetry)

        console.wait(lambda: counted() >= 40, "40 predictions in telemetry")
        with console._lock:
            for t in console.telemetry:
                _validate("Telemetry", t)
                assert sum(t["inference"]["predicted"]) == t["inference"]["window_count"], t["inference"]
                assert not t["inference"]["errors"]

        deploy = console.serve(releases["r2"], "d-faulty", built.public_key, block_size=16384)
        console.send_deploy(deploy)
        final = _final(console, dev, "d-faulty")  # the trial's live inferences fail: the device's own check
        assert (final["type"], final["detail"]["reason"]) == ("ota_rolled_back", "health_check"), final
        assert "'runtime'" in final["detail"]["message"]
        assert all(r["ok"] for r in dev.predict(5))  # release 1 again, untouched by the knob
        console.wait(lambda: any(t["inference"]["errors"].get("runtime") for t in console.telemetry), "runtime errors")
    finally:
        dev.stop()
        console.close()
