"""The fleet as the broker's retained states show it (``edgeops fleet status``).

Every agent keeps a retained ``<prefix>/<id>/state`` (its Last Will turns it to
``online: false``), so subscribing to ``<prefix>/+/state`` makes the broker send the last
state of every device it knows, at once. :func:`fleet_status` collects them until no new
one arrived for a short quiet span after the subscription was acknowledged (or a bound).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeops_core import DEFAULT_PREFIX, InputError, MessageError, State, parse_topic
from edgeops_fleet.link import BrokerUrl, connect, new_client

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["DeviceStatus", "fleet_status"]


@dataclass(frozen=True)
class DeviceStatus:
    """One device's retained state, flattened for a table.

    ``error`` is set (and the rest ``None``) when the retained payload does not parse.
    """

    device_id: str
    online: bool | None
    target: str | None
    model: str | None
    release: int | None
    version: str | None
    slot: str | None
    health: str | None
    ota_phase: str | None
    ota_deploy_id: str | None
    ota_release: int | None
    last_error: str | None
    ts: str | None
    error: str | None = None

    @classmethod
    def from_state(cls, state: State) -> DeviceStatus:
        """Flatten a parsed state."""
        b, o = state.bundle, state.ota
        return cls(
            device_id=state.device_id,
            online=state.online,
            target=state.target,
            model=None if b is None else b.name,
            release=None if b is None else b.release,
            version=None if b is None else b.version,
            slot=None if b is None else b.slot,
            health=state.health,
            ota_phase=None if o is None else o.phase,
            ota_deploy_id=None if o is None else o.deploy_id,
            ota_release=None if o is None else o.release,
            last_error=state.last_error,
            ts=state.ts,
        )

    @classmethod
    def unreadable(cls, device_id: str, error: str) -> DeviceStatus:
        """A row for a retained payload that does not parse."""
        blank: dict[str, Any] = dict.fromkeys(cls.__dataclass_fields__)
        return cls(**{**blank, "device_id": device_id, "error": error})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def fleet_status(
    broker: BrokerUrl,
    *,
    prefix: str = DEFAULT_PREFIX,
    quiet_s: float = 0.5,
    max_wait_s: float = 5.0,
    connect_timeout_s: float = 10.0,
) -> list[DeviceStatus]:
    """Every device with a retained state under ``prefix``, sorted by id.

    Args:
        broker: where the broker listens.
        prefix: the topic prefix.
        quiet_s: stop once no state arrived for this long after the subscription was acknowledged.
        max_wait_s: stop after this long whatever arrives (a fleet publishing constantly).
        connect_timeout_s: how long to wait for the broker.

    Raises:
        BrokerError: the broker does not accept the connection in time.
    """

    seen: dict[str, DeviceStatus] = {}
    lock = threading.Lock()
    connected, subscribed = threading.Event(), threading.Event()
    last = [time.monotonic()]

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: Any, props: object) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe(f"{prefix}/+/state", qos=1)
            connected.set()

    def on_subscribe(client: mqtt.Client, userdata: object, mid: int, reasons: object, props: object) -> None:
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, _ = parse_topic(prefix, message.topic)
        except InputError:
            return
        try:
            state = State.from_json(bytes(message.payload))
            if state.device_id != device_id:
                raise MessageError(f"the state on {device_id}'s topic names device {state.device_id!r}")
            row = DeviceStatus.from_state(state)
        except MessageError as exc:
            row = DeviceStatus.unreadable(device_id, f"unreadable state: {exc}")
        with lock:
            seen[device_id] = row
            last[0] = time.monotonic()

    client = new_client(broker)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    connect(client, broker, clean_start=True, session_expiry_s=0, timeout_s=connect_timeout_s, connected=connected)
    try:
        deadline = time.monotonic() + max_wait_s
        subscribed.wait(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            with lock:
                quiet_for = time.monotonic() - last[0]
            if subscribed.is_set() and quiet_for >= quiet_s:
                break
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return [seen[k] for k in sorted(seen)]
