"""The autopilot (edgeops_fleet.autopilot) over a real SQLite store with real builds and evaluations.

Devices are simulated at the console's edge: they answer ``sample_upload`` commands with
``samples`` messages built by the contract's own type, which go through the console's own
``keep_samples`` (as an upload arriving over MQTT does); rollouts are offered through a
recording link (our own interface). Builds and evaluations are the real ``edgeops build`` and
``edgeops evaluate`` subprocesses the console runs, on the small test project.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import EXAMPLE, Built
from edgeops_core import Deploy, Event, InputError, ModelRef, Samples, State, Telemetry, utc_now_text
from edgeops_core.fielddata import FieldDataset
from edgeops_core.manifest import Manifest
from edgeops_fleet.autopilot import Autopilot, AutopilotConfig, build_dataset
from edgeops_fleet.console import keep_samples
from edgeops_fleet.errors import RunConflictError
from edgeops_fleet.rollout import RolloutEngine
from edgeops_fleet.store import Incoming, Store

sys.path.insert(0, str(EXAMPLE))
import vibration_data

PREFIX = "edgeops/v1"
GROUP = {"target": "ecu", "tags": {"cohort": "b"}}
NAME = "vibration-classifier"


class FakeFleet:
    """Devices of cohort b: they answer sample_upload with their (shifted, labelled) rows; offers are recorded."""

    def __init__(self, store: Store, n: int, rows: dict[str, tuple[np.ndarray, list[str | None]]]) -> None:
        self.store, self.rows = store, rows
        self.ids = [f"ecu-{i}" for i in range(n)]
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.offers: list[tuple[str, list[str]]] = []
        for i, d in enumerate(self.ids):
            state = State(
                device_id=d, ts=utc_now_text(), online=True, agent_version="t", target="ecu", runtime="onnxruntime",
                bundle=None, health="ok", last_error=None, tags=GROUP["tags"],
            )  # fmt: skip
            store.ingest([Incoming(d, "state", i + 1, None, time.time(), {**state.to_dict(), "seq": 1}, None)])

    # the link ---------------------------------------------------------------------------------
    def command(self, device_id: str, payload: bytes) -> None:
        cmd = json.loads(payload)
        self.commands.append((device_id, cmd))
        if cmd["type"] == "sample_upload" and device_id in self.rows:
            x, labels = self.rows[device_id]
            msg = Samples(
                device_id=device_id, ts=utc_now_text(), command_id=cmd["id"], model=ModelRef(NAME, 1),
                feature_names=tuple(FEATURES), rows=tuple(tuple(float(v) for v in r) for r in x),
                labels=tuple(labels), label_names=tuple(LABELS), scores=tuple(0.0 for _ in labels),
            )  # fmt: skip
            assert keep_samples(self.store, PREFIX, f"{PREFIX}/{device_id}/samples", msg.to_json(), time.time()) is None

    def offer(self, deploy: Deploy, bundle_path: Path, device_ids: Sequence[str], *, hold_s: int) -> None:
        self.offers.append((deploy.deploy_id, list(device_ids)))

    def stop_serving(self, deploy_id: str) -> None:
        pass


_ds = vibration_data.load_dataset(n_train=10, n_val=10, n_test=10, seed=1)
FEATURES, LABELS = tuple(_ds["feature_names"]), tuple(_ds["label_names"])


def shifted_rows(n: int, seed: int, **quantities: float) -> tuple[np.ndarray, list[str | None]]:
    x, y = vibration_data.simulate(n, np.random.default_rng(seed), quantities)
    return x.astype(np.float32), [LABELS[int(k)] for k in y]


@pytest.fixture
def console_home(tmp_path: Path, built: Built, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A console machine's EDGEOPS_HOME. Its registry never saw release 1 (the champion was built
    elsewhere): the autopilot's builds must still make release 2 (``--release-above``)."""
    home = tmp_path / "console-home"
    home.mkdir()
    monkeypatch.setenv("EDGEOPS_HOME", str(home))
    cache = Path(str(tmp_path_factory.getbasetemp())) / "autopilot-cache"  # shared by this module's builds
    monkeypatch.setenv("EDGEOPS_CACHE_DIR", str(cache))
    return home


class World:
    def __init__(self, tmp: Path, built: Built, small_project: Path, fleet_rows: dict[str, Any], n: int = 3) -> None:
        self.store = Store.open(f"sqlite:///{tmp / 'console.sqlite'}")
        self.fleet = FakeFleet(self.store, n, fleet_rows)
        self.engine = RolloutEngine(self.store, self.fleet, prefix=PREFIX)
        self.pilot = Autopilot(self.store, self.fleet, self.engine, bundles_dir=tmp / "bundles", work_dir=tmp / "work")
        self.built, self.project = built, small_project

    def configure(self, **change: Any) -> AutopilotConfig:
        raw = {
            "group": GROUP, "mode": "auto", "project": str(self.project), "champion": str(self.built.bundle),
            "signing_key": str(self.built.private_key), "public_key": str(self.built.public_key),
            "collect_s": 10.0, "min_labelled": 100, "margin": 0.01, "waves": "1,100%", "soak_s": 0,
            **change,
        }  # fmt: skip
        self.pilot.configure(raw)
        return AutopilotConfig.from_dict(raw)

    def run_to_end(self, run_id: str, timeout_s: float = 240) -> dict[str, Any]:
        """Execute the queued run in this thread (the worker's loop body) and return it."""
        self.pilot._execute(run_id)
        return self.store.run(run_id) or {}


@pytest.fixture
def world(tmp_path: Path, built: Built, small_project: Path, console_home: Path) -> Iterator[World]:
    rows = {f"ecu-{i}": shifted_rows(300, 10 + i, shaft_rpm=2700) for i in range(3)}
    w = World(tmp_path, built, small_project, rows)
    yield w
    w.store.close()


def test_config_is_strict(tmp_path: Path, world: World) -> None:
    base = {"group": GROUP, "mode": "auto", "project": str(world.project)}
    for change, words in (
        ({"mode": "sometimes"}, "mode"),
        ({"margin": -0.1}, "margin"),
        ({"project": "relative/path"}, "absolute"),
        ({"drift_devices": 0}, "drift_devices"),
        ({"surprise": 1}, "unknown setting 'surprise'"),
        ({"waves": "0%"}, "wave"),
        ({"project": str(tmp_path)}, "edgeops.toml"),
        ({"upload_rows": 5000}, "upload_rows"),  # more than a sample_upload may ask for
        ({"build_timeout_s": 1e300}, "build_timeout_s"),
        ({"collect_s": 10**400}, "collect_s"),
        ({"margin": float("nan")}, "margin"),
        ({"drift_devices": True}, "drift_devices"),
        ({"public_key": str(world.project / "edgeops.toml")}, "not a usable public key"),
    ):
        with pytest.raises(InputError, match=words):
            world.pilot.configure({**base, **change})
    assert world.store.autopilots() == []  # nothing half-applied


def test_a_challenger_that_loses_deploys_nothing_and_says_why(world: World) -> None:
    world.configure(margin=0.9)  # no model gains 90 points: the challenger must lose
    run = world.pilot.retrain(GROUP, detail="test")
    assert run["state"] == "queued"
    done = world.run_to_end(run["run_id"])
    assert done["state"] == "rejected", done
    assert "the challenger lost" in done["reason"] and "nothing was deployed" in done["reason"]
    m = done["metrics"]
    assert 0 <= m["champion_accuracy"] <= 1 and 0 <= m["challenger_accuracy"] <= 1 and m["holdout_rows"] > 0
    assert world.store.rollouts() == [] and world.fleet.offers == []
    # The challenger was built from the field dataset, and its manifest names it.
    (digest,) = done["datasets"]
    manifest = _manifest(Path(done["bundle_path"]))
    assert digest in manifest.lineage.field_datasets
    assert manifest.release == 2
    # The dataset traces back to the devices that uploaded and when.
    row = world.store.dataset(digest)
    assert row is not None and row["run_id"] == done["run_id"]
    assert row["provenance"]["devices"] == ["ecu-0", "ecu-1", "ecu-2"]
    assert row["labelled"] == row["rows"] == 900
    assert row["provenance"]["first_ts"] <= row["provenance"]["last_ts"]


def test_propose_waits_for_approve_then_rolls_out_and_never_twice(world: World) -> None:
    world.configure(mode="propose", margin=0.01)
    run_id = world.pilot.retrain(GROUP)["run_id"]
    done = world.run_to_end(run_id)
    assert done["state"] == "proposed", done
    m = done["metrics"]
    assert m["challenger_accuracy"] >= m["champion_accuracy"] + 0.01  # trained on the shifted rows, it wins
    for _ in range(3):  # nothing moves while it waits
        world.engine.tick()
        world.pilot.tick(now=time.time() + 10_000)
    assert world.store.rollouts() == [] and world.fleet.offers == []
    with pytest.raises(LookupError):
        world.pilot.approve("run-does-not-exist")
    approved = world.pilot.approve(run_id)
    assert approved["state"] == "rolling_out" and approved["rollout_id"]
    rollout = world.store.rollout(approved["rollout_id"])
    assert rollout is not None and rollout["release"] == done["release"] and rollout["group"] == GROUP
    world.engine.tick()
    assert world.fleet.offers and set(world.fleet.offers[0][1]) <= {"ecu-0", "ecu-1", "ecu-2"}
    with pytest.raises(RunConflictError, match="only a proposed run"):
        world.pilot.approve(run_id)
    # The run ends with its rollout, and its bundle is the group's champion from then on.
    world.store.put_rollout({"rollout_id": approved["rollout_id"], "state": "passed", "message": "all 2 waves passed"})
    world.pilot.tick(now=time.time() + 20_000)
    final = world.store.run(run_id) or {}
    assert final["state"] == "deployed" and final["ended_at"] and "rolled out" in final["reason"]
    config = world.pilot.config_of(AutopilotConfig.from_dict({"group": GROUP}).group_key)
    assert config is not None and world.pilot._champion(config) == Path(done["bundle_path"])


def test_a_second_trigger_is_merged_into_the_active_run(world: World) -> None:
    world.configure()
    first = world.pilot.retrain(GROUP, detail="first")
    second = world.pilot.retrain(GROUP, detail="second")
    assert second["run_id"] == first["run_id"]
    assert [t["detail"] for t in second["triggers"]] == ["first", "second"]
    assert len(world.store.runs()) == 1
    with pytest.raises(LookupError, match="no autopilot"):
        world.pilot.retrain({"target": "ecu", "tags": {"cohort": "zzz"}})
    world.configure(mode="off")
    with pytest.raises(RunConflictError, match="off"):
        world.pilot.retrain(GROUP)


def test_drift_trigger_needs_the_alarm_held(world: World) -> None:
    world.configure(drift_devices=2, drift_hold_s=30.0, drift_window_s=60.0)
    now = time.time()
    for i, d in enumerate(world.fleet.ids):
        alarm = i < 2
        event = Event(device_id=d, ts=utc_now_text(), type="drift_alarm", detail={"release": 1})
        world.store.ingest([Incoming(d, "event", 10 + i, None, now, {**event.to_dict(), "seq": 10 + i}, 1)])
        world.store.ingest([Incoming(d, "telemetry", 20 + i, None, now, {**_telemetry(d, alarm), "seq": 20 + i}, 1)])
    world.pilot.tick(now=now + 5)  # raised 5 s ago: not held yet
    assert world.store.runs() == []
    asked = [d for d, c in world.fleet.commands if c["type"] == "sample_upload"]
    assert sorted(asked) == ["ecu-0", "ecu-1"]  # an alarm makes the console ask for samples at once
    world.pilot.tick(now=now + 31)
    runs = world.store.runs()
    assert len(runs) == 1 and runs[0]["trigger"] == "drift" and "2 device(s)" in runs[0]["triggers"][0]["detail"]
    world.pilot.tick(now=now + 40)
    assert len(world.store.runs()) == 1  # held on still: merged, never a second run


def test_a_retrain_whose_data_checks_fail_deploys_nothing(world: World) -> None:
    world.configure()
    x, labels = world.fleet.rows["ecu-0"]
    bad = x.copy()
    bad[:, 0] = 5e7  # past the project's max_abs_value: a unit error the checks must catch
    world.fleet.rows = dict.fromkeys(world.fleet.ids, (bad, labels))
    run_id = world.pilot.retrain(GROUP)["run_id"]
    done = world.run_to_end(run_id)
    assert done["state"] == "failed", done
    assert done["reason"].startswith("build failed:") and "nothing was deployed" in done["reason"]
    assert "max_abs_value" in done["reason"] or "magnitude" in done["reason"] or "1e+06" in done["reason"], done["reason"]
    assert world.store.rollouts() == [] and world.fleet.offers == []


def test_bad_uploads_are_refused_or_left_out(world: World) -> None:
    store = world.store
    topic = f"{PREFIX}/ecu-0/samples"
    x, labels = shifted_rows(5, 3, shaft_rpm=2700)
    good = Samples(
        device_id="ecu-0", ts=utc_now_text(), command_id="c1", model=ModelRef(NAME, 1), feature_names=FEATURES,
        rows=tuple(tuple(map(float, r)) for r in x), labels=tuple(labels), label_names=LABELS, scores=(0.0,) * 5,
    )  # fmt: skip
    doc = good.to_dict()
    nan = json.dumps({**doc, "rows": [[math.nan] * len(FEATURES), *doc["rows"][1:]]}).encode()
    unknown_label = json.dumps({**doc, "labels": ["gremlins", *doc["labels"][1:]]}).encode()
    other_device = json.dumps({**doc, "device_id": "ecu-1"}).encode()
    for payload, words in ((nan, "NaN"), (unknown_label, "gremlins"), (other_device, "ecu-1"), (b"{", "JSON")):
        reason = keep_samples(store, PREFIX, topic, payload, time.time())
        assert reason is not None and (words in reason or words.lower() in reason.lower()), reason
    assert store.uploads() == [] and len(store.rejects()) == 4
    # A release the database cannot hold is a reject too, never an upload that blocks the queue.
    huge = json.dumps({**doc, "model": {"name": NAME, "release": 10**19}}).encode()
    reason = keep_samples(store, PREFIX, topic, huge, time.time())
    assert reason is not None and "64 bits" in reason and store.uploads() == [] and len(store.rejects()) == 5
    # Feature names are bounded like rows (an upload is not a way to fill the console's disk).
    wide = json.dumps({**doc, "feature_names": [f"f{i}" for i in range(16385)]}).encode()
    reason = keep_samples(store, PREFIX, topic, wide, time.time())
    assert reason is not None and "at most 16384 names" in reason
    # A device with a broken clock: its (well-formed but impossible) time does not spoil a dataset.
    bad_clock = json.dumps({**doc, "ts": "2026-13-45T99:99:99.000000Z", "command_id": "c0"}).encode()
    assert keep_samples(store, PREFIX, topic, bad_clock, time.time()) is None
    ds, _ = build_dataset(store.uploads(with_payload=True), FEATURES, LABELS, GROUP)
    assert ds.provenance.first_ts.startswith("20") and len(ds.y) == 5
    # Well-formed uploads of another model (other features) are left out of a dataset; identical rows count once.
    assert keep_samples(store, PREFIX, topic, good.to_json(), time.time()) is None
    fewer = Samples(
        **{**good.__dict__, "command_id": "c2", "feature_names": FEATURES[:-1], "rows": tuple(r[:-1] for r in good.rows)}
    )
    assert keep_samples(store, PREFIX, topic, fewer.to_json(), time.time()) is None
    dataset, left_out = build_dataset(store.uploads(with_payload=True), FEATURES, LABELS, GROUP)
    assert left_out == 1 and len(dataset.y) == 5 and dataset.labelled == 5
    again = FieldDataset.from_bytes(dataset.to_bytes(), expect_digest=dataset.digest)
    assert again.digest == dataset.digest and again.provenance.devices == ("ecu-0",)


def _telemetry(device_id: str, alarm: bool, labelled: int = 0) -> dict[str, Any]:
    feedback = {"feedback": {"labelled": labelled, "correct": labelled, "rejected": 0}} if labelled else {}
    return Telemetry(
        device_id=device_id, ts=utc_now_text(), interval_s=1.0, model=ModelRef(NAME, 1),
        inference={"count": 10, "window_count": 10, "errors": {}, "error_count": 0, **feedback},
        latency_ms={"p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0},
        drift={"alarm": alarm, "samples": 500, "max_psi": 0.5 if alarm else 0.01, "max_feature": "f0", "max_cusum": 1.0,
               "prediction_psi": 0.01},
        resources={"rss_bytes": 1e7, "cpu_percent": 5.0},
        outbox={"pending": 0, "dropped": 0, "quarantined": 0, "superseded": 0},
    ).to_dict()  # fmt: skip


def _manifest(bundle: Path) -> Manifest:
    from edgeops_core.bundle import read_members

    return Manifest.from_json(read_members(bundle.read_bytes())["manifest.json"])


def test_uploads_are_kept_per_device_up_to_a_cap(world: World) -> None:
    from edgeops_fleet.store import MAX_UPLOADS_PER_DEVICE

    x, labels = shifted_rows(2, 5, shaft_rpm=2700)
    for i in range(MAX_UPLOADS_PER_DEVICE + 5):
        for device in ("ecu-0", "ecu-1"):
            msg = Samples(
                device_id=device, ts=utc_now_text(), command_id=f"c{i}", model=ModelRef(NAME, 1), feature_names=FEATURES,
                rows=tuple(tuple(map(float, r)) for r in x), labels=tuple(labels), label_names=LABELS, scores=(0.0, 0.0),
            )  # fmt: skip
            assert keep_samples(world.store, PREFIX, f"{PREFIX}/{device}/samples", msg.to_json(), time.time()) is None
    for device in ("ecu-0", "ecu-1"):
        kept = [u["command_id"] for u in world.store.uploads(device_ids=[device])]
        assert kept == [f"c{i}" for i in range(5, MAX_UPLOADS_PER_DEVICE + 5)]  # the newest, in order
    # The same upload delivered again (QoS 1 after a console restart) is kept once.
    again = world.store.uploads(device_ids=["ecu-0"], with_payload=True)[-1]
    payload = json.dumps(again["payload"]).encode()
    assert keep_samples(world.store, PREFIX, f"{PREFIX}/ecu-0/samples", payload, time.time()) is None
    assert len(world.store.uploads(device_ids=["ecu-0"])) == MAX_UPLOADS_PER_DEVICE


def test_an_operator_abort_turns_the_groups_autopilot_off(world: World) -> None:
    config = world.configure()
    now = time.time()
    world.store.put_rollout({"rollout_id": "r-1", "state": "aborted", "message": "aborted by the operator"})
    world.store.put_run({
        "run_id": "run-r", "group_key": config.group_key, "group": GROUP, "mode": "auto", "trigger": "drift",
        "triggers": [], "state": "rolling_out", "created_at": now, "updated_at": now, "rollout_id": "r-1", "release": 2,
    })  # fmt: skip
    world.pilot.tick(now=now + 5)
    run = world.store.run("run-r") or {}
    assert run["state"] == "failed" and "autopilot is off" in run["reason"]
    after = world.pilot.config_of(config.group_key)
    assert after is not None and after.mode == "off"
    with pytest.raises(RunConflictError, match="off"):
        world.pilot.retrain(GROUP)


def test_schedule_and_new_labels_trigger_runs(world: World) -> None:
    world.configure(schedule_s=600.0)
    now = time.time()
    world.pilot.tick(now=now + 10)
    assert world.store.runs() == []
    world.pilot.tick(now=now + 601)
    (run,) = world.store.runs()
    assert run["trigger"] == "schedule"
    world.store.put_run({"run_id": run["run_id"], "state": "cancelled", "ended_at": now + 602})

    world.configure(new_labels=50)  # a new configuration: the count starts from now
    start = time.time()
    for seq, device in enumerate(world.fleet.ids * 2, start=100):  # 6 records of 10 labels
        doc = {**_telemetry(device, False, labelled=10), "seq": seq}
        world.store.ingest([Incoming(device, "telemetry", seq, None, start + 650, doc, 1)])
    world.pilot.tick(now=start + 700)
    runs = world.store.runs()
    assert len(runs) == 2 and runs[0]["trigger"] == "labels" and "60 new labels" in runs[0]["triggers"][0]["detail"]


def test_a_cancelled_run_is_never_picked_up_again(world: World) -> None:
    world.configure()
    run_id = world.pilot.retrain(GROUP)["run_id"]
    assert world.pilot.cancel(run_id)["state"] == "cancelled"
    with pytest.raises(RunConflictError, match="has ended"):
        world.pilot._execute(run_id)  # the worker's next step after an operator's cancel
    done = world.store.run(run_id) or {}
    assert done["state"] == "cancelled" and world.fleet.commands == [] and world.store.datasets() == []
    with pytest.raises(RunConflictError, match="only a queued or proposed run"):
        world.pilot.cancel(run_id)


def test_an_approval_whose_challenger_no_longer_verifies_fails_the_run_instead_of_wedging_it(
    world: World, tmp_path: Path
) -> None:
    world.configure(mode="propose")
    broken = tmp_path / "challenger.edgeops"
    broken.write_bytes(world.built.bundle.read_bytes()[:-100])  # cut: it no longer verifies
    now = time.time()
    world.store.put_run({
        "run_id": "run-x", "group_key": "target=ecu,cohort=b", "group": GROUP, "mode": "propose", "trigger": "manual",
        "triggers": [], "state": "proposed", "created_at": now, "updated_at": now, "bundle_path": str(broken), "release": 2,
    })  # fmt: skip
    run = world.pilot.approve("run-x")
    assert run["state"] == "failed" and "the rollout did not start" in run["reason"] and "nothing was deployed" in run["reason"]
    assert world.store.rollouts() == [] and world.fleet.offers == []
    assert world.pilot.retrain(GROUP)["run_id"] != "run-x"  # the group is free for the next run


def test_failed_runs_in_a_row_back_the_drift_trigger_off(world: World) -> None:
    config = world.configure(cooldown_s=100.0)
    assert world.pilot._cooldown(config) == 100.0
    for i, state in enumerate(("failed", "rejected", "failed")):
        world.store.put_run({
            "run_id": f"run-{i}", "group_key": config.group_key, "group": GROUP, "mode": "auto", "trigger": "drift",
            "triggers": [], "state": state, "created_at": float(i), "updated_at": float(i), "ended_at": float(i),
        })  # fmt: skip
    assert world.pilot._cooldown(config) == 400.0  # three misses in a row: 100 s x 2 x 2


def test_a_stopping_console_starts_no_build(world: World) -> None:
    world.configure()
    run_id = world.pilot.retrain(GROUP)["run_id"]
    (world.pilot.work_dir / run_id).mkdir(parents=True)
    world.pilot._stop.set()
    from edgeops_fleet.autopilot import _StoppedError

    with pytest.raises(_StoppedError):
        world.pilot._tool(run_id, "build", ["--version"], 60)
    assert world.pilot._proc is None and not (world.pilot.work_dir / run_id / "build.log").read_bytes()


def test_release_above_numbers_past_a_release_built_elsewhere(tmp_path: Path, built: Built, small_project: Path) -> None:
    from conftest import run_edgeops
    from edgeops_core import read_members

    env = {"EDGEOPS_HOME": str(tmp_path / "home"), "EDGEOPS_CACHE_DIR": str(built.home / "cache")}
    args = ["build", "--target", "ecu", "--project", small_project, "--out", tmp_path / "dist", "--key", built.private_key]

    def build(*extra: str) -> tuple[int, bool]:
        proc = run_edgeops(*args, *extra, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        manifest = Manifest.from_json(read_members(Path(doc["bundle"]).read_bytes())["manifest.json"])
        assert manifest.release == doc["release"]
        return int(doc["release"]), bool(doc["reused_bundle"])

    assert build("--release-above", "7") == (8, False)  # a fresh registry, a fleet on release 7
    assert build("--release-above", "7") == (8, True)  # nothing changed: the same release again
    assert build("--release-above", "8") == (9, False)  # release 8 is not above 8
    proc = run_edgeops(*args, "--release-above", "-1", env=env)
    assert proc.returncode == 2 and "release-above" in proc.stderr
