"""Fleet-scale simulator benchmark: the largest fleet that runs at 1 Hz with nothing lost.

    .venv/bin/python bench/fleet.py [--devices 250,500,1000,1500] [--duration 120] [--per-process 125]
                                    [--bundle dist/vibration-classifier-1.0.0-ecu.edgeops]
                                    [--key ~/.edgeops/keys/dev-signing.pub.pem] [--json]

Needs the README's first command to have built the ECU bundle (or ``--bundle``/``--key``).

* **raw** — the baseline, measured first in the same run: 4 publisher processes flood 20 000
  QoS 1 telemetry-sized messages into a fresh Mosquitto, and one raw paho subscriber counts
  them (bench/console.py's workers). Messages per second from the first publish to the last
  receipt: what this machine's broker and paho can move when nothing else runs.
* **fleet** — for each N of ``--devices``: ``examples/scenarios/fleet.toml`` with N devices
  (the real agent per device, ``--per-process`` devices per process, one prediction and one
  telemetry message per device per second, ``--duration`` seconds, no faults), run through
  :func:`edgeops_sim.runner.run`. Two outside subscribers listen on the bench's Mosquitto:
  **the console** (``edgeops fleet serve`` in a subprocess, SQLite store; skip it with
  ``--no-console``) and the simulator's observer. It **passes** when no message is lost
  (every seq each agent assigned arrived at the observer, or is accounted for by the agent),
  the console stored every telemetry message the observer saw, ingest latency p99 ≤ 1 s at
  both (publish ``ts`` → the subscriber's receipt; the console's ``received_at``), and every
  device serves at the end. The ladder stops at the first N that fails.

Printed per N: messages per second delivered, that rate over the raw rate (how much of the
broker's raw capacity the fleet uses), ingest p50/p99, the 1-minute load average at the end,
and the device processes' peak RSS and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from console import ConsoleProcess, Load, _epoch, _pct, _result, _spawn  # noqa: E402  (shared workers)
from edgeops_sim.broker import Broker  # noqa: E402
from edgeops_sim.runner import run  # noqa: E402
from edgeops_sim.scenario import load_scenario  # noqa: E402

RAW_MESSAGES = 20_000
RAW_PUBLISHERS = 4


def raw_rate(folder: Path) -> float:
    """Messages per second a raw paho publisher/subscriber pair moves through a fresh Mosquitto."""
    broker = Broker(folder)
    broker.start()
    try:
        sub = _spawn("sub", str(broker.port), "raw/+/telemetry", str(RAW_MESSAGES), "2000", "raw-sub")
        load = Load(broker.port, "raw", "raw", messages=RAW_MESSAGES, publishers=RAW_PUBLISHERS, devices=5, rate=0)
        load.go()
        first = min(p["first"] for p in load.results())
        got = _result(sub)
        return RAW_MESSAGES / (float(got["last"]) - first)
    finally:
        broker.stop()


def fleet(n: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One run of the fleet scenario with ``n`` devices."""
    text = (REPO / "examples" / "scenarios" / "fleet.toml").read_text()
    text = text.replace("devices = 1000", f"devices = {n}", 1)
    text = text.replace("devices = 100\n", f"devices = {max(1, n // 10)}\n", 1)  # the drifted tenth
    text = text.replace("duration_s = 120", f"duration_s = {args.duration}", 1)
    text = text.replace("start_s = 60", f"start_s = {args.duration / 2:g}", 1).replace(
        "ramp_s = 30", f"ramp_s = {args.duration / 4:g}", 1
    )
    text = text.replace("devices_per_process = 125", f"devices_per_process = {args.per_process}", 1)
    generator = REPO / "examples" / "vibration" / "vibration_data.py"
    text = text.replace('generator = "../vibration/vibration_data.py"', f'generator = "{generator}"')
    path = folder / f"fleet-{n}.toml"
    path.write_text(text)
    scenario = load_scenario(path, bundle=args.bundle.resolve(), trust=args.key.resolve())
    started = time.monotonic()
    if args.no_console:
        summary = run(scenario, folder / f"run-{n}")
        console = None
    else:
        summary, console = _with_console(scenario, folder / f"run-{n}")
    m = summary["messages"]
    lat = summary["ingest_latency_s"] or {"p50": float("nan"), "p99": float("nan")}
    cpu = sum((u["cpu_s"] or 0) for u in summary["host_usage"].values())
    # Serving CPU: from "ready" to the end (start-up, ~30 ms a device, comes before time 0).
    serving_cpu = cpu - sum((u["start_cpu_s"] or 0) for u in summary["host_usage"].values())
    return {
        "devices": n,
        "processes": summary["processes"],
        "wall_s": round(time.monotonic() - started, 1),
        "assigned": m["assigned"],
        "received": m["received"],
        "lost": m["lost"],
        "host_cpu_s": round(cpu, 1),
        "start_cpu_s": round(cpu - serving_cpu, 1),
        "cpu_ms_per_device_s": round(1000 * serving_cpu / (n * args.duration), 3),
        "duplicates": m["duplicates"],
        "delivered_per_s": round(m["received"] / args.duration, 1),
        "ingest_p50_s": lat["p50"],
        "ingest_p99_s": lat["p99"],
        "serving_at_end": summary["serving_at_end"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "host_usage": summary["host_usage"],
        "console": console,
        "passed": m["lost"] == 0
        and lat["p99"] <= 1.0
        and summary["serving_at_end"] == n
        and (console is None or (console["missing"] == 0 and console["p99_s"] <= 1.0)),
    }


def _with_console(scenario: Any, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the fleet against a broker that ``edgeops fleet serve`` also subscribes to; the
    console's view: telemetry stored per device against what the agents sent, and ingest
    latency (its ``received_at`` − the message's ``ts``)."""
    from edgeops_fleet.store import Store

    out.mkdir(parents=True)
    broker = Broker(out / "console-broker")
    broker.start()
    db_url = f"sqlite:///{out / 'console.sqlite'}"
    console = ConsoleProcess(broker.port, db_url, out / "console-home")
    try:
        t0 = time.time()
        summary = run(scenario, out / "sim", broker_url=f"mqtt://127.0.0.1:{broker.port}")
        sent = sum(d["telemetry"] for d in summary["per_device"].values())  # what the observer saw
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # let the console store its backlog
            stored = console.get("/api/stats")["store"]
            time.sleep(1.0)
            if console.get("/api/stats")["store"] == stored:
                break
    finally:
        console.stop()
        broker.stop()
    store = Store.open(db_url)
    try:
        rows = store.telemetry(sorted(summary["per_device"]), since=t0 - 60)
        stats = store.stats()
    finally:
        store.close()
    lags = [float(r["received_at"]) - _epoch(str(r["ts"])) for r in rows]
    return summary, {
        "stored_telemetry": len(rows),
        "observer_telemetry": sent,
        "missing": max(0, sent - len(rows)),
        "duplicates": stats["duplicates"],
        "gaps": stats["gaps"],
        "p50_s": round(_pct(lags, 50), 4) if lags else float("nan"),
        "p99_s": round(_pct(lags, 99), 4) if lags else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="250,500,1000,1500")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--per-process", type=int, default=125)
    ap.add_argument("--bundle", type=Path, default=REPO / "dist" / "vibration-classifier-1.0.0-ecu.edgeops")
    ap.add_argument("--key", type=Path, default=Path.home() / ".edgeops" / "keys" / "dev-signing.pub.pem")
    ap.add_argument("--no-console", action="store_true", help="only the simulator's observer subscribes (no edgeops fleet serve)")
    ap.add_argument("--scratch", type=Path, default=None, help="folder for the run's files (default: /dev/shm)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.bundle.is_file() or not args.key.is_file():
        raise SystemExit(f"no bundle {args.bundle} or key {args.key}: run the README's first command, or pass --bundle/--key")
    # The devices' data directories (outbox, journal, slots) go on a tmpfs by default: on one
    # host disk, N simulated devices' fsyncs queue behind each other (2 per message, ~0.25 ms
    # each here), which real devices, each with its own flash, never do. --scratch DIR to compare.
    scratch = args.scratch if args.scratch is not None else (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="edgeops-fleet-bench-", dir=scratch) as tmp:
        folder = Path(tmp)
        raw = raw_rate(folder / "raw-broker")
        if not args.json:
            print(f"raw paho publish -> subscribe through Mosquitto: {raw:,.0f} msg/s (QoS 1, {RAW_PUBLISHERS} publishers)")
        rows = []
        for n in (int(x) for x in args.devices.split(",")):
            row = fleet(n, args, folder)
            row["ratio_to_raw"] = round(row["delivered_per_s"] / raw, 4)
            rows.append(row)
            if not args.json:
                use = row["host_usage"]
                rss = max((u["peak_rss_mb"] or 0) for u in use.values())
                print(
                    f"{n:>5} devices in {row['processes']} processes: {'PASS' if row['passed'] else 'FAIL'}  "
                    f"delivered {row['delivered_per_s']:,.0f} msg/s = {row['ratio_to_raw']:.3f} x raw; "
                    f"lost {row['lost']}, duplicates {row['duplicates']}; "
                    f"ingest p50 {row['ingest_p50_s'] * 1000:.0f} ms p99 {row['ingest_p99_s'] * 1000:.0f} ms; "
                    f"serving {row['serving_at_end']}/{n}; load {row['load_avg_1m']}; "
                    f"host peak RSS {rss:.0f} MiB, host CPU {row['start_cpu_s']:.0f} s to start + "
                    f"{row['host_cpu_s'] - row['start_cpu_s']:.0f} s serving {args.duration:g} s "
                    f"= {row['cpu_ms_per_device_s']:.2f} ms per device-second",
                    flush=True,
                )
                c = row["console"]
                if c is not None:
                    print(
                        f"        console (edgeops fleet serve): stored {c['stored_telemetry']} of {c['observer_telemetry']} "
                        f"telemetry, missing {c['missing']}, duplicates {c['duplicates']}, gaps {c['gaps']}; "
                        f"ingest p50 {c['p50_s'] * 1000:.0f} ms p99 {c['p99_s'] * 1000:.0f} ms",
                        flush=True,
                    )
            if not row["passed"]:
                break
        passed = [r["devices"] for r in rows if r["passed"]]
        result = {"raw_msgs_per_s": round(raw, 1), "runs": rows, "largest_passing": max(passed) if passed else None}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"largest fleet at 1 Hz with nothing lost and ingest p99 <= 1 s: {result['largest_passing']}")


if __name__ == "__main__":
    main()
