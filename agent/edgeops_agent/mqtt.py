"""The MQTT v5 link: outbox → broker, commands → agent.

:class:`MqttLink` drives one :class:`~edgeops_agent.transport.Transport` (paho by default,
:class:`~edgeops_agent.transport.SimTransport` in unit tests), QoS 1:

* the Last Will is the device's retained ``state`` with ``online: false``, so a crashed or
  cut-off device shows offline without having said goodbye. The broker takes the Will only
  in CONNECT, so :meth:`MqttLink.set_will` (after an install or rollback changes the bundle)
  stores the new Will and the sender thread performs a *controlled reconnect*: wait for the
  in-flight window to drain (at most 2 s), DISCONNECT with reason 0 (the broker discards the
  old Will without publishing it), CONNECT with the new one. The persistent session (below)
  keeps commands queued across that gap, so nothing is lost for a Will that is always true;
* the session is persistent: ``clean_start=False`` with a Session Expiry Interval of
  ``session_expiry_s`` and a QoS 1 subscription to ``cmd``, so commands published while
  the agent restarts are queued by the broker and delivered on reconnect;
* a sender thread moves outbox messages to the broker, only while connected, with at most
  ``inflight`` unacknowledged; retained ``state`` goes first (see :mod:`edgeops_agent.outbox`);
  a PUBACK with a success reason code deletes the message, a failure reason code (≥ 0x80)
  quarantines it (never retried);
* the transport reconnects by itself with exponential backoff (``reconnect_min_s``, a float,
  doubling up to ``reconnect_max_s``) and re-sends the messages that were in flight when
  the connection dropped, so the sender never hands the same ``seq`` to it twice;
* with ``on_block``, the link also subscribes (QoS 1) to the device's ``ota_block`` and
  hands each binary frame, unparsed, to that callback (over-the-air updates, ADR 0012);
  :meth:`MqttLink.publish_direct` carries the block requests, never the outbox;
* nothing raised by the outbox (disk full: :class:`~edgeops_agent.outbox.OutboxError`) or by
  ``on_command`` escapes a transport callback or ends the sender thread; the outbox reports
  its health instead.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeops_agent.identity import TlsSettings
from edgeops_agent.outbox import Outbox, OutboxError, Pending
from edgeops_agent.transport import Clock, PahoTransport, RealClock, Transport
from edgeops_core import device_topic

if TYPE_CHECKING:
    import ssl

__all__ = ["MqttLink", "MqttSettings"]

log = logging.getLogger(__name__)

#: How long the idle sender sleeps when nothing wakes it (a put, a new Will, stop).
IDLE_WAIT_S = 5.0
#: How long the sender waits for a PUBACK to free a slot of a full in-flight window.
WINDOW_WAIT_S = 1.0


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection settings (``[mqtt]`` in agent.toml)."""

    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "edgeops/v1"
    keepalive_s: int = 10
    username: str | None = None
    password: str | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    inflight: int = 32
    session_expiry_s: int = 7 * 24 * 3600  # how long the broker queues commands for an absent device
    #: Mutual TLS (``[mqtt] tls``); ``None``: plain TCP.
    tls: TlsSettings | None = None


class MqttLink:
    """One device's connection to the broker."""

    def __init__(
        self,
        settings: MqttSettings,
        device_id: str,
        outbox: Outbox,
        *,
        offline_state: Mapping[str, Any],
        on_command: Callable[[bytes], None],
        on_quarantine: Callable[[Pending, int, str], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        on_block: Callable[[bytes], None] | None = None,
        transport: Transport | None = None,
        clock: Clock | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Prepare the link (nothing connects until :meth:`start`).

        Args:
            settings: broker settings.
            device_id: the MQTT client id and topic subtree.
            outbox: where the messages to send wait.
            offline_state: the Will's payload (the retained state with ``online: false``).
            on_command: called with each ``cmd`` payload (on the transport's thread: hand
                real work to a worker); its exceptions are logged, never propagated.
            on_quarantine: called when the broker refused a message.
            on_connected: called after every successful (re)connect.
            on_block: called with each ``ota_block`` payload (on the transport's thread:
                it must only hand the frame over); ``None``: not subscribed.
            transport: the MQTT client; a :class:`PahoTransport` for ``settings`` by default.
            clock: time source for the link's waits.
            tls_context: the client's TLS context (:class:`~edgeops_agent.identity.Identity`);
                required when ``settings.tls`` is set: there is no plaintext fallback.

        Raises:
            ValueError: ``settings.tls`` is set and no ``tls_context`` was given.
        """
        self.settings = settings
        self.device_id = device_id
        self.outbox = outbox
        self._on_command = on_command
        self._on_quarantine = on_quarantine
        self._on_connected = on_connected
        self._on_block = on_block
        self.clock: Clock = clock or RealClock()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._will_dirty = threading.Event()
        self._room = threading.Event()  # set when a PUBACK frees a slot of the in-flight window
        self._lock = threading.Lock()
        self._mids: dict[int, int] = {}  # transport message id -> outbox seq
        self._early: dict[int, tuple[int, str]] = {}  # acks that arrived before publish() returned their mid
        self._direct: set[int] = set()  # mids of publish_direct() messages awaiting their PUBACK
        self.connects = 0
        self.cmd_topic = device_topic(settings.prefix, device_id, "cmd")
        self.state_topic = device_topic(settings.prefix, device_id, "state")
        self.block_topic = device_topic(settings.prefix, device_id, "ota_block")
        if transport is None:
            if settings.tls is not None and tls_context is None:
                raise ValueError("mqtt.tls is configured but no TLS context was given: refusing a plaintext connection")
            transport = PahoTransport(
                settings.host,
                settings.port,
                device_id,
                keepalive_s=settings.keepalive_s,
                username=settings.username,
                password=settings.password,
                reconnect_min_s=settings.reconnect_min_s,
                reconnect_max_s=settings.reconnect_max_s,
                inflight=settings.inflight,
                tls_context=tls_context,
            )
        self.transport = transport
        transport.on_connect = self._connected
        transport.on_disconnect = self._disconnected
        transport.on_publish = self._published
        transport.on_message = self._message
        self._set_transport_will(offline_state)
        self._started = False
        self._sender = threading.Thread(target=self._send_loop, name="edgeops-outbox", daemon=True)

    def start(self) -> None:
        """Connect (in the background, retrying) and start sending."""
        self._connect()
        self._started = True
        self._sender.start()

    def stop(self) -> None:
        """Disconnect cleanly (the broker then does not send the Last Will)."""
        self._stop.set()
        self._room.set()
        self.outbox.wake()
        try:
            self.transport.disconnect()
        finally:
            self.connected.clear()
        if self._started:
            self._sender.join(timeout=5)

    @property
    def last_error(self) -> str | None:
        """Why the broker last refused the connection (e.g. not authorized); ``None`` once connected."""
        return self.transport.last_error

    def publish_direct(self, topic: str, message: Mapping[str, Any], *, retain: bool = False) -> bool:
        """Publish ``message`` now, bypassing the outbox (best effort, QoS 1, not persisted).

        For what must get out when the outbox cannot take it: a ``health: degraded`` state
        while the disk is full. The message carries ``seq: null`` (it is not in the outbox's
        sequence). Returns ``False`` when not connected (nothing is queued).
        """
        if not self.connected.is_set():
            return False
        payload = json.dumps({**message, "seq": None}, separators=(",", ":")).encode()
        mid = self.transport.publish(topic, payload, qos=1, retain=retain, seq=0)
        with self._lock:
            if self._early.pop(mid, None) is None:
                self._direct.add(mid)  # its PUBACK must not settle an outbox message
        return True

    def set_will(self, offline_state: Mapping[str, Any]) -> None:
        """Replace the Last Will (e.g. after the active bundle changed).

        Before :meth:`start` it only changes what the first CONNECT carries; afterwards the
        sender thread reconnects in a controlled way to hand the broker the new Will.
        Safe to call from any thread, the transport's callbacks included.
        """
        self._set_transport_will(offline_state)
        if self._started:
            self._will_dirty.set()
            self.outbox.wake()

    def set_tls_context(self, context: ssl.SSLContext) -> None:
        """Connect with ``context`` from the next (re)connect on (new credentials, :mod:`edgeops_agent.identity`)."""
        setter = getattr(self.transport, "set_tls_context", None)
        if setter is None:
            raise ValueError(f"{type(self.transport).__name__} does not speak TLS")
        setter(context)

    def reconnect(self) -> None:
        """Reconnect in the same controlled way as for a new Will (e.g. to present new credentials)."""
        if self._started:
            self._will_dirty.set()
            self.outbox.wake()

    def _set_transport_will(self, offline_state: Mapping[str, Any]) -> None:
        payload = json.dumps(dict(offline_state), separators=(",", ":")).encode()
        self.transport.set_will(self.state_topic, payload, qos=1, retain=True)

    def _connect(self) -> None:
        s = self.settings
        self.transport.connect(clean_start=False, session_expiry_s=s.session_expiry_s)

    # transport hooks (its network thread) ----------------------------------------------------

    def _connected(self, session_present: bool) -> None:
        self.connects += 1
        # Subscribe even when the session is present: cheap, and it repairs a session the
        # broker lost (e.g. restarted without persistence).
        self.transport.subscribe(self.cmd_topic, qos=1)
        if self._on_block is not None:
            self.transport.subscribe(self.block_topic, qos=1)
        self.connected.set()
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:  # e.g. OutboxError on a full disk: the link stays up
                log.exception("on_connected failed")

    def _disconnected(self) -> None:
        self.connected.clear()

    def _published(self, mid: int, reason_code: int, reason: str) -> None:
        # Never call into the transport while holding self._lock: paho may hold its own
        # message lock while it runs this callback, and the sender takes them in the other order.
        with self._lock:
            if mid in self._direct:
                self._direct.discard(mid)
                return
            seq = self._mids.pop(mid, None)
            if seq is None:
                self._early[mid] = (reason_code, reason)
                return
        self._room.set()
        self._settle(seq, reason_code, reason)

    def _settle(self, seq: int, reason_code: int, reason: str) -> None:
        if reason_code < 0x80:
            self.outbox.ack(seq)  # never raises: a failed delete is kept and retried
            return
        log.warning("broker refused message seq %d (%s); quarantined", seq, reason)
        try:
            pending = self.outbox.quarantine(seq, reason_code, reason)
        except OutboxError:
            log.exception("could not quarantine seq %d; it will be tried again", seq)
            return
        if pending is not None and self._on_quarantine is not None:
            try:
                self._on_quarantine(pending, reason_code, reason)
            except Exception:
                log.exception("on_quarantine failed")

    def _message(self, topic: str, payload: bytes) -> None:
        if topic == self.block_topic and self._on_block is not None:
            try:
                self._on_block(payload)
            except Exception:  # never the network thread's end
                log.exception("block handler failed")
            return
        if topic != self.cmd_topic:
            return
        try:
            self._on_command(payload)
        except Exception:  # a command handler bug or a full disk must not kill the network thread
            log.exception("command handler failed")

    # the sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._send_once()
            except Exception:  # the sender must outlive anything (a full disk above all)
                log.exception("outbox sender failed; retrying in 1 s")
                self._stop.wait(1.0)

    def _send_once(self) -> None:
        if not self.connected.wait(timeout=0.5):
            return
        if self._will_dirty.is_set():
            self._reconnect_for_will()
            return
        with self._lock:
            room = self.settings.inflight - len(self._mids)
            if room <= 0:
                self._room.clear()  # under the lock: a PUBACK that frees a slot sets it after
        if room <= 0:
            self._room.wait(WINDOW_WAIT_S)
            return
        try:
            batch = self.outbox.next_batch(room)
        except OutboxError:
            log.warning("outbox unreadable; retrying in 1 s", exc_info=True)
            self._stop.wait(1.0)
            return
        if not batch:
            self.outbox.wait(timeout=IDLE_WAIT_S)
            return
        for i, msg in enumerate(batch):
            if not self.connected.is_set() or self._stop.is_set():
                self.outbox.unhand(m.seq for m in batch[i:])
                break
            mid = self.transport.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, seq=msg.seq)
            with self._lock:
                early = self._early.pop(mid, None)
                if early is None:
                    self._mids[mid] = msg.seq
            if early is not None:  # the PUBACK beat us to it
                self._settle(msg.seq, *early)
        else:
            if len(batch) < room:
                # That was all there was: sleep now rather than ask the outbox again (wait()
                # returns at once if a put came in since next_batch).
                self.outbox.wait(timeout=IDLE_WAIT_S)

    def _reconnect_for_will(self) -> None:
        deadline = self.clock.monotonic() + 2.0
        while self.clock.monotonic() < deadline and not self._stop.is_set():
            with self._lock:
                if not self._mids:
                    break
            self.clock.wait(self._stop, 0.01)
        self._will_dirty.clear()
        if self._stop.is_set():
            return
        log.info("reconnecting (a new Last Will or new credentials)")
        self.transport.disconnect()
        self.connected.clear()
        self._connect()
