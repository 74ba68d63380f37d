"""The MQTT v5 link: outbox → broker, commands → agent.

:class:`MqttLink` wraps one paho-mqtt 2.x client (MQTT v5, QoS 1):

* the Last Will is the device's retained ``state`` with ``online: false``, so a crashed or
  cut-off device shows offline without having said goodbye;
* a sender thread moves outbox messages to the broker in ``seq`` order, only while
  connected, with at most ``inflight`` unacknowledged; a PUBACK with a success reason code
  deletes the message, a failure reason code (≥ 0x80) quarantines it (never retried);
* paho reconnects by itself with exponential backoff (``reconnect_min_s`` doubling up to
  ``reconnect_max_s``) and re-sends the messages that were in flight when the connection
  dropped, so the sender never hands the same ``seq`` to paho twice;
* ``cmd`` payloads go to ``on_command``; a malformed one never raises out of paho's thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeops_agent.outbox import Outbox, Pending
from edgeops_core import device_topic

__all__ = ["MqttLink", "MqttSettings"]

log = logging.getLogger(__name__)


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


class MqttLink:
    """One device's connection to the broker."""

    def __init__(
        self,
        settings: MqttSettings,
        device_id: str,
        outbox: Outbox,
        *,
        offline_state: dict[str, Any],
        on_command: Callable[[bytes], None],
        on_quarantine: Callable[[Pending, int, str], None] | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        """Prepare the client (nothing connects until :meth:`start`)."""
        self.settings = settings
        self.device_id = device_id
        self.outbox = outbox
        self._on_command = on_command
        self._on_quarantine = on_quarantine
        self._on_connected = on_connected
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._mids: dict[int, int] = {}  # paho message id -> outbox seq
        self._early: dict[int, Any] = {}  # acks that arrived before publish() returned their mid
        self._last_sent = 0
        self.connects = 0
        self.cmd_topic = device_topic(settings.prefix, device_id, "cmd")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        state_topic = device_topic(settings.prefix, device_id, "state")
        client.will_set(state_topic, json.dumps(offline_state, separators=(",", ":")), qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=max(1, round(settings.reconnect_min_s)), max_delay=max(1, round(settings.reconnect_max_s))
        )
        client.max_inflight_messages_set(settings.inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_message = self._message
        self.client = client
        self._sender = threading.Thread(target=self._send_loop, name="edgeops-outbox", daemon=True)

    def start(self) -> None:
        """Connect (in the background, retrying) and start sending."""
        s = self.settings
        self.client.connect_async(s.host, s.port, keepalive=s.keepalive_s, clean_start=True)
        self.client.loop_start()
        self._sender.start()

    def stop(self) -> None:
        """Disconnect cleanly (the broker then does not send the Last Will)."""
        self._stop.set()
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
        self._sender.join(timeout=5)

    # paho callbacks (its network thread) ---------------------------------------------------

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        self.connects += 1
        client.subscribe(self.cmd_topic, qos=1)
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        # Never call into paho while holding self._lock: paho may hold its own message lock
        # while it runs this callback, and the sender takes them in the other order.
        with self._lock:
            seq = self._mids.pop(mid, None)
            if seq is None:
                self._early[mid] = reason_code
                return
        self._settle(seq, reason_code)

    def _settle(self, seq: int, reason_code: Any) -> None:
        if reason_code.is_failure:
            pending = self.outbox.quarantine(seq, int(reason_code.value), str(reason_code))
            log.warning("broker refused message seq %d (%s); quarantined", seq, reason_code)
            if pending is not None and self._on_quarantine is not None:
                self._on_quarantine(pending, int(reason_code.value), str(reason_code))
        else:
            self.outbox.ack(seq)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self.cmd_topic:
            return
        try:
            self._on_command(bytes(message.payload))
        except Exception:  # a command handler bug must not kill paho's network thread
            log.exception("command handler failed")

    # the sender thread ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            if not self.connected.wait(timeout=0.5):
                continue
            with self._lock:
                room = self.settings.inflight - len(self._mids)
            if room <= 0:
                self._stop.wait(0.005)
                continue
            batch = self.outbox.pending(after=self._last_sent, limit=room)
            if not batch:
                self.outbox.wait(self._last_sent, timeout=0.5)
                continue
            for msg in batch:
                if not self.connected.is_set() or self._stop.is_set():
                    break
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = ("seq", str(msg.seq))
                props.PayloadFormatIndicator = 1
                props.ContentType = "application/json"
                info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, properties=props)
                with self._lock:
                    early = self._early.pop(info.mid, None)
                    if early is None:
                        self._mids[info.mid] = msg.seq
                self._last_sent = msg.seq
                if early is not None:  # the PUBACK beat us to it
                    self._settle(msg.seq, early)
