"""The console's autopilot: drift → field samples → retrain → challenger vs champion → staged rollout.

This is the seed essay's MLOps level 2 for models on devices: new labelled data, model
degradation, a schedule or a person's request triggers a retrain and a redeploy, with no
person needed in between (mode ``auto``), or with one approval (mode ``propose``).

Per group (a target and tags, as rollouts use them) the console keeps an
:class:`AutopilotConfig`. Four triggers start a run (each one is recorded on the run):

* ``drift``: the drift alarm is held on by at least ``drift_devices`` devices of the group: on
  in each one's latest telemetry (heard from within ``drift_window_s``), raised at least
  ``drift_hold_s`` ago (by its last ``drift_alarm`` event), so a blip does not retrain, and
  the labelled rows the devices keep (the newest) are rows of the changed world;
* ``schedule``: ``schedule_s`` since the group's last run (or since the autopilot was set);
* ``labels``: at least ``new_labels`` ground-truth labels reached the group's devices since
  the last run (telemetry ``inference.feedback.labelled``);
* ``manual``: ``edgeops fleet retrain GROUP`` (``POST /api/autopilot/retrain``).

A run is a persisted state machine, one at a time per console (a build takes both cores of a
small machine)::

    queued → collecting → building → evaluating ─┬─ rejected   (the challenger lost: nothing moves)
                                                 ├─ proposed → (approve) ─┐
                                                 └────────────────────────┴→ rolling_out → deployed | failed
    any step may end in failed (and says why); nothing is deployed unless a rollout starts.

1. **collecting**: a ``sample_upload`` command to every online device of the group, then
   at most ``collect_s`` of waiting for the answers. The console also asks a device of an
   autopilot's group for its samples when its drift alarm goes on (once per alarm, at most once
   per :data:`SAMPLE_REQUEST_S`), so rows of the moment the world changed are kept too.
2. The answers (and, with ``field_window_s``, earlier uploads) become one **field dataset** (rows
   deduplicated; provenance: devices, time range, releases, the group), stored by its
   content digest. Uploads whose features or labels are not the champion's are left out and
   counted; fewer than ``min_labelled`` labelled rows fail the run.
3. **building**: ``edgeops build --project P --target T --field-data DATASET --json`` in a
   subprocess, through the step cache; data checks and every budget apply as in any build.
4. **evaluating**: ``edgeops evaluate`` of the champion and the challenger on the dataset's
   held-out labelled rows (rows never trained on). The challenger must beat the champion by
   ``margin`` (accuracy points, as a fraction).
5. **rolling_out**: the challenger is verified, registered and rolled out in waves with the
   group's gates (:mod:`edgeops_fleet.rollout`); the run ends with the rollout.

A trigger that fires while a run of the group is active is merged into that run (listed in
its ``triggers``): a group is never retrained twice at once. Runs interrupted by a console
restart in a working state are queued again; a proposed run stays proposed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeops_core import EdgeopsError, InputError, TrustedKey, check_device_id, utc_now_text, verify_bundle_file
from edgeops_core.fielddata import MAX_FIELD_ROWS, UNLABELLED, FieldDataError, FieldDataset, Provenance
from edgeops_core.messages import MAX_SAMPLE_ROWS, Command
from edgeops_fleet.errors import RunConflictError
from edgeops_fleet.rollout import Gates, _check_group, group_key, parse_waves

if TYPE_CHECKING:
    from edgeops_fleet.rollout import RolloutEngine
    from edgeops_fleet.store import Store

__all__ = [
    "ACTIVE_STATES",
    "MODES",
    "SAMPLE_REQUEST_S",
    "Autopilot",
    "AutopilotConfig",
    "RunConflictError",
    "default_work_dir",
]

log = logging.getLogger(__name__)

MODES = ("off", "propose", "auto")
#: A run in one of these states holds its group: a new trigger is merged into it.
ACTIVE_STATES = ("queued", "collecting", "building", "evaluating", "proposed", "rolling_out")
#: States a console restart re-queues (the work of the step is lost with the process).
_WORKING = ("collecting", "building", "evaluating")
END_STATES = ("deployed", "rejected", "failed", "cancelled")
#: The console asks one device for its samples at most this often (on a drift alarm).
SAMPLE_REQUEST_S = 60.0
#: How often the triggers are evaluated.
TRIGGER_EVERY_S = 2.0
_MAX_OUTPUT = 4000


def _home() -> Path:
    home = os.environ.get("EDGEOPS_HOME")
    return Path(home) if home else Path.home() / ".edgeops"


def default_work_dir() -> Path:
    """``$EDGEOPS_HOME/autopilot`` (``~/.edgeops`` when ``EDGEOPS_HOME`` is unset)."""
    return _home() / "autopilot"


def _dev_public_key() -> Path:
    return _home() / "keys" / "dev-signing.pub.pem"


def _positive(
    name: str, value: object, *, integer: bool = False, allow_none: bool = False, zero: bool = False, hi: float = 1e9
) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int)
    if ok:  # an integer too large for a float is out of range, not a crash
        ok = abs(value) < 1e300 and math.isfinite(float(value))  # type: ignore[arg-type]
    if not ok or not 0 <= value <= hi or (value == 0 and not zero):  # type: ignore[operator]
        kind = "an integer" if integer else "a number"
        low = ">= 0" if zero else "> 0"
        none = " or null" if allow_none else ""
        raise InputError(f"autopilot {name}: expected {kind} {low} and <= {hi:g}{none}, got {str(value)[:40]}")


@dataclass(frozen=True)
class AutopilotConfig:
    """One group's autopilot (see the module docstring for what each trigger means).

    Attributes:
        group: ``{"target": ..., "tags": {...}}``.
        mode: ``off``, ``propose`` or ``auto``.
        project: the project folder on the console's machine (absolute).
        champion: the bundle the group runs when the autopilot starts (absolute path); later
            the last bundle a run deployed is the champion.
        signing_key: the private key builds sign with (``None``: the development key).
        public_key: the public key bundles are verified with (``None``: the development key's).
        drift_devices, drift_window_s, drift_hold_s, schedule_s, new_labels: the triggers (``None`` turns
            schedule and labels off).
        min_labelled: fewest labelled field rows a run trains on.
        margin: how much held-out accuracy (a fraction) the challenger must gain.
        collect_s: longest wait for the devices' uploads.
        field_window_s: uploads received this long before the run asked for samples join its
            dataset too (0: only the answers to the run's own request, the newest rows).
        upload_rows: rows asked from each device.
        cooldown_s: after a run ends, the drift trigger waits this long (the new model's
            detectors need a window of inputs before their alarm means anything).
        waves, soak_s, gates, deadline_s: the rollout.
        build_timeout_s: longest a build or an evaluation may take.
    """

    group: Mapping[str, Any]
    mode: str = "off"
    project: str | None = None
    champion: str | None = None
    signing_key: str | None = None
    public_key: str | None = None
    drift_devices: int = 1
    drift_window_s: float = 120.0
    drift_hold_s: float = 30.0
    schedule_s: float | None = None
    new_labels: int | None = None
    min_labelled: int = 200
    margin: float = 0.005
    collect_s: float = 15.0
    field_window_s: float = 0.0
    upload_rows: int = 512
    cooldown_s: float = 120.0
    waves: str = "1,50%,100%"
    soak_s: float = 60.0
    gates: Mapping[str, Any] = field(default_factory=dict)
    deadline_s: float = 3600.0
    build_timeout_s: float = 1200.0

    def __post_init__(self) -> None:
        target, tags = _check_group(self.group)
        object.__setattr__(self, "group", {"target": target, "tags": tags})
        if self.mode not in MODES:
            raise InputError(f"autopilot mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("project", "champion", "signing_key", "public_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not Path(value).is_absolute()):
                raise InputError(f"autopilot {name}: expected an absolute path on the console's machine, got {value!r}")
        if self.mode != "off" and self.project is None:
            raise InputError("autopilot project: a project folder is required unless the mode is off")
        _positive("drift_devices", self.drift_devices, integer=True, hi=1e6)
        _positive("new_labels", self.new_labels, integer=True, allow_none=True)
        _positive("min_labelled", self.min_labelled, integer=True, hi=MAX_FIELD_ROWS)
        _positive("upload_rows", self.upload_rows, integer=True, hi=MAX_SAMPLE_ROWS)
        day, week = 86400.0, 7 * 86400.0
        for name, hi in (("drift_window_s", week), ("collect_s", 3600.0), ("deadline_s", week), ("build_timeout_s", day)):
            _positive(name, getattr(self, name), hi=hi)
        _positive("schedule_s", self.schedule_s, allow_none=True, hi=365 * day)
        for name, hi in (
            ("cooldown_s", week),
            ("soak_s", day),
            ("margin", 1.0),
            ("drift_hold_s", day),
            ("field_window_s", 30 * day),
        ):
            _positive(name, getattr(self, name), zero=True, hi=hi)
        if self.margin >= 1:
            raise InputError(f"autopilot margin: an accuracy gain as a fraction below 1, got {self.margin!r}")
        parse_waves(self.waves)
        Gates.from_options(dict(self.gates))

    @property
    def group_key(self) -> str:
        """The group's key (:func:`edgeops_fleet.rollout.group_key`)."""
        return group_key(self.group)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["group"] = {"target": self.group["target"], "tags": dict(self.group["tags"])}
        out["gates"] = dict(self.gates)
        return out

    @classmethod
    def from_dict(cls, raw: object) -> AutopilotConfig:
        """Strict: unknown keys and bad values are :class:`InputError` naming them."""
        if not isinstance(raw, Mapping):
            raise InputError(f"autopilot: expected an object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"autopilot: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if "group" not in raw:
            raise InputError("autopilot: group is required")
        gates = raw.get("gates") or {}
        if not isinstance(gates, Mapping):
            raise InputError(f"autopilot gates: expected an object, got {gates!r}")
        return cls(**{**raw, "gates": dict(gates)})


class AutopilotLink(Protocol):
    """How the autopilot reaches devices (the console implements it)."""

    def command(self, device_id: str, payload: bytes) -> None: ...


def _run_id(now: float) -> str:
    return "run-" + datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def _labelled_sum(rows: Sequence[Mapping[str, Any]]) -> int:
    total = 0
    for row in rows:
        inference = (row.get("payload") or {}).get("inference") or {}
        fb = inference.get("feedback") or {}
        n = fb.get("labelled", 0)
        if isinstance(n, int) and not isinstance(n, bool):
            total += n
    return total


def _alarmed(device: Mapping[str, Any]) -> bool:
    telemetry = device.get("last_telemetry") or {}
    drift = telemetry.get("drift") or {}
    return drift.get("alarm") is True


class Autopilot:
    """The per-group autopilot of one console (see the module docstring).

    Args:
        store: the console's store.
        link: sends commands to devices (the console).
        engine: the rollout engine the challenger is rolled out with.
        bundles_dir: where verified rollout bundles are kept (the console's).
        work_dir: where runs keep their datasets, builds and logs.
        python: the interpreter the build and evaluate subprocesses run with.
    """

    def __init__(
        self,
        store: Store,
        link: AutopilotLink,
        engine: RolloutEngine,
        *,
        bundles_dir: Path,
        work_dir: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.store, self.link, self.engine = store, link, engine
        self.bundles_dir = bundles_dir
        self.work_dir = work_dir if work_dir is not None else default_work_dir()
        self.python = python
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._asked: dict[str, float] = {}
        self._alarm_seen: set[str] = set()
        self._next_trigger_check = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_lock = threading.Lock()
        self._labels_seen: dict[str, tuple[float, float, int]] = {}  # group key -> (since, read up to, labels)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Re-queue runs a restart interrupted and start the worker thread."""
        now = time.time()
        for run in self.store.runs(states=_WORKING):
            self._update(
                run["run_id"], state="queued", note=f"the console restarted during {run['state']}; queued again", now=now
            )
        for run in self.store.runs(states=("rolling_out",)):
            if not run.get("rollout_id"):  # stopped between the decision and the rollout's start
                self._end(run["run_id"], "failed", "the console stopped before the rollout started; nothing was deployed")
        self._stop.clear()
        self._worker = threading.Thread(target=self._work_loop, name="console-autopilot", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Stop the worker (a running build is terminated; the run is queued again at the next start)."""
        with self._proc_lock:
            self._stop.set()
            proc = self._proc
        self._wake.set()
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        if self._worker is not None:
            self._worker.join(timeout=20)
            self._worker = None

    # -- configuration and requests (the API) ------------------------------------------------------

    def configure(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Set (replace) a group's autopilot; the stored configuration.

        Raises:
            InputError: a bad setting, or a project/champion/key path that does not exist.
        """
        config = AutopilotConfig.from_dict(raw)
        if config.project is not None and not (Path(config.project) / "edgeops.toml").is_file():
            raise InputError(f"autopilot project: {config.project} has no edgeops.toml")
        for name in ("champion", "signing_key", "public_key"):
            value = getattr(config, name)
            if value is not None and not Path(value).is_file():
                raise InputError(f"autopilot {name}: {value}: no such file")
        if config.public_key is not None:
            try:
                TrustedKey.from_pem(Path(config.public_key).read_bytes(), source=config.public_key)
            except (EdgeopsError, OSError) as exc:
                raise InputError(f"autopilot public_key: {config.public_key} is not a usable public key: {exc}") from exc
        data = config.to_dict()
        self.store.put_autopilot(config.group_key, data)
        log.info("autopilot for %s: mode %s", config.group_key, config.mode)
        return {"group_key": config.group_key, "config": data}

    def configs(self) -> list[AutopilotConfig]:
        """Every group's configuration."""
        out = []
        for row in self.store.autopilots():
            try:
                out.append(AutopilotConfig.from_dict(row["config"]))
            except InputError as exc:  # written by another version: skip it, loudly
                log.error("autopilot for %s ignored: %s", row["group_key"], exc)
        return out

    def config_of(self, key: str) -> AutopilotConfig | None:
        """The configuration of the group with this key, if any."""
        return next((c for c in self.configs() if c.group_key == key), None)

    def retrain(self, group: Mapping[str, Any], *, trigger: str = "manual", detail: str = "") -> dict[str, Any]:
        """Start (or merge into the active) run of ``group``; the run.

        Raises:
            LookupError: the group has no autopilot.
            RunConflictError: its mode is ``off``.
        """
        target, tags = _check_group(group)
        key = group_key({"target": target, "tags": tags})
        config = self.config_of(key)
        if config is None:
            raise LookupError(f"no autopilot is set for group {key}: set one with `edgeops fleet autopilot set`")
        if config.mode == "off":
            raise RunConflictError(f"the autopilot of group {key} is off: set its mode to propose or auto first")
        return self._trigger(config, trigger, detail or "requested", time.time())

    def approve(self, run_id: str) -> dict[str, Any]:
        """Let a proposed run roll out.

        Raises:
            LookupError: no such run.
            RunConflictError: the run is not waiting for an approval (it has ended, or it is still working).
        """
        with self._lock:
            run = self.store.run(run_id)
            if run is None:
                raise LookupError(f"no autopilot run {run_id!r}")
            if run["state"] != "proposed":
                what = "has ended" if run["state"] in END_STATES else "is not waiting for an approval"
                raise RunConflictError(f"run {run_id} {what} (state {run['state']}); only a proposed run can be approved")
            self._update(run_id, state="rolling_out", note="approved", now=time.time(), decision="approved")
        self._roll_out(run_id)
        return self.run(run_id)

    def cancel(self, run_id: str) -> dict[str, Any]:
        """End a queued or proposed run without deploying anything.

        Raises:
            LookupError: no such run.
            RunConflictError: the run is working, rolling out or has ended.
        """
        with self._lock:
            run = self.store.run(run_id)
            if run is None:
                raise LookupError(f"no autopilot run {run_id!r}")
            if run["state"] not in ("queued", "proposed"):
                raise RunConflictError(f"run {run_id} is {run['state']}: only a queued or proposed run can be cancelled")
            self._end(run_id, "cancelled", "cancelled by an operator; nothing was deployed", decision="cancelled")
        return self.run(run_id)

    def run(self, run_id: str) -> dict[str, Any]:
        """One run.

        Raises:
            LookupError: no such run.
        """
        row = self.store.run(run_id)
        if row is None:
            raise LookupError(f"no autopilot run {run_id!r}")
        return row

    def request_samples(self, device_ids: Sequence[str], *, rows: int = 512) -> list[str]:
        """Send ``sample_upload`` to each device; the command ids."""
        ids = []
        for device_id in device_ids:
            command_id = "samples-" + secrets.token_hex(6)
            payload = Command(command_id, "sample_upload", {"max_rows": rows}, utc_now_text()).to_json()
            self.link.command(check_device_id(device_id), payload)
            self._asked[device_id] = time.monotonic()
            ids.append(command_id)
        return ids

    # -- triggers (the console's tick thread) --------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Ask alarmed devices for samples, evaluate every group's triggers, follow rollouts."""
        now = time.time() if now is None else now
        if now < self._next_trigger_check:
            return
        self._next_trigger_check = now + TRIGGER_EVERY_S
        active = [c for c in self.configs() if c.mode != "off"]
        self._ask_alarmed(active)
        for config in active:
            self._check_triggers(config, now)
        self._follow_rollouts(now)

    def _ask_alarmed(self, configs: Sequence[AutopilotConfig]) -> None:
        """Ask each device of an autopilot's group for its samples when its drift alarm goes on (once per alarm)."""
        due = []
        for config in configs:
            for d in self.store.devices(target=config.group["target"], tags=config.group["tags"]):
                device_id = d["device_id"]
                if not _alarmed(d):
                    self._alarm_seen.discard(device_id)
                elif d.get("online") and device_id not in self._alarm_seen:
                    self._alarm_seen.add(device_id)
                    if time.monotonic() - self._asked.get(device_id, -math.inf) >= SAMPLE_REQUEST_S:
                        due.append(device_id)
        if due:
            log.info("drift alarm on %d device(s): asking for their samples", len(due))
            self.request_samples(due)

    def _check_triggers(self, config: AutopilotConfig, now: float) -> None:
        runs = self.store.runs(group_key=config.group_key, limit=1)
        last = runs[0] if runs else None
        since = max(last["created_at"] if last else 0.0, self._configured_at(config.group_key))
        devices = self.store.devices(target=config.group["target"], tags=config.group["tags"])
        fired: list[tuple[str, str]] = []
        alarmed = self._held(config, devices, now)
        cooled = last is None or last["state"] in ACTIVE_STATES or now - (last["ended_at"] or 0) >= self._cooldown(config)
        if len(alarmed) >= config.drift_devices and cooled:
            fired.append(("drift", f"drift alarm on {len(alarmed)} device(s): {', '.join(sorted(alarmed)[:5])}"))
        if config.schedule_s is not None and now - since >= config.schedule_s:
            fired.append(("schedule", f"{config.schedule_s:g} s since the last run"))
        if config.new_labels is not None:
            labelled = self._new_labels(config.group_key, [d["device_id"] for d in devices], since)
            if labelled >= config.new_labels:
                fired.append(("labels", f"{labelled} new labels since the last run"))
        for trigger, detail in fired:
            self._trigger(config, trigger, detail, now)

    def _new_labels(self, key: str, device_ids: list[str], since: float) -> int:
        """Labels the devices reported since ``since``, reading only telemetry newer than the last check."""
        seen_since, upto, total = self._labels_seen.get(key, (since, since, 0))
        if seen_since != since:  # a new run or configuration: count again from its start
            upto, total = since, 0
        rows = self.store.telemetry(device_ids, since=upto)
        total += _labelled_sum(rows)
        newest = max((float(r["received_at"]) for r in rows), default=upto - 1e-6)
        self._labels_seen[key] = (since, newest + 1e-6, total)
        return total

    def _held(self, config: AutopilotConfig, devices: Sequence[Mapping[str, Any]], now: float) -> list[str]:
        """The devices whose drift alarm is on now and was raised at least ``drift_hold_s`` ago."""
        on = [d["device_id"] for d in devices if _alarmed(d) and now - float(d.get("last_seen") or 0) <= config.drift_window_s]
        if not on or config.drift_hold_s <= 0:
            return on
        raised: dict[str, float] = {}
        for e in self.store.events(on, since=now - config.drift_window_s - config.drift_hold_s, types=("drift_alarm",)):
            raised[e["device_id"]] = max(raised.get(e["device_id"], 0.0), float(e["received_at"]))
        # No alarm event in the look-back: it was raised before it, so it is held.
        return [d for d in on if now - raised.get(d, -math.inf) >= config.drift_hold_s]

    def _cooldown(self, config: AutopilotConfig) -> float:
        """``cooldown_s``, doubled for each run in a row that ended without deploying (at most 64 times)."""
        misses = 0
        for run in self.store.runs(group_key=config.group_key, limit=8):
            if run["state"] not in ("failed", "rejected"):
                break
            misses += 1
        return float(config.cooldown_s * (2 ** min(max(misses - 1, 0), 6)))

    def _configured_at(self, key: str) -> float:
        row = next((r for r in self.store.autopilots() if r["group_key"] == key), None)
        return float(row["updated_at"]) if row else 0.0

    def _trigger(self, config: AutopilotConfig, trigger: str, detail: str, now: float) -> dict[str, Any]:
        with self._lock:
            active = self.store.runs(group_key=config.group_key, states=ACTIVE_STATES, limit=1)
            if active:
                run = active[0]
                if trigger == "manual" or all(t.get("trigger") != trigger for t in run["triggers"]):
                    triggers = [*run["triggers"], {"trigger": trigger, "detail": detail, "at": now, "merged": True}]
                    self.store.put_run({"run_id": run["run_id"], "triggers": triggers, "updated_at": now})
                    log.info("autopilot %s: trigger %s merged into run %s", config.group_key, trigger, run["run_id"])
                return self.run(run["run_id"])
            run_id = _run_id(now)
            self.store.put_run(
                {
                    "run_id": run_id,
                    "group_key": config.group_key,
                    "group": config.group,
                    "mode": config.mode,
                    "trigger": trigger,
                    "triggers": [{"trigger": trigger, "detail": detail, "at": now}],
                    "state": "queued",
                    "created_at": now,
                    "updated_at": now,
                    "steps": [{"at": now, "state": "queued", "note": f"{trigger}: {detail}"}],
                }
            )
            log.info("autopilot %s: run %s queued (%s: %s)", config.group_key, run_id, trigger, detail)
        self._wake.set()
        return self.run(run_id)

    def _follow_rollouts(self, now: float) -> None:
        for run in self.store.runs(states=("rolling_out",)):
            if not run.get("rollout_id"):
                continue
            rollout = self.store.rollout(run["rollout_id"])
            if rollout is None or rollout["state"] not in ("passed", "failed", "aborted"):
                continue
            if rollout["state"] == "passed":
                self._end(
                    run["run_id"], "deployed", f"release {run['release']} rolled out: {rollout.get('message') or 'succeeded'}"
                )
            elif rollout["state"] == "aborted":  # an operator stopped it: the autopilot stops too, until set again
                self._pause(run["group_key"])
                note = f"rollout aborted: {rollout.get('message') or ''}; the group's autopilot is off until it is set again"
                self._end(run["run_id"], "failed", note)
            else:
                self._end(run["run_id"], "failed", f"rollout {rollout['state']}: {rollout.get('message') or ''}".strip())

    def _pause(self, key: str) -> None:
        config = self.config_of(key)
        if config is not None and config.mode != "off":
            self.store.put_autopilot(key, {**config.to_dict(), "mode": "off"})
            log.warning("autopilot for %s turned off: an operator aborted its rollout", key)

    # -- the worker ------------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._stop.is_set():
                queued = self.store.runs(states=("queued",))
                if not queued:
                    break
                run = min(queued, key=lambda r: r["created_at"])
                try:
                    self._execute(run["run_id"])
                except _StoppedError:
                    return
                except _EndedError as exc:
                    log.info("autopilot: %s; its work is dropped", exc)
                except Exception as exc:  # a bug or a store outage must not end the autopilot
                    log.exception("autopilot run %s failed", run["run_id"])
                    try:
                        self._end(run["run_id"], "failed", f"internal error: {type(exc).__name__}: {exc}")
                    except Exception:
                        log.exception("could not record the failure of run %s", run["run_id"])
                        self._stop.wait(5.0)

    def _execute(self, run_id: str) -> None:
        run = self.run(run_id)
        config = self.config_of(run["group_key"])
        if config is None or config.mode == "off":
            self._end(run_id, "cancelled", "the group's autopilot was turned off; nothing was deployed", decision="cancelled")
            return
        folder = self.work_dir / run_id
        folder.mkdir(parents=True, exist_ok=True)
        champion = self._champion(config)
        if champion is None:
            self._end(
                run_id, "failed", "no champion bundle is known for the group: set the autopilot's champion", decision="failed"
            )
            return
        self._update(run_id, state="collecting", note=f"asking the group's devices for samples; champion {champion}")
        dataset, left_out, champion_release = self._collect(config, run_id, champion)
        if dataset is None:
            return
        data_path = folder / f"field-{dataset.digest.removeprefix('sha256:')[:16]}.npz"
        data_path.write_bytes(dataset.to_bytes())
        prov = dataset.provenance
        note = (
            f"field dataset {dataset.digest[:19]}…: {len(dataset.y)} rows, {dataset.labelled} labelled, "
            f"{len(prov.devices)} device(s), {prov.first_ts} → {prov.last_ts}"
            + (f"; {left_out} upload(s) left out" if left_out else "")
        )
        self._update(run_id, state="building", note=note, datasets=[dataset.digest])
        build = self._tool(
            run_id,
            "build",
            [
                "build",
                "--project",
                str(config.project),
                "--target",
                config.group["target"],
                "--field-data",
                str(data_path),
                "--out",
                str(folder / "dist"),
                "--release-above",  # the champion may come from another machine's registry
                str(champion_release),
                "--json",
                *(["--key", config.signing_key] if config.signing_key else []),
            ],
            config.build_timeout_s,
        )
        if build is None:
            return
        bundle = Path(build["bundle"])
        metrics = {
            "challenger_release": build.get("release"),
            "build_metrics": build.get("metrics", {}),
            "build_timings_s": build.get("timings_s", {}),
            "cached_steps": build.get("cached_steps", []),
        }
        self._update(
            run_id,
            state="evaluating",
            note=f"built release {build.get('release')}",
            bundle_path=str(bundle),
            release=build.get("release"),
            metrics=metrics,
        )
        key = config.public_key or str(_dev_public_key())
        scores = {}
        for role, path in (("champion", champion), ("challenger", bundle)):
            out = self._tool(
                run_id,
                f"evaluate {role}",
                ["evaluate", str(path), "--field-data", str(data_path), "--split", "holdout", "--key", key, "--json"],
                config.build_timeout_s,
            )
            if out is None:
                return
            scores[role] = out
        ch, cc = scores["champion"], scores["challenger"]
        metrics.update(
            champion_release=ch.get("release"),
            champion_accuracy=ch.get("accuracy"),
            challenger_accuracy=cc.get("accuracy"),
            holdout_rows=cc.get("rows"),
            margin=config.margin,
        )
        self._update(run_id, metrics=metrics)
        if cc.get("accuracy") is None or ch.get("accuracy") is None:
            self._end(
                run_id,
                "rejected",
                "no held-out labelled field rows to compare the models on; nothing was deployed",
                decision="rejected",
            )
            return
        gain = float(cc["accuracy"]) - float(ch["accuracy"])
        verdict = (
            f"challenger release {cc.get('release')} {cc['accuracy']:.4f} vs champion release {ch.get('release')} "
            f"{ch['accuracy']:.4f} on {cc.get('rows')} held-out field rows (gain {gain:+.4f}, margin {config.margin:g})"
        )
        if gain < config.margin:
            self._end(run_id, "rejected", f"the challenger lost: {verdict}; nothing was deployed", decision="rejected")
            return
        if config.mode == "propose":
            self._update(
                run_id,
                state="proposed",
                note=f"the challenger won: {verdict}; waiting for `edgeops fleet approve {run_id}`",
                decision="proposed",
                reason=verdict,
            )
            return
        self._update(run_id, state="rolling_out", note=f"the challenger won: {verdict}", decision="deploy", reason=verdict)
        self._roll_out(run_id)

    @staticmethod
    def _trusted(config: AutopilotConfig) -> list[TrustedKey]:
        """The key the group's bundles verify with (the development key's public half by default)."""
        key = Path(config.public_key or _dev_public_key())
        return [TrustedKey.from_pem(key.read_bytes(), source=str(key))]

    def _champion(self, config: AutopilotConfig) -> Path | None:
        for run in self.store.runs(group_key=config.group_key, states=("deployed",), limit=1):
            if run.get("bundle_path") and Path(run["bundle_path"]).is_file():
                return Path(run["bundle_path"])
        return Path(config.champion) if config.champion else None

    def _collect(self, config: AutopilotConfig, run_id: str, champion: Path) -> tuple[FieldDataset | None, int, int]:
        try:
            manifest = verify_bundle_file(champion, self._trusted(config)).manifest
        except (EdgeopsError, OSError) as exc:
            self._end(
                run_id, "failed", f"the champion {champion} does not verify: {exc}; nothing was deployed", decision="failed"
            )
            return None, 0, 0
        devices = self.store.devices(target=config.group["target"], tags=config.group["tags"])
        online = [d["device_id"] for d in devices if d.get("online")]
        asked_at = time.time()
        if online:
            self.request_samples(online, rows=config.upload_rows)
        deadline = time.monotonic() + config.collect_s
        ids = [d["device_id"] for d in devices]
        while time.monotonic() < deadline and not self._stop.is_set():
            answered = {u["device_id"] for u in self.store.uploads(device_ids=ids, since=asked_at)}
            if answered >= set(online):
                break
            self._stop.wait(0.5)
        if self._stop.is_set():
            raise _StoppedError
        uploads = self.store.uploads(device_ids=ids, since=asked_at - config.field_window_s, with_payload=True)
        try:
            dataset, left_out = build_dataset(uploads, manifest.feature_names, manifest.labels, config.group)
        except FieldDataError as exc:
            self._end(run_id, "failed", f"no field dataset: {exc}; nothing was deployed", decision="failed")
            return None, 0, 0
        if dataset.labelled < config.min_labelled:
            self._end(
                run_id,
                "failed",
                f"only {dataset.labelled} labelled field rows from {len(dataset.provenance.devices)} device(s) "
                f"(at least {config.min_labelled} needed); nothing was deployed",
                decision="failed",
                datasets=[dataset.digest],
            )
            self._keep(dataset, config, run_id)
            return None, left_out, 0
        self._keep(dataset, config, run_id)
        return dataset, left_out, manifest.release

    def _keep(self, dataset: FieldDataset, config: AutopilotConfig, run_id: str) -> None:
        self.store.put_dataset(
            digest=dataset.digest,
            group_key=config.group_key,
            run_id=run_id,
            rows=len(dataset.y),
            labelled=int(dataset.labelled),
            provenance=dataset.provenance.to_dict(),
            data=dataset.to_bytes(),
        )

    def _tool(self, run_id: str, what: str, args: list[str], timeout_s: float) -> dict[str, Any] | None:
        """Run ``edgeops ARGS`` (its JSON answer), or end the run as failed with the tool's own error line."""
        folder = self.work_dir / run_id
        log_path = folder / f"{what.replace(' ', '-')}.log"
        cmd = [self.python, "-m", "edgeops_toolchain", *args]
        with open(log_path, "wb") as err:
            with self._proc_lock:  # stop() either sees this process or it never starts
                if self._stop.is_set():
                    raise _StoppedError
                # Its own session: a timeout or a stop ends the whole process group, children included.
                self._proc = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                self._end(run_id, "failed", f"{what} took longer than {timeout_s:g} s; nothing was deployed", decision="failed")
                return None
            finally:
                with self._proc_lock:
                    self._proc = None
        if self._stop.is_set():
            raise _StoppedError
        text = stdout.decode(errors="replace").strip()
        answer: Any = None
        for line in reversed(text.splitlines()):
            try:
                answer = json.loads(line)
                break
            except ValueError:
                continue
        if proc.returncode != 0 or not isinstance(answer, dict):
            message = ""
            if isinstance(answer, dict):
                error = answer.get("error")
                message = error.get("message", "") if isinstance(error, dict) else str(error or "")
            if not message:
                tail = log_path.read_text(errors="replace").strip().splitlines()
                message = tail[-1] if tail else f"exit code {proc.returncode}"
            self._end(run_id, "failed", f"{what} failed: {message[:_MAX_OUTPUT]}; nothing was deployed", decision="failed")
            return None
        return answer

    def _roll_out(self, run_id: str) -> None:
        from edgeops_fleet.api import keep_for_rollout

        run = self.run(run_id)
        config = self.config_of(run["group_key"])
        if config is None:
            self._end(run_id, "failed", "the group's autopilot was removed; nothing was deployed")
            return
        try:
            verified = verify_bundle_file(Path(run["bundle_path"]), self._trusted(config))
            spec = keep_for_rollout(
                self.store,
                verified,
                self.bundles_dir,
                group=config.group,
                waves=parse_waves(config.waves),
                soak_s=config.soak_s,
                gates=Gates.from_options(dict(config.gates)),
                deadline_s=config.deadline_s,
            )
            rollout = self.engine.start(spec)
        except (EdgeopsError, OSError) as exc:  # the challenger changed, expired, or no longer verifies; a conflict
            self._end(run_id, "failed", f"the rollout did not start: {exc}; nothing was deployed", decision="failed")
            return
        self._update(
            run_id, rollout_id=rollout["rollout_id"], note=f"rollout {rollout['rollout_id']} started: waves {config.waves}"
        )

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def _update(self, run_id: str, *, note: str | None = None, now: float | None = None, **columns: Any) -> None:
        """Record a step of a run; a run that has ended never changes again (:class:`_EndedError`)."""
        now = time.time() if now is None else now
        row: dict[str, Any] = {"run_id": run_id, "updated_at": now, **columns}
        with self._lock:  # read-check-write: an operator's cancel and the worker's next step cannot interleave
            current = self.store.run(run_id)
            if current is not None and current["state"] in END_STATES:
                raise _EndedError(run_id, current["state"])
            if note is not None:
                steps = list(current["steps"] or []) if current else []
                steps.append({"at": now, "state": columns.get("state", current["state"] if current else None), "note": note})
                row["steps"] = steps
                log.info("autopilot run %s: %s", run_id, note)
            self.store.put_run(row)

    def _end(self, run_id: str, state: str, reason: str, **columns: Any) -> None:
        now = time.time()
        self._update(run_id, state=state, note=reason, now=now, ended_at=now, reason=reason, **columns)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a subprocess started in its own session, and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


class _EndedError(RunConflictError):
    """The run ended (an operator cancelled it) while the worker was on it: the worker leaves it be."""

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__(f"run {run_id} has ended ({state})")


class _StoppedError(Exception):
    """The console is stopping in the middle of a run (it is queued again at the next start)."""


def build_dataset(
    uploads: Sequence[Mapping[str, Any]],
    feature_names: Sequence[str],
    label_names: Sequence[str],
    group: Mapping[str, Any],
) -> tuple[FieldDataset, int]:
    """One field dataset from sample uploads (``Store.uploads(with_payload=True)`` rows); ``(dataset, left_out)``.

    Uploads whose feature names or label names are not ``feature_names``/``label_names`` are
    left out and counted. Identical rows are kept once (a labelled copy wins over an unlabelled
    one; between two labels, the first upload's). The time range is the console's receive
    times (a device's clock may be wrong; the console's is the one the history uses).

    Raises:
        FieldDataError: no usable row.
    """
    features, labels = tuple(feature_names), tuple(label_names)
    index = {name: i for i, name in enumerate(labels)}
    seen: dict[bytes, int] = {}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    who: list[str] = []
    used_devices: set[str] = set()
    times: list[str] = []
    releases: set[int] = set()
    used = left_out = 0
    for upload in uploads:
        payload = upload.get("payload") or {}
        if tuple(payload.get("feature_names") or ()) != features:
            left_out += 1
            continue
        upload_labels = payload.get("labels") or [None] * len(payload.get("rows") or ())
        names = tuple(payload.get("label_names") or ())
        if (names and names != labels) or any(lb is not None and lb not in index for lb in upload_labels):
            left_out += 1
            continue
        try:
            rows = np.asarray(payload.get("rows") or [], dtype=np.float32)
        except (TypeError, ValueError):  # ragged: stored by another version
            left_out += 1
            continue
        if rows.size == 0:
            continue
        if rows.ndim != 2 or rows.shape[1] != len(features) or len(upload_labels) != len(rows) or not np.isfinite(rows).all():
            left_out += 1
            continue
        used += 1
        for row, lb in zip(rows, upload_labels, strict=True):
            y = UNLABELLED if lb is None else index[lb]
            k = row.tobytes()
            at = seen.get(k)
            if at is not None:
                if ys[at] == UNLABELLED and y != UNLABELLED:
                    ys[at] = y
                continue
            seen[k] = len(xs)
            xs.append(row)
            ys.append(y)
            who.append(upload["device_id"])
        used_devices.add(upload["device_id"])
        times.append(datetime.fromtimestamp(float(upload["received_at"]), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        if isinstance(upload.get("release"), int):
            releases.add(upload["release"])
    if not xs:
        raise FieldDataError(f"no usable field rows in {len(uploads)} upload(s) ({left_out} left out: other features or labels)")
    devices = tuple(sorted(used_devices))
    pos = {d: i for i, d in enumerate(devices)}
    provenance = Provenance(
        devices=devices,
        first_ts=min(times) if times else utc_now_text(),
        last_ts=max(times) if times else utc_now_text(),
        releases=tuple(sorted(releases)),
        group={"target": group["target"], "tags": dict(group.get("tags") or {})},
        uploads=used,
        created=utc_now_text(),
    )
    dataset = FieldDataset(
        feature_names=features,
        label_names=labels,
        x=np.stack(xs).astype(np.float32),
        y=np.asarray(ys, dtype=np.int64),
        device_index=np.asarray([pos[d] for d in who], dtype=np.int32),
        provenance=provenance,
    )
    return dataset, left_out
