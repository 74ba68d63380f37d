"""The fleet console end to end (issue 9's must-show): five real agents, a real Mosquitto,
``edgeops fleet serve`` as a subprocess, and rollouts started with the real CLI.

One module-scoped fleet runs the whole story, in order, because each step starts from where
the last one left the devices (release 1 → 2 → a failed 3):

1. a good release (2) passes every wave; the console is killed with SIGKILL between waves
   and restarted; the rollout resumes, every device ends on release 2 with exactly one
   final OTA event, and the console's history holds every telemetry message an outside
   subscriber saw, including those sent while it was down (no seq gaps);
2. a release that fails the error gate (3, with the documented test-only fault knob
   ``EDGEOPS_AGENT_FAULT`` making its predictions fail) stops after its first wave: that
   wave's device is back on release 2, no other device was offered it, and the release is
   marked bad, so a second rollout of it is refused.

Devices predict continuously on fresh windows of the example's generator (a thread each, over
the agent's socket), so the gates see real inferences; telemetry goes out every second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import Broker, free_port
from conftest import AGENT, EDGEOPS, EXAMPLE, Built
from edgeops_agent.install import install_bundle
from edgeops_agent.server import recv_frame, send_frame
from edgeops_agent.store import DataDir
from test_ota_agent import resign

pytestmark = pytest.mark.slow

DEVICES = [f"e2e-{i}" for i in range(5)]


def field_rows(seed: int, n: int = 3000) -> list[list[float]]:
    """Fresh windows from the example's generator: what a healthy machine sends (no drift)."""
    spec = importlib.util.spec_from_file_location(f"vibration_data_e2e_{seed}", EXAMPLE / "vibration_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    x, _ = module.generate(n, seed)
    return [[float(v) for v in row] for row in x]


FAULT = "release=3,error_rate=0.5"


class FleetDevice:
    """One ``edgeops-agent run`` process with a thread that keeps predicting."""

    def __init__(self, tmp: Path, built: Built, broker: Broker, name: str, site: str) -> None:
        self.name, self.data = name, tmp / name
        device = DataDir(self.data)
        device.add_trusted_key(built.public_key)
        install_bundle(device, built.bundle, target="ecu")
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            f'device_id = "{name}"\ntarget = "ecu"\ndata_dir = "{name}"\n'
            f"[mqtt]\nport = {broker.port}\nkeepalive_s = 2\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n"
            "[telemetry]\ninterval_s = 1\n"
            "[ota]\nhealth_inferences = 0\ntrial_timeout_s = 20\nretry_initial_s = 0.5\nlatency_budget_ms = 200\n"
            f'[tags]\nsite = "{site}"\n'
        )
        self.log = tmp / f"{name}.log"
        self.rows = field_rows(seed=len(name) * 1000 + int(name.rsplit("-", 1)[1]))
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.predictions = 0

    def start(self) -> None:
        env = {**os.environ, "EDGEOPS_AGENT_FAULT": FAULT}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*AGENT, "run", "--config", str(self.config)], stdout=subprocess.DEVNULL, stderr=log, env=env
            )
        self._thread = threading.Thread(target=self._predict_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _predict_forever(self) -> None:
        path, i = self.data / "agent.sock", 0
        while not self._stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(str(path))
                    while not self._stop.is_set():
                        send_frame(s, {"op": "predict", "features": self.rows[i % len(self.rows)]})
                        recv_frame(s)
                        i += 1
                        self.predictions += 1
                        time.sleep(0.02)
            except OSError:  # not up yet, or restarting its model: try again
                time.sleep(0.1)


class Watcher:
    """An outside subscriber that records every telemetry (device, seq) and final OTA event."""

    def __init__(self, broker: Broker) -> None:
        self.telemetry: set[tuple[str, int]] = set()
        self.finals: list[dict[str, Any]] = []
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-watcher", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("edgeops/v1/+/telemetry", 1), ("edgeops/v1/+/events", 1), ("edgeops/v1/+/cmd", 1)]
        )
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device, leaf = msg.topic.split("/")[2:4]
        doc = json.loads(msg.payload)
        with self._lock:
            if leaf == "telemetry":
                self.telemetry.add((device, int(doc["seq"])))
            elif leaf == "events" and doc["type"] in ("ota_committed", "ota_rolled_back", "ota_failed"):
                self.finals.append(doc)
            elif leaf == "cmd":
                self.commands.append((device, doc))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ServeProcess:
    """``edgeops fleet serve`` as users run it."""

    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            *EDGEOPS,
            "fleet",
            "serve",
            "--broker",
            f"mqtt://127.0.0.1:{broker.port}",
            "--db",
            f"sqlite:///{tmp / 'console.sqlite'}",
            "--http",
            f"127.0.0.1:{self.port}",
            "--bundles",
            str(tmp / "console-bundles"),
        ]
        self.log = tmp / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A home of its own: the module fixture starts before the per-test EDGEOPS_HOME is set,
        # and the runner's ~/.edgeops is shared with whatever else runs beside the suite.
        env = {**os.environ, "EDGEOPS_HOME": str(self.log.parent / "console-home")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.get("/api/health") is not None, 60, "the console's HTTP API")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*EDGEOPS, "fleet", *args, "--console", self.url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def wait_for(check: Callable[[], Any], timeout: float, what: str, show: Callable[[], Any] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    seen = "" if show is None else f"; last seen: {json.dumps(show(), indent=1, default=str)[:6000]}"
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{seen}")


class Fleet:
    def __init__(self, tmp: Path, built: Built, broker: Broker) -> None:
        self.tmp, self.built, self.broker = tmp, built, broker
        self.devices = [FleetDevice(tmp, built, broker, d, "north" if i < 3 else "south") for i, d in enumerate(DEVICES)]
        self.watcher = Watcher(broker)
        self.console = ServeProcess(tmp, broker)

    def devices_view(self) -> dict[str, dict[str, Any]]:
        rows = self.console.get("/api/devices") or {}
        listed = rows.get("devices", rows) if isinstance(rows, dict) else rows
        return {r["device_id"]: r for r in listed}

    def releases(self) -> dict[str, int | None]:
        return {d: r.get("release") for d, r in self.devices_view().items()}

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """The rollout's status; ``{}`` while the console does not answer (restarting, or slow
        on a loaded machine: the polls retry)."""
        doc = self.console.get(f"/api/rollouts/{rollout_id}")
        return doc if isinstance(doc, dict) else {}


def rollout_state(doc: dict[str, Any]) -> str:
    return str(doc.get("rollout", doc)["state"])


def passed_waves(doc: dict[str, Any]) -> int:
    if not doc:
        return 0
    return sum(1 for w in doc.get("waves", []) if w.get("passed") is True)


@pytest.fixture(scope="module")
def fleet(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-e2e")
    broker = Broker(tmp / "broker")
    broker.start()
    try:
        f = Fleet(tmp, built, broker)
    except BaseException:
        broker.stop()
        raise
    try:
        for d in f.devices:
            d.start()
        f.console.start()
        wait_for(lambda: set(f.releases().items()) == {(d, 1) for d in DEVICES}, 90, "five devices online on release 1")
        yield f
    finally:
        f.console.stop()
        for d in f.devices:
            d.stop()
        f.watcher.close()
        broker.stop()


def test_good_release_passes_every_wave_across_a_console_kill(fleet: Fleet, built: Built) -> None:
    bundle = resign(built, fleet.tmp, "good", {"release": 2, "version": "1.1.0"})
    start = fleet.console.cli(
        "rollout", "start", str(bundle), "--group", "target=ecu", "--waves", "1,2,100%", "--soak", "4s",
        "--key", str(built.public_key), "--gate", "min_inferences=20", "--gate", "latency_p99_ms=200", "--json",
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    rollout_id = json.loads(start.stdout)["rollout"]["rollout_id"]

    # Kill -9 the console once the first wave has passed, keep it down while telemetry flows.
    wait_for(lambda: passed_waves(fleet.rollout(rollout_id)) >= 1, 90, "wave 1 to pass", lambda: fleet.rollout(rollout_id))
    fleet.console.kill()
    down_from = len(fleet.watcher.telemetry)
    time.sleep(4)
    assert len(fleet.watcher.telemetry) >= down_from + 10, "the devices kept sending while the console was down"
    fleet.console.start()

    done = wait_for(
        lambda: (doc := fleet.rollout(rollout_id)) and rollout_state(doc) in ("passed", "failed", "aborted") and doc,
        150,
        "the rollout to end",
    )
    assert rollout_state(done) == "passed", json.dumps(done, indent=1)[:4000]
    assert passed_waves(done) == 3
    wait_for(lambda: set(fleet.releases().values()) == {2}, 30, "every device on release 2")

    # No device got the deploy twice: exactly one final event each, a commit. (A held device
    # already runs release 2; its commit event follows the last wave's commit command, which
    # the rollout's end does not wait for: wait for every device's, then a moment for a double.)
    def finals_of_2() -> list[dict[str, Any]]:
        return [e for e in list(fleet.watcher.finals) if e["detail"].get("release") == 2]

    wait_for(lambda: {e["device_id"] for e in finals_of_2()} == set(DEVICES), 30, "each device's final event", finals_of_2)
    time.sleep(1.0)
    finals = finals_of_2()
    assert sorted(e["device_id"] for e in finals) == sorted(DEVICES), finals
    assert {e["type"] for e in finals} == {"ota_committed"}

    # The history holds every telemetry message the outside subscriber saw, with no gaps.
    # (The outside subscriber may hear the newest message a moment before the console stored it.)
    seen = set(fleet.watcher.telemetry)
    for device in DEVICES:
        expected = {seq for d, seq in seen if d == device}

        def stored_rows(device: str = device) -> list[dict[str, Any]]:
            hist = fleet.console.get(f"/api/devices/{device}/history?kinds=telemetry&limit=100000")
            return list(hist["history"]) if isinstance(hist, dict) else []

        try:
            rows = wait_for(lambda e=expected: (r := stored_rows()) and e <= {int(x["seq"]) for x in r} and r, 10, "")
        except AssertionError:
            missing = sorted(expected - {int(x["seq"]) for x in stored_rows()})
            raise AssertionError(f"{device}: telemetry seqs the console never stored: {missing[:20]}") from None
        # Every seq gap is explained by the device itself: its outbox replaced an unsent retained
        # state by a newer one (outbox.superseded, cumulative), nothing was lost.
        info = fleet.console.get(f"/api/devices/{device}")
        assert info is not None
        missing = sum(last - first + 1 for first, last in info["gaps"])
        last_box = rows[-1]["payload"]["outbox"]
        assert missing <= last_box["superseded"] + last_box["dropped"], (missing, last_box, info["gaps"])
        assert last_box["dropped"] == 0


def test_release_failing_the_error_gate_stops_after_its_first_wave(fleet: Fleet, built: Built) -> None:
    bundle = resign(built, fleet.tmp, "bad", {"release": 3, "version": "1.2.0"})
    before = len(fleet.watcher.commands)
    start = fleet.console.cli(
        "rollout", "start", str(bundle), "--group", "target=ecu", "--waves", "1,100%", "--soak", "4s",
        "--key", str(built.public_key), "--gate", "min_inferences=20", "--gate", "latency_p99_ms=200", "--json",
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    rollout_id = json.loads(start.stdout)["rollout"]["rollout_id"]

    done = wait_for(
        lambda: (doc := fleet.rollout(rollout_id)) and rollout_state(doc) in ("passed", "failed", "aborted") and doc,
        120,
        "the rollout to end",
    )
    assert rollout_state(done) == "failed", json.dumps(done, indent=1)[:4000]
    assert "error" in json.dumps(done["waves"][0]).lower()

    # Only the first wave's device was offered release 3, and it went back to release 2.
    deploys = [(d, c) for d, c in fleet.watcher.commands[before:] if c["type"] == "deploy"]
    offered = {d for d, _ in deploys}
    assert len(offered) == 1, deploys
    (victim,) = offered

    def rolled() -> list[dict[str, Any]]:
        return [e for e in list(fleet.watcher.finals) if e["device_id"] == victim and e["detail"].get("release") == 3]

    wait_for(rolled, 30, f"{victim}'s final event for release 3")  # the device acts on the rollback after the verdict
    time.sleep(1)
    assert [e["type"] for e in rolled()] == ["ota_rolled_back"], rolled()
    assert rolled()[0]["detail"]["reason"] == "console_rollback"
    wait_for(lambda: set(fleet.releases().values()) == {2}, 30, "every device back on release 2")

    # Marked bad for the group: a second rollout of it is refused, saying why.
    again = fleet.console.cli(
        "rollout", "start", str(bundle), "--group", "target=ecu", "--waves", "100%", "--soak", "4s",
        "--key", str(built.public_key),
    )  # fmt: skip
    assert again.returncode != 0
    assert "bad" in (again.stdout + again.stderr).lower()


def test_the_dashboard_shows_the_five_devices_and_the_rollouts_in_chromium(fleet: Fleet, tmp_path: Path) -> None:
    from test_fleet_dashboard import _chromium_run, read

    rollouts = (fleet.console.get("/api/rollouts") or {})["rollouts"]
    assert len(rollouts) == 2, rollouts
    fleet_page = read(_chromium_run(fleet.console.url + "/", tmp_path, "--dump-dom").stdout)
    for device in DEVICES:
        assert device in fleet_page.text, f"{device} is not on the rendered fleet page"
    assert fleet_page.text.count("online") >= 5
    listing = read(_chromium_run(fleet.console.url + "/rollouts", tmp_path, "--dump-dom").stdout)
    for r in rollouts:
        rid = r["rollout_id"]
        assert rid in listing.text
        page = read(_chromium_run(fleet.console.url + f"/rollouts/{rid}", tmp_path, "--dump-dom").stdout)
        state = r["state"]
        assert state in page.text and "error rate" in page.text
    if os.environ.get("EDGEOPS_UPDATE_SCREENSHOTS") == "1":  # the screenshots in docs/ come from this fleet
        out = Path(__file__).resolve().parents[1] / "docs" / "img"
        _chromium_run(fleet.console.url + "/", tmp_path, f"--screenshot={out / 'console-e2e-fleet.png'}")
        failed = next(r["rollout_id"] for r in rollouts if r["state"] == "failed")
        _chromium_run(fleet.console.url + f"/rollouts/{failed}", tmp_path, f"--screenshot={out / 'console-e2e-rollout.png'}")
