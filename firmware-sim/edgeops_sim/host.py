"""A device host: many simulated devices in one process, each a real agent (``python -m edgeops_sim.host``).

The runner (:mod:`edgeops_sim.runner`) starts one host per group of devices and writes the
host's spec as one JSON line on its standard input::

    {"scenario": "...toml", "bundle": "...", "trust": "...", "out": "...", "t0": null,
     "broker": ["127.0.0.1", 1883], "seed": 7,
     "devices": [{"id": "sim-0000", "port": 1883, "data_dir": "..."}, ...]}

Every device is a :class:`edgeops_agent.daemon.Daemon` (its own data directory, outbox,
command journal and MQTT session; no socket endpoint, since the host calls its agent
directly) running in a thread of its own. They share the read-only model:
:func:`edgeops_agent.runtime.share_runtimes` opens one onnxruntime session (or interpreter)
per model for the whole process instead of one per device. And they share the thread that
reads their sockets: :func:`edgeops_agent.transport.share_network_loop` drives every
device's paho client (its own socket, session, Will and callbacks) from one epoll loop
instead of a paho network thread per device.

The host's main loop ticks at the scenario's ``predict_hz``: one vectorized batch of sensor
windows for all its devices (:class:`edgeops_sim.physics.Sensors`, each device with its
quantities at that moment), one ``agent.predict`` per device, and, for a share
``labels.coverage`` of the predictions, the true label handed to ``agent.feedback`` after
``labels.delay_s``. A device whose daemon thread dies is started again (counted as a crash).

Every ``output.timeline_s`` each device appends one JSON line to ``timeline.jsonl`` in its
folder (cumulative counters, so a host killed with SIGKILL and started again carries on from
its last line). Further lines on standard input control the host: ``{"op": "skew",
"seconds": s}`` skews this process's clock (:func:`edgeops_core.set_clock_skew`) and
``{"op": "stop"}`` (or end of input) stops every device cleanly. The host prints
``{"ready": n}`` once its devices serve; on a first start (``t0`` null) it then waits for
``{"op": "go", "t0": epoch_s}`` so that every host's clock of the scenario starts together,
while a host started again after a kill gets ``t0`` in its spec. It exits 0 after a clean stop.
"""

from __future__ import annotations

import collections
import json
import logging
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeops_agent.config import load_config
from edgeops_agent.daemon import Daemon
from edgeops_agent.runtime import share_runtimes
from edgeops_agent.transport import share_network_loop
from edgeops_core import EdgeopsError, set_clock_skew
from edgeops_sim.physics import Sensors
from edgeops_sim.scenario import Scenario, load_scenario

__all__ = ["Device", "Host", "agent_toml", "main"]

log = logging.getLogger("edgeops_sim.host")

#: How long a device may take to start serving before the host gives up on it.
START_TIMEOUT_S = 120.0
#: The p99 an update's trial must meet on a simulated device (shared cores, not the target's).
TRIAL_LATENCY_BUDGET_MS = 50.0
#: The GIL switch interval of a host process (see main()).
SWITCH_INTERVAL_S = 0.005
#: Pause before a crashed device's daemon is started again.
RESTART_PAUSE_S = 0.5


def agent_toml(device_id: str, scenario: Scenario, data_dir: Path, host: str, port: int) -> str:
    """The agent.toml of one simulated device (quick reconnects, the scenario's intervals)."""
    cohort = scenario.cohort_of[device_id]
    return "\n".join(
        [
            f'device_id = "{device_id}"',
            f'target = "{scenario.target}"',
            f"data_dir = {json.dumps(str(data_dir))}",
            "[mqtt]",
            f'host = "{host}"',
            f"port = {port}",
            "keepalive_s = 5",
            "reconnect_min_s = 0.2",
            "reconnect_max_s = 2.0",
            "[telemetry]",
            f"interval_s = {max(scenario.telemetry_s, 0.5)}",
            "[outbox]",
            f"max_messages = {scenario.outbox_max_messages}",
            "[drift]",
            f"window = {scenario.drift_window}",
            "[ota]",
            # The devices of a process share its cores: the trial's latency gate gets a
            # simulator-wide budget instead of the target's (docs/simulator.md).
            f"latency_budget_ms = {TRIAL_LATENCY_BUDGET_MS}",
            "retry_initial_s = 0.5",
            "[tags]",
            f'cohort = "{cohort}"',
            'simulated = "true"',
            "",
        ]
    )


@dataclass
class Device:
    """One simulated device of this host and what it has done so far."""

    id: str
    folder: Path
    config_path: Path
    base: dict[str, float]
    daemon: Daemon | None = None
    thread: threading.Thread | None = None
    crashes: int = 0
    predictions: int = 0
    correct: int = 0
    errors: int = 0
    labels_sent: int = 0
    labels_rejected: int = 0
    labels_correct: int = 0
    window: collections.deque[bool] = field(default_factory=lambda: collections.deque(maxlen=200))
    last_error: str | None = None

    def resume(self) -> None:
        """Carry on the counters of this device's last timeline line (a restarted host)."""
        path = self.folder / "timeline.jsonl"
        if not path.is_file():
            return
        last = None
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    last = line
        if last is None:
            return
        try:
            row = json.loads(last)
        except ValueError:
            return  # a line cut by SIGKILL: start from zero rather than guess
        for key in ("predictions", "correct", "errors", "labels_sent", "labels_rejected", "labels_correct", "crashes"):
            setattr(self, key, int(row.get(key, 0)))

    def start(self) -> None:
        """Open and run this device's daemon in a thread of its own."""
        self.daemon = Daemon(load_config(self.config_path), endpoint=False)
        self.thread = threading.Thread(target=self._run, args=(self.daemon,), name=f"device-{self.id}", daemon=True)
        self.thread.start()

    def _run(self, daemon: Daemon) -> None:
        try:
            daemon.run()
        except Exception as exc:  # noqa: BLE001 - any death of a device is counted and reported
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("device %s crashed: %s", self.id, self.last_error)

    @property
    def alive(self) -> bool:
        """The device's daemon thread runs."""
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        """Stop the daemon and wait for its thread."""
        if self.daemon is not None:
            self.daemon.stop()
        if self.thread is not None:
            self.thread.join(timeout=15)


class Host:
    """The devices of one host process and their tick loop."""

    def __init__(self, spec: dict[str, Any]) -> None:
        update = spec.get("update_bundle")
        self.scenario = load_scenario(
            Path(spec["scenario"]),
            bundle=Path(spec["bundle"]),
            trust=Path(spec["trust"]),
            update_bundle=Path(update) if update else None,
        )
        self.t0 = float(spec["t0"]) if spec.get("t0") is not None else 0.0
        host, _ = spec["broker"]
        self.devices: list[Device] = []
        for d in spec["devices"]:
            folder = Path(spec["out"]) / "devices" / d["id"]
            folder.mkdir(parents=True, exist_ok=True)
            config_path = folder / "agent.toml"
            config_path.write_text(agent_toml(d["id"], self.scenario, Path(d["data_dir"]), host, int(d["port"])))
            device = Device(d["id"], folder, config_path, self.scenario.base(d["id"]))
            device.resume()
            self.devices.append(device)
        self.sensors = Sensors(self.scenario.generator, int(spec["seed"]))
        self.rng = np.random.default_rng(int(spec["seed"]) + 1)
        # (due monotonic time, device index, prediction id, true label); delay is fixed, so FIFO.
        self.labels: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self.stopping = threading.Event()

    def start(self) -> None:
        """Start every device (one shared runtime per model) and wait until each serves."""
        share_runtimes()
        share_network_loop()
        for device in self.devices:
            device.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for device in self.devices:
            assert device.daemon is not None
            while device.daemon.agent.model is None and time.monotonic() < deadline:
                time.sleep(0.05)

    def run(self) -> None:
        """Tick until told to stop."""
        period = 1.0 / self.scenario.predict_hz
        # Every host ticks from time 0. Spreading the hosts' phases over the period was tried
        # and did no better within run-to-run noise (bench/fleet.py, docs/benchmarks.md).
        next_tick = time.monotonic()
        next_line = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            if now < next_tick:
                self.stopping.wait(next_tick - now)
                continue
            next_tick += period
            if next_tick < now - 1.0:  # fell behind by more than a second: do not burst to catch up
                next_tick = now + period
            self._tick(time.time() - self.t0)
            self._labels(now)
            if now >= next_line:
                next_line = now + self.scenario.timeline_s
                self._timeline(time.time() - self.t0)
            self._revive()

    def _tick(self, t: float) -> None:
        values = [self.scenario.quantities_at(d.id, t, d.base) for d in self.devices]
        x, y = self.sensors.batch(values)
        due = time.monotonic() + self.scenario.label_delay_s
        coverage = self.scenario.label_coverage
        draws = self.rng.random(len(self.devices)) if coverage > 0 else None
        for i, device in enumerate(self.devices):
            daemon = device.daemon
            if daemon is None or not device.alive:
                continue
            try:
                p = daemon.agent.predict(x[i])
            except EdgeopsError as exc:
                device.errors += 1
                device.last_error = f"{type(exc).__name__}: {exc}"
                continue
            ok = p.class_index == int(y[i])
            device.predictions += 1
            device.correct += ok
            device.window.append(ok)
            if draws is not None and draws[i] < coverage:
                self.labels.append((due, i, p.id, int(y[i])))

    def _labels(self, now: float) -> None:
        while self.labels and self.labels[0][0] <= now:
            _, i, pid, truth = self.labels.popleft()
            device = self.devices[i]
            if device.daemon is None:
                continue
            device.labels_sent += 1
            try:
                device.labels_correct += device.daemon.agent.feedback(pid, truth)
            except EdgeopsError:
                device.labels_rejected += 1  # e.g. the model changed, or the agent restarted, since

    def _timeline(self, t: float) -> None:
        for device in self.devices:
            daemon = device.daemon
            agent = daemon.agent if daemon is not None else None
            model = agent.model if agent is not None else None
            status = agent.detector.status() if agent is not None and agent.detector is not None else None
            row = {
                "t": round(t, 3),
                "at": round(self.t0 + t, 3),
                "device": device.id,
                "cohort": self.scenario.cohort_of[device.id],
                "serving": bool(device.alive and model is not None),
                "release": model.manifest.release if model is not None else None,
                "predictions": device.predictions,
                "correct": device.correct,
                "accuracy_recent": round(sum(device.window) / len(device.window), 4) if device.window else None,
                "errors": device.errors,
                "labels_sent": device.labels_sent,
                "labels_correct": device.labels_correct,
                "labels_rejected": device.labels_rejected,
                "crashes": device.crashes,
                "drift_alarm": bool(status.alarm) if status is not None else False,
                "drift_samples": status.samples if status is not None else 0,
                "max_psi": status.max_psi if status is not None else None,
                "max_cusum": status.max_cusum if status is not None else None,
                "quantities": {k: round(v, 4) for k, v in self.scenario.quantities_at(device.id, t, device.base).items()},
                "last_error": device.last_error,
            }
            with open(device.folder / "timeline.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _revive(self) -> None:
        for device in self.devices:
            if device.thread is not None and not device.alive and not self.stopping.is_set():
                device.crashes += 1
                time.sleep(RESTART_PAUSE_S)
                try:
                    device.start()
                except EdgeopsError as exc:
                    device.last_error = f"{type(exc).__name__}: {exc}"
                    log.error("device %s does not start again: %s", device.id, exc)

    def stop(self) -> None:
        """Write a last timeline line and stop every device cleanly."""
        self.stopping.set()
        self._timeline(time.time() - self.t0)
        for device in self.devices:
            if device.daemon is not None:
                device.daemon.stop()
        for device in self.devices:
            device.stop()


def _control(host: Host) -> None:
    for line in sys.stdin:
        try:
            op = json.loads(line)
        except ValueError:
            continue
        if op.get("op") == "skew":
            set_clock_skew(float(op["seconds"]))
        elif op.get("op") == "stop":
            break
    host.stopping.set()


def main() -> int:
    """Run a host: the spec on the first line of standard input, control lines after it."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    # Each device holds ~8 descriptors (outbox and journal with their WAL files, a socket).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Hundreds of I/O threads share one GIL here, and every SQLite statement and socket call
    # hands it over (~60 context switches per device-second, measured). A shorter interval
    # than Python's 5 ms made each handover dearer: 0.5 ms cost 23 % more CPU per
    # device-second (2.83 vs 2.30 ms, bench/fleet.py, 160 devices) once the agent's idle
    # threads stopped polling; it had helped only while they polled. Set explicitly, so a
    # change is a measured one.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    spec = json.loads(sys.stdin.readline())
    host = Host(spec)
    host.start()
    started = resource.getrusage(resource.RUSAGE_SELF)
    serving = sum(d.daemon is not None and d.daemon.agent.model is not None for d in host.devices)
    print(json.dumps({"ready": serving, "cpu_s": round(started.ru_utime + started.ru_stime, 2)}), flush=True)
    if spec.get("t0") is None:  # a first start: the runner says when time 0 is, for every host at once
        for line in sys.stdin:
            op = json.loads(line)
            if op.get("op") == "go":
                host.t0 = float(op["t0"])
                break
            if op.get("op") == "stop":
                host.stopping.set()
                break
    threading.Thread(target=_control, args=(host,), name="control", daemon=True).start()
    try:
        host.run()
    finally:
        host.stop()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "stopped": len(host.devices),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
