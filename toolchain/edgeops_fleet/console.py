"""The fleet console service behind ``edgeops fleet serve`` (issue 9).

One process, a handful of threads around one :class:`~edgeops_fleet.store.Store`::

    broker ──<prefix>/+/state|telemetry|events (QoS 1, manual acks)──▶ bounded queue
           ──▶ ingest thread: parse (edgeops_core) → batch → Store.ingest (one transaction)
                              → only then PUBACK every message of the batch
    broker ──<prefix>/+/ota_request──▶ the BlockServer of that deploy ──▶ <id>/ota_block
    tick thread: RolloutEngine.tick() every second (resume_all() once at start)
    HTTP thread: uvicorn serving api.create_app (JSON API + dashboard)

The MQTT session is persistent and never cleaned: a fixed client id (``edgeops-console``),
``clean_start`` off on every connect, a session expiry of 7 days. The broker therefore keeps
queueing every QoS-1 message for the console while it is down.

Invariants:

- A QoS-1 message is acknowledged only after the transaction that stored it (or recorded it
  as a reject) committed. A console killed with SIGKILL loses nothing: the broker redelivers
  every unacknowledged message, and the store drops what it already has by ``(device, seq)``.
- An acknowledgement is only ever sent on the connection the message arrived on (packet ids
  are per connection); after a reconnect the broker redelivers what was not acknowledged.
- A payload that does not parse, names another device than its topic, or carries an unknown
  schema version is recorded with :meth:`Store.reject` and acknowledged; it never becomes
  data and never stops the ingest.
- The database being locked or unreachable stops the acknowledgements, not the console: the
  ingest thread retries the same batch (logging one line per outage) until it commits.

The console is the rollout engine's :class:`~edgeops_fleet.rollout.RolloutLink`: it publishes
deploy, commit and rollback commands (QoS 1) and serves the blocks of every offered deploy.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgeops_core import (
    DEFAULT_PREFIX,
    BlockRequest,
    Deploy,
    Event,
    InputError,
    MessageError,
    Samples,
    State,
    Telemetry,
    check_device_id,
    deploy_command,
    device_topic,
    parse_topic,
)
from edgeops_core._json import load_untrusted_json
from edgeops_fleet.certs import CertificateSigner
from edgeops_fleet.errors import BrokerError, FleetError, SenderError, StoreError
from edgeops_fleet.link import BrokerUrl, new_client
from edgeops_fleet.ota import BlockServer
from edgeops_fleet.store import MAX_DB_INT, Incoming, Store

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    import uvicorn

    from edgeops_fleet.autopilot import Autopilot
    from edgeops_fleet.rollout import RolloutEngine

__all__ = [
    "BATCH_MAX",
    "BATCH_WAIT_S",
    "CONSOLE_CLIENT_ID",
    "DEFAULT_HTTP",
    "SESSION_EXPIRY_S",
    "Console",
    "default_bundles_dir",
    "is_loopback",
    "keep_samples",
    "parse_http_address",
]

log = logging.getLogger(__name__)

#: The console's MQTT client id: fixed, so its broker session outlives a restart.
CONSOLE_CLIENT_ID = "edgeops-console"
#: How long the broker keeps the console's session (and queues its messages) while it is away.
SESSION_EXPIRY_S = 7 * 24 * 3600
#: Where the HTTP API and dashboard listen by default (loopback: no token needed).
DEFAULT_HTTP = ("127.0.0.1", 8780)
#: Most messages stored in one transaction, and the longest a message waits for its batch.
BATCH_MAX = 500
BATCH_WAIT_S = 0.05
#: QoS-1 messages the broker may have in flight to the console (MQTT 5 Receive Maximum);
#: the queue holds at least that many, so paho's network thread never waits on it.
RECEIVE_MAXIMUM = 2000
_QUEUE_SIZE = 2 * RECEIVE_MAXIMUM
_LEAVES = ("state", "telemetry", "events", "ota_request", "samples", "csr")
#: Sample uploads waiting to be stored (each may be a few hundred kB; they are rare).
_SAMPLES_QUEUE = 64
_KINDS = {"state": "state", "telemetry": "telemetry", "events": "event"}


def default_bundles_dir() -> Path:
    """``$EDGEOPS_HOME/console-bundles`` (``~/.edgeops`` when ``EDGEOPS_HOME`` is unset)."""
    home = os.environ.get("EDGEOPS_HOME")
    return (Path(home) if home else Path.home() / ".edgeops") / "console-bundles"


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → ``(host, port)``.

    Raises:
        InputError: no port, a port outside 0..65535, or no host.
    """
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InputError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8780")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` resolves to loopback addresses only (``localhost``, 127.0.0.0/8, ::1)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


@dataclass(frozen=True)
class _Received:
    """One message as paho handed it over, with what is needed to acknowledge it later."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it arrived on
    received_at: float


class _RateLimit:
    """At most ``burst`` log lines per ``window_s``; the rest are counted and summed up later."""

    def __init__(self, *, burst: int = 10, window_s: float = 60.0) -> None:
        self.burst, self.window_s = burst, window_s
        self._start = -window_s
        self._count = 0
        self._suppressed = 0

    def allow(self, now: float) -> bool:
        """Whether a line may be logged at ``now`` (logs the suppressed count when a window opens)."""
        if now - self._start >= self.window_s:
            if self._suppressed:
                log.info("%d more rejected message(s) not logged in the last %.0f s", self._suppressed, self.window_s)
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            return True
        self._suppressed += 1
        return False


class _Serving:
    """The block server of one offered deploy and the devices it serves."""

    def __init__(self, server: BlockServer, devices: frozenset[str], bundle_path: Path) -> None:
        self.server, self.devices, self.bundle_path = server, devices, bundle_path


class Console:
    """The fleet console service (see the module docstring).

    Args:
        broker: where the broker listens.
        store: the opened store (the caller closes it after :meth:`stop`).
        prefix: the topic prefix.
        http: ``(host, port)`` for the HTTP API and dashboard, or ``None`` for none.
        token: the API token, required when ``http`` is not a loopback address.
        bundles_dir: where verified rollout bundles are kept (``<sha256>.edgeops``).
        client_id: the MQTT client id (one per console: it names the broker session).
        connect_timeout_s: how long :meth:`start` waits for the broker.
        tick_s: how often the rollout engine advances.
        work_dir: where autopilot runs keep their datasets and builds (default ``$EDGEOPS_HOME/autopilot``).
        ca: the fleet CA folder: the console then signs the devices' certificate renewals
            (:mod:`edgeops_fleet.certs`); ``None``: renewal requests are ignored.

    Raises:
        InputError: a non-loopback ``http`` without a token, or a token with whitespace.
    """

    def __init__(
        self,
        broker: BrokerUrl,
        store: Store,
        *,
        prefix: str = DEFAULT_PREFIX,
        http: tuple[str, int] | None = DEFAULT_HTTP,
        token: str | None = None,
        bundles_dir: Path | None = None,
        client_id: str = CONSOLE_CLIENT_ID,
        connect_timeout_s: float = 10.0,
        tick_s: float = 1.0,
        work_dir: Path | None = None,
        ca: Path | None = None,
    ) -> None:
        """Check the configuration; nothing connects until :meth:`start`."""
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise InputError("the console token must be a non-empty string without whitespace")
        if http is not None and token is None and not is_loopback(http[0]):
            raise InputError(
                f"refusing to serve HTTP on {http[0]}:{http[1]} without a token: anything but loopback needs "
                "--token TOKEN (or $EDGEOPS_CONSOLE_TOKEN)"
            )
        if not client_id or len(client_id) > 64:
            raise InputError(f"the MQTT client id must be 1-64 characters, got {client_id!r}")
        from edgeops_fleet.autopilot import Autopilot
        from edgeops_fleet.rollout import RolloutEngine

        self.broker, self.store, self.prefix = broker, store, prefix
        self.http, self.token = http, token
        self.bundles_dir = bundles_dir if bundles_dir is not None else default_bundles_dir()
        self.client_id = client_id
        self.connect_timeout_s, self.tick_s = connect_timeout_s, tick_s
        self.engine: RolloutEngine = RolloutEngine(store, self, prefix=prefix)
        self.autopilot: Autopilot = Autopilot(store, self, self.engine, bundles_dir=self.bundles_dir, work_dir=work_dir)
        self._samples: queue.Queue[_Received] = queue.Queue(maxsize=_SAMPLES_QUEUE)
        self._queue: queue.Queue[_Received] = queue.Queue(maxsize=_QUEUE_SIZE)
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._serving: dict[str, _Serving] = {}
        self._serving_lock = threading.Lock()
        self._http_server: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._http_address: tuple[str, int] | None = None
        self._reject_log = _RateLimit()
        self.signer: CertificateSigner | None = None
        if ca is not None:
            self.signer = CertificateSigner(ca, prefix, lambda device_id, payload: self.command(device_id, payload))
        self.counters = {
            "received": 0, "stored": 0, "duplicates": 0, "rejected": 0, "acked": 0, "db_errors": 0, "samples_dropped": 0,
        }  # fmt: skip
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The bound HTTP ``(host, port)`` once started (port 0 resolved), else ``None``."""
        return self._http_address

    def info(self) -> dict[str, Any]:
        """What ``GET /api/health`` reports about this console."""
        return {
            "broker": str(self.broker),
            "prefix": self.prefix,
            "client_id": self.client_id,
            "connected": self._connected.is_set(),
            "queued": self._queue.qsize(),
            "serving": sorted(self._serving),
            "counters": dict(self.counters),
            "bundles_dir": str(self.bundles_dir),
        }

    def start(self) -> None:
        """Bind HTTP, connect to the broker, resume rollouts and start every thread.

        Raises:
            BrokerError: the broker does not accept the connection in time.
            FleetError: the HTTP address cannot be bound.
        """
        if self._started:
            return
        self._started = True
        try:
            self.bundles_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FleetError(f"{self.bundles_dir}: cannot create the bundles folder: {exc.strerror or exc}") from exc
        sock = self._bind_http() if self.http is not None else None
        try:
            self._connect()
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self._spawn(self._ingest_loop, "console-ingest")
        try:
            self.engine.resume_all()
        except StoreError as exc:  # the tick thread retries: a rollout is never lost to a busy DB
            log.error("resuming rollouts failed, retrying on the next tick: %s", exc)
        self._spawn(self._samples_loop, "console-samples")
        if self.signer is not None:
            self.signer.start()
        self.autopilot.start()
        self._spawn(self._tick_loop, "console-rollouts")
        if sock is not None:
            self._start_http(sock)

    def stop(self) -> None:
        """Stop HTTP, the engine's ticks, the ingest (after its current batch) and the MQTT link (idempotent).

        The broker session is kept: what arrives while the console is down is queued for it.
        """
        self._stop.set()
        self.autopilot.stop()
        if self.signer is not None:
            self.signer.stop()
        server, self._http_server = self._http_server, None
        if server is not None:
            server.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
            self._http_thread = None
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()
        with self._serving_lock:
            serving, self._serving = self._serving, {}
        for s in serving.values():
            s.server.stop()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            finally:
                client.loop_stop()

    def run_forever(self, *, on_started: Callable[[], None] | None = None) -> None:
        """:meth:`start`, then serve until SIGTERM or SIGINT, then :meth:`stop` (main thread only).

        ``on_started`` runs once everything is up (the CLI prints where the console listens).
        """
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if on_started is not None:
                on_started()
            while not done.wait(0.5):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- HTTP --------------------------------------------------------------------------------

    def _bind_http(self) -> socket.socket:
        assert self.http is not None
        host, port = self.http
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise FleetError(f"cannot bind the HTTP API to {host}:{port}: {exc.strerror or exc}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise FleetError(f"cannot bind the HTTP API to {host}:{port}: {exc.strerror or exc}") from exc
        bound = sock.getsockname()
        self._http_address = (str(bound[0]), int(bound[1]))
        return sock

    def _start_http(self, sock: socket.socket) -> None:
        import uvicorn

        from edgeops_fleet.api import create_app

        app = create_app(
            self.store,
            self.engine,
            token=self.token,
            console_info=self.info,
            bundles_dir=self.bundles_dir,
            autopilot=self.autopilot,
        )
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        server = uvicorn.Server(config)
        self._http_server = server

        def serve() -> None:
            try:
                server.run(sockets=[sock])
            finally:
                sock.close()

        self._http_thread = threading.Thread(target=serve, name="console-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 10
        while not server.started and self._http_thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise FleetError(f"the HTTP API did not start on {self.http}")
        log.info("HTTP API on http://%s:%d", *(self._http_address or ("?", 0)))

    # -- MQTT --------------------------------------------------------------------------------

    def _connect(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        try:  # a refused or unroutable address fails now, not after the whole timeout
            socket.create_connection((self.broker.host, self.broker.port), timeout=min(self.connect_timeout_s, 5.0)).close()
        except OSError as exc:
            raise BrokerError(f"cannot reach the broker at {self.broker}: {exc.strerror or exc}") from exc
        client = new_client(self.broker, self.client_id)
        client.manual_ack_set(True)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_inflight_messages_set(256)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client = client
        try:
            # clean_start False on every connect, the first included: the session is the console's memory.
            client.connect_async(self.broker.host, self.broker.port, keepalive=15, clean_start=False, properties=props)
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to the broker at {self.broker}: {exc}") from exc
        client.loop_start()
        if not self._connected.wait(self.connect_timeout_s):
            client.loop_stop()
            self._client = None
            raise BrokerError(f"the broker at {self.broker} did not accept a connection within {self.connect_timeout_s:g} s")

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("the broker refused the connection: %s", reason)
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        with self._gen_lock:
            self._generation += 1
        # Retained states only for a new subscription: a resumed session gets what it missed anyway.
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe([(f"{self.prefix}/+/{leaf}", options) for leaf in _LEAVES])
        log.info("connected to %s (session %s)", self.broker, "resumed" if flags.session_present else "new")
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            item = _Received(message.topic, bytes(message.payload), message.mid, message.qos, self._generation, time.time())
            if message.topic.endswith("/ota_request"):
                self._take_request(item)
                self._ack([item])
            elif message.topic.endswith("/csr"):
                if self.signer is not None:
                    self.signer.take(item.topic, item.payload)
                elif self._reject_log.allow(time.monotonic()):
                    log.warning("certificate request on %s ignored: this console has no CA (fleet serve --ca DIR)", item.topic)
                self._ack([item])
            elif message.topic.endswith("/samples"):
                try:
                    self._samples.put_nowait(item)
                except queue.Full:  # a flood of uploads: drop (a device can be asked again), never block paho
                    self.counters["samples_dropped"] += 1
                    if self._reject_log.allow(time.monotonic()):
                        log.warning("sample uploads arrive faster than they are stored: one from %s dropped", item.topic)
                    self._ack([item])
            else:
                self._queue.put(item)  # bounded above the broker's in-flight window: does not block
        except Exception:  # paho would re-raise it and end its network thread
            log.exception("message on %s not handled", message.topic)

    def _ack(self, items: Sequence[_Received]) -> None:
        client = self._client
        if client is None:
            return
        with self._gen_lock:
            current = self._generation
        for item in items:
            # A packet id means nothing on a later connection: the broker redelivers those itself.
            if item.qos > 0 and item.generation == current:
                client.ack(item.mid, item.qos)
                self.counters["acked"] += 1

    def _publish(self, topic: str, payload: bytes, *, content_type: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = self._client
        if client is None:
            raise SenderError("the console is stopped")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = content_type
        if content_type == "application/json":
            props.PayloadFormatIndicator = 1
        client.publish(topic, payload, qos=1, properties=props)

    # -- ingest ------------------------------------------------------------------------------

    def _ingest_loop(self) -> None:
        # On stop, what is still queued stays unacknowledged: the broker redelivers it next time.
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + BATCH_WAIT_S
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except queue.Empty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            try:
                if not self._commit(batch):
                    return  # stopping during a database outage: the broker redelivers the batch
            except Exception:
                # A bug must not end ingest for good (nothing would be acknowledged again); the
                # batch stays unacknowledged and comes back on the next connection.
                self.counters["db_errors"] += 1
                log.exception("a batch of %d message(s) could not be stored; it stays unacknowledged", len(batch))

    def _parse(self, item: _Received) -> tuple[Incoming | None, tuple[str, str | None] | None]:
        """``(incoming, None)`` for a valid message, ``(None, (reason, device_id))`` for a reject."""
        try:
            device_id, leaf = parse_topic(self.prefix, item.topic)
        except InputError as exc:
            return None, (f"bad topic: {exc}", None)
        kind = _KINDS.get(leaf)
        if kind is None:
            return None, (f"unexpected topic leaf {leaf!r}", device_id)
        try:
            release: int | None
            message: State | Telemetry | Event
            # Parsed once: the validated document itself is what the store keeps (a to_dict()
            # copy would cost a fifth of the ingest time for the same fields).
            doc = _document(item.payload, kind)
            if kind == "state":
                message = state = State.from_dict(doc)
                release = None if state.bundle is None else state.bundle.release
            elif kind == "telemetry":
                message = telemetry = Telemetry.from_dict(doc)
                release = None if telemetry.model is None else telemetry.model.release
            else:
                message = event = Event.from_dict(doc)
                value = event.detail.get("release")
                release = value if isinstance(value, int) and not isinstance(value, bool) else None
            if message.device_id != device_id:
                raise MessageError(f"the {kind} on {device_id}'s topic names device {message.device_id!r}")
        except MessageError as exc:
            return None, (str(exc), device_id)
        try:
            incoming = Incoming(
                device_id=device_id,
                kind=kind,
                seq=message.seq,
                ts=message.ts,
                received_at=item.received_at,
                payload=doc,
                release=release,
                payload_json=bytes(item.payload).decode(),  # valid UTF-8 JSON: it just parsed
            )
        except StoreError as exc:  # a message the store's own checks refuse is a reject too
            return None, (str(exc), device_id)
        return incoming, None

    def _commit(self, batch: Sequence[_Received]) -> bool:
        """Store (or reject) the batch, then acknowledge it; ``False`` if stopped before it committed."""
        self.counters["received"] += len(batch)
        incoming: list[tuple[Incoming, _Received]] = []
        rejects: list[tuple[_Received, str, str | None]] = []
        for item in batch:
            good, bad = self._parse(item)
            if good is not None:
                incoming.append((good, item))
            elif bad is not None:
                rejects.append((item, *bad))
        outage_since: float | None = None
        delay = 0.5
        singly = False
        while True:
            try:
                if singly:
                    self._store_singly(incoming, rejects)
                else:
                    self._store_all(incoming, rejects)
                break
            except StoreError as exc:
                self.counters["db_errors"] += 1
                if not singly and _refused_data(exc):
                    # Not an outage: the database refuses this batch's data (a NUL character
                    # PostgreSQL text cannot hold...). Retrying would stall the fleet on one
                    # message, so store it message by message and reject what is still refused.
                    log.warning("the database refused a batch (%s); storing it message by message", exc)
                    singly = True
                    continue
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.error("the database is unavailable; %d message(s) wait unacknowledged, retrying: %s", len(batch), exc)
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, 5.0)
        if outage_since is not None:
            log.warning("the database is back after %.1f s; ingest continues", time.monotonic() - outage_since)
        self._ack(batch)
        self._after_commit(batch)
        return True

    def _store_all(self, incoming: list[tuple[Incoming, _Received]], rejects: list[tuple[_Received, str, str | None]]) -> None:
        """Record the rejects, then ingest; each list is emptied as its part commits (a retry redoes the rest)."""
        if rejects:
            # One transaction for all of them: a flood of garbage costs one commit per batch,
            # not one durable commit per message ahead of the valid ones.
            with self.store.transaction():
                for item, reason, device_id in rejects:
                    self.store.reject(
                        topic=item.topic, reason=reason, payload=item.payload, received_at=item.received_at, device_id=device_id
                    )
            for item, reason, _ in rejects:
                self.counters["rejected"] += 1
                if self._reject_log.allow(time.monotonic()):
                    log.info("rejected a message on %s: %s", item.topic, reason)
            rejects.clear()
        if incoming:
            result = self.store.ingest([message for message, _ in incoming])
            self.counters["stored"] += result.stored
            self.counters["duplicates"] += result.duplicates
            incoming.clear()

    def _store_singly(self, incoming: list[tuple[Incoming, _Received]], rejects: list[tuple[_Received, str, str | None]]) -> None:
        while incoming:
            try:
                self._store_all(incoming[:1], [])
            except StoreError as exc:
                if not _refused_data(exc):
                    raise
                rejects.append((incoming[0][1], f"the database refused it: {exc}", incoming[0][0].device_id))
            incoming.pop(0)
        self._store_all([], rejects)

    def _after_commit(self, batch: Sequence[_Received]) -> None:
        """A device that went offline drops its queued block requests (see :meth:`BlockServer.forget`)."""
        if not self._serving:
            return
        for item in batch:
            if item.topic.endswith("/state") and b'"online":false' in item.payload.replace(b" ", b""):
                try:
                    device_id, _ = parse_topic(self.prefix, item.topic)
                except InputError:
                    continue
                with self._serving_lock:
                    servers = [s.server for s in self._serving.values() if device_id in s.devices]
                for server in servers:
                    dropped = server.forget(device_id)
                    if dropped:
                        log.info("%s went offline: %d requested block(s) not sent", device_id, dropped)

    # -- field samples -------------------------------------------------------------------------

    def _samples_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._samples.get(timeout=0.2)
            except queue.Empty:
                continue
            delay = 0.5
            while not self._stop.is_set():
                try:
                    self._store_samples(item)
                except StoreError as exc:
                    if _refused_data(exc):  # the database refuses this payload itself: a reject, never a retry
                        self._reject_samples(item, f"the store refused it: {exc}")
                        break
                    log.error("a sample upload on %s could not be stored, retrying: %s", item.topic, exc)
                    self._stop.wait(delay)  # an outage: the same upload again, so nothing is acknowledged unstored
                    delay = min(delay * 2, 10.0)
                    continue
                except Exception as exc:  # a bug must not wedge the queue: recorded, then acknowledged
                    log.exception("a sample upload on %s could not be stored", item.topic)
                    self._reject_samples(item, f"internal error: {type(exc).__name__}: {exc}")
                    break
                break
            else:
                return  # stopping: unacknowledged, the broker redelivers it next time
            self._ack([item])

    def _reject_samples(self, item: _Received, reason: str) -> None:
        self.counters["rejected"] += 1
        try:
            self.store.reject(
                topic=item.topic, reason=reason[:500], payload=item.payload, received_at=item.received_at, device_id=None
            )
        except StoreError as exc:
            log.error("a refused sample upload on %s could not be recorded: %s", item.topic, exc)

    def _store_samples(self, item: _Received) -> None:
        refused = keep_samples(self.store, self.prefix, item.topic, item.payload, item.received_at)
        if refused is not None:
            self.counters["rejected"] += 1
            if self._reject_log.allow(time.monotonic()):
                log.info("sample upload on %s refused: %s", item.topic, refused)

    # -- the rollout engine's link ------------------------------------------------------------

    def _take_request(self, item: _Received) -> None:
        try:
            request = BlockRequest.from_json(item.payload)
        except MessageError as exc:
            if self._reject_log.allow(time.monotonic()):
                log.info("ota_request on %s ignored: %s", item.topic, exc)
            return
        with self._serving_lock:
            serving = self._serving.get(request.deploy_id)
        if serving is None:
            log.debug("ota_request for deploy %s, which this console does not serve", request.deploy_id)
            return
        serving.server.on_message(item.topic, item.payload)

    def offer(self, deploy: Deploy, bundle_path: Path, device_ids: Sequence[str], *, hold_s: int) -> None:
        """Serve ``deploy``'s blocks to ``device_ids`` and send each one the deploy command (QoS 1).

        Offering the same deploy again (more devices, or after a restart) keeps one block
        server for it; a device that already acted on the command id ignores the repeat.

        Raises:
            SenderError: the bundle cannot be served (unreadable, another size).
            InputError: an invalid device id.
        """
        ids = [check_device_id(d) for d in device_ids]
        with self._serving_lock:
            current = self._serving.get(deploy.deploy_id)
            wanted = frozenset(ids) | (current.devices if current is not None else frozenset())
            if current is None or wanted != current.devices or current.bundle_path != bundle_path:
                server = BlockServer(bundle_path, deploy, self._publish_block, devices=sorted(wanted), prefix=self.prefix)
                server.start()
                self._serving[deploy.deploy_id] = _Serving(server, wanted, bundle_path)
                if current is not None:
                    current.server.stop()
        command = deploy_command(deploy, hold_s=hold_s)
        for device_id in ids:
            self._publish(device_topic(self.prefix, device_id, "cmd"), command, content_type="application/json")
        log.info("offered deploy %s (release %d) to %d device(s)", deploy.deploy_id, deploy.release, len(ids))

    def stop_serving(self, deploy_id: str) -> None:
        """Stop serving ``deploy_id``'s blocks (no-op if not served)."""
        with self._serving_lock:
            serving = self._serving.pop(deploy_id, None)
        if serving is not None:
            serving.server.stop()

    def command(self, device_id: str, payload: bytes) -> None:
        """Send a command payload (commit, rollback) to one device's ``cmd`` (QoS 1)."""
        self._publish(device_topic(self.prefix, check_device_id(device_id), "cmd"), payload, content_type="application/json")

    def _publish_block(self, topic: str, payload: bytes) -> None:
        self._publish(topic, payload, content_type="application/octet-stream")

    # -- rollouts ----------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        failing = False
        while not self._stop.wait(self.tick_s):
            try:
                self.engine.tick()
                self.autopilot.tick()
                if failing:
                    log.warning("rollout ticks work again")
                failing = False
            except StoreError as exc:
                if not failing:
                    log.error("a rollout tick failed on the database, retrying every %g s: %s", self.tick_s, exc)
                failing = True
            except Exception:  # the engine must keep ticking; the traceback is a bug to report
                log.exception("a rollout tick failed")


def _refused_data(exc: BaseException) -> bool:
    """Whether the database refused the data itself (not a lock, an outage or a full disk)."""
    from sqlalchemy import exc as sa_exc

    cause = exc.__cause__
    # OverflowError: sqlite3 cannot bind an integer beyond 64 bits (the store converts it).
    return isinstance(cause, sa_exc.DataError | sa_exc.IntegrityError | OverflowError)


def _document(payload: bytes, kind: str) -> dict[str, Any]:
    """The payload as a JSON object, parsed with the bounded parser (depth, size, numbers).

    Raises:
        MessageError: not UTF-8 JSON, nested too deep, or not an object.
    """
    try:
        doc = load_untrusted_json(bytes(payload))
    except ValueError as exc:  # UnicodeDecodeError, bad JSON, too deep, huge integer
        raise MessageError(f"{kind} payload is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MessageError(f"{kind} payload must be a JSON object, got {type(doc).__name__}")
    return doc


def keep_samples(store: Store, prefix: str, topic: str, payload: bytes, received_at: float) -> str | None:
    """Validate a device's ``samples`` upload and keep it, or record it as a reject (never both).

    Returns:
        ``None`` when kept, else the reason it was refused (a reject row says the same).

    Raises:
        StoreError: the database did not take it (the caller leaves it unacknowledged).
    """
    try:
        device_id, _ = parse_topic(prefix, topic)
    except InputError as exc:
        store.reject(topic=topic, reason=f"bad topic: {exc}", payload=payload, received_at=received_at, device_id=None)
        return f"bad topic: {exc}"
    try:
        doc = _document(payload, "samples")
        message = Samples.from_dict(doc)
        if message.device_id != device_id:
            raise MessageError(f"the samples on {device_id}'s topic name device {message.device_id!r}")
    except MessageError as exc:
        store.reject(topic=topic, reason=str(exc), payload=payload, received_at=received_at, device_id=device_id)
        return str(exc)
    labelled = sum(1 for lb in message.labels if lb is not None)
    release = message.model.release if message.model else None
    if release is not None and not 0 <= release <= MAX_DB_INT:
        reason = f"samples.model.release {release} is beyond 64 bits"
        store.reject(topic=topic, reason=reason, payload=payload, received_at=received_at, device_id=device_id)
        return reason
    store.put_upload(
        device_id=device_id,
        command_id=message.command_id,
        ts=message.ts,
        received_at=received_at,
        model=message.model.name if message.model else None,
        release=release,
        rows=len(message.rows),
        labelled=labelled,
        payload=doc,
    )
    log.info("%s uploaded %d field row(s), %d labelled", device_id, len(message.rows), labelled)
    return None
