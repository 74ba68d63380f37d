"""``edgeops demo``: the whole product in one unattended run (docs/demo.md).

A real Mosquitto (its own, on a free port, unless ``--broker``), the example built for
``ecu``, ``edgeops fleet serve`` with the autopilot in ``auto`` for one cohort, and
firmware-sim running N real agents in two cohorts. At ``SHIFT_AT_S`` the shafts of cohort
``line-b`` start turning faster (``shaft_rpm`` 1 800 → 2 700: a re-geared line). Then,
with nobody in between: the agents' drift alarms go on, the console asks them for labelled
samples, the autopilot builds a field dataset, retrains, beats the champion on held-out field
rows, signs and rolls the challenger out in waves to ``line-b``; the new model's detectors
see what they were built for and the alarms clear. The demo stops when the cohort has
recovered (every device on the new release, its detector has judged a full window of inputs
with the new reference and raised no alarm) and has been measured for
``MEASURE_AFTER_S`` more, or at the deadline.

Everything lives in ``--out``: ``EDGEOPS_HOME`` (keys, registry, console database, autopilot
runs) is ``OUT/home``, so the demo never touches the user's fleet; only the step cache is the
user's own (content-addressed, so sharing it is safe and makes the first build fast).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeops_core import EdgeopsError, InputError

__all__ = ["DemoError", "DemoOptions", "run_demo"]

#: When the shift hits cohort line-b (seconds after the devices start).
SHIFT_AT_S = 45.0
SHIFT_QUANTITY = "shaft_rpm"
SHIFT_TO = 2700.0
#: After the recovery, how long the cohort keeps being measured.
MEASURE_AFTER_S = 30.0
#: Predictions per device per second, and the share that gets its ground truth (1 s later).
PREDICT_HZ = 10.0
LABEL_COVERAGE = 0.5
DRIFT_WINDOW = 200
#: Accuracy before the shift is measured from this many seconds in (the devices warm up).
WARMUP_S = 10.0
SHIFTED = "line-b"
STEADY = "line-a"


class DemoError(EdgeopsError):
    """The demo could not be carried out (a part did not start)."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``edgeops demo`` was asked for."""

    out: Path
    devices: int = 20
    broker: str | None = None
    deadline_s: float = 540.0

    def __post_init__(self) -> None:
        if not 4 <= self.devices <= 200:
            raise InputError(f"--devices must be 4..200 (half of them get the shift), got {self.devices}")
        if not 120 <= self.deadline_s <= 3600:
            raise InputError(f"--deadline must be 120..3600 s, got {self.deadline_s:g}")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise InputError(f"--out {self.out} must be a new or empty folder (each demo writes a fresh one)")


@dataclass
class _Timeline:
    """Every device's timeline rows, read incrementally from the simulator's files."""

    folder: Path
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _offsets: dict[str, int] = field(default_factory=dict)

    def read(self) -> None:
        devices = self.folder / "devices"
        if not devices.is_dir():
            return
        for path in sorted(devices.glob("*/timeline.jsonl")):
            device = path.parent.name
            offset = self._offsets.get(device, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
            for line in chunk[:end].splitlines():
                try:
                    self.rows.setdefault(device, []).append(json.loads(line))
                except ValueError:
                    continue
            self._offsets[device] = offset + end

    def cohort(self, name: str) -> list[str]:
        return sorted(d for d, rows in self.rows.items() if rows and rows[-1].get("cohort") == name)

    def latest(self, device: str) -> dict[str, Any]:
        return self.rows[device][-1]

    def accuracy(self, devices: Sequence[str], start: float, end: float) -> tuple[float | None, int]:
        """Accuracy against ground truth of the devices' predictions made in ``[start, end]`` (epoch)."""
        correct = predictions = 0
        for d in devices:
            rows = [r for r in self.rows.get(d, ()) if "at" in r]
            before = [r for r in rows if r["at"] <= start]
            until = [r for r in rows if r["at"] <= end]
            if not until:
                continue
            a = before[-1] if before else {"predictions": 0, "correct": 0}
            b = until[-1]
            if b.get("predictions", 0) < a.get("predictions", 0):  # a restarted host: counters carried on, or not
                continue
            correct += b["correct"] - a["correct"]
            predictions += b["predictions"] - a["predictions"]
        return (correct / predictions if predictions else None), predictions


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scenario(opts: DemoOptions, bundle: Path, generator: Path, duration_s: float) -> str:
    shifted = opts.devices // 2
    return "\n".join(
        [
            "# Written by `edgeops demo`: two lines of machines; line-b's shafts turn faster from SHIFT_AT_S.",
            "[fleet]",
            f"devices = {opts.devices}",
            'target = "ecu"',
            f"duration_s = {int(duration_s)}",
            "seed = 5",
            f"generator = {json.dumps(str(generator))}",
            f"predict_hz = {PREDICT_HZ}",
            "telemetry_s = 1.0",
            f"drift_window = {DRIFT_WINDOW}",
            "",
            "[labels]",
            "delay_s = 1.0",
            f"coverage = {LABEL_COVERAGE}",
            "",
            "[output]",
            "timeline_s = 1.0",
            "",
            "[[cohort]]",
            f'name = "{STEADY}"',
            f"devices = {opts.devices - shifted}",
            "",
            "[[cohort]]",
            f'name = "{SHIFTED}"',
            f"devices = {shifted}",
            "",
            "[[drift]]",
            f'cohort = "{SHIFTED}"',
            f'quantity = "{SHIFT_QUANTITY}"',
            'kind = "abrupt"',
            f"start_s = {SHIFT_AT_S:g}",
            f"to = {SHIFT_TO:g}",
            "",
        ]
    )


class _Parts:
    """The processes the demo started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.broker: Any = None

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.broker is not None:
            self.broker.stop()


def run_demo(opts: DemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the demo (module docstring); the summary (also ``OUT/demo-summary.json``).

    Raises:
        DemoError: Mosquitto, the console or the simulator did not start, or the build failed.
    """
    from edgeops_toolchain.cache import default_cache_dir
    from edgeops_toolchain.resources import example_dir

    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    home = out / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "EDGEOPS_HOME": str(home), "EDGEOPS_CACHE_DIR": str(default_cache_dir()), "PYTHONUNBUFFERED": "1"}
    env.pop("EDGEOPS_REGISTRY", None)
    env.pop("EDGEOPS_CONSOLE_DB", None)
    project = example_dir().resolve()
    parts = _Parts()
    started = time.time()
    try:
        if opts.broker is None:
            from edgeops_sim.broker import Broker

            say("starting Mosquitto on a free loopback port")
            parts.broker = Broker(out / "broker", persistence=False)
            parts.broker.start()
            broker_url = f"mqtt://{parts.broker.host}:{parts.broker.port}"
        else:
            broker_url = opts.broker
        say("building the example for ecu (release 1, the champion)")
        build = _tool(
            env, out, "build", ["build", "--target", "ecu", "--project", str(project), "--out", str(out / "dist"), "--json"]
        )
        bundle, public_key = Path(build["bundle"]), Path(build["public_key"])
        say("starting the fleet console with the autopilot")
        console_url = _start_console(env, out, broker_url, parts)
        from edgeops_toolchain.fleet_cli import ConsoleClient

        client = ConsoleClient(console_url, None)
        client.put(
            "/api/autopilot",
            {
                "group": {"target": "ecu", "tags": {"cohort": SHIFTED}},
                "mode": "auto",
                "project": str(project),
                "champion": str(bundle),
                "public_key": str(public_key),
                "drift_devices": max(1, (opts.devices // 2) // 3),
                "drift_window_s": 60.0,
                "drift_hold_s": 45.0,
                "collect_s": 15.0,
                "margin": 0.01,
                "waves": "1,50%,100%",
                "soak_s": 15.0,
                "cooldown_s": 120.0,
                "min_labelled": 200,
            },
        )
        duration = opts.deadline_s
        scenario = out / "scenario.toml"
        scenario.write_text(_scenario(opts, bundle, project / "vibration_data.py", duration))
        say(
            f"starting {opts.devices} simulated ECUs "
            f"({opts.devices - opts.devices // 2} on {STEADY}, {opts.devices // 2} on {SHIFTED})"
        )
        sim_out = out / "sim"
        sim_log = open(out / "sim.log", "wb")  # noqa: SIM115 - the child keeps it
        sim = subprocess.Popen(
            [sys.executable, "-c", "from edgeops_sim.cli import main; main()", "run", str(scenario), "--broker", broker_url,
             "--bundle", str(bundle), "--key", str(public_key), "--out", str(sim_out), "--json"],
            stdout=subprocess.PIPE, stderr=sim_log, env=env,
        )  # fmt: skip
        sim_log.close()
        parts.procs.append(("simulator", sim))
        watch = _watch(sim, sim_out, client, say, opts, started)
        say("stopping the fleet")
        if sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
        try:
            stdout, _ = sim.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            sim.kill()
            stdout, _ = sim.communicate()
        sim_summary = _last_json(stdout)
        watch["timeline"].read()
        summary = _summarize(watch, client, opts, started, sim_summary, out)
    finally:
        parts.stop()
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from edgeops_toolchain.demo_report import write_report

    summary["report"] = str(write_report(out / "demo-report.html", summary, watch["timeline"]))
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _tool(env: Mapping[str, str], out: Path, what: str, args: list[str]) -> dict[str, Any]:
    with open(out / f"{what}.log", "wb") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeops_toolchain", *args], stdout=subprocess.PIPE, stderr=err, env=dict(env), check=False
        )
    answer = _last_json(proc.stdout)
    if proc.returncode != 0 or answer is None:
        detail = (answer or {}).get("error") if isinstance(answer, dict) else None
        raise DemoError(f"{what} failed (exit {proc.returncode}): {detail or (out / f'{what}.log')}")
    return answer


def _last_json(raw: bytes | None) -> dict[str, Any] | None:
    for line in reversed((raw or b"").decode(errors="replace").splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


def _start_console(env: Mapping[str, str], out: Path, broker_url: str, parts: _Parts) -> str:
    port = _free_port()
    log = open(out / "console.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeops_toolchain", "fleet", "serve", "--broker", broker_url,
         "--db", f"sqlite:///{out / 'home' / 'console.sqlite'}", "--http", f"127.0.0.1:{port}",
         "--client-id", f"edgeops-demo-{secrets.token_hex(4)}"],
        stdout=subprocess.DEVNULL, stderr=log, env=dict(env),
    )  # fmt: skip
    log.close()
    parts.procs.append(("console", proc))
    from edgeops_toolchain.fleet_cli import ConsoleClient

    client = ConsoleClient(f"http://127.0.0.1:{port}", None, timeout_s=5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the console exited with {proc.returncode}; see {out / 'console.log'}")
        try:
            client.get("/api/health")
            return f"http://127.0.0.1:{port}"
        except EdgeopsError:
            time.sleep(0.3)
    raise DemoError(f"the console did not answer within 60 s; see {out / 'console.log'}")


def _watch(
    sim: subprocess.Popen[bytes], sim_out: Path, client: Any, say: Callable[[str], None], opts: DemoOptions, started: float
) -> dict[str, Any]:
    """Follow the fleet until it recovered and was measured, the simulator ended, or the deadline."""
    timeline = _Timeline(sim_out)
    marks: dict[str, float] = {}
    recovered_at: float | None = None
    run: dict[str, Any] | None = None
    t0: float | None = None
    while sim.poll() is None:
        time.sleep(1.0)
        timeline.read()
        b = timeline.cohort(SHIFTED)
        if not b:
            say("provisioning the devices")
            continue
        if t0 is None:
            first = timeline.rows[b[0]][0]
            t0 = float(first["at"]) - float(first["t"])
            marks["shift"] = t0 + SHIFT_AT_S
        now = time.time()
        latest = [timeline.latest(d) for d in b]
        alarms = sum(1 for r in latest if r.get("drift_alarm"))
        if "first_alarm" not in marks and alarms:
            marks["first_alarm"] = min(float(r["at"]) for r in latest if r.get("drift_alarm"))
        runs = _runs(client)
        if runs:
            run = runs[-1]
        releases = sorted({int(r["release"]) for r in latest if isinstance(r.get("release"), int)})
        text = f"t = {now - t0:5.0f} s · {SHIFTED}: release {','.join(map(str, releases))}, drift alarms {alarms}/{len(b)}"
        acc = [float(r["accuracy_recent"]) for r in latest if isinstance(r.get("accuracy_recent"), int | float)]
        if acc:
            text += f", recent accuracy {sum(acc) / len(acc):.1%}"
        if run is not None:
            text += f" · autopilot {run['run_id']}: {run['state']}"
        say(text)
        if (
            recovered_at is None
            and run is not None
            and run["state"] == "deployed"
            and all(_judged_clean(r, run.get("release")) for r in latest)
        ):
            recovered_at = now
            marks["recovered"] = now
            say(f"recovered {now - marks['shift']:.0f} s after the shift; measuring for {MEASURE_AFTER_S:g} s more")
        if recovered_at is not None and now - recovered_at >= MEASURE_AFTER_S:
            break
        if now - started >= opts.deadline_s:
            say("the deadline passed before the fleet recovered")
            break
    marks["end"] = time.time()
    return {"timeline": timeline, "marks": marks, "t0": t0}


def _judged_clean(row: Mapping[str, Any], release: object) -> bool:
    """Serving ``release``, its detector has judged at least a full window of inputs, and no alarm."""
    return row.get("release") == release and int(row.get("drift_samples") or 0) >= DRIFT_WINDOW and not row.get("drift_alarm")


def _runs(client: Any) -> list[dict[str, Any]]:
    try:
        doc = client.get("/api/autopilot/runs")
    except EdgeopsError:
        return []
    runs = doc.get("runs") if isinstance(doc, dict) else None
    return sorted(runs, key=lambda r: r["created_at"]) if isinstance(runs, list) else []


def _summarize(
    watch: dict[str, Any], client: Any, opts: DemoOptions, started: float, sim: dict[str, Any] | None, out: Path
) -> dict[str, Any]:
    timeline: _Timeline = watch["timeline"]
    marks: dict[str, float] = dict(watch["marks"])
    t0 = watch["t0"]
    b, a = timeline.cohort(SHIFTED), timeline.cohort(STEADY)
    runs = _runs(client)
    run = runs[-1] if runs else None
    rollout = None
    if run and run.get("rollout_id"):
        try:
            rollout = client.get(f"/api/rollouts/{run['rollout_id']}")
        except EdgeopsError:
            rollout = None
    if run is not None:
        marks["triggered"] = float(run["created_at"])
        for step in run.get("steps") or []:
            key = {"building": "building", "evaluating": "built", "rolling_out": "rollout"}.get(step.get("state") or "")
            if key and key not in marks:
                marks[key] = float(step["at"])
    waves = []
    if isinstance(rollout, dict):
        for w in rollout.get("waves") or []:
            if w.get("started_at"):
                waves.append({"index": w.get("index"), "started_at": w["started_at"], "devices": len(w.get("devices") or []),
                              "passed": w.get("passed")})  # fmt: skip
    shift = marks.get("shift")
    first_new = None
    if run and run.get("release"):
        times = [float(r["at"]) for d in b for r in timeline.rows.get(d, ()) if r.get("release") == run["release"]]
        first_new = min(times) if times else None
    recovered = marks.get("recovered")
    before = timeline.accuracy(b, t0 + WARMUP_S, shift) if t0 is not None and shift else (None, 0)
    after = timeline.accuracy(b, shift + 5.0, first_new or marks["end"]) if shift else (None, 0)
    recovered_acc = timeline.accuracy(b, recovered, marks["end"]) if recovered else (None, 0)
    steady = timeline.accuracy(a, t0 + WARMUP_S, marks["end"]) if t0 is not None else (None, 0)
    within = recovered_acc[0] is not None and before[0] is not None and recovered_acc[0] >= before[0] - 0.02
    psi_after = [timeline.latest(d).get("max_psi") for d in b] if b else []
    return {
        "ok": bool(recovered and within),
        "devices": opts.devices,
        "shift": {"cohort": SHIFTED, "quantity": SHIFT_QUANTITY, "to": SHIFT_TO, "at_s": SHIFT_AT_S},
        "recovered": recovered is not None,
        "recovery_s": round(recovered - shift, 1) if recovered and shift else None,
        "accuracy": {
            "before_shift": _r(before[0]),
            "after_shift": _r(after[0]),
            "after_recovery": _r(recovered_acc[0]),
            "steady_cohort": _r(steady[0]),
            "predictions": {"before_shift": before[1], "after_shift": after[1], "after_recovery": recovered_acc[1]},
        },
        "within_2_points": within,
        "final_max_psi": {d: timeline.latest(d).get("max_psi") for d in b},
        "final_alarms": sum(1 for d in b if timeline.latest(d).get("drift_alarm")),
        "final_max_psi_max": max((p for p in psi_after if isinstance(p, int | float)), default=None),
        "run": run,
        "runs": len(runs),
        "waves": waves,
        "marks": {k: round(v - t0, 1) for k, v in marks.items()} if t0 is not None else {},
        "marks_epoch": marks,
        "t0": t0,
        "wall_s": round(time.time() - started, 1),
        "simulator": {k: v for k, v in (sim or {}).items() if k in ("ok", "messages", "serving", "out")},
        "out": str(out),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """What the demo prints at the end."""
    acc = summary["accuracy"]
    run = summary.get("run") or {}
    metrics = run.get("metrics") or {}

    def pct(v: object) -> str:
        return f"{v:.1%}" if isinstance(v, int | float) else "-"

    lines = [
        f"shift: {summary['shift']['quantity']} → {summary['shift']['to']:g} on cohort {summary['shift']['cohort']} "
        f"({summary['devices'] // 2} of {summary['devices']} devices) at t = {summary['shift']['at_s']:g} s",
        f"accuracy on {summary['shift']['cohort']} (ground truth): before the shift {pct(acc['before_shift'])}, "
        f"after it {pct(acc['after_shift'])}, after recovery {pct(acc['after_recovery'])} "
        f"(steady cohort {pct(acc['steady_cohort'])})",
    ]
    if run:
        lines.append(
            f"autopilot run {run.get('run_id')}: {run.get('trigger')} → {run.get('state')}; champion "
            f"{pct(metrics.get('champion_accuracy'))} vs challenger {pct(metrics.get('challenger_accuracy'))} on "
            f"{metrics.get('holdout_rows')} held-out field rows; release {run.get('release')}; "
            f"dataset {(run.get('datasets') or ['-'])[0]}"
        )
    else:
        lines.append("the autopilot never ran")
    if summary["recovered"]:
        lines.append(
            f"recovered {summary['recovery_s']:g} s after the shift (goal ≤ 300 s); drift alarms left: {summary['final_alarms']}"
        )
    else:
        lines.append("NOT recovered before the deadline")
    lines.append(
        f"{'ok' if summary['ok'] else 'FINDINGS'}: accuracy after recovery {'is' if summary['within_2_points'] else 'is NOT'} "
        f"within 2 points of before the shift; the whole demo took {summary['wall_s']:g} s"
    )
    messages = (summary.get("simulator") or {}).get("messages") or {}
    if messages:
        lines.append(
            f"messages: {messages.get('assigned')} sent by the devices, {messages.get('received')} received, "
            f"{messages.get('lost')} lost, {messages.get('duplicates')} duplicates (the simulator's observer)"
        )
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return lines
