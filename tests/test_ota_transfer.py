"""OTA transfer (ADR 0012): preflight refusals, the staging file and its journal, the pull engine, the sender.

The in-process tests run the real :class:`BlockServer` against the real engine through a
synchronous link; the resume test SIGKILLs a real process writing blocks; the full-disk
tests use a real 1 MiB tmpfs (root only); the end-to-end test runs both sides over paho
and a real Mosquitto that is restarted mid-transfer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import Broker
from conftest import Built
from edgeops_agent.ota import (
    DeployRefusedError,
    OtaError,
    Staging,
    TransferEngine,
    TransferFailedError,
    TransferPolicy,
    install_staged,
    preflight,
)
from edgeops_agent.store import AgentState, DataDir
from edgeops_agent.transport import ManualClock, PahoTransport, RealClock
from edgeops_core import (
    DEFAULT_PREFIX,
    BlockFrame,
    BlockRequest,
    Deploy,
    device_topic,
    utc_now_text,
    verify_bundle_file,
)
from edgeops_fleet import BlockServer, SenderError, TokenBucket, announce
from test_ota_protocol import make_deploy

DEVICE = "ecu-1"
REQUEST_TOPIC = device_topic(DEFAULT_PREFIX, DEVICE, "ota_request")
BLOCK = 4096


def _bundle(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / "bundle.edgeops"
    path.write_bytes(data)
    return path, data


def _request_payload(deploy: Deploy, indexes: tuple[int, ...]) -> bytes:
    return BlockRequest(device_id=DEVICE, ts=utc_now_text(), deploy_id=deploy.deploy_id, blocks=indexes).to_json()


class Link:
    """The real sender answering the engine's requests synchronously, in process."""

    def __init__(self, path: Path, deploy: Deploy, *, tamper: Callable[[bytes], bytes] | None = None) -> None:
        self.server = BlockServer(path, deploy, self._publish, devices=[DEVICE])
        self.deploy = deploy
        self.engine: TransferEngine | None = None
        self.tamper = tamper
        self.requests: list[tuple[int, ...]] = []

    def _publish(self, topic: str, payload: bytes) -> None:
        assert topic == device_topic(DEFAULT_PREFIX, DEVICE, "ota_block") and self.engine is not None
        self.engine.on_block(self.tamper(payload) if self.tamper else payload)

    def request(self, indexes: tuple[int, ...]) -> None:
        self.requests.append(indexes)
        assert self.server.on_message(REQUEST_TOPIC, _request_payload(self.deploy, indexes))
        while self.server.serve_once() == 0:
            pass

    def engine_for(self, staging: Staging, policy: TransferPolicy | None = None) -> TransferEngine:
        self.engine = TransferEngine(staging, self.request, policy=policy or TransferPolicy(window=4), clock=ManualClock())
        return self.engine


def _fresh_data(tmp_path: Path, floor: int = 1) -> DataDir:
    data = DataDir(tmp_path / "data")
    data.root.mkdir(parents=True, exist_ok=True)
    data.save_state(AgentState(target="ecu", highest_release={"sensor": floor}, model_name="sensor"))
    return data


# -- preflight ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "kwargs", "reason"),
    [
        ({"target": "wearable"}, {}, "wrong_target"),
        ({"release": 3}, {}, "not_newer"),  # equal to the floor
        ({"release": 1}, {}, "not_newer"),  # a downgrade
        ({}, {"max_bundle_bytes": 10_000}, "too_large"),
        ({"size": 256 * 1024 * 1024, "block_size": 512 * 1024, "block_count": 512}, {}, "no_space"),
    ],
)
def test_preflight_refuses_before_fetching_anything(
    tmp_path: Path, change: dict[str, object], kwargs: dict[str, int], reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _fresh_data(tmp_path, floor=3)
    deploy = make_deploy(random.Random(2).randbytes(20_000), release=4)
    args = {**deploy.to_args(), **change}
    if "block_count" in change:
        args["block_sha256"] = ("0" * 64,) * 512
        # 512 MiB free, less than two copies of 256 MiB and the reserve (a real full disk: the tmpfs tests below)
        monkeypatch.setattr("edgeops_agent.ota._free_bytes", lambda path: 2**29)
    with pytest.raises(DeployRefusedError) as info:
        preflight(data, Deploy.from_args(args), device_target="ecu", **kwargs)
    assert info.value.reason == reason
    assert not any((data.root / "ota").glob("*")) if (data.root / "ota").exists() else True
    preflight(data, deploy, device_target="ecu")  # the same deploy, acceptable, passes


def test_preflight_counts_the_inactive_slot_and_the_staged_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _fresh_data(tmp_path)
    deploy = make_deploy(random.Random(3).randbytes(100_000))
    free = [2 * 100_000 + 1024 * 1024 - 1]
    monkeypatch.setattr("edgeops_agent.ota._free_bytes", lambda path: free[0])
    with pytest.raises(DeployRefusedError, match="needs 1248576 bytes free, the disk has 1248575"):
        preflight(data, deploy, device_target="ecu")
    slot = data.slot_path("a")  # the inactive slot: the install deletes it first
    slot.parent.mkdir(parents=True)
    slot.write_bytes(b"\0" * 50_000)
    preflight(data, deploy, device_target="ecu")


# -- staging and engine ------------------------------------------------------------------------


def test_transfer_completes_and_hashes_to_the_announced_sha256(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 10 * BLOCK + 123)
    deploy = make_deploy(data)
    link = Link(path, deploy)
    staging = Staging(tmp_path / "ota", deploy)
    engine = link.engine_for(staging)
    result = engine.run()
    assert result.read_bytes() == data and hashlib.sha256(result.read_bytes()).hexdigest() == deploy.sha256
    assert engine.bytes_written == len(data) and not engine.refused and engine.requested_blocks == deploy.block_count
    assert max(len(r) for r in link.requests) <= 4  # the window
    assert link.server.stats(DEVICE).bytes_sent == len(data)


def test_every_bad_block_is_refused_counted_and_not_written(tmp_path: Path) -> None:
    _, data = _bundle(tmp_path, 4 * BLOCK - 100)
    deploy = make_deploy(data)
    asked: list[tuple[int, ...]] = []
    staging = Staging(tmp_path / "ota", deploy)
    engine = TransferEngine(staging, asked.append, policy=TransferPolicy(window=2), clock=ManualClock())
    engine.start()
    assert asked == [(0, 1)]
    journal = staging.journal_path.stat().st_size
    other = make_deploy(data, deploy_id="d-2")
    block0 = data[:BLOCK]
    bad = {
        "malformed": b"EOB2" + deploy.frame(0, block0).to_bytes()[4:],
        "foreign": other.frame(0, block0).to_bytes(),
        "out_of_range": BlockFrame(tag=deploy.tag, index=4, data=b"x" * 100).to_bytes(),  # past the announced size
        "wrong_length": BlockFrame(tag=deploy.tag, index=0, data=block0 + b"x").to_bytes(),
        "corrupt": BlockFrame(tag=deploy.tag, index=1, data=block0).to_bytes(),
        "unrequested": deploy.frame(3, data[3 * BLOCK :]).to_bytes(),  # out of order: not in the window
    }
    for reason, payload in bad.items():
        assert engine.on_block(payload) == reason
    assert staging.received == 0 and staging.journal_path.stat().st_size == journal
    assert staging.path.read_bytes() == b"\0" * len(data)  # nothing written anywhere
    assert engine.on_block(deploy.frame(0, block0).to_bytes()) is None
    assert engine.on_block(deploy.frame(0, block0).to_bytes()) == "duplicate"
    assert dict(engine.refused) == dict.fromkeys([*bad, "duplicate"], 1)
    assert staging.received == 1 and staging.missing() == [1, 2, 3]
    assert staging.journal_path.stat().st_size == journal + 8
    assert staging.path.read_bytes() == block0 + b"\0" * (len(data) - BLOCK)


def test_outstanding_blocks_are_asked_again_with_exponential_backoff(tmp_path: Path) -> None:
    _, data = _bundle(tmp_path, 6 * BLOCK)
    deploy = make_deploy(data)
    clock = ManualClock(start=0.0)
    asked: list[tuple[float, tuple[int, ...]]] = []
    policy = TransferPolicy(window=3, retry_initial_s=1.0, retry_max_s=4.0, deadline_s=1000, min_bytes_per_s=0)
    engine = TransferEngine(
        Staging(tmp_path / "ota", deploy), lambda ix: asked.append((clock.monotonic(), ix)), policy=policy, clock=clock
    )
    engine.start()
    for _ in range(30):  # 15 s in half-second ticks, nothing arrives
        clock.advance(0.5)
        engine.tick()
        assert engine.outstanding == 3  # never more than the window
    assert [t for t, _ in asked] == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0]  # 1, 2, 4, then capped at 4
    assert all(ix == (0, 1, 2) for _, ix in asked)
    engine.on_block(deploy.frame(1, data[BLOCK : 2 * BLOCK]).to_bytes())
    engine.tick()
    assert asked[-1] == (15.0, (3,))  # the freed slot goes to the next missing block at once


def test_a_sender_that_disappears_ends_at_the_deadline(tmp_path: Path) -> None:
    _, data = _bundle(tmp_path, 3 * BLOCK)
    deploy = make_deploy(data)
    asked: list[tuple[int, ...]] = []
    policy = TransferPolicy(window=2, deadline_s=20, min_bytes_per_s=0, retry_max_s=4)
    engine = TransferEngine(Staging(tmp_path / "ota", deploy), asked.append, policy=policy, clock=ManualClock())
    with pytest.raises(TransferFailedError, match="not complete after 20 s") as info:
        engine.run()
    assert info.value.reason == "deadline" and 3 <= len(asked) <= 10
    assert engine.on_block(deploy.frame(0, data[:BLOCK]).to_bytes()) == "unrequested"  # nothing is written after
    with pytest.raises(TransferFailedError):
        engine.tick()


def test_a_trickle_below_the_minimum_throughput_fails(tmp_path: Path) -> None:
    _, data = _bundle(tmp_path, 8 * BLOCK)
    deploy = make_deploy(data)
    clock = ManualClock(start=0.0)
    policy = TransferPolicy(window=1, min_bytes_per_s=1000, throughput_window_s=10, deadline_s=1000, retry_initial_s=100)
    asked: list[tuple[int, ...]] = []
    engine = TransferEngine(Staging(tmp_path / "ota", deploy), asked.append, policy=policy, clock=clock)
    engine.start()
    seconds = [0]

    def trickle() -> None:
        for _ in range(30):  # one 4 KiB block every 8 s: 512 B/s
            clock.advance(1)
            seconds[0] += 1
            if seconds[0] % 8 == 0:
                index = asked[-1][0]
                engine.on_block(deploy.frame(index, data[index * BLOCK : (index + 1) * BLOCK]).to_bytes())
            engine.tick()

    with pytest.raises(TransferFailedError, match="the minimum is 1000 B/s") as info:
        trickle()
    assert info.value.reason == "too_slow" and seconds[0] == 10  # measured once the window has passed


def test_a_block_list_that_does_not_describe_the_sha256_installs_nothing(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 3 * BLOCK)
    lying = Deploy.from_args({**make_deploy(data).to_args(), "sha256": "ab" * 32})
    staging = Staging(tmp_path / "ota", lying)
    engine = Link(path, lying).engine_for(staging)
    with pytest.raises(TransferFailedError, match="hashes to") as info:
        engine.run()
    assert info.value.reason == "digest_mismatch"
    assert not staging.path.exists() and not staging.journal_path.exists()


def test_staging_of_another_deploy_or_bundle_is_discarded(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    path, data = _bundle(tmp_path, 3 * BLOCK)
    first = Staging(folder, make_deploy(data))
    Link(path, first.deploy).engine_for(first).run()
    first.close()
    same_id_other_bundle = make_deploy(data[:-1])
    again = Staging(folder, same_id_other_bundle)
    assert again.received == 0 and again.path.read_bytes() == b"\0" * (len(data) - 1)
    again.close()
    other = Staging(folder, make_deploy(data, deploy_id="d-9"))
    assert sorted(p.name for p in folder.iterdir()) == ["d-9.journal", "d-9.part"]  # one staging at a time
    other.discard()
    assert not any(folder.iterdir())


def test_resume_trusts_only_journaled_blocks_that_still_hash(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    path, data = _bundle(tmp_path, 8 * BLOCK)
    deploy = make_deploy(data)
    staging = Staging(folder, deploy)
    for i in (0, 2, 3, 5):
        staging.write_block(deploy.frame(i, data[i * BLOCK : (i + 1) * BLOCK]))
    staging.close()
    with open(staging.path, "r+b") as fh:  # a disk that lied: block 3's bytes rotted after the journal said so
        fh.seek(3 * BLOCK + 7)
        fh.write(b"\xff")
    with open(staging.journal_path, "ab") as fh:  # a torn record after the last good one
        fh.write(b"\x00\x00\x00")
    resumed = Staging(folder, deploy)
    assert resumed.missing() == [1, 3, 4, 6, 7]
    link = Link(path, deploy)
    assert link.engine_for(resumed).run().read_bytes() == data
    assert sorted(i for r in link.requests for i in r) == [1, 3, 4, 6, 7]  # only what was missing


def test_a_damaged_journal_record_stops_trust_there(tmp_path: Path) -> None:
    folder = tmp_path / "ota"
    _, data = _bundle(tmp_path, 4 * BLOCK)
    deploy = make_deploy(data)
    staging = Staging(folder, deploy)
    for i in range(3):
        staging.write_block(deploy.frame(i, data[i * BLOCK : (i + 1) * BLOCK]))
    staging.close()
    raw = bytearray(staging.journal_path.read_bytes())
    raw[-9] ^= 0x01  # the crc of the second of three records
    staging.journal_path.write_bytes(bytes(raw))
    assert Staging(folder, deploy).missing() == [1, 2, 3]


_WRITER = """
import json, sys, time
from pathlib import Path
from edgeops_core import Deploy
from edgeops_agent.ota import Staging
deploy = Deploy.from_args(json.loads(Path(sys.argv[1]).read_text()))
data = Path(sys.argv[2]).read_bytes()
staging = Staging(Path(sys.argv[3]), deploy)
n, size = deploy.block_count, deploy.block_size
for i in [*range(0, n, 2), *range(1, n, 2)]:
    staging.write_block(deploy.frame(i, data[i * size : (i + 1) * size]))
    print(i, flush=True)
    time.sleep(0.01)
"""


def test_resume_after_kill_9_refetches_only_what_was_missing(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 64 * BLOCK + 500)
    deploy = make_deploy(data)
    (tmp_path / "deploy.json").write_text(json.dumps(deploy.to_args()))
    folder = tmp_path / "data" / "ota"
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "deploy.json"), str(path), str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        reported = [int(proc.stdout.readline()) for _ in range(20)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    resumed = Staging(folder, deploy)
    assert set(reported) <= {i for i, have in enumerate(resumed.have) if have}
    assert 20 <= resumed.received < deploy.block_count
    missing_bytes = sum(deploy.block_length(i) for i in resumed.missing())
    window = 8
    link = Link(path, deploy)
    engine = link.engine_for(resumed, TransferPolicy(window=window))
    assert engine.run().read_bytes() == data
    sent = link.server.stats(DEVICE).bytes_sent
    assert missing_bytes <= sent <= missing_bytes + window * deploy.block_size
    assert engine.bytes_written == missing_bytes


# -- full disk ---------------------------------------------------------------------------------


def test_full_disk_is_refused_before_fetching_and_nothing_is_left(tiny_fs: Path) -> None:
    data = _fresh_data(tiny_fs)
    bundle = random.Random(5).randbytes(300 * 1024)
    deploy = make_deploy(bundle)
    with pytest.raises(DeployRefusedError, match="needs") as info:  # 2 x 300 KiB + 1 MiB reserve > 1 MiB
        preflight(data, deploy, device_target="ecu")
    assert info.value.reason == "no_space"
    big = make_deploy(random.Random(5).randbytes(2 * 1024 * 1024), block_size=8192)
    with pytest.raises(TransferFailedError, match="cannot stage") as failed:  # staging past preflight: fallocate says no
        Staging(data.root / "ota", big)
    assert failed.value.reason == "no_space"
    assert not any((data.root / "ota").iterdir())
    assert data.load_state().highest_release == {"sensor": 1}  # nothing installed, the state intact


def test_space_is_reserved_up_front_so_a_disk_that_fills_later_does_not_break_the_transfer(tiny_fs: Path) -> None:
    path, bundle = _bundle(tiny_fs.parent, 256 * 1024)
    deploy = make_deploy(bundle)
    staging = Staging(tiny_fs / "ota", deploy)
    with open(tiny_fs / "filler", "wb", buffering=0) as fh:  # fill the disk to the last byte
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    assert os.statvfs(tiny_fs).f_bavail == 0
    assert Link(path, deploy).engine_for(staging).run().read_bytes() == bundle


# -- sender ------------------------------------------------------------------------------------


def test_sender_refuses_requests_that_are_not_for_it(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 3 * BLOCK)
    deploy = make_deploy(data)
    sent: list[str] = []
    server = BlockServer(path, deploy, lambda t, p: sent.append(t), devices=[DEVICE, "ecu-2"])
    assert server.subscriptions == [REQUEST_TOPIC, device_topic(DEFAULT_PREFIX, "ecu-2", "ota_request")]
    other = make_deploy(data, deploy_id="d-2")
    refused = [
        (REQUEST_TOPIC, _request_payload(other, (0,))),  # another deploy
        (REQUEST_TOPIC, _request_payload(deploy, (3,))),  # out of range
        (REQUEST_TOPIC, b"{not json"),
        # ecu-1's request on ecu-2's topic
        (device_topic(DEFAULT_PREFIX, "ecu-2", "ota_request"), _request_payload(deploy, (0,))),
    ]
    for topic, payload in refused:
        assert not server.on_message(topic, payload)
    assert not server.on_message(device_topic(DEFAULT_PREFIX, "ecu-3", "ota_request"), _request_payload(deploy, (0,)))
    assert not server.on_message("elsewhere/x", b"")
    assert server.stats(DEVICE).refused == 3 and server.stats("ecu-2").refused == 1
    assert server.serve_once() is None and not sent
    for _ in range(3):  # the same index asked three times is pending once
        assert server.on_message(REQUEST_TOPIC, _request_payload(deploy, (1,)))
    assert server.serve_once() == 0 and server.serve_once() is None and len(sent) == 1
    server.stop()


def test_per_device_rate_cap(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 8 * BLOCK)
    deploy = make_deploy(data)
    now = [0.0]
    sent: list[tuple[float, str, int]] = []
    rate = 8192.0

    def publish(topic: str, payload: bytes) -> None:
        sent.append((now[0], topic, len(payload)))

    server = BlockServer(path, deploy, publish, devices=["a", "b"], max_bytes_per_s=rate, monotonic=lambda: now[0])
    for device in ("a", "b"):
        assert server.on_message(device_topic(DEFAULT_PREFIX, device, "ota_request"), _request_payload_for(device, deploy))
    while (wait := server.serve_once()) is not None:
        now[0] += wait
    assert len(sent) == 16
    for device in ("a", "b"):
        times = [t for t, topic, _ in sent if f"/{device}/" in topic]
        assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]  # 4 KiB per 0.5 s: 8 KiB/s, each device
    assert server.stats("a").bytes_sent == len(data)
    bucket = TokenBucket(100.0, 50.0, now=0.0)
    assert bucket.wait_s(0.0) == 0.0
    bucket.take(150, 0.0)
    assert bucket.wait_s(1.0) == pytest.approx(0.5) and bucket.wait_s(1.5) == 0.0
    with pytest.raises(ValueError, match="> 0"):
        TokenBucket(0, 1, now=0.0)


def _request_payload_for(device: str, deploy: Deploy) -> bytes:
    return BlockRequest(device_id=device, ts=None, deploy_id=deploy.deploy_id, blocks=tuple(range(8))).to_json()


def test_announce_and_install_a_real_bundle_fetched_block_by_block(tmp_path: Path, built: Built) -> None:
    data = DataDir(tmp_path / "data")
    data.add_trusted_key(built.public_key)
    verified = verify_bundle_file(built.bundle, data.trusted_keys())
    deploy = announce(verified, deploy_id="d-real", block_size=BLOCK)
    assert deploy.sha256 == hashlib.sha256(built.bundle.read_bytes()).hexdigest()
    assert (deploy.name, deploy.release, deploy.target) == (verified.manifest.name, verified.manifest.release, "ecu")
    preflight(data, deploy, device_target="ecu")
    staging = Staging(data.root / "ota", deploy)
    staged = Link(built.bundle, deploy).engine_for(staging).run()
    install_staged(data, staged, target="ecu")
    state = data.load_state()
    active = state.slots[state.active or "a"]
    assert state.trial is not None and active is not None and active.sha256 == deploy.sha256
    assert state.highest_release.get(deploy.name, 0) < deploy.release  # a trial: the floor waits for the commit

    changed = tmp_path / "changed.edgeops"
    shutil.copy(built.bundle, changed)
    verified_copy = verify_bundle_file(changed, data.trusted_keys())
    with open(changed, "r+b") as fh:
        fh.seek(700)
        fh.write(b"\0")
    with pytest.raises(SenderError, match="changed since it was verified"):
        announce(verified_copy, deploy_id="d-2")


def test_sender_refuses_a_file_of_another_size(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 3 * BLOCK)
    with pytest.raises(SenderError, match="announced"):
        BlockServer(path, make_deploy(data + b"x"), lambda t, p: None, devices=[DEVICE])
    with pytest.raises(SenderError, match="cannot open"):
        BlockServer(tmp_path / "missing", make_deploy(data), lambda t, p: None, devices=[DEVICE])


# -- end to end over a real broker -------------------------------------------------------------


def test_end_to_end_over_mosquitto_with_a_broker_restart(tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    broker = Broker(tmp_path / "broker")
    broker.start()
    path, data = _bundle(tmp_path, 1024 * 1024)
    deploy = make_deploy(data, block_size=64 * 1024)
    rate = 320 * 1024.0  # about 3.2 s for the whole file: long enough to restart the broker mid-way
    device_up, console_up = threading.Event(), threading.Event()

    console = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="console", protocol=mqtt.MQTTv5)
    console.reconnect_delay_set(min_delay=1, max_delay=1)
    server = BlockServer(path, deploy, lambda t, p: console.publish(t, p, qos=1), devices=[DEVICE], max_bytes_per_s=rate)

    def console_connected(client: mqtt.Client, *args: object) -> None:
        for topic in server.subscriptions:
            client.subscribe(topic, qos=1)
        console_up.set()

    console.on_connect = console_connected
    console.on_message = lambda c, u, m: server.on_message(m.topic, m.payload)

    device = PahoTransport("127.0.0.1", broker.port, DEVICE, reconnect_min_s=0.2, reconnect_max_s=0.5)
    block_topic = device_topic(DEFAULT_PREFIX, DEVICE, "ota_block")
    staging = Staging(tmp_path / "data" / "ota", deploy)

    def request(indexes: tuple[int, ...]) -> None:
        device.publish(REQUEST_TOPIC, _request_payload(deploy, indexes), qos=1, retain=False, seq=0)

    policy = TransferPolicy(window=4, retry_initial_s=0.5, retry_max_s=1.0, deadline_s=30, min_bytes_per_s=0)
    engine = TransferEngine(staging, request, policy=policy, clock=RealClock())

    def device_connected(present: bool) -> None:
        device.subscribe(block_topic, qos=1)
        device_up.set()

    device.on_connect = device_connected
    device.on_message = lambda topic, payload: engine.on_block(payload) if topic == block_topic else None
    restarted = threading.Event()
    at_stop: list[int] = []

    def restart_mid_way() -> None:
        while staging.received < 4:
            time.sleep(0.02)
        at_stop.append(staging.received)
        broker.stop()
        time.sleep(0.3)
        broker.start()
        restarted.set()

    try:
        console.connect_async("127.0.0.1", broker.port, clean_start=True)
        console.loop_start()
        server.start()
        device.connect(clean_start=True, session_expiry_s=0)
        assert device_up.wait(5) and console_up.wait(5)
        time.sleep(0.2)  # both subscriptions in place
        chaos = threading.Thread(target=restart_mid_way, daemon=True)
        chaos.start()
        started = time.monotonic()
        result = engine.run()
        elapsed = time.monotonic() - started
        chaos.join(timeout=5)
    finally:
        device.disconnect()
        server.stop()
        console.disconnect()
        console.loop_stop()
        broker.stop()
    assert restarted.is_set() and at_stop[0] < deploy.block_count // 2  # the outage fell mid-transfer
    assert hashlib.sha256(result.read_bytes()).hexdigest() == deploy.sha256
    assert engine.bytes_written == len(data)  # every byte written once, whatever arrived twice
    assert set(engine.refused) <= {"duplicate", "unrequested"}
    assert elapsed >= (len(data) - 64 * 1024) / rate * 0.9  # the rate cap held
    assert elapsed < 10


def test_engine_stop_supersedes(tmp_path: Path) -> None:
    _, data = _bundle(tmp_path, 2 * BLOCK)
    engine = TransferEngine(Staging(tmp_path / "ota", make_deploy(data)), lambda ix: None, clock=ManualClock())
    stop = threading.Event()
    stop.set()
    with pytest.raises(OtaError, match="stopped") as info:
        engine.run(stop)
    assert info.value.reason == "superseded"


def test_memory_stays_bounded_by_a_block_while_8_mib_go_through(tmp_path: Path) -> None:
    import tracemalloc

    path, data = _bundle(tmp_path, 8 * 1024 * 1024)
    deploy = make_deploy(data, block_size=64 * 1024)
    del data
    staging = Staging(tmp_path / "ota", deploy)
    link = Link(path, deploy)
    engine = link.engine_for(staging, TransferPolicy(window=8))
    tracemalloc.start()
    try:
        result = engine.run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stat().st_size == deploy.size and engine.bytes_written == deploy.size
    assert peak < 1024 * 1024, f"peak {peak} bytes for an 8 MiB transfer"  # a few 64 KiB blocks, never the file
    assert staging.progress("verifying").to_dict() == {
        "deploy_id": "d-1", "release": 2, "phase": "verifying", "blocks_received": 128, "blocks_total": 128,
    }  # fmt: skip
    link.server.stop()
    link.server.stop()  # idempotent
    assert link.server.on_message(REQUEST_TOPIC, _request_payload(deploy, (0,)))
    with pytest.raises(SenderError, match="cannot read block"):
        link.server.serve_once()


def test_a_write_the_disk_refuses_ends_the_transfer(tmp_path: Path) -> None:
    _, data = _bundle(tmp_path, 2 * BLOCK)
    deploy = make_deploy(data)
    staging = Staging(tmp_path / "ota", deploy)
    engine = TransferEngine(staging, lambda ix: None, policy=TransferPolicy(window=2), clock=ManualClock())
    engine.start()
    staging.close()  # the descriptor is gone, as after an I/O error
    assert engine.on_block(deploy.frame(0, data[:BLOCK]).to_bytes()) == "storage"
    with pytest.raises(TransferFailedError, match="closed") as info:
        engine.tick()
    assert info.value.reason == "storage" and staging.received == 0


def test_the_sender_depends_on_the_contract_only() -> None:
    """``edgeops_fleet`` imports ``edgeops_core``, never the agent, the toolchain or a host library."""
    code = "import sys, edgeops_fleet; print(' '.join(sorted(sys.modules)))"
    loaded = {
        m.split(".")[0]
        for m in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    }
    assert "edgeops_core" in loaded
    assert not loaded & {"edgeops_agent", "edgeops_toolchain", "torch", "tensorflow", "onnx", "paho"}


def test_a_batch_is_checked_frame_by_frame_and_made_durable_with_two_fdatasync_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data = _bundle(tmp_path, 6 * BLOCK)
    deploy = make_deploy(data)
    staging = Staging(tmp_path / "ota", deploy)
    engine = TransferEngine(staging, lambda ix: None, policy=TransferPolicy(window=4), clock=ManualClock())
    engine.start()  # blocks 0..3 outstanding
    journal_size = staging.journal_path.stat().st_size
    calls: list[tuple[str, str]] = []
    names = {staging._fd: "part", staging._journal: "journal"}  # which descriptor each call hits
    for name in ("pwrite", "write", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, *args: object, _name: str = name, _real: Callable[..., object] = real) -> object:
            calls.append((_name, names.get(fd, "?")))
            return _real(fd, *args)

        monkeypatch.setattr(os, name, spy)
    frame = {i: deploy.frame(i, data[i * BLOCK : (i + 1) * BLOCK]).to_bytes() for i in range(6)}
    corrupt = BlockFrame(tag=deploy.tag, index=1, data=data[:BLOCK]).to_bytes()
    results = engine.on_blocks([frame[2], corrupt, frame[0], frame[2], frame[5], frame[3]])
    assert results == [None, "corrupt", None, "duplicate", "unrequested", None]
    assert calls == [("pwrite", "part")] * 3 + [("fdatasync", "part"), ("write", "journal"), ("fdatasync", "journal")]
    assert staging.received == 3 and staging.missing() == [1, 4, 5]
    assert staging.journal_path.stat().st_size == journal_size + 3 * 8  # one record per written block
    assert engine.outstanding == 1 and engine.bytes_written == 3 * BLOCK
    assert engine.on_blocks([corrupt]) == ["corrupt"] and calls[-1] == ("fdatasync", "journal")  # nothing to write: no sync
    staging.close()
    assert Staging(tmp_path / "ota", deploy).missing() == [1, 4, 5]  # the batch survives a reopen


def test_a_batch_whose_journal_write_fails_leaves_no_record_and_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data = _bundle(tmp_path, 4 * BLOCK)
    deploy = make_deploy(data)
    staging = Staging(tmp_path / "ota", deploy)
    engine = TransferEngine(staging, lambda ix: None, policy=TransferPolicy(window=4), clock=ManualClock())
    engine.start()
    assert engine.on_block(deploy.frame(0, data[:BLOCK]).to_bytes()) is None
    journal = staging._journal
    real_write = os.write

    def full_disk(fd: int, payload: bytes) -> int:
        if fd == journal:  # the crash window between fsync point 1 and 2: blocks on disk, no record
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, payload)

    monkeypatch.setattr(os, "write", full_disk)
    frames = [deploy.frame(i, data[i * BLOCK : (i + 1) * BLOCK]).to_bytes() for i in (1, 2)]
    assert engine.on_blocks(frames) == ["no_space", "no_space"]
    with pytest.raises(TransferFailedError, match=r"cannot write block 1, 2") as info:
        engine.tick()
    assert info.value.reason == "no_space" and staging.received == 1
    monkeypatch.setattr(os, "write", real_write)
    staging.close()
    assert Staging(tmp_path / "ota", deploy).missing() == [1, 2, 3]  # written, never journaled: fetched again


def test_offered_frames_wait_in_a_bounded_inbox_and_run_writes_them_in_batches(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 40 * BLOCK + 7)
    deploy = make_deploy(data)
    server_out: list[bytes] = []
    server = BlockServer(path, deploy, lambda topic, payload: server_out.append(payload), devices=[DEVICE])
    staging = Staging(tmp_path / "ota", deploy)
    batches: list[int] = []

    def request(indexes: tuple[int, ...]) -> None:
        assert server.on_message(REQUEST_TOPIC, _request_payload(deploy, indexes))
        while server.serve_once() == 0:  # 0: one block sent
            pass
        for payload in server_out:  # as paho's thread would: queue, never write
            engine.offer(payload)
        server_out.clear()

    engine = TransferEngine(staging, request, policy=TransferPolicy(window=8))
    real_store = staging.store
    staging.store = lambda frames: (batches.append(len(frames)), real_store(frames))[1]  # type: ignore[method-assign]
    assert engine.run().read_bytes() == data
    assert sum(batches) == deploy.block_count and max(batches) <= 8 and len(batches) < deploy.block_count
    assert engine.dropped_frames == 0 and not engine.refused
    full = TransferEngine(Staging(tmp_path / "ota2", deploy), lambda ix: None, policy=TransferPolicy(window=1))
    assert [full.offer(b"x") for _ in range(7)] == [True] * 6 + [False]  # 2 x window + 4
    assert full.dropped_frames == 1


def test_the_sender_forgets_what_a_device_gone_offline_asked_for(tmp_path: Path) -> None:
    path, data = _bundle(tmp_path, 6 * BLOCK)
    deploy = make_deploy(data)
    sent: list[bytes] = []
    server = BlockServer(path, deploy, lambda topic, payload: sent.append(payload), devices=[DEVICE])
    assert server.on_message(REQUEST_TOPIC, _request_payload(deploy, (0, 1, 2, 3)))
    assert server.serve_once() == 0 and len(sent) == 1
    assert server.forget(DEVICE) == 3 and server.forget("ecu-unknown") == 0
    assert server.serve_once() is None and len(sent) == 1  # nothing left to send to it
    assert server.on_message(REQUEST_TOPIC, _request_payload(deploy, (2,)))  # back: it asks again
    assert server.serve_once() == 0 and BlockFrame.parse(sent[-1]).index == 2
