"""Over-the-air updates in the running agent (issue 8, ADR 0012), end to end.

Real Mosquitto (tests/broker.py), real ``edgeops-agent run`` processes, real signed bundles
(release 2 is the session's bundle signed again with ``release`` changed), and the real
console-side sender (:class:`edgeops_fleet.ota.BlockServer`) on a paho client. An outside
subscriber counts the final events: exactly one per deploy id, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import Broker
from conftest import AGENT, Built, mount_tmpfs
from edgeops_agent.config import OtaConfig, load_config
from edgeops_agent.crash import CRASH_ENV
from edgeops_agent.errors import ConfigError
from edgeops_agent.install import install_bundle
from edgeops_agent.outbox import Outbox
from edgeops_agent.server import recv_frame, send_frame
from edgeops_agent.store import DataDir
from edgeops_core import (
    OTA_FINAL_EVENTS,
    BlockFrame,
    Deploy,
    Manifest,
    deploy_command,
    load_public_key,
    pack_bundle,
    read_members,
    verify_bundle_file,
)
from edgeops_fleet.ota import BlockServer, announce
from edgeops_toolchain.signing import generate_keypair, sign_members

TRIAL = "[ota]\nhealth_inferences = 5\ntrial_timeout_s = 20\nretry_initial_s = 0.5\nmax_boots = 1\n"
#: The latency budget is generous here: two cores shared with the rest of the suite; the
#: rollback on a broken budget has its own test.
FAST = TRIAL + "latency_budget_ms = 100\n"


def resign(built: Built, tmp: Path, name: str, change: dict[str, object], *, key: Path | None = None) -> Path:
    """The session's bundle with manifest fields changed, signed again (as test_agent_install does)."""
    members = read_members(built.bundle.read_bytes())
    manifest = dataclasses.replace(Manifest.from_json(members["manifest.json"]), **change)  # type: ignore[arg-type]
    body = {"manifest.json": manifest.to_json(), "model.onnx": members["model.onnx"]}
    path = tmp / f"{name}.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, key or built.private_key, subject=name)}))
    return path


@pytest.fixture(scope="module")
def releases(built: Built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("releases")
    return {
        "r2": resign(built, tmp, "r2", {"release": 2, "version": "1.1.0"}),
        "r3": resign(built, tmp, "r3", {"release": 3, "version": "1.2.0"}),
    }


class Device:
    """One agent process on its own data directory."""

    def __init__(self, tmp: Path, built: Built, broker: Broker, name: str, extra: str = FAST) -> None:
        self.name = name
        self.data = tmp / name  # may be a mount point already (the full-disk test)
        device = DataDir(self.data)
        device.add_trusted_key(built.public_key)
        install_bundle(device, built.bundle, target="ecu")
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            f'device_id = "{name}"\ntarget = "ecu"\ndata_dir = "{name}"\n'
            f"[mqtt]\nport = {broker.port}\nkeepalive_s = 2\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n"
            f"[telemetry]\ninterval_s = 5\n{extra}"
        )
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        m = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
        self.rows = [list(v.input) for v in m.self_test.vectors]

    def start(self, crash_at: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash_at:
            env[CRASH_ENV] = crash_at
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*AGENT, "run", "--config", str(self.config)], stdout=subprocess.DEVNULL, stderr=log, env=env
            )

    def wait_dead(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
            self.proc = None

    def predict(self, n: int = 1) -> list[dict[str, Any]]:
        path = self.data / "agent.sock"
        deadline = time.monotonic() + 20
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path} did not appear") from None
                time.sleep(0.05)
        replies = []
        with s:
            for i in range(n):
                send_frame(s, {"op": "predict", "features": self.rows[i % len(self.rows)]})
                replies.append(json.loads(recv_frame(s) or b"{}"))
        return replies

    def status(self) -> dict[str, Any]:
        proc = subprocess.run([*AGENT, "status", "--json", "-d", str(self.data)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    def state_file(self) -> dict[str, Any]:
        return dict(DataDir(self.data).load_state().to_dict())


class Console:
    """The console side: an outside subscriber to the device's subtree and the real block sender."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.device = device
        self.events: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []
        self.requests = 0
        self.backlog = 0
        self.server: BlockServer | None = None
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"console-{device}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgeops/v1/{device}/#", qos=1)
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", broker.port, keepalive=5)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        leaf = msg.topic.rsplit("/", 1)[-1]
        if leaf == "ota_request":
            with self._lock:
                self.requests += 1
            if self.server is not None:
                self.server.on_message(msg.topic, msg.payload)
        elif leaf == "events":
            with self._lock:
                self.events.append(json.loads(msg.payload))
        elif leaf == "state":
            with self._lock:
                self.states.append(json.loads(msg.payload))
        elif leaf == "telemetry" and b'"backlog"' in msg.payload:
            with self._lock:
                self.backlog += 1

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def serve(self, bundle: Path, deploy_id: str, trusted: Path, rate: float | None = None, **kw: Any) -> Deploy:
        deploy = announce(verify_bundle_file(bundle, [load_public_key(trusted)]), deploy_id=deploy_id, **kw)
        if self.server is not None:
            self.server.stop()
        self.server = BlockServer(bundle, deploy, self.publish, devices=[self.device], max_bytes_per_s=rate)
        self.server.start()
        return deploy

    def send_deploy(self, deploy: Deploy, **kw: Any) -> None:
        self.publish(f"edgeops/v1/{self.device}/cmd", deploy_command(deploy, **kw))

    def finals(self, deploy_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] in OTA_FINAL_EVENTS and deploy_id in (None, e["detail"]["deploy_id"])]

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] == kind]

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30, tick: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if tick is not None:
                tick()
            time.sleep(0.05)
        with self._lock:
            seen = [(e["type"], e["detail"]) for e in self.events][-15:]
        raise AssertionError(f"timed out waiting for {what}; events: {seen}")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def rig(tmp_path: Path, built: Built, broker: Broker) -> Iterator[Callable[..., tuple[Device, Console]]]:
    made: list[tuple[Device, Console]] = []

    def make(name: str = "ecu-1", extra: str = FAST) -> tuple[Device, Console]:
        dev = Device(tmp_path, built, broker, name, extra)
        console = Console(broker, name)
        made.append((dev, console))
        return dev, console

    yield make
    for dev, console in made:
        dev.stop()
        console.close()


def _online(console: Console) -> Callable[[], bool]:
    return lambda: any(s["online"] for s in console.states)


def _serving_tick(dev: Device) -> Callable[[], None]:
    """While waiting: keep live inferences coming (the trial's health check needs them)."""

    def tick() -> None:
        with contextlib.suppress(OSError, AssertionError):  # between processes: the socket comes back
            dev.predict(2)

    return tick


def _final(console: Console, dev: Device, deploy_id: str, timeout: float = 40) -> dict[str, Any]:
    console.wait(lambda: bool(console.finals(deploy_id)), f"the final event of {deploy_id}", timeout, _serving_tick(dev))
    time.sleep(0.3)  # a duplicate would arrive right behind
    finals = console.finals(deploy_id)
    assert len(finals) == 1, finals
    return finals[0]


def _active_release(dev: Device) -> int:
    state = dev.state_file()
    return int(state["slots"][state["active"]]["release"])


def test_deploy_fetches_installs_on_trial_health_checks_and_commits(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    (dev.data / "ota.json").write_text("{damaged")  # set aside at start-up, never a reason not to serve
    dev.start()
    console.wait(_online(console), "online state")
    assert (dev.data / "ota.json.damaged").read_text() == "{damaged"
    deploy = console.serve(releases["r2"], "d-1", built.public_key, block_size=16384)
    assert deploy.block_count > 4
    console.send_deploy(deploy)
    final = _final(console, dev, "d-1")
    assert final["type"] == "ota_committed" and final["detail"]["release"] == 2
    state = dev.state_file()
    assert state["trial"] is None and state["highest_release"]["vibration-classifier"] == 2
    assert _active_release(dev) == 2 and dev.predict(1)[0]["ok"]
    console.wait(lambda: any((s.get("ota") or {}).get("phase") == "committed" for s in console.states), "state ota committed")
    progress = console.of("ota_progress")
    assert progress and all(p["detail"]["deploy_id"] == "d-1" for p in progress)
    assert console.of("command_done")[-1]["detail"]["accepted"] is True
    assert not (dev.data / "ota" / "d-1.part").exists()  # the staging is gone once installed

    # The same command again (a replay), and the same deploy id under another command id: acted on once.
    console.send_deploy(deploy)
    console.send_deploy(deploy, command_id="c-other")
    console.wait(lambda: any(e["detail"].get("ignored") for e in console.of("command_done")), "the ignored deploy")
    time.sleep(0.5)
    assert len(console.finals()) == 1


@pytest.mark.parametrize("checkpoint", ["after_block:3", "staging_complete", "slot_written", "trial", "committed"])
def test_kill_9_at_every_checkpoint_then_restart_ends_the_deploy_once(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path], checkpoint: str
) -> None:
    dev, console = rig()
    dev.start(crash_at=checkpoint)
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-crash", built.public_key, block_size=16384)
    console.send_deploy(deploy)
    console.wait(
        lambda: dev.proc is not None and dev.proc.poll() is not None, f"the kill at {checkpoint}", 30, _serving_tick(dev)
    )
    assert dev.wait_dead() == -signal.SIGKILL
    state = dev.state_file()  # valid (load_state checks its checksum)
    if checkpoint != "committed":
        assert state["highest_release"]["vibration-classifier"] == 1  # not committed
    assert not console.finals("d-crash")
    dev.start()
    final = _final(console, dev, "d-crash")
    assert final["type"] == "ota_committed", final
    assert _active_release(dev) == 2 and dev.state_file()["highest_release"]["vibration-classifier"] == 2
    assert all(r["ok"] for r in dev.predict(3))
    assert console.server is not None
    sent = console.server.stats(dev.name).blocks_sent
    assert sent <= deploy.block_count + OtaConfig().window, (sent, deploy.block_count)  # a resume re-fetches at most the window


def test_a_crash_looping_trial_rolls_back_once_and_is_not_fetched_again(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()  # max_boots = 1
    dev.start(crash_at="trial")
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-loop", built.public_key, block_size=16384)
    console.send_deploy(deploy)
    for _ in range(2):  # the installing process, then the one start-up the trial is allowed
        console.wait(lambda: dev.proc is not None and dev.proc.poll() is not None, "the crash on trial", 30)
        assert dev.wait_dead() == -signal.SIGKILL
        assert not console.finals("d-loop")
        dev.start(crash_at="trial")
    final = _final(console, dev, "d-loop")  # the third start rolls back before the model loads
    assert (final["type"], final["detail"]["reason"]) == ("ota_rolled_back", "crash_loop"), final
    state = dev.state_file()
    assert _active_release(dev) == 1 and state["trial"] is None and state["highest_release"]["vibration-classifier"] == 1
    assert "started 2 times on trial" in state["last_error"]
    assert all(r["ok"] for r in dev.predict(3))

    # The same bundle again, under a new deploy id: refused before a single request.
    asked = console.requests
    again = console.serve(releases["r2"], "d-loop-2", built.public_key, block_size=16384)
    console.send_deploy(again)
    final = _final(console, dev, "d-loop-2")
    assert (final["type"], final["detail"]["reason"]) == ("ota_failed", "marked_bad"), final
    assert console.requests == asked
    # Unless the console asks explicitly (and the release no longer crashes).
    dev.stop()
    dev.start()
    console.wait(lambda: sum(s["online"] for s in console.states) >= 2, "back online")
    retry = console.serve(releases["r2"], "d-loop-3", built.public_key, block_size=16384)
    console.send_deploy(retry, retry_bad=True)
    assert _final(console, dev, "d-loop-3")["type"] == "ota_committed"
    assert len(console.finals()) == 3


def test_a_trial_whose_live_inferences_break_the_latency_budget_rolls_back_by_itself(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig(extra=TRIAL + "latency_budget_ms = 0.000001\n")
    dev.start()
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-slow", built.public_key)
    console.send_deploy(deploy)
    final = _final(console, dev, "d-slow")
    assert (final["type"], final["detail"]["reason"]) == ("ota_rolled_back", "health_check"), final
    assert "p99 latency of the first 5 live inferences" in final["detail"]["message"]
    state = dev.state_file()
    assert _active_release(dev) == 1 and state["trial"] is None and state["highest_release"]["vibration-classifier"] == 1
    replies = dev.predict(3)
    assert all(r["ok"] for r in replies)
    status = dev.status()  # edgeops-agent status --json
    assert status["slots"][status["active"]]["release"] == 1
    console.wait(lambda: (console.states[-1].get("ota") or {}).get("phase") == "rolled_back", "state ota rolled_back")
    assert console.states[-1]["bundle"]["release"] == 1  # what the process serves, not only the state file


def _received(console: Console, deploy_id: str) -> int:
    return max(
        (p["detail"]["blocks_received"] for p in console.of("ota_progress") if p["detail"]["deploy_id"] == deploy_id), default=0
    )


def test_bad_deploys_are_refused_with_one_final_event_each_and_the_model_keeps_serving(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path], tmp_path: Path
) -> None:
    dev, console = rig(extra=FAST + "deadline_s = 2\n")
    dev.start()
    console.wait(_online(console), "online state")
    r2 = console.serve(releases["r2"], "d-r2", built.public_key)
    console.send_deploy(dataclasses.replace(r2, deploy_id="d-target", target="wearable"))
    console.send_deploy(console.serve(built.bundle, "d-same", built.public_key))  # release 1: not newer
    console.publish(f"edgeops/v1/{dev.name}/cmd", b'{"id":"c-bad","type":"deploy","args":{"deploy_id":"d-x"}}')
    other = generate_keypair(tmp_path / "other-key")
    untrusted = resign(built, tmp_path, "untrusted", {"release": 5}, key=other.private)
    console.send_deploy(console.serve(untrusted, "d-untrusted", other.public))
    expected = {
        "d-target": ("ota_failed", "wrong_target"),
        "d-same": ("ota_failed", "not_newer"),
        "d-untrusted": ("ota_failed", "install_rejected"),
    }
    for deploy_id, (kind, reason) in expected.items():
        final = _final(console, dev, deploy_id)
        assert (final["type"], final["detail"]["reason"]) == (kind, reason), final
    assert "not a trusted key" in console.finals("d-untrusted")[0]["detail"]["message"]
    rejected = console.of("command_rejected")
    assert len(rejected) == 1 and "deploy args must have exactly the fields" in rejected[0]["detail"]["message"]

    # The sender disappears: nothing answers the requests; the device gives up at its deadline.
    assert console.server is not None
    console.server.stop()
    console.server = None
    console.send_deploy(dataclasses.replace(r2, deploy_id="d-gone"))
    final = _final(console, dev, "d-gone", timeout=15)
    assert (final["type"], final["detail"]["reason"]) == ("ota_failed", "deadline"), final
    assert not list((dev.data / "ota").glob("d-gone.*"))  # its staging is removed
    state = dev.state_file()
    assert _active_release(dev) == 1 and state["trial"] is None and state["highest_release"]["vibration-classifier"] == 1
    assert all(r["ok"] for r in dev.predict(3))
    assert len(console.finals()) == 4


def test_bad_blocks_are_refused_counted_and_never_written(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    dev.start()
    console.wait(_online(console), "online state")
    # Slow enough that blocks are still outstanding when the bad frames arrive, even on a busy
    # machine (at 40 kB/s a CI run with other load finished the transfer first).
    deploy = console.serve(releases["r2"], "d-blocks", built.public_key, rate=24_000, block_size=4096)
    console.send_deploy(deploy)
    console.wait(lambda: _received(console, "d-blocks") >= 2, "the first blocks")
    topic = f"edgeops/v1/{dev.name}/ota_block"
    data = releases["r2"].read_bytes()
    console.publish(topic, b"not a frame")
    console.publish(topic, BlockFrame(tag=b"\x00" * 8, index=0, data=data[:4096]).to_bytes())
    console.publish(topic, BlockFrame(tag=deploy.tag, index=deploy.block_count + 3, data=b"x").to_bytes())
    console.publish(topic, BlockFrame(tag=deploy.tag, index=0, data=data[:4096]).to_bytes())  # on disk already
    for i in range(deploy.block_count):  # the outstanding ones are checked (and refused), the rest are unrequested
        n = deploy.block_length(i)
        console.publish(topic, BlockFrame(tag=deploy.tag, index=i, data=bytes(n)).to_bytes())
        console.publish(topic, BlockFrame(tag=deploy.tag, index=i, data=bytes(n + 1)).to_bytes())
    final = _final(console, dev, "d-blocks")
    assert final["type"] == "ota_committed", final
    refused: dict[str, int] = {}
    for e in console.of("ota_blocks_refused"):
        assert e["detail"]["deploy_id"] == "d-blocks"
        for reason, n in e["detail"]["refused"].items():
            refused[reason] = refused.get(reason, 0) + n
    assert {"malformed", "foreign", "out_of_range", "duplicate", "corrupt", "wrong_length"} <= set(refused), refused
    assert _active_release(dev) == 2  # what was installed is exactly the announced bytes


def test_a_newer_deploy_supersedes_a_running_one_and_an_equal_one_is_refused(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    dev.start()
    console.wait(_online(console), "online state")
    first = console.serve(releases["r2"], "d-first", built.public_key, rate=20_000, block_size=4096)
    console.send_deploy(first)
    console.wait(lambda: _received(console, "d-first") >= 1, "the first transfer running")
    console.send_deploy(dataclasses.replace(first, deploy_id="d-equal"))
    final = _final(console, dev, "d-equal")
    assert (final["type"], final["detail"]["reason"]) == ("ota_failed", "busy"), final
    newer = console.serve(releases["r3"], "d-newer", built.public_key)
    console.send_deploy(newer)
    final = _final(console, dev, "d-first")
    assert (final["type"], final["detail"]["reason"]) == ("ota_failed", "superseded"), final
    assert _final(console, dev, "d-newer")["type"] == "ota_committed"
    assert _active_release(dev) == 3 and len(console.finals()) == 3


def test_a_broker_restart_mid_transfer_resumes_it(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path], broker: Broker
) -> None:
    dev, console = rig()
    dev.start()
    console.wait(_online(console), "online state")
    deploy = console.serve(releases["r2"], "d-outage", built.public_key, rate=40_000, block_size=4096)
    console.send_deploy(deploy)
    console.wait(lambda: _received(console, "d-outage") >= 3, "the transfer running")
    broker.stop()
    time.sleep(1.0)
    broker.start()
    final = _final(console, dev, "d-outage")
    assert final["type"] == "ota_committed", final
    assert console.server is not None
    sent = console.server.stats(dev.name).blocks_sent
    assert sent <= deploy.block_count + 8, (sent, deploy.block_count)


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ("window = 0", "ota.window must be 1..64"),
        ("max_boots = 0", "ota.max_boots must be >= 1"),
        ("trial_timeout_s = 0", "ota.trial_timeout_s must be > 0"),
        ("health_inferences = 5000", "ota.health_inferences must be 0..4096"),
        ("latency_budget_ms = -1", "ota.latency_budget_ms"),
        ("deadline = 3", "deadline"),
    ],
)
def test_ota_config_is_validated(tmp_path: Path, table: str, fragment: str) -> None:
    (tmp_path / "data").mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "d"\ntarget = "ecu"\ndata_dir = "data"\n[ota]\n{table}\n')
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(config)
    config.write_text('device_id = "d"\ntarget = "ecu"\ndata_dir = "data"\n[ota]\nhealth_inferences = 0\nmax_boots = 2\n')
    ota = load_config(config).ota
    assert (ota.health_inferences, ota.max_boots, ota.window, ota.latency_budget_ms) == (0, 2, 8, None)


BACKLOG = 20_000


def test_block_requests_never_wait_behind_a_telemetry_backlog(
    rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig(extra=FAST + "[outbox]\nmax_messages = 100000\n")
    Outbox(dev.data / "outbox.sqlite").close()  # its schema; then a backlog, as after a long outage
    topic = f"edgeops/v1/{dev.name}/telemetry"
    rows = [(topic, json.dumps({"backlog": i}).encode(), time.time()) for i in range(BACKLOG)]
    with contextlib.closing(sqlite3.connect(dev.data / "outbox.sqlite")) as db, db:
        db.executemany("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?, ?, 1, 0, ?)", rows)
    dev.start()
    console.wait(_online(console), "online state (its own lane, ahead of the backlog)")
    deploy = console.serve(releases["r2"], "d-backlog", built.public_key, block_size=16384)
    console.send_deploy(deploy)

    def fetched() -> bool:
        ota = [s.get("ota") or {} for s in console.states]
        return any(o.get("deploy_id") == "d-backlog" and o["blocks_received"] == o["blocks_total"] for o in ota)

    console.wait(fetched, "every block on disk", 30, _serving_tick(dev))
    assert console.backlog < BACKLOG // 2, f"the transfer waited for the telemetry backlog ({console.backlog} sent first)"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs at ``tmp_path/ecu-1`` (root only); unmounted afterwards."""
    with mount_tmpfs(tmp_path / "ecu-1", "4m") as mount:
        yield mount


def test_a_full_disk_is_refused_before_fetching_and_the_model_keeps_serving(
    small_disk: Path, rig: Callable[..., tuple[Device, Console]], built: Built, releases: dict[str, Path]
) -> None:
    dev, console = rig()
    assert dev.data == small_disk
    st = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(bytes(st.f_bavail * st.f_frsize - 900 * 1024))  # 900 KiB stay free
    dev.start()
    console.wait(_online(console), "online state")
    asked = console.requests
    deploy = console.serve(releases["r2"], "d-full", built.public_key)
    console.send_deploy(deploy)
    final = _final(console, dev, "d-full")
    assert (final["type"], final["detail"]["reason"]) == ("ota_failed", "no_space"), final
    assert "bytes free" in final["detail"]["message"] and console.requests == asked
    console.wait(lambda: (console.states[-1].get("ota") or {}).get("deploy_id") == "d-full", "the refusal in the state")
    assert console.states[-1]["ota"]["phase"] == "failed"
    assert _active_release(dev) == 1 and all(r["ok"] for r in dev.predict(3))
    assert not list((small_disk / "ota").glob("d-full.*"))


def test_an_outbox_key_queues_a_message_once_across_reopening(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite")
    assert box.put("t/events", {"type": "ota_committed"}, once="ota-final:d-1") > 0
    assert box.put("t/events", {"type": "ota_committed"}, once="ota-final:d-1") == 0
    box.close()
    box = Outbox(tmp_path / "outbox.sqlite")  # as after a kill -9 between queuing and recording it
    assert box.put("t/events", {"type": "ota_committed"}, once="ota-final:d-1") == 0
    assert box.put("t/events", {"type": "ota_failed"}, once="ota-final:d-2") > 0
    assert [json.loads(p.payload)["type"] for p in box.pending()] == ["ota_committed", "ota_failed"]
    box.close()
