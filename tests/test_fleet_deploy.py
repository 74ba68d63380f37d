"""``edgeops fleet deploy`` and ``edgeops fleet status`` against a real Mosquitto.

The console runs as a user runs it (the real CLI in a subprocess) or, where a test must
look inside mid-transfer, as the same :class:`~edgeops_fleet.Deployer` in process. The
devices run the agent's own transfer code (:mod:`ota_device`: ``Staging`` and
``TransferEngine`` over paho, with a persistent session and a Last Will).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker import Broker, free_port
from conftest import AGENT, EDGEOPS, Built, run_agent, run_edgeops
from edgeops_agent.install import install_bundle
from edgeops_agent.store import DataDir
from edgeops_core import (
    DEFAULT_PREFIX,
    InputError,
    Manifest,
    device_topic,
    load_public_key,
    pack_bundle,
    read_members,
    verify_bundle_file,
)
from edgeops_fleet import BrokerError, Deployer, fleet_status, parse_broker_url
from edgeops_toolchain.signing import sign_members
from ota_device import OtaDevice


def _release(built: Built, tmp: Path, release: int, *, pad: int = 0, target: str | None = None) -> Path:
    """The session's bundle as ``release``, re-signed; ``pad`` bytes of doc string make the model larger."""
    members = read_members(built.bundle.read_bytes())
    change: dict[str, object] = {"release": release}
    if target is not None:
        change["target"] = target
    manifest = dataclasses.replace(Manifest.from_json(members["manifest.json"]), **change)  # type: ignore[arg-type]
    model = members["model.onnx"]
    if pad:
        import onnx

        proto = onnx.load_from_string(model)
        proto.doc_string = random.Random(release).randbytes(pad // 2).hex()
        model = proto.SerializeToString()
    body = {"manifest.json": manifest.to_json(), "model.onnx": model}
    path = tmp / f"release-{release}{'-' + target if target else ''}.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sign_members(body, built.private_key, subject=path.stem)}))
    return path


@pytest.fixture
def devices(tmp_path: Path, broker: Broker) -> Iterator[list[OtaDevice]]:
    fleet = [OtaDevice(f"ecu-{i}", broker.port, tmp_path / f"dev-{i}") for i in range(3)]
    for d in fleet:
        d.start()
    for d in fleet:
        assert d.connected.wait(10)
    try:
        yield fleet
    finally:
        for d in fleet:
            d.stop()


class Watcher:
    """An outside ``mosquitto_sub`` on every device's events (as an operator would run it)."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1", "-t", f"{DEFAULT_PREFIX}/+/events"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.3)  # subscribed before anything is sent

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # one JSON event per line, as it arrives
            if line.strip():
                self._lines.append(line)

    def finals(self) -> list[tuple[str, str, str]]:
        """``(device, event type, deploy id)`` of every final event heard so far."""
        seen = [json.loads(line) for line in list(self._lines)]
        return sorted(
            (e["device_id"], e["type"], e["detail"]["deploy_id"])
            for e in seen
            if e["type"] in ("ota_committed", "ota_rolled_back", "ota_failed")
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def _deploy(
    bundle: Path, built: Built, port: int, *device_ids: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    devs = [a for d in device_ids for a in ("--device", d)]
    return run_edgeops("fleet", "deploy", bundle, *devs, "--broker", f"mqtt://127.0.0.1:{port}",
                       "--key", built.public_key, *extra)  # fmt: skip


def _settled(watcher: Watcher, n: int) -> None:
    """Wait until the outside subscriber heard ``n`` final events (it hears them a moment after the
    deploy command, which counts its own), then a moment more: a second final event would arrive
    right behind the first."""
    deadline = time.monotonic() + 10
    while len(watcher.finals()) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    watcher.stop()


def test_three_devices_take_release_2_and_each_reports_one_final_event(
    tmp_path: Path, built: Built, broker: Broker, devices: list[OtaDevice]
) -> None:
    bundle = _release(built, tmp_path, 2)
    watcher = Watcher(broker.port)
    done = _deploy(bundle, built, broker.port, "ecu-0", "ecu-1", "ecu-2", extra=("--json", "--timeout", "30"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["release"] == 2 and result["exit_code"] == 0
    assert result["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    for report in result["devices"]:
        assert report["outcome"] == "committed" and report["final_events"] == 1
        assert report["bytes_sent"] == bundle.stat().st_size  # every block once: nothing re-sent on a clean link
    for d in devices:
        assert [o.type for o in d.outcomes] == ["ota_committed"] and d.release == 2
    deploy_id = result["deploy_id"]
    _settled(watcher, 3)
    assert watcher.finals() == [(f"ecu-{i}", "ota_committed", deploy_id) for i in range(3)]

    status = run_edgeops("fleet", "status", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["device_id"]: r for r in json.loads(status.stdout)["devices"]}
    assert sorted(rows) == ["ecu-0", "ecu-1", "ecu-2"]
    for row in rows.values():
        assert (row["online"], row["target"], row["release"], row["ota_phase"], row["ota_deploy_id"]) == (
            True, "ecu", 2, "committed", deploy_id,
        )  # fmt: skip
    table = run_edgeops("fleet", "status", "--broker", f"mqtt://127.0.0.1:{broker.port}")
    assert table.returncode == 0 and "ecu-2" in table.stdout and "committed" in table.stdout


def test_a_refusing_device_and_a_silent_one_exit_3_naming_each(tmp_path: Path, built: Built, broker: Broker) -> None:
    wearable = OtaDevice("band-7", broker.port, tmp_path / "band", target="wearable")
    good = OtaDevice("ecu-9", broker.port, tmp_path / "ecu")
    for d in (wearable, good):
        d.start()
        assert d.connected.wait(10)
    try:
        done = _deploy(_release(built, tmp_path, 2), built, broker.port, "band-7", "ecu-9", "ghost-1",
                       extra=("--timeout", "4"))  # fmt: skip
    finally:
        for d in (wearable, good):
            d.stop()
    assert done.returncode == 3, done.stderr
    assert "error: device band-7: failed (wrong_target): the bundle is for ecu, this device is wearable" in done.stderr
    assert "error: device ghost-1: timed_out (timeout): no final event within 4 s" in done.stderr
    assert "ecu-9" not in done.stderr  # it committed
    assert "committed" in done.stdout and "band-7" in done.stdout  # the final table
    assert wearable.staging is None  # refused before a single block was fetched


def test_a_device_offline_when_the_deploy_is_sent_gets_it_when_it_comes_back(
    tmp_path: Path, built: Built, broker: Broker
) -> None:
    late = OtaDevice("ecu-late", broker.port, tmp_path / "late")
    late.start()
    assert late.connected.wait(10)
    late.stop()  # its persistent session stays on the broker, and will queue the command
    verified = verify_bundle_file(_release(built, tmp_path, 2), [load_public_key(built.public_key)])
    deployer = Deployer(verified, ["ecu-late"], parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"))
    deployer.start()
    try:
        deadline = time.monotonic() + 10  # the deployer subscribes after its CONNACK: the retained state follows
        while deployer.reports()[0].active_release is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # and nothing is sent to a device that is away
        waiting = deployer.reports()[0]
        assert (waiting.outcome, waiting.bytes_sent, waiting.active_release) == (None, 0, 1)  # its retained state: release 1
        back = OtaDevice("ecu-late", broker.port, tmp_path / "late")
        back.start()
        reports = deployer.wait(20)
        back.stop()
    finally:
        deployer.close()
    assert reports[0].outcome == "committed" and reports[0].final_events == 1
    assert [o.type for o in back.outcomes] == ["ota_committed"]


def test_broker_restart_mid_transfer_resends_only_what_was_missing(tmp_path: Path, built: Built, broker: Broker) -> None:
    bundle = _release(built, tmp_path, 2, pad=3 * 1024 * 1024)
    verified = verify_bundle_file(bundle, [load_public_key(built.public_key)])
    device = OtaDevice("ecu-r", broker.port, tmp_path / "dev")
    device.start()
    assert device.connected.wait(10)
    rate = 1024 * 1024.0  # 1 MiB/s: about 3 s, long enough to stop the broker mid-way
    deployer = Deployer(
        verified, ["ecu-r"], parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), max_bytes_per_s=rate, block_size=16 * 1024
    )
    size = deployer.deploy.size
    at_stop: dict[str, int] = {}

    def restart_mid_way() -> None:
        while device.staging is None or device.staging.received < deployer.deploy.block_count // 3:
            time.sleep(0.01)
        broker.stop()
        staging = device.staging
        at_stop["missing"] = sum(deployer.deploy.block_length(i) for i in staging.missing())
        at_stop["sent"] = deployer.reports()[0].bytes_sent
        time.sleep(0.5)
        broker.start()

    chaos = threading.Thread(target=restart_mid_way, daemon=True)
    started = time.monotonic()
    try:
        deployer.start()
        chaos.start()
        reports = deployer.wait(40)
    finally:
        deployer.close()
        device.stop()
    chaos.join(5)
    elapsed = time.monotonic() - started
    assert reports[0].outcome == "committed", reports[0]
    assert 0 < at_stop["missing"] < size * 0.8  # the outage fell mid-transfer
    sent_again = reports[0].bytes_sent - at_stop["sent"]
    assert sent_again <= 1.1 * at_stop["missing"], (sent_again, at_stop)
    assert device.engine is not None and device.engine.bytes_written == size  # every block written once
    assert elapsed >= (size - 16 * 1024) / rate  # the cap held
    assert [o.type for o in device.outcomes] == ["ota_committed"]  # the whole file hashed to the announced sha256


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--broker", "http://127.0.0.1:1883"), 2, "must start with mqtt://"),
        (("--broker", "mqtt://127.0.0.1:99999"), 2, "broker URL"),
        (("--broker", "mqtt://:1883"), 2, "has no host"),
        (("--device", "bad/id"), 2, "device id 'bad/id'"),
        (("--max-rate", "0"), 2, "--max-rate must be > 0"),
        (("--max-rate", "inf"), 2, "--max-rate must be > 0"),
        (("--timeout", "nan"), 2, "--timeout must be > 0"),
        (("--timeout", "-1"), 2, "--timeout must be > 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, built: Built, args: tuple[str, ...], code: int, message: str) -> None:
    base = {"--broker": "mqtt://127.0.0.1:1883", "--device": "ecu-1"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [x for k, v in base.items() for x in (k, v)]
    done = run_edgeops("fleet", "deploy", built.bundle, *flat, "--key", built.public_key)
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr and "Traceback" not in done.stderr


def test_bundle_key_and_broker_failures(tmp_path: Path, built: Built) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    missing = run_edgeops("fleet", "deploy", tmp_path / "nope.edgeops", "-d", "e1", "--broker", url, "--key", built.public_key)
    assert missing.returncode == 2 and "no such bundle file" in missing.stderr
    bad_key = tmp_path / "key.pem"
    bad_key.write_text("not a key")
    key = run_edgeops("fleet", "deploy", built.bundle, "-d", "e1", "--broker", url, "--key", bad_key, "--json")
    assert key.returncode == 2 and json.loads(key.stdout)["exit_code"] == 2
    no_dev_key = run_edgeops("fleet", "deploy", built.bundle, "-d", "e1", "--broker", url)  # EDGEOPS_HOME has none
    assert no_dev_key.returncode == 2 and "no development key" in no_dev_key.stderr
    tampered = tmp_path / "tampered.edgeops"
    raw = bytearray(built.bundle.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    tampered.write_bytes(bytes(raw))
    bad = run_edgeops("fleet", "deploy", tampered, "-d", "e1", "--broker", url, "--key", built.public_key)
    assert bad.returncode == 4 and bad.stderr.startswith("error: ")
    unreachable = run_edgeops("fleet", "deploy", built.bundle, "-d", "e1", "--broker", url, "--key", built.public_key)
    assert unreachable.returncode == 5 and "cannot reach the broker" in unreachable.stderr
    status = run_edgeops("fleet", "status", "--broker", url)
    assert status.returncode == 5 and "cannot reach the broker" in status.stderr


def test_development_key_is_used_without_key(tmp_path: Path, built: Built, broker: Broker) -> None:
    home = Path(os.environ["EDGEOPS_HOME"])
    (home / "keys").mkdir(parents=True)
    (home / "keys" / "dev-signing.pub.pem").write_bytes(built.public_key.read_bytes())
    device = OtaDevice("ecu-d", broker.port, tmp_path / "dev")
    device.start()
    assert device.connected.wait(10)
    try:
        done = run_edgeops("fleet", "deploy", _release(built, tmp_path, 2), "-d", "ecu-d", "-d", "ecu-d",
                           "--broker", f"mqtt://127.0.0.1:{broker.port}", "--timeout", "20")  # fmt: skip
    finally:
        device.stop()
    assert done.returncode == 0, done.stderr
    assert "signed by the development key" in done.stdout and "to 1 device(s)" in done.stdout


def test_fleet_status_shows_offline_and_unreadable_states(tmp_path: Path, broker: Broker) -> None:
    gone = OtaDevice("ecu-gone", broker.port, tmp_path / "gone")
    gone.start()
    assert gone.connected.wait(10)
    gone.transport.client.loop_stop()  # no DISCONNECT: the broker sees the socket close and publishes the Will
    sock = gone.transport.client.socket()
    assert sock is not None
    sock.close()

    def gone_offline() -> bool:  # the broker publishes the Will once it notices the closed socket
        rows = fleet_status(parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), max_wait_s=1)
        return any(r.device_id == "ecu-gone" and r.online is False for r in rows)

    deadline = time.monotonic() + 10
    while not gone_offline() and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-r", "-q", "1",
                    "-t", device_topic(DEFAULT_PREFIX, "junk-1", "state"), "-m", "{not json"], check=True)  # fmt: skip
    rows = {r.device_id: r for r in fleet_status(parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), max_wait_s=3)}
    assert rows["junk-1"].error is not None and "unreadable state" in rows["junk-1"].error
    assert (rows["ecu-gone"].online, rows["ecu-gone"].target, rows["ecu-gone"].release) == (False, "ecu", 1)


def test_broker_url_parsing() -> None:
    assert parse_broker_url("mqtt://broker.local").port == 1883
    assert str(parse_broker_url("mqtt://[::1]:1884")) == "mqtt://[::1]:1884"
    for bad in ("mqtt://h:0", "mqtts://h:1", "mqtt://u@h:1", "mqtt://h:1/x", "mqtt://h:1?q", "h:1", "mqtt://h:port"):
        with pytest.raises(InputError):
            parse_broker_url(bad)
    with pytest.raises(BrokerError, match="cannot reach the broker"):
        fleet_status(parse_broker_url(f"mqtt://127.0.0.1:{free_port()}"))


# -- with real `edgeops-agent run` processes ---------------------------------------------------------

#: Commit right after the self-test vectors: these agents get no live traffic during the trial.
AGENT_OTA = "[ota]\nhealth_inferences = 0\nretry_initial_s = 0.5\n"


class AgentProc:
    """One real ``edgeops-agent run`` on its own data directory, with release 1 installed."""

    def __init__(self, tmp: Path, built: Built, port: int, name: str) -> None:
        self.name, self.data = name, tmp / name
        device = DataDir(self.data)
        device.add_trusted_key(built.public_key)
        install_bundle(device, built.bundle, target="ecu")
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            f'device_id = "{name}"\ntarget = "ecu"\ndata_dir = "{name}"\n'
            f"[mqtt]\nport = {port}\nkeepalive_s = 2\nreconnect_min_s = 0.2\nreconnect_max_s = 0.5\n{AGENT_OTA}"
        )
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*AGENT, "run", "--config", str(self.config)], stdout=subprocess.DEVNULL, stderr=log)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
            self.proc = None

    def active_release(self) -> int:
        done = run_agent("status", "--json", "-d", self.data)
        assert done.returncode == 0, done.stderr
        state = json.loads(done.stdout)
        return int(state["slots"][state["active"]]["release"])

    def journal_blocks(self, deploy_id: str) -> set[int]:
        """The block indexes the agent's staging journal holds (what it has on disk)."""
        try:
            raw = (self.data / "ota" / f"{deploy_id}.journal").read_bytes()
        except FileNotFoundError:
            return set()
        records = raw[raw.index(b"\n") + 1 :]
        return {int.from_bytes(records[i : i + 4], "big") for i in range(0, len(records) - len(records) % 8, 8)}


@pytest.fixture
def agents(tmp_path: Path, built: Built, broker: Broker) -> Iterator[Callable[[int], list[AgentProc]]]:
    made: list[AgentProc] = []

    def start(n: int) -> list[AgentProc]:
        procs = [AgentProc(tmp_path, built, broker.port, f"ecu-{i}") for i in range(n)]
        for a in procs:
            a.start()
        made.extend(procs)
        deadline = time.monotonic() + 30
        url = parse_broker_url(f"mqtt://127.0.0.1:{broker.port}")
        while {r.device_id for r in fleet_status(url, max_wait_s=1) if r.online} != {a.name for a in procs}:
            assert time.monotonic() < deadline, "the agents did not come online"
        return procs

    yield start
    for a in made:
        a.stop()


def test_real_agents_on_release_1_take_release_2_from_fleet_deploy(
    tmp_path: Path, built: Built, broker: Broker, agents: Callable[[int], list[AgentProc]]
) -> None:
    fleet = agents(3)
    assert [a.active_release() for a in fleet] == [1, 1, 1]
    bundle = _release(built, tmp_path, 2)
    watcher = Watcher(broker.port)
    done = _deploy(bundle, built, broker.port, *(a.name for a in fleet), extra=("--json", "--timeout", "60"))
    assert done.returncode == 0, done.stderr + "".join(a.log.read_text() for a in fleet)
    result = json.loads(done.stdout)
    assert [(r["device_id"], r["outcome"], r["final_events"]) for r in result["devices"]] == [
        (a.name, "committed", 1) for a in fleet
    ]
    assert [a.active_release() for a in fleet] == [2, 2, 2]  # edgeops-agent status --json
    _settled(watcher, len(fleet))
    assert watcher.finals() == [(a.name, "ota_committed", result["deploy_id"]) for a in fleet]
    rows = {r.device_id: r for r in fleet_status(parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"))}
    assert all((rows[a.name].release, rows[a.name].online) == (2, True) for a in fleet)

    downgrade = _deploy(built.bundle, built, broker.port, "ecu-0", extra=("--timeout", "30"))  # release 1 again
    assert downgrade.returncode == 3, downgrade.stderr
    assert "error: device ecu-0: failed (not_newer): " in downgrade.stderr
    assert fleet[0].active_release() == 2  # nothing installed


def test_real_agent_broker_restart_mid_transfer_resends_at_most_110_percent_of_what_was_missing(
    tmp_path: Path, built: Built, broker: Broker, agents: Callable[[int], list[AgentProc]]
) -> None:
    (agent,) = agents(1)
    bundle = _release(built, tmp_path, 2, pad=3 * 1024 * 1024)
    verified = verify_bundle_file(bundle, [load_public_key(built.public_key)])
    rate = 1024 * 1024.0
    deployer = Deployer(
        verified, [agent.name], parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"), max_bytes_per_s=rate, block_size=16384
    )
    deploy = deployer.deploy
    at_stop: dict[str, int] = {}

    def restart_mid_way() -> None:
        while len(agent.journal_blocks(deploy.deploy_id)) < deploy.block_count // 3:
            time.sleep(0.01)
        broker.stop()
        have = agent.journal_blocks(deploy.deploy_id)
        at_stop["missing"] = sum(deploy.block_length(i) for i in range(deploy.block_count) if i not in have)
        at_stop["sent"] = deployer.reports()[0].bytes_sent
        time.sleep(0.5)
        broker.start()

    chaos = threading.Thread(target=restart_mid_way, daemon=True)
    try:
        deployer.start()
        chaos.start()
        reports = deployer.wait(60)
    finally:
        deployer.close()
    chaos.join(5)
    assert reports[0].outcome == "committed", (reports[0], agent.log.read_text()[-3000:])
    assert 0 < at_stop["missing"] < deploy.size * 0.8  # the outage fell mid-transfer
    sent_again = reports[0].bytes_sent - at_stop["sent"]
    assert sent_again <= 1.1 * at_stop["missing"], (sent_again, at_stop)
    assert agent.active_release() == 2


class BlockCounter:
    """An outside MQTT v5 client counting the block bytes published to one device, split at a marker.

    The marker is a message on a topic of the same subscription: the broker delivers both in the
    order it took them, so every block counted after it was sent after the marker was published.
    """

    def __init__(self, port: int, device_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.blocks_topic = device_topic(DEFAULT_PREFIX, device_id, "ota_block")
        self.marker_topic = f"test/{device_id}/marker"
        self.before = self.after = 0
        self.marked = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(self.blocks_topic, 1), (self.marker_topic, 1)])
        self.client.loop_start()
        time.sleep(0.3)  # subscribed before anything is sent

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        if msg.topic == self.marker_topic:  # type: ignore[attr-defined]
            self.marked.set()
        elif self.marked.is_set():
            self.after += len(msg.payload) - 20  # type: ignore[attr-defined]  # the 20-byte frame header
        else:
            self.before += len(msg.payload) - 20  # type: ignore[attr-defined]

    def mark(self) -> None:
        self.client.publish(self.marker_topic, b"restart", qos=1)
        assert self.marked.wait(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_real_agent_sigkilled_mid_transfer_resumes_and_resends_at_most_110_percent_of_what_was_missing(
    tmp_path: Path, built: Built, broker: Broker, agents: Callable[[int], list[AgentProc]]
) -> None:
    (agent,) = agents(1)
    bundle = _release(built, tmp_path, 2, pad=3 * 1024 * 1024)
    counter = BlockCounter(broker.port, agent.name)
    at_restart: dict[str, int] = {}

    def kill_mid_way() -> None:
        journals: list[Path] = []
        while not journals:
            journals = list((agent.data / "ota").glob("*.journal")) if (agent.data / "ota").is_dir() else []
            time.sleep(0.01)
        deploy_id = journals[0].stem
        header = json.loads(journals[0].read_bytes().split(b"\n", 1)[0])
        size, block = int(header["size"]), int(header["block_size"])
        count = -(-size // block)
        while len(agent.journal_blocks(deploy_id)) < count // 3:
            time.sleep(0.01)
        assert agent.proc is not None
        agent.proc.kill()  # SIGKILL: no shutdown code runs
        agent.proc.wait(10)
        agent.proc = None
        time.sleep(0.5)  # the broker publishes its Will; what it had asked for must not be sent now
        have = agent.journal_blocks(deploy_id)  # the journal as the restarted agent finds it
        at_restart["missing"] = sum(min(block, size - i * block) for i in range(count) if i not in have)
        at_restart["size"] = size
        counter.mark()
        agent.start()

    chaos = threading.Thread(target=kill_mid_way, daemon=True)
    chaos.start()
    try:  # --max-rate 1024 KiB/s: about 3 s, long enough to kill the agent mid-way
        done = _deploy(bundle, built, broker.port, agent.name, extra=("--json", "--timeout", "60", "--max-rate", "1024"))
        if done.returncode == 0:  # the counter, another subscriber, may hear the last blocks a moment later
            sent = int(json.loads(done.stdout)["devices"][0]["bytes_sent"])
            deadline = time.monotonic() + 10
            while counter.before + counter.after < sent and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        counter.close()
    chaos.join(5)
    assert done.returncode == 0, done.stderr + agent.log.read_text()[-3000:]
    (report,) = json.loads(done.stdout)["devices"]
    assert (report["outcome"], report["final_events"]) == ("committed", 1)
    assert 0 < at_restart["missing"] < at_restart["size"] * 0.8  # the kill fell mid-transfer
    assert counter.before + counter.after == report["bytes_sent"]  # the counter saw every block the sender sent
    assert counter.after <= 1.1 * at_restart["missing"], (counter.after, at_restart)
    assert agent.active_release() == 2


def test_ctrl_c_ends_the_deploy_with_one_line_and_130(tmp_path: Path, built: Built, broker: Broker) -> None:
    url = f"mqtt://127.0.0.1:{broker.port}"
    cmd = [*EDGEOPS, "fleet", "deploy", str(built.bundle), "-d", "ghost-2", "--broker", url, "--key", str(built.public_key)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert "deploy d-" in proc.stdout.readline()  # verified, connecting: now interrupt it
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err.startswith("error: interrupted") and "Traceback" not in err


def test_retry_bad_goes_into_the_command_and_a_cap_must_be_finite(tmp_path: Path, built: Built) -> None:
    verified = verify_bundle_file(built.bundle, [load_public_key(built.public_key)])
    url = parse_broker_url("mqtt://127.0.0.1:1883")
    deployer = Deployer(verified, ["e1", "e1", "e2"], url, retry_bad=True, deploy_id="d-x")
    command = json.loads(deployer.command)
    assert (command["id"], command["type"], command["args"]["retry_bad"]) == ("d-x", "deploy", True)
    assert deployer.devices == ("e1", "e2")
    assert "retry_bad" not in json.loads(Deployer(verified, ["e1"], url).command)["args"]
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="rate cap"):
            Deployer(verified, ["e1"], url, max_bytes_per_s=bad)
    with pytest.raises(InputError, match="at least one device"):
        Deployer(verified, [], url)
