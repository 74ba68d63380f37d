"""The fleet's certificate authority: the identities that clients of the broker connect with.

Every client of the fleet's broker proves who it is over mutual TLS with a certificate this
CA issued. A device's certificate names its device id; a console's names
``console:<name>`` (:func:`console_identity`). The broker takes the certificate's common
name as the MQTT user name (``use_identity_as_username``, :func:`write_broker_config`) and
its ACL grants rights by user name, so the CN *is* the identity everything else trusts.
``:`` is not allowed in a device id (:func:`edgeops_core.check_device_id`), so no device
can ever be issued a console's name or get a console's ACL rights.

A CA folder holds::

    ca.crt      the CA certificate: ECDSA P-256, CA:true with pathlen 0, keyCertSign + cRLSign
    ca.key      its private key (PKCS#8 PEM, unencrypted, mode 0600): keep the folder offline
    index.json  every certificate issued: serial (hex), identity, kind (client | server),
                validity, sha256 of the DER, revocation time; and the last CRL number
    crl.pem     the revocation list, derived from index.json and re-signed on every revoke;
                its nextUpdate is :data:`CRL_DAYS` ahead. OpenSSL refuses EVERY client
                once it has passed, so ``edgeops fleet ca crl --ca DIR`` must re-sign it
                (and the broker get the copy) well before then
    .lock       ``fcntl.flock``-ed around every read-modify-write of index.json and crl.pem

Invariants:

* index.json is the truth; crl.pem is always rebuilt from it, never edited.
* A certificate is recorded in index.json before any of its files are written, so a
  certificate that exists anywhere can be revoked (by identity or serial).
* index.json and crl.pem are replaced atomically (temporary file, fsync, rename, fsync of
  the folder) under the lock: two ``provision`` runs at once never lose an entry.
* A private key file is 0600 from its first byte (created by ``mkstemp``, then linked or
  renamed into place); no other file of an output folder is ever overwritten without
  ``force``.
* Every key is ECDSA P-256; signatures are ECDSA with SHA-256.

Errors: :class:`PkiError` (an :class:`~edgeops_core.InputError`), one line naming the file
or field and what was expected.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeops_core import DEFAULT_PREFIX, InputError, check_device_id

__all__ = [
    "CONSOLE_PREFIX",
    "CRL_DAYS",
    "DEVICE_READS",
    "DEVICE_WRITES",
    "CertificateAuthority",
    "IssuedFiles",
    "PkiError",
    "console_identity",
    "load_certificate_identity",
    "write_broker_config",
]

log = logging.getLogger(__name__)

#: Console identities are ``console:<name>``; ``:`` can never appear in a device id.
CONSOLE_PREFIX = "console:"
#: How far ahead a CRL's nextUpdate is set. Past it, OpenSSL (so Mosquitto) refuses every client.
CRL_DAYS = 365
#: Longest CSR accepted (a P-256 CSR is about 400 bytes of PEM); it may arrive over MQTT.
MAX_CSR_BYTES = 16 * 1024
#: Certificates start this far in the past, so a device whose clock is a little behind accepts them.
_BACKDATE = timedelta(minutes=5)
_INDEX_SCHEMA = 1
#: Longest common name X.509 allows (ub-common-name).
_MAX_CN = 64
_CA_FILES = ("ca.crt", "ca.key", "index.json", "crl.pem")
# A DNS name for a server certificate: dot-separated labels of letters, digits and '-'.
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class PkiError(InputError):
    """A CA folder, certificate, CSR, identity or output folder is unusable; the message names which."""


def console_identity(name: str = "main") -> str:
    """The certificate identity of the console called ``name``: ``console:<name>``.

    Raises:
        PkiError: ``name`` is not 1-56 letters, digits, ``.``, ``_`` or ``-`` (a CN holds 64 characters).
    """
    try:
        check_device_id(name)
        if len(name) > _MAX_CN - len(CONSOLE_PREFIX):
            raise InputError("too long")
    except InputError as exc:
        raise PkiError(
            f"console name {name!r} must be 1-{_MAX_CN - len(CONSOLE_PREFIX)} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        ) from exc
    return CONSOLE_PREFIX + name


def _check_identity(identity: str) -> str:
    """``identity`` if it is a device id or a console identity, else :class:`PkiError`."""
    if isinstance(identity, str) and identity.startswith(CONSOLE_PREFIX):
        console_identity(identity[len(CONSOLE_PREFIX) :])
        return identity
    try:
        return check_device_id(identity)
    except InputError as exc:
        raise PkiError(f"{exc} (or console:NAME for a console)") from exc


def _is_console(identity: str) -> bool:
    return identity.startswith(CONSOLE_PREFIX)


def _who(identity: str) -> str:
    """``device 'x'`` or ``console 'y'``, for messages."""
    if _is_console(identity):
        return f"console {identity[len(CONSOLE_PREFIX) :]!r}"
    return f"device {identity!r}"


@dataclass(frozen=True)
class IssuedFiles:
    """What :meth:`CertificateAuthority.issue` wrote: the CA certificate, the client's and its key.

    ``key`` is ``None`` when a CSR was signed: the private key stayed on the device.
    """

    ca: Path
    cert: Path
    key: Path | None


# -- files --------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, *, mode: int = 0o644, replace: bool) -> None:
    """Write ``path`` whole or not at all; 0600 until chmod-ed to ``mode``, so a key is never readable by others.

    ``replace`` False refuses an existing file, atomically (a hard link never overwrites).

    Raises:
        PkiError: the file exists and ``replace`` is False, or the folder cannot be written.
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600 whatever the umask
    except OSError as exc:
        raise PkiError(f"cannot write in {path.parent}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PkiError(f"{path} already exists; --force replaces it") from None
            finally:
                os.unlink(tmp)
    except PkiError:
        raise
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _not_the_ca_folder(out: Path, ca_folder: Path) -> None:
    """Refuse to write a client's or the broker's files into the CA folder (they travel; ca.key must not)."""
    if out.resolve() == ca_folder.resolve():
        raise PkiError(f"the output folder {out} is the CA folder: pick another (only the CA's files belong there)")


def _make_folder(path: Path, what: str) -> None:
    """Create ``path`` (mode 0700: it will hold a private key) unless it is already a folder."""
    if path.exists() and not path.is_dir():
        raise PkiError(f"{what} {path} is not a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc


def _read(path: Path, what: str, *, limit: int = 1 << 20) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise PkiError(f"{path} is missing: {what}") from None
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise PkiError(f"{path} is larger than {limit} bytes: not {what}")
    return data


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` exclusively (``flock``: also between threads, each opens its own descriptor)."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PkiError(f"cannot open the CA's lock file {folder / '.lock'}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _short(exc: BaseException) -> str:
    """``exc``'s message without cryptography's FAQ link (one line, to the point)."""
    text = re.sub(r"\s*See https://\S+ for more details\.?", "", str(exc)).strip()
    return " ".join(text.split())[:200] or type(exc).__name__


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _iso(dt: datetime) -> str:
    return _utc(dt).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: object, where: str) -> datetime:
    if not isinstance(text, str):
        raise PkiError(f"{where} must be a UTC time YYYY-MM-DDTHH:MM:SSZ, got {text!r}")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise PkiError(f"{where} must be a UTC time YYYY-MM-DDTHH:MM:SSZ, got {text!r}") from None


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)


def _common_name(name: x509.Name, where: str) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str):
        raise PkiError(f"{where} must name exactly one common name (CN), found {len(values)}")
    return values[0].value


# -- the index ----------------------------------------------------------------------------------


@dataclass
class _Index:
    """index.json in memory; read and written only under the CA's lock."""

    crl_number: int
    entries: list[dict[str, Any]]

    @staticmethod
    def load(path: Path) -> _Index:
        raw = _read(path, "the CA's index of issued certificates (index.json)", limit=64 << 20)
        try:
            doc = json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise PkiError(f"{path} is not JSON ({exc}); restore it from a backup of the CA folder") from exc
        if not isinstance(doc, dict) or doc.get("schema") != _INDEX_SCHEMA:
            raise PkiError(f"{path} must be an object with schema {_INDEX_SCHEMA}, got {str(doc)[:60]!r}")
        crl_number, entries = doc.get("crl_number"), doc.get("certificates")
        if not isinstance(crl_number, int) or isinstance(crl_number, bool) or crl_number < 0:
            raise PkiError(f"{path}: crl_number must be an integer >= 0, got {crl_number!r}")
        if not isinstance(entries, list):
            raise PkiError(f"{path}: certificates must be a list, got {type(entries).__name__}")
        seen: set[int] = set()
        for i, e in enumerate(entries):
            where = f"{path}: certificates[{i}]"
            if not isinstance(e, dict):
                raise PkiError(f"{where} must be an object")
            try:
                serial = int(e.get("serial"), 16)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise PkiError(f"{where}.serial must be a hex string, got {e.get('serial')!r}") from None
            if serial in seen:
                raise PkiError(f"{where}.serial {serial:x} is listed twice")
            seen.add(serial)
            if not isinstance(e.get("identity"), str) or e.get("kind") not in ("client", "server"):
                raise PkiError(f"{where} needs a string identity and kind client or server")
            for key in ("not_before", "not_after"):
                _parse_iso(e.get(key), f"{where}.{key}")
            if e.get("revoked_at") is not None:
                _parse_iso(e.get("revoked_at"), f"{where}.revoked_at")
        return _Index(crl_number, entries)

    def save(self, path: Path) -> None:
        doc = {"schema": _INDEX_SCHEMA, "crl_number": self.crl_number, "certificates": self.entries}
        _write_file(path, (json.dumps(doc, indent=1) + "\n").encode(), replace=True)


def _entry(cert: x509.Certificate, identity: str, kind: str) -> dict[str, Any]:
    return {
        "serial": format(cert.serial_number, "x"),
        "identity": identity,
        "kind": kind,
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
        "sha256": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "revoked_at": None,
    }


# -- the CA -------------------------------------------------------------------------------------


class CertificateAuthority:
    """The fleet CA in ``folder`` (layout in the module docstring).

    Build one with :meth:`init` (a new CA) or :meth:`load` (an existing folder). Every
    method that records something re-reads index.json under the folder's lock, so several
    processes may use one CA folder at once.

    Attributes:
        folder: the CA folder.
        certificate: the CA certificate (ca.crt).
    """

    def __init__(self, folder: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        """Use :meth:`init` or :meth:`load`; this trusts that ``key`` belongs to ``certificate``."""
        self.folder = folder
        self.certificate = certificate
        self._key = key

    # -- creating and loading ----------------------------------------------------------------

    @classmethod
    def init(cls, folder: Path, *, name: str = "edgeops fleet CA", days: int = 3650, force: bool = False) -> CertificateAuthority:
        """Create a new CA in ``folder`` (made 0700 if missing): ca.crt, ca.key, an empty index and CRL.

        Raises:
            PkiError: the folder already holds a CA and ``force`` is False, ``name`` is empty,
                ``days`` < 1, or the folder cannot be written.
        """
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise PkiError(f"CA name must be 1-64 characters, got {name!r}")
        _check_days(days, "days")
        folder = Path(folder)
        _make_folder(folder, "CA folder")
        with _locked(folder):
            present = [f for f in _CA_FILES if (folder / f).exists()]
            if present and not force:
                raise PkiError(
                    f"{folder} already holds a CA ({', '.join(present)}); --force replaces it "
                    "(every certificate it issued stops being trusted)"
                )
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name.strip())])
            now = datetime.now(UTC)
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(now + timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .sign(key, hashes.SHA256())
            )
            # The key first: a folder with a certificate but no key is unusable, the other way round harmless.
            _write_file(folder / "ca.key", _pem_key(key), mode=0o600, replace=True)
            _write_file(folder / "ca.crt", _pem(cert), replace=True)
            ca = cls(folder, cert, key)
            index = _Index(1, [])
            index.save(folder / "index.json")
            ca._write_crl(index, days=CRL_DAYS)
        log.info("new CA %r in %s, valid until %s", name, folder, _iso(cert.not_valid_after_utc))
        return ca

    @classmethod
    def load(cls, folder: Path) -> CertificateAuthority:
        """The CA in ``folder``, after checking that its files belong together.

        Raises:
            PkiError: a file is missing or unreadable, ca.crt is not a P-256 CA certificate,
                ca.key is not an unencrypted P-256 key or not the key of ca.crt, or index.json
                is not a valid index.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise PkiError(f"CA folder {folder} does not exist (create one with `edgeops fleet ca init DIR`)")
        cert = _load_ca_certificate(folder / "ca.crt")
        key = _load_ca_key(folder / "ca.key")
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            raise PkiError(f"{folder / 'ca.key'} is not the key of {folder / 'ca.crt'}: the folder mixes files of two CAs")
        _Index.load(folder / "index.json")  # refuse a broken index now, not halfway through an issue
        return cls(folder, cert, key)

    # -- issuing -----------------------------------------------------------------------------

    def issue(
        self,
        identity: str,
        out: Path,
        *,
        days: int = 365,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        force: bool = False,
    ) -> IssuedFiles:
        """Make a key and a client certificate for ``identity``; write out/ca.crt, out/client.crt, out/client.key.

        The key is created here and written mode 0600 (never readable by others, even for a
        moment). The certificate is recorded in index.json before any file is written.

        Args:
            identity: a device id, or :func:`console_identity` for a console.
            out: the output folder (created 0700 if missing).
            days: validity from now, unless ``not_before``/``not_after`` are given.
            not_before: start of validity (default: now, less 5 minutes of clock-skew slack).
            not_after: end of validity (default: ``days`` after now); tests use it for an expired certificate.
            force: replace files already in ``out``.

        Raises:
            PkiError: an invalid identity or validity, a validity past the CA's own, files in
                ``out`` and not ``force``, or a folder that cannot be written.
        """
        identity = _check_identity(identity)
        out = Path(out)
        _not_the_ca_folder(out, self.folder)
        _make_folder(out, "output folder")
        names = ("ca.crt", "client.crt", "client.key")
        if not force:
            taken = [n for n in names if (out / n).exists()]
            if taken:
                raise PkiError(f"{out} already holds {', '.join(taken)}; --force replaces them")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign_leaf(identity, key.public_key(), days=days, not_before=not_before, not_after=not_after)
        self._record(cert, identity, "client")
        _write_file(out / "client.key", _pem_key(key), mode=0o600, replace=force)
        _write_file(out / "client.crt", _pem(cert), replace=force)
        _write_file(out / "ca.crt", _pem(self.certificate), replace=force)
        log.info(
            "issued %s certificate %x to %s, valid until %s", identity, cert.serial_number, out, _iso(cert.not_valid_after_utc)
        )
        return IssuedFiles(ca=out / "ca.crt", cert=out / "client.crt", key=out / "client.key")

    def sign_csr(self, csr_pem: bytes, *, identity: str, days: int = 365) -> bytes:
        """Sign a device's own CSR (its key never leaves it); the leaf certificate as PEM.

        The certificate is built from scratch: only the CSR's public key is used, never its
        extensions, and the CN must already be ``identity``.

        Raises:
            PkiError: ``identity`` is invalid; the CSR is not PEM, over 16 KiB, badly
                self-signed, not for a P-256 key, for another identity, or asks for CA:true
                or subject alternative names.
        """
        identity = _check_identity(identity)
        csr = _parse_csr(csr_pem)
        cn = _common_name(csr.subject, "the CSR's subject")
        if cn != identity:
            raise PkiError(f"CSR is for {_who(cn)}, expected {identity!r}")
        cert = self._sign_leaf(identity, csr.public_key(), days=days)  # type: ignore[arg-type]  # P-256 checked
        self._record(cert, identity, "client")
        log.info(
            "signed a CSR of %s: certificate %x, valid until %s", identity, cert.serial_number, _iso(cert.not_valid_after_utc)
        )
        return _pem(cert)

    def write_csr_cert(self, csr_pem: bytes, identity: str, out: Path, *, days: int = 365, force: bool = False) -> IssuedFiles:
        """Sign ``csr_pem`` (:meth:`sign_csr`) and write out/ca.crt and out/client.crt (no key: it stays on the device).

        Raises:
            PkiError: as :meth:`sign_csr`, or files in ``out`` and not ``force``.
        """
        out = Path(out)
        _not_the_ca_folder(out, self.folder)
        _make_folder(out, "output folder")
        if not force:
            taken = [n for n in ("ca.crt", "client.crt") if (out / n).exists()]
            if taken:
                raise PkiError(f"{out} already holds {', '.join(taken)}; --force replaces them")
        pem = self.sign_csr(csr_pem, identity=identity, days=days)
        _write_file(out / "client.crt", pem, replace=force)
        _write_file(out / "ca.crt", _pem(self.certificate), replace=force)
        return IssuedFiles(ca=out / "ca.crt", cert=out / "client.crt", key=None)

    def issue_server(self, hosts: Sequence[str], out: Path, *, days: int = 825, force: bool = False) -> tuple[Path, Path]:
        """A broker server certificate for ``hosts``: out/server.crt and out/server.key (0600).

        Each host is an IP address (an IP SAN) or a DNS name (a DNS SAN); clients check the
        name they connect to against these. The CN is the first host (when it fits in 64 characters).

        Raises:
            PkiError: no host, a host that is neither an IP address nor a DNS name, ``days``
                < 1 or past the CA's validity, or ``out`` not writable (or holding the files and not ``force``).
        """
        if isinstance(hosts, str):
            raise PkiError(f"hosts must be a list of names, got the string {hosts!r}")
        if not hosts:
            raise PkiError("a server certificate needs at least one host name or IP address")
        sans: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not isinstance(host, str) or not _DNS_NAME.fullmatch(host):
                    raise PkiError(f"host {host!r} is neither an IP address nor a DNS name") from None
                sans.append(x509.DNSName(host.lower()))
        out = Path(out)
        _not_the_ca_folder(out, self.folder)
        _make_folder(out, "output folder")
        if not force and any((out / n).exists() for n in ("server.crt", "server.key")):
            raise PkiError(f"{out} already holds server.crt or server.key; --force replaces them")
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = self._validity(days, None, None)
        cn = str(hosts[0]) if len(str(hosts[0])) <= _MAX_CN else "edgeops broker"  # clients check the SANs, not the CN
        cert = (
            self._builder(cn, key.public_key(), not_before, not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._record(cert, ",".join(dict.fromkeys(str(h) for h in hosts)), "server")
        _write_file(out / "server.key", _pem_key(key), mode=0o600, replace=force)
        _write_file(out / "server.crt", _pem(cert), replace=force)
        return out / "server.crt", out / "server.key"

    def _validity(self, days: int, not_before: datetime | None, not_after: datetime | None) -> tuple[datetime, datetime]:
        now = datetime.now(UTC)
        if not_after is None:
            _check_days(days, "days")
        start = _utc(not_before) if not_before is not None else now - _BACKDATE
        end = _utc(not_after) if not_after is not None else now + timedelta(days=days)
        if end <= start:
            raise PkiError(f"a certificate must end after it starts: not_after {_iso(end)} <= not_before {_iso(start)}")
        ca_end = self.certificate.not_valid_after_utc
        if end > ca_end:
            raise PkiError(
                f"the certificate would be valid until {_iso(end)}, after the CA itself expires ({_iso(ca_end)}); "
                "ask for fewer days"
            )
        return start, end

    def _builder(self, cn: str, public_key: ec.EllipticCurvePublicKey, start: datetime, end: datetime) -> x509.CertificateBuilder:
        """A leaf certificate builder: subject CN, CA:false, digitalSignature, key identifiers."""
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )

    def _sign_leaf(
        self,
        identity: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        days: int,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> x509.Certificate:
        start, end = self._validity(days, not_before, not_after)
        return (
            self._builder(identity, public_key, start, end)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _record(self, cert: x509.Certificate, identity: str, kind: str) -> None:
        with _locked(self.folder):
            index = _Index.load(self.folder / "index.json")
            index.entries.append(_entry(cert, identity, kind))
            index.save(self.folder / "index.json")

    # -- revocation --------------------------------------------------------------------------

    def revoke(self, *, serial: int | None = None, identity: str | None = None) -> list[int]:
        """Revoke certificate ``serial``, or every unrevoked certificate issued to ``identity``; re-sign crl.pem.

        Revoking what is already revoked changes nothing (an empty list). The broker enforces
        the new CRL once it has the copy and a SIGHUP (new connections) or a restart (which
        also drops a connection the device already has; docs/security.md, runbook).

        Returns:
            The serials revoked now.

        Raises:
            PkiError: neither or both of ``serial`` and ``identity``; a serial or identity this CA never issued.
        """
        if (serial is None) == (identity is None):
            raise PkiError("revoke needs exactly one of a serial number or an identity")
        if identity is not None:
            identity = _check_identity(identity)
        with _locked(self.folder):
            index = _Index.load(self.folder / "index.json")
            if serial is not None:
                chosen = [e for e in index.entries if int(e["serial"], 16) == serial]
                if not chosen:
                    raise PkiError(f"serial {serial:x} was not issued by the CA in {self.folder} (see `edgeops fleet cert list`)")
            else:
                chosen = [e for e in index.entries if e["identity"] == identity and e["kind"] == "client"]
                if not chosen:
                    raise PkiError(f"the CA in {self.folder} never issued a certificate to {_who(str(identity))}")
            now = _iso(datetime.now(UTC))
            revoked = []
            for e in chosen:
                if e["revoked_at"] is None:
                    e["revoked_at"] = now
                    revoked.append(int(e["serial"], 16))
            if revoked:
                # The index first: were the CRL written first and the index write to fail, the
                # next CRL (rebuilt from the index) would un-revoke the certificate.
                index.crl_number += 1
                index.save(self.folder / "index.json")
                self._write_crl(index, days=CRL_DAYS)
        for s in revoked:
            log.info("revoked certificate %x", s)
        return revoked

    def refresh_crl(self, *, days: int = CRL_DAYS) -> Path:
        """Re-sign crl.pem from index.json with a nextUpdate ``days`` ahead; its path.

        Run it (``edgeops fleet ca crl``) well before the current nextUpdate and give the
        broker the new file: an expired CRL makes OpenSSL refuse every client.

        Raises:
            PkiError: ``days`` < 1, or the folder cannot be written.
        """
        _check_days(days, "days")
        with _locked(self.folder):
            index = _Index.load(self.folder / "index.json")
            index.crl_number += 1
            index.save(self.folder / "index.json")
            self._write_crl(index, days=days)
        return self.folder / "crl.pem"

    def _write_crl(self, index: _Index, *, days: int, now: datetime | None = None) -> None:
        """Sign a CRL numbered ``index.crl_number`` of every revoked entry of ``index`` into crl.pem; under the lock."""
        now = now or datetime.now(UTC)
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + timedelta(days=days))
            .add_extension(x509.CRLNumber(index.crl_number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )
        for e in index.entries:
            if e["revoked_at"] is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(e["serial"], 16))
                    .revocation_date(_parse_iso(e["revoked_at"], "revoked_at"))
                    .build()
                )
        crl = builder.sign(self._key, hashes.SHA256())
        _write_file(self.folder / "crl.pem", crl.public_bytes(serialization.Encoding.PEM), replace=True)

    def crl_pem(self) -> bytes:
        """The current crl.pem (PEM), checked to be a CRL this CA signed.

        Raises:
            PkiError: crl.pem is missing, unreadable, not a CRL or not signed by this CA
                (``edgeops fleet ca crl`` rebuilds it from index.json).
        """
        path = self.folder / "crl.pem"
        data = _read(path, "the CA's revocation list (rebuild it with `edgeops fleet ca crl --ca DIR`)")
        try:
            crl = x509.load_pem_x509_crl(data)
            valid = crl.is_signature_valid(self.certificate.public_key())  # type: ignore[arg-type]
        except ValueError as exc:
            raise PkiError(f"{path} is not a PEM CRL ({_short(exc)}); rebuild it with `edgeops fleet ca crl --ca DIR`") from exc
        if not valid:
            raise PkiError(f"{path} is not signed by this CA; rebuild it with `edgeops fleet ca crl --ca DIR`")
        return data

    def export_crl(self, dest: Path) -> Path:
        """Copy crl.pem to ``dest`` (the broker's copy), replacing it atomically; ``dest``.

        Raises:
            PkiError: crl.pem is unusable (:meth:`crl_pem`), or ``dest``'s folder is missing or not writable.
        """
        dest = Path(dest)
        if not dest.parent.is_dir():
            raise PkiError(f"cannot write {dest}: folder {dest.parent} does not exist")
        _write_file(dest, self.crl_pem(), replace=True)
        return dest

    def issued(self) -> list[dict[str, Any]]:
        """Every certificate recorded in index.json, oldest first.

        Each is ``{"serial": int, "identity": str, "kind": "client"|"server", "not_before":
        datetime, "not_after": datetime, "revoked_at": datetime | None, "sha256": str}``
        (UTC datetimes; a server certificate's identity is its hosts, comma-separated).

        Raises:
            PkiError: index.json is missing or malformed.
        """
        with _locked(self.folder):
            index = _Index.load(self.folder / "index.json")
        return [
            {
                "serial": int(e["serial"], 16),
                "identity": e["identity"],
                "kind": e["kind"],
                "not_before": _parse_iso(e["not_before"], "not_before"),
                "not_after": _parse_iso(e["not_after"], "not_after"),
                "revoked_at": None if e["revoked_at"] is None else _parse_iso(e["revoked_at"], "revoked_at"),
                "sha256": e.get("sha256"),
            }
            for e in index.entries
        ]


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_days(days: int, what: str) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(f"{what} must be a whole number of days >= 1, got {days!r}")


def _load_ca_certificate(path: Path) -> x509.Certificate:
    data = _read(path, "the CA certificate (ca.crt)")
    try:
        cert = x509.load_pem_x509_certificate(data)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound as exc:
        raise PkiError(f"{path} is not a CA certificate made by `edgeops fleet ca init` ({exc})") from exc
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate ({_short(exc)})") from exc
    if not constraints.ca or not ski:
        raise PkiError(f"{path} is not a CA certificate (BasicConstraints CA:false); is it a device's client.crt?")
    if not _is_p256(cert.public_key()):
        raise PkiError(f"{path} must hold an ECDSA P-256 key")
    return cert


def _load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "the CA's private key (ca.key)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted
        raise PkiError(f"{path} is encrypted; edgeops expects an unencrypted PKCS#8 key in an offline folder") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:  # cryptography's message is long and says no more
        raise PkiError(f"{path} is not a PEM private key: truncated, damaged, or not the CA's key?") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _is_p256(key):
        raise PkiError(f"{path} must hold an ECDSA P-256 private key, got {type(key).__name__}")
    return key


def _parse_csr(csr_pem: object) -> x509.CertificateSigningRequest:
    # It may come from a device over MQTT: check the type too, a JSON string included.
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("ascii", "replace")
    if not isinstance(csr_pem, bytes):
        raise PkiError(f"a CSR must be PEM bytes, got {type(csr_pem).__name__}")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise PkiError(f"the CSR is {len(csr_pem)} bytes, more than {MAX_CSR_BYTES}: not a P-256 CSR")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
        extensions = list(csr.extensions)
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise PkiError(f"not a PEM certificate signing request ({_short(exc)})") from exc
    if not valid:
        raise PkiError("the CSR's self-signature does not verify: it was altered or not signed by its key")
    if not _is_p256(public_key):
        raise PkiError(f"the CSR's key must be ECDSA P-256, got {type(public_key).__name__}")
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise PkiError("the CSR asks for CA:true; a device certificate can never sign others")
        if isinstance(ext.value, x509.SubjectAlternativeName):
            raise PkiError("the CSR asks for subject alternative names; a device certificate names only its device id (CN)")
    return csr


def load_certificate_identity(pem: bytes) -> tuple[str, datetime]:
    """The identity (CN) and the end of validity (UTC) of a leaf certificate in PEM.

    Raises:
        PkiError: not a PEM certificate, or not exactly one CN.
    """
    data: object = pem
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    if not isinstance(data, bytes):
        raise PkiError(f"a certificate must be PEM bytes, got {type(data).__name__}")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except (TypeError, ValueError) as exc:
        raise PkiError(f"not a PEM certificate ({_short(exc)})") from exc
    return _common_name(cert.subject, "the certificate's subject"), cert.not_valid_after_utc


# -- the broker ---------------------------------------------------------------------------------

#: Per-device leaves by direction (edgeops_core.topics.LEAVES, docs/asyncapi.json); a leaf in
#: neither is granted to no one (tests/test_pki.py checks that every leaf has a direction).
DEVICE_WRITES = ("state", "telemetry", "events", "samples", "ota_request", "csr")
DEVICE_READS = ("cmd", "ota_block")


def _acl(prefix: str, consoles: Sequence[str]) -> str:
    lines = [
        "# edgeops broker ACL, written by `edgeops fleet broker-config` (docs/security.md).",
        "# The user name is the client certificate's CN (use_identity_as_username). Every pattern",
        "# applies to every client; %u is replaced by its CN, so a device reaches only its own subtree.",
        "",
        "# devices: write their reports, read their commands and OTA blocks",
    ]
    lines += [f"pattern write {prefix}/%u/{leaf}" for leaf in DEVICE_WRITES]
    lines += [f"pattern read {prefix}/%u/{leaf}" for leaf in DEVICE_READS]
    for name in consoles:
        lines += [
            "",
            f"# console {name!r}: reads every device's reports, writes commands and OTA blocks",
            f"user {console_identity(name)}",
        ]
        lines += [f"topic read {prefix}/+/{leaf}" for leaf in DEVICE_WRITES]
        lines += [f"topic write {prefix}/+/{leaf}" for leaf in DEVICE_READS]
    return "\n".join(lines) + "\n"


def _check_prefix(prefix: str) -> str:
    levels = prefix.split("/") if isinstance(prefix, str) else [""]
    if not all(levels) or any(c in prefix for c in "+#\0 \t\r\n") or prefix.startswith("$"):
        raise PkiError(f"topic prefix {prefix!r} must be '/'-separated non-empty levels without wildcards, spaces or '$'")
    return prefix


def write_broker_config(
    ca: CertificateAuthority,
    out: Path,
    *,
    port: int = 8883,
    bind: str = "0.0.0.0",  # noqa: S104 - a broker listens for the fleet; --bind narrows it
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    prefix: str = DEFAULT_PREFIX,
    consoles: Sequence[str] = ("main",),
    persistence_dir: Path | None = None,
    user: str | None = None,
    force: bool = False,
) -> Path:
    """Write a Mosquitto (2.0) configuration that enforces the fleet's identities and topic tree; out/mosquitto.conf.

    ``out`` receives mosquitto.conf, acl, ca.crt, crl.pem (copies), server.crt and
    server.key (0600, issued by ``ca`` for ``hosts``): a self-contained folder for the
    broker host, which never needs the CA's key. One TLS listener (1.2 or later, client
    certificate required, checked against the CA and its CRL, CN as user name and as
    client id), no anonymous access, no plaintext listener.

    Args:
        ca: the fleet CA.
        out: the output folder (created 0700 if missing).
        port: the TLS listener's port.
        bind: the address it listens on.
        hosts: DNS names and IP addresses clients connect to (the server certificate's SANs).
        prefix: the topic prefix of the fleet.
        consoles: console names (``console:<name>`` identities) granted the console's rights.
        persistence_dir: where Mosquitto keeps sessions (default: out/data).
        user: the ``user`` Mosquitto runs as; ``root`` when started as root in a test (by
            default it drops to ``mosquitto``, which must then be able to read ``out``).
        force: replace an earlier configuration in ``out``.

    Raises:
        PkiError: a bad port, bind address, host, prefix, console name or user, or files
            in ``out`` and not ``force``.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise PkiError(f"port must be 1..65535, got {port!r}")
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise PkiError(f"bind address {bind!r} must be an IP address (0.0.0.0 for every interface)") from None
    prefix = _check_prefix(prefix)
    consoles = list(dict.fromkeys(consoles))
    for name in consoles:
        console_identity(name)
    if user is not None and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise PkiError(f"user {user!r} must be a system user name")
    crl = ca.crl_pem()
    out = Path(out).absolute()
    data = Path(persistence_dir).absolute() if persistence_dir is not None else out / "data"
    for path in (out, data, ca.folder):
        if any(ord(c) < 0x20 or c == "\x7f" for c in str(path)):  # a newline would start a configuration line of its own
            raise PkiError(f"folder {str(path)!r} has a control character; mosquitto.conf cannot name it")
    _not_the_ca_folder(out, ca.folder)
    _make_folder(out, "output folder")
    conf = out / "mosquitto.conf"
    if conf.exists() and not force:
        raise PkiError(f"{conf} already exists; --force writes a new one (and a new server certificate)")
    _make_folder(data, "persistence folder")
    ca.issue_server(hosts, out, force=True)
    _write_file(out / "ca.crt", _pem(ca.certificate), replace=True)
    _write_file(out / "crl.pem", crl, replace=True)
    _write_file(out / "acl", _acl(prefix, consoles).encode(), replace=True)
    lines = [
        "# edgeops broker configuration, written by `edgeops fleet broker-config` (docs/security.md).",
        "# Mutual TLS only: every client shows a certificate of the fleet CA; its CN is the user",
        "# name the ACL grants by, and the client id (no client can take over another's session).",
        "# After a revocation copy the new crl.pem here, then SIGHUP (refuses new connections with the",
        "# revoked certificate) or restart (also drops its open connection). Re-sign crl.pem before its",
        "# nextUpdate (`edgeops fleet ca crl`): past it, every client is refused.",
        *([f"user {user}"] if user is not None else []),
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {out / 'acl'}",
        "persistence true",
        f"persistence_location {data}/",
        "set_tcp_nodelay true",
        "# Mosquitto's default keeps 1000 QoS 1 messages per client and drops the rest: a console",
        "# that falls behind a fleet (or is restarted) would lose telemetry at the broker.",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        "",
        f"listener {port} {bind}",
        f"cafile {out / 'ca.crt'}",
        f"certfile {out / 'server.crt'}",
        f"keyfile {out / 'server.key'}",
        f"crlfile {out / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
    ]
    _write_file(conf, ("\n".join(lines) + "\n").encode(), replace=True)
    log.info("broker configuration for %s:%d in %s", bind, port, out)
    return conf
