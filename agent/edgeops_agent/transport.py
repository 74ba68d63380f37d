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

import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

__all__ = [
    "Clock",
    "InMemoryBroker",
    "ManualClock",
    "PahoTransport",
    "RealClock",
    "SimMessage",
    "SimTransport",
    "Transport",
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
    ) -> None:
        """Prepare the client; nothing connects until :meth:`connect`."""
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
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_message = self._message
        self.client = client
        self.last_error: str | None = None
        self._running = False

    def set_will(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Set the Will for the next CONNECT (paho reads it only when connecting)."""
        self.client.will_set(topic, payload, qos=qos, retain=retain)

    def connect(self, *, clean_start: bool, session_expiry_s: int) -> None:
        """Start paho's network thread, connecting and reconnecting in the background."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive_s, clean_start=clean_start, properties=props)
        self.client.loop_start()
        self._running = True

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
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

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
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # OTA block requests are a request/response exchange: with Nagle's algorithm a small
            # request or PUBACK waits behind an unacknowledged segment for a delayed ACK (~40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._call(self.on_connect, bool(flags.session_present))

    def _disconnected(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._call(self.on_disconnect)

    def _published(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._call(self.on_publish, mid, int(reason_code.value), str(reason_code))

    def _message(self, client: Any, userdata: Any, message: Any) -> None:
        self._call(self.on_message, str(message.topic), bytes(message.payload))


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
