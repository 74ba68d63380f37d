"""Scenarios: a TOML file that says which fleet to run, how its world drifts and what breaks.

Documented in docs/simulator.md; examples in examples/scenarios/. Parsed strictly: an unknown
key, a negative rate, a drift of a quantity the generator does not have, a fault at a time
outside the run or on a device that does not exist raise :class:`ScenarioError` naming the
key (exit code 2 from the CLI).

Devices are named ``sim-0000``… in order; the ``[[cohort]]`` tables take them in that order
(``devices = k`` each) and the devices left over form the cohort ``baseline``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeops_core import FieldReader, load_toml
from edgeops_sim.errors import ScenarioError
from edgeops_sim.physics import Generator, load_generator

__all__ = ["DEVICE_FAULTS", "FAULT_KINDS", "Cohort", "Drift", "Fault", "Scenario", "device_name", "load_scenario"]

#: Faults and the keys each takes (besides ``kind`` and ``at_s``).
FAULT_KINDS: dict[str, tuple[str, ...]] = {
    "broker_restart": ("down_s",),
    "network_cut": ("device", "duration_s"),
    "agent_kill": ("device", "restart_after_s", "during_ota"),
    "ota_corrupt_block": ("device",),
    "disk_full": ("device", "duration_s"),
    "clock_skew": ("device", "skew_s"),
}
#: Faults that name one device.
DEVICE_FAULTS = frozenset(k for k, keys in FAULT_KINDS.items() if "device" in keys)
DRIFT_KINDS = ("abrupt", "gradual", "recurring")
#: Devices per host process by default, and at most (ADR 0015). Measured with bench/fleet.py
#: (1 000 devices, 120 s): 80 a process p99 4.5 s, 125 p99 0.97 s, 250 lost keepalives (the
#: shared network loop got too little of its process's GIL: 817 duplicates).
DEFAULT_PER_PROCESS = 125
MAX_PER_PROCESS = 150
BASELINE = "baseline"


def device_name(i: int) -> str:
    """The id of device number ``i``."""
    return f"sim-{i:04d}"


@dataclass(frozen=True)
class Drift:
    """A change of one quantity in one cohort.

    ``abrupt``: the value becomes ``to`` at ``start_s``. ``gradual``: it moves linearly from
    its base value to ``to`` over ``ramp_s``. ``recurring`` (seasonal): it swings between its
    base value and ``to`` as a raised cosine of period ``period_s``, starting at the base value.
    """

    cohort: str
    quantity: str
    kind: str
    start_s: float
    to: float
    ramp_s: float = 0.0
    period_s: float = 0.0

    def value(self, base: float, t: float) -> float:
        """The quantity at time ``t`` given its ``base`` value."""
        if t < self.start_s:
            return base
        if self.kind == "abrupt":
            return self.to
        if self.kind == "gradual":
            return base + (self.to - base) * min(1.0, (t - self.start_s) / self.ramp_s)
        phase = (t - self.start_s) / self.period_s
        return base + (self.to - base) * 0.5 * (1.0 - math.cos(2 * math.pi * phase))


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` at ``at_s`` (device faults name the device)."""

    kind: str
    at_s: float
    device: str | None = None
    duration_s: float = 0.0
    skew_s: float = 0.0
    during_ota: bool = False

    @property
    def ota(self) -> bool:
        """The fault deploys ``fleet.update_bundle`` to its device."""
        return self.kind == "ota_corrupt_block" or self.during_ota

    @property
    def ends(self) -> bool:
        """The fault has an end the simulator acts on (a restore, a restart)."""
        return self.kind not in ("clock_skew", "ota_corrupt_block")

    def to_dict(self) -> dict[str, Any]:
        """The fault as the summary reports it."""
        out: dict[str, Any] = {"kind": self.kind, "at_s": self.at_s}
        if self.device is not None:
            out["device"] = self.device
        if self.kind == "clock_skew":
            out["skew_s"] = self.skew_s
        elif self.ends:
            out["duration_s"] = self.duration_s
        if self.during_ota:
            out["during_ota"] = True
        return out


@dataclass(frozen=True)
class Cohort:
    """Devices that share base quantities and a drift schedule."""

    name: str
    devices: tuple[str, ...]
    quantities: Mapping[str, float]


@dataclass(frozen=True)
class Scenario:
    """A validated scenario."""

    source: Path
    devices: int
    target: str
    duration_s: float
    seed: int
    generator: Generator
    predict_hz: float
    telemetry_s: float
    devices_per_process: int
    outbox_max_messages: int
    label_delay_s: float
    label_coverage: float
    timeline_s: float
    cohorts: tuple[Cohort, ...]
    drifts: tuple[Drift, ...]
    faults: tuple[Fault, ...]
    bundle: Path | None = None
    trust: Path | None = None
    update_bundle: Path | None = None
    drift_window: int = 500
    cohort_of: Mapping[str, str] = field(default_factory=dict)

    @property
    def device_ids(self) -> list[str]:
        """Every device's id, in order."""
        return [device_name(i) for i in range(self.devices)]

    def base(self, device: str) -> dict[str, float]:
        """The device's quantities before any drift (nominal, then its cohort's)."""
        values = {q: spec[0] for q, spec in self.generator.quantities.items()}
        cohort = next(c for c in self.cohorts if c.name == self.cohort_of[device])
        values.update(cohort.quantities)
        return values

    def quantities_at(self, device: str, t: float, base: Mapping[str, float] | None = None) -> dict[str, float]:
        """The device's quantities at time ``t``."""
        values = dict(base if base is not None else self.base(device))
        cohort = self.cohort_of[device]
        for d in self.drifts:
            if d.cohort == cohort:
                values[d.quantity] = d.value(values[d.quantity], t)
        return values

    def drift_start(self, device: str) -> float | None:
        """When the device's world first changes (``None``: never)."""
        starts = [d.start_s for d in self.drifts if d.cohort == self.cohort_of[device]]
        return min(starts) if starts else None

    def solo(self) -> set[str]:
        """Devices that need a process of their own: killed (SIGKILL) or clock-skewed ones."""
        return {f.device for f in self.faults if f.kind in ("agent_kill", "clock_skew") and f.device}

    def truth(self) -> dict[str, Any]:
        """What the simulator knows: each cohort's devices, drifts and the faults."""
        return {
            "cohorts": {c.name: {"devices": list(c.devices), "quantities": dict(c.quantities)} for c in self.cohorts},
            "drifts": [
                {"cohort": d.cohort, "quantity": d.quantity, "kind": d.kind, "start_s": d.start_s, "to": d.to}
                | ({"ramp_s": d.ramp_s} if d.kind == "gradual" else {})
                | ({"period_s": d.period_s} if d.kind == "recurring" else {})
                for d in self.drifts
            ],
            "faults": [f.to_dict() for f in self.faults],
        }


_TOP = {"fleet", "labels", "output", "cohort", "drift", "fault"}
_FLEET = {
    "devices", "target", "duration_s", "seed", "generator", "predict_hz", "telemetry_s", "devices_per_process",
    "outbox_max_messages", "bundle", "trust", "update_bundle", "drift_window",
}  # fmt: skip


def load_scenario(
    path: Path, *, bundle: Path | None = None, trust: Path | None = None, update_bundle: Path | None = None
) -> Scenario:
    """Load and validate a scenario (``bundle``, ``trust`` and ``update_bundle`` override the file's).

    Raises:
        ScenarioError: the file is unreadable, malformed or invalid (the message names the key).
    """
    data = load_toml(path, ScenarioError, "scenario")
    r = FieldReader(ScenarioError, str(path))
    r.only(data, _TOP, "")
    base = path.resolve().parent
    fleet = r.mapping(r.get(data, "fleet", ""), "fleet")
    r.only(fleet, _FLEET, "fleet")
    devices = r.integer(fleet, "devices", "fleet", minimum=1)
    if devices > 100_000:
        raise r.fail("fleet.devices", "at most 100000", devices)
    target = r.string(fleet, "target", "fleet") if "target" in fleet else "ecu"
    duration = r.number(fleet, "duration_s", "fleet", minimum=0, exclusive_minimum=True)
    seed = r.integer(fleet, "seed", "fleet", minimum=0) if "seed" in fleet else 0
    generator = load_generator((base / r.string(fleet, "generator", "fleet")).resolve())
    predict_hz = (
        r.number(fleet, "predict_hz", "fleet", minimum=0, exclusive_minimum=True, maximum=1000) if "predict_hz" in fleet else 1.0
    )
    telemetry_s = r.number(fleet, "telemetry_s", "fleet", minimum=0.1) if "telemetry_s" in fleet else 1.0
    per_process = (
        r.integer(fleet, "devices_per_process", "fleet", minimum=1) if "devices_per_process" in fleet else DEFAULT_PER_PROCESS
    )
    if per_process > MAX_PER_PROCESS:
        raise r.fail(
            "fleet.devices_per_process",
            f"at most {MAX_PER_PROCESS} (past that a process's shared network loop misses keepalives: ADR 0015)",
            per_process,
        )
    cap = r.integer(fleet, "outbox_max_messages", "fleet", minimum=10) if "outbox_max_messages" in fleet else 10_000
    window = r.integer(fleet, "drift_window", "fleet", minimum=10) if "drift_window" in fleet else 500
    file_bundle = (base / r.string(fleet, "bundle", "fleet")).resolve() if "bundle" in fleet else None
    file_trust = (base / r.string(fleet, "trust", "fleet")).resolve() if "trust" in fleet else None
    file_update = (base / r.string(fleet, "update_bundle", "fleet")).resolve() if "update_bundle" in fleet else None

    labels = r.mapping(data.get("labels", {}), "labels")
    r.only(labels, {"delay_s", "coverage"}, "labels")
    delay = r.number(labels, "delay_s", "labels", minimum=0) if "delay_s" in labels else 10.0
    coverage = r.number(labels, "coverage", "labels", minimum=0, maximum=1) if "coverage" in labels else 0.0
    output = r.mapping(data.get("output", {}), "output")
    r.only(output, {"timeline_s"}, "output")
    timeline_s = r.number(output, "timeline_s", "output", minimum=0.1) if "timeline_s" in output else 1.0

    names = [device_name(i) for i in range(devices)]
    quantities = generator.quantities
    cohorts: list[Cohort] = []
    cohort_of: dict[str, str] = {}
    taken = 0
    raw_cohorts = data.get("cohort", [])
    if not isinstance(raw_cohorts, list):
        raise r.fail("cohort", "an array of tables ([[cohort]])", raw_cohorts)
    for i, raw in enumerate(raw_cohorts):
        where = f"cohort[{i}]"
        c = r.mapping(raw, where)
        r.only(c, {"name", "devices", "quantities"}, where)
        name = r.string(c, "name", where)
        if name == BASELINE or any(x.name == name for x in cohorts):
            raise r.fail(f"{where}.name", f"a unique name other than {BASELINE!r}", name)
        count = r.integer(c, "devices", where, minimum=1)
        if taken + count > devices:
            raise r.fail(f"{where}.devices", f"at most the {devices - taken} devices not yet in a cohort", count)
        values = _quantities(r, c.get("quantities", {}), f"{where}.quantities", quantities)
        members = tuple(names[taken : taken + count])
        taken += count
        cohorts.append(Cohort(name, members, values))
        cohort_of.update(dict.fromkeys(members, name))
    if taken < devices:
        rest = tuple(names[taken:])
        cohorts.append(Cohort(BASELINE, rest, {}))
        cohort_of.update(dict.fromkeys(rest, BASELINE))

    drifts = _drifts(r, data, cohorts, quantities, duration)
    faults = _faults(r, path, data, cohort_of, names, duration)
    faults.sort(key=lambda x: x.at_s)
    _no_overlap(path, faults)
    if any(f.ota for f in faults) and not (update_bundle or file_update):
        raise ScenarioError(
            f"{path}: field 'fleet.update_bundle' is required by the over-the-air faults (or pass --update-bundle)"
        )
    return Scenario(
        source=path,
        devices=devices,
        target=target,
        duration_s=duration,
        seed=seed,
        generator=generator,
        predict_hz=predict_hz,
        telemetry_s=telemetry_s,
        devices_per_process=per_process,
        outbox_max_messages=cap,
        label_delay_s=delay,
        label_coverage=coverage,
        timeline_s=timeline_s,
        cohorts=tuple(cohorts),
        drifts=tuple(drifts),
        faults=tuple(faults),
        bundle=bundle or file_bundle,
        trust=trust or file_trust,
        update_bundle=update_bundle or file_update,
        drift_window=window,
        cohort_of=cohort_of,
    )


def _drifts(
    r: FieldReader,
    data: Mapping[str, Any],
    cohorts: list[Cohort],
    quantities: Mapping[str, tuple[float, float, float, str]],
    duration: float,
) -> list[Drift]:
    drifts = []
    raw_drifts = data.get("drift", [])
    if not isinstance(raw_drifts, list):
        raise r.fail("drift", "an array of tables ([[drift]])", raw_drifts)
    for i, raw in enumerate(raw_drifts):
        where = f"drift[{i}]"
        d = r.mapping(raw, where)
        r.only(d, {"cohort", "quantity", "kind", "start_s", "to", "ramp_s", "period_s"}, where)
        cohort = r.string(d, "cohort", where)
        if cohort not in {c.name for c in cohorts}:
            raise r.fail(f"{where}.cohort", f"one of {', '.join(c.name for c in cohorts)}", cohort)
        quantity = r.string(d, "quantity", where)
        if quantity not in quantities:
            raise r.fail(f"{where}.quantity", f"a quantity of the generator ({', '.join(quantities)})", quantity)
        kind = r.string(d, "kind", where)
        if kind not in DRIFT_KINDS:
            raise r.fail(f"{where}.kind", f"one of {', '.join(DRIFT_KINDS)}", kind)
        start = r.number(d, "start_s", where, minimum=0)
        if start >= duration:
            raise r.fail(f"{where}.start_s", f"a time before the end of the run ({duration:g} s)", start)
        _, low, high, _ = quantities[quantity]
        to = r.number(d, "to", where, minimum=low, maximum=high)
        ramp = r.number(d, "ramp_s", where, minimum=0, exclusive_minimum=True) if kind == "gradual" else 0.0
        period = r.number(d, "period_s", where, minimum=0, exclusive_minimum=True) if kind == "recurring" else 0.0
        extra = {"ramp_s"} - ({"ramp_s"} if kind == "gradual" else set()) | {"period_s"} - (
            {"period_s"} if kind == "recurring" else set()
        )
        if extra & set(d):
            key = sorted(extra & set(d))[0]
            raise ScenarioError(f"{r.source}: field '{where}.{key}' does not apply to a {kind} drift")
        drifts.append(Drift(cohort, quantity, kind, start, to, ramp, period))

    return drifts


def _faults(
    r: FieldReader, path: Path, data: Mapping[str, Any], cohort_of: Mapping[str, str], names: list[str], duration: float
) -> list[Fault]:
    faults = []
    raw_faults = data.get("fault", [])
    if not isinstance(raw_faults, list):
        raise r.fail("fault", "an array of tables ([[fault]])", raw_faults)
    for i, raw in enumerate(raw_faults):
        where = f"fault[{i}]"
        f = r.mapping(raw, where)
        kind = r.string(f, "kind", where)
        if kind not in FAULT_KINDS:
            raise r.fail(f"{where}.kind", f"one of {', '.join(FAULT_KINDS)}", kind)
        r.only(f, {"kind", "at_s", *FAULT_KINDS[kind]}, where)
        at = r.number(f, "at_s", where, minimum=0)
        if at >= duration:
            raise r.fail(f"{where}.at_s", f"a time before the end of the run ({duration:g} s)", at)
        device = None
        if kind in DEVICE_FAULTS:
            device = r.string(f, "device", where)
            if device not in cohort_of:
                raise r.fail(f"{where}.device", f"a device of this fleet ({names[0]} … {names[-1]})", device)
        length_key = {"broker_restart": "down_s", "agent_kill": "restart_after_s"}.get(kind, "duration_s")
        length, skew = 0.0, 0.0
        during_ota = f.get("during_ota", False)
        if not isinstance(during_ota, bool):
            raise r.fail(f"{where}.during_ota", "true or false", during_ota)
        if kind == "clock_skew":
            skew = r.number(f, "skew_s", where, minimum=-10 * 365 * 86400, maximum=10 * 365 * 86400)
        elif kind != "ota_corrupt_block":
            length = r.number(f, length_key, where, minimum=0, exclusive_minimum=True)
            if at + length >= duration:
                raise r.fail(
                    f"{where}.{length_key}", f"short enough to end before the run does ({duration - at:g} s left)", length
                )
        faults.append(Fault(kind, at, device, length, skew, during_ota))
    updated = [f.device for f in faults if f.ota]
    if len(updated) != len(set(updated)):
        raise ScenarioError(f"{path}: one over-the-air fault per device (an update happens once)")
    return faults


def _quantities(
    r: FieldReader, raw: object, where: str, known: Mapping[str, tuple[float, float, float, str]]
) -> dict[str, float]:
    values = r.mapping(raw, where)
    out = {}
    for name, value in values.items():
        if name not in known:
            raise r.fail(f"{where}.{name}", f"a quantity of the generator ({', '.join(known)})", name)
        _, low, high, _ = known[name]
        out[name] = r.as_number(value, f"{where}.{name}", minimum=low, maximum=high)
    return out


def _no_overlap(path: Path, faults: list[Fault]) -> None:
    """Two faults of the same kind on the same device (or two broker restarts) may not overlap."""
    ends: dict[tuple[str, str | None], float] = {}
    for f in faults:
        key = (f.kind, f.device)
        if key in ends and f.at_s < ends[key]:
            raise ScenarioError(
                f"{path}: a {f.kind} fault at {f.at_s:g} s{' on ' + f.device if f.device else ''} overlaps the previous one"
            )
        ends[key] = f.at_s + f.duration_s
