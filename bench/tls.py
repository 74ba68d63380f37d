"""Mutual TLS vs plain TCP through Mosquitto: throughput and connect time, in one run.

    .venv/bin/python bench/tls.py [--messages 20000] [--connects 50] [--repeat 3] [--json]

Two Mosquitto brokers on free loopback ports, started here: one plain (tests/broker.py,
the tests' own), one running exactly what ``edgeops fleet broker-config`` writes (one
TLS 1.2+ listener, client certificates of a fresh fleet CA, CN as user name and client id,
the ACL, the CRL). On each:

* **throughput** — a publisher (a device identity on the TLS broker) sends ``--messages`` N
  telemetry-sized payloads (600 bytes, QoS 1, the agent's in-flight window of 32) to its own
  ``telemetry`` topic; a subscriber (a console identity) receives them. Timed from the first
  publish to the N-th message received. Publisher and subscriber are paho clients in this
  process, each with its own network thread, as an agent and a console are.
* **connect** — ``--connects`` sequential connections of a device (TCP, TLS handshake with
  a client certificate, MQTT CONNECT/CONNACK), each closed again: the median and p95 time to
  CONNACK. This is what a fleet pays after a broker restart, per device.

Ratios are TLS / plain (medians of ``--repeat`` alternated runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test broker

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from broker import Broker, free_port  # noqa: E402
from edgeops_fleet.link import TlsFiles  # noqa: E402
from edgeops_fleet.pki import CertificateAuthority, console_identity, write_broker_config  # noqa: E402

PAYLOAD = b"x" * 600
WINDOW = 32


def _client(client_id: str, tls: Path | None) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    if tls is not None:
        client.tls_set_context(TlsFiles.from_folder(tls).context())
    return client


def _connect(client: mqtt.Client, port: int) -> None:
    ready = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: ready.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    if not ready.wait(10):
        raise RuntimeError("no CONNACK within 10 s")


def throughput(port: int, n: int, device: tuple[str, Path | None], console: tuple[str, Path | None]) -> float:
    """Messages per second from one publisher to one subscriber."""
    topic = f"edgeops/v1/{device[0]}/telemetry"
    got = [0]
    done = threading.Event()
    sub = _client(*console)
    subscribed = threading.Event()
    sub.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()

    def on_message(c: Any, u: Any, m: Any) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    sub.on_message = on_message
    _connect(sub, port)
    sub.subscribe(topic, qos=1)
    subscribed.wait(5)
    pub = _client(*device)
    _connect(pub, port)
    start = time.perf_counter()
    for _ in range(n):
        pub.publish(topic, PAYLOAD, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"received {got[0]} of {n}")
    elapsed = time.perf_counter() - start
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return n / elapsed


def connect_times(port: int, count: int, device: tuple[str, Path | None]) -> list[float]:
    """Seconds from the start of a connection to its CONNACK, ``count`` times."""
    out = []
    for _ in range(count):
        client = _client(*device)
        ready = threading.Event()
        client.on_connect = lambda c, u, f, rc, p, ready=ready: ready.set()
        start = time.perf_counter()
        client.connect("127.0.0.1", port, keepalive=30)
        while not ready.is_set():
            client.loop(timeout=0.01)
        out.append(time.perf_counter() - start)
        client.disconnect()
        client.loop(timeout=0.01)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--connects", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    ca = CertificateAuthority.init(root / "ca")
    ca.issue("bench-dev", root / "dev")
    ca.issue(console_identity("main"), root / "console")
    tls_port = free_port()
    conf = write_broker_config(
        ca,
        root / "broker",
        port=tls_port,
        bind="127.0.0.1",
        hosts=("127.0.0.1",),
        user="root" if os.geteuid() == 0 else None,
    )
    plain = Broker(root / "plain", persistence=False)
    secure = Broker.from_config(conf, tls_port, root / "broker")
    plain.start()
    secure.start()
    try:
        rates: dict[str, list[float]] = {"plain": [], "tls": []}
        connects: dict[str, list[float]] = {"plain": [], "tls": []}
        for _ in range(args.repeat):
            rates["plain"].append(throughput(plain.port, args.messages, ("bench-dev", None), ("bench-console", None)))
            rates["tls"].append(
                throughput(tls_port, args.messages, ("bench-dev", root / "dev"), ("console:main", root / "console"))
            )
            connects["plain"] += connect_times(plain.port, args.connects, ("bench-dev", None))
            connects["tls"] += connect_times(tls_port, args.connects, ("bench-dev", root / "dev"))
    finally:
        plain.stop()
        secure.stop()
    result: dict[str, Any] = {"messages": args.messages, "repeat": args.repeat, "connects": args.connects * args.repeat}
    for mode in ("plain", "tls"):
        times = sorted(connects[mode])
        result[mode] = {
            "msg_per_s": round(statistics.median(rates[mode])),
            "connect_ms_p50": round(1000 * statistics.median(times), 2),
            "connect_ms_p95": round(1000 * times[int(0.95 * (len(times) - 1))], 2),
        }
    result["throughput_ratio"] = round(result["tls"]["msg_per_s"] / result["plain"]["msg_per_s"], 2)
    result["connect_ratio"] = round(result["tls"]["connect_ms_p50"] / result["plain"]["connect_ms_p50"], 1)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'':8} {'msg/s':>8} {'connect p50 ms':>15} {'p95 ms':>8}")
    for mode in ("plain", "tls"):
        r = result[mode]
        print(f"{mode:8} {r['msg_per_s']:>8} {r['connect_ms_p50']:>15} {r['connect_ms_p95']:>8}")
    print(f"TLS / plain: throughput {result['throughput_ratio']}, connect time x{result['connect_ratio']}")


if __name__ == "__main__":
    main()
