"""Staged rollouts gated on model health (issue 9): the console's persisted state machine.

A rollout ships one verified release to a *group* of devices (a target and tags) in
*waves*. Each wave's devices get the deploy with ``hold_s`` set, so after their own health
check they run the new model *held*: not committed, old slot kept, anti-rollback floor not
raised. The wave then *soaks*; its *gate* is judged on what the wave's devices reported
during the soak (docs/fleet.md has the vocabulary and every formula)::

    rollout   running ─▶ passed | failed | aborted        running ⇄ paused
    wave      pending ─▶ installing ─▶ soaking ─▶ passed | failed | aborted   (cancelled: never started)
    device    pending ─▶ waiting (offline) ─▶ offered ─▶ installing ─▶ held ─▶ committing ─▶ committed
                                                                          └──▶ rolling_back ─▶ rolled_back
              (or failed, rejected, timed_out; skipped: already at the release; missed / cancelled: never offered)

A wave that passes gets ``commit`` commands for its held devices and the next wave starts;
a wave that fails a gate gets ``rollback`` commands, the release is marked bad for the
group and the rollout ends ``failed``. Earlier, passed waves keep the release.

Invariants:

* **Persist, then act.** Every transition of a tick is written to the :class:`Store` in one
  transaction *before* any command is published. What a crash can leave undone is
  exactly what the stored rows say is in flight (``offered``/``installing``: the deploy;
  ``committing``/``rolling_back``: the command), and :meth:`RolloutEngine.resume_all`
  sends it again.
* **Same ids on every send.** A wave's deploy id is derived from the rollout id and the
  wave (``<rollout id>-w<n>``), and the ``commit``/``rollback`` command ids from the deploy
  id, so a repeated send after a crash carries the ids of the first one; the agent acts on
  an id once. No device is ever offered a second deploy id for the same wave.
* **Devices are fixed at start.** The group is resolved once, sorted by device id; the
  devices already at or above the release are recorded ``skipped``; each other device is
  assigned to exactly one wave.
* **The engine decides, devices report.** A device's outcome is read from the store
  (``ota_progress``/final events and ``command_rejected`` for its deploy id, its retained
  state), never assumed from a command having been sent.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeops_core import (
    DEFAULT_PREFIX,
    OTA_FINAL_EVENTS,
    Deploy,
    InputError,
    MessageError,
    VerifiedBundleFile,
    choose_block_size,
    commit_command,
    rollback_command,
)
from edgeops_core.digest import sha256_new
from edgeops_core.messages import MAX_HOLD_S
from edgeops_fleet.errors import SenderError

if TYPE_CHECKING:
    from edgeops_fleet.store import Store

__all__ = [
    "ACTIVE_STATES",
    "BASELINE_MIN_S",
    "CALLER_ERRORS",
    "DEVICE_STATUSES",
    "GATE_NAMES",
    "HOLD_MARGIN_S",
    "PSI_EPSILON",
    "ROLLOUT_STATES",
    "WAVE_STATES",
    "Gates",
    "RolloutConflictError",
    "RolloutEngine",
    "RolloutLink",
    "RolloutSpec",
    "deploy_id_of",
    "group_key",
    "parse_duration",
    "parse_waves",
    "psi",
]

log = logging.getLogger(__name__)

ROLLOUT_STATES = ("running", "paused", "passed", "failed", "aborted")
"""A rollout's ``state``."""
ACTIVE_STATES = ("running", "paused")
"""States that hold the group: no second rollout may start for it."""
WAVE_STATES = ("pending", "installing", "soaking", "passed", "failed", "aborted", "cancelled")
"""A wave's ``state``."""
DEVICE_STATUSES = (
    "pending",
    "waiting",
    "offered",
    "installing",
    "held",
    "committing",
    "rolling_back",
    "committed",
    "rolled_back",
    "failed",
    "rejected",
    "timed_out",
    "skipped",
    "missed",
    "cancelled",
)
"""A rollout device's ``status`` (see the module docstring)."""
GATE_NAMES = ("install", "inferences", "error_rate", "latency_p99", "psi", "anomaly_rate", "drift_alarms")
"""The gates of a wave, in the order they are judged and reported."""
HOLD_MARGIN_S = 600
"""Seconds a held device waits past the rollout's deadline before it commits on its own."""
BASELINE_MIN_S = 600.0
"""The PSI baseline window is the last ``max(soak, BASELINE_MIN_S)`` seconds before the offer."""
PSI_EPSILON = 1e-4
"""Class fractions are floored at this before PSI (as the agent's own prediction PSI does)."""
MAX_WAVES = 20
"""Most waves in one rollout."""
EXTEND_MAX_S = 600.0
"""An inconclusive soak is judged again after ``min(soak, EXTEND_MAX_S)`` seconds."""

_IN_FLIGHT = frozenset({"offered", "installing"})
_INSTALLED = frozenset({"held", "committing", "committed"})
_WATCHED = frozenset({"offered", "installing", "held", "committing", "rolling_back", "timed_out"})
_NOT_OFFERED = frozenset({"pending", "waiting", "skipped", "missed", "cancelled"})
_FINAL_STATUS = {"ota_committed": "committed", "ota_rolled_back": "rolled_back", "ota_failed": "failed"}
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DURATION = re.compile(r"(\d{1,12}(?:\.\d{1,9})?)\s*([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_WAVE = re.compile(r"(\d{1,9})|(\d{1,3}(?:\.\d{1,6})?)%")
_MAX_DURATION_S = 366 * 86400.0


# -- input ------------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds from ``"90s"``, ``"5m"``, ``"2h"``, ``"1d"`` or a bare number of seconds (``"30"``).

    Raises:
        InputError: anything else, a negative value or more than a year.
    """
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise InputError(f"duration must be a number with an optional unit s, m, h or d (90s, 5m, 2h, 1d, 30), got {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > _MAX_DURATION_S:
        raise InputError(f"duration must be at most 366d, got {text!r}")
    return seconds


def parse_waves(text: str) -> tuple[str, ...]:
    """The waves of ``"1,10%,50%,100%"``: cumulative device counts or percentages of the group.

    Each wave names how many of the group's devices have been offered the release once it
    started (a count, or a percentage rounded up), so the values never decrease; the last
    wave must be ``100%`` or a count (which must then cover the whole group at start).

    Raises:
        InputError: empty, more than :data:`MAX_WAVES`, a value that is neither a count >= 1
            nor a percentage in (0, 100], a value below an earlier one of the same kind, or a
            last wave below 100%.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"waves must be a comma-separated list such as 1,10%,50%,100%, got {text!r}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_WAVES:
        raise InputError(f"a rollout has at most {MAX_WAVES} waves, got {len(parts)}")
    last: dict[bool, tuple[float, str]] = {}
    for i, part in enumerate(parts, 1):
        m = _WAVE.fullmatch(part)
        value = float(m.group(1) or m.group(2)) if m else 0.0
        is_pct = bool(m and m.group(2))
        if m is None or value <= 0 or (is_pct and value > 100):
            raise InputError(
                f"wave {i} must be a device count >= 1 (5) or a percentage of the group in (0, 100] (10%), got {part!r}"
            )
        if is_pct in last and value < last[is_pct][0]:
            raise InputError(f"waves are cumulative and never decrease: wave {i} ({part}) is below {last[is_pct][1]}")
        last[is_pct] = (value, part)
    if parts[-1].endswith("%") and float(parts[-1][:-1]) != 100:
        raise InputError(f"the last wave must be 100% (or a device count covering the group), got {parts[-1]!r}")
    return tuple(parts)


def _wave_counts(waves: Sequence[str], n: int) -> list[int]:
    """Cumulative device counts of ``waves`` for a group of ``n`` devices (percentages rounded up)."""
    out: list[int] = []
    for w in waves:
        want = math.ceil(float(w[:-1]) * n / 100 - 1e-9) if w.endswith("%") else min(int(w), n)
        out.append(max(want, out[-1] if out else 0))
    if out[-1] < n:
        raise InputError(f"waves {','.join(waves)} cover {out[-1]} of the group's {n} devices; end with 100%")
    return out


def group_key(group: Mapping[str, Any]) -> str:
    """The group's key: ``target=ecu`` then its tags sorted (``target=ecu,site=a``).

    Raises:
        InputError: no target, or a tag that is not ``[A-Za-z0-9_.-]{1,64}`` on both sides.
    """
    target, tags = _check_group(group)
    return ",".join([f"target={target}", *(f"{k}={v}" for k, v in sorted(tags.items()))])


def _check_group(group: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    if not isinstance(group, Mapping) or set(group) - {"target", "tags"}:
        raise InputError(f"group must be {{'target': NAME, 'tags': {{KEY: VALUE}}}}, got {group!r}")
    target, tags = group.get("target"), group.get("tags") or {}
    if not isinstance(target, str) or not _TAG.fullmatch(target):
        raise InputError(f"group target must be a target name ([A-Za-z0-9_.-]{{1,64}}), got {target!r}")
    if not isinstance(tags, Mapping) or len(tags) > 32:
        raise InputError(f"group tags must be at most 32 KEY=VALUE pairs, got {tags!r}")
    for k, v in tags.items():
        if not (isinstance(k, str) and isinstance(v, str) and _TAG.fullmatch(k) and _TAG.fullmatch(v)):
            raise InputError(f"group tag {k!r}={v!r}: key and value must be [A-Za-z0-9_.-]{{1,64}}")
    return target, dict(tags)


def _number(name: str, value: object, *, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or value > hi or (lo_open and value == lo):  # type: ignore[operator]
        span = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else "")
        raise InputError(f"gate {name} must be a finite number {span}, got {value!r}")


def _integer(name: str, value: object, *, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InputError(f"gate {name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Gates:
    """The thresholds a wave must meet (defaults are the documented ones, docs/fleet.md).

    Attributes:
        install_success_min: fraction of offered wave devices whose install reached held.
        error_rate_max: errors / inferences over the soak, new release, installed wave devices.
        latency_p99_ms: the latency budget (the CLI fills it from the target profile); ``None``: no latency gate.
        latency_factor: the p99 may reach ``latency_p99_ms * latency_factor``.
        psi_max: PSI between the previous and the new release's predicted-class distributions.
        anomaly_rate_max: anomaly models: how far the new release's anomaly rate over the soak may
            rise above what the same devices flagged on the previous release (each device's own
            rate, weighted by its soak predictions; zero for a device that ran no anomaly model or
            too few predictions to tell): a model that flags normal inputs fails. ``None``: no
            anomaly-rate gate (also what a rollout stored before this gate existed gets).
        drift_alarms_max: wave devices that may raise a drift alarm on the new release during the soak
            (devices already alarmed in the previous release's baseline are not counted).
        min_inferences: fewer inferences over the soak make the health gates inconclusive.
        install_timeout_s: a device without a held or final event this long after its offer timed out.

    Raises:
        InputError: a negative or non-finite value, a rate outside [0, 1], a non-integer count.
    """

    install_success_min: float = 1.0
    error_rate_max: float = 0.01
    latency_p99_ms: float | None = None
    latency_factor: float = 1.0
    psi_max: float = 0.25
    anomaly_rate_max: float | None = 0.05
    drift_alarms_max: int = 0
    min_inferences: int = 100
    install_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _number("install_success_min", self.install_success_min, lo=0, hi=1)
        _number("error_rate_max", self.error_rate_max, lo=0, hi=1)
        if self.latency_p99_ms is not None:
            _number("latency_p99_ms", self.latency_p99_ms, lo=0, lo_open=True)
        _number("latency_factor", self.latency_factor, lo=0, lo_open=True)
        _number("psi_max", self.psi_max, lo=0)
        if self.anomaly_rate_max is not None:
            _number("anomaly_rate_max", self.anomaly_rate_max, lo=0, hi=1)
        _integer("drift_alarms_max", self.drift_alarms_max, lo=0)
        _integer("min_inferences", self.min_inferences, lo=1)
        _number("install_timeout_s", self.install_timeout_s, lo=0, lo_open=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored with the rollout."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Gates:
        """Gates from :meth:`to_dict` (unknown keys refused).

        Raises:
            InputError: an unknown key or a value :class:`Gates` refuses.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"unknown gate {unknown[0]!r}; known gates: {', '.join(sorted(known))}")
        # A rollout stored before the anomaly-rate gate existed is not judged by a limit it never had.
        return cls(**{"anomaly_rate_max": None, **dict(raw)})

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Gates:
        """Gates from option texts such as ``{"error_rate_max": "0.05"}`` (the rest default).

        Rates take ``0.05`` or ``5%``; ``install_timeout_s`` takes a duration (``10m``);
        ``latency_p99_ms`` takes ``none`` to turn the latency gate off. Numbers pass as they are.

        Raises:
            InputError: an unknown option or a value that does not parse or makes no sense.
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in options.items():
            if name not in known:
                raise InputError(f"unknown gate option {name!r}; known: {', '.join(sorted(known))}")
            values[name] = _gate_value(name, value) if isinstance(value, str) else value
        return cls(**values)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Gates:
        """Gates from ``NAME=VALUE`` texts (the CLI's repeated ``--gate``); see :meth:`from_options`.

        Raises:
            InputError: a text without ``=``, a repeated name, or what :meth:`from_options` refuses.
        """
        options: dict[str, str] = {}
        for text in texts:
            name, sep, value = text.partition("=")
            if not sep or not name.strip():
                raise InputError(f"gate option must be NAME=VALUE (error_rate_max=0.05), got {text!r}")
            if name.strip() in options:
                raise InputError(f"gate option {name.strip()!r} given twice")
            options[name.strip()] = value.strip()
        return cls.from_options(options)


def _gate_value(name: str, text: str) -> float | int | None:
    t = text.strip()
    try:
        if name in ("latency_p99_ms", "anomaly_rate_max") and t.lower() in ("none", "off"):
            return None
        if name == "install_timeout_s":
            return parse_duration(t)
        if name in ("drift_alarms_max", "min_inferences"):
            return int(t)
        if name in ("install_success_min", "error_rate_max", "anomaly_rate_max") and t.endswith("%"):
            return float(t[:-1]) / 100
        return float(t)
    except (ValueError, InputError) as exc:
        raise InputError(f"gate option {name}={text!r}: expected a number ({_GATE_HINT.get(name, '0.25')})") from exc


_GATE_HINT = {
    "install_success_min": "0.8 or 80%",
    "error_rate_max": "0.01 or 1%",
    "anomaly_rate_max": "0.05 or 5%, or none",
    "latency_p99_ms": "25, or none",
    "drift_alarms_max": "an integer, 0",
    "min_inferences": "an integer, 100",
    "install_timeout_s": "a duration, 10m",
}


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """What to roll out, to whom, how: everything :meth:`RolloutEngine.start` needs.

    The bundle must have been verified by the caller (the console keeps its own copy);
    the engine checks the file still has ``sha256`` and ``size`` before any device sees it.

    Attributes:
        bundle_path: the verified bundle file.
        name, version, release, target, sha256, size: its manifest fields and file digest/size.
        group: ``{"target": ..., "tags": {...}}``; the target must be the bundle's.
        waves: from :func:`parse_waves`.
        soak_s: how long each wave soaks once installed (seconds, >= 0).
        gates: the thresholds.
        deadline_s: the rollout ends by ``start + deadline_s``; offline devices are offered until then.
        allow_bad: start even though the release is marked bad for the group (an operator override).

    Raises:
        InputError: an invalid field (the group, waves, durations, digest).
    """

    bundle_path: Path
    name: str
    version: str
    release: int
    target: str
    sha256: str
    size: int
    group: Mapping[str, Any]
    waves: tuple[str, ...]
    soak_s: float
    gates: Gates = field(default_factory=Gates)
    deadline_s: float = 86400.0
    allow_bad: bool = False

    def __post_init__(self) -> None:
        target, tags = _check_group(self.group)
        object.__setattr__(self, "group", {"target": target, "tags": tags})
        waves: object = self.waves
        object.__setattr__(self, "waves", parse_waves(waves if isinstance(waves, str) else ",".join(map(str, self.waves))))
        object.__setattr__(self, "bundle_path", Path(self.bundle_path))
        if target != self.target:
            raise InputError(f"the bundle is built for target {self.target!r}, the group is target {target!r}")
        if not isinstance(self.release, int) or isinstance(self.release, bool) or self.release < 1:
            raise InputError(f"release must be an integer >= 1, got {self.release!r}")
        if not (isinstance(self.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.sha256)):
            raise InputError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise InputError(f"size must be an integer >= 1, got {self.size!r}")
        for what, value in (("soak", self.soak_s), ("deadline", self.deadline_s)):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (what == "deadline" and value == 0) or value > MAX_HOLD_S - HOLD_MARGIN_S:
                # A device holds an uncommitted release at most MAX_HOLD_S: the rollout must end before.
                raise InputError(f"{what} must be {'> 0' if what == 'deadline' else '>= 0'} s and under 7 days, got {value!r} s")
        if not isinstance(self.gates, Gates):
            raise InputError(f"gates must be Gates, got {type(self.gates).__name__}")

    @property
    def group_key(self) -> str:
        """The group's key (:func:`group_key`)."""
        return group_key(self.group)

    @classmethod
    def from_bundle(cls, bundle: VerifiedBundleFile, **options: Any) -> RolloutSpec:
        """A spec for a verified bundle file (``options``: group, waves, soak_s, gates, deadline_s, allow_bad)."""
        m = bundle.manifest
        return cls(
            bundle_path=bundle.path,
            name=m.name,
            version=m.version,
            release=m.release,
            target=m.target,
            sha256=bundle.digest,
            size=bundle.size,
            **options,
        )


class RolloutLink(Protocol):
    """How the engine reaches devices (the console implements it)."""

    def offer(self, deploy: Deploy, bundle_path: Path, device_ids: Sequence[str], *, hold_s: int) -> None:
        """Publish ``deploy_command(deploy, hold_s=...)`` (QoS 1) to each device and serve its blocks."""

    def stop_serving(self, deploy_id: str) -> None:
        """Stop serving the blocks of ``deploy_id``."""

    def command(self, device_id: str, payload: bytes) -> None:
        """Publish a command payload (``commit``/``rollback``) to one device (QoS 1)."""


# -- gates ------------------------------------------------------------------------------------


def psi(expected: Sequence[int], actual: Sequence[int], *, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of two count vectors (padded to one length, fractions floored at ``epsilon``).

    ``sum((a - e) * ln(a / e))`` over the classes; 0 for identical distributions.

    Raises:
        InputError: a vector with no count.
    """
    n = max(len(expected), len(actual))
    e = [*expected, *[0] * (n - len(expected))]
    a = [*actual, *[0] * (n - len(actual))]
    te, ta = sum(e), sum(a)
    if te <= 0 or ta <= 0:
        raise InputError("PSI needs at least one count on each side")
    total = 0.0
    for ce, ca in zip(e, a, strict=True):
        fe, fa = max(ce / te, epsilon), max(ca / ta, epsilon)
        total += (fa - fe) * math.log(fa / fe)
    return total


def _predicted(rows: Iterable[Mapping[str, Any]]) -> list[int]:
    out: list[int] = []
    for row in rows:
        counts = (row["payload"].get("inference") or {}).get("predicted")
        if not isinstance(counts, list):
            continue
        if len(counts) > len(out):
            out.extend([0] * (len(counts) - len(out)))
        for i, c in enumerate(counts):
            if isinstance(c, int) and not isinstance(c, bool) and c > 0:
                out[i] += c
    return out


#: Error types that are the caller's fault, not the release's: a tensor of the wrong shape or
#: dtype, a malformed socket request. The device's own health check excepts them too.
CALLER_ERRORS = frozenset({"TensorInputError", "RequestError"})


def _release_errors(inference: Mapping[str, Any]) -> int:
    """A telemetry record's failed inferences that count against the release."""
    by_type = inference.get("errors")
    if isinstance(by_type, Mapping):
        return sum(int(v) for k, v in by_type.items() if k not in CALLER_ERRORS and isinstance(v, int))
    return int(inference.get("error_count") or 0)


def _gate(value: float | None, limit: float | None, passed: bool | None, detail: str) -> dict[str, Any]:
    return {"value": None if value is None else round(value, 6), "limit": limit, "passed": passed, "detail": detail}


def _health_gates(
    gates: Gates, soak: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]], device_count: int
) -> dict[str, dict[str, Any]]:
    """The health gates over the soak's telemetry rows (and the PSI baseline rows)."""
    n = sum(int(r["payload"]["inference"].get("window_count") or 0) for r in soak)
    errors = sum(_release_errors(r["payload"]["inference"]) for r in soak)
    out = {
        "inferences": _gate(
            n,
            gates.min_inferences,
            n >= gates.min_inferences,
            f"{n} inferences in {len(soak)} telemetry records from {device_count} device(s)",
        )
    }
    if n < gates.min_inferences:
        why = f"inconclusive: {n} of {gates.min_inferences} inferences needed"
        for name in GATE_NAMES[2:]:
            out[name] = _gate(None, None, None, why)
        return out
    rate = errors / (n + errors)  # of the requests the model was asked to answer
    text = f"{errors} failed of {n + errors} requests (malformed requests, the caller's fault, not counted)"
    out["error_rate"] = _gate(rate, gates.error_rate_max, rate <= gates.error_rate_max, text)
    p99s = [float(v) for r in soak if (v := (r["payload"].get("latency_ms") or {}).get("p99")) is not None]
    p99 = max(p99s) if p99s else None
    if gates.latency_p99_ms is None:
        out["latency_p99"] = _gate(p99, None, True, "no latency budget given: not gated")
    else:
        limit = gates.latency_p99_ms * gates.latency_factor
        ok = p99 is None or p99 <= limit
        text = f"worst telemetry p99 in ms vs budget {gates.latency_p99_ms:g} ms x {gates.latency_factor:g}"
        out["latency_p99"] = _gate(p99, round(limit, 6), ok, text if p99 is not None else "no latency reported")
    out["psi"] = _psi_gate(gates, baseline, soak)
    out["anomaly_rate"] = _anomaly_gate(gates, baseline, soak)

    # Only an alarm the new release brought counts: a device whose inputs already drifted on the
    # previous release (its baseline) would otherwise block the very retrained model meant to fix it.
    def alarmed(rows: Sequence[Mapping[str, Any]]) -> set[str]:
        return {r["device_id"] for r in rows if (r["payload"].get("drift") or {}).get("alarm") is True}

    before = alarmed(baseline)
    alarms = sorted(alarmed(soak) - before)
    detail = f"devices with a new drift alarm: {', '.join(alarms)}" if alarms else "no new drift alarm"
    if before:
        detail += f" (already alarmed on the previous release, not counted: {', '.join(sorted(before))})"
    out["drift_alarms"] = _gate(len(alarms), gates.drift_alarms_max, len(alarms) <= gates.drift_alarms_max, detail)
    return out


def _psi_gate(gates: Gates, baseline: Sequence[Mapping[str, Any]], soak: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    before, after = _predicted(baseline), _predicted(soak)
    if sum(after) == 0:
        return _gate(None, gates.psi_max, True, "not gated: the new release reports no predicted-class counts")
    if sum(before) < gates.min_inferences:
        return _gate(
            None,
            gates.psi_max,
            True,
            f"not gated: {sum(before)} predictions on the previous release before the offer (< {gates.min_inferences})",
        )
    value = psi(before, after)
    return _gate(
        value,
        gates.psi_max,
        value <= gates.psi_max,
        f"previous release {sum(before)} predictions vs new release {sum(after)}",
    )


def _anomalies(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per device, (anomalies, scored predictions) summed over its rows of an anomaly model.

    A row's predictions are ``count / rate`` when its rate is above zero (the agent's own
    denominator: the first interval after an install also counts the replaced model's
    predictions in ``window_count``), else ``window_count``; a count above them is capped.
    """
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        inference = row["payload"].get("inference") or {}
        anomaly = inference.get("anomaly")
        if not isinstance(anomaly, Mapping):
            continue
        count, rate, window = anomaly.get("count"), anomaly.get("rate"), inference.get("window_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            continue
        if isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate <= 1:
            n = round(count / rate)
        elif isinstance(window, int) and not isinstance(window, bool) and window >= 0:
            n = window
        else:
            continue
        found, total = out.get(str(row["device_id"]), (0, 0))
        out[str(row["device_id"])] = (found + min(count, n), total + n)
    return out


def _anomaly_gate(gates: Gates, baseline: Sequence[Mapping[str, Any]], soak: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if gates.anomaly_rate_max is None:
        return _gate(None, None, True, "not gated: no anomaly_rate_max")
    now = _anomalies(soak)
    found, n = sum(f for f, _ in now.values()), sum(t for _, t in now.values())
    if n == 0:
        return _gate(None, gates.anomaly_rate_max, True, "not gated: the new release is not an anomaly model")
    if n < gates.min_inferences:
        return _gate(
            None,
            gates.anomaly_rate_max,
            True,
            f"not gated: {n} anomaly-model predictions in the soak (< {gates.min_inferences})",
        )
    rate = found / n
    # Only the rise counts: what each device flagged before the offer (real faults on its line)
    # is expected of it again, weighted by its share of the soak's predictions.
    before = _anomalies(baseline)
    known = {d: f / t for d, (f, t) in before.items() if t >= gates.min_inferences}
    expected = sum(t * known.get(d, 0.0) for d, (_, t) in now.items()) / n
    limit = min(1.0, expected + gates.anomaly_rate_max)
    text = f"{found} anomalies in {n} predictions on the new release"
    if known:
        text += f"; {expected:.2%} expected from the previous release ({len(known)} device(s)) + {gates.anomaly_rate_max:g}"
    else:
        text += f"; no previous anomaly rate to compare (< {gates.min_inferences} predictions per device)"
    return _gate(rate, round(limit, 6), rate <= limit, text)


_GATE_WORDS = {
    "install": ("install success", "<"),
    "error_rate": ("error rate", ">"),
    "latency_p99": ("p99 latency (ms)", ">"),
    "psi": ("prediction PSI", ">"),
    "anomaly_rate": ("anomaly rate", ">"),
    "drift_alarms": ("drift alarms", ">"),
}


def _failures(gate: Mapping[str, Mapping[str, Any]]) -> list[str]:
    out = []
    for name, (words, op) in _GATE_WORDS.items():
        g = gate.get(name)
        if g is not None and g.get("passed") is False:
            out.append(f"{name} gate: {words} {g['value']:g} {op} {g['limit']:g} ({g['detail']})")
    return out


# -- the engine -------------------------------------------------------------------------------


class RolloutConflictError(InputError):
    """A rollout request conflicts with the fleet's state: a rollout already running for the
    group or its devices, a release marked bad for the group, an action its state forbids."""


def deploy_id_of(rollout_id: str, index: int) -> str:
    """The deploy id of wave ``index`` (0-based) of a rollout: ``<rollout id>-w<index + 1>``."""
    return f"{rollout_id}-w{index + 1}"


def _new_rollout_id(now: float) -> str:
    return f"r-{datetime.fromtimestamp(now, UTC).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


@dataclass
class _Action:
    kind: str  # "offer", "command", "stop"
    deploy_id: str
    index: int = 0
    device_ids: list[str] = field(default_factory=list)
    hold_s: int = 0
    payload: bytes = b""


@dataclass
class _Ctx:
    """One rollout's rows during a tick: changed in memory, written once, then acted on."""

    rollout: dict[str, Any]
    waves: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]
    fleet: dict[str, dict[str, Any]]
    now: float
    actions: list[_Action] = field(default_factory=list)
    bad: str | None = None
    original: tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]]] = field(init=False)

    def __post_init__(self) -> None:
        self.original = copy.deepcopy((self.rollout, self.waves, self.devices))

    @property
    def rid(self) -> str:
        return str(self.rollout["rollout_id"])

    @property
    def gates(self) -> Gates:
        return Gates.from_dict(self.rollout["gates"])

    @property
    def deadline(self) -> float:
        return float(self.rollout["deadline_at"])

    def of_wave(self, index: int) -> list[dict[str, Any]]:
        return [d for d in self.devices.values() if d["wave"] == index]

    def detail(self, index: int) -> dict[str, Any]:
        waves: list[dict[str, Any]] = self.rollout["detail"]["waves"]
        return waves[index]


class RolloutEngine:
    """Runs staged rollouts over a :class:`Store` and a :class:`RolloutLink` (thread-safe).

    Args:
        store: where every rollout, wave and device row lives (and device reports are read).
        link: how offers and commands reach devices.
        clock: epoch seconds (the console's clock; the store's ``received_at`` uses the same).
        prefix: the topic prefix (kept for the link's benefit and the status).
    """

    def __init__(
        self, store: Store, link: RolloutLink, *, clock: Callable[[], float] = time.time, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.store, self.link, self.clock, self.prefix = store, link, clock, prefix
        self._lock = threading.RLock()
        self._blocks: dict[tuple[str, str], tuple[int, int, tuple[str, ...]]] = {}
        self._serving: set[str] = set()
        self._resend: set[str] = set()

    # -- commands ---------------------------------------------------------------------------------

    def start(self, spec: RolloutSpec) -> dict[str, Any]:
        """Validate and persist a new rollout; its first wave is offered on the next :meth:`tick`.

        Returns:
            The rollout row.

        Raises:
            InputError: the group has no device, every device already runs the release, the
                release is marked bad for the group (without ``allow_bad``), another rollout
                is running or paused for the group or one of its devices, the waves do not
                cover the group, the deadline is shorter than the waves' soaks, or the bundle
                file is not the one described.
        """
        with self._lock:
            now = self.clock()
            key = spec.group_key
            self._refuse_bad(spec, key)
            active = self.store.rollouts(states=ACTIVE_STATES)
            for r in active:
                if r["group_key"] == key:
                    raise RolloutConflictError(
                        f"rollout {r['rollout_id']} is already {r['state']} for group {key}; "
                        f"let it finish or abort it first (edgeops fleet rollout abort {r['rollout_id']})"
                    )
            fleet = sorted(self.store.devices(target=spec.group["target"], tags=spec.group["tags"]), key=lambda d: d["device_id"])
            if not fleet:
                raise InputError(
                    f"group {key} has no devices: the console has seen no device with that target and tags "
                    "(see edgeops fleet devices)"
                )
            todo = [d for d in fleet if (d.get("release") or 0) < spec.release]
            if not todo:
                raise InputError(f"every device of group {key} already runs release {spec.release} or newer")
            counts = _wave_counts(spec.waves, len(todo))
            self._refuse_overlap(active, {d["device_id"] for d in todo})
            # A wave that adds no device (10% of 5 after 1) stays in the plan and passes at once,
            # so wave numbers are those the operator gave.
            plan = [(w, todo[lo:hi]) for w, lo, hi in zip(spec.waves, [0, *counts], counts, strict=False)]
            soaking = sum(1 for _, devs in plan if devs)
            if spec.deadline_s < soaking * spec.soak_s:
                raise InputError(f"deadline {spec.deadline_s:g} s is shorter than {soaking} waves x soak {spec.soak_s:g} s")
            try:
                self._block_digests(spec.bundle_path, spec.sha256)
            except SenderError as exc:
                raise InputError(str(exc)) from exc
            rid = _new_rollout_id(now)
            self._persist_start(spec, rid, now, plan, [d for d in fleet if d not in todo])
            log.info("rollout %s of %s release %d to %s: %d wave(s)", rid, spec.name, spec.release, key, len(plan))
            row = self.store.rollout(rid)
            assert row is not None  # written just above in one committed transaction
            return row

    def _refuse_bad(self, spec: RolloutSpec, key: str) -> None:
        for bad in self.store.bad_releases(group=key):
            if bad["name"] == spec.name and bad["release"] == spec.release and not spec.allow_bad:
                raise RolloutConflictError(
                    f"release {spec.release} of {spec.name!r} is marked bad for group {key} "
                    f"(rollout {bad['rollout_id']}: {bad['reason']}); ship a fixed build as a new release, "
                    f"or revert with `edgeops release revert {spec.name} --to RELEASE` and roll that out; "
                    "to ship it anyway, start the rollout with --allow-bad"
                )

    def _refuse_overlap(self, active: Sequence[Mapping[str, Any]], ids: set[str]) -> None:
        for r in active:
            for d in self.store.rollout_devices(r["rollout_id"]):
                if d["device_id"] in ids and d["status"] not in ("skipped", "cancelled", "missed"):
                    raise RolloutConflictError(
                        f"device {d['device_id']} is in rollout {r['rollout_id']} ({r['state']}, group {r['group_key']}); "
                        "let it finish or abort it first"
                    )

    def _persist_start(
        self,
        spec: RolloutSpec,
        rid: str,
        now: float,
        plan: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
        skipped: Sequence[Mapping[str, Any]],
    ) -> None:
        planned = {d["device_id"] for _, devs in plan for d in devs}
        with self.store.transaction():
            self.store.put_rollout(
                {
                    "rollout_id": rid,
                    "state": "running",
                    "name": spec.name,
                    "version": spec.version,
                    "release": spec.release,
                    "target": spec.target,
                    "sha256": spec.sha256,
                    "bundle_path": str(spec.bundle_path),
                    "group": dict(spec.group),
                    "group_key": spec.group_key,
                    "waves": list(spec.waves),
                    "soak_s": float(spec.soak_s),
                    "gates": spec.gates.to_dict(),
                    "deadline_at": now + spec.deadline_s,
                    "current_wave": 0,
                    "created_at": now,
                    "updated_at": now,
                    "message": f"wave 1 of {len(plan)} starts",
                    "detail": {
                        "size": spec.size,
                        "open": True,
                        "allow_bad": spec.allow_bad,
                        "waves": [{"spec": w, "soak_from": None, "extensions": 0} for w, _ in plan],
                    },
                }
            )
            for index, (_, devs) in enumerate(plan):
                ids = [d["device_id"] for d in devs]
                self.store.put_wave(
                    {"rollout_id": rid, "index": index, "state": "pending", "devices": ids, "gate": {}, "passed": None}
                )
                for d in devs:
                    self.store.put_rollout_device(self._device_row(rid, d, index, "pending"))
            for d in skipped:
                row = self._device_row(rid, d, None, "skipped")
                row.update(reason="already_at_release", message=f"already runs release {d.get('release')}", ended_at=now)
                self.store.put_rollout_device(row)
            self._supersede(rid, planned)

    @staticmethod
    def _device_row(rid: str, d: Mapping[str, Any], wave: int | None, status: str) -> dict[str, Any]:
        return {
            "rollout_id": rid,
            "device_id": d["device_id"],
            "wave": wave,
            "deploy_id": None if wave is None else deploy_id_of(rid, wave),
            "status": status,
            "previous_release": d.get("release"),
            "offered_at": None,
            "ended_at": None,
            "reason": None,
            "message": None,
        }

    def _supersede(self, rid: str, planned: set[str]) -> None:
        """Devices still waiting for a late offer of an ended rollout now belong to ``rid``."""
        for r in self.store.rollouts(states=("passed", "failed", "aborted")):
            if not (r.get("detail") or {}).get("open"):
                continue
            for d in self.store.rollout_devices(r["rollout_id"]):
                if d["status"] == "waiting" and d["device_id"] in planned:
                    self.store.put_rollout_device(
                        {**d, "status": "cancelled", "reason": "superseded", "message": f"superseded by rollout {rid}"}
                    )

    def pause(self, rollout_id: str) -> dict[str, Any]:
        """Stop offering and judging (in-flight installs go on; held devices stay held).

        The deadline keeps running: a rollout still paused at its deadline fails.

        Raises:
            InputError: no such rollout, or it is not running.
        """
        return self._set_state(rollout_id, "pause", ("running",), "paused", "paused by the operator")

    def resume(self, rollout_id: str) -> dict[str, Any]:
        """Continue a paused rollout where it stopped.

        Raises:
            InputError: no such rollout, or it is not paused.
        """
        return self._set_state(rollout_id, "resume", ("paused",), "running", "resumed by the operator")

    def abort(self, rollout_id: str) -> dict[str, Any]:
        """End a running or paused rollout: the current wave's held devices are rolled back.

        Devices of waves that already passed keep the release; devices not yet offered never are.

        Raises:
            InputError: no such rollout, or it already ended.
        """
        with self._lock:
            ctx = self._load(self._row(rollout_id))
            if ctx.rollout["state"] not in ACTIVE_STATES:
                raise RolloutConflictError(f"rollout {rollout_id} already ended ({ctx.rollout['state']}); nothing to abort")
            self._end(ctx, "aborted", "aborted by the operator", bad=False)
            self._settle(ctx)
            self._commit(ctx)
            return ctx.rollout

    def _set_state(self, rollout_id: str, verb: str, sources: tuple[str, ...], target: str, message: str) -> dict[str, Any]:
        with self._lock:
            row = self._row(rollout_id)
            if row["state"] not in sources:
                raise RolloutConflictError(
                    f"rollout {rollout_id} is {row['state']}; only a {' or '.join(sources)} rollout can {verb}"
                )
            now = self.clock()
            self.store.put_rollout({"rollout_id": rollout_id, "state": target, "message": message, "updated_at": now})
            log.info("rollout %s %s", rollout_id, target)
            out = self.store.rollout(rollout_id)
            assert out is not None
            return out

    def _row(self, rollout_id: str) -> dict[str, Any]:
        row = self.store.rollout(rollout_id) if isinstance(rollout_id, str) else None
        if row is None:
            raise InputError(f"no rollout {rollout_id!r} (see edgeops fleet rollout status)")
        return row

    # -- the loop ---------------------------------------------------------------------------------

    def resume_all(self) -> None:
        """After a restart: send again what the stored rows say is in flight (same ids).

        Offered devices of running (or passed, for late offers) rollouts get their wave's
        deploy again, which also restarts serving its blocks; ``committing`` and
        ``rolling_back`` devices get their command again. A device acts on each id once.
        """
        with self._lock:
            for r in self.store.rollouts():
                if r["state"] in ACTIVE_STATES or (r.get("detail") or {}).get("open"):
                    self._resend_all(self._load(r))

    def _resend_all(self, ctx: _Ctx) -> None:
        offers: dict[tuple[int, int], list[str]] = {}
        for d in ctx.devices.values():
            index = d["wave"]
            if d["status"] in _IN_FLIGHT and ctx.rollout["state"] in ("running", "paused", "passed"):
                offers.setdefault((index, self._hold_s(ctx, index, float(d["offered_at"]))), []).append(d["device_id"])
            elif d["status"] in ("committing", "rolling_back"):
                ctx.actions.append(_end_hold(d))
        for (index, hold), ids in sorted(offers.items()):
            ctx.actions.append(_Action("offer", deploy_id_of(ctx.rid, index), index, sorted(ids), hold))
        self._act(ctx)

    def tick(self) -> None:
        """Advance every running rollout (and the late offers of ended ones) by what the store shows.

        Idempotent: a tick with nothing new changes nothing and sends nothing.

        Raises:
            StoreError: the database stayed unreachable (nothing of that rollout's tick was sent).
        """
        with self._lock:
            for r in self.store.rollouts():
                if r["state"] in ACTIVE_STATES or (r.get("detail") or {}).get("open"):
                    if r["rollout_id"] in self._resend:
                        self._resend.discard(r["rollout_id"])
                        self._resend_all(self._load(r))
                    self._advance(self._load(r))

    def _load(self, row: dict[str, Any]) -> _Ctx:
        rid = row["rollout_id"]
        group = row["group"] or {}
        fleet = {d["device_id"]: d for d in self.store.devices(target=group.get("target"))}
        devices = {d["device_id"]: d for d in self.store.rollout_devices(rid)}
        return _Ctx(dict(row), self.store.waves(rid), devices, fleet, self.clock())

    def _advance(self, ctx: _Ctx) -> None:
        self._observe(ctx)
        state = ctx.rollout["state"]
        if state == "running":
            self._step(ctx)
        elif state == "paused" and ctx.now >= ctx.deadline:
            self._end(ctx, "failed", f"the deadline passed while paused at wave {ctx.rollout['current_wave'] + 1}", bad=False)
        if ctx.rollout["state"] in ("running", "passed"):
            self._late_offers(ctx)
        self._settle(ctx)
        self._close(ctx)
        self._commit(ctx)

    # -- observing devices ------------------------------------------------------------------------

    def _observe(self, ctx: _Ctx) -> None:
        watched = [d for d in ctx.devices.values() if d["status"] in _WATCHED]
        if not watched:
            return
        since = min(float(d["offered_at"] or ctx.now) for d in watched)
        types = ["ota_progress", *OTA_FINAL_EVENTS, "command_rejected"]
        seen: dict[str, list[dict[str, Any]]] = {}
        for e in self.store.events([d["device_id"] for d in watched], since=since, types=types):
            seen.setdefault(e["device_id"], []).append(e)
        timeout = ctx.gates.install_timeout_s
        for d in watched:
            _update_device(d, seen.get(d["device_id"], []), ctx.fleet.get(d["device_id"]), ctx.now, timeout)

    # -- the wave machine -------------------------------------------------------------------------

    def _step(self, ctx: _Ctx) -> None:
        while ctx.rollout["state"] == "running":
            index = int(ctx.rollout["current_wave"])
            wave = ctx.waves[index]
            if wave["state"] == "pending":
                self._start_wave(ctx, index)
            if wave["state"] == "installing" and not self._installed(ctx, index):
                return
            if wave["state"] == "soaking" and not self._soaked(ctx, index):
                return
            if wave["state"] != "passed":
                return
            if index + 1 == len(ctx.waves):
                ctx.rollout.update(state="passed", message=f"all {len(ctx.waves)} waves passed")
                log.info("rollout %s passed", ctx.rid)
                return
            ctx.rollout.update(current_wave=index + 1, message=f"wave {index + 2} of {len(ctx.waves)} starts")

    def _start_wave(self, ctx: _Ctx, index: int) -> None:
        wave = ctx.waves[index]
        wave.update(state="installing", started_at=ctx.now)
        for d in ctx.of_wave(index):
            if d["status"] == "pending":
                d["status"] = "waiting"
        self._offer_ready(ctx, index)
        log.info("rollout %s wave %d started", ctx.rid, index + 1)

    def _offer_ready(self, ctx: _Ctx, index: int) -> None:
        """Offer the wave's waiting devices that are online (skip those already at the release)."""
        release = int(ctx.rollout["release"])
        ready = []
        for d in ctx.of_wave(index):
            info = ctx.fleet.get(d["device_id"]) or {}
            if d["status"] != "waiting" or info.get("online") is not True:
                continue
            if (info.get("release") or 0) >= release:
                d.update(status="skipped", reason="already_at_release", ended_at=ctx.now)
                d["message"] = f"already runs release {info.get('release')}"
                continue
            d.update(status="offered", offered_at=ctx.now, previous_release=info.get("release"))
            ready.append(d["device_id"])
        if ready:
            hold = self._hold_s(ctx, index, ctx.now)
            ctx.actions.append(_Action("offer", deploy_id_of(ctx.rid, index), index, ready, hold))

    def _hold_s(self, ctx: _Ctx, index: int, offered_at: float) -> int:
        # Held until the rollout can no longer judge this wave (the deadline), plus a margin:
        # a console that vanished must not strand a device, nor let it commit mid-soak.
        if ctx.waves[index]["state"] == "passed":
            return 0
        return min(MAX_HOLD_S, max(1, math.ceil(ctx.deadline - offered_at)) + HOLD_MARGIN_S)

    def _installed(self, ctx: _Ctx, index: int) -> bool:
        """Judge the install gate once every offered device is resolved; True when the wave moved on."""
        devs = ctx.of_wave(index)
        offered = [d for d in devs if d["status"] not in _NOT_OFFERED]
        waiting = [d for d in devs if d["status"] == "waiting"]
        if not offered and not waiting:  # every device already had the release
            ctx.waves[index].update(
                state="passed",
                passed=True,
                ended_at=ctx.now,
                gate={"install": _gate(None, None, True, "no device of this wave needed the release")},
            )
            return True
        if not offered or any(d["status"] in _IN_FLIGHT for d in offered):
            if ctx.now >= ctx.deadline:
                why = "no device of it came online" if not offered else "its installs did not finish"
                self._end(ctx, "failed", f"the deadline passed at wave {index + 1}: {why}", bad=False)
            return False
        ok = [d for d in offered if d["status"] in _INSTALLED]
        rate = len(ok) / len(offered)
        limit = ctx.gates.install_success_min
        bad = [f"{d['device_id']} {d['status']}" + (f" ({d['reason']})" if d["reason"] else "") for d in offered if d not in ok]
        text = f"{len(ok)} of {len(offered)} offered devices held the release" + (f"; {', '.join(bad)}" if bad else "")
        wave = ctx.waves[index]
        wave["gate"] = {**(wave["gate"] or {}), "install": _gate(rate, limit, rate >= limit, text)}
        if rate < limit:
            self._fail_gates(ctx, index)
            return False
        soak_s = float(ctx.rollout["soak_s"])
        wave.update(state="soaking", soak_until=ctx.now + soak_s)
        ctx.detail(index)["soak_from"] = ctx.now
        return True

    def _soaked(self, ctx: _Ctx, index: int) -> bool:
        """Judge the health gates once the soak is over; True when the wave passed."""
        wave = ctx.waves[index]
        if ctx.now < float(wave["soak_until"]):
            if ctx.now >= ctx.deadline:
                self._end(ctx, "failed", f"the deadline passed before wave {index + 1} finished its soak", bad=False)
            return False
        health = self._health(ctx, index)
        wave["gate"] = {"install": (wave["gate"] or {}).get("install"), **health}
        if health["inferences"]["passed"] is not True:
            if ctx.now >= ctx.deadline:
                text = health["inferences"]["detail"]
                self._end(ctx, "failed", f"wave {index + 1} had insufficient data by the deadline: {text}", bad=False)
                return False
            soak_s = float(ctx.rollout["soak_s"])
            wave["soak_until"] = min(ctx.now + max(1.0, min(soak_s, EXTEND_MAX_S)), ctx.deadline)
            ctx.detail(index)["extensions"] = int(ctx.detail(index)["extensions"]) + 1
            ctx.rollout["message"] = f"wave {index + 1} soak extended: {health['inferences']['detail']}"
            return False
        if _failures(wave["gate"]):
            self._fail_gates(ctx, index)
            return False
        wave.update(state="passed", passed=True, ended_at=ctx.now)
        log.info("rollout %s wave %d passed", ctx.rid, index + 1)
        return True

    def _health(self, ctx: _Ctx, index: int) -> dict[str, dict[str, Any]]:
        release = int(ctx.rollout["release"])
        installed = [d for d in ctx.of_wave(index) if d["status"] in _INSTALLED]
        since = float(ctx.detail(index)["soak_from"])
        soak = self.store.telemetry([d["device_id"] for d in installed], since=since, until=ctx.now + 1e-6, release=release)
        window = max(float(ctx.rollout["soak_s"]), BASELINE_MIN_S)
        baseline: list[dict[str, Any]] = []
        for d in installed:
            if d["previous_release"] is None or d["offered_at"] is None:
                continue
            offered = float(d["offered_at"])
            baseline += self.store.telemetry(
                [d["device_id"]], since=offered - window, until=offered, release=int(d["previous_release"])
            )
        return _health_gates(ctx.gates, soak, baseline, len(installed))

    def _fail_gates(self, ctx: _Ctx, index: int) -> None:
        wave = ctx.waves[index]
        reasons = _failures(wave["gate"])
        message = f"wave {index + 1} failed the {'; '.join(reasons)}"
        self._end(ctx, "failed", message, bad=True)

    def _end(self, ctx: _Ctx, state: str, message: str, *, bad: bool) -> None:
        """End the rollout: the current wave and every later one stop, unoffered devices are never offered."""
        index = int(ctx.rollout["current_wave"])
        wave_state = "aborted" if state == "aborted" else "failed"
        for wave in ctx.waves[index:]:
            if wave["state"] in ("installing", "soaking"):
                wave.update(state=wave_state, passed=False, ended_at=ctx.now)
            elif wave["state"] == "pending":
                wave.update(state="cancelled", ended_at=ctx.now)
        for d in ctx.devices.values():
            if d["status"] in ("pending", "waiting"):
                d.update(status="cancelled", reason=state, message=f"never offered: the rollout {state}", ended_at=ctx.now)
        ctx.rollout.update(state=state, message=message)
        if bad:
            ctx.bad = message
        ctx.actions.append(_Action("stop", deploy_id_of(ctx.rid, index), index))
        log.warning("rollout %s %s: %s", ctx.rid, state, message)

    def _late_offers(self, ctx: _Ctx) -> None:
        """Offer waiting devices of started waves that came back online (until the deadline)."""
        for index, wave in enumerate(ctx.waves):
            if wave["state"] not in ("installing", "soaking", "passed"):
                continue
            if ctx.now >= ctx.deadline:
                for d in ctx.of_wave(index):
                    if d["status"] == "waiting":
                        d.update(status="missed", reason="offline", message="offline until the deadline", ended_at=ctx.now)
                continue
            self._offer_ready(ctx, index)

    def _settle(self, ctx: _Ctx) -> None:
        """Held devices of a decided wave get their commit or rollback (persisted as committing/rolling_back)."""
        for d in ctx.devices.values():
            if d["status"] != "held" or d["wave"] is None:
                continue
            state = ctx.waves[d["wave"]]["state"]
            if state == "passed":
                d["status"] = "committing"
            elif state in ("failed", "aborted", "cancelled"):
                d["status"] = "rolling_back"
            else:
                continue
            ctx.actions.append(_end_hold(d))
        for index in range(len(ctx.waves)):
            deploy_id = deploy_id_of(ctx.rid, index)
            if deploy_id in self._serving and not any(d["status"] in _IN_FLIGHT for d in ctx.of_wave(index)):
                ctx.actions.append(_Action("stop", deploy_id, index))

    def _close(self, ctx: _Ctx) -> None:
        """An ended rollout stays open while a device may still be offered or report for it."""
        if ctx.rollout["state"] in ACTIVE_STATES:
            return
        late = ctx.now >= ctx.deadline + HOLD_MARGIN_S
        busy = any(
            d["status"] in ("waiting", "offered", "installing", "held", "committing", "rolling_back")
            or (d["status"] == "timed_out" and not late)
            for d in ctx.devices.values()
        )
        if late:
            for d in ctx.devices.values():
                if d["status"] in _IN_FLIGHT:
                    d.update(status="timed_out", reason="timeout", message="no final event before the rollout closed")
        ctx.rollout["detail"]["open"] = busy and not late

    # -- writing, then acting ---------------------------------------------------------------------

    def _commit(self, ctx: _Ctx) -> None:
        rollout0, waves0, devices0 = ctx.original
        changed_waves = [w for w, w0 in zip(ctx.waves, waves0, strict=True) if w != w0]
        changed_devices = [d for k, d in ctx.devices.items() if d != devices0.get(k)]
        if ctx.rollout != rollout0 or changed_waves or changed_devices:
            ctx.rollout["updated_at"] = ctx.now
            with self.store.transaction():
                self.store.put_rollout(ctx.rollout)
                for w in changed_waves:
                    self.store.put_wave(w)
                for d in changed_devices:
                    self.store.put_rollout_device(d)
                if ctx.bad is not None:
                    r = ctx.rollout
                    self.store.mark_bad(
                        group=r["group_key"], name=r["name"], release=int(r["release"]), rollout_id=ctx.rid, reason=ctx.bad
                    )
            ctx.original = copy.deepcopy((ctx.rollout, ctx.waves, ctx.devices))
        self._act(ctx)

    def _act(self, ctx: _Ctx) -> None:
        actions, ctx.actions = ctx.actions, []
        for action in actions:
            try:
                if action.kind == "offer":
                    deploy = self._deploy(ctx.rollout, action.index)
                    self._serving.add(action.deploy_id)
                    self.link.offer(deploy, Path(ctx.rollout["bundle_path"]), action.device_ids, hold_s=action.hold_s)
                elif action.kind == "command":
                    self.link.command(action.device_ids[0], action.payload)
                elif action.deploy_id in self._serving or ctx.rollout["state"] not in ACTIVE_STATES:
                    self._serving.discard(action.deploy_id)
                    self.link.stop_serving(action.deploy_id)
            except (SenderError, InputError, OSError) as exc:
                # The rows already say what is in flight: send it all again on the next tick.
                log.error("rollout %s: %s of %s failed, retrying next tick: %s", ctx.rid, action.kind, action.deploy_id, exc)
                self._resend.add(ctx.rid)

    def _deploy(self, rollout: Mapping[str, Any], index: int) -> Deploy:
        size, block, digests = self._block_digests(Path(rollout["bundle_path"]), str(rollout["sha256"]))
        return Deploy(
            deploy_id=deploy_id_of(str(rollout["rollout_id"]), index),
            name=str(rollout["name"]),
            version=str(rollout["version"]),
            release=int(rollout["release"]),
            target=str(rollout["target"]),
            size=size,
            sha256=str(rollout["sha256"]),
            block_size=block,
            block_count=len(digests),
            block_sha256=digests,
        )

    def _block_digests(self, path: Path, sha256: str) -> tuple[int, int, tuple[str, ...]]:
        """Size, block size and block digests of the bundle file (read once per file and digest)."""
        key = (str(path), sha256)
        if key not in self._blocks:
            try:
                size = path.stat().st_size
                block = choose_block_size(size)
                digests, whole = [], sha256_new()
                with path.open("rb") as fh:
                    while chunk := fh.read(block):
                        digests.append(str(sha256_new(chunk).hexdigest()))
                        whole.update(chunk)
            except (OSError, MessageError) as exc:
                raise SenderError(f"{path}: cannot read the rollout's bundle: {exc}") from exc
            if whole.hexdigest() != sha256:
                raise SenderError(
                    f"{path}: not the verified bundle (sha256 {whole.hexdigest()}, expected {sha256}); verify it again"
                )
            self._blocks[key] = (size, block, tuple(digests))
        return self._blocks[key]

    # -- reading --------------------------------------------------------------------------------

    def status(self, rollout_id: str | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """One rollout, or every rollout (newest first), as JSON-ready dicts for the API, CLI and dashboard.

        Each is ``{"rollout": {...}, "counts": {device status: n}}``; one rollout adds
        ``"waves"`` (state, devices, soak times and, per gate of :data:`GATE_NAMES` judged so
        far, ``{"value", "limit", "passed", "detail"}``) and ``"devices"`` (their rows).

        Raises:
            InputError: no rollout ``rollout_id``.
        """
        with self._lock:
            if rollout_id is None:
                return [self._summary(r, self.store.rollout_devices(r["rollout_id"])) for r in self.store.rollouts()]
            row = self._row(rollout_id)
            devices = self.store.rollout_devices(rollout_id)
            meta = (row.get("detail") or {}).get("waves") or []
            waves = [
                _wave_status(rollout_id, w, meta[w["index"]] if w["index"] < len(meta) else {})
                for w in self.store.waves(rollout_id)
            ]
            return {**self._summary(row, devices), "waves": waves, "devices": devices}

    @staticmethod
    def _summary(row: Mapping[str, Any], devices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for d in devices:
            counts[d["status"]] = counts.get(d["status"], 0) + 1
        return {"rollout": {k: row.get(k) for k in _SUMMARY}, "counts": counts}


_SUMMARY = (
    "rollout_id",
    "state",
    "name",
    "version",
    "release",
    "target",
    "sha256",
    "bundle_path",
    "group",
    "group_key",
    "waves",
    "soak_s",
    "gates",
    "deadline_at",
    "current_wave",
    "created_at",
    "updated_at",
    "message",
)


def _wave_status(rollout_id: str, w: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    gate = w["gate"] or {}
    return {
        "index": w["index"],
        "number": w["index"] + 1,
        "spec": meta.get("spec"),
        "state": w["state"],
        "deploy_id": deploy_id_of(rollout_id, w["index"]),
        "devices": w["devices"],
        "started_at": w["started_at"],
        "soak_from": meta.get("soak_from"),
        "soak_until": w["soak_until"],
        "extensions": meta.get("extensions", 0),
        "ended_at": w["ended_at"],
        "passed": w["passed"],
        "gate": {name: gate[name] for name in GATE_NAMES if gate.get(name)},
    }


def _end_hold(d: Mapping[str, Any]) -> _Action:
    """The ``commit`` (status ``committing``) or ``rollback`` command of a device, with its fixed id."""
    deploy_id = str(d["deploy_id"])
    if d["status"] == "committing":
        payload = commit_command(deploy_id, command_id=f"{deploy_id}.commit")
    else:
        payload = rollback_command(deploy_id, command_id=f"{deploy_id}.rollback")
    return _Action("command", deploy_id, int(d["wave"]), [str(d["device_id"])], payload=payload)


def _update_device(
    d: dict[str, Any], events: Sequence[Mapping[str, Any]], state: Mapping[str, Any] | None, now: float, timeout_s: float
) -> None:
    """Move one watched device along by its events for its deploy id and its retained state."""
    deploy_id = d["deploy_id"]
    phase, final, refused = None, None, None
    for e in events:
        p = e["payload"]
        detail = p.get("detail") or {}
        if p.get("type") == "ota_progress" and detail.get("deploy_id") == deploy_id:
            phase = detail.get("phase")
        elif p.get("type") in OTA_FINAL_EVENTS and detail.get("deploy_id") == deploy_id and final is None:
            final = (p["type"], detail.get("reason"), detail.get("message"))
        elif p.get("type") == "command_rejected" and detail.get("id") == deploy_id:
            refused = str(detail.get("message") or "the agent rejected the deploy command")
        elif p.get("type") == "command_rejected" and str(detail.get("id", "")).startswith(f"{deploy_id}."):
            d["message"] = f"{detail.get('id')} refused: {detail.get('message')}"
    if state is not None and state.get("ota_deploy_id") == deploy_id and state.get("ota_phase"):
        phase = "held" if "held" in (phase, state["ota_phase"]) else state["ota_phase"]
    if final is not None:
        d.update(status=_FINAL_STATUS[final[0]], reason=final[1], ended_at=now)
        d["message"] = final[2] or d["message"]
    elif refused is not None and d["status"] in _IN_FLIGHT:
        d.update(status="rejected", reason="command_rejected", message=refused, ended_at=now)
    elif phase == "held" and d["status"] in ("offered", "installing", "timed_out"):
        d["status"] = "held"
    elif phase is not None and d["status"] == "offered":
        d["status"] = "installing"
    if d["status"] in _IN_FLIGHT and now >= float(d["offered_at"]) + timeout_s:
        d.update(status="timed_out", reason="timeout", ended_at=now)
        d["message"] = f"no held or final event within {timeout_s:g} s of the offer (last phase: {phase or 'none'})"
