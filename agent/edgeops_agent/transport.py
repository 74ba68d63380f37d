"""The I/O edges of the MQTT link: a transport and a clock, each a small interface.

* :class:`Transport` is what :class:`~edgeops_agent.mqtt.MqttLink` needs from an MQTT v5
  client: connect (in the background, retrying), publish with a completion callback that
  carries the PUBACK reason code, subscribe, set the Last Will, disconnect cleanly, and
  three hooks (connect, disconnect, message).
* :class:`PahoTransport` is the real one (paho-mqtt 2.x). :class:`SimTransport` talks to an
  :class:`InMemoryBroker`: a simulator of *our* interface for unit tests, so refused
  publishes, withheld acknowledgements, dropped connections, session persistence and the
  Last Will can be reached deterministically without a process. Acceptance tests still use
  a real Mosquitto.
* :class:`Clock` (``monotonic``/``time``/``sleep``/``wait``) with :class:`RealClock` and
  :class:`ManualClock`.

Hook contract (both transports): ``on_connect(session_present)`` after a successful CONNACK;
``on_disconnect()`` when the connection is lost or closed; ``on_message(topic, payload)``;
``on_publish(mid, reason_code, reason)`` when a QoS 1 publish is settled (``reason_code``
≥ 0x80 is a refusal). ``on_publish`` may run *before* :meth:`Transport.publish` returns the
mid (paho does that on a fast broker), so callers must handle an unknown mid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import ssl

__all__ = [
    "Clock",
    "InMemoryBroker",
    "ManualClock",
    "NetworkLoop",
    "PahoTransport",
    "RealClock",
    "SimMessage",
    "SimTransport",
    "Transport",
    "share_network_loop",
]

log = logging.getLogger(__name__)

OnConnect = Callable[[bool], None]
OnDisconnect = Callable[[], None]
OnMessage = Callable[[str, bytes], None]
OnPublish = Callable[[int, int, str], None]


class Transport(Protocol):
    """An MQTT v5 client as the link sees it."""

    on_connect: OnConnect | None
    on_disconnect: OnDisconnect | None
    on_message: OnMessage | None
    on_publish: OnPublish | None
    last_error: str | None  # why the broker last refused the connection; None once connected

    def set_will(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Set the Last Will used by the *next* CONNECT."""

    def connect(self, *, clean_start: bool, session_expiry_s: int) -> None:
        """Connect in the background and keep reconnecting until :meth:`disconnect`."""

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, seq: int) -> int:
        """Queue a publish and return its message id (``seq`` goes out as a user property)."""

    def subscribe(self, topic: str, *, qos: int) -> None:
        """Subscribe to ``topic``."""

    def disconnect(self) -> None:
        """Disconnect cleanly (the broker does not send the Will) and stop reconnecting."""


class Clock(Protocol):
    """Time as the agent sees it."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds; whether it is set."""


class RealClock:
    """The system clocks."""

    def monotonic(self) -> float:
        """:func:`time.monotonic`."""
        return time.monotonic()

    def time(self) -> float:
        """:func:`time.time`."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """:func:`time.sleep`."""
        time.sleep(seconds)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """:meth:`threading.Event.wait`."""
        return event.wait(timeout)


class ManualClock:
    """A clock that moves only when told (:meth:`advance`); ``sleep`` advances it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        """Start at ``start`` seconds."""
        self._now = start
        self._lock = threading.Lock()

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        with self._lock:
            self._now += seconds

    def monotonic(self) -> float:
        """The current manual time."""
        with self._lock:
            return self._now

    def time(self) -> float:
        """The current manual time."""
        return self.monotonic()

    def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` at once."""
        self.advance(seconds)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Return at once: set or not, advancing time by ``timeout`` when not set."""
        if not event.is_set():
            self.advance(timeout)
        return event.is_set()


# paho ----------------------------------------------------------------------------------------


def _str16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class PublishProperties:
    """The MQTT v5 PUBLISH properties of one outbox message, packed directly.

    Payload Format Indicator 1 (UTF-8), Content Type ``application/json`` and the User
    Property ``seq``. paho only calls ``pack()`` on a PUBLISH's properties; its generic
    :class:`paho.mqtt.properties.Properties` costs ~40 µs a message to build and pack (a
    tenth of a simulated device's CPU), this a few.
    """

    _HEAD = b"\x01\x01" + b"\x03" + _str16(b"application/json") + b"\x26" + _str16(b"seq")

    def __init__(self, seq: int) -> None:
        """Properties carrying ``seq``."""
        self.seq = seq

    def pack(self) -> bytes:
        """The properties as they go on the wire: their length, then each one."""
        body = self._HEAD + _str16(str(self.seq).encode())
        return _varint(len(body)) + body

    def __str__(self) -> str:
        return f"[PayloadFormatIndicator: 1, ContentType: application/json, UserProperty: [('seq', '{self.seq}')]]"


class PahoTransport:
    """:class:`Transport` over one paho-mqtt 2.x client (MQTT v5)."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        keepalive_s: int = 10,
        username: str | None = None,
        password: str | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        inflight: int = 32,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Prepare the client; nothing connects until :meth:`connect`.

        With ``tls_context`` every connection is TLS with that context (its certificate chain
        may be replaced between connections: :mod:`edgeops_agent.identity`).
        """
        import paho.mqtt.client as mqtt  # paho imports ssl: only load it when the link is used
        from paho.mqtt.enums import CallbackAPIVersion

        self.host, self.port, self.keepalive_s = host, port, keepalive_s
        self.on_connect: OnConnect | None = None
        self.on_disconnect: OnDisconnect | None = None
        self.on_message: OnMessage | None = None
        self.on_publish: OnPublish | None = None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            client.username_pw_set(username, password)
        # paho declares the delays as int but computes with them as numbers: pass the real
        # floats so a 0.5 s minimum stays 0.5 s (rounding it made the documented 0.5 s 1 s).
        client.reconnect_delay_set(min_delay=cast(int, reconnect_min_s), max_delay=cast(int, reconnect_max_s))
        client.max_inflight_messages_set(inflight)
        client.max_queued_messages_set(0)
        if tls_context is not None:
            client.tls_set_context(tls_context)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_message = self._message
        self.client = client
        self.last_error: str | None = None
        self._running = False
        self.reconnect_min_s, self.reconnect_max_s = reconnect_min_s, reconnect_max_s
        self._backoff = reconnect_min_s
        # With a shared loop (share_network_loop()), no paho thread of its own: the loop reads,
        # and whoever queues a packet (the sender's publish, the loop's PUBACK) writes it at once.
        self._loop = loop = _shared_loop
        self._wlock = threading.RLock()
        if loop is not None:
            client.connect_timeout = LOOP_CONNECT_TIMEOUT_S
            client.on_socket_open = lambda c, u, sock: loop.watch(self, sock)
            client.on_socket_close = lambda c, u, sock: loop.unwatch(sock)
            client.on_socket_register_write = lambda c, u, sock: self._flush()
            client.on_socket_unregister_write = lambda c, u, sock: None

    def set_will(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Set the Will for the next CONNECT (paho reads it only when connecting)."""
        self.client.will_set(topic, payload, qos=qos, retain=retain)

    def set_tls_context(self, context: ssl.SSLContext) -> None:
        """Use ``context`` from the next connection on (the one open now keeps its own).

        paho accepts ``tls_set_context`` once per client, and replacing the pair inside one
        context is not atomic (a handshake in between would go out without a certificate),
        so the new context replaces paho's reference: one assignment, read once per connect
        (paho 2.x ``_ssl_wrap_socket``).

        Raises:
            ValueError: this client was made without TLS (no plaintext client becomes TLS later).
        """
        if getattr(self.client, "_ssl_context", None) is None:
            raise ValueError("this MQTT client was made without TLS")
        self.client._ssl_context = context

    def connect(self, *, clean_start: bool, session_expiry_s: int) -> None:
        """Start paho's network thread, connecting and reconnecting in the background."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=clean_start, properties=props)
        self._running = True
        if self._loop is not None:
            self._backoff = self.reconnect_min_s
            self._loop.add(self)
            return
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, seq: int) -> int:
        """Queue a publish (paho re-sends it by itself after a reconnect); its mid."""
        props = PublishProperties(seq)
        return int(self.client.publish(topic, payload, qos=qos, retain=retain, properties=props).mid)  # type: ignore[arg-type]

    def subscribe(self, topic: str, *, qos: int) -> None:
        """Subscribe (from any thread, paho's own callbacks included)."""
        self.client.subscribe(topic, qos=qos)

    def disconnect(self) -> None:
        """Send DISCONNECT (reason 0: no Will) and stop the network thread."""
        if not self._running:
            return
        self._running = False
        if self._loop is not None:
            self._loop.remove(self)
            self.client.disconnect()  # written at once by _flush; paho then closes the socket
            if self.client.socket() is not None:  # DISCONNECT could not be written: close anyway
                with contextlib.suppress(Exception):
                    self.client._sock_close()
            return
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            # paho's loop_start makes a new wake-up socket pair without closing the last one:
            # without this, every controlled reconnect (a new Will, new credentials) leaked two
            # descriptors.
            self.client._reset_sockets(sockpair_only=True)

    # the shared loop's side (share_network_loop) -----------------------------------------------

    # Lock order: paho takes its message mutexes and then calls _flush (a publish from the
    # sender; a PUBACK queued while reading), so _wlock is only ever held around loop_write,
    # never around a paho call that may take those mutexes (loop_read, reconnect, loop_misc).

    def _flush(self) -> None:
        """Write what paho queued, now, in the calling thread; what does not fit, the loop writes."""
        with self._wlock:
            self.client.loop_write()
            pending = self.client.want_write()
        if pending and self._loop is not None:
            self._loop.want_write(self)

    def _try_connect(self) -> None:
        """One connection attempt (the loop's thread); on failure the next one is scheduled."""
        if not self._running or self._loop is None:
            return
        try:
            self.client.reconnect()
        except (OSError, ValueError) as exc:
            log.debug("connect to %s:%s failed: %s", self.host, self.port, exc)
            self._retry_later()

    def _retry_later(self) -> None:
        if self._running and self._loop is not None:
            self._loop.schedule(self, self._backoff)
            self._backoff = min(self._backoff * 2, self.reconnect_max_s)

    def _service(self) -> None:
        """Keepalive and any write left over (the loop calls this a few times a second)."""
        if self.client.socket() is None:
            return
        self.client.loop_misc()  # a PINGREQ, or the socket closed (on_disconnect: reconnect)
        if self.client.want_write():
            self._flush()

    # paho callbacks: each hook is guarded, because paho re-raises a callback's exception
    # and that ends its network loop (the agent would stop talking for good).

    def _call(self, hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("MQTT hook %s failed", getattr(hook, "__name__", hook))

    def _connected(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            # e.g. "Not authorized" or "Client identifier not valid": paho keeps retrying,
            # so make the reason visible instead of retrying in silence.
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("%s", self.last_error)
            return
        self.last_error = None
        self._backoff = self.reconnect_min_s
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # OTA block requests are a request/response exchange: with Nagle's algorithm a small
            # request or PUBACK waits behind an unacknowledged segment for a delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._call(self.on_connect, bool(flags.session_present))

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._call(self.on_disconnect)
        if self._loop is not None and self._running:
            self._retry_later()  # the connection is gone: reconnect with back-off

    def _published(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._call(self.on_publish, mid, int(reason_code.value), str(reason_code))

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        self._call(self.on_message, str(message.topic), bytes(message.payload))


#: The shared loop's wake-up period: keepalives, leftover writes, due reconnects.
LOOP_TICK_S = 0.25
#: How soon the shared loop retries a write a full socket did not take.
LOOP_WRITE_RETRY_S = 0.01
#: How long a shared loop's connection attempt may block it (loopback brokers answer at once).
LOOP_CONNECT_TIMEOUT_S = 2.0

_shared_loop: NetworkLoop | None = None
_shared_loop_lock = threading.Lock()


def share_network_loop(enabled: bool = True) -> NetworkLoop | None:
    """Make every :class:`PahoTransport` created from now on in this process use one
    :class:`NetworkLoop` (started now) instead of a paho network thread of its own; the loop.

    For a process that runs many agents (the fleet simulator): each client keeps its own
    socket, session, Will and callbacks, only the thread that reads their sockets is shared.
    ``enabled=False`` stops the loop and goes back to a thread per client.
    """
    global _shared_loop
    with _shared_loop_lock:
        if not enabled:
            if _shared_loop is not None:
                _shared_loop.stop()
            _shared_loop = None
            return None
        if _shared_loop is None:
            _shared_loop = NetworkLoop()
            _shared_loop.start()
        return _shared_loop


class NetworkLoop:
    """One thread that drives the sockets of many :class:`PahoTransport` (paho's external-loop API).

    It waits on every client's socket with an epoll selector (no 1 024-descriptor limit, unlike
    paho's select()), reads what arrives (``loop_read``; the clients' callbacks run here, so
    they must be short: the agent's are an outbox ack, a queue put, a block write), writes what
    a client could not write at once, sends keepalives (``loop_misc``) and makes the connection
    attempts, each client with its own back-off. A packet a client queues (a publish from the
    outbox sender, a PUBACK) is written by the thread that queued it, under the client's write
    lock, so a message does not wait for this thread to wake.
    """

    def __init__(self) -> None:
        """An idle loop; :meth:`start` runs it."""
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._clients: set[PahoTransport] = set()
        self._due: dict[PahoTransport, float] = {}  # connection attempts, by monotonic time
        self._writers: set[PahoTransport] = set()  # clients with bytes the socket did not take
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeops-network-loop", daemon=True)

    def start(self) -> None:
        """Run the loop's thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (clients still connected are left as they are)."""
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: it is awake already
            self._wake_w.send(b"x")

    def add(self, client: PahoTransport) -> None:
        """Start serving ``client``: a first connection attempt right away."""
        with self._lock:
            self._clients.add(client)
            self._due[client] = time.monotonic()
        self._wake()

    def remove(self, client: PahoTransport) -> None:
        """Stop serving ``client`` (no more reconnects)."""
        with self._lock:
            self._clients.discard(client)
            self._due.pop(client, None)
            self._writers.discard(client)

    def schedule(self, client: PahoTransport, delay_s: float) -> None:
        """A connection attempt for ``client`` in ``delay_s`` seconds."""
        with self._lock:
            if client in self._clients:
                self._due[client] = time.monotonic() + delay_s
        self._wake()

    def want_write(self, client: PahoTransport) -> None:
        """``client`` has bytes its socket did not take: write them when it is writable."""
        with self._lock:
            self._writers.add(client)
        self._wake()

    def watch(self, client: PahoTransport, sock: Any) -> None:
        """paho opened ``client``'s socket: read from it."""
        with self._lock:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)
            self._sel.register(sock, selectors.EVENT_READ, client)
        self._wake()

    def unwatch(self, sock: Any) -> None:
        """paho is closing a socket."""
        with self._lock, contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)

    def _run(self) -> None:
        next_service = time.monotonic() + LOOP_TICK_S
        while not self._stopping:
            now = time.monotonic()
            with self._lock:
                soonest = min(self._due.values(), default=now + LOOP_TICK_S)
                writers = bool(self._writers)
            timeout = max(0.0, min(soonest, next_service) - now)
            if writers:  # a socket that did not take all its bytes: try again soon, not in a spin
                timeout = min(timeout, LOOP_WRITE_RETRY_S)
            for key, _ in self._sel.select(timeout):
                client = key.data
                if client is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._guard(client, self._read)
            now = time.monotonic()
            with self._lock:
                due = [c for c, t in self._due.items() if t <= now]
                for c in due:
                    del self._due[c]
                writers_now, self._writers = self._writers, set()
            for client in due:
                self._guard(client, PahoTransport._try_connect)
            for client in writers_now:
                self._guard(client, PahoTransport._flush)
            if now >= next_service:
                next_service = now + LOOP_TICK_S
                with self._lock:
                    clients = list(self._clients)
                for client in clients:
                    self._guard(client, PahoTransport._service)

    @staticmethod
    def _read(client: PahoTransport) -> None:
        # A lost connection: paho closes the socket and calls on_disconnect, which schedules
        # the reconnect.
        client.client.loop_read()
        sock = client.client.socket()
        # TLS: bytes already decrypted into the SSL object's buffer do not wake the selector.
        while sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
            client.client.loop_read()
            sock = client.client.socket()
        if client.client.want_write():
            client._flush()

    @staticmethod
    def _guard(client: PahoTransport, fn: Callable[[PahoTransport], None]) -> None:
        try:
            fn(client)
        except Exception:  # one client's failure must not stop the others' network
            log.exception("network loop: client %s failed", client.client._client_id)


# the simulator ---------------------------------------------------------------------------


@dataclass
class _Session:
    transport: SimTransport | None
    subscriptions: set[str] = field(default_factory=set)
    queued: list[tuple[str, bytes]] = field(default_factory=list)
    expiry_s: int = 0


@dataclass(frozen=True)
class SimMessage:
    """A message the simulated broker accepted."""

    topic: str
    payload: bytes
    retain: bool
    client_id: str
    will: bool = False

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


def _matches(pattern: str, topic: str) -> bool:
    pat, top = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)


class InMemoryBroker:
    """A tiny MQTT v5 broker in memory: QoS 1, retained messages, Wills, persistent sessions.

    Knobs for tests: :attr:`up` (refuse connections when ``False``: use :meth:`stop` /
    :meth:`start`), :attr:`refuse` (reason code to answer the next publishes with),
    :attr:`hold_acks` (accept publishes but keep their PUBACKs until :meth:`release_acks`),
    :meth:`cut` (drop a client's connection uncleanly: its Will is published).
    """

    def __init__(self) -> None:
        """An empty, running broker."""
        self.up = True
        self.refuse: int | None = None
        self.hold_acks = False
        self.log: list[SimMessage] = []
        self.retained: dict[str, SimMessage] = {}
        self._sessions: dict[str, _Session] = {}
        self._held: list[tuple[SimTransport, int]] = []
        self._waiting: list[SimTransport] = []
        self._lock = threading.RLock()

    def messages(self, topic: str | None = None) -> list[SimMessage]:
        """Accepted messages (Wills included), optionally of one topic, in order."""
        with self._lock:
            return [m for m in self.log if topic is None or m.topic == topic]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, client_id: str = "console") -> None:
        """Publish as another client (e.g. a console sending a command)."""
        self._accept(SimMessage(topic, payload, retain, client_id))

    def _accept(self, msg: SimMessage) -> None:
        deliveries: list[tuple[SimTransport, str, bytes]] = []
        with self._lock:
            self.log.append(msg)
            if msg.retain:
                self.retained[msg.topic] = msg
            for session in self._sessions.values():
                if any(_matches(p, msg.topic) for p in session.subscriptions):
                    if session.transport is not None and session.transport.connected:
                        deliveries.append((session.transport, msg.topic, msg.payload))
                    else:
                        session.queued.append((msg.topic, msg.payload))
        for transport, topic, payload in deliveries:
            transport._deliver(topic, payload)

    def stop(self) -> None:
        """Go down: every client loses its connection uncleanly (Wills are published)."""
        with self._lock:
            self.up = False
            clients = [s.transport for s in self._sessions.values() if s.transport is not None and s.transport.connected]
        for transport in clients:
            self._drop(transport, clean=False)

    def start(self) -> None:
        """Come back up; clients that were trying to connect connect now."""
        with self._lock:
            self.up = True
            waiting, self._waiting = self._waiting, []
        for transport in waiting:
            self._connect(transport)

    def cut(self, client_id: str) -> None:
        """Drop one client's connection uncleanly; it reconnects at once (the broker is up)."""
        with self._lock:
            transport = self._sessions[client_id].transport
        if transport is not None and transport.connected:
            self._drop(transport, clean=False)
            self._connect(transport)

    def kill(self, client_id: str) -> None:
        """The client's process died: its connection drops uncleanly and it does not return."""
        with self._lock:
            transport = self._sessions[client_id].transport
        if transport is not None and transport.connected:
            self._drop(transport, clean=False)

    def release_acks(self) -> None:
        """Send every withheld PUBACK."""
        with self._lock:
            held, self._held = self._held, []
        for transport, mid in held:
            transport._settled(mid, 0, "Success")

    def forget_acks(self) -> None:
        """Lose every withheld PUBACK (the client died before reading them)."""
        with self._lock:
            self._held = []

    def _connect(self, transport: SimTransport) -> None:
        with self._lock:
            if not self.up:
                self._waiting.append(transport)
                return
            old = self._sessions.get(transport.client_id)
            present = old is not None and not transport.clean_start and old.expiry_s > 0
            session = old if old is not None and present else _Session(transport=None)
            self._sessions[transport.client_id] = session
            session.transport = transport
            session.expiry_s = transport.session_expiry_s
            queued, session.queued = session.queued, []
            transport.connected = True
        transport._hook(transport.on_connect, present)
        transport._resend()
        for topic, payload in queued:
            transport._deliver(topic, payload)

    def _drop(self, transport: SimTransport, *, clean: bool) -> None:
        with self._lock:
            transport.connected = False
            session = self._sessions.get(transport.client_id)
            if session is not None:
                session.transport = None
                if session.expiry_s == 0:
                    del self._sessions[transport.client_id]
            will = transport.will
            # PUBACKs not yet delivered die with the connection; the client re-sends.
            self._held = [(t, m) for t, m in self._held if t is not transport]
        if not clean and will is not None:
            topic, payload, retain = will
            self._accept(SimMessage(topic, payload, retain, transport.client_id, will=True))
        transport._hook(transport.on_disconnect)

    def _publish(self, transport: SimTransport, mid: int, topic: str, payload: bytes, retain: bool) -> None:
        if not self.up or not transport.connected:
            return  # lost on the way; the client re-sends it after reconnecting
        if self.refuse is not None:
            transport._settled(mid, self.refuse, f"refused 0x{self.refuse:02x}")
            return
        self._accept(SimMessage(topic, payload, retain, transport.client_id))
        if self.hold_acks:
            with self._lock:
                self._held.append((transport, mid))
        else:
            transport._settled(mid, 0, "Success")

    def _subscribe(self, transport: SimTransport, topic: str) -> None:
        with self._lock:
            self._sessions[transport.client_id].subscriptions.add(topic)


class SimTransport:
    """:class:`Transport` against an :class:`InMemoryBroker`; callbacks run synchronously."""

    def __init__(self, broker: InMemoryBroker, client_id: str) -> None:
        """A client of ``broker`` named ``client_id``."""
        self.broker, self.client_id = broker, client_id
        self.on_connect: OnConnect | None = None
        self.on_disconnect: OnDisconnect | None = None
        self.on_message: OnMessage | None = None
        self.on_publish: OnPublish | None = None
        self.connected = False
        self.last_error: str | None = None
        self.clean_start = True
        self.session_expiry_s = 0
        self.will: tuple[str, bytes, bool] | None = None
        self.hook_errors: list[BaseException] = []
        self._mids = itertools.count(1)
        self._unacked: dict[int, tuple[str, bytes, bool]] = {}

    def set_will(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Set the Will for the next connect."""
        self.will = (topic, payload, retain)

    def connect(self, *, clean_start: bool, session_expiry_s: int) -> None:
        """Connect now, or as soon as the broker is up."""
        self.clean_start, self.session_expiry_s = clean_start, session_expiry_s
        self.broker._connect(self)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, seq: int) -> int:
        """Hand a message to the broker; ``on_publish`` may run before this returns."""
        mid = next(self._mids)
        # Like paho: kept until settled, and sent again after every reconnect.
        self._unacked[mid] = (topic, payload, retain)
        if self.connected:
            self.broker._publish(self, mid, topic, payload, retain)
        return mid

    def _resend(self) -> None:
        for mid, (topic, payload, retain) in sorted(self._unacked.items()):
            if not self.connected:
                return
            self.broker._publish(self, mid, topic, payload, retain)

    def subscribe(self, topic: str, *, qos: int) -> None:
        """Subscribe."""
        self.broker._subscribe(self, topic)

    def disconnect(self) -> None:
        """Disconnect cleanly: no Will."""
        if self.connected:
            self.broker._drop(self, clean=True)
        with self.broker._lock:
            if self in self.broker._waiting:
                self.broker._waiting.remove(self)

    def _hook(self, hook: Callable[..., None] | None, *args: Any) -> None:
        # Like PahoTransport: a failing hook is recorded and logged, never propagated.
        if hook is None:
            return
        try:
            hook(*args)
        except Exception as exc:
            self.hook_errors.append(exc)
            log.exception("sim hook failed")

    def _settled(self, mid: int, code: int, reason: str) -> None:
        if self._unacked.pop(mid, None) is None:
            return  # a duplicate PUBACK
        self._hook(self.on_publish, mid, code, reason)

    def _deliver(self, topic: str, payload: bytes) -> None:
        self._hook(self.on_message, topic, payload)
