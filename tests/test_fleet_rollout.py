"""The rollout engine (edgeops_fleet.rollout) over a real SQLite store, without MQTT.

Devices are simulated by feeding the store the messages an agent sends (states, telemetry,
events, built with the contract's own types); the engine reaches them through a recording
:class:`RolloutLink` (our own interface), and time is a fake clock driven by the test.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeops_core import BundleInfo, Deploy, Event, InputError, ModelRef, OtaOutcome, OtaProgress, State, Telemetry
from edgeops_fleet.errors import SenderError
from edgeops_fleet.rollout import (
    Gates,
    RolloutEngine,
    RolloutSpec,
    deploy_id_of,
    group_key,
    parse_duration,
    parse_waves,
    psi,
)
from edgeops_fleet.store import Incoming, Store

T0 = 1_800_000_000.0
STEP = 10.0  # seconds between telemetry records (and ticks)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Link:
    """A RolloutLink that records what it is asked to send."""

    offers: list[tuple[str, tuple[str, ...], int]] = field(default_factory=list)
    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    deploys: dict[str, Deploy] = field(default_factory=dict)

    def offer(self, deploy: Deploy, bundle_path: Path, device_ids: Sequence[str], *, hold_s: int) -> None:
        assert bundle_path.is_file()
        self.deploys[deploy.deploy_id] = deploy
        self.offers.append((deploy.deploy_id, tuple(device_ids), hold_s))

    def stop_serving(self, deploy_id: str) -> None:
        self.stopped.append(deploy_id)

    def command(self, device_id: str, payload: bytes) -> None:
        self.commands.append((device_id, json.loads(payload)))

    def offered(self, device_id: str) -> list[str]:
        return [d for d, ids, _ in self.offers if device_id in ids]


class Crash(BaseException):
    """The console dies (kill -9) right where this is raised."""


@dataclass
class Behaviour:
    """What a release does on the devices (per telemetry record)."""

    inferences: int = 50
    error_rate: float = 0.0
    p99_ms: float = 5.0
    predicted: tuple[float, ...] = (0.5, 0.3, 0.2)
    alarm: bool = False
    caller_errors: int = 0  # malformed requests per record (TensorInputError): not the release's fault
    install: str = "held"  # or a failure reason: the device rolls back on its own
    anomaly: float | None = None  # an anomaly model flagging this share of its inputs (None: a classifier)


@dataclass
class Device:
    device_id: str
    release: int = 1
    online: bool = True
    seq: int = 0
    handled: int = 0  # offers and commands already reacted to
    held: tuple[str, int] | None = None


class Fleet:
    """Simulated agents: they answer offers and commands and report telemetry into the store."""

    def __init__(self, store: Store, clock: Clock, link: Link, n: int = 5, *, tags: dict[str, str] | None = None) -> None:
        self.store, self.clock, self.link = store, clock, link
        self.devices = {f"ecu-{i}": Device(f"ecu-{i}") for i in range(n)}
        self.behaviour: dict[int, Behaviour] = {1: Behaviour()}
        self.tags = tags or {"site": "a"}
        self.rng = random.Random(7)
        self.seen_offers = 0
        self.seen_commands = 0
        for d in self.devices.values():
            self.state(d)

    def _ingest(self, d: Device, kind: str, payload: dict[str, Any], release: int | None) -> None:
        d.seq += 1
        payload = {**payload, "seq": d.seq}
        self.store.ingest([Incoming(d.device_id, kind, d.seq, None, self.clock(), payload, release)])

    def state(self, d: Device, ota: OtaProgress | None = None) -> None:
        bundle = BundleInfo(
            name="vib", version=f"1.{d.release}.0", release=d.release, sha256="ab" * 32, slot="a", expires="x", expired=False
        )
        msg = State(
            device_id=d.device_id,
            ts=None,
            online=d.online,
            agent_version="0.9",
            target="ecu",
            runtime="onnxruntime",
            bundle=bundle,
            health="ok",
            last_error=None,
            ota=ota,
            tags=self.tags,
        )
        self._ingest(d, "state", msg.to_dict(), d.release)

    def event(self, d: Device, event: Event, release: int | None) -> None:
        self._ingest(d, "event", event.to_dict(), release)

    def set_online(self, device_id: str, online: bool) -> None:
        d = self.devices[device_id]
        d.online = online
        self.state(d)

    def telemetry(self, d: Device) -> None:
        self.store.ingest([self.record(d)])

    def record(self, d: Device) -> Incoming:
        """One telemetry record of ``d`` now, as the console hands it to the store."""
        b = self.behaviour.get(d.release, Behaviour())
        errors = sum(self.rng.random() < b.error_rate for _ in range(b.inferences))
        weights = b.predicted if b.anomaly is None else (1 - b.anomaly, b.anomaly)
        predicted = [0] * len(weights)
        for _ in range(b.inferences - errors):
            predicted[self.rng.choices(range(len(weights)), weights)[0]] += 1
        # An anomaly model reports its verdicts as an anomaly count, not as class counts (the agent's form).
        task: dict[str, Any] = (
            {"predicted": predicted}
            if b.anomaly is None
            else {
                "predicted": None,
                "task": "anomaly",
                "anomaly": {"count": predicted[1], "rate": round(predicted[1] / sum(predicted), 6) if sum(predicted) else None},
            }
        )
        msg = Telemetry(
            device_id=d.device_id,
            ts=None,
            interval_s=STEP,
            model=ModelRef(name="vib", release=d.release),
            inference={
                "count": b.inferences,
                "window_count": b.inferences,
                "errors": {
                    **({"runtime": errors} if errors else {}),
                    **({"TensorInputError": b.caller_errors} if b.caller_errors else {}),
                },
                "error_count": errors + b.caller_errors,
                **task,
            },
            latency_ms={"p50": 1.0, "p95": b.p99_ms / 2, "p99": b.p99_ms, "max": b.p99_ms},
            drift={
                "alarm": b.alarm,
                "samples": 500,
                "max_psi": 0.01,
                "max_feature": "f0",
                "max_cusum": 1.0,
                "prediction_psi": 0.01,
            },
            resources={"rss_bytes": 1e7, "cpu_percent": 5.0},
            outbox={"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
        )
        d.seq += 1
        return Incoming(d.device_id, "telemetry", d.seq, None, self.clock(), {**msg.to_dict(), "seq": d.seq}, d.release)

    def history(self, seconds: float, step: float) -> None:
        """``seconds`` of telemetry history up to now, in one batch (no rollout runs meanwhile)."""
        now, batch = self.clock.now, []
        for k in range(int(seconds // step), 0, -1):
            self.clock.now = now - k * step
            batch += [self.record(d) for d in self.devices.values() if d.online]
        self.clock.now = now
        self.store.ingest(batch)

    def react(self) -> None:
        """Online devices act on the offers and commands published since the last call."""
        for deploy_id, ids, hold_s in self.link.offers[self.seen_offers :]:
            deploy = self.link.deploys[deploy_id]
            for device_id in ids:
                self._take_offer(self.devices[device_id], deploy, hold_s)
        self.seen_offers = len(self.link.offers)
        for device_id, cmd in self.link.commands[self.seen_commands :]:
            self._take_command(self.devices[device_id], cmd)
        self.seen_commands = len(self.link.commands)

    def _take_offer(self, d: Device, deploy: Deploy, hold_s: int) -> None:
        assert d.online, f"{d.device_id} was offered {deploy.deploy_id} while offline"
        new = self.behaviour.get(deploy.release, Behaviour())
        progress = OtaProgress(deploy.deploy_id, deploy.release, "installing", deploy.block_count, deploy.block_count)
        self.event(d, progress.to_event(d.device_id, None), deploy.release)
        if new.install != "held":
            outcome = OtaOutcome(
                type="ota_rolled_back",
                deploy_id=deploy.deploy_id,
                release=deploy.release,
                reason=new.install,
                message="trial failed",
            )
            self.event(d, outcome.to_event(d.device_id, None), deploy.release)
            return
        old = d.release
        d.release = deploy.release
        if hold_s == 0:
            self.event(
                d,
                OtaOutcome(type="ota_committed", deploy_id=deploy.deploy_id, release=d.release).to_event(d.device_id, None),
                d.release,
            )
            self.state(d, replace_phase(progress, "committed"))
            return
        d.held = (deploy.deploy_id, old)
        held = replace_phase(progress, "held")
        self.event(d, held.to_event(d.device_id, None), deploy.release)
        self.state(d, held)

    def _take_command(self, d: Device, cmd: dict[str, Any]) -> None:
        deploy_id = cmd["args"]["deploy_id"]
        if d.held is None or d.held[0] != deploy_id:
            event = Event(
                device_id=d.device_id, ts=None, type="command_rejected", detail={"id": cmd["id"], "message": "not held"}
            )
            self.event(d, event, None)
            return
        release = d.release
        if cmd["type"] == "commit":
            outcome = OtaOutcome(type="ota_committed", deploy_id=deploy_id, release=release)
        else:
            d.release = d.held[1]
            outcome = OtaOutcome(
                type="ota_rolled_back", deploy_id=deploy_id, release=release, reason="console_rollback", message="rolled back"
            )
        d.held = None
        self.event(d, outcome.to_event(d.device_id, None), release)
        self.state(d)

    def run(self, engine: RolloutEngine, seconds: float) -> None:
        """Advance time in steps: devices react and report, then the engine ticks."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += STEP
            self.react()
            self.store.ingest([self.record(d) for d in self.devices.values() if d.online])
            engine.tick()
        self.react()


def replace_phase(progress: OtaProgress, phase: str) -> OtaProgress:
    return OtaProgress(progress.deploy_id, progress.release, phase, progress.blocks_received, progress.blocks_total)


@dataclass
class World:
    store: Store
    clock: Clock
    link: Link
    fleet: Fleet
    engine: RolloutEngine
    bundle: Path
    db: str

    def spec(self, **change: Any) -> RolloutSpec:
        data = self.bundle.read_bytes()
        options: dict[str, Any] = {
            "bundle_path": self.bundle,
            "name": "vib",
            "version": "1.2.0",
            "release": 2,
            "target": "ecu",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "group": {"target": "ecu", "tags": {"site": "a"}},
            "waves": ("1", "50%", "100%"),
            "soak_s": 120.0,
            "gates": Gates(min_inferences=100),
            "deadline_s": 3600.0,
        }
        options.update(change)
        return RolloutSpec(**options)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    db = f"sqlite:///{tmp_path / 'console.sqlite'}"
    store = Store.open(db)
    clock = Clock()
    link = Link()
    fleet = Fleet(store, clock, link)
    bundle = tmp_path / "vib-1.2.0-ecu.edgeops"
    bundle.write_bytes(random.Random(1).randbytes(150_000))
    engine = RolloutEngine(store, link, clock=clock)
    try:
        clock.now += 900
        fleet.history(900, 30)  # the previous release's history: the PSI baseline
        yield World(store, clock, link, fleet, engine, bundle, db)
    finally:
        store.close()


def statuses(world: World, rollout_id: str) -> dict[str, str]:
    return {d["device_id"]: d["status"] for d in world.store.rollout_devices(rollout_id)}


def row(world: World, rollout_id: str) -> dict[str, Any]:
    out = world.store.rollout(rollout_id)
    assert out is not None
    return out


def status(world: World, rollout_id: str) -> dict[str, Any]:
    out = world.engine.status(rollout_id)
    assert isinstance(out, dict)
    return out


# -- good and bad releases ----------------------------------------------------------------------


def test_good_release_passes_every_wave_and_commits(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()
    row = world.engine.start(world.spec(waves=("1", "10%", "50%", "100%")))
    rid = row["rollout_id"]
    assert row["state"] == "running" and row["group_key"] == "target=ecu,site=a"
    world.fleet.run(world.engine, 1200)

    st = status(world, rid)
    assert st["rollout"]["state"] == "passed", st["rollout"]["message"]
    assert [w["state"] for w in st["waves"]] == ["passed", "passed", "passed", "passed"]
    # 10% of 5 after 1 adds no device: that wave passes at once, the numbering stays as given
    assert [w["devices"] for w in st["waves"]] == [["ecu-0"], [], ["ecu-1", "ecu-2"], ["ecu-3", "ecu-4"]]
    assert st["waves"][1]["gate"]["install"]["detail"] == "no device of this wave needed the release"
    assert set(statuses(world, rid).values()) == {"committed"}
    gate = st["waves"][0]["gate"]
    assert gate["install"]["value"] == 1 and gate["error_rate"]["value"] == 0 and gate["error_rate"]["passed"]
    assert gate["psi"]["value"] is not None and gate["psi"]["value"] < 0.05 and gate["psi"]["passed"]
    assert gate["drift_alarms"]["value"] == 0 and gate["inferences"]["value"] >= 100
    assert gate["anomaly_rate"]["passed"] is True and gate["anomaly_rate"]["detail"].startswith("not gated")  # a classifier
    # one deploy id per wave, each device offered exactly once, held until the gate said so
    assert [(d, ids) for d, ids, _ in world.link.offers] == [
        (deploy_id_of(rid, 0), ("ecu-0",)),
        (deploy_id_of(rid, 2), ("ecu-1", "ecu-2")),
        (deploy_id_of(rid, 3), ("ecu-3", "ecu-4")),
    ]
    assert all(hold > 3600 for _, _, hold in world.link.offers)
    assert sorted(dev for dev, cmd in world.link.commands if cmd["type"] == "commit") == [f"ecu-{i}" for i in range(5)]
    assert not [c for _, c in world.link.commands if c["type"] == "rollback"]
    assert world.store.bad_releases() == []
    # a second tick changes nothing and sends nothing
    before = (len(world.link.offers), len(world.link.commands), world.store.rollout(rid))
    world.engine.tick()
    assert (len(world.link.offers), len(world.link.commands), world.store.rollout(rid)) == before


def _failed_after_wave_1(world: World, rid: str, gate_name: str) -> dict[str, Any]:
    st = status(world, rid)
    r = st["rollout"]
    assert r["state"] == "failed", r["message"]
    assert f"{gate_name} gate" in r["message"]
    assert [w["state"] for w in st["waves"]] == ["failed", "cancelled", "cancelled"]
    assert st["waves"][0]["gate"][gate_name]["passed"] is False
    # only wave 1 got the release, and it is back on the old one
    assert [ids for _, ids, _ in world.link.offers] == [("ecu-0",)]
    assert [(dev, c["type"]) for dev, c in world.link.commands] == [("ecu-0", "rollback")]
    assert world.fleet.devices["ecu-0"].release == 1
    assert statuses(world, rid) == {
        "ecu-0": "rolled_back",
        "ecu-1": "cancelled",
        "ecu-2": "cancelled",
        "ecu-3": "cancelled",
        "ecu-4": "cancelled",
    }
    bad = world.store.bad_releases(group="target=ecu,site=a")
    assert [(b["name"], b["release"], b["rollout_id"]) for b in bad] == [("vib", 2, rid)]
    return st


def test_malformed_requests_do_not_count_against_the_release(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(caller_errors=40)  # callers keep sending bad tensors
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 900)
    st = status(world, rid)
    assert st["rollout"]["state"] == "passed", st["rollout"]["message"]
    assert st["waves"][0]["gate"]["error_rate"]["value"] == 0


def test_error_rate_failure_stops_after_wave_1_rolls_it_back_and_marks_bad(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(error_rate=0.2)
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 600)
    st = _failed_after_wave_1(world, rid, "error_rate")
    g = st["waves"][0]["gate"]["error_rate"]
    assert g["limit"] == 0.01 and 0.1 < g["value"] < 0.3
    assert "wave 1 failed the error_rate gate: error rate 0." in st["rollout"]["message"]
    assert "> 0.01" in st["rollout"]["message"]
    # the release is refused for the group from now on, with the way out
    with pytest.raises(InputError, match=r"marked bad for group target=ecu,site=a .*release revert vib --to RELEASE"):
        world.engine.start(world.spec())
    # the operator override starts it anyway
    assert world.engine.start(world.spec(allow_bad=True))["state"] == "running"


def test_latency_failure(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(p99_ms=48.0)
    rid = world.engine.start(world.spec(gates=Gates(latency_p99_ms=20.0, latency_factor=1.5)))["rollout_id"]
    world.fleet.run(world.engine, 600)
    st = _failed_after_wave_1(world, rid, "latency_p99")
    g = st["waves"][0]["gate"]["latency_p99"]
    assert (g["value"], g["limit"]) == (48.0, 30.0)
    assert "p99 latency (ms) 48 > 30" in st["rollout"]["message"]


def test_psi_failure(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(predicted=(0.1, 0.2, 0.7))
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 600)
    st = _failed_after_wave_1(world, rid, "psi")
    g = st["waves"][0]["gate"]["psi"]
    assert g["value"] > 0.25 and g["limit"] == 0.25


def test_anomaly_model_flagging_normal_inputs_fails_the_anomaly_rate_gate(world: World) -> None:
    # Release 1 is a classifier (no anomaly rate to compare): the new anomaly model may flag at
    # most anomaly_rate_max (5 %) of the wave's inputs; this one flags about 30 %.
    world.fleet.behaviour[2] = Behaviour(anomaly=0.3)
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 600)
    st = _failed_after_wave_1(world, rid, "anomaly_rate")
    g = st["waves"][0]["gate"]["anomaly_rate"]
    assert 0.2 < g["value"] < 0.4 and g["limit"] == 0.05 and "no previous anomaly rate to compare" in g["detail"]
    assert "anomaly_rate gate: anomaly rate 0." in st["rollout"]["message"] and "> 0.05" in st["rollout"]["message"]
    assert st["waves"][0]["gate"]["psi"]["detail"].startswith("not gated")  # verdicts are not class counts


@pytest.mark.parametrize(("new_rate", "passes"), [(0.22, True), (0.45, False)])
def test_anomaly_rate_is_judged_by_its_rise_over_the_previous_anomaly_model(world: World, new_rate: float, passes: bool) -> None:
    # The devices' previous anomaly model already flagged ~20 % (real faults on the line): a
    # retrained model that flags as many is not blamed for them; one that flags far more is.
    world.fleet.behaviour[1] = Behaviour(anomaly=0.2)
    world.clock.now += 900
    world.fleet.history(900, 30)
    world.fleet.behaviour[2] = Behaviour(anomaly=new_rate)
    rid = world.engine.start(world.spec(gates=Gates(min_inferences=100, anomaly_rate_max=0.1)))["rollout_id"]
    world.fleet.run(world.engine, 900)
    st = status(world, rid)
    g = st["waves"][0]["gate"]["anomaly_rate"]
    assert 0.15 < g["limit"] - 0.1 < 0.25 and "expected from the previous release" in g["detail"]  # its rate + 0.1
    assert g["passed"] is passes and st["rollout"]["state"] == ("passed" if passes else "failed"), st["rollout"]["message"]


def _anomaly_row(device: str, window: int, count: int, rate: float | None = None) -> dict[str, Any]:
    inference = {"window_count": window, "task": "anomaly", "predicted": None, "anomaly": {"count": count, "rate": rate}}
    return {"device_id": device, "payload": {"inference": inference}}


def test_anomaly_rate_gate_compares_each_device_with_itself_and_distrusts_impossible_counts() -> None:
    from edgeops_fleet.rollout import _anomaly_gate

    g = Gates(min_inferences=100, anomaly_rate_max=0.05)
    # Each device flags as before (A none, B half); only the traffic moved to B: no rise, passes.
    base = [_anomaly_row("A", 10_000, 0), _anomaly_row("B", 100, 50)]
    soak = [_anomaly_row("A", 100, 0), _anomaly_row("B", 10_000, 5_000)]
    got = _anomaly_gate(g, base, soak)
    assert got["passed"] is True and abs(got["value"] - 5_000 / 10_100) < 1e-6 and got["limit"] > got["value"]
    # B jumps from none to 40 % while A keeps its 50 %: a rise, fails (pooled rates would hide it).
    base = [_anomaly_row("A", 10_000, 5_000), _anomaly_row("B", 100, 0)]
    soak = [_anomaly_row("A", 100, 50), _anomaly_row("B", 10_000, 4_000)]
    assert _anomaly_gate(g, base, soak)["passed"] is False
    # A count above the row's predictions (a buggy or hostile device) counts as all of them, no more.
    soak = [_anomaly_row("A", 1_000, 0), _anomaly_row("B", 1, 10**19)]
    got = _anomaly_gate(g, [], soak)
    assert got["value"] == round(1 / 1001, 6) and got["passed"] is True
    # The first interval after an install also counts the replaced model's predictions in
    # window_count: the agent's own rate (over what the anomaly model scored) is the denominator.
    got = _anomaly_gate(g, [], [_anomaly_row("A", 1_000, 20, rate=0.4), _anomaly_row("A", 1_000, 10, rate=0.01)])
    assert got["value"] == round(30 / 1_050, 6)
    # Too few anomaly-model predictions to judge (other devices filled the inferences gate).
    got = _anomaly_gate(g, [], [_anomaly_row("B", 3, 2)])
    assert got["passed"] is True and got["value"] is None and "3 anomaly-model predictions" in got["detail"]
    # Off: by option, and for a rollout stored before the gate existed.
    assert Gates.parse(["anomaly_rate_max=none"]).anomaly_rate_max is None
    stored = {k: v for k, v in Gates().to_dict().items() if k != "anomaly_rate_max"}
    assert Gates.from_dict(stored).anomaly_rate_max is None and Gates.from_dict(Gates().to_dict()) == Gates()
    assert _anomaly_gate(Gates(anomaly_rate_max=None), [], soak)["detail"] == "not gated: no anomaly_rate_max"


def test_drift_alarm_failure(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(alarm=True)
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 600)
    st = _failed_after_wave_1(world, rid, "drift_alarms")
    assert st["waves"][0]["gate"]["drift_alarms"]["detail"] == "devices with a new drift alarm: ecu-0"


def test_drift_alarm_already_raised_on_the_previous_release_does_not_block(world: World) -> None:
    # The inputs drifted before the rollout (release 1 alarms too): the new release did not
    # bring the alarm, and may be the retrained model meant to fix it.
    world.fleet.behaviour[1] = Behaviour(alarm=True)
    world.fleet.behaviour[2] = Behaviour(alarm=True)
    world.clock.now += 900
    world.fleet.history(900, 30)  # a baseline on release 1 that alarms
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 900)
    st = status(world, rid)
    assert st["rollout"]["state"] == "passed", st["rollout"]["message"]
    gate = st["waves"][0]["gate"]["drift_alarms"]
    assert gate["value"] == 0 and "already alarmed on the previous release" in gate["detail"]


def test_install_failure(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(install="health_check")
    rid = world.engine.start(world.spec(waves=("40%", "100%")))["rollout_id"]
    world.fleet.run(world.engine, 300)
    st = status(world, rid)
    assert st["rollout"]["state"] == "failed"
    assert "install gate: install success 0 < 1" in st["rollout"]["message"]
    assert "ecu-0 rolled_back (health_check)" in st["rollout"]["message"]
    assert statuses(world, rid) == {
        "ecu-0": "rolled_back",
        "ecu-1": "rolled_back",
        "ecu-2": "cancelled",
        "ecu-3": "cancelled",
        "ecu-4": "cancelled",
    }
    assert world.link.commands == []  # nothing was held: nothing to roll back
    assert len(world.store.bad_releases()) == 1


def test_inconclusive_soak_extends_then_fails_at_the_deadline(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(inferences=1)
    rid = world.engine.start(world.spec(soak_s=60.0, deadline_s=600.0))["rollout_id"]
    world.fleet.run(world.engine, 200)
    st = status(world, rid)
    assert st["rollout"]["state"] == "running" and "soak extended" in st["rollout"]["message"]
    assert st["waves"][0]["extensions"] >= 1 and st["waves"][0]["gate"]["inferences"]["passed"] is False
    assert st["waves"][0]["gate"]["error_rate"]["passed"] is None
    world.fleet.run(world.engine, 500)
    st = status(world, rid)
    assert st["rollout"]["state"] == "failed"
    assert "insufficient data by the deadline" in st["rollout"]["message"]
    assert statuses(world, rid)["ecu-0"] == "rolled_back"
    assert world.store.bad_releases() == []  # no evidence against the release


# -- offline devices, operator commands -----------------------------------------------------------


def test_offline_device_is_offered_when_it_returns(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()
    world.fleet.set_online("ecu-2", False)
    world.fleet.set_online("ecu-4", False)
    rid = world.engine.start(world.spec(waves=("1", "100%")))["rollout_id"]
    world.fleet.run(world.engine, 200)  # wave 1 passed, wave 2 installing without the offline ones
    assert statuses(world, rid)["ecu-2"] == "waiting" and statuses(world, rid)["ecu-4"] == "waiting"
    world.fleet.set_online("ecu-2", True)  # back during its wave: held like the others
    world.fleet.run(world.engine, 400)
    st = status(world, rid)
    assert st["rollout"]["state"] == "passed", st["rollout"]["message"]
    assert statuses(world, rid)["ecu-4"] == "waiting"
    world.fleet.set_online("ecu-4", True)  # back after its wave passed: offered with hold_s=0
    world.fleet.run(world.engine, 30)
    assert set(statuses(world, rid).values()) == {"committed"}
    hold = {ids: h for _, ids, h in world.link.offers}
    assert hold[("ecu-2",)] > 0 and hold[("ecu-4",)] == 0
    assert all(len(world.link.offered(d)) == 1 for d in world.fleet.devices)
    assert row(world, rid)["detail"]["open"] is False


def test_offline_until_the_deadline_is_missed(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()
    world.fleet.set_online("ecu-4", False)
    rid = world.engine.start(world.spec(waves=("1", "100%"), deadline_s=900.0))["rollout_id"]
    world.fleet.run(world.engine, 1000)
    assert row(world, rid)["state"] == "passed"
    assert statuses(world, rid)["ecu-4"] == "missed"
    assert world.link.offered("ecu-4") == []


def test_pause_resume_abort(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 20)
    assert statuses(world, rid)["ecu-0"] == "held"
    assert world.engine.pause(rid)["state"] == "paused"
    with pytest.raises(InputError, match="is paused; only a running rollout can pause"):
        world.engine.pause(rid)
    world.fleet.run(world.engine, 400)  # the soak is over, but a paused rollout judges nothing
    st = status(world, rid)
    assert st["rollout"]["state"] == "paused" and st["waves"][0]["state"] == "soaking"
    assert len(world.link.offers) == 1 and world.link.commands == []
    assert world.engine.resume(rid)["state"] == "running"
    world.fleet.run(world.engine, 20)
    assert [w["state"] for w in status(world, rid)["waves"]] == ["passed", "soaking", "pending"]
    assert statuses(world, rid)["ecu-1"] == "held"
    row = world.engine.abort(rid)
    assert row["state"] == "aborted" and row["message"] == "aborted by the operator"
    world.fleet.run(world.engine, 30)
    assert statuses(world, rid) == {
        "ecu-0": "committed",  # its wave passed: it keeps the release
        "ecu-1": "rolled_back",
        "ecu-2": "rolled_back",
        "ecu-3": "cancelled",
        "ecu-4": "cancelled",
    }
    assert [w["state"] for w in status(world, rid)["waves"]] == ["passed", "aborted", "cancelled"]
    assert deploy_id_of(rid, 1) in world.link.stopped
    assert world.store.bad_releases() == []
    with pytest.raises(InputError, match="already ended"):
        world.engine.abort(rid)
    with pytest.raises(InputError, match="no rollout 'r-nope'"):
        world.engine.resume("r-nope")


def test_paused_past_the_deadline_fails_and_rolls_back(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()
    rid = world.engine.start(world.spec(deadline_s=600.0, soak_s=60.0))["rollout_id"]
    world.fleet.run(world.engine, 20)
    world.engine.pause(rid)
    world.fleet.run(world.engine, 600)
    r = row(world, rid)
    assert r["state"] == "failed" and r["message"] == "the deadline passed while paused at wave 1"
    assert statuses(world, rid)["ecu-0"] == "rolled_back"
    assert world.store.bad_releases() == []
    with pytest.raises(InputError, match="only a paused rollout can resume"):
        world.engine.resume(rid)


def test_crash_between_persist_and_publish_reoffers_the_same_deploy_id(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()

    class CrashingLink(Link):
        def offer(self, deploy: Deploy, bundle_path: Path, device_ids: Sequence[str], *, hold_s: int) -> None:
            if deploy.deploy_id.endswith("-w2"):
                raise Crash
            super().offer(deploy, bundle_path, device_ids, hold_s=hold_s)

    crashing = CrashingLink()
    world.fleet.link = crashing
    first = RolloutEngine(world.store, crashing, clock=world.clock)
    rid = first.start(world.spec())["rollout_id"]
    with pytest.raises(Crash):
        world.fleet.run(first, 600)
    # the offer of wave 2 was persisted and never published
    rows = {d["device_id"]: d for d in world.store.rollout_devices(rid)}
    assert rows["ecu-1"]["status"] == "offered" and rows["ecu-1"]["deploy_id"] == deploy_id_of(rid, 1)
    assert [d for d, _, _ in crashing.offers] == [deploy_id_of(rid, 0)]

    # a new console on the same database
    world.store.close()
    store = Store.open(world.db)
    world.store = world.fleet.store = store
    link = Link(deploys=dict(crashing.deploys))
    world.link = world.fleet.link = link
    world.fleet.seen_offers = world.fleet.seen_commands = 0
    engine = RolloutEngine(store, link, clock=world.clock)
    engine.resume_all()
    assert [(d, ids) for d, ids, _ in link.offers] == [(deploy_id_of(rid, 1), ("ecu-1", "ecu-2"))]
    engine.tick()
    assert len(link.offers) == 1  # a tick does not offer again what resume_all sent
    world.fleet.run(engine, 900)
    assert row(world, rid)["state"] == "passed"
    every = [*crashing.offers, *link.offers]
    for device_id in world.fleet.devices:
        assert len({d for d, ids, _ in every if device_id in ids}) == 1, device_id
    assert set(statuses(world, rid).values()) == {"committed"}


def test_a_failed_send_is_retried_next_tick_with_the_same_deploy_id(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour()

    class FlakyLink(Link):
        failures = 1

        def offer(self, deploy: Deploy, bundle_path: Path, device_ids: Sequence[str], *, hold_s: int) -> None:
            if self.failures:
                self.failures -= 1
                raise SenderError("the broker link is down")
            super().offer(deploy, bundle_path, device_ids, hold_s=hold_s)

    flaky = FlakyLink()
    world.fleet.link = flaky
    engine = RolloutEngine(world.store, flaky, clock=world.clock)
    rid = engine.start(world.spec())["rollout_id"]
    engine.tick()
    assert flaky.offers == [] and statuses(world, rid)["ecu-0"] == "offered"
    engine.tick()
    assert [(d, ids) for d, ids, _ in flaky.offers] == [(deploy_id_of(rid, 0), ("ecu-0",))]
    engine.tick()
    assert len(flaky.offers) == 1


def test_resume_all_resends_commit_and_rollback_with_the_same_ids(world: World) -> None:
    world.fleet.behaviour[2] = Behaviour(error_rate=0.5)
    rid = world.engine.start(world.spec())["rollout_id"]
    world.fleet.run(world.engine, 20)
    for _ in range(15):  # the device reports but does not act on commands
        world.clock.now += STEP
        world.fleet.telemetry(world.fleet.devices["ecu-0"])
        world.engine.tick()
    # the gate failed: rollback persisted and sent; the device has not answered
    assert statuses(world, rid)["ecu-0"] == "rolling_back"
    sent = world.link.commands[-1]
    link = Link()
    RolloutEngine(world.store, link, clock=world.clock).resume_all()
    assert link.commands == [sent] and sent[1]["id"] == f"{deploy_id_of(rid, 0)}.rollback"
    assert link.offers == []  # a failed rollout offers nothing again


# -- starting, and bad input ----------------------------------------------------------------------


def test_start_refusals(world: World, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"group target=ecu,site=b has no devices"):
        world.engine.start(world.spec(group={"target": "ecu", "tags": {"site": "b"}}))
    with pytest.raises(InputError, match="built for target 'ecu', the group is target 'wearable'"):
        world.spec(group={"target": "wearable"})
    with pytest.raises(InputError, match="cover 3 of the group's 5 devices"):
        world.engine.start(world.spec(waves=("1", "3")))
    with pytest.raises(InputError, match=r"deadline 600 s is shorter than 3 waves x soak 300 s"):
        world.engine.start(world.spec(soak_s=300.0, deadline_s=600.0))
    with pytest.raises(InputError, match="already runs release 1 or newer"):
        world.engine.start(world.spec(release=1))
    other = tmp_path / "other.edgeops"
    other.write_bytes(b"x" * 1000)
    with pytest.raises(InputError, match="not the verified bundle"):
        world.engine.start(world.spec(bundle_path=other))
    rid = world.engine.start(world.spec())["rollout_id"]
    with pytest.raises(InputError, match=f"rollout {rid} is already running for group target=ecu,site=a"):
        world.engine.start(world.spec(release=3))
    with pytest.raises(InputError, match=f"device ecu-0 is in rollout {rid}"):
        world.engine.start(world.spec(group={"target": "ecu", "tags": {}}, release=3))
    assert len(world.store.rollouts()) == 1  # nothing half-started


def test_devices_already_at_the_release_are_skipped(world: World) -> None:
    world.fleet.devices["ecu-1"].release = 2
    world.fleet.state(world.fleet.devices["ecu-1"])
    world.fleet.behaviour[2] = Behaviour()
    rid = world.engine.start(world.spec(waves=("50%", "100%")))["rollout_id"]
    assert [w["devices"] for w in status(world, rid)["waves"]] == [["ecu-0", "ecu-2"], ["ecu-3", "ecu-4"]]
    assert statuses(world, rid)["ecu-1"] == "skipped"
    world.fleet.run(world.engine, 600)
    assert row(world, rid)["state"] == "passed"
    assert world.link.offered("ecu-1") == []


def test_status_summary(world: World) -> None:
    rid = world.engine.start(world.spec())["rollout_id"]
    listing = world.engine.status()
    assert isinstance(listing, list) and [s["rollout"]["rollout_id"] for s in listing] == [rid]
    assert listing[0]["counts"] == {"pending": 5}
    one = status(world, rid)
    assert set(one) == {"rollout", "counts", "waves", "devices"}
    assert one["waves"][0]["spec"] == "1" and one["waves"][0]["deploy_id"] == deploy_id_of(rid, 0)
    json.dumps(one)  # JSON-ready


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "comma-separated list"),
        ("0,100%", "wave 1 must be a device count >= 1"),
        ("10%,150%", "wave 2 must be"),
        ("50%,10%,100%", r"wave 2 \(10%\) is below 50%"),
        ("5,2,100%", r"wave 2 \(2\) is below 5"),
        ("1,50%", "the last wave must be 100%"),
        ("1,x,100%", "wave 2 must be"),
        ("-1,100%", "wave 1 must be"),
        (",".join(["100%"] * 21), "at most 20 waves"),
    ],
)
def test_parse_waves_refuses(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_waves(text)


def test_parse_waves_and_durations() -> None:
    assert parse_waves(" 1, 10% ,50%,100%") == ("1", "10%", "50%", "100%")
    assert parse_waves("2,5") == ("2", "5")
    assert [parse_duration(t) for t in ("90s", "5m", "2h", "1d", "30", "1.5h", "0")] == [90, 300, 7200, 86400, 30, 5400, 0]
    for bad in ("", "5x", "-5m", "m", "nan", "inf", "1e3", "400d", "5 minutes"):
        with pytest.raises(InputError, match="duration must"):
            parse_duration(bad)


def test_gates_refuse_nonsense() -> None:
    for kwargs, message in (
        ({"error_rate_max": 1.5}, "error_rate_max must be a finite number >= 0 and <= 1"),
        ({"install_success_min": -0.1}, "install_success_min"),
        ({"psi_max": float("nan")}, "psi_max"),
        ({"anomaly_rate_max": 1.01}, "anomaly_rate_max must be a finite number >= 0 and <= 1"),
        ({"latency_p99_ms": 0}, "latency_p99_ms must be a finite number > 0"),
        ({"latency_factor": float("inf")}, "latency_factor"),
        ({"min_inferences": 0}, "min_inferences must be an integer >= 1"),
        ({"drift_alarms_max": 1.5}, "drift_alarms_max must be an integer"),
        ({"install_timeout_s": True}, "install_timeout_s"),
    ):
        with pytest.raises(InputError, match=message):
            Gates(**kwargs)
    gates = Gates.from_options(
        {"error_rate_max": "5%", "latency_p99_ms": "25", "install_timeout_s": "10m", "min_inferences": "50"}
    )
    assert (gates.error_rate_max, gates.latency_p99_ms, gates.install_timeout_s, gates.min_inferences) == (0.05, 25.0, 600.0, 50)
    assert Gates.parse(["psi_max=0.1", "latency_p99_ms=none"]) == Gates(psi_max=0.1)
    assert Gates.parse(["anomaly_rate_max=2%"]).anomaly_rate_max == 0.02
    assert Gates.from_dict(gates.to_dict()) == gates
    with pytest.raises(InputError, match="unknown gate option 'error_rate'"):
        Gates.from_options({"error_rate": "0.1"})
    with pytest.raises(InputError, match=r"gate option min_inferences='lots': expected a number"):
        Gates.from_options({"min_inferences": "lots"})
    with pytest.raises(InputError, match=r"error_rate_max must be a finite number >= 0 and <= 1, got -0\.2"):
        Gates.from_options({"error_rate_max": "-20%"})
    with pytest.raises(InputError, match="must be NAME=VALUE"):
        Gates.parse(["psi_max"])


def test_psi_and_group_key() -> None:
    assert psi([50, 30, 20], [50, 30, 20]) == 0
    assert psi([10, 10], [10, 10, 0]) == 0  # padded
    assert round(psi([90, 10], [10, 90]), 3) == round(2 * 0.8 * __import__("math").log(9), 3)
    assert psi([100, 0], [99, 1]) > 0
    with pytest.raises(InputError):
        psi([0, 0], [1, 1])
    assert group_key({"target": "ecu", "tags": {"site": "a", "line": "2"}}) == "target=ecu,line=2,site=a"
    with pytest.raises(InputError, match="group tag"):
        group_key({"target": "ecu", "tags": {"site": "a b"}})
    with pytest.raises(InputError, match="group must be"):
        group_key({"target": "ecu", "site": "a"})
