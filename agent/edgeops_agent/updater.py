"""Over-the-air updates in the running agent: deploy → fetch → install on trial → health check → commit.

The daemon's half of ADR 0012, built on :mod:`edgeops_agent.ota` (preflight, staging, the
pull engine) and :mod:`edgeops_agent.install` (the one install path, trials). One
:class:`Updater` per daemon; one deploy at a time, run on its own thread (``edgeops-ota``):

1. ``deploy`` command (the command worker): refused before a byte is fetched — another
   target, a release not above the floor, over the size cap, no disk room, or a sha256 this
   device rolled back before (``marked_bad``, unless the command says ``retry_bad``) — with
   one ``ota_failed``. A deploy id seen before is ignored (acted on once). While one runs, a
   newer release supersedes it (the old one ends ``ota_failed``/``superseded``); an equal or
   older one is refused (``busy``); during install and trial nothing supersedes.
2. fetching: the engine asks for blocks with :meth:`MqttLink.publish_direct` (never the
   outbox, so OTA never waits behind telemetry); the network thread only puts each
   ``ota_block`` payload in a bounded queue (:attr:`Updater.QUEUE` frames; a full queue drops
   the frame, which is asked for again), so memory stays bounded by that many blocks.
3. the whole file hashes to the announced sha256 → :func:`~edgeops_agent.ota.install_staged`
   activates it on **trial** (floor not raised, old slot kept).
4. health check: the install ran the self-test vectors; then the first
   ``[ota] health_inferences`` live inferences must have no error (input errors, the
   caller's fault, excepted) and a p99 latency within the budget, within
   ``trial_timeout_s``. Pass: :func:`~edgeops_agent.install.confirm_trial` (floor raised),
   ``ota_committed``. Fail: :func:`~edgeops_agent.install.rollback_trial`, the old model
   serves again, the sha256 is marked bad, ``ota_rolled_back``/``health_check``.
5. held (issue 9): a deploy whose args carry ``hold_s > 0`` does not commit when its health
   check passes: it stays in phase ``held`` (floor not raised, old slot kept), with an
   absolute deadline (wall clock, ``hold_until`` in ``ota.json``, so it survives restarts).
   A ``commit`` command (:meth:`Updater.commit`) confirms the trial (``ota_committed``); a
   ``rollback`` (:meth:`Updater.rollback`) serves the old slot again, marks the sha256 bad
   (``ota_rolled_back``/``console_rollback``); the deadline passing with neither commits
   (``ota_committed`` with reason ``hold_expired``), so a vanished console never strands a
   device on an uncommitted release. Either command for a deploy that is not held is
   refused (:class:`~edgeops_agent.errors.CommandRejectedError` → ``command_rejected``).

Persistence: ``<data>/ota.json`` (replaced whole, fsynced, like the state) holds the
current deploy (its :class:`~edgeops_core.Deploy`, phase, start-ups during its trial and,
once decided, its outcome), the sha256s marked bad and the ids of deploys that ended. On
start (:meth:`Updater.before_agent`, before the model is loaded), a trial that has seen more
than ``max_boots`` start-ups is rolled back (``crash_loop``); a younger one is adopted so it
survives the start-up's recovery; then :meth:`Updater.resume` picks the deploy up where it
stopped: fetching resumes from the staging journal, a decided outcome is reported.

Crash loops while held: a held model passed its health check, so ordinary restarts (a
reboot, an agent upgrade, a power cut) must not roll it back. Start-ups still count (a model
that crashes the agent after its K inferences is a crash loop too), but the count goes back
to 0 when the process stops cleanly (:meth:`Updater.stop`) and once it has served held for
:data:`HELD_STABLE_S` seconds; so only more than ``max_boots`` start-ups in a row, each dying
within a minute, roll a held deploy back (``crash_loop``).

Exactly one final event per deploy id: the outcome is written to ``ota.json`` first, then
the event goes into the outbox with ``once=ota-final:<deploy id>`` (the key and the message
are one SQLite transaction), then ``ota.json`` records it as emitted. A kill -9 between any
two steps re-runs the put at the next start, which the key makes a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeops_agent.agent import LATENCY_RING
from edgeops_agent.config import OtaConfig
from edgeops_agent.crash import crash_point
from edgeops_agent.errors import AgentError, CommandRejectedError
from edgeops_agent.install import adopt_trial, confirm_trial, rollback_trial
from edgeops_agent.model import LoadedModel
from edgeops_agent.ota import OTA_DIR, OtaError, Staging, TransferEngine, TransferPolicy, install_staged, preflight
from edgeops_agent.store import DataDir, write_durably
from edgeops_agent.trust import TrustStore
from edgeops_core import BlockRequest, CommandError, Deploy, EdgeopsError, MessageError, OtaOutcome, OtaProgress, utc_now_text
from edgeops_core.messages import deploy_args, deploy_hold_s

if TYPE_CHECKING:
    from edgeops_agent.agent import Agent

__all__ = ["RECORD_FILE", "Updater"]

log = logging.getLogger(__name__)

#: The update record's file name in the data directory.
RECORD_FILE = "ota.json"
_RECORD_VERSION = 1
#: At most this many sha256s marked bad, and deploy ids remembered as ended (oldest go first).
_KEEP_BAD, _KEEP_ENDED = 64, 256
#: Seconds between two ``ota_progress`` events of one deploy (phase changes are always sent).
PROGRESS_INTERVAL_S = 1.0
#: Seconds between two ``ota_blocks_refused`` summaries.
REFUSED_INTERVAL_S = 1.0
#: Error types that are the caller's fault, not the model's: they do not fail a trial.
INPUT_ERRORS = frozenset({"TensorInputError", "RequestError"})
#: Seconds a held deploy must serve in one process before its start-up count is reset (see
#: the module docstring: ordinary restarts never roll a held deploy back).
HELD_STABLE_S = 60.0


@dataclass
class _Current:
    """The deploy in hand, as ``ota.json`` records it."""

    command_id: str
    deploy: Deploy
    phase: str  # fetching | installing | trial | held | ended
    boots: int = 0
    outcome: dict[str, Any] | None = None
    emitted: bool = False
    received: int = 0
    hold_s: int = 0  # the deploy's hold_s (0: commit right after the health check)
    hold_until: float | None = None  # once held: the wall-clock time it commits by itself

    def to_dict(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "deploy": self.deploy.to_args(),
            "phase": self.phase,
            "boots": self.boots,
            "outcome": self.outcome,
            "emitted": self.emitted,
            "received": self.received,
            "hold_s": self.hold_s,
            "hold_until": self.hold_until,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> _Current:
        return cls(
            command_id=str(raw["command_id"]),
            deploy=Deploy.from_args(raw["deploy"]),
            phase=str(raw["phase"]),
            boots=int(raw["boots"]),
            outcome=dict(raw["outcome"]) if raw["outcome"] is not None else None,
            emitted=bool(raw["emitted"]),
            received=int(raw.get("received", 0)),
            hold_s=int(raw.get("hold_s", 0)),
            hold_until=float(raw["hold_until"]) if raw.get("hold_until") is not None else None,
        )


@dataclass
class _Record:
    current: _Current | None = None
    bad: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    #: How each remembered ended deploy ended (its final phase), for the refusal of a late commit/rollback.
    how: dict[str, str] = field(default_factory=dict)
    last: dict[str, Any] | None = None  # the retained state's ``ota`` once the current one ended


class _Job:
    """One deploy's thread and the flag that stops it (a newer release superseding it)."""

    def __init__(self, current: _Current) -> None:
        self.current = current
        self.stop = threading.Event()
        self.wake = threading.Event()  # a held deploy ended by a command: its thread exits now
        self.thread: threading.Thread | None = None


class Updater:
    """The daemon's over-the-air updates (see the module docstring)."""

    def __init__(
        self,
        data_dir: DataDir,
        config: OtaConfig,
        *,
        device_id: str,
        target: str,
        put_event: Callable[[str, Mapping[str, Any], str | None], None],
        publish_direct: Callable[[str, Mapping[str, Any]], bool],
        request_topic: str,
        state_changed: Callable[[], None],
    ) -> None:
        """Read ``ota.json``; nothing runs until :meth:`resume`.

        Args:
            put_event: queue an event ``(type, detail, once_key)`` in the outbox.
            publish_direct: publish a JSON message now, bypassing the outbox (block requests).
            request_topic: the device's ``ota_request`` topic.
            state_changed: queue a new retained state (progress, activation).

        A damaged ``ota.json`` is moved aside (``ota.json.damaged``) and logged: it must
        not keep the model from serving.
        """
        self.data = data_dir
        self.config = config
        self.device_id = device_id
        self.target = target
        self._put_event = put_event
        self._publish = publish_direct
        self._request_topic = request_topic
        self._state_changed = state_changed
        self.path = data_dir.root / RECORD_FILE
        self._lock = threading.RLock()
        # Frames waiting for the transfer thread: twice the window (what was asked for, plus
        # late answers to retries); past it a frame is dropped and asked for again. Memory:
        # at most that many blocks.
        self._blocks: queue.Queue[bytes] = queue.Queue(maxsize=2 * config.window + 4)
        self.dropped_frames = 0
        self._job: _Job | None = None
        self._stopping = threading.Event()
        self.agent: Agent | None = None
        self._progress_at = 0.0
        self._received = 0
        self.record = self._load()

    # -- the record ----------------------------------------------------------------------------

    def _load(self) -> _Record:
        try:
            raw = json.loads(self.path.read_text())
            if raw["version"] != _RECORD_VERSION:
                raise ValueError(f"version {raw['version']!r}, this agent reads {_RECORD_VERSION}")
            current = _Current.from_dict(raw["current"]) if raw["current"] is not None else None
            how = {str(k): str(v) for k, v in raw.get("how", {}).items()}
            return _Record(
                current=current,
                bad=[str(s) for s in raw["bad"]],
                ended=[str(s) for s in raw["ended"]],
                how=how,
                last=raw.get("last"),
            )
        except FileNotFoundError:
            return _Record()
        except (OSError, AttributeError, KeyError, TypeError, ValueError, CommandError) as exc:
            # The record is replaced whole and fsynced, so only a disk damaged at rest gets
            # here. It must not keep the model from serving: set it aside and start empty
            # (the floor is in the state; a trial it no longer knows is rolled back at start-up).
            aside = self.path.with_name(RECORD_FILE + ".damaged")
            log.error("%s: damaged update record (%s: %s); moved to %s", self.path, type(exc).__name__, exc, aside)
            with contextlib.suppress(OSError):
                self.path.replace(aside)
            return _Record()

    def _save(self) -> None:
        r = self.record
        doc = {
            "version": _RECORD_VERSION,
            "current": r.current.to_dict() if r.current else None,
            "bad": r.bad[-_KEEP_BAD:],
            "ended": r.ended[-_KEEP_ENDED:],
            "last": r.last,
            "how": {k: v for k, v in r.how.items() if k in set(r.ended[-_KEEP_ENDED:])},
        }
        write_durably(self.path, json.dumps(doc, sort_keys=True).encode())

    # -- what the state shows ----------------------------------------------------------------

    def progress(self) -> dict[str, Any] | None:
        """The retained state's ``ota``: the deploy in hand, or how the last one ended."""
        with self._lock:
            cur = self.record.current
            if cur is None or cur.phase == "ended":
                return self.record.last
            phase = cur.phase if cur.phase in ("fetching", "installing", "trial", "held") else "fetching"
            d = cur.deploy
            received = d.block_count if cur.phase != "fetching" else min(self._received, d.block_count)
            return OtaProgress(d.deploy_id, d.release, phase, received, d.block_count).to_dict()

    # -- start-up ------------------------------------------------------------------------------

    def before_agent(self) -> None:
        """Count a start-up during a trial; roll back a crash loop, adopt a younger trial.

        Called with the daemon's lock held and before the model is loaded (the model that
        loads is then the right one).

        Raises:
            AgentError, StateCorruptedError: the state cannot be read or written.
        """
        cur = self.record.current
        if cur is None or cur.outcome is not None or cur.phase not in ("installing", "trial", "held"):
            return
        state = self.data.load_state()
        trial_info = state.slots.get(state.trial.slot) if state.trial is not None else None
        if trial_info is not None and trial_info.sha256 == cur.deploy.sha256:
            held = cur.phase == "held"
            cur.phase, cur.boots = ("held" if held else "trial"), cur.boots + 1
            self._save()
            if cur.boots > self.config.max_boots:
                how = (
                    f"in a row while held, each dying within {HELD_STABLE_S:g} s and without a clean stop,"
                    if held
                    else "on trial"
                )
                message = (
                    f"release {cur.deploy.release} started {cur.boots} times {how} without being committed "
                    f"(ota.max_boots = {self.config.max_boots}): rolled back"
                )
                log.error("%s", message)
                rollback_trial(self.data, message)
                self._mark_bad(cur.deploy.sha256)
                self._decide(cur, "ota_rolled_back", "crash_loop", message, emit=False)
                return
            adopt_trial(self.data)
            return
        if cur.phase in ("trial", "held"):
            # The trial ended between the state's write and ours (a kill -9 there): the state decides.
            info = state.slots.get(state.active) if state.active else None
            if info is not None and info.sha256 == cur.deploy.sha256:
                self._decide(cur, "ota_committed", None, None, emit=False)
            else:
                self._mark_bad(cur.deploy.sha256)
                self._decide(
                    cur,
                    "ota_rolled_back",
                    "health_check",
                    "the trial was rolled back before its outcome was recorded",
                    emit=False,
                )
        # "installing" without a trial: the install did not commit; resume() runs it again.

    def resume(self, agent: Agent) -> None:
        """Report a decided outcome, or carry the deploy in hand on (after :meth:`before_agent`)."""
        self.agent = agent
        with self._lock:
            cur = self.record.current
            if cur is None or cur.phase == "ended":
                return
            if cur.outcome is not None:
                self._emit(cur)
                return
            if self._job is None:  # a deploy taken on before this call runs already
                self._start(cur)

    def stop(self) -> None:
        """Stop the deploy's thread (it resumes at the next start).

        A clean stop while held resets the start-up count: an ordinary restart is not a crash.
        """
        self._stopping.set()
        job = self._job
        if job is not None:
            job.stop.set()
            job.wake.set()
            if job.thread is not None:
                job.thread.join(timeout=5)
        with self._lock:
            cur = self.record.current
            if cur is not None and cur.phase == "held" and cur.outcome is None and cur.boots:
                cur.boots = 0
                try:
                    self._save()
                except AgentError as exc:  # a full disk: the next start counts one start-up more
                    log.error("update record not saved at stop: %s", exc)

    # -- intake --------------------------------------------------------------------------------

    def on_block(self, payload: bytes) -> None:
        """paho's network thread: hand the frame over, never block, never parse."""
        try:
            self._blocks.put_nowait(payload)
        except queue.Full:
            self.dropped_frames += 1

    def deploy(self, command_id: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Handle a ``deploy`` command (the command worker); the ``command_done`` detail.

        Raises:
            CommandError: the args are not a deploy (the command was validated already: a bug).
        """
        deploy, retry_bad = deploy_args(args)
        hold_s = deploy_hold_s(args)
        with self._lock:
            cur = self.record.current
            active = cur is not None and cur.phase != "ended" and cur.outcome is None
            if deploy.deploy_id in self.record.ended or (cur is not None and cur.deploy.deploy_id == deploy.deploy_id):
                log.info("deploy %s seen before: ignored", deploy.deploy_id)
                return {"deploy_id": deploy.deploy_id, "accepted": False, "ignored": "seen before"}
            new = _Current(command_id, deploy, "fetching", hold_s=hold_s)
            supersedes = cur is not None and cur.phase == "fetching" and deploy.release > cur.deploy.release
            if active and cur is not None and not (supersedes and deploy.name == cur.deploy.name):
                return self._refuse(
                    new, "busy",
                    f"deploy {cur.deploy.deploy_id} (release {cur.deploy.release}, {cur.phase}) runs; "
                    f"release {deploy.release} does not supersede it",
                )  # fmt: skip
            if deploy.sha256 in self.record.bad and not retry_bad:
                return self._refuse(
                    new, "marked_bad",
                    f"sha256 {deploy.sha256[:16]}… was rolled back on this device before; "
                    "the console must ask explicitly (retry_bad) to fetch it again",
                )  # fmt: skip
            try:
                preflight(self.data, deploy, device_target=self.target)
            except OtaError as exc:
                return self._refuse(new, exc.reason, str(exc))
            if active and cur is not None:
                self._supersede(cur, deploy)
            if retry_bad and deploy.sha256 in self.record.bad:
                self.record.bad.remove(deploy.sha256)
            self.record.current = new
            self._received = 0
            self._save()
            self._start(new)
        return {"deploy_id": deploy.deploy_id, "accepted": True}

    def _refuse(self, current: _Current, reason: str, message: str) -> dict[str, Any]:
        """End a deploy that never started: its one final ``ota_failed`` (the current deploy is untouched)."""
        log.warning("deploy %s refused (%s): %s", current.deploy.deploy_id, reason, message)
        outcome = OtaOutcome(
            type="ota_failed", deploy_id=current.deploy.deploy_id, release=current.deploy.release, reason=reason, message=message
        )
        self._put_final(outcome)
        self.record.ended.append(current.deploy.deploy_id)
        self.record.how[current.deploy.deploy_id] = "failed"
        running = self.record.current is not None and self.record.current.outcome is None
        if not running:  # the state shows the running deploy if there is one, else this refusal
            d = current.deploy
            self.record.last = OtaProgress(d.deploy_id, d.release, "failed", 0, d.block_count).to_dict()
        self._save()
        if not running:
            self._state_changed()
        return {"deploy_id": current.deploy.deploy_id, "accepted": False, "reason": reason}

    def _supersede(self, cur: _Current, by: Deploy) -> None:
        job = self._job
        if job is not None and job.current is cur:
            job.stop.set()
            if job.thread is not None and job.thread is not threading.current_thread():
                self._lock.release()  # the job's thread may be waiting for the lock to end itself
                try:
                    job.thread.join(timeout=10)
                finally:
                    self._lock.acquire()
        if cur.outcome is None:
            self._decide(cur, "ota_failed", "superseded", f"superseded by deploy {by.deploy_id} (release {by.release})")

    # -- the deploy's thread -------------------------------------------------------------------

    def _start(self, cur: _Current) -> None:
        job = _Job(cur)
        job.thread = threading.Thread(target=self._run, args=(job,), name="edgeops-ota", daemon=True)
        self._job = job
        job.thread.start()

    def _run(self, job: _Job) -> None:
        cur = job.current
        staging: Staging | None = None
        try:
            if cur.phase == "fetching":
                staging = self._fetch(job)
                crash_point("staging_complete")
                with self._lock:
                    if job.stop.is_set():
                        staging.close()
                        return
                    cur.phase = "installing"
                    self._save()
                self._state_changed()
            if cur.phase == "installing":
                self._install(job, staging)
            if cur.phase == "trial":
                self._trial(job)
            if cur.phase == "held":
                self._held(job)
        except OtaError as exc:
            if exc.reason == "superseded" or self._stopping.is_set():
                return  # the superseding deploy (or the next start) decides
            with self._lock:
                self._decide(cur, "ota_failed", exc.reason, str(exc))
        except Exception as exc:  # a bug must end the deploy visibly, not the agent
            log.exception("deploy %s failed", cur.deploy.deploy_id)
            with self._lock:
                if cur.outcome is None and not self._stopping.is_set():
                    self._decide(cur, "ota_failed", "storage", f"{type(exc).__name__}: {exc}")

    def _request(self, deploy: Deploy, indexes: tuple[int, ...]) -> None:
        message = BlockRequest(device_id=self.device_id, ts=utc_now_text(), deploy_id=deploy.deploy_id, blocks=indexes)
        if not self._publish(self._request_topic, message.to_dict()):
            raise AgentError("not connected")  # the engine asks again after its backoff

    def _fetch(self, job: _Job) -> Staging:
        deploy = job.current.deploy
        policy = TransferPolicy(
            window=self.config.window,
            retry_initial_s=self.config.retry_initial_s,
            deadline_s=self.config.deadline_s,
            min_bytes_per_s=self.config.min_bytes_per_s,
        )
        staging = Staging(self.data.root / OTA_DIR, deploy)
        try:
            self._received = staging.received
            engine = TransferEngine(staging, lambda idx: self._request(deploy, idx), policy=policy)
            while True:  # frames queued for a previous run are stale
                try:
                    self._blocks.get_nowait()
                except queue.Empty:
                    break
            engine.start()
            refused_at, reported = time.monotonic(), dict(engine.refused)
            self._progress(job, force=True)
            while not staging.complete:
                if job.stop.is_set():
                    raise OtaError("superseded", f"deploy {deploy.deploy_id} was stopped")
                try:
                    batch = [self._blocks.get(timeout=policy.tick_s)]
                except queue.Empty:
                    batch = []
                while batch:  # what has arrived is written as one batch: two fdatasync, not two per block
                    with contextlib.suppress(queue.Empty):
                        while len(batch) < policy.window:
                            batch.append(self._blocks.get_nowait())
                    before = staging.received
                    engine.on_blocks(batch)
                    self._received = staging.received
                    for count in range(before + 1, staging.received + 1):
                        crash_point("after_block", count)  # every block up to ``count`` is journaled
                    batch = []
                    with contextlib.suppress(queue.Empty):
                        batch.append(self._blocks.get_nowait())
                engine.tick()
                self._progress(job)
                now = time.monotonic()
                if now - refused_at >= REFUSED_INTERVAL_S and dict(engine.refused) != reported:
                    delta = {k: v - reported.get(k, 0) for k, v in engine.refused.items() if v != reported.get(k, 0)}
                    refused_at, reported = now, dict(engine.refused)
                    self._event("ota_blocks_refused", {"deploy_id": deploy.deploy_id, "refused": delta})
            engine.tick()
            staging.finish()
        except BaseException:
            staging.close()
            raise
        return staging

    def _install(self, job: _Job, staging: Staging | None) -> None:
        cur = job.current
        try:
            if staging is None:  # resumed after a restart: every journaled block is checked again
                staging = Staging(self.data.root / OTA_DIR, cur.deploy)
            path = staging.finish()
            try:
                result = install_staged(self.data, path, target=self.target)
            except EdgeopsError as exc:
                if self.agent is not None:  # a list the bundle carried may have revoked the serving model's key
                    self.agent.enforce_revocations()
                raise OtaError("install_rejected", f"deploy {cur.deploy.deploy_id}: {type(exc).__name__}: {exc}") from exc
        finally:
            if staging is not None:
                staging.close()
        if result.trust is not None:
            self._event("trust_updated", {"source": "bundle", "deploy_id": cur.deploy.deploy_id, **result.trust.detail()})
        with self._lock:
            cur.phase, cur.boots = "trial", 0
            self._save()
        self._serve(result.model)
        staging.discard()

    def _serve(self, model: LoadedModel) -> None:
        agent = self.agent
        if agent is None:  # pragma: no cover - resume() sets it before any thread runs
            raise AgentError("the updater has no agent")
        agent.flush_drift()
        agent._activate(model)  # the same switch Agent.install makes
        agent.fault = None
        agent.state = self.data.load_state()
        # A trust_update handled since the install (or the load) checked this model's key
        # found the previous model serving: check this one now.
        agent.enforce_revocations()
        self._state_changed()

    def _budget_ms(self, model: LoadedModel) -> float:
        if self.config.latency_budget_ms is not None:
            return self.config.latency_budget_ms
        metrics = model.manifest.metrics
        if "latency_budget_ms" in metrics:
            return float(metrics["latency_budget_ms"])
        return max(1.0, 10.0 * float(metrics.get("latency_p99_ms", 0.1)))

    def _trial(self, job: _Job) -> None:
        cur = job.current
        agent = self.agent
        if agent is None or agent.model is None:
            raise OtaError("install_rejected", f"deploy {cur.deploy.deploy_id}: the trial's model is not loaded")
        self._state_changed()
        self._progress(job, force=True)
        crash_point("trial")
        k = self.config.health_inferences
        budget = self._budget_ms(agent.model)
        failure: str | None = None
        try:
            # The self-test vectors through the serving model: the install ran them on its own
            # load, but a trial resumed after a restart runs a fresh one; and they warm the
            # runtime up, so the first live inferences are not measured cold.
            agent.model.self_test()
        except EdgeopsError as exc:
            failure = f"the self-test vectors failed on the serving model: {exc}"
        base = agent.counters()
        with agent._lock:
            base_lat = agent._lat_n
        deadline = time.monotonic() + self.config.trial_timeout_s
        while failure is None:
            if self._stopping.is_set():
                return  # the next start counts a start-up and checks again
            c = agent.counters()
            errors = {t: n - base.errors.get(t, 0) for t, n in c.errors.items() if t not in INPUT_ERRORS}
            errors = {t: n for t, n in errors.items() if n > 0}
            if errors:
                failure = f"live inferences on trial failed: {errors}"
                break
            with agent._lock:
                seen = agent._lat_n - base_lat
                if seen >= k:
                    idx = np.arange(base_lat, base_lat + min(k, LATENCY_RING)) % LATENCY_RING
                    lat_ms = agent._latency[idx] / 1e6
            if seen >= k:
                if k:
                    p99 = float(np.percentile(lat_ms, 99))
                    if not math.isfinite(p99) or p99 > budget:
                        failure = f"p99 latency of the first {k} live inferences is {p99:.3f} ms, the budget is {budget:g} ms"
                break
            if time.monotonic() > deadline:
                failure = f"only {seen} of {k} live inferences within ota.trial_timeout_s = {self.config.trial_timeout_s:g} s"
                break
            time.sleep(0.05)
        with self._lock:
            if failure is None and cur.hold_s > 0:
                cur.phase, cur.boots = "held", 0
                cur.hold_until = time.time() + cur.hold_s
                self._save()
                log.info(
                    "deploy %s (release %d) passed its health check: held for up to %d s, waiting for commit or rollback",
                    cur.deploy.deploy_id, cur.deploy.release, cur.hold_s,
                )  # fmt: skip
                # Under the lock: a commit arriving now cannot put its final event before this one.
                self._state_changed()
                self._progress(job, force=True)
                return
            if failure is None:
                self._commit_trial(cur, None, None)
                return
        with self._lock:
            message = f"deploy {cur.deploy.deploy_id} (release {cur.deploy.release}): {failure}; rolled back"
            log.error("%s", message)
            rollback_trial(self.data, message)
            self._serve_active()
            self._mark_bad(cur.deploy.sha256)
            self._decide(cur, "ota_rolled_back", "health_check", message)

    def _commit_trial(self, cur: _Current, reason: str | None, message: str | None) -> None:
        """Confirm the trial (floor raised), record and report ``ota_committed`` (caller holds the lock)."""
        confirm_trial(self.data)  # before the outcome: an outcome of "committed" is never ahead of the state
        if self.agent is not None:
            self.agent.state = self.data.load_state()
        self._decide(cur, "ota_committed", reason, message, emit=False)
        crash_point("committed")
        self._emit(cur)

    def _held(self, job: _Job) -> None:
        """Wait, held, for a command or the deadline; at the deadline commit by ourselves."""
        cur = job.current
        started = time.monotonic()
        stable = False
        while not (self._stopping.is_set() or job.stop.is_set()):
            with self._lock:
                if cur.outcome is not None or cur.phase != "held":
                    return  # a commit or rollback command ended it
                now = time.time()
                if cur.hold_until is None or cur.hold_until > now + cur.hold_s:
                    # Never set (a record from a bug) or the wall clock went back: at most hold_s from now.
                    cur.hold_until = now + cur.hold_s
                    self._save()
                remaining = cur.hold_until - now
                if remaining <= 0:
                    message = (
                        f"deploy {cur.deploy.deploy_id} (release {cur.deploy.release}) was held {cur.hold_s} s "
                        "without a commit or rollback from the console: committed by the device"
                    )
                    log.warning("%s", message)
                    self._commit_trial(cur, "hold_expired", message)
                    return
                if not stable and time.monotonic() - started >= HELD_STABLE_S:
                    stable = True  # this start-up was no crash: the loop count starts over
                    if cur.boots:
                        cur.boots = 0
                        self._save()
            job.wake.wait(min(remaining, 1.0))

    def _held_deploy(self, deploy_id: str, kind: str) -> _Current:
        """The current deploy if it is ``deploy_id`` and held (caller holds the lock).

        Raises:
            CommandRejectedError: it is not held here, saying what it is instead.
        """
        cur = self.record.current
        if cur is not None and cur.deploy.deploy_id == deploy_id and cur.outcome is None:
            if cur.phase == "held":
                return cur
            raise CommandRejectedError(
                f"{kind} of deploy {deploy_id}: it is {cur.phase}, not held; {kind} applies only to a deploy "
                "held after its health check (send it again once the device reports phase held)"
            )
        verb = "roll back" if kind == "rollback" else kind
        if deploy_id in self.record.ended or (cur is not None and cur.deploy.deploy_id == deploy_id):
            how = self.record.how.get(deploy_id)
            text = f"{kind} of deploy {deploy_id}: it has ended ({how or 'committed, rolled back or failed'}); nothing to {verb}"
            if kind == "rollback" and how in (None, "committed"):
                text += "; a committed release raised the anti-rollback floor: ship a newer release to replace it"
            raise CommandRejectedError(text)
        raise CommandRejectedError(f"{kind} of deploy {deploy_id}: no such deploy on this device; nothing to {verb}")

    def commit(self, deploy_id: str) -> dict[str, Any]:
        """Handle a ``commit`` command: confirm a held deploy (``ota_committed``); the ``command_done`` detail.

        Raises:
            CommandRejectedError: that deploy is not held on this device (unknown, running, ended).
        """
        with self._lock:
            cur = self._held_deploy(deploy_id, "commit")
            log.info("deploy %s (release %d): committed by the console", deploy_id, cur.deploy.release)
            self._commit_trial(cur, None, None)
            job = self._job
        if job is not None:
            job.wake.set()
        return {"deploy_id": deploy_id, "committed": True}

    def rollback(self, deploy_id: str) -> dict[str, Any]:
        """Handle a ``rollback`` command: the old slot serves again, the sha256 is marked bad.

        Reports ``ota_rolled_back`` with reason ``console_rollback``; returns the
        ``command_done`` detail.

        Raises:
            CommandRejectedError: that deploy is not held on this device (a committed one included).
        """
        with self._lock:
            cur = self._held_deploy(deploy_id, "rollback")
            message = f"deploy {deploy_id} (release {cur.deploy.release}) was held and rolled back by the console"
            log.warning("%s", message)
            # Outcome first: a kill -9 after it leaves an unadopted trial, which the next
            # start-up's recovery rolls back, and the recorded outcome is then reported.
            self._mark_bad(cur.deploy.sha256)
            self._decide(cur, "ota_rolled_back", "console_rollback", message, emit=False)
            rollback_trial(self.data, message)
            self._serve_active()
            self._emit(cur)
            job = self._job
        if job is not None:
            job.wake.set()
        return {"deploy_id": deploy_id, "rolled_back": True}

    def _serve_active(self) -> None:
        """After a rollback: serve the (old) active slot again."""
        agent = self.agent
        state = self.data.load_state()
        info = state.slots.get(state.active) if state.active else None
        if agent is None or state.active is None or info is None:
            return
        try:
            model = LoadedModel.from_installed(
                self.data.slot_path(state.active).read_bytes(),
                info.sha256,
                source=str(self.data.slot_path(state.active)),
                revoked=TrustStore(self.data).revoked(),  # a rollback target signed by a revoked key is not served
            )
        except (OSError, EdgeopsError) as exc:
            # The rolled-back trial model must not go on answering while the state says the old
            # slot is active: serve nothing, as a start-up with that slot would.
            agent.flush_drift()
            agent._stop_serving(f"the previous slot {state.active} cannot be served after the rollback: {exc}")
            self._state_changed()
            return
        self._serve(model)

    # -- outcomes ------------------------------------------------------------------------------

    def _mark_bad(self, sha256: str) -> None:
        with self._lock:
            if sha256 not in self.record.bad:
                self.record.bad.append(sha256)
            self._save()

    def _decide(self, cur: _Current, kind: str, reason: str | None, message: str | None, *, emit: bool = True) -> None:
        """Record the outcome (durably), then report it once."""
        with self._lock:
            if cur.outcome is None:
                outcome = OtaOutcome(
                    type=kind, deploy_id=cur.deploy.deploy_id, release=cur.deploy.release, reason=reason, message=message
                )
                cur.outcome = {"type": outcome.type, "reason": outcome.reason, "message": outcome.message}
                self._save()
            if emit:
                self._emit(cur)

    def _emit(self, cur: _Current) -> None:
        assert cur.outcome is not None
        d = cur.deploy
        outcome = OtaOutcome(deploy_id=d.deploy_id, release=d.release, **cur.outcome)
        self._put_final(outcome)
        with self._lock:
            cur.emitted, cur.phase = True, "ended"
            phase = {"ota_committed": "committed", "ota_rolled_back": "rolled_back"}.get(outcome.type, "failed")
            received = d.block_count if phase != "failed" else min(self._received, d.block_count)
            self.record.last = OtaProgress(d.deploy_id, d.release, phase, received, d.block_count).to_dict()
            if d.deploy_id not in self.record.ended:
                self.record.ended.append(d.deploy_id)
            self.record.how[d.deploy_id] = phase
            if self.record.current is cur:
                self.record.current = None
            self._save()
        if phase == "failed":  # a failed deploy's blocks are of no further use
            for suffix in (".part", ".journal"):
                with contextlib.suppress(OSError):
                    (self.data.root / OTA_DIR / f"{d.deploy_id}{suffix}").unlink()
        self._state_changed()

    def _put_final(self, outcome: OtaOutcome) -> None:
        detail = {k: getattr(outcome, k) for k in ("deploy_id", "release", "reason", "message")}
        self._put_event(outcome.type, detail, f"ota-final:{outcome.deploy_id}")

    def _event(self, kind: str, detail: Mapping[str, Any]) -> None:
        try:
            self._put_event(kind, detail, None)
        except (MessageError, AgentError) as exc:
            log.error("event %s not queued: %s", kind, exc)

    def _progress(self, job: _Job, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._progress_at < PROGRESS_INTERVAL_S:
            return
        self._progress_at = now
        progress = self.progress()
        if progress is None or job.current.outcome is not None:
            return
        self._event("ota_progress", progress)
        self._state_changed()
