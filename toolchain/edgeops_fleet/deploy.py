"""Deploying a verified bundle to devices over MQTT (issue 8, ADR 0012): the console side.

A :class:`Deployer` announces one deploy and sees it through::

    verified bundle ──announce──▶ Deploy ──deploy command (QoS 1)──▶ <id>/cmd, each device
    <id>/ota_request ──▶ BlockServer ──binary frames (QoS 1)──▶ <id>/ota_block
    <id>/events, <id>/state ──▶ per-device progress, until the one final event

It holds one paho client with a persistent session (a fixed client id, ``clean_start`` on
the first connect only, a session expiry past the timeout), so a broker restart or a
dropped link costs no subscription and no acknowledged message. A device that is offline
when the command is sent gets it from its own persistent session when it comes back; the
deployer keeps serving until every device reported its final event or the timeout passed.

Blocks are served by one worker, and only while the console is connected: a block handed
to paho while the link is down would be queued and sent once more after the device asked
for it again, so the bytes re-sent after an outage stay those the device still lacks.

Invariants: a device's outcome is its *first* final event for this deploy id (a repeat is
counted, never overwrites it); events and states of other deploys, other devices or that do
not parse are ignored. The deployer never installs or decides anything on a device.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from edgeops_core import (
    DEFAULT_PREFIX,
    OTA_FINAL_EVENTS,
    Event,
    InputError,
    MessageError,
    OtaOutcome,
    OtaProgress,
    State,
    VerifiedBundleFile,
    check_device_id,
    deploy_command,
    device_topic,
    parse_topic,
)
from edgeops_fleet.errors import SenderError
from edgeops_fleet.link import BrokerUrl, connect, new_client
from edgeops_fleet.ota import BlockServer, announce

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["DEVICE_OUTCOMES", "Deployer", "DeviceReport", "new_deploy_id"]

log = logging.getLogger(__name__)

#: How a device's deploy ended, as the console reports it: the three final events, the
#: command refused by an agent that does not take it, or no final event before the timeout.
DEVICE_OUTCOMES = ("committed", "rolled_back", "failed", "rejected", "timed_out")


def new_deploy_id(now: datetime | None = None) -> str:
    """A fresh deploy id: ``d-<UTC time>-<6 random hex digits>`` (sortable, unique per run)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return f"d-{stamp}-{secrets.token_hex(3)}"


@dataclass
class DeviceReport:
    """One device's view of the deploy.

    Attributes:
        device_id: the device.
        online: from its retained state (``None``: no state seen yet).
        phase: the last OTA phase it reported for this deploy (``None``: none yet).
        blocks_received, blocks_total: its last reported progress.
        bytes_sent: block bytes the console published to it.
        outcome: one of :data:`DEVICE_OUTCOMES` once it ended, else ``None``.
        reason, message: why it did not commit (``reason`` from ``OTA_REASONS``,
            ``command_rejected`` or ``timeout``).
        final_events: final events seen for this deploy id (exactly one when it ended).
        active_release: the release its retained state reports active.
    """

    device_id: str
    online: bool | None = None
    phase: str | None = None
    blocks_received: int = 0
    blocks_total: int = 0
    bytes_sent: int = 0
    outcome: str | None = None
    reason: str | None = None
    message: str | None = None
    final_events: int = 0
    active_release: int | None = None

    @property
    def done(self) -> bool:
        """Whether this device's deploy ended (any outcome)."""
        return self.outcome is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "device_id": self.device_id,
            "outcome": self.outcome,
            "reason": self.reason,
            "message": self.message,
            "online": self.online,
            "phase": self.phase,
            "blocks_received": self.blocks_received,
            "blocks_total": self.blocks_total,
            "bytes_sent": self.bytes_sent,
            "final_events": self.final_events,
            "active_release": self.active_release,
        }


@dataclass
class _Shared:
    reports: dict[str, DeviceReport]
    lock: threading.Lock = field(default_factory=threading.Lock)


class Deployer:
    """Sends one verified bundle to a set of devices and follows each to its final event.

    Args:
        bundle: what :func:`~edgeops_core.verify_bundle_file` returned for the file.
        devices: the device ids (duplicates are dropped, order kept).
        broker: where the broker listens.
        prefix: the topic prefix.
        max_bytes_per_s: per-device byte-rate cap, or ``None``.
        deploy_id: the deploy id (default :func:`new_deploy_id`).
        block_size: the block size (default ``choose_block_size``).
        connect_timeout_s: how long :meth:`start` waits for the broker.
        retry_bad: ask devices to fetch the bundle even if they rolled this sha256 back before.

    Raises:
        InputError: no device, an invalid device id, or a rate cap that is not > 0.
        SenderError: the bundle file cannot be read or changed since it was verified.
    """

    def __init__(
        self,
        bundle: VerifiedBundleFile,
        devices: Sequence[str],
        broker: BrokerUrl,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_bytes_per_s: float | None = None,
        deploy_id: str | None = None,
        block_size: int | None = None,
        connect_timeout_s: float = 10.0,
        retry_bad: bool = False,
    ) -> None:
        """Announce the deploy and open the bundle; nothing is sent until :meth:`start`."""
        ids = list(dict.fromkeys(check_device_id(d) for d in devices))
        if not ids:
            raise InputError("a deploy needs at least one device (--device ID)")
        if max_bytes_per_s is not None and not 0 < max_bytes_per_s < math.inf:
            raise InputError(f"the rate cap must be > 0 bytes/s, got {max_bytes_per_s!r}")
        self.broker, self.prefix = broker, prefix
        self.devices = tuple(ids)
        self.connect_timeout_s = connect_timeout_s
        try:
            self.deploy = announce(bundle, deploy_id=deploy_id or new_deploy_id(), block_size=block_size)
        except MessageError as exc:
            raise InputError(str(exc)) from exc
        self.command = deploy_command(self.deploy, retry_bad=retry_bad)
        self.server = BlockServer(
            bundle.path, self.deploy, self._publish_block, devices=ids, prefix=prefix, max_bytes_per_s=max_bytes_per_s
        )
        self._shared = _Shared({d: DeviceReport(d, blocks_total=self.deploy.block_count) for d in ids})
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sent_command = False
        self._worker: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self.fatal: SenderError | None = None
        self.started_at: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, subscribe, send the deploy command to every device and start serving.

        Raises:
            BrokerError: the broker does not accept the connection in time.
        """
        import paho.mqtt.client as mqtt

        client = new_client(self.broker, f"edgeops-fleet-{self.deploy.deploy_id}")
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.max_inflight_messages_set(64)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self.started_at = time.monotonic()
        connect(
            client,
            self.broker,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            session_expiry_s=24 * 3600,
            timeout_s=self.connect_timeout_s,
            connected=self._connected,
        )
        self._worker = threading.Thread(target=self._serve, name="ota-deployer", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop serving, end the session (expiry 0) and disconnect (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=10)
            self._worker = None
        self.server.stop()
        client, self._client = self._client, None
        if client is not None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0  # the deploy is over: the broker may forget this session
            try:
                client.disconnect(properties=props)
            finally:
                client.loop_stop()

    def wait(
        self, timeout_s: float, *, on_tick: Callable[[list[DeviceReport]], None] | None = None, tick_s: float = 0.25
    ) -> list[DeviceReport]:
        """Serve until every device ended or ``timeout_s`` passed since :meth:`start`; the reports.

        A device without a final event at the timeout ends ``timed_out``. ``on_tick`` gets
        a snapshot every ``tick_s`` (for a live table).
        """
        started = self.started_at if self.started_at is not None else time.monotonic()
        while True:
            reports = self.reports()
            if on_tick is not None:
                on_tick(reports)
            if all(r.done for r in reports):
                return reports
            left = started + timeout_s - time.monotonic()
            if left <= 0 or self.fatal is not None:
                break
            time.sleep(min(tick_s, left))
        why = f"the sender stopped: {self.fatal}" if self.fatal else f"no final event within {timeout_s:g} s"
        with self._shared.lock:
            for report in self._shared.reports.values():
                if report.outcome is None:
                    report.outcome, report.reason = "timed_out", "timeout"
                    report.message = f"{why} (last phase: {report.phase or 'none reported'})"
        return self.reports()

    def run(self, timeout_s: float, *, on_tick: Callable[[list[DeviceReport]], None] | None = None) -> list[DeviceReport]:
        """:meth:`start`, :meth:`wait`, :meth:`close`."""
        self.start()
        try:
            return self.wait(timeout_s, on_tick=on_tick)
        finally:
            self.close()

    def reports(self) -> list[DeviceReport]:
        """A snapshot of every device's report, in the order the devices were given."""
        with self._shared.lock:
            out = []
            for device_id, r in self._shared.reports.items():
                copy = DeviceReport(**{k: getattr(r, k) for k in r.__dataclass_fields__})
                copy.bytes_sent = self.server.stats(device_id).bytes_sent
                out.append(copy)
            return out

    # -- serving -------------------------------------------------------------------------------

    def _publish_block(self, topic: str, payload: bytes) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = self._client
        if client is None:
            raise SenderError("the deployer is closed")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = "application/octet-stream"
        client.publish(topic, payload, qos=1, properties=props)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._connected.is_set():  # hold the requests; see the module docstring
                self._connected.wait(0.2)
                continue
            self._wake.clear()
            try:
                wait = self.server.serve_once()
            except SenderError as exc:  # the file changed under us: no device can finish
                log.error("%s", exc)
                self.fatal = exc
                return
            if wait != 0:
                self._wake.wait(0.5 if wait is None else min(wait, 0.5))

    # -- paho callbacks (paho's network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("the broker refused the connection: %s", reason)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Requests and blocks are a request/response exchange: Nagle's algorithm would hold
            # a small PUBACK or SUBSCRIBE behind an unacknowledged segment for a delayed ACK (40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for device_id in self.devices:
            for leaf in ("ota_request", "events", "state"):
                client.subscribe(device_topic(self.prefix, device_id, leaf), qos=1)
        if not self._sent_command:  # once: the session re-sends it if it was not acknowledged
            self._sent_command = True
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            for device_id in self.devices:
                p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                p.ContentType = "application/json"
                p.PayloadFormatIndicator = 1
                client.publish(device_topic(self.prefix, device_id, "cmd"), self.command, qos=1, properties=p)
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._take(message.topic, bytes(message.payload))
        except Exception:  # paho would re-raise it and end its network thread
            log.exception("message on %s not handled", message.topic)

    def _take(self, topic: str, payload: bytes) -> None:
        try:
            device_id, leaf = parse_topic(self.prefix, topic)
        except InputError:
            return
        report = self._shared.reports.get(device_id)
        if report is None:
            return
        if leaf == "ota_request":
            if self.server.on_message(topic, payload):
                self._wake.set()
            return
        try:
            if leaf == "events":
                self._take_event(report, Event.from_json(payload))
            elif leaf == "state":
                self._take_state(report, State.from_json(payload))
        except MessageError as exc:
            log.info("%s from %s ignored: %s", leaf, device_id, exc)

    def _take_progress(self, report: DeviceReport, progress: OtaProgress | None) -> None:
        if progress is None or progress.deploy_id != self.deploy.deploy_id or report.done:
            return
        report.phase = progress.phase
        report.blocks_received, report.blocks_total = progress.blocks_received, progress.blocks_total

    def _take_event(self, report: DeviceReport, event: Event) -> None:
        with self._shared.lock:
            if event.type == "ota_progress":
                self._take_progress(report, OtaProgress.parse(event.detail))
            elif event.type in OTA_FINAL_EVENTS:
                outcome = OtaOutcome.from_event(event)
                if outcome.deploy_id != self.deploy.deploy_id:
                    return
                report.final_events += 1
                if report.outcome is None:
                    report.outcome = outcome.type.removeprefix("ota_")
                    report.reason, report.message = outcome.reason, outcome.message
                    report.phase = report.outcome
                    if outcome.type == "ota_committed":
                        report.blocks_received = report.blocks_total
                        report.active_release = outcome.release
            elif (
                event.type == "command_rejected" and event.detail.get("id") == self.deploy.deploy_id and report.outcome is None
            ):  # an agent that does not take this deploy command at all
                report.outcome, report.reason = "rejected", "command_rejected"
                report.message = str(event.detail.get("message") or "the agent rejected the deploy command")

    def _take_state(self, report: DeviceReport, state: State) -> None:
        if not state.online:  # its Last Will (a crash, a kill -9, a lost link): it asks again when back
            dropped = self.server.forget(report.device_id)
            if dropped:
                log.info("%s went offline: %d requested block(s) not sent", report.device_id, dropped)
        with self._shared.lock:
            report.online = state.online
            if state.bundle is not None:
                report.active_release = state.bundle.release
            self._take_progress(report, state.ota)
