"""The device's TLS identity: its client certificate for the broker, the expiry watch and renewal.

``[mqtt] tls = { ca = "ca.crt", cert = "client.crt", key = "client.key" }`` in agent.toml turns
mutual TLS on (docs/security.md). From then on there is no plaintext connection: the
:class:`ssl.SSLContext` built here is the only way the link connects, it requires TLS 1.2 or
later, checks the broker's certificate against ``ca`` and its name against ``mqtt.host``.

Renewal (the console signs, the device keeps its key)::

    agent                                   console (edgeops fleet serve --ca DIR)
      new P-256 key -> <data>/tls/pending.key
      CSR (CN = device id) ── csr ─────────>  checks CN == the topic's device, signs
      <── cmd install_cert {certificate} ───
      certificate for the pending key, from the CA, for this device, valid now?
      key + certificate -> <data>/tls/next.pem
      reconnect with next.pem ──────────────> broker (mutual TLS)
      connected within RENEW_CONNECT_S: rename next.pem -> identity.pem (atomic), cert_renewed
      not connected: back to the old credentials, next.pem removed, cert_renewal_failed

The old credentials stay until a connection with the new ones has succeeded, and the swap
is one ``rename`` of one file that holds both the key and the certificate, so a crash at any
point leaves a key and a certificate that belong together. At start the agent uses, of the
configured files and ``identity.pem``, the usable pair issued last (this device, this CA,
valid from now: a device re-provisioned with new files uses them, a renewed one its
renewal); a ``next.pem`` left by a crash is an unproven swap and is deleted. Each pair gets
its own :class:`ssl.SSLContext`, handed to the link by reference.

``cryptography`` is imported only here, and only when TLS is configured.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeops_agent.errors import AgentError, ConfigError
from edgeops_agent.store import fsync_dir, write_durably
from edgeops_core.messages import MessageError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["Identity", "IdentityError", "Renewal", "TlsSettings"]

log = logging.getLogger(__name__)

#: How long a swap waits for the broker to accept the new credentials before going back.
RENEW_CONNECT_S = 20.0


class IdentityError(AgentError):
    """A certificate or key the agent was given cannot be used (says which and why)."""


@dataclass(frozen=True)
class TlsSettings:
    """``[mqtt] tls`` in agent.toml (paths resolved against the config file's folder)."""

    ca: Path
    cert: Path
    key: Path
    #: ``cert_expiring`` fires (once a day) when the certificate has fewer days left than this.
    warn_days: int = 14
    #: The agent asks the console for a new certificate when fewer days are left (0: never by itself).
    renew_days: int = 30


@dataclass(frozen=True)
class _Pair:
    cert: Path
    key: Path | None  # None: the key is in the certificate file
    certificate: x509.Certificate


def _load_cert(path: Path, what: str) -> x509.Certificate:
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"{what} {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{what} {path}: not a PEM certificate ({exc})") from exc


def _common_name(cert: x509.Certificate) -> str | None:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


class Identity:
    """The credentials one agent connects with, and their renewal."""

    def __init__(self, settings: TlsSettings, device_id: str, folder: Path, now: datetime | None = None) -> None:
        """Load the CA and the usable key and certificate issued last, and build the TLS context.

        Raises:
            ConfigError: the CA cannot be used, or neither the configured pair nor a renewal
                is a usable pair for this device from this CA.
        """
        self.settings = settings
        self.device_id = device_id
        self.folder = folder  # <data>/tls
        self._lock = threading.Lock()
        self.renewing = threading.Lock()  # one swap at a time
        try:
            self.ca = _load_cert(settings.ca, "mqtt.tls.ca")
        except IdentityError as exc:
            raise ConfigError(str(exc)) from exc
        self._context(None)  # the CA file itself must load
        if folder.is_dir():
            (folder / "next.pem").unlink(missing_ok=True)  # a swap a crash interrupted: never proven
            for stale in folder.glob(".*.pem.*"):  # write_durably's temporary files a kill -9 left
                stale.unlink(missing_ok=True)
            for stale in folder.glob(".pending.key.*"):
                stale.unlink(missing_ok=True)
        self.pair, self.context = self._choose(now or datetime.now(UTC))

    # which credentials ----------------------------------------------------------------------

    def _context(self, pair: _Pair | None) -> ssl.SSLContext:
        """A new client context (TLS 1.2+, the fleet CA only, names checked) for ``pair``.

        A new context per pair, never one reloaded in place: a handshake that ran while
        ``load_cert_chain`` was replacing the pair would go out without a certificate.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED on
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=str(self.settings.ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.ca {self.settings.ca}: cannot use it: {exc}") from exc
        if pair is not None:
            try:
                ctx.load_cert_chain(str(pair.cert), None if pair.key is None else str(pair.key))
            except (OSError, ssl.SSLError) as exc:
                raise IdentityError(f"{pair.cert}: the key and certificate cannot be used together: {exc}") from exc
        return ctx

    def _usable(self, pair: _Pair, now: datetime) -> str | None:
        """Why ``pair``'s certificate cannot be this device's identity now, or ``None``."""
        from cryptography.exceptions import InvalidSignature

        cert = pair.certificate
        if _common_name(cert) != self.device_id:
            return f"it is for {_common_name(cert)!r}, not for {self.device_id!r}"
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            return "it is not issued by the CA in mqtt.tls.ca"
        if now < cert.not_valid_before_utc:
            return f"it is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        return None

    def _choose(self, now: datetime) -> tuple[_Pair, ssl.SSLContext]:
        """Of the configured pair and ``identity.pem``, the usable one issued last.

        Usable: key and certificate belong together, the certificate names this device, the
        fleet CA issued it and it is valid from now on (an expired one is still used if it is
        all there is: the broker says why it refuses, and the state shows it). Issued last,
        not expiring last: a device re-provisioned after a leak, even for fewer days, must
        use its new files, not an older renewal.
        """
        found: list[tuple[_Pair, ssl.SSLContext]] = []
        problems: list[str] = []
        candidates: list[tuple[str, Path, Path | None]] = [("mqtt.tls.cert", self.settings.cert, self.settings.key)]
        if (self.folder / "identity.pem").exists():
            candidates.append(("the renewed identity", self.folder / "identity.pem", None))
        for what, cert_path, key_path in candidates:
            try:
                pair = _Pair(cert_path, key_path, _load_cert(cert_path, what))
                ctx = self._context(pair)
            except IdentityError as exc:
                problems.append(str(exc))
                continue
            why = self._usable(pair, now)
            if why is not None:
                problems.append(f"{what} {cert_path}: {why}")
                continue
            found.append((pair, ctx))
        if not found:
            raise ConfigError(f"no usable TLS identity: {'; '.join(problems)}")
        for problem in problems:
            log.error("ignoring a TLS identity: %s", problem)
        return max(found, key=lambda f: (f[0].certificate.not_valid_before_utc, f[0].certificate.not_valid_after_utc))

    @property
    def not_after(self) -> datetime:
        """When the certificate in use expires (UTC)."""
        return self.pair.certificate.not_valid_after_utc

    @property
    def serial(self) -> int:
        """The serial number of the certificate in use."""
        return int(self.pair.certificate.serial_number)

    def days_left(self, now: datetime | None = None) -> float:
        """Days until the certificate in use expires (negative once expired)."""
        now = now or datetime.now(UTC)
        return (self.not_after - now).total_seconds() / 86400

    # renewal --------------------------------------------------------------------------------

    def new_request(self) -> str:
        """A CSR for this device (PEM text), for the key in ``pending.key`` (mode 0600).

        The pending key is reused until a renewal ends (committed or abandoned), so the answer
        to any earlier request for it still fits; a new one is made only when there is none
        (or it is unreadable).

        Raises:
            IdentityError: the key cannot be stored.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        with self._lock:
            key = self._pending_key()
            if key is None:
                key = ec.generate_private_key(ec.SECP256R1())
                pem = key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                try:
                    write_durably(self.folder / "pending.key", pem)  # mkstemp: 0600 from the first byte
                except OSError as exc:
                    raise IdentityError(f"cannot store the new key in {self.folder}: {exc.strerror or exc}") from exc
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def _pending_key(self) -> ec.EllipticCurvePrivateKey | None:
        """The pending key, or ``None`` when there is none or it is damaged (logged)."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        path = self.folder / "pending.key"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            log.error("pending key %s is unusable (%s); making a new one", path, exc)
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            log.error("pending key %s is not an EC key; making a new one", path)
            return None
        return key

    def stage(self, certificate_pem: str, now: datetime | None = None) -> _Pair:
        """Check the console's certificate and write it with the pending key to ``next.pem``.

        Raises:
            IdentityError: no request is pending, or the certificate is not for the pending
                key, not for this device, not from the fleet CA, or not valid now.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        now = now or datetime.now(UTC)
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode())
            public = cert.public_key()
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"install_cert: not a usable PEM certificate ({exc})") from exc
        with self._lock:
            key = self._pending_key()
            if key is None:
                raise IdentityError("install_cert: no certificate request is pending")
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            enc = serialization.Encoding.PEM
            if not isinstance(public, type(key.public_key())) or public.public_bytes(enc, spki) != key.public_key().public_bytes(
                enc, spki
            ):
                raise IdentityError("install_cert: the certificate is not for the pending key (an answer to another request?)")
            why = self._usable(_Pair(self.folder / "next.pem", None, cert), now)
            if why is None and now >= cert.not_valid_after_utc:
                why = f"it expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            if why is not None:
                raise IdentityError(f"install_cert: {why}")
            staged = self.folder / "next.pem"
            key_pem = key.private_bytes(enc, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            try:
                write_durably(staged, key_pem + cert.public_bytes(enc))
            except OSError as exc:
                raise IdentityError(f"cannot stage the new certificate in {self.folder}: {exc.strerror or exc}") from exc
            return _Pair(staged, None, cert)

    def context_for(self, staged: _Pair) -> ssl.SSLContext:
        """A TLS context for ``staged`` (the link connects with it from its next connect on).

        Raises:
            IdentityError: the staged key and certificate do not load together.
        """
        return self._context(staged)

    def commit(self, staged: _Pair, context: ssl.SSLContext) -> None:
        """The broker took the new credentials: make them the device's (one atomic rename).

        Raises:
            IdentityError: the rename failed (the caller goes back to :attr:`context`).
        """
        final = self.folder / "identity.pem"
        with self._lock:
            try:
                staged.cert.replace(final)
                fsync_dir(self.folder)
            except OSError as exc:
                raise IdentityError(f"cannot keep the new certificate: {exc.strerror or exc}") from exc
            (self.folder / "pending.key").unlink(missing_ok=True)
            self.pair, self.context = _Pair(final, None, staged.certificate), context

    def abandon(self, staged: _Pair) -> None:
        """The new credentials did not connect: the staged file and the pending key removed."""
        with self._lock:
            staged.cert.unlink(missing_ok=True)
            (self.folder / "pending.key").unlink(missing_ok=True)


#: How often the agent looks at its certificate's expiry (seconds).
CHECK_INTERVAL_S = 3600.0
#: How long an unanswered request waits before the agent asks again (seconds).
REQUEST_RETRY_S = 3600.0


class Renewal:
    """The agent's side of certificate renewal: expiry watch, requests, the swap.

    It owns nothing of the link: it is given how to publish a request (``publish``: the
    :class:`~edgeops_core.messages.CertificateRequest` dict → sent?), how to queue an event,
    and the link's controls (``use_context`` for the next connect, ``reconnect``,
    ``connects``, ``connected``).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        publish: Callable[[dict[str, Any]], bool],
        put_event: Callable[[str, Mapping[str, Any], str | None], None],
        use_context: Callable[[ssl.SSLContext], None],
        reconnect: Callable[[], None],
        connects: Callable[[], int],
        connected: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wire the renewal to the link (nothing happens until :meth:`check` or a command)."""
        self.identity = identity
        self._publish = publish
        self._put_event = put_event
        self._use_context = use_context
        self._reconnect = reconnect
        self._connects = connects
        self._connected = connected
        self._clock = clock
        self._next_check = 0.0
        self._requested_at: float | None = None
        self._failures = 0  # swaps the broker refused in a row: the retry waits longer each time

    def retry_after_s(self) -> float:
        """How long an unanswered or failed request waits before the agent asks again by itself."""
        return float(REQUEST_RETRY_S * 2 ** min(self._failures, 5))

    def check(self, now: datetime | None = None) -> None:
        """At most every :data:`CHECK_INTERVAL_S`: warn of an expiry, ask for a renewal when due."""
        mono = self._clock()
        if mono < self._next_check:
            return
        self._next_check = mono + CHECK_INTERVAL_S
        now = now or datetime.now(UTC)
        left = self.identity.days_left(now)
        s = self.identity.settings
        if left < s.warn_days:
            detail = {
                "serial": f"{self.identity.serial:x}",
                "not_after": _utc_text(self.identity.not_after),
                "days_left": round(left, 2),
            }
            try:  # once a day per certificate
                self._put_event("cert_expiring", detail, f"cert_expiring:{self.identity.serial:x}:{now:%Y-%m-%d}")
            except (MessageError, AgentError) as exc:  # a full disk: say so, keep serving
                log.error("cert_expiring not queued: %s", exc)
        due = s.renew_days > 0 and left < s.renew_days
        waiting = self._requested_at is not None and mono - self._requested_at < self.retry_after_s()
        if due and not waiting:
            self.request("expiring")

    def request(self, reason: str, command_id: str | None = None) -> dict[str, Any]:
        """Publish a CSR for the pending key (made now if there is none) on ``csr``; the ``command_done`` detail.

        Raises:
            IdentityError: the key cannot be stored, or the link is down (nothing was sent).
        """
        from edgeops_core.messages import CertificateRequest
        from edgeops_core.topics import utc_now_text

        csr = self.identity.new_request()
        message = CertificateRequest(
            device_id=self.identity.device_id, ts=utc_now_text(), csr=csr, reason=reason, command_id=command_id
        )
        self._requested_at = self._clock()
        if not self._publish(message.to_dict()):
            raise IdentityError("not connected to the broker: the certificate request was not sent (asked again later)")
        self._event("cert_renewal_requested", {"reason": reason, "serial": f"{self.identity.serial:x}"})
        return {"requested": True}

    def install(self, certificate_pem: str, *, timeout_s: float = RENEW_CONNECT_S) -> dict[str, Any]:
        """Swap to the console's certificate if the broker takes it; the ``command_done`` detail.

        Raises:
            IdentityError: the certificate is refused (nothing changed), or the broker did not
                accept a connection with it within ``timeout_s`` (the old credentials are back).
        """
        with self.identity.renewing:
            try:
                staged = self.identity.stage(certificate_pem)
                context = self.identity.context_for(staged)
            except IdentityError as exc:
                if (self.identity.folder / "next.pem").exists():
                    self.identity.abandon(_Pair(self.identity.folder / "next.pem", None, self.identity.pair.certificate))
                self._event("cert_renewal_failed", {"reason": "refused", "message": str(exc)})
                raise
            old = self.identity.serial
            before = self._connects()
            self._use_context(context)
            self._reconnect()
            deadline = self._clock() + timeout_s
            while not (self._connects() > before and self._connected.is_set()):
                if self._clock() >= deadline:
                    self._use_context(self.identity.context)
                    self.identity.abandon(staged)
                    self._failures += 1
                    message = (
                        f"the broker did not accept a connection with the new certificate within {timeout_s:g} s; "
                        f"kept the old one (asking again in {self.retry_after_s() / 3600:g} h)"
                    )
                    self._event("cert_renewal_failed", {"reason": "connect", "message": message})
                    raise IdentityError(message)
                time.sleep(0.05)
            try:
                self.identity.commit(staged, context)
            except IdentityError:
                self._use_context(self.identity.context)
                self.identity.abandon(staged)
                raise
            self._requested_at = None
            self._failures = 0
            self._next_check = 0.0
            detail = {
                "serial": f"{self.identity.serial:x}",
                "previous_serial": f"{old:x}",
                "not_after": _utc_text(self.identity.not_after),
            }
            self._event("cert_renewed", detail)
            return detail

    def _event(self, kind: str, detail: Mapping[str, Any]) -> None:
        try:
            self._put_event(kind, detail, None)
        except (MessageError, AgentError) as exc:
            log.error("%s not queued: %s", kind, exc)


def _utc_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
