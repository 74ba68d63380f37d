"""The console's side of certificate renewal: it answers a device's CSR with a certificate.

A device asks on ``<prefix>/<device_id>/csr`` (:class:`~edgeops_core.messages.CertificateRequest`);
with ``edgeops fleet serve --ca DIR`` the console signs it with the fleet CA and sends the
certificate back in an ``install_cert`` command. What makes this safe:

* the broker's ACL lets a connection publish only under its own certificate's identity, so a
  request on device B's ``csr`` topic comes from B (or from the console itself);
* the request's common name must be that device id too (:meth:`CertificateAuthority.sign_csr`
  refuses anything else, and the message's ``device_id`` must match the topic);
* at most one certificate per device per :data:`SIGN_INTERVAL_S` (any request counts,
  refused ones too), and only for a device that holds a certificate of this CA that is
  neither revoked nor expired, and fewer than :data:`MAX_LIVE_CERTIFICATES` of them: a
  compromised device cannot make the CA mint certificates in a loop, and a device whose
  certificates were revoked (``edgeops fleet cert revoke DEVICE``) gets no new one before the
  broker has cut it off;
* one queued request per device: a flood from one device cannot push another's out.

Signing happens on this module's own thread (a P-256 signature and an index write: about a
millisecond), never on paho's network thread; a full queue drops the request (the device asks
again an hour later).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edgeops_core import DEFAULT_PREFIX, Event, InputError, check_device_id, parse_command, parse_topic
from edgeops_core.messages import CertificateRequest, MessageError, install_cert_command

if TYPE_CHECKING:
    from edgeops_fleet.link import BrokerUrl

__all__ = ["MAX_LIVE_CERTIFICATES", "RENEW_OUTCOMES", "SIGN_INTERVAL_S", "CertificateSigner", "request_renewals"]

log = logging.getLogger(__name__)

#: At most one certificate per device in this many seconds.
SIGN_INTERVAL_S = 600.0
#: A device with this many unrevoked, unexpired certificates gets no more (revoke old ones).
MAX_LIVE_CERTIFICATES = 4
_QUEUE = 256


def _device_of(topic: str) -> str:
    """The device level of ``<prefix>/<device>/csr`` without validating it (validation is :meth:`CertificateSigner.handle`'s)."""
    parts = topic.rsplit("/", 2)
    return parts[-2] if len(parts) == 3 else topic


class CertificateSigner:
    """Signs the devices' renewal requests with the fleet CA (a thread of the console)."""

    def __init__(self, ca_folder: Path, prefix: str, send: Callable[[str, bytes], None]) -> None:
        """Load the CA now, so a wrong ``--ca`` stops the console's start.

        Args:
            ca_folder: the CA folder (``edgeops fleet ca init``).
            prefix: the topic prefix.
            send: ``(device_id, command payload)`` → publish on the device's ``cmd``.

        Raises:
            InputError: the CA folder cannot be used.
        """
        from edgeops_fleet.pki import CertificateAuthority

        self.ca = CertificateAuthority.load(ca_folder)
        self.prefix = prefix
        self._send = send
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=_QUEUE)
        self._last: dict[str, float] = {}
        self._waiting: set[str] = set()  # devices with a request in the queue
        self._lock = threading.Lock()
        self.counters = {"signed": 0, "refused": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._run, name="console-certs", daemon=True)

    def start(self) -> None:
        """Start signing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the request at hand."""
        if self._thread.is_alive():
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                self._queue.get_nowait()
                self._queue.put_nowait(None)
            self._thread.join(timeout=5)

    def take(self, topic: str, payload: bytes) -> None:
        """paho's thread: hand a request over (never blocks; one queued per device)."""
        device = _device_of(topic)
        with self._lock:
            if device in self._waiting:
                self.counters["dropped"] += 1
                return
            try:
                self._queue.put_nowait((topic, payload))
            except queue.Full:
                self.counters["dropped"] += 1
                return
            self._waiting.add(device)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._lock:
                self._waiting.discard(_device_of(item[0]))
            try:
                self.handle(*item)
            except Exception:  # one bad request must not end the signer
                log.exception("certificate request on %s not handled", item[0])

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> str | None:
        """Sign one request and send the certificate; why it was refused, or ``None``."""
        from edgeops_fleet.pki import PkiError

        now = time.monotonic() if now is None else now
        try:
            device_id, _ = parse_topic(self.prefix, topic)
            last = self._last.get(device_id)
            if last is not None and now - last < SIGN_INTERVAL_S:
                raise MessageError(f"{device_id} asked {now - last:.0f} s ago (at most one request per {SIGN_INTERVAL_S:.0f} s)")
            self._last[device_id] = now  # every request counts: junk too
            request = CertificateRequest.from_json(payload)
            if request.device_id != device_id:
                raise MessageError(f"the request on {device_id}'s topic names device {request.device_id!r}")
            self._check_live(device_id)
            pem = self.ca.sign_csr(request.csr.encode(), identity=device_id)
        except (InputError, PkiError) as exc:
            self.counters["refused"] += 1
            log.warning("certificate request on %s refused: %s", topic, exc)
            return str(exc)
        self._send(device_id, install_cert_command(pem.decode()))
        self.counters["signed"] += 1
        log.info("signed a new certificate for %s (%s)", device_id, request.reason)
        return None

    def _check_live(self, device_id: str) -> None:
        """Refuse a device with no valid certificate of this CA left, or with too many.

        Raises:
            MessageError: why.
        """
        from datetime import UTC, datetime

        now = datetime.now(UTC)
        live = [r for r in self.ca.issued() if r["identity"] == device_id and r["revoked_at"] is None and r["not_after"] > now]
        if not live:
            raise MessageError(
                f"{device_id} holds no certificate of this CA that is neither revoked nor expired: provision it again"
            )
        if len(live) >= MAX_LIVE_CERTIFICATES:
            raise MessageError(
                f"{device_id} already holds {len(live)} valid certificates: "
                "revoke the old ones (edgeops fleet cert revoke --serial)"
            )


#: How a device answered ``edgeops fleet cert renew``.
RENEW_OUTCOMES = ("renewed", "failed", "rejected", "requested", "timed_out")


def request_renewals(
    broker: BrokerUrl,
    devices: Sequence[str],
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 60.0,
    connect_timeout_s: float = 10.0,
) -> dict[str, tuple[str, str]]:
    """Send ``renew_cert`` to ``devices`` and follow each to ``cert_renewed`` or a failure.

    The certificate itself comes from a console started with ``--ca`` (this command only asks
    the devices); a device whose request was sent but not answered in time is ``requested``.

    Returns:
        ``{device_id: (outcome, message)}`` with outcomes from :data:`RENEW_OUTCOMES`.

    Raises:
        InputError: no device or an invalid device id.
        BrokerError: the broker does not accept the connection in time.
    """
    from edgeops_core.messages import renew_cert_command
    from edgeops_fleet.link import command_and_follow

    ids = list(dict.fromkeys(check_device_id(d) for d in devices))
    if not ids:
        raise InputError("cert renew needs at least one device id")
    payload = renew_cert_command()
    command_id = parse_command(payload).id
    answers: dict[str, tuple[str, str]] = {}
    final = ("renewed", "failed", "rejected")

    def on_event(device_id: str, event: Event) -> bool:
        detail, kind = event.detail, event.type
        mine = detail.get("id") == command_id
        if answers.get(device_id, ("", ""))[0] not in final:
            if kind == "cert_renewed":
                answers[device_id] = ("renewed", f"serial {detail.get('serial')}, valid until {detail.get('not_after')}")
            elif kind == "cert_renewal_failed" or (kind == "command_failed" and mine):
                answers[device_id] = ("failed", str(detail.get("message", ""))[:500])
            elif kind == "command_rejected" and mine:
                answers[device_id] = ("rejected", str(detail.get("message", ""))[:500])
            elif kind == "command_done" and mine:
                answers[device_id] = (
                    "requested",
                    "the device sent its CSR; no certificate came back yet (is a console running with --ca?)",
                )
        return all(answers.get(d, ("", ""))[0] in final for d in ids)

    command_and_follow(broker, ids, payload, on_event, prefix=prefix, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    return {d: answers.get(d, ("timed_out", f"no answer within {timeout_s:g} s")) for d in ids}
