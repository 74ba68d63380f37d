"""Console ingest benchmark: telemetry stored per second against a raw paho subscriber, in one run.

    .venv/bin/python bench/console.py [--messages 20000] [--publishers 4] [--devices 5] [--repeat 3]
                                      [--lag-rate 200] [--lag-seconds 5] [--db URL] [--json]

One Mosquitto (tests/broker.py, started here on a free loopback port) serves every phase.
``--publishers`` K publisher clients, each in its own fresh interpreter (as devices are),
publish ``--messages`` N valid edgeops ``Telemetry`` payloads at QoS 1 (``--devices`` device
ids per publisher, round-robin, ``seq`` 1, 2, … per device, ``ts`` stamped just before each
publish). Each phase uses new device ids, so no message is ever a duplicate.

* **raw** — one paho subscriber (fresh interpreter, QoS 1, the console's MQTT 5 Receive
  Maximum) on ``rawbench/+/telemetry``; it only counts. Timed from the first publish to the
  N-th message received.
* **console** — ``edgeops fleet serve --broker … --db … --http 127.0.0.1:PORT`` as a
  subprocess (what users run), started once; its own topics. Timed from the first publish to
  the first poll of ``GET /api/stats`` (every 20 ms) that counts all N stored (committed,
  then acknowledged).

Rate = N / seconds; ratio = console / raw (medians of ``--repeat`` alternated runs; also
the median of each console run's ratio to the raw run just before it). Goal: >= 0.5.
Ingest lag (ms) is measured twice, from the rows the console stored (read back with
``Store``): **received** = a row's ``received_at`` minus its payload ``ts`` (publish →
console receipt), and **stored** = for the k-th message published, the first ``/api/stats``
poll counting k messages minus its publish time (publish → committed; an upper bound within
the 20 ms polling), once under the flood above and once **paced** at ``--lag-rate`` msg/s for
``--lag-seconds`` (a fleet's steady state), with the raw subscriber's receive lag as the
baseline of the paced run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test broker

from broker import Broker, free_port  # noqa: E402

RAW_PREFIX = "rawbench"
POLL_S = 0.02

_WORKER = r"""
import json, sys, threading, time
mode, port = sys.argv[1], int(sys.argv[2])
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
if mode == "pub":
    from edgeops_core import ModelRef, Telemetry, utc_now_text
    prefix, devices, count, rate, name = sys.argv[3], sys.argv[4].split(","), int(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
    template = Telemetry(
        device_id=devices[0], ts=utc_now_text(), seq=1, interval_s=10.0, model=ModelRef("vibration-classifier", 1),
        inference={"count": 120, "window_count": 12, "errors": {}, "error_count": 0},
        latency_ms={"p50": 0.04, "p95": 0.05, "p99": 0.06, "max": 0.1},
        drift={"alarm": False, "samples": 120, "max_psi": 0.02, "max_feature": "rms_x", "max_cusum": 0.4, "prediction_psi": 0.01},
        resources={"rss_bytes": 48_000_000, "cpu_percent": 2.5},
        outbox={"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
    ).to_dict()
    acked, done = [0], threading.Event()
    def on_publish(c, u, mid, rc, props):
        acked[0] += 1
        if acked[0] >= count:
            done.set()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.on_publish = on_publish
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(10)
    topics = [f"{prefix}/{d}/telemetry" for d in devices]
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    first = time.time()
    for i in range(count):
        if rate > 0:  # paced: message i leaves at first + i / rate
            wait = first + i / rate - time.time()
            if wait > 0:
                time.sleep(wait)
        k = i % len(devices)
        template["device_id"], template["seq"], template["ts"] = devices[k], i // len(devices) + 1, utc_now_text()
        c.publish(topics[k], json.dumps(template, separators=(",", ":")), qos=1)
    assert done.wait(300)
    print(json.dumps({"first": first, "last_ack": time.time()}), flush=True)
    c.disconnect()
    c.loop_stop()
else:
    from datetime import UTC, datetime
    topic, count, receive_max, name = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    got, done, ready = [], threading.Event(), threading.Event()
    def on_message(c, u, m):
        got.append((time.time(), m.payload))
        if len(got) >= count:
            done.set()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = receive_max  # the same flow control the console asks for
    c.connect("127.0.0.1", port, properties=props)
    c.subscribe(topic, qos=1)
    c.loop_start()
    assert ready.wait(10)
    print("ready", flush=True)
    assert done.wait(300)
    last = got[count - 1][0]
    def ts(payload):
        return datetime.strptime(json.loads(payload)["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    lags = [(t - ts(p)) * 1000 for t, p in got[:count]]
    print(json.dumps({"last": last, "lags_ms": lags}), flush=True)
    c.disconnect()
    c.loop_stop()
"""


def _spawn(*args: str) -> subprocess.Popen[str]:
    """A worker in a fresh interpreter; returns once it printed ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"a {args[0]} worker did not start")
    return proc


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.wait(timeout=60)
    if not line:
        raise SystemExit("a worker failed")
    return dict(json.loads(line))


class Load:
    """K publisher processes, connected and waiting for ``go``."""

    def __init__(self, port: int, prefix: str, tag: str, *, messages: int, publishers: int, devices: int, rate: float) -> None:
        self.devices = [[f"{tag}-{k}-{j}" for j in range(devices)] for k in range(publishers)]
        share = [messages // publishers + (1 if k < messages % publishers else 0) for k in range(publishers)]
        self.procs = [
            _spawn("pub", str(port), prefix, ",".join(ids), str(n), str(rate / publishers), f"{tag}-pub-{k}")
            for k, (ids, n) in enumerate(zip(self.devices, share, strict=True))
        ]

    @property
    def device_ids(self) -> list[str]:
        """Every device id this load publishes as."""
        return [d for ids in self.devices for d in ids]

    def go(self) -> None:
        """Start every publisher at once."""
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def results(self) -> list[dict[str, Any]]:
        """Each publisher's first-publish and last-ack times (epoch seconds)."""
        return [_result(p) for p in self.procs]


class ConsoleProcess:
    """``edgeops fleet serve`` in a subprocess, with its HTTP API on a free loopback port."""

    def __init__(self, broker_port: int, db_url: str, home: Path) -> None:
        self.http = free_port()
        self.log = home / "console.log"
        home.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "edgeops_toolchain", "fleet", "serve", "--broker", f"mqtt://127.0.0.1:{broker_port}",
                "--db", db_url, "--http", f"127.0.0.1:{self.http}"]  # fmt: skip
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "EDGEOPS_HOME": str(home)}
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.get("/api/health")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"the console did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def get(self, path: str) -> dict[str, Any]:
        """GET a JSON endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def stored(self) -> int:
        """Messages the store holds (``/api/stats``)."""
        return int(self.get("/api/stats")["store"]["messages"])

    def wait_stored(self, target: int, *, timeout_s: float = 300) -> list[tuple[float, int]]:
        """Poll ``/api/stats`` until ``target`` messages are stored; every ``(time, count)`` polled."""
        polls: list[tuple[float, int]] = []
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            n = self.stored()
            polls.append((time.time(), n))
            if n >= target:
                return polls
            time.sleep(POLL_S)
        raise SystemExit(f"the console stored {polls[-1][1]} of {target} messages in {timeout_s} s; see {self.log}")

    def stop(self) -> None:
        """SIGTERM, as an operator stops it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _epoch(ts: str) -> float:
    return datetime.strptime(ts.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _raw(port: int, run: int, args: argparse.Namespace, receive_max: int, *, rate: float, messages: int) -> dict[str, Any]:
    sub = _spawn("sub", str(port), f"{RAW_PREFIX}/+/telemetry", str(messages), str(receive_max), f"raw-sub-{run}")
    load = Load(port, RAW_PREFIX, f"r{run}", messages=messages, publishers=args.publishers, devices=args.devices, rate=rate)
    load.go()
    pubs = load.results()
    got = _result(sub)
    first = min(p["first"] for p in pubs)
    seconds = float(got["last"]) - first
    lags = got["lags_ms"]
    return {"seconds": seconds, "rate": messages / seconds, "lag_p50_ms": _pct(lags, 50), "lag_p99_ms": _pct(lags, 99)}


def _console(
    console: ConsoleProcess, db_url: str, port: int, run: int, args: argparse.Namespace, *, rate: float, messages: int, tag: str
) -> dict[str, Any]:
    from edgeops_core import DEFAULT_PREFIX
    from edgeops_fleet.store import Store

    base = console.stored()
    load = Load(
        port, DEFAULT_PREFIX, f"{tag}{run}", messages=messages, publishers=args.publishers, devices=args.devices, rate=rate
    )
    load.go()
    polls = console.wait_stored(base + messages)
    pubs = load.results()
    first = min(p["first"] for p in pubs)
    seconds = polls[-1][0] - first
    store = Store.open(db_url)
    try:
        rows = store.telemetry(load.device_ids, since=first - 60)
        stats = store.stats()
    finally:
        store.close()
    if len(rows) != messages:
        raise SystemExit(f"expected {messages} stored telemetry rows of this run, found {len(rows)}")
    received = [(float(r["received_at"]) - _epoch(str(r["ts"]))) * 1000 for r in rows]
    # Stored lag by order statistics: the k-th publish against the first poll counting k stored.
    published = sorted(_epoch(str(r["ts"])) for r in rows)
    stored_lag, i = [], 0
    for k, when in enumerate(published, start=1):
        while polls[i][1] - base < k:
            i += 1
        stored_lag.append((polls[i][0] - when) * 1000)
    return {
        "seconds": seconds,
        "rate": messages / seconds,
        "received_lag_p50_ms": _pct(received, 50),
        "received_lag_p99_ms": _pct(received, 99),
        "stored_lag_p50_ms": _pct(stored_lag, 50),
        "stored_lag_p99_ms": _pct(stored_lag, 99),
        "duplicates": stats["duplicates"],
        "gaps": stats["gaps"],
    }


def _r(x: float, n: int = 1) -> float:
    return round(x, n)


def main() -> None:
    """Run the benchmark; print a summary (or one JSON object with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000, help="telemetry messages per flood run")
    parser.add_argument("--publishers", type=int, default=4, help="publisher clients (processes)")
    parser.add_argument("--devices", type=int, default=5, help="device ids per publisher")
    parser.add_argument("--repeat", type=int, default=3, help="alternated raw/console flood runs (median)")
    parser.add_argument("--lag-rate", type=float, default=200.0, help="msg/s of the paced lag run (0: skip it)")
    parser.add_argument("--lag-seconds", type=float, default=5.0, help="length of the paced lag run")
    parser.add_argument("--db", help="console database URL [default: a new SQLite file in a temporary folder]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    from edgeops_fleet.console import RECEIVE_MAXIMUM

    with tempfile.TemporaryDirectory(prefix="edgeops-console-bench-") as name:
        tmp = Path(name)
        db_url = args.db or f"sqlite:///{tmp / 'console.sqlite'}"
        broker = Broker(tmp / "broker", persistence=False)
        broker.start()
        console: ConsoleProcess | None = None
        try:
            console = ConsoleProcess(broker.port, db_url, tmp / "home")
            _console(console, db_url, broker.port, 0, args, rate=0, messages=50, tag="warm")  # subscription in place, caches warm
            raw_runs, console_runs = [], []
            for run in range(1, args.repeat + 1):
                raw_runs.append(_raw(broker.port, run, args, RECEIVE_MAXIMUM, rate=0, messages=args.messages))
                console_runs.append(_console(console, db_url, broker.port, run, args, rate=0, messages=args.messages, tag="c"))
            paced: dict[str, Any] | None = None
            if args.lag_rate > 0:
                n = int(args.lag_rate * args.lag_seconds)
                paced = {
                    "rate_msg_s": args.lag_rate,
                    "messages": n,
                    "raw": _raw(broker.port, 99, args, RECEIVE_MAXIMUM, rate=args.lag_rate, messages=n),
                    "console": _console(console, db_url, broker.port, 99, args, rate=args.lag_rate, messages=n, tag="lag"),
                }
        finally:
            if console is not None:
                console.stop()
            broker.stop()
    raw_rate = statistics.median(r["rate"] for r in raw_runs)
    console_rate = statistics.median(r["rate"] for r in console_runs)
    paired = [c["rate"] / r["rate"] for c, r in zip(console_runs, raw_runs, strict=True)]
    flood = sorted(console_runs, key=lambda r: r["rate"])[len(console_runs) // 2]  # the median run's lag
    result = {
        "messages": args.messages,
        "publishers": args.publishers,
        "devices": args.publishers * args.devices,
        "repeat": args.repeat,
        "database": "sqlite" if args.db is None else args.db.split(":", 1)[0],
        "raw_msg_s": _r(raw_rate),
        "console_msg_s": _r(console_rate),
        "ratio": round(console_rate / raw_rate, 3),
        # Each console run against the raw run just before it: less sensitive to load that drifts across the run.
        "ratio_paired_median": round(statistics.median(paired), 3),
        "flood_received_lag_p99_ms": _r(flood["received_lag_p99_ms"]),
        "flood_stored_lag_p99_ms": _r(flood["stored_lag_p99_ms"]),
        "raw_runs": [{k: _r(v, 3) for k, v in r.items()} for r in raw_runs],
        "console_runs": [{k: _r(v, 3) for k, v in r.items()} for r in console_runs],
        "paced": None
        if paced is None
        else {
            "rate_msg_s": paced["rate_msg_s"],
            "messages": paced["messages"],
            "raw": {k: _r(v, 3) for k, v in paced["raw"].items()},
            "console": {k: _r(v, 3) for k, v in paced["console"].items()},
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.messages} QoS-1 telemetry messages from {args.publishers} publishers ({result['devices']} devices), "
        f"median of {args.repeat}, console database {result['database']}"
    )
    print(f"  raw paho subscriber   {raw_rate:9.0f} msg/s")
    print(
        f"  console (stored)      {console_rate:9.0f} msg/s   ratio {result['ratio']:.2f} (goal >= 0.5); "
        f"median of paired runs {result['ratio_paired_median']:.2f}"
    )
    print(
        f"  lag p99 under the flood: received {result['flood_received_lag_p99_ms']} ms, "
        f"stored {result['flood_stored_lag_p99_ms']} ms"
    )
    if paced is not None:
        raw, con = paced["raw"], paced["console"]
        print(
            f"  paced {paced['rate_msg_s']:g} msg/s ({paced['messages']} messages), lag p50/p99: raw received "
            f"{raw['lag_p50_ms']:.1f}/{raw['lag_p99_ms']:.1f} ms, console received {con['received_lag_p50_ms']:.1f}/"
            f"{con['received_lag_p99_ms']:.1f} ms, console stored {con['stored_lag_p50_ms']:.1f}/"
            f"{con['stored_lag_p99_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
