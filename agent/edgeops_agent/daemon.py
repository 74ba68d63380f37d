"""``edgeops-agent run``: the agent as a long-running process.

Wires the pieces: the :class:`Agent` (model, drift), the outbox, the MQTT link, the local
socket endpoint, a telemetry timer and the command worker. Everything the device says goes
through the outbox, built by the wire types of :mod:`edgeops_core.messages`: the retained
``state`` (on every (re)connect and after every change), ``telemetry`` every
``interval_s``, ``events`` as they happen, ``samples`` on request.

Commands: paho's network thread parses nothing; it only enqueues the raw payload into a
bounded queue (:data:`COMMAND_QUEUE`); one worker thread parses, de-duplicates (the
:class:`~edgeops_agent.commands.CommandJournal`), runs the handler registered for the
command's type and records its progress (received → running → done/failed) in
``<data>/commands.sqlite``. A payload that finds the queue full is refused unprocessed and
counted. Malformed commands get a ``command_rejected`` event each, at most
:data:`REJECT_EVENTS_PER_S` per second; the refused and the unreported are summed into one
``commands_overloaded`` event per second, so a flood of bad commands cannot flood the
outbox in turn.

The daemon holds the data directory's lock (:meth:`DataDir.lock`) from start to exit: a
second process on the same directory is refused.

SIGTERM/SIGINT stop it cleanly (exit 0): a final ``online: false`` state is queued and given
a moment to leave, then the client disconnects. A kill -9 leaves the broker to publish the
Last Will.

Over-the-air updates (:mod:`edgeops_agent.updater`, ADR 0012): ``deploy`` commands go to the
:class:`~edgeops_agent.updater.Updater`, which runs each deploy on its own thread; the link
hands ``ota_block`` frames to it through a bounded queue and its block requests go out
directly, never through the outbox. Start-up counts a start-up of a trial (a crash loop
rolls back before the model loads) and resumes an unfinished deploy once connected.
``commit`` and ``rollback`` end a held deploy (issue 9); for a deploy that is not held they
are answered ``command_rejected`` (:class:`~edgeops_agent.errors.CommandRejectedError`).
``trust_update`` goes to the trust store (:class:`~edgeops_agent.trust.TrustStore`, verified
whole before anything is written): ``trust_updated`` (with a ``warning`` when a file after
the journal's commit point could not be written), or ``trust_update_refused`` and
``command_failed`` (nothing changed); either way, an active model whose key is now revoked
stops serving (ADR 0018).

Test-only: ``EDGEOPS_AGENT_FAULT`` (:mod:`edgeops_agent.fault`) is parsed before anything
starts; a malformed value stops the start with one :class:`ConfigError` line.

Under a service manager (:mod:`edgeops_agent.service`): ``READY=1`` once the model is loaded,
the endpoint serves and a first probe inference answered; ``WATCHDOG=1`` while probes keep
answering (when ``$WATCHDOG_USEC`` asks for it); ``STOPPING=1`` first thing on shutdown.
With ``[metrics]`` (:mod:`edgeops_agent.metrics`, imported only then) an HTTP listener
serves ``/metrics`` and ``/healthz`` (:meth:`Daemon.health`); it is bound before anything
else starts, so an address in use stops the start with one :class:`MetricsError`.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edgeops_agent.agent import Agent
from edgeops_agent.commands import CommandJournal
from edgeops_agent.config import AgentConfig
from edgeops_agent.errors import AgentError, CommandRejectedError, ConfigError
from edgeops_agent.fault import fault_from_environ
from edgeops_agent.identity import Identity, IdentityError, Renewal
from edgeops_agent.mqtt import MqttLink
from edgeops_agent.outbox import Outbox, Pending
from edgeops_agent.server import EndpointServer
from edgeops_agent.service import Notifier, ServiceMonitor, status_text, watchdog_timeout_s
from edgeops_agent.store import DataDir
from edgeops_agent.trust import TrustStore
from edgeops_agent.updater import Updater
from edgeops_core import (
    Command,
    CommandError,
    Event,
    MessageError,
    ModelRef,
    Samples,
    State,
    Telemetry,
    device_topic,
    parse_command,
    utc_now_text,
)
from edgeops_core.messages import DEFAULT_SAMPLE_ROWS
from edgeops_core.trust import TrustError, trust_update_args

if TYPE_CHECKING:
    from edgeops_agent.metrics import MetricsServer

__all__ = ["COMMAND_QUEUE", "HANDLERS", "REJECT_EVENTS_PER_S", "CommandFailedError", "Daemon"]

log = logging.getLogger(__name__)

#: Commands waiting for the worker; past this, new ones are refused and counted.
COMMAND_QUEUE = 256
#: Individual ``command_rejected`` events per second; the rest are summarised.
REJECT_EVENTS_PER_S = 10


class CommandFailedError(AgentError):
    """A command handler could not do what the command asked (reported as ``command_failed``)."""


Handler = Callable[["Daemon", Command], Mapping[str, Any]]


def _ping(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    return {}


def _status(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    daemon.publish_state()
    return {}


def _sample_upload(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    # max_rows was checked with the command (0..MAX_SAMPLE_ROWS); absent or 0 is the default.
    picked = daemon.agent.samples(int(cmd.args.get("max_rows", 0)) or DEFAULT_SAMPLE_ROWS)
    model = picked.model  # the model the rows belong to, even if another was activated since
    message = Samples(
        device_id=daemon.config.device_id,
        ts=utc_now_text(),
        command_id=cmd.id,
        model=ModelRef(model.manifest.name, model.manifest.release) if model else None,
        feature_names=tuple(model.manifest.feature_names) if model else (),
        rows=picked.wire_rows(),
        labels=picked.labels,
        label_names=tuple(model.labels) if model else (),
        scores=picked.wire_scores(),
    )
    daemon.outbox.put(daemon.topics["samples"], message.to_dict())
    return {"rows": len(message.rows), "labelled": len(message.labels) - message.labels.count(None)}


def _deploy(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    # The deploy's own events (ota_progress, one final ota_*) say how it goes; command_done
    # only says whether it was taken on.
    return daemon.updater.deploy(cmd.id, cmd.args)


def _commit(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    return daemon.updater.commit(str(cmd.args["deploy_id"]))


def _rollback(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    return daemon.updater.rollback(str(cmd.args["deploy_id"]))


def _trust_update(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    # Everything is verified before a byte is written: a refusal changes nothing trusted. A
    # disk error after the journal's commit point is no refusal: the update is applied, with
    # a warning (TrustStore._write).
    stopped: str | None = None
    try:
        try:
            update = TrustStore(daemon.data).update(*trust_update_args(cmd.args))
        except (TrustError, AgentError) as exc:  # refused, or the journal could not be written
            daemon._event("trust_update_refused", {"id": cmd.id, "reason": str(exc)})
            raise CommandFailedError(f"trust_update refused: {exc}") from exc
    finally:
        # Whatever the outcome: finishing an earlier update's journal may have revoked a key too.
        stopped = daemon.agent.enforce_revocations()  # ADR 0018: a revoked active bundle stops serving
        if stopped:
            daemon.publish_state()
    detail = update.detail()
    daemon._event("trust_updated", {"id": cmd.id, "source": "command", **detail, "active_revoked": stopped})
    return detail


def _renewal(daemon: Daemon) -> Renewal:
    if daemon.renewal is None:
        raise CommandRejectedError("this agent does not connect over TLS ([mqtt] tls): it has no certificate to renew")
    return daemon.renewal


def _renew_cert(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    try:
        return _renewal(daemon).request("requested", cmd.id)
    except IdentityError as exc:
        raise CommandFailedError(str(exc)) from exc


def _install_cert(daemon: Daemon, cmd: Command) -> Mapping[str, Any]:
    try:
        return _renewal(daemon).install(str(cmd.args["certificate"]))
    except IdentityError as exc:
        raise CommandFailedError(str(exc)) from exc


#: One handler per command type; each returns the ``command_done`` detail or raises
#: :class:`CommandFailedError` (``command_failed``) or :class:`CommandRejectedError`
#: (``command_rejected``: the command does not apply now, e.g. a commit of a deploy not held).
HANDLERS: dict[str, Handler] = {
    "ping": _ping,
    "status": _status,
    "sample_upload": _sample_upload,
    "deploy": _deploy,
    "commit": _commit,
    "rollback": _rollback,
    "trust_update": _trust_update,
    "renew_cert": _renew_cert,
    "install_cert": _install_cert,
}


class Daemon:
    """One running agent process."""

    def __init__(self, config: AgentConfig, *, endpoint: bool = True) -> None:
        """Open the data directory, the outbox, the command journal and the active model.

        ``endpoint=False`` leaves out the local socket endpoint: for callers in the same
        process that use :attr:`agent` directly (the fleet simulator's devices).

        Raises:
            DataDirLockedError: another process works on the data directory.
            StateCorruptedError, BundleError, AgentError: the agent cannot start.
        """
        self.config = config
        self._serve_endpoint = endpoint
        fault = fault_from_environ()  # test-only; a malformed value stops the start (one line)
        self.data = DataDir(config.data_dir)
        # One process per data directory, for the daemon's whole life (installs it runs nest).
        self._hold = self.data.lock("daemon")
        try:
            self._open(config)
            if fault is not None:
                log.warning("test-only fault injection is on: %s", fault)
                self.agent.injected_fault = fault
        except BaseException:
            self._hold.release()
            raise

    def _open(self, config: AgentConfig) -> None:
        state = self.data.load_state()
        if state.target is None:
            state.target = config.target
            self.data.save_state(state)
        elif state.target != config.target:
            raise ConfigError(
                f"agent config says target {config.target!r}, but {config.data_dir} belongs to a {state.target!r} device"
            )
        self.outbox = Outbox(self.data.outbox_path, cap=config.outbox_max_messages)
        self.journal = CommandJournal(self.data.outbox_path.with_name("commands.sqlite"))
        prefix, dev = config.mqtt.prefix, config.device_id
        self.topics = {leaf: device_topic(prefix, dev, leaf) for leaf in ("state", "telemetry", "events", "samples")}
        self.updater = Updater(
            self.data,
            config.ota,
            device_id=dev,
            target=config.target,
            put_event=self._put_event,
            publish_direct=lambda topic, message: self.link.publish_direct(topic, message),
            request_topic=device_topic(prefix, dev, "ota_request"),
            state_changed=self.publish_state,
        )
        self.updater.before_agent()  # a crash-looping trial is rolled back before its model loads
        self.agent = Agent(
            self.data,
            device_id=config.device_id,
            drift=config.drift,
            on_event=self._event,
            anomaly_event_s=config.anomaly_event_s,
        )
        self.updater.agent = self.agent
        # The Last Will is composed now and published by the broker later: no time, no seq.
        offline = {**self._state(online=False), "ts": None, "seq": None}
        self._will = offline
        tls = config.mqtt.tls
        identity = Identity(tls, dev, self.data.root / "tls") if tls is not None else None
        self.link = MqttLink(
            config.mqtt,
            dev,
            self.outbox,
            offline_state=offline,
            on_command=self._enqueue,
            on_quarantine=self._quarantined,
            on_connected=self.publish_state,
            on_block=self.updater.on_block,
            tls_context=identity.context if identity is not None else None,
        )
        self.renewal: Renewal | None = None
        if identity is not None:
            csr_topic = device_topic(prefix, dev, "csr")
            self.renewal = Renewal(
                identity,
                publish=lambda message: self.link.publish_direct(csr_topic, message),
                put_event=self._put_event,
                use_context=self.link.set_tls_context,
                reconnect=self.link.reconnect,
                connects=lambda: self.link.connects,
                connected=self.link.connected,
            )
        self.outbox.on_health = self._outbox_health
        self.stopping = False
        self.metrics: MetricsServer | None = None
        if config.metrics is not None:
            # Only here: an agent without [metrics] never imports prometheus_client.
            from edgeops_agent.metrics import MetricsServer

            self.metrics = MetricsServer(config.metrics, self)  # binds now: an address in use stops the start
        self.notifier = Notifier.from_environ()
        watchdog = watchdog_timeout_s() if self.notifier.enabled else None
        # The probe runs only when someone hears of it: a service manager (READY=1 waits for the
        # first probe; the watchdog and STATUS= for the rest) or /healthz.
        probed = self.notifier.enabled or config.metrics is not None
        self.monitor = ServiceMonitor(self.agent, self.notifier, watchdog_s=watchdog) if probed else None
        self.server = EndpointServer(config.socket or self.data.socket_path, self.agent)
        self._stop = threading.Event()
        self._commands: queue.Queue[bytes | None] = queue.Queue(maxsize=COMMAND_QUEUE)
        self._refused = 0  # payloads refused because the queue was full, not yet reported
        self._unreported = 0  # malformed/refused commands past the per-second event budget
        self._budget, self._window = REJECT_EVENTS_PER_S, time.monotonic()
        self._count_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="edgeops-commands", daemon=True)
        for cid, ctype in self.journal.interrupted():
            self._event("command_failed", {"id": cid, "type": ctype, "message": "interrupted: the agent stopped"})

    # messages ------------------------------------------------------------------------------

    def _put_event(self, kind: str, detail: Mapping[str, Any], once: str | None = None) -> None:
        """Queue an event (``once``: only if that key was never used; see :meth:`Outbox.put`).

        Raises:
            MessageError: the event is invalid.
            AgentError: the outbox refused it (e.g. a full disk).
        """
        message = Event(device_id=self.config.device_id, ts=utc_now_text(), type=kind, detail=detail)
        self.outbox.put(self.topics["events"], message.to_dict(), once=once)

    def _event(self, kind: str, detail: Mapping[str, Any]) -> None:
        try:
            self._put_event(kind, detail)
        except (MessageError, AgentError) as exc:  # a full disk or a bug: say so, keep serving
            log.error("event %s not queued: %s", kind, exc)
            return
        if kind in ("install_activated", "drift_alarm", "drift_cleared"):
            self.publish_state()
        if kind == "install_activated":
            self.notifier.status(status_text(self.agent))

    def _state(self, *, online: bool) -> dict[str, Any]:
        raw = dict(self.agent.state_message(online=online))
        raw["ota"] = self.updater.progress()
        raw["tags"] = dict(self.config.tags)
        if not self.outbox.healthy:
            raw["health"] = "degraded"
            raw["last_error"] = self.outbox.last_error or raw.get("last_error")
        # Composed once before the link exists (the first Last Will); a refused CONNECT after that.
        link_error = self.link.last_error if hasattr(self, "link") else None
        if link_error:
            raw["last_error"] = link_error
        return State.from_dict(raw).to_dict()

    def _outbox_health(self, healthy: bool, error: str | None) -> None:
        """The outbox lost or regained its disk: tell the console either way."""
        if healthy:
            self.publish_state()  # through the outbox again, in its lane
            return
        # The outbox cannot take the news of its own failure: send it directly (best effort).
        try:
            self.link.publish_direct(self.topics["state"], self._state(online=True), retain=True)
        except (MessageError, AgentError) as exc:
            log.error("degraded state not sent: %s (outbox: %s)", exc, error)

    def _quarantined(self, message: Pending, code: int, reason: str) -> None:
        # A refused report of a refusal would be refused again: count it, do not re-report.
        if message.topic == self.topics["events"] and b'"type":"outbox_quarantined"' in message.payload:
            return
        detail = {"seq": message.seq, "topic": message.topic, "reason_code": code, "reason": reason}
        self._event("outbox_quarantined", detail)

    def publish_state(self, *, online: bool = True) -> None:
        """Queue the retained state message; hand the broker a new Last Will if the bundle changed."""
        try:
            message = self._state(online=online)
            self.outbox.put(self.topics["state"], message, retain=True)
        except (MessageError, AgentError) as exc:
            log.error("state not queued: %s", exc)
            return
        will = {**message, "online": False, "ts": None, "seq": None}
        link = getattr(self, "link", None)
        # Only a change of what runs re-sends the Will: the link reconnects to do it.
        if online and link is not None and (will["bundle"], will["runtime"]) != (self._will["bundle"], self._will["runtime"]):
            self._will = will
            link.set_will(will)

    def health(self) -> str | None:
        """Why the agent is not fit to serve (``/healthz`` answers 503 with it), or ``None``.

        Fit means: a model is loaded, the outbox's last write succeeded (so what the device
        says is kept), the serving probe answers (not stuck, not raising), and the agent is
        not stopping.
        """
        if self.stopping:
            return "the agent is stopping"
        if self.agent.model is None:
            return self.agent.fault or "no model is installed (edgeops-agent install BUNDLE)"
        if not self.outbox.healthy:
            return f"the outbox is not writable: {self.outbox.last_error or 'its last write failed'}"
        return self.monitor.problem() if self.monitor is not None else None

    def _telemetry(self, interval: float) -> None:
        try:
            s = self.outbox.stats()
            box = {"pending": s.pending, "dropped": s.dropped, "quarantined": s.quarantined, "superseded": s.superseded}
            message = Telemetry.from_dict({**self.agent.telemetry(interval), "outbox": box})
            self.outbox.put(self.topics["telemetry"], message.to_dict())
        except (MessageError, AgentError) as exc:
            log.error("telemetry not queued: %s", exc)

    # commands ------------------------------------------------------------------------------

    def _enqueue(self, payload: bytes) -> None:
        """paho's network thread: hand the payload over, never block, never raise."""
        try:
            self._commands.put_nowait(payload)
        except queue.Full:
            with self._count_lock:
                self._refused += 1

    def _reject(self, detail: dict[str, Any]) -> None:
        """A ``command_rejected`` event, within the per-second budget; past it, counted."""
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._budget, self._window = REJECT_EVENTS_PER_S, now
        if self._budget > 0:
            self._budget -= 1
            self._event("command_rejected", detail)
        else:
            self._unreported += 1

    def _report_overload(self) -> None:
        """At most once a second: one ``commands_overloaded`` with what was refused or not reported."""
        with self._count_lock:
            refused, self._refused = self._refused, 0
        unreported, self._unreported = self._unreported, 0
        if refused or unreported:
            log.warning("command overload: %d refused (queue full), %d rejections not reported", refused, unreported)
            self._event(
                "commands_overloaded",
                {"refused": refused, "rejected_unreported": unreported, "queue": COMMAND_QUEUE},
            )

    def _work(self) -> None:
        last_report = time.monotonic()
        while True:
            # Idle, the worker sleeps until a command comes (no polling: a device on a battery
            # sleeps too); with an overload to report, at most until its one-second turn.
            with self._count_lock:
                owed = self._refused or self._unreported
            timeout = max(0.0, last_report + 1.0 - time.monotonic()) if owed else None
            try:
                payload = self._commands.get(timeout=timeout)
            except queue.Empty:
                payload = b""
            if payload is None:
                break
            if payload:
                try:
                    self._handle(payload)
                except Exception:  # a handler bug must not end the worker
                    log.exception("command handler failed")
            if time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                self._report_overload()
        self._report_overload()

    def _handle(self, payload: bytes) -> None:
        try:
            cmd = parse_command(payload)
        except CommandError as exc:
            self._reject({"error": type(exc).__name__, "message": str(exc)})
            return
        try:
            if not self.journal.receive(cmd):
                log.info("duplicate command %s ignored", cmd.id)
                return
        except AgentError as exc:  # stale, journal full, or the disk
            self._reject({"id": cmd.id, "error": type(exc).__name__, "message": str(exc)})
            return
        self._mark(cmd.id, "running")
        try:
            detail = HANDLERS[cmd.type](self, cmd)
        except CommandRejectedError as exc:
            self._mark(cmd.id, "failed", str(exc))
            self._reject({"id": cmd.id, "type": cmd.type, "error": type(exc).__name__, "message": str(exc)})
            return
        except (AgentError, MessageError) as exc:  # CommandFailedError, a full disk, a bad sample
            self._mark(cmd.id, "failed", str(exc))
            self._event("command_failed", {"id": cmd.id, "type": cmd.type, "error": type(exc).__name__, "message": str(exc)})
            return
        self._mark(cmd.id, "done")
        self._event("command_done", {"id": cmd.id, "type": cmd.type, **detail})

    def _mark(self, command_id: str, status: str, error: str | None = None) -> None:
        try:
            self.journal.mark(command_id, status, error)
        except AgentError as exc:  # a full disk: the command still runs; its progress is not recorded
            log.error("%s", exc)

    # life cycle ----------------------------------------------------------------------------

    def _ready(self) -> None:
        self.notifier.ready(status_text(self.agent))

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
            signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self._worker.start()
        if self._serve_endpoint:
            self.server.start()
        if self.metrics is not None:
            self.metrics.start()
        self.link.start()
        self.updater.resume(self.agent)
        interval = self.config.telemetry_interval_s
        try:
            if self.monitor is not None:
                # One probe first (a model that hangs never reports ready), READY=1, then pings.
                self.monitor.start(on_ready=self._ready)
            else:
                self._ready()
            while not self._stop.wait(interval):
                self.agent.flush_drift()
                self._telemetry(interval)
                self._check_certificate()
        finally:
            self.shutdown()

    def _check_certificate(self) -> None:
        if self.renewal is None or not self.link.connected.is_set():
            return
        try:
            self.renewal.check()
        except IdentityError as exc:  # e.g. the new key cannot be stored: asked again later
            log.error("certificate renewal: %s", exc)

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    def shutdown(self) -> None:
        """Say goodbye (state offline), stop serving, disconnect."""
        self.stopping = True
        if self.monitor is not None:
            self.monitor.stop()  # no ping may follow STOPPING=1
        self.notifier.stopping("stopping: saying goodbye to the broker")
        if self.metrics is not None:
            self.metrics.stop()
        if self._serve_endpoint:
            self.server.stop()
        else:  # bound but never served: close the socket all the same
            self.server.server_close()
            self.server.path.unlink(missing_ok=True)
        self.updater.stop()
        if self._worker.is_alive():
            # Commands still queued are dropped unprocessed: the journal never recorded them,
            # so the console may send them again and they will be acted on.
            while True:
                try:
                    self._commands.get_nowait()
                except queue.Empty:
                    break
            self._commands.put(None)
            self._worker.join(timeout=5)
        self.publish_state(online=False)
        if self.link.connected.is_set():
            for _ in range(40):  # up to 2 s for the outbox to drain
                try:
                    if self.outbox.stats().pending == 0:
                        break
                except AgentError:
                    break
                time.sleep(0.05)
        self.link.stop()
        self.outbox.close()
        self.journal.close()
        self.notifier.close()
        self._hold.release()
