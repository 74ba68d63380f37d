"""Over-the-air updates for the OTA faults: a sender of blocks with a fault knob.

One :class:`UpdateSender` per OTA fault: it verifies the update bundle (as the console does
before it offers one), announces it (:func:`edgeops_core.ota_server.announce`), sends the
device the ``deploy`` command and serves its block requests with the same
:class:`~edgeops_core.ota_server.BlockServer` the console uses, on a paho client of its own.
Two knobs make the faults:

- ``corrupt_first``: the first block sent has one byte flipped, so it arrives with the wrong
  sha256. The agent must refuse it and ask again; the update must still commit.
- ``max_bytes_per_s``: a slow transfer, so that a SIGKILL lands in the middle of it. The
  agent must resume it after its restart (only the missing blocks) and commit.

The sender follows the device's ``events`` for the deploy's one final event
(``ota_committed``, ``ota_rolled_back`` or ``ota_failed``) and forgets queued requests when
the device's Last Will says it went offline, as the console does.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeops_core import (
    DEFAULT_PREFIX,
    OTA_FINAL_EVENTS,
    Event,
    InputError,
    MessageError,
    OtaOutcome,
    State,
    deploy_command,
    device_topic,
    load_public_key,
    parse_topic,
    verify_bundle_file,
)
from edgeops_core.ota_server import BlockServer, announce
from edgeops_sim.errors import SimError

__all__ = ["UpdateSender"]


class UpdateSender:
    """Deploy one bundle to one device over the air (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        bundle: Path,
        trust: Path,
        device: str,
        *,
        corrupt_first: bool = False,
        max_bytes_per_s: float | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        """Verify and announce the bundle and open the block server (nothing is sent yet).

        Raises:
            BundleError: the update bundle does not verify with ``trust``.
            SenderError: it cannot be read.
        """
        verified = verify_bundle_file(bundle, [load_public_key(trust)])
        self.device, self.prefix = device, prefix
        self.deploy = announce(verified, deploy_id=f"sim-{device}-{os.urandom(4).hex()}")
        self.release = verified.manifest.release
        self.server = BlockServer(
            bundle, self.deploy, self._publish, devices=[device], prefix=prefix, max_bytes_per_s=max_bytes_per_s
        )
        self._corrupt = corrupt_first
        self.corrupted = 0
        self.outcome: OtaOutcome | None = None
        self.sent_at: float | None = None
        self.ended_at: float | None = None
        self._done = threading.Event()
        self._connected = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edgeops-sim-ota-{device}-{os.urandom(3).hex()}", protocol=mqtt.MQTTv5
        )
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self._connected.clear()
        client.on_message = self._on_message
        self.client = client
        self._address = (host, port)

    def start(self) -> None:
        """Connect and subscribe; serve blocks from now on.

        Raises:
            SimError: the broker did not accept the connection within 10 s.
        """
        try:
            self.client.connect(*self._address, keepalive=10)
        except OSError as exc:
            raise SimError(f"the update sender cannot reach the broker: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(10):
            raise SimError("the update sender's connection was not accepted in 10 s")
        self.server.start()

    def send(self) -> None:
        """Send the device the ``deploy`` command (QoS 1)."""
        self.sent_at = time.time()
        self.client.publish(device_topic(self.prefix, self.device, "cmd"), deploy_command(self.deploy), qos=1)

    def wait_transfer_started(self, timeout: float) -> bool:
        """Wait until at least one block went out to the device."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.stats(self.device).blocks_sent > 0:
                return True
            time.sleep(0.02)
        return False

    def report(self) -> dict[str, Any]:
        """What happened to this update, for the summary."""
        stats = self.server.stats(self.device)
        out = self.outcome
        return {
            "device": self.device,
            "deploy_id": self.deploy.deploy_id,
            "release": self.release,
            "blocks": self.deploy.block_count,
            "blocks_sent": stats.blocks_sent,
            "corrupted_sent": self.corrupted,
            "outcome": out.type.removeprefix("ota_") if out is not None else None,
            "reason": out.reason if out is not None else None,
            "seconds": round(self.ended_at - self.sent_at, 3) if self.ended_at and self.sent_at else None,
        }

    def stop(self) -> None:
        """Stop serving and disconnect."""
        self.server.stop()
        self.client.disconnect()
        self.client.loop_stop()

    # paho's network thread ------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes) -> None:
        if self._corrupt:
            self._corrupt = False
            self.corrupted += 1
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])  # the last data byte: a wrong sha256
        self.client.publish(topic, payload, qos=1)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        for leaf in ("ota_request", "events", "state"):
            client.subscribe(device_topic(self.prefix, self.device, leaf), qos=1)
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            _, leaf = parse_topic(self.prefix, msg.topic)
            if leaf == "ota_request":
                self.server.on_message(msg.topic, bytes(msg.payload))
            elif leaf == "state" and not msg.retain:
                if not State.from_json(bytes(msg.payload)).online:  # its Last Will: it asks again when back
                    self.server.forget(self.device)
            elif leaf == "events":
                event = Event.from_json(bytes(msg.payload))
                if event.type in OTA_FINAL_EVENTS and self.outcome is None:
                    outcome = OtaOutcome.from_event(event)
                    if outcome.deploy_id == self.deploy.deploy_id:
                        self.outcome, self.ended_at = outcome, time.time()
                        self._done.set()
        except (InputError, MessageError):
            return  # not ours to judge here; the observer counts messages
