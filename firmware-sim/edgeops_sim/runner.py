"""Run a scenario: broker, device hosts, the outside observer, the fault schedule, the accounting.

:func:`run` does the whole run and returns the summary (also written to ``summary.json``):

1. The broker: the simulator's own Mosquitto on a free loopback port (persistence on), or
   the one ``--broker`` names (then a ``broker_restart`` fault is refused: it cannot restart
   somebody else's broker).
2. One data directory per device, provisioned like a factory image: the bundle is verified
   and installed once into a template (the real ``install_bundle``), which is copied per
   device. A device with a ``disk_full`` fault gets its data directory on a tmpfs of its
   own (root only), which the fault fills to the last byte; a device with a ``network_cut``
   talks to the broker through its own :class:`~edgeops_sim.proxy.NetworkLink`.
3. The observer (:class:`~edgeops_sim.observer.Observer`) subscribes before any device starts.
4. Hosts (:mod:`edgeops_sim.host`): devices killed with SIGKILL or clock-skewed get a process
   of their own (the fault hits that process only); the others share processes of
   ``devices_per_process``. When every host is ready, time 0 of the scenario is given to all.
5. Faults fire at their times (each recorded with the time it really happened); a host that
   dies unasked is started again and counted.
6. At the end the hosts stop cleanly, and each device's outbox is read back: every seq the
   agent ever assigned was either received by the observer, is still pending on the device
   (sent at its next start), or was dropped (outbox cap), superseded (a newer state) or
   quarantined, each counted by the agent. What is left is **lost**.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np

from edgeops_agent.install import install_bundle
from edgeops_agent.outbox import Outbox
from edgeops_agent.store import DataDir
from edgeops_core import load_public_key, verify_bundle_file
from edgeops_sim.broker import Broker
from edgeops_sim.errors import ScenarioError, SimError
from edgeops_sim.observer import Observer
from edgeops_sim.proxy import NetworkLink
from edgeops_sim.scenario import Fault, Scenario
from edgeops_sim.updates import UpdateSender

__all__ = ["DISK_SIZE", "Run", "parse_broker_url", "run"]

#: Size of the tmpfs a ``disk_full`` device's data directory lives on.
DISK_SIZE = "16m"
#: How long the end of a run waits for the observer to receive what the devices sent.
SETTLE_S = 20.0
#: How long the end of a run waits for an over-the-air update's final event.
UPDATE_SETTLE_S = 60.0
#: The byte rate of an update that a SIGKILL must hit in the middle of.
SLOW_UPDATE_BYTES_PER_S = 24_000.0
READY_TIMEOUT_S = 300.0

Progress = Callable[[float, str], None]


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (port 1883 when left out) → ``(host, port)``.

    Raises:
        ScenarioError: not an ``mqtt://`` URL.
    """
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ScenarioError(f"--broker {url!r}: expected mqtt://HOST[:PORT]")
    try:
        port = parts.port or 1883
    except ValueError:
        raise ScenarioError(f"--broker {url!r}: the port is not a number from 1 to 65535") from None
    return parts.hostname, port


@dataclass
class _Host:
    """One host process and its devices."""

    name: str
    devices: list[dict[str, Any]]
    seed: int
    proc: subprocess.Popen[bytes] | None = None
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    restarts: int = 0
    expected_exit: bool = False
    usage: dict[str, Any] = field(default_factory=dict)
    start_cpu_s: float | None = None  # CPU the first start took, up to serving
    reader: threading.Thread | None = None

    def send(self, op: dict[str, Any]) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write((json.dumps(op) + "\n").encode())
                self.proc.stdin.flush()


@dataclass
class Run:
    """One run of a scenario (see the module docstring)."""

    scenario: Scenario
    out: Path
    broker_url: str | None = None
    progress: Progress | None = None
    faults_log: list[dict[str, Any]] = field(default_factory=list)
    _mounts: list[Path] = field(default_factory=list)
    _links: dict[str, NetworkLink] = field(default_factory=dict)
    _hosts: list[_Host] = field(default_factory=list)
    _updates: dict[str, UpdateSender] = field(default_factory=dict)
    #: Set to end the run before its duration (SIGTERM does it): the devices stop cleanly and
    #: the summary is written as at a normal end (``edgeops demo`` stops the fleet this way).
    stop_requested: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        s = self.scenario
        if s.bundle is None or s.trust is None:
            raise ScenarioError(f"{s.source}: fleet.bundle and fleet.trust (or --bundle and --key) are required")
        for what, path in (("fleet.bundle", s.bundle), ("fleet.trust", s.trust)):
            if not path.is_file():
                raise ScenarioError(f"{s.source}: {what} {path} is not a file")
        if self.broker_url is not None and any(f.kind == "broker_restart" for f in s.faults):
            raise ScenarioError(f"{s.source}: a broker_restart fault needs the simulator's own broker (drop --broker to use it)")
        if self.out.exists() and any(self.out.iterdir()):
            raise ScenarioError(f"output folder {self.out} is not empty (each run writes a fresh one)")
        if s.update_bundle is not None and not s.update_bundle.is_file():
            raise ScenarioError(f"{s.source}: fleet.update_bundle {s.update_bundle} is not a file")
        if any(f.kind == "disk_full" for f in s.faults) and os.geteuid() != 0:
            raise ScenarioError(f"{s.source}: a disk_full fault mounts a tmpfs per device and needs root")

    def _say(self, fraction: float, text: str) -> None:
        if self.progress is not None:
            self.progress(fraction, text)

    # set-up --------------------------------------------------------------------------------

    def _provision(self) -> dict[str, Path]:
        s = self.scenario
        assert s.bundle is not None
        assert s.trust is not None
        template = self.out / "template"
        template.mkdir(parents=True)
        data = DataDir(template)
        data.add_trusted_key(s.trust)
        installed = install_bundle(data, s.bundle, target=s.target)
        if s.update_bundle is not None and any(f.ota for f in s.faults):
            update = verify_bundle_file(s.update_bundle, [load_public_key(s.trust)])
            if update.manifest.release <= installed.release or update.manifest.name != installed.name:
                raise ScenarioError(
                    f"{s.source}: fleet.update_bundle must be a newer release of {installed.name} than {installed.release}, "
                    f"got {update.manifest.name} release {update.manifest.release}"
                )
        full = {f.device for f in s.faults if f.kind == "disk_full" and f.device}
        dirs: dict[str, Path] = {}
        for device in s.device_ids:
            if device in full:
                mount = self.out / "disks" / device
                mount.mkdir(parents=True)
                done = subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs", str(mount)],
                    capture_output=True,
                    check=False,
                )
                if done.returncode != 0:
                    raise SimError(f"cannot mount a tmpfs for {device}'s disk_full fault: {done.stderr.decode().strip()}")
                self._mounts.append(mount)
                target = mount / "data"
            else:
                target = self.out / "devices" / device / "data"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(template, target, ignore=shutil.ignore_patterns("*.lock", "*.sock"))
            dirs[device] = target
        return dirs

    def _plan_hosts(self, dirs: dict[str, Path], host: str, port: int) -> None:
        s = self.scenario
        solo = s.solo()
        for f in s.faults:
            if f.kind == "network_cut" and f.device and f.device not in self._links:
                self._links[f.device] = NetworkLink(host, port)

        def entry(device: str) -> dict[str, Any]:
            link = self._links.get(device)
            return {"id": device, "port": link.port if link else port, "data_dir": str(dirs[device])}

        shared = [d for d in s.device_ids if d not in solo]
        for i in range(0, len(shared), s.devices_per_process):
            self._hosts.append(_Host(f"host-{len(self._hosts)}", [entry(d) for d in shared[i : i + s.devices_per_process]], 0))
        for device in sorted(solo):
            self._hosts.append(_Host(f"solo-{device}", [entry(device)], 0))
        for i, h in enumerate(self._hosts):
            h.seed = s.seed * 10_007 + i

    def _spawn(self, h: _Host, host: str, port: int, t0: float | None) -> None:
        s = self.scenario
        spec = {
            "scenario": str(s.source),
            "bundle": str(s.bundle),
            "trust": str(s.trust),
            "update_bundle": str(s.update_bundle) if s.update_bundle else None,
            "out": str(self.out),
            "t0": t0,
            "broker": [host, port],
            "seed": h.seed + 7919 * h.restarts,
            "devices": h.devices,
        }
        log = open(self.out / "hosts" / f"{h.name}.log", "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        h.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeops_sim.host"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env
        )
        log.close()
        h.lines = queue.Queue()
        h.reader = threading.Thread(target=_read_lines, args=(h.proc.stdout, h.lines), daemon=True)
        h.reader.start()
        h.expected_exit = False
        h.send(spec)

    # the run -------------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        """Carry the run out and return its summary (also written to ``summary.json``)."""
        s = self.scenario
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "hosts").mkdir()
        broker: Broker | None = None
        observer: Observer | None = None
        try:
            self._say(0.0, "starting the broker")
            if self.broker_url is None:
                broker = Broker(self.out / "broker")
                broker.start()
                host, port = broker.host, broker.port
            else:
                host, port = parse_broker_url(self.broker_url)
            self._say(0.0, f"provisioning {s.devices} devices")
            dirs = self._provision()
            observer = Observer(host, port)
            observer.start()
            self._plan_hosts(dirs, host, port)
            self._say(0.0, f"starting {len(self._hosts)} device processes")
            for h in self._hosts:
                self._spawn(h, host, port, None)
            ready = 0
            for h in self._hosts:
                line = _wait_line(h, "ready", READY_TIMEOUT_S)
                ready += int(line["ready"])
                h.start_cpu_s = line.get("cpu_s")
            self._start_updates(host, port)
            t0 = self._t0 = time.time()
            for h in self._hosts:
                h.send({"op": "go", "t0": t0})
            self._timeline(t0, broker, host, port)
            self._settle_updates(host, port, t0)
            self._say(1.0, "stopping the devices")
            self._stop_hosts()
            summary = self._account(observer, dirs, t0, ready)
        finally:
            for h in self._hosts:
                if h.proc is not None and h.proc.poll() is None:
                    h.proc.kill()
                    h.proc.wait()
            for sender in self._updates.values():
                sender.stop()
            if observer is not None:
                observer.stop()
            for link in self._links.values():
                link.close()
            if broker is not None:
                broker.stop()
            for mount in self._mounts:
                subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _start_updates(self, host: str, port: int) -> None:
        """One connected update sender per over-the-air fault (nothing is sent before its time)."""
        s = self.scenario
        for f in s.faults:
            if f.ota and f.device is not None and s.update_bundle is not None and s.trust is not None:
                sender = UpdateSender(
                    host, port, s.update_bundle, s.trust, f.device,
                    corrupt_first=f.kind == "ota_corrupt_block",
                    max_bytes_per_s=SLOW_UPDATE_BYTES_PER_S if f.during_ota else None,
                )  # fmt: skip
                sender.start()
                self._updates[f.device] = sender

    def _stop_hosts(self) -> None:
        """Stop every host cleanly (kill one that does not stop in a minute) and keep its usage."""
        for h in self._hosts:
            h.expected_exit = True
            h.send({"op": "stop"})
        for h in self._hosts:
            if h.proc is not None:
                try:
                    h.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    h.proc.kill()
                    h.proc.wait()
            with contextlib.suppress(SimError):
                h.usage = _wait_line(h, "stopped", 2.0)

    def _timeline(self, t0: float, broker: Broker | None, host: str, port: int) -> None:
        """Fire the faults at their times until the run's duration is over; revive dead hosts."""
        s = self.scenario
        # (time, order, action): faults and the ends of the faults that have one.
        todo: list[tuple[float, int, Callable[[], None]]] = []
        for i, f in enumerate(s.faults):
            todo.append((f.at_s, 2 * i, functools.partial(self._begin, f, broker, host, port)))
            if f.ends:
                todo.append((f.at_s + f.duration_s, 2 * i + 1, functools.partial(self._end, f, broker, host, port, t0)))
        todo.sort(key=lambda x: (x[0], x[1]))
        while True:
            t = time.time() - t0
            while todo and todo[0][0] <= t:
                todo.pop(0)[2]()
            if t >= s.duration_s or self.stop_requested.is_set():
                return
            self._revive(host, port, t0)
            self._say(min(t / s.duration_s, 1.0), f"t = {t:5.1f} s of {s.duration_s:g} s")
            wait = min(0.25, (todo[0][0] - t) if todo else 0.25, s.duration_s - t)
            self.stop_requested.wait(max(wait, 0.0))

    def _log(self, f: Fault, phase: str, **extra: Any) -> None:
        self.faults_log.append({"t": round(time.time() - self._t0, 3), "phase": phase, **f.to_dict(), **extra})

    _t0: float = 0.0

    def _begin(self, f: Fault, broker: Broker | None, host: str, port: int) -> None:
        if f.kind == "broker_restart":
            assert broker is not None
            broker.stop()
        elif f.kind == "network_cut":
            self._links[f.device or ""].cut()
        elif f.kind == "ota_corrupt_block":
            self._updates[str(f.device)].send()
        elif f.kind == "agent_kill":
            extra: dict[str, Any] = {}
            if f.during_ota:
                sender = self._updates[str(f.device)]
                sender.send()
                if not sender.wait_transfer_started(10.0):
                    raise SimError(f"the update to {f.device} did not start within 10 s: no kill during a transfer")
                extra["blocks_sent_before_kill"] = sender.server.stats(str(f.device)).blocks_sent
                extra["blocks"] = sender.deploy.block_count
            h = self._host_of(f.device)
            h.expected_exit = True
            if h.proc is not None:
                h.proc.send_signal(signal.SIGKILL)
                h.proc.wait()
            self._log(f, "begin", **extra)
            return
        elif f.kind == "disk_full":
            _fill(self._disk_of(f.device) / "filler")
        elif f.kind == "clock_skew":
            self._host_of(f.device).send({"op": "skew", "seconds": f.skew_s})
        self._log(f, "begin")

    def _end(self, f: Fault, broker: Broker | None, host: str, port: int, t0: float) -> None:
        if f.kind == "broker_restart":
            assert broker is not None
            broker.start()
        elif f.kind == "network_cut":
            self._links[f.device or ""].restore()
        elif f.kind == "agent_kill":
            h = self._host_of(f.device)
            h.restarts += 1
            self._spawn(h, host, port, t0)
        elif f.kind == "disk_full":
            (self._disk_of(f.device) / "filler").unlink(missing_ok=True)
        self._log(f, "end")

    def _settle_updates(self, host: str, port: int, t0: float) -> None:
        """Wait (a bounded time) for every update's final event, keeping the devices running."""
        deadline = time.monotonic() + UPDATE_SETTLE_S
        while any(u.outcome is None for u in self._updates.values()) and time.monotonic() < deadline:
            self._revive(host, port, t0)
            self._say(1.0, "waiting for the over-the-air updates to end")
            time.sleep(0.25)
        for f in self.scenario.faults:
            sender = self._updates.get(str(f.device)) if f.ota else None
            if sender is not None:  # the update's final event ends the fault
                ended = sender.ended_at if sender.ended_at is not None else time.time()
                outcome = sender.report()["outcome"] or "no final event"
                phase = "end" if f.kind == "ota_corrupt_block" else "update_end"  # a kill's end is its restart
                self.faults_log.append({"t": round(ended - t0, 3), "phase": phase, **f.to_dict(), "update": outcome})

    def _host_of(self, device: str | None) -> _Host:
        return next(h for h in self._hosts if any(d["id"] == device for d in h.devices))

    def _disk_of(self, device: str | None) -> Path:
        return self.out / "disks" / str(device)

    def _revive(self, host: str, port: int, t0: float) -> None:
        for h in self._hosts:
            if h.proc is not None and not h.expected_exit and h.proc.poll() is not None:
                h.restarts += 1
                self.faults_log.append(
                    {
                        "t": round(time.time() - t0, 3),
                        "phase": "crash",
                        "kind": "host_crash",
                        "host": h.name,
                        "returncode": h.proc.returncode,
                    }
                )
                self._spawn(h, host, port, t0)

    # accounting ----------------------------------------------------------------------------

    def _account(self, observer: Observer, dirs: dict[str, Path], t0: float, ready: int) -> dict[str, Any]:
        s = self.scenario
        outboxes: dict[str, Any] = {}
        for device, path in dirs.items():
            outbox = Outbox(DataDir(path).outbox_path)
            try:
                outboxes[device] = outbox.stats()
            finally:
                outbox.close()
        # The observer may still be receiving what the broker took just before the stop.
        deadline = time.monotonic() + SETTLE_S
        while True:
            seen = observer.snapshot()
            missing = sum(
                max(
                    0,
                    st.last_seq
                    - st.pending
                    - st.dropped
                    - st.superseded
                    - st.quarantined
                    - len(seen[d].seqs if d in seen else ()),
                )
                for d, st in outboxes.items()
            )
            if missing == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        summary = summarize(s, seen, outboxes, self.faults_log, self._timeline_rows(), t0, ready, len(self._hosts), self._hosts)
        summary["updates"] = [u.report() for u in self._updates.values()]
        return summary

    def _timeline_rows(self) -> dict[str, dict[str, Any]]:
        """Each device's last timeline line."""
        last: dict[str, dict[str, Any]] = {}
        for device in self.scenario.device_ids:
            path = self.out / "devices" / device / "timeline.jsonl"
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    last[device] = json.loads(line)
        return last


def summarize(
    s: Scenario,
    seen: dict[str, Any],
    outboxes: dict[str, Any],
    faults: list[dict[str, Any]],
    last: dict[str, dict[str, Any]],
    t0: float,
    ready: int,
    processes: int,
    hosts: list[_Host],
) -> dict[str, Any]:
    """The run's summary (see docs/simulator.md for every field)."""
    skewed = {f.device for f in s.faults if f.kind == "clock_skew"}
    per_device: dict[str, Any] = {}
    totals = dict.fromkeys(("assigned", "received", "duplicates", "pending", "dropped", "superseded", "quarantined", "lost"), 0)
    latencies: list[float] = []
    for device in s.device_ids:
        st = outboxes[device]
        got = seen.get(device)
        seqs = got.seqs if got is not None else set()
        received = len(seqs)
        explained = st.pending + st.dropped + st.superseded + st.quarantined
        lost = max(0, st.last_seq - received - explained)
        gaps = st.last_seq - received
        row = {
            "cohort": s.cohort_of[device],
            "assigned": st.last_seq,
            "received": received,
            "duplicates": got.duplicates if got is not None else 0,
            "pending": st.pending,
            "dropped": st.dropped,
            "superseded": st.superseded,
            "quarantined": st.quarantined,
            "missing_seqs": gaps,
            "lost": lost,
            "telemetry": (got.by_kind.get("telemetry", 0) if got is not None else 0),
            "serving_at_end": bool(last.get(device, {}).get("serving", False)),
            "release": last.get(device, {}).get("release"),
            "crashes": int(last.get(device, {}).get("crashes", 0)),
            "predictions": int(last.get(device, {}).get("predictions", 0)),
            "correct": int(last.get(device, {}).get("correct", 0)),
            "labels_sent": int(last.get(device, {}).get("labels_sent", 0)),
            "labels_rejected": int(last.get(device, {}).get("labels_rejected", 0)),
        }
        for k in totals:
            totals[k] += row.get(k, 0)
        row["ingest_latency_p50_s"] = round(float(np.median(got.latencies)), 4) if got is not None and got.latencies else None
        if got is not None and device not in skewed:
            latencies.extend(got.latencies)
        alarms = [t - t0 for t, kind in (got.drift if got is not None else []) if kind == "drift_alarm"]
        row["drift_alarms_at_s"] = [round(a, 2) for a in alarms]
        per_device[device] = row
    cohorts: dict[str, Any] = {}
    for c in s.cohorts:
        starts = [d.start_s for d in s.drifts if d.cohort == c.name]
        start = min(starts) if starts else None
        alarmed = [d for d in c.devices if any(start is not None and a >= start for a in per_device[d]["drift_alarms_at_s"])]
        false = sum(1 for d in c.devices for a in per_device[d]["drift_alarms_at_s"] if start is None or a < start)
        delays = [
            min(a for a in per_device[d]["drift_alarms_at_s"] if start is not None and a >= start) - (start or 0.0)
            for d in alarmed
        ]
        preds = sum(per_device[d]["predictions"] for d in c.devices)
        cohorts[c.name] = {
            "devices": len(c.devices),
            "drifted": start is not None,
            "drift_start_s": start,
            "devices_alarmed_after_drift": len(alarmed),
            "false_alarms": false,
            "alarm_delay_s": {"min": round(min(delays), 2), "max": round(max(delays), 2)} if delays else None,
            "accuracy": round(sum(per_device[d]["correct"] for d in c.devices) / preds, 4) if preds else None,
        }
    lat = np.asarray(latencies) if latencies else None
    serving = sum(r["serving_at_end"] for r in per_device.values())
    return {
        "scenario": str(s.source),
        "devices": s.devices,
        "processes": processes,
        "ready_at_start": ready,
        "serving_at_end": serving,
        "duration_s": s.duration_s,
        "messages": totals,
        "ingest_latency_s": (
            {
                "p50": round(float(np.percentile(lat, 50)), 4),
                "p99": round(float(np.percentile(lat, 99)), 4),
                "max": round(float(lat.max()), 4),
                "n": int(lat.size),
            }
            if lat is not None
            else None
        ),
        "host_restarts": {h.name: h.restarts for h in hosts if h.restarts},
        "host_usage": {
            h.name: {
                "devices": len(h.devices),
                "peak_rss_mb": h.usage.get("peak_rss_mb"),
                "cpu_s": h.usage.get("cpu_s"),
                "start_cpu_s": h.start_cpu_s,
            }
            for h in hosts
        },
        "device_crashes": sum(r["crashes"] for r in per_device.values()),
        "cohorts": cohorts,
        "faults": faults,
        "truth": s.truth(),
        "ok": totals["lost"] == 0 and serving == s.devices,
        "per_device": per_device,
    }


def _fill(path: Path) -> None:
    """Write ``path`` until its file system is full to the last byte."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (65536, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


def _read_lines(stream: IO[bytes] | None, into: queue.Queue[dict[str, Any]]) -> None:
    if stream is None:
        return
    for raw in stream:
        with contextlib.suppress(ValueError):
            into.put(json.loads(raw))


def _wait_line(h: _Host, key: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = h.lines.get(timeout=0.5)
        except queue.Empty:
            if h.proc is not None and h.proc.poll() is not None:
                if h.reader is not None and h.reader.is_alive():
                    h.reader.join(timeout=2)  # what it printed before it exited is still on its way
                    continue
                if not h.lines.empty():
                    continue
                raise SimError(
                    f"device process {h.name} exited with {h.proc.returncode} before it was ready (see its log)"
                ) from None
            if time.monotonic() > deadline:
                raise SimError(f"device process {h.name} was not ready in {timeout:g} s") from None
            continue
        if key in line:
            return line


def run(scenario: Scenario, out: Path, *, broker_url: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Run ``scenario`` with its output in ``out`` (see the module docstring)."""
    r = Run(scenario, out, broker_url, progress)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: r.stop_requested.set())
    try:
        return r.execute()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
