"""Many agents' MQTT links on one shared network loop (share_network_loop), against a real Mosquitto.

The fleet simulator runs up to 90 agents per process; with the shared loop their paho clients
are driven by one epoll thread instead of a thread each. Everything an agent's link promises
must still hold: every message arrives once and in order, commands queued in the session
arrive, a broker restart is ridden out, a clean stop sends no Last Will, and the loop itself
is one thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import Broker
from edgeops_agent import transport
from edgeops_agent.mqtt import MqttLink, MqttSettings
from edgeops_agent.outbox import Outbox


def until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def shared() -> Iterator[transport.NetworkLoop]:
    loop = transport.share_network_loop()
    assert loop is not None
    yield loop
    transport.share_network_loop(False)


class Watcher:
    """An outside subscriber: every non-retained message's seq, per device, in arrival order."""

    def __init__(self, port: int, topic: str) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.raw: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
        c.on_message = self._message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def _message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.raw.append((msg.topic, bytes(msg.payload)))
            if msg.retain:
                return
            doc = json.loads(msg.payload)
            if doc.get("seq") is not None:
                self.seqs.setdefault(msg.topic.split("/")[2], []).append(int(doc["seq"]))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Links = list[tuple[MqttLink, Outbox]]


def _links(tmp_path: Path, port: int, n: int, on_command: Callable[[str, bytes], None] | None = None) -> Links:
    settings = MqttSettings(port=port, reconnect_min_s=0.1, reconnect_max_s=0.5, keepalive_s=5)
    out = []
    for i in range(n):
        dev = f"loop-{i:02d}"
        box = Outbox(tmp_path / dev / "outbox.sqlite")

        def command(payload: bytes, dev: str = dev) -> None:
            if on_command is not None:
                on_command(dev, payload)

        link = MqttLink(settings, dev, box, offline_state={"online": False, "device_id": dev}, on_command=command)
        out.append((link, box))
    return out


def test_thirty_links_share_one_thread_and_lose_nothing(tmp_path: Path, shared: transport.NetworkLoop) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    watcher = Watcher(broker.port, "edgeops/v1/+/telemetry")
    links = _links(tmp_path, broker.port, 30)
    try:
        before = {t.name for t in threading.enumerate()}
        for link, _ in links:
            link.start()
        until(lambda: all(link.connected.is_set() for link, _ in links), what="30 connections")
        paho_threads = [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client") and t.name not in before]
        assert paho_threads == []  # the watcher has one; the links none
        for n in range(20):
            for link, box in links:
                box.put(f"edgeops/v1/{link.transport.client._client_id.decode()}/telemetry", {"n": n})
        until(lambda: sum(len(v) for v in watcher.seqs.values()) == 600, what="600 messages")
        for link, box in links:
            dev = link.transport.client._client_id.decode()
            assert watcher.seqs[dev] == list(range(1, 21)), dev  # once each, in order
            until(lambda box=box: box.stats().pending == 0, what="acks")
    finally:
        for link, box in links:
            link.stop()
            box.close()
        watcher.stop()
        broker.stop()


def test_a_broker_restart_is_ridden_out_and_queued_commands_arrive(tmp_path: Path, shared: transport.NetworkLoop) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    got: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def on_command(dev: str, payload: bytes) -> None:
        with lock:
            got.setdefault(dev, []).append(payload)

    links = _links(tmp_path, broker.port, 5, on_command)
    try:
        for link, _ in links:
            link.start()
        until(lambda: all(link.connected.is_set() for link, _ in links), what="connections")
        time.sleep(0.3)  # the SUBSCRIBEs are in the sessions
        broker.stop()
        until(lambda: not any(link.connected.is_set() for link, _ in links), what="the links to notice")
        for i, (_, box) in enumerate(links):
            box.put(f"edgeops/v1/loop-{i:02d}/telemetry", {"during": "outage"})
        broker.start()  # same port, persistence on: sessions survive
        until(lambda: all(link.connected.is_set() for link, _ in links), what="reconnections")
        until(lambda: all(box.stats().pending == 0 for _, box in links), what="the outage's messages to go out")
        console = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="console", protocol=mqtt.MQTTv5)
        console.connect("127.0.0.1", broker.port)
        console.loop_start()
        for i in range(5):
            console.publish(f"edgeops/v1/loop-{i:02d}/cmd", json.dumps({"id": f"c{i}"}), qos=1).wait_for_publish(10)
        until(lambda: len(got) == 5, what="a command per device")
        assert {dev: [json.loads(p)["id"] for p in v] for dev, v in got.items()} == {f"loop-{i:02d}": [f"c{i}"] for i in range(5)}
        console.disconnect()
        console.loop_stop()
    finally:
        for link, box in links:
            link.stop()
            box.close()
        broker.stop()


def test_a_clean_stop_sends_no_will_and_a_new_will_reaches_the_broker(tmp_path: Path, shared: transport.NetworkLoop) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    watcher = Watcher(broker.port, "edgeops/v1/+/state")
    (link, box), (other, other_box) = _links(tmp_path, broker.port, 2)
    try:
        link.start()
        other.start()
        until(lambda: link.connected.is_set() and other.connected.is_set(), what="connections")
        link.set_will({"online": False, "device_id": "loop-00", "bundle": {"release": 2}})
        until(lambda: link.connects == 2, what="the controlled reconnect for the new Will")
        link.stop()  # clean: no Will
        time.sleep(0.5)
        assert not [t for t, _ in watcher.raw if t == "edgeops/v1/loop-00/state"]
        # The other link's socket dies without a DISCONNECT: the broker publishes its Will.
        sock = other.transport.client.socket()
        assert sock is not None
        sock.shutdown(2)
        until(lambda: any(t == "edgeops/v1/loop-01/state" for t, _ in watcher.raw), what="loop-01's Will")
        until(other.connected.is_set, what="loop-01 to reconnect by itself")
    finally:
        for lk, bx in ((link, box), (other, other_box)):
            lk.stop()
            bx.close()
        watcher.stop()
        broker.stop()
