"""The fleet CA (edgeops_fleet.pki) and its CLI: identities, CSRs, revocation, the broker configuration.

Fast unit tests; tests/test_broker_acl_tls.py runs Mosquitto with the generated configuration.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeops_core import InputError
from edgeops_core.topics import LEAVES
from edgeops_fleet.pki import (
    CONSOLE_PREFIX,
    DEVICE_READS,
    DEVICE_WRITES,
    CertificateAuthority,
    PkiError,
    console_identity,
    load_certificate_identity,
    write_broker_config,
)
from edgeops_toolchain.cli import main
from test_fleet_cli import one_line_error


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """One CA for the tests that only add to it (certificates are cheap, a CA folder is shared)."""
    return CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "ca")


def make_csr(cn: str, *, key: object | None = None, extensions: list[x509.ExtensionType] | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the CA folder --------------------------------------------------------------------------------


def test_init_writes_the_documented_layout(ca: CertificateAuthority) -> None:
    folder = ca.folder
    assert {p.name for p in folder.iterdir()} >= {"ca.crt", "ca.key", "index.json", "crl.pem"}
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"], "temporary files left"
    assert mode(folder) == 0o700 and mode(folder / "ca.key") == 0o600
    cert = ca.certificate
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert timedelta(days=364) < crl.next_update_utc - datetime.now(UTC) <= timedelta(days=365)
    assert json.loads((folder / "index.json").read_text())["schema"] == 1


def test_init_refuses_an_existing_ca_unless_forced(tmp_path: Path) -> None:
    first = CertificateAuthority.init(tmp_path / "ca", days=30)
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.init(tmp_path / "ca")
    second = CertificateAuthority.init(tmp_path / "ca", force=True)
    assert second.certificate.serial_number != first.certificate.serial_number
    assert CertificateAuthority.load(tmp_path / "ca").certificate == second.certificate
    with pytest.raises(PkiError, match="days"):
        CertificateAuthority.init(tmp_path / "other", days=0)


def test_issue_writes_a_client_certificate_and_a_private_key_0600(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not make the key readable, not even for a moment
    try:
        files = ca.issue("dev-1", tmp_path / "dev-1")
    finally:
        os.umask(old)
    assert mode(files.key) == 0o600 and mode(files.cert) == 0o644  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "dev-1").iterdir()) == ["ca.crt", "client.crt", "client.key"]
    assert files.ca.read_bytes() == (ca.folder / "ca.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        cert.public_key()  # type: ignore[arg-type]
    )
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)  # type: ignore[union-attr]
    assert key.public_key() == cert.public_key()
    row = next(r for r in ca.issued() if r["serial"] == cert.serial_number)
    assert row["identity"] == "dev-1" and row["kind"] == "client" and row["revoked_at"] is None
    assert load_certificate_identity(files.cert.read_bytes()) == ("dev-1", cert.not_valid_after_utc)


def test_issue_refuses_to_overwrite_unless_forced(ca: CertificateAuthority, tmp_path: Path) -> None:
    first = ca.issue("dev-2", tmp_path).cert.read_bytes()
    with pytest.raises(PkiError, match=r"already holds ca\.crt, client\.crt, client\.key; --force replaces them"):
        ca.issue("dev-2", tmp_path)
    assert (tmp_path / "client.crt").read_bytes() == first
    ca.issue("dev-2", tmp_path, force=True)
    assert (tmp_path / "client.crt").read_bytes() != first
    assert mode(tmp_path / "client.key") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "client.crt", "client.key"]  # no temporary file left


def test_console_identities_cannot_be_device_ids(ca: CertificateAuthority, tmp_path: Path) -> None:
    assert console_identity() == "console:main" and CONSOLE_PREFIX == "console:"
    files = ca.issue(console_identity("ops"), tmp_path)
    assert load_certificate_identity(files.cert.read_bytes())[0] == "console:ops"
    for bad in ("console:", "console:a:b", "console:a/b", "a/b", "dev+1", "#", "", "x" * 65, "dev\n"):
        with pytest.raises(PkiError):
            ca.issue(bad, tmp_path / "bad", force=True)
    with pytest.raises(PkiError, match="console name"):
        console_identity("ops team")
    assert console_identity("c" * 56) == "console:" + "c" * 56  # a CN holds 64 characters, the prefix included
    with pytest.raises(PkiError, match="must be 1-56"):
        console_identity("c" * 57)
    assert issubclass(PkiError, InputError)


def test_nothing_is_written_into_the_ca_folder(ca: CertificateAuthority) -> None:
    before = sorted(p.name for p in ca.folder.iterdir())
    with pytest.raises(PkiError, match="is the CA folder"):
        ca.issue("dev-x", ca.folder, force=True)
    with pytest.raises(PkiError, match="is the CA folder"):
        ca.write_csr_cert(make_csr("dev-x"), "dev-x", ca.folder / ".", force=True)
    with pytest.raises(PkiError, match="is the CA folder"):
        write_broker_config(ca, ca.folder, force=True)
    assert sorted(p.name for p in ca.folder.iterdir()) == before


def test_validity_is_checked(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="after the CA itself expires"):
        ca.issue("dev-3", tmp_path, days=40_000)
    with pytest.raises(PkiError, match="days"):
        ca.issue("dev-3", tmp_path, days=0)
    now = datetime.now(UTC)
    with pytest.raises(PkiError, match="must end after it starts"):
        ca.issue("dev-3", tmp_path, not_before=now, not_after=now - timedelta(days=1))
    files = ca.issue("dev-3", tmp_path, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1))
    assert load_certificate_identity(files.cert.read_bytes())[1] < now  # an expired certificate, for the broker tests


# -- CSRs -----------------------------------------------------------------------------------------


def test_sign_csr_issues_for_the_devices_own_key(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = ca.sign_csr(make_csr("dev-4", key=key), identity="dev-4")
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    files = ca.write_csr_cert(make_csr("dev-4"), "dev-4", tmp_path)
    assert files.key is None and sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "client.crt"]


def test_a_csr_for_another_device_is_refused(ca: CertificateAuthority) -> None:
    before = len(ca.issued())
    with pytest.raises(PkiError, match=r"^CSR is for device 'dev-b', expected 'dev-a'$"):
        ca.sign_csr(make_csr("dev-b"), identity="dev-a")
    with pytest.raises(PkiError, match="CSR is for console 'main', expected 'dev-a'"):
        ca.sign_csr(make_csr("console:main"), identity="dev-a")
    assert len(ca.issued()) == before  # nothing recorded


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"garbage", "not a PEM certificate signing request"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n", "not a PEM certificate"),
        (b"x" * 20_000, "more than 16384"),
        (make_csr("dev-a", key=ec.generate_private_key(ec.SECP384R1())), "must be ECDSA P-256"),
        (make_csr("dev-a", key=rsa.generate_private_key(public_exponent=65537, key_size=1024)), "must be ECDSA P-256"),
        (make_csr("dev-a", extensions=[x509.BasicConstraints(ca=True, path_length=None)]), "asks for CA:true"),
        (make_csr("dev-a", extensions=[x509.SubjectAlternativeName([x509.DNSName("dev-b")])]), "subject alternative"),
    ],
    ids=["garbage", "truncated", "huge", "p384", "rsa", "ca-true", "san"],
)
def test_bad_csrs_are_refused_in_one_line(ca: CertificateAuthority, csr: bytes, message: str) -> None:
    with pytest.raises(PkiError, match=message) as info:
        ca.sign_csr(csr, identity="dev-a")
    assert "\n" not in str(info.value)


def test_a_csr_with_a_broken_self_signature_is_refused(ca: CertificateAuthority) -> None:
    csr = x509.load_pem_x509_csr(make_csr("dev-a"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[der.index(b"dev-a")] = ord("x")  # same length, subject changed after signing
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="self-signature does not verify"):
        ca.sign_csr(tampered, identity="xev-a")


def test_the_ca_never_copies_csr_extensions(ca: CertificateAuthority) -> None:
    usage = x509.KeyUsage(True, True, True, True, True, True, True, False, False)  # asks for keyCertSign
    pem = ca.sign_csr(make_csr("dev-5", extensions=[usage]), identity="dev-5")
    cert = x509.load_pem_x509_certificate(pem)
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


# -- revocation -----------------------------------------------------------------------------------


def test_revoke_by_identity_and_serial_rewrites_the_crl(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    a1 = x509.load_pem_x509_certificate(ca.issue("dev-a", tmp_path / "a1").cert.read_bytes()).serial_number
    a2 = x509.load_pem_x509_certificate(ca.issue("dev-a", tmp_path / "a2").cert.read_bytes()).serial_number
    b = x509.load_pem_x509_certificate(ca.issue("dev-b", tmp_path / "b").cert.read_bytes()).serial_number
    number = x509.load_pem_x509_crl(ca.crl_pem()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert sorted(ca.revoke(identity="dev-a")) == sorted([a1, a2])
    assert ca.revoke(identity="dev-a") == []  # already revoked: nothing new
    assert ca.revoke(serial=b) == [b]
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert {r.serial_number for r in crl} == {a1, a2, b}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 2
    assert all(r["revoked_at"] is not None for r in ca.issued())
    with pytest.raises(PkiError, match="was not issued by the CA"):
        ca.revoke(serial=12345)
    with pytest.raises(PkiError, match="never issued a certificate to device 'dev-z'"):
        ca.revoke(identity="dev-z")
    with pytest.raises(PkiError, match="exactly one"):
        ca.revoke(serial=b, identity="dev-b")
    with pytest.raises(PkiError, match="exactly one"):
        ca.revoke()


def test_refresh_crl_rebuilds_a_broken_crl_from_the_index(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    serial = x509.load_pem_x509_certificate(ca.issue("dev-a", tmp_path / "a").cert.read_bytes()).serial_number
    ca.revoke(serial=serial)
    (ca.folder / "crl.pem").write_bytes(b"garbage")
    with pytest.raises(PkiError, match=r"not a PEM CRL.*edgeops fleet ca crl"):
        ca.crl_pem()
    ca.refresh_crl(days=30)
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert [r.serial_number for r in crl] == [serial]
    assert crl.next_update_utc is not None and crl.next_update_utc - datetime.now(UTC) <= timedelta(days=30)
    other = CertificateAuthority.init(tmp_path / "other")
    (ca.folder / "crl.pem").write_bytes(other.crl_pem())
    with pytest.raises(PkiError, match="not signed by this CA"):
        ca.crl_pem()


# -- a damaged CA folder --------------------------------------------------------------------------


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "ca.key").write_bytes((d / "ca.key").read_bytes()[:100]), r"ca\.key is not a PEM private key"),
        (lambda d: (d / "ca.key").write_bytes(b"\x00garbage"), r"ca\.key is not a PEM private key"),
        (lambda d: (d / "ca.key").unlink(), r"ca\.key is missing"),
        (lambda d: (d / "ca.crt").write_bytes(b"not pem"), r"ca\.crt is not a PEM certificate"),
        (lambda d: (d / "index.json").write_bytes(b'{"schema": 1, "crl_n'), r"index\.json is not JSON"),
        (lambda d: (d / "index.json").write_text('{"schema": 7}'), r"index\.json must be an object with schema 1"),
        (
            lambda d: (d / "index.json").write_text('{"schema": 1, "crl_number": 1, "certificates": [{"serial": "zz"}]}'),
            r"certificates\[0\]\.serial must be a hex string",
        ),
        (lambda d: (d / "index.json").write_bytes(b"\xff\xfe"), r"index\.json is not JSON"),
    ],
    ids=[
        "truncated-key",
        "garbage-key",
        "no-key",
        "garbage-crt",
        "truncated-index",
        "index-schema",
        "index-serial",
        "index-bytes",
    ],
)
def test_a_damaged_ca_folder_is_refused_naming_the_file(fresh: Path, damage: object, message: str) -> None:
    damage(fresh)  # type: ignore[operator]
    with pytest.raises(PkiError, match=message):
        CertificateAuthority.load(fresh)


def test_a_ca_folder_mixing_two_cas_is_refused(fresh: Path, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    (fresh / "ca.key").write_bytes((other.folder / "ca.key").read_bytes())
    with pytest.raises(PkiError, match=r"ca\.key is not the key of .*ca\.crt: the folder mixes files of two CAs"):
        CertificateAuthority.load(fresh)


def test_a_client_certificate_in_place_of_the_ca_is_refused(fresh: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority.load(fresh)
    files = ca.issue("dev-a", tmp_path / "a")
    (fresh / "ca.crt").write_bytes(files.cert.read_bytes())
    with pytest.raises(PkiError, match="not a CA certificate"):
        CertificateAuthority.load(fresh)


def test_an_encrypted_or_foreign_ca_key_is_refused(fresh: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (fresh / "ca.key").write_bytes(pem)
    with pytest.raises(PkiError, match="is encrypted"):
        CertificateAuthority.load(fresh)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (fresh / "ca.key").write_bytes(rsa_pem)
    with pytest.raises(PkiError, match="must hold an ECDSA P-256 private key"):
        CertificateAuthority.load(fresh)
    with pytest.raises(PkiError, match="does not exist"):
        CertificateAuthority.load(fresh.parent / "nowhere")


#: Six provisions in a fresh interpreter (not a fork: JAX, imported by the TFLite tests earlier
#: in the session, warns that forking a multithreaded process may deadlock).
_PROVISION_MANY = (
    "import sys; from pathlib import Path; from edgeops_fleet.pki import CertificateAuthority; "
    "folder, start = Path(sys.argv[1]), int(sys.argv[2]); ca = CertificateAuthority.load(folder); "
    "[ca.issue(f'dev-{i}', folder.parent / 'out' / str(i)) for i in range(start, start + 6)]"
)


def test_concurrent_provisions_lose_no_index_entry(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    procs = [subprocess.Popen([sys.executable, "-c", _PROVISION_MANY, str(ca.folder), str(100 * n)]) for n in range(4)]
    revoked = []
    for _ in range(3):  # a revocation in this process meanwhile, under the same lock
        serial = x509.load_pem_x509_certificate(ca.issue("dev-main", tmp_path / "m", force=True).cert.read_bytes())
        revoked += ca.revoke(serial=serial.serial_number)
    for p in procs:
        assert p.wait(60) == 0
    rows = ca.issued()
    assert len(rows) == 4 * 6 + 3 and len({r["serial"] for r in rows}) == len(rows)
    assert {r["serial"] for r in rows if r["revoked_at"]} == set(revoked)
    assert {r.serial_number for r in x509.load_pem_x509_crl(ca.crl_pem())} == set(revoked)


def test_load_certificate_identity_refuses_garbage() -> None:
    with pytest.raises(PkiError, match="not a PEM certificate"):
        load_certificate_identity(b"nope")


# -- the broker configuration ---------------------------------------------------------------------


def test_broker_config_is_one_mutual_tls_listener_with_a_least_privilege_acl(ca: CertificateAuthority, tmp_path: Path) -> None:
    conf = write_broker_config(ca, tmp_path / "b", port=18883, hosts=("broker.example", "10.0.0.5"), consoles=("main", "ops"))
    lines = [line for line in conf.read_text().splitlines() if line and not line.startswith("#")]
    assert [line for line in lines if line.startswith("listener")] == ["listener 18883 0.0.0.0"]  # no plaintext listener
    for needed in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "max_queued_messages 100000",  # the default 1000 drops a lagging console's telemetry
        f"crlfile {tmp_path / 'b' / 'crl.pem'}",
        f"acl_file {tmp_path / 'b' / 'acl'}",
        f"keyfile {tmp_path / 'b' / 'server.key'}",
    ):
        assert needed in lines
    assert not any(line.startswith(("user ", "password_file", "psk_file")) for line in lines)
    assert mode(tmp_path / "b" / "server.key") == 0o600
    server = x509.load_pem_x509_certificate((tmp_path / "b" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca.certificate)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    acl = [line for line in (tmp_path / "b" / "acl").read_text().splitlines() if line and not line.startswith("#")]
    device = [line for line in acl if line.startswith("pattern")]
    assert sorted(device) == sorted(
        [f"pattern write edgeops/v1/%u/{leaf}" for leaf in ("state", "telemetry", "events", "samples", "ota_request", "csr")]
        + [f"pattern read edgeops/v1/%u/{leaf}" for leaf in ("cmd", "ota_block")]
    )
    assert not [line for line in acl if "readwrite" in line or "#" in line.split()[-1]]
    ops = acl[acl.index("user console:ops") + 1 :]
    assert ops == [
        f"topic read edgeops/v1/+/{leaf}" for leaf in ("state", "telemetry", "events", "samples", "ota_request", "csr")
    ] + [
        "topic write edgeops/v1/+/cmd",
        "topic write edgeops/v1/+/ota_block",
    ]
    with pytest.raises(PkiError, match="already exists"):
        write_broker_config(ca, tmp_path / "b")
    with pytest.raises(PkiError, match=r"already holds server\.crt"):
        ca.issue_server(["localhost"], tmp_path / "b")
    write_broker_config(ca, tmp_path / "b", force=True, user="root", prefix="acme/fleet/v2")
    assert "user root" in conf.read_text() and "pattern read acme/fleet/v2/%u/cmd" in (tmp_path / "b" / "acl").read_text()


def test_every_topic_leaf_has_a_direction_in_the_acl() -> None:
    """A new leaf in edgeops_core.topics must be given to devices or consoles here, or no one may use it."""
    assert sorted(DEVICE_WRITES + DEVICE_READS) == sorted(LEAVES) and not set(DEVICE_WRITES) & set(DEVICE_READS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "port must be"),
        ({"bind": "everywhere"}, "bind address"),
        ({"hosts": ()}, "at least one host"),
        ({"hosts": "localhost"}, "must be a list"),
        ({"hosts": ("bad host",)}, "neither an IP address nor a DNS name"),
        ({"prefix": "edgeops/#"}, "topic prefix"),
        ({"prefix": "edgeops//v1"}, "topic prefix"),
        ({"consoles": ("a b",)}, "console name"),
        ({"user": "root\nallow_anonymous true"}, "system user name"),
        ({"persistence_dir": Path("/tmp/x\nallow_anonymous true")}, "control character"),
    ],
)
def test_broker_config_refuses_bad_options(
    ca: CertificateAuthority, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(PkiError, match=message):
        write_broker_config(ca, tmp_path / "b", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


# -- the CLI --------------------------------------------------------------------------------------


def edgeops(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_provisions_lists_and_revokes(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    code, out, err = edgeops("fleet", "ca", "init", ca_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["certificate"] == str(ca_dir / "ca.crt")
    code, out, err = edgeops("fleet", "provision", "dev-1", "--ca", ca_dir, "--out", tmp_path / "d1", "--days", "30", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["identity"] == "dev-1" and doc["key"] == str(tmp_path / "d1" / "client.key")
    code, out, err = edgeops("fleet", "provision", "main", "--console", "--ca", ca_dir, "--out", tmp_path / "c", "--json")
    assert code == 0 and json.loads(out)["identity"] == "console:main", err
    (tmp_path / "dev-2.csr").write_bytes(make_csr("dev-2"))
    code, out, err = edgeops(
        "fleet", "provision", "dev-2", "--csr", tmp_path / "dev-2.csr", "--ca", ca_dir, "--out", tmp_path / "d2"
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "d2").iterdir()) == ["ca.crt", "client.crt"]
    code, out, err = edgeops("fleet", "cert", "list", "--ca", ca_dir, "--json")
    certs = json.loads(out)["certificates"]
    assert [c["identity"] for c in certs] == ["dev-1", "console:main", "dev-2"] and {c["status"] for c in certs} == {"valid"}
    code, out, err = edgeops("fleet", "cert", "revoke", "--serial", "0x" + certs[2]["serial"], "--ca", ca_dir, "--json")
    assert code == 0 and json.loads(out)["revoked"] == [certs[2]["serial"]], err
    code, out, err = edgeops("fleet", "cert", "revoke", "dev-1", "--ca", ca_dir, "--crl-out", tmp_path / "copy.pem")
    assert code == 0 and f"revoked {certs[0]['serial']}" in out, err
    assert (tmp_path / "copy.pem").read_bytes() == (ca_dir / "crl.pem").read_bytes()
    code, out, err = edgeops("fleet", "cert", "list", "--ca", ca_dir)
    assert code == 0 and out.count("revoked") >= 2 and "console:main" in out
    code, out, err = edgeops("fleet", "ca", "crl", "--ca", ca_dir, "--out", tmp_path / "broker-crl.pem", "--json")
    assert code == 0 and json.loads(out)["revoked"] == 2, err
    assert (tmp_path / "broker-crl.pem").read_bytes() == (ca_dir / "crl.pem").read_bytes()
    code, out, err = edgeops(
        "fleet", "broker-config", "--ca", ca_dir, "--out", tmp_path / "b", "--port", "1884", "--host", "mqtt.local", "--json"
    )
    assert code == 0 and json.loads(out)["listener"] == "0.0.0.0:1884", err
    assert (tmp_path / "b" / "crl.pem").read_bytes() == (ca_dir / "crl.pem").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fleet", "provision", "dev/1", "--out", "OUT"), "device id 'dev/1' must be"),
        (("fleet", "provision", "dev-9", "--csr", "CSR", "--out", "OUT"), "CSR is for device 'dev-2', expected 'dev-9'"),
        (("fleet", "cert", "revoke", "--serial", "xyz"), "--serial must be a hex serial"),
        (("fleet", "cert", "revoke"), "give either DEVICE_ID or --serial"),
        (("fleet", "cert", "revoke", "dev-404"), "never issued a certificate to device 'dev-404'"),
        (("fleet", "broker-config", "--out", "OUT", "--prefix", "a/+"), "topic prefix 'a/+'"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "CSR").write_bytes(make_csr("dev-2"))
    argv = [str(tmp_path / a) if a in ("OUT", "CSR") else a for a in args]
    code, out, err = edgeops(*argv, "--ca", tmp_path / "ca")
    assert code == 2, (out, err)
    assert message in one_line_error(err)


def test_cli_error_for_a_damaged_ca_in_json(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "ca" / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n")
    code, out, err = edgeops("fleet", "cert", "list", "--ca", tmp_path / "ca", "--json")
    assert code == 2
    doc = json.loads(out)
    assert (
        doc["ok"] is False and doc["error"]["type"] == "PkiError" and "ca.key is not a PEM private key" in doc["error"]["message"]
    )
    one_line_error(err)
