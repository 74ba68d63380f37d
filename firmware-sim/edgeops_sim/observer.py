"""The outside subscriber: what the fleet's messages look like from the broker's far side.

One paho client with a persistent session (clean start off, a session expiry) subscribed at
QoS 1 to every device's ``state``, ``telemetry``, ``events`` and ``samples``, like the fleet console. It
records per device the seqs it received (duplicates counted), the ingest latency
(receipt − the message's ``ts``) and every ``drift_alarm``/``drift_cleared`` event. Retained
messages replayed on subscribe are not part of this run and are skipped.

It does the least possible work per message (it runs on paho's network thread): a regular
expression for ``seq``, ``ts`` and ``type`` rather than a full JSON parse.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeops_core import DEFAULT_PREFIX
from edgeops_sim.errors import SimError

__all__ = ["Observer", "Seen"]

_SEQ = re.compile(rb'"seq":\s*(\d+)')
_TS = re.compile(rb'"ts":\s*"([^"]+)"')
_TYPE = re.compile(rb'"type":\s*"(drift_alarm|drift_cleared)"')


@dataclass
class Seen:
    """What arrived from one device."""

    seqs: set[int] = field(default_factory=set)
    duplicates: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)
    drift: list[tuple[float, str]] = field(default_factory=list)  # (receipt epoch s, "drift_alarm" | "drift_cleared")


class Observer:
    """Subscribe to the fleet's messages and keep count."""

    def __init__(self, host: str, port: int, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.devices: dict[str, Seen] = defaultdict(Seen)
        self.retained_skipped = 0
        self.unparsed = 0
        self.connects = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgeops-sim-observer-{os.urandom(6).hex()}",
            protocol=mqtt.MQTTv5,
        )
        client.max_inflight_messages_set(1000)
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 2000
        self._connect = (host, port, props)

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe, and return once the subscription is in place.

        Raises:
            SimError: the broker did not answer within ``timeout``.
        """
        host, port, props = self._connect
        try:
            self.client.connect(host, port, keepalive=10, clean_start=False, properties=props)
        except OSError as exc:
            raise SimError(f"cannot reach the broker at {host}:{port}: {exc}") from None
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.client.loop_stop()
            raise SimError(f"the broker at {host}:{port} did not accept the observer's subscription in {timeout:g} s")

    def stop(self) -> None:
        """Disconnect (the session stays on the broker until it expires)."""
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        self.connects += 1
        # Every topic an agent's outbox publishes on: a seq assigned to a samples upload is accounted too.
        client.subscribe([(f"{self.prefix}/+/{leaf}", 1) for leaf in ("state", "telemetry", "events", "samples")])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if msg.retain:
            self.retained_skipped += 1
            return
        parts = msg.topic.split("/")
        if len(parts) < 3:
            return
        device, kind = parts[-2], parts[-1]
        payload = msg.payload
        found = _SEQ.findall(payload)
        if not found:  # a Last Will, a direct state (no seq): not an outbox message
            return
        seq = int(found[-1])  # the outbox adds the message's own seq last (an event's detail may name another)
        with self._lock:
            seen = self.devices[device]
            if seq in seen.seqs:
                seen.duplicates += 1
                return
            seen.seqs.add(seq)
            seen.by_kind[kind] += 1
            ts = _TS.search(payload)
            if ts is not None:
                try:
                    seen.latencies.append(now - datetime.fromisoformat(ts.group(1).decode()).timestamp())
                except ValueError:
                    self.unparsed += 1
            if kind == "events":
                t = _TYPE.search(payload)
                if t is not None:
                    seen.drift.append((now, t.group(1).decode()))

    def snapshot(self) -> dict[str, Seen]:
        """A copy of what has arrived so far, per device."""
        with self._lock:
            return {
                k: Seen(set(v.seqs), v.duplicates, dict(v.by_kind), list(v.latencies), list(v.drift))
                for k, v in self.devices.items()
            }
