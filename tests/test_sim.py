"""firmware-sim (issue 10): the fleet simulator against a real Mosquitto, its scenario checks,
its physics, its import boundary, and the agent's feedback API it drives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker import Broker
from conftest import REPO, Built
from edgeops_agent.agent import FEEDBACK_RING, Agent
from edgeops_agent.errors import FeedbackError
from edgeops_agent.install import install_bundle
from edgeops_agent.server import EndpointServer, recv_frame, send_frame
from edgeops_agent.store import DataDir
from edgeops_core import MessageError
from edgeops_core.messages import Telemetry
from edgeops_sim.physics import Sensors, load_generator
from edgeops_sim.proxy import NetworkLink
from test_ota_agent import resign

SIM = [sys.executable, "-c", "from edgeops_sim.cli import main; main()"]
SMALL = REPO / "examples" / "scenarios" / "small.toml"
GENERATOR = REPO / "examples" / "vibration" / "vibration_data.py"


def _sim(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIM, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


# -- the small scenario, end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(built: Built, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    if os.geteuid() != 0:
        pytest.skip("the scenario's disk_full fault mounts a tmpfs (root only)")
    tmp = tmp_path_factory.mktemp("sim")
    update = resign(built, tmp, "r2", {"release": 2, "version": "1.1.0"})
    out = tmp / "run"
    proc = _sim(
        "run", SMALL, "--bundle", built.bundle, "--key", built.public_key, "--update-bundle", update, "--out", out, "--json"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout), out


def test_small_scenario_every_device_ends_serving_and_nothing_is_lost(small_run: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    """Must show: 10 devices through every fault, all serving at the end, nothing lost at the
    outside subscriber: every seq an agent assigned arrived, except retained states that a newer
    state replaced before it was sent (the state lane coalesces; the agent counts them)."""
    summary, out = small_run
    saved = json.loads((out / "summary.json").read_text())
    assert summary["devices"] == 10 and summary["serving_at_end"] == 10 and summary["ok"]
    for device, row in saved["per_device"].items():
        assert row["serving_at_end"], device
        assert row["assigned"] > 0 and row["pending"] == 0 and row["lost"] == 0, (device, row)
        assert row["missing_seqs"] == row["superseded"] <= 3, (device, row)  # seqs 1..last: only replaced states missing
        assert row["dropped"] == 0 or device == "sim-0006", (device, row)
        # ~1 telemetry per second (the killed device and the full disk lose a few intervals).
        assert row["telemetry"] >= summary["duration_s"] - 10, (device, row)
        assert row["predictions"] >= 0.8 * 20 * summary["duration_s"] * (0.85 if device == "sim-0005" else 1), (device, row)
    m = summary["messages"]
    assert m["lost"] == 0 and m["received"] + m["superseded"] == m["assigned"]


def test_small_scenario_drift_alarms_on_the_drifted_cohort_only(small_run: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    summary, out = small_run
    loose, base = summary["cohorts"]["loose-mount"], summary["cohorts"]["baseline"]
    assert loose["drifted"] and loose["drift_start_s"] == 10
    assert loose["devices_alarmed_after_drift"] == 3
    assert loose["alarm_delay_s"]["max"] < 15
    per_device = json.loads((out / "summary.json").read_text())["per_device"]
    # False alarms are counted, from the alarms the outside subscriber saw.
    counted = sum(len(per_device[d]["drift_alarms_at_s"]) for d in per_device if per_device[d]["cohort"] == "baseline")
    assert base["false_alarms"] == counted
    assert base["false_alarms"] <= 1
    # The truth is in the output: the timelines carry each device's quantities over time.
    rows = [json.loads(line) for line in (out / "devices" / "sim-0001" / "timeline.jsonl").read_text().splitlines()]
    assert {r["quantities"]["sensor_gain"] for r in rows if r["t"] < 9} == {1.0}
    assert {r["quantities"]["sensor_gain"] for r in rows if r["t"] > 11} == {1.6}
    assert rows[-1]["drift_alarm"] is True
    assert summary["truth"]["drifts"] == [
        {"cohort": "loose-mount", "quantity": "sensor_gain", "kind": "abrupt", "start_s": 10.0, "to": 1.6}
    ]


def test_small_scenario_reports_every_fault_with_its_time(small_run: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    summary, out = small_run
    faults = summary["faults"]
    begun = {(f["kind"], f.get("device")): f["t"] for f in faults if f["phase"] == "begin"}
    ended = {(f["kind"], f.get("device")): f["t"] for f in faults if f["phase"] == "end"}
    expected = {
        ("clock_skew", "sim-0007"): 3,
        ("network_cut", "sim-0004"): 5,
        ("broker_restart", None): 12,
        ("agent_kill", "sim-0005"): 19,
        ("disk_full", "sim-0006"): 24,
        ("ota_corrupt_block", "sim-0008"): 8,
    }
    assert set(begun) == set(expected)
    for key, at in expected.items():
        assert at <= begun[key] < at + 1.5, (key, begun[key])
    assert set(ended) == set(expected) - {("clock_skew", "sim-0007")}
    # The killed device's process was started again, and counted.
    assert summary["host_restarts"] == {"solo-sim-0005": 1}
    # Over the air: a corrupted block was refused and asked for again, a transfer cut by
    # SIGKILL was resumed; both updates committed, and only those two devices moved.
    updates = {u["device"]: u for u in summary["updates"]}
    assert {d: u["outcome"] for d, u in updates.items()} == {"sim-0005": "committed", "sim-0008": "committed"}
    assert updates["sim-0008"]["corrupted_sent"] == 1 and updates["sim-0008"]["blocks_sent"] > updates["sim-0008"]["blocks"]
    kill = next(f for f in faults if f["kind"] == "agent_kill" and f["phase"] == "begin")
    assert kill["during_ota"] and 1 <= kill["blocks_sent_before_kill"] < kill["blocks"]
    assert updates["sim-0005"]["blocks_sent"] <= 1.1 * updates["sim-0005"]["blocks"] + 1  # resumed, not started over
    per_device = json.loads((out / "summary.json").read_text())["per_device"]
    # The full disk: telemetry intervals the agent could not store are counted by it (dropped).
    assert per_device["sim-0006"]["dropped"] >= 3
    # The skewed clock shows in its messages' times (excluded from the fleet's ingest latency).
    assert per_device["sim-0007"]["ingest_latency_p50_s"] < -80
    assert abs(per_device["sim-0001"]["ingest_latency_p50_s"]) < 1
    # Late labels reached the agents through the feedback API.
    assert all(r["labels_sent"] > 80 for r in per_device.values())
    assert {d: r["release"] for d, r in per_device.items()} == {d: 2 if d in ("sim-0005", "sim-0008") else 1 for d in per_device}
    # Labels for predictions of the replaced model (or of the killed run) are refused, nothing else.
    rejected = {d for d, r in per_device.items() if r["labels_rejected"]}
    assert rejected <= {"sim-0005", "sim-0008"}


# -- bad scenarios ----------------------------------------------------------------------------

GOOD = """
[fleet]
devices = 4
duration_s = 10
generator = "{generator}"
bundle = "{bundle}"
trust = "{trust}"

[[cohort]]
name = "hot"
devices = 2

[[drift]]
cohort = "hot"
quantity = "load"
kind = "gradual"
start_s = 2
to = 2.0
ramp_s = 5

[[fault]]
kind = "network_cut"
at_s = 1
device = "sim-0003"
duration_s = 2
"""


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("devices = 4", "devices = -4"), "fleet.devices"),
        (("duration_s = 10", "duration_s = 10\nspeed = 3"), "speed in 'fleet'"),
        (("duration_s = 10", 'duration_s = "ten"'), "fleet.duration_s"),
        (('quantity = "load"', 'quantity = "humidity"'), "drift[0].quantity"),
        (("to = 2.0", "to = 99.0"), "drift[0].to"),
        (('kind = "gradual"', 'kind = "sudden"'), "drift[0].kind"),
        (("ramp_s = 5", "period_s = 5"), "'ramp_s' in 'drift[0]'"),
        (("ramp_s = 5", "ramp_s = 5\nperiod_s = 5"), "drift[0].period_s"),
        (('cohort = "hot"', 'cohort = "cold"'), "drift[0].cohort"),
        (("at_s = 1", "at_s = 30"), "fault[0].at_s"),
        (('device = "sim-0003"', 'device = "sim-0009"'), "fault[0].device"),
        (("duration_s = 2", "duration_s = 9"), "fault[0].duration_s"),
        (('kind = "network_cut"', 'kind = "meteor"'), "fault[0].kind"),
        (("devices = 2", "devices = 5"), "cohort[0].devices"),
        (("[fleet]", "[fleet\n"), "scenario"),
    ],
)
def test_a_bad_scenario_is_one_line_naming_the_key_and_exit_2(
    built: Built, tmp_path: Path, change: tuple[str, str], key: str
) -> None:
    text = GOOD.format(generator=GENERATOR, bundle=built.bundle, trust=built.public_key)
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(*change, 1))
    proc = _sim("run", path, "--out", tmp_path / "out", timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_options_are_exit_2(built: Built, tmp_path: Path) -> None:
    text = GOOD.format(generator=GENERATOR, bundle=built.bundle, trust=built.public_key)
    path = tmp_path / "ok.toml"
    path.write_text(text + '\n[[fault]]\nkind = "broker_restart"\nat_s = 3\ndown_s = 1\n')
    for args, words in (
        (("--broker", "mqtt://127.0.0.1:1"), "broker_restart"),
        (("--broker", "http://x"), "mqtt://"),
        (("--bundle", tmp_path / "missing.edgeops"), "fleet.bundle"),
    ):
        proc = _sim("run", path, "--out", tmp_path / "out", *args, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    proc = _sim("run", path, "--out", tmp_path / "full", timeout=60)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    proc = _sim("run", tmp_path / "none.toml", timeout=60)
    assert proc.returncode == 2 and "none.toml" in proc.stderr


# -- the import boundary ----------------------------------------------------------------------


def test_firmware_sim_imports_nothing_host_side() -> None:
    """edgeops_sim depends on edgeops_agent and edgeops_core only: no torch, no toolchain, no console."""
    code = (
        "import sys, pathlib\n"
        "import edgeops_sim.cli, edgeops_sim.runner, edgeops_sim.host, edgeops_sim.observer, edgeops_sim.proxy\n"
        "from edgeops_sim.physics import load_generator\n"
        f"load_generator(pathlib.Path({str(GENERATOR)!r}))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'tensorflow', 'onnx', 'edgeops_toolchain', 'edgeops_fleet', 'sqlalchemy', 'starlette', 'litert_torch'))\n"
        "print(bad)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- physics ----------------------------------------------------------------------------------


def test_physics_at_nominal_draws_the_reference_distribution_and_quantities_act() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("vib_for_test", GENERATOR)
    assert spec is not None and spec.loader is not None
    vib = importlib.util.module_from_spec(spec)
    sys.modules["vib_for_test"] = vib
    spec.loader.exec_module(vib)
    gen = load_generator(GENERATOR)
    sensors = Sensors(gen, seed=3)
    x, y = sensors.batch([{}] * 4000)
    ref, _ = vib.generate(4000, 5)
    z = np.abs(x.mean(0) - ref.mean(0)) / ref.std(0)
    assert z.max() < 0.12  # the same distribution as the training data, feature by feature
    assert np.bincount(y, minlength=5).min() > 650  # five conditions, evenly
    _worn, worn_y = sensors.batch([{"bearing_wear": 0.8}] * 2000)
    assert 0.75 < np.mean(worn_y == 3) < 0.85
    loud, _ = sensors.batch([{"sensor_gain": 2.0}] * 2000)
    rms = next(i for i, n in enumerate(vib.feature_names()) if n == "x_log_rms")
    assert abs((loud[:, rms].mean() - x[:, rms].mean()) - np.log10(2.0)) < 0.03  # log RMS moves by log10(gain)
    fast, _ = sensors.batch([{"shaft_rpm": 2700.0}] * 500)
    assert fast[:, -1].min() >= 2100 and fast[:, -1].max() <= 3300
    # one call, many devices with their own quantities
    mixed, _ = sensors.batch([{"shaft_rpm": 1000.0}, {"shaft_rpm": 5000.0}] * 50)
    assert mixed[0::2, -1].max() <= 1600 and mixed[1::2, -1].min() >= 4400


def test_network_link_drops_connections_and_refuses_new_ones_until_restored() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        link = NetworkLink("127.0.0.1", server.getsockname()[1])
        try:
            client = socket.create_connection(("127.0.0.1", link.port), timeout=5)
            peer, _ = server.accept()
            client.sendall(b"ping")
            assert peer.recv(4) == b"ping"
            link.cut()
            client.settimeout(5)
            assert client.recv(10) == b""  # dropped
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", link.port), timeout=5)
            link.restore()
            again = socket.create_connection(("127.0.0.1", link.port), timeout=5)
            peer2, _ = server.accept()
            peer2.sendall(b"pong")
            again.settimeout(5)
            assert again.recv(4) == b"pong"
            for s in (client, peer, again, peer2):
                s.close()
        finally:
            link.close()


# -- the agent's feedback API -----------------------------------------------------------------


@pytest.fixture(scope="module")
def device(built: Built, tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    data = DataDir(tmp_path_factory.mktemp("feedback") / "device")
    data.add_trusted_key(built.public_key)
    install_bundle(data, built.bundle, target="ecu")
    return data


def _windows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return Sensors(load_generator(GENERATOR), seed).batch([{}] * n)


def test_feedback_counts_labelled_and_correct_in_telemetry(device: DataDir) -> None:
    agent = Agent(device)
    x, y = _windows(200)
    predictions = [agent.predict(row) for row in x]
    assert len({p.id for p in predictions}) == 200
    right = [agent.feedback(p.id, int(t)) for p, t in zip(predictions[:150], y[:150], strict=True)]
    assert right == [p.class_index == int(t) for p, t in zip(predictions[:150], y[:150], strict=True)]
    by_name = agent.feedback(predictions[150].id, agent.model.labels[int(y[150])])  # type: ignore[union-attr]
    assert by_name == (predictions[150].class_index == int(y[150]))
    with pytest.raises(FeedbackError, match="has its label already"):
        agent.feedback(predictions[0].id, int(y[0]))
    with pytest.raises(FeedbackError, match="not one of the model's labels"):
        agent.feedback(predictions[151].id, "melted")
    with pytest.raises(FeedbackError, match="unknown here"):
        agent.feedback(predictions[-1].id + 1, 0)  # not made yet
    with pytest.raises(FeedbackError, match="integer"):
        agent.feedback("7", 0)  # type: ignore[arg-type]
    fb = agent.telemetry(1.0)["inference"]["feedback"]
    assert fb == {"labelled": 151, "correct": sum(right) + by_name, "rejected": 4}
    Telemetry.from_dict({**_telemetry_shell(agent), "inference": {**agent.telemetry(1.0)["inference"]}})
    assert agent.telemetry(1.0)["inference"]["feedback"] == {"labelled": 0, "correct": 0, "rejected": 0}  # per interval


OUTBOX = {"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0}


def _telemetry_shell(agent: Agent) -> dict:  # type: ignore[type-arg]
    """A telemetry message as the daemon sends it (the agent's record and the outbox counters)."""
    return {**agent.telemetry(1.0), "outbox": OUTBOX}


def test_feedback_for_another_run_or_an_old_prediction_is_refused(device: DataDir) -> None:
    first = Agent(device)
    x, _ = _windows(4)
    old = first.predict(x[0])
    second = Agent(device)  # a restarted agent: ids of the previous run are not its own
    with pytest.raises(FeedbackError):
        second.feedback(old.id, 0)
    batch = second.predict_batch(np.repeat(x[:1], FEEDBACK_RING + 10, axis=0))
    assert [p.id for p in batch] == list(range(batch[0].id, batch[0].id + FEEDBACK_RING + 10))
    with pytest.raises(FeedbackError, match="unknown here"):
        second.feedback(batch[5].id, 0)  # fell out of the ring
    assert second.feedback(batch[-1].id, batch[-1].class_index) is True


def test_feedback_over_the_socket(device: DataDir, tmp_path: Path) -> None:
    agent = Agent(device)
    server = EndpointServer(tmp_path / "agent.sock", agent)
    server.start()
    try:
        x, _ = _windows(1)

        def ask(request: object) -> dict:  # type: ignore[type-arg]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(server.path))
                send_frame(sock, request)
                payload = recv_frame(sock)
            assert payload is not None
            return json.loads(payload)  # type: ignore[no-any-return]

        p = ask({"op": "predict", "features": x[0].tolist(), "id": "a"})
        assert p["ok"] and isinstance(p["prediction_id"], int)
        done = ask({"op": "feedback", "prediction_id": p["prediction_id"], "label": p["label"], "id": "b"})
        assert done == {"ok": True, "id": "b", "correct": True}
        again = ask({"op": "feedback", "prediction_id": p["prediction_id"], "label": p["label"], "id": "c"})
        assert again["ok"] is False and again["error"]["type"] == "FeedbackError"
        bad = ask({"op": "feedback", "prediction_id": "x", "label": 0})
        assert bad["ok"] is False and bad["error"]["type"] == "FeedbackError"
    finally:
        server.stop()


def test_telemetry_feedback_is_validated(device: DataDir) -> None:
    agent = Agent(device)
    raw = _telemetry_shell(agent)
    for bad in ({"labelled": 1, "correct": 2, "rejected": 0}, {"labelled": -1, "correct": 0, "rejected": 0}, {"labelled": 1}):
        with pytest.raises(MessageError, match="feedback"):
            Telemetry.from_dict({**raw, "inference": {**raw["inference"], "feedback": bad}})


def test_a_broker_whose_port_another_process_took_fails_instead_of_using_the_stranger(broker: Broker, tmp_path: Path) -> None:
    """A port is free when chosen, not reserved: if someone else listens there by the start, our
    mosquitto exits and the start says so, rather than letting the test talk to the stranger."""
    from edgeops_sim.errors import SimError

    second = Broker(tmp_path / "second")
    conf = second.conf.read_text().replace(f"listener {second.port} ", f"listener {broker.port} ")
    second.conf.write_text(conf)
    second.port = broker.port
    with pytest.raises(SimError, match=rf"did not listen on {broker.port}"):
        second.start()
    assert second.proc is None
    socket.create_connection((broker.host, broker.port), timeout=2).close()  # the first one is untouched
