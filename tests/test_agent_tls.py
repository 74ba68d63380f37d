"""The agent over mutual TLS against a real Mosquitto run with ``edgeops fleet broker-config``'s output.

Agents run in this process (the real :class:`~edgeops_agent.daemon.Daemon`, as the fleet
simulator runs them): five connect with their own certificates and report; one renews its
certificate through a real console (``Console(ca=...)``) while it keeps serving, then its old
certificate is revoked and the broker restarted, and it reconnects with the new one.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker import Broker, free_port
from conftest import Built
from edgeops_agent.config import load_config
from edgeops_agent.daemon import Daemon
from edgeops_agent.errors import ConfigError
from edgeops_agent.identity import Identity, IdentityError, TlsSettings
from edgeops_agent.install import install_bundle
from edgeops_agent.mqtt import MqttLink, MqttSettings
from edgeops_agent.outbox import Outbox
from edgeops_agent.store import DataDir
from edgeops_core import Manifest, read_members
from edgeops_fleet import BrokerUrl
from edgeops_fleet.console import Console
from edgeops_fleet.link import TlsFiles
from edgeops_fleet.pki import CertificateAuthority, console_identity, write_broker_config
from edgeops_fleet.store import Store


@dataclass
class Pki:
    ca: CertificateAuthority
    root: Path
    broker: Broker
    console_tls: Path
    watch_tls: Path

    def reload_crl(self) -> None:
        """What the runbook says after a revocation: the CA's CRL to the broker, then a restart."""
        (self.broker.folder / "crl.pem").write_bytes(self.ca.crl_pem())
        self.broker.stop()
        self.broker.start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.init(root / "ca")
    port = free_port()
    # Each console process has its own identity (the broker makes the CN the client id).
    conf = write_broker_config(
        ca,
        root / "broker",
        port=port,
        bind="127.0.0.1",
        hosts=("127.0.0.1",),
        consoles=("main", "watch"),
        persistence_dir=root / "persist",
        user="root" if os.geteuid() == 0 else None,  # as root, mosquitto would drop to a user that cannot read the key
    )
    ca.issue(console_identity("main"), root / "console")
    ca.issue(console_identity("watch"), root / "watch")
    broker = Broker.from_config(conf, port, root / "broker")
    broker.start()
    try:
        yield Pki(ca, root, broker, root / "console", root / "watch")
    finally:
        broker.stop()


@dataclass
class Watcher:
    """The console's view over mutual TLS: every device message under the prefix."""

    tls: Path
    port: int
    messages: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{id(self)}", protocol=mqtt.MQTTv5)
        self.client.tls_set_context(TlsFiles.from_folder(self.tls).context())
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"edgeops/v1/+/{leaf}", 1) for leaf in ("state", "telemetry", "events", "csr")]
        )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        _, device, leaf = msg.topic.rsplit("/", 2)
        with self._lock:
            self.messages.append((device, leaf, json.loads(msg.payload)))

    def start(self) -> Watcher:
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def of(self, leaf: str, device: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [m for d, lf, m in self.messages if lf == leaf and (device is None or d == device)]

    def events(self, kind: str, device: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("events", device) if e["type"] == kind]

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        with self._lock:
            seen = [(d, lf, m.get("type")) for d, lf, m in self.messages][-15:]
        raise AssertionError(f"timed out waiting for {what}; last: {seen}")


def _agent(tmp_path: Path, built: Built, pki: Pki, name: str, *, days: int = 365, extra: str = "") -> Path:
    """A provisioned device folder: its certificate, trust store, installed bundle and agent.toml."""
    folder = tmp_path / name
    pki.ca.issue(name, folder / "tls", not_after=datetime.now(UTC) + timedelta(days=days))
    data = DataDir(folder / "data")
    data.add_trusted_key(built.public_key)
    install_bundle(data, built.bundle, target="ecu")
    config = folder / "agent.toml"
    config.write_text(
        f'device_id = "{name}"\ntarget = "ecu"\ndata_dir = "data"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {pki.broker.port}\nkeepalive_s = 2\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n'
        f'tls = {{ ca = "tls/ca.crt", cert = "tls/client.crt", key = "tls/client.key"{extra} }}\n'
        "[telemetry]\ninterval_s = 0.5\n"
    )
    return config


class Running:
    """A daemon on a thread of this process."""

    def __init__(self, config: Path) -> None:
        self.daemon = Daemon(load_config(config), endpoint=False)
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(timeout=15)


def _rows(built: Built) -> list[list[float]]:
    m = Manifest.from_json(read_members(built.bundle.read_bytes())["manifest.json"])
    return [list(v.input) for v in m.self_test.vectors]


def test_five_agents_connect_over_mutual_tls_and_telemetry_flows(tmp_path: Path, built: Built, pki: Pki) -> None:
    watcher = Watcher(pki.watch_tls, pki.broker.port).start()
    names = [f"tls-{i}" for i in range(5)]
    agents = [Running(_agent(tmp_path, built, pki, n)) for n in names]
    try:
        watcher.wait(lambda: {n for n in names if watcher.of("telemetry", n)} == set(names), "telemetry from all five")
        for n in names:
            state = [s for s in watcher.of("state", n) if s["online"]]
            assert state and state[-1]["health"] == "ok"
        assert all(a.daemon.link.connected.is_set() and a.daemon.link.last_error is None for a in agents)
    finally:
        for a in agents:
            a.stop()
        watcher.stop()


def _connect_with(pki: Pki, cert: Path, key: Path, client_id: str) -> bool:
    """Whether the broker answers an MQTT CONNECT over TLS with this certificate with CONNACK 0."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca.folder / "ca.crt"))
    ctx.load_cert_chain(str(cert), str(key))
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid  # MQTT 3.1.1, clean session
    try:
        with (
            socket.create_connection(("127.0.0.1", pki.broker.port), timeout=3) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(bytes([0x10, len(body)]) + body)
            return tls.recv(4) == b"\x20\x02\x00\x00"
    except (OSError, ssl.SSLError):
        return False


def test_renewal_completes_while_serving_then_the_old_certificate_is_revoked(tmp_path: Path, built: Built, pki: Pki) -> None:
    name = "tls-renew"
    config = _agent(tmp_path, built, pki, name, days=5)  # fewer than renew_days (30) and warn_days (14) left
    old_cert, old_key = tmp_path / name / "tls" / "client.crt", tmp_path / name / "tls" / "client.key"
    store = Store.open(f"sqlite:///{tmp_path / 'console.db'}")
    url = BrokerUrl("127.0.0.1", pki.broker.port, TlsFiles.from_folder(pki.console_tls))
    console = Console(url, store, http=None, bundles_dir=tmp_path / "bundles", work_dir=tmp_path / "w", ca=pki.ca.folder)
    console.start()
    watcher = Watcher(pki.watch_tls, pki.broker.port).start()
    agent = Running(config)
    errors: list[Exception] = []
    served = [0]
    stop = threading.Event()

    def serve() -> None:  # the device keeps answering all through the swap
        rows = _rows(built)
        while not stop.is_set():
            try:
                agent.daemon.agent.predict(rows[served[0] % len(rows)])
                served[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure to serve is what the test counts
                errors.append(exc)
            time.sleep(0.002)

    server = threading.Thread(target=serve, daemon=True)
    try:
        server.start()
        old_serial = agent.daemon.renewal.identity.serial  # type: ignore[union-attr]
        watcher.wait(lambda: bool(watcher.events("cert_expiring", name)), "cert_expiring")
        expiring = watcher.events("cert_expiring", name)[0]["detail"]
        assert 4.9 < expiring["days_left"] <= 5 and expiring["serial"] == f"{old_serial:x}"
        watcher.wait(lambda: bool(watcher.events("cert_renewed", name)), "cert_renewed", timeout=40)
        renewed = watcher.events("cert_renewed", name)[0]["detail"]
        assert renewed["previous_serial"] == f"{old_serial:x}" and renewed["serial"] != renewed["previous_serial"]
        assert watcher.of("csr", name)[0]["reason"] == "expiring"
        identity = tmp_path / name / "data" / "tls" / "identity.pem"
        assert identity.stat().st_mode & 0o777 == 0o600
        assert not (tmp_path / name / "data" / "tls" / "pending.key").exists()
        assert console.signer is not None and console.signer.counters["signed"] == 1
        new_days = agent.daemon.renewal.identity.days_left()  # type: ignore[union-attr]
        assert new_days > 300

        # Revoke the old certificate; the broker reads its CRL when it starts.
        assert pki.ca.revoke(serial=old_serial) == [old_serial]
        connects = agent.daemon.link.connects
        pki.reload_crl()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            agent.daemon.link.connects > connects and agent.daemon.link.connected.is_set()
        ):
            time.sleep(0.05)
        assert agent.daemon.link.connected.is_set() and agent.daemon.link.connects > connects, agent.daemon.link.last_error
        assert not _connect_with(pki, old_cert, old_key, "someone-with-the-old-cert")
        n = len(watcher.of("telemetry", name))
        watcher.wait(lambda: len(watcher.of("telemetry", name)) > n + 2, "telemetry after the revocation")
        stop.set()
        server.join(timeout=5)
        assert not errors and served[0] > 100
    finally:
        stop.set()
        agent.stop()
        watcher.stop()
        console.stop()
        store.close()


def test_a_certificate_the_broker_refuses_is_abandoned_and_the_old_one_kept(tmp_path: Path, built: Built, pki: Pki) -> None:
    name = "tls-refused"
    agent = Running(_agent(tmp_path, built, pki, name, extra=", renew_days = 0"))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not agent.daemon.link.connected.is_set():
            time.sleep(0.05)
        renewal = agent.daemon.renewal
        assert renewal is not None
        old = renewal.identity.serial
        csr = renewal.identity.new_request()
        pem = pki.ca.sign_csr(csr.encode(), identity=name)
        from cryptography import x509

        serial = x509.load_pem_x509_certificate(pem).serial_number
        pki.ca.revoke(serial=serial)  # valid from the CA, but the broker (after a restart) refuses it
        pki.reload_crl()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not agent.daemon.link.connected.is_set():
            time.sleep(0.05)
        with pytest.raises(IdentityError, match="did not accept a connection"):
            renewal.install(pem.decode(), timeout_s=3)
        assert renewal.identity.serial == old
        assert not (tmp_path / name / "data" / "tls" / "identity.pem").exists()
        assert not (tmp_path / name / "data" / "tls" / "next.pem").exists()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not agent.daemon.link.connected.is_set():
            time.sleep(0.05)
        assert agent.daemon.link.connected.is_set(), "back on the old certificate"
    finally:
        agent.stop()


# -- unit: the identity's checks ---------------------------------------------------------------


def _identity(tmp_path: Path, pki: Pki, name: str = "unit-1", **kw: Any) -> Identity:
    files = pki.ca.issue(name, tmp_path / name / "tls", **kw)
    assert files.key is not None
    return Identity(TlsSettings(files.ca, files.cert, files.key), name, tmp_path / name / "data" / "tls")


def test_a_certificate_for_another_key_device_or_ca_is_refused_and_nothing_changes(tmp_path: Path, pki: Pki) -> None:
    ident = _identity(tmp_path, pki)
    with pytest.raises(IdentityError, match="no certificate request is pending"):
        ident.stage(pki.ca.sign_csr(_csr("unit-1"), identity="unit-1").decode())
    csr = ident.new_request()
    with pytest.raises(IdentityError, match="not for the pending key"):
        ident.stage(pki.ca.sign_csr(_csr("unit-1"), identity="unit-1").decode())
    other_ca = CertificateAuthority.init(tmp_path / "other-ca")
    with pytest.raises(IdentityError, match=r"not issued by the CA in mqtt\.tls\.ca"):
        ident.stage(other_ca.sign_csr(csr.encode(), identity="unit-1").decode())
    with pytest.raises(IdentityError, match="not a usable PEM certificate"):
        ident.stage("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert not (ident.folder / "next.pem").exists() and not (ident.folder / "identity.pem").exists()
    staged = ident.stage(pki.ca.sign_csr(csr.encode(), identity="unit-1").decode())
    assert staged.cert == ident.folder / "next.pem" and staged.cert.stat().st_mode & 0o777 == 0o600


def _csr(name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def test_a_crash_mid_swap_keeps_a_matching_pair_and_the_newest_wins(tmp_path: Path, pki: Pki) -> None:
    ident = _identity(tmp_path, pki, days=30)
    csr = ident.new_request()
    staged = ident.stage(pki.ca.sign_csr(csr.encode(), identity="unit-1", days=400).decode())
    # kill -9 after staging: the next start drops the unproven swap and keeps the configured pair
    again = Identity(ident.settings, "unit-1", ident.folder)
    assert not staged.cert.exists() and again.serial == ident.serial
    # a committed renewal is used after a restart (it expires last)
    csr = again.new_request()
    staged = again.stage(pki.ca.sign_csr(csr.encode(), identity="unit-1", days=400).decode())
    again.commit(staged, again.context_for(staged))
    third = Identity(ident.settings, "unit-1", ident.folder)
    assert third.serial == again.serial != ident.serial and third.days_left() > 390
    # a damaged renewal is ignored (logged), the configured pair serves
    renewed = (ident.folder / "identity.pem").read_bytes()
    (ident.folder / "identity.pem").write_bytes(b"garbage")
    assert Identity(ident.settings, "unit-1", ident.folder).serial == ident.serial
    # re-provisioned after a leak, for fewer days: the files issued last win over the renewal
    (ident.folder / "identity.pem").write_bytes(renewed)
    files = pki.ca.issue(
        "unit-1", tmp_path / "again", not_before=datetime.now(UTC), not_after=datetime.now(UTC) + timedelta(days=10)
    )
    assert files.key is not None
    fresh = Identity(TlsSettings(files.ca, files.cert, files.key), "unit-1", ident.folder)
    assert fresh.pair.cert == files.cert and fresh.days_left() < 11
    # a configured key that does not match its certificate: the renewal serves; both broken: one ConfigError
    mismatched = TlsSettings(files.ca, files.cert, ident.settings.key)
    assert Identity(mismatched, "unit-1", ident.folder).serial == third.serial
    (ident.folder / "identity.pem").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"no usable TLS identity.*cannot be used together"):
        Identity(mismatched, "unit-1", ident.folder)


def test_an_identity_for_another_device_or_ca_or_not_yet_valid_is_never_used(tmp_path: Path, pki: Pki) -> None:
    ident = _identity(tmp_path, pki, "unit-2")
    other = pki.ca.issue("unit-3", tmp_path / "unit-3")
    assert other.key is not None
    (ident.folder).mkdir(parents=True, exist_ok=True)
    (ident.folder / "identity.pem").write_bytes(other.key.read_bytes() + other.cert.read_bytes())
    assert Identity(ident.settings, "unit-2", ident.folder).serial == ident.serial  # not unit-3's
    foreign = CertificateAuthority.init(tmp_path / "foreign-ca").issue("unit-2", tmp_path / "foreign")
    assert foreign.key is not None
    with pytest.raises(ConfigError, match=r"not issued by the CA in mqtt\.tls\.ca"):
        Identity(TlsSettings(ident.settings.ca, foreign.cert, foreign.key), "unit-2", tmp_path / "empty")
    later = pki.ca.issue("unit-2", tmp_path / "later", not_before=datetime.now(UTC) + timedelta(days=2))
    assert later.key is not None
    with pytest.raises(ConfigError, match="valid only from"):
        Identity(TlsSettings(ident.settings.ca, later.cert, later.key), "unit-2", tmp_path / "empty")


def test_a_retried_request_keeps_its_key_so_an_earlier_answer_still_installs(tmp_path: Path, pki: Pki) -> None:
    ident = _identity(tmp_path, pki, "unit-4")
    first = ident.new_request()
    second = ident.new_request()  # asked again an hour later: same key, so the first answer still fits
    assert _public(first) == _public(second)
    staged = ident.stage(pki.ca.sign_csr(first.encode(), identity="unit-4").decode())
    ident.abandon(staged)
    assert _public(ident.new_request()) != _public(first)  # a new key only after a renewal ended
    (ident.folder / "pending.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ndamaged\n")
    with pytest.raises(IdentityError, match="no certificate request is pending"):
        ident.stage(pki.ca.sign_csr(first.encode(), identity="unit-4").decode())
    assert ident.new_request()  # a damaged pending key is replaced


def _public(csr_pem: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    csr = x509.load_pem_x509_csr(csr_pem.encode())
    return csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_renew_days_0_never_asks_by_itself_and_the_expiry_event_comes_once_a_day(tmp_path: Path, pki: Pki) -> None:
    from edgeops_agent.identity import CHECK_INTERVAL_S, Renewal

    files = pki.ca.issue("unit-5", tmp_path / "unit-5", not_after=datetime.now(UTC) + timedelta(days=2))
    assert files.key is not None
    ident = Identity(TlsSettings(files.ca, files.cert, files.key, renew_days=0), "unit-5", tmp_path / "tls5")
    events: list[tuple[str, str | None]] = []
    published: list[dict[str, Any]] = []
    clock = [0.0]
    renewal = Renewal(
        ident,
        publish=lambda m: published.append(m) is None,
        put_event=lambda kind, detail, once: events.append((kind, once)),
        use_context=lambda ctx: None,
        reconnect=lambda: None,
        connects=lambda: 0,
        connected=threading.Event(),
        clock=lambda: clock[0],
    )
    day = (datetime.now(UTC) + timedelta(days=1)).replace(hour=10)  # 1-2 days left, well inside one UTC day
    renewal.check(now=day)
    renewal.check(now=day)  # within the hour: nothing
    clock[0] += CHECK_INTERVAL_S
    renewal.check(now=day + timedelta(hours=1))
    assert not published and [k for k, _ in events] == ["cert_expiring", "cert_expiring"]
    assert events[0][1] == events[1][1]  # the same once-key on the same day: the outbox keeps one


def test_tls_config_errors_name_the_field_and_there_is_no_plaintext_fallback(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "data").mkdir()
    base = 'device_id = "d1"\ntarget = "ecu"\ndata_dir = "data"\n[mqtt]\n'
    cfg = tmp_path / "agent.toml"
    cfg.write_text(base + 'tls = { ca = "nope.crt", cert = "c", key = "k" }\n')
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca"):
        load_config(cfg)
    cfg.write_text(base + 'tls = { ca = "agent.toml", cert = "agent.toml", key = "agent.toml", days = 3 }\n')
    with pytest.raises(ConfigError, match="days"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        Identity(TlsSettings(cfg, cfg, cfg), "d1", tmp_path / "tls")
    settings = MqttSettings(tls=TlsSettings(cfg, cfg, cfg))
    with pytest.raises(ValueError, match="plaintext"):
        MqttLink(settings, "d1", Outbox(tmp_path / "o.sqlite"), offline_state={}, on_command=lambda b: None)


def test_the_console_signs_only_a_csr_for_the_topics_device_and_not_in_a_loop(tmp_path: Path, pki: Pki) -> None:
    from edgeops_core import parse_command
    from edgeops_core.messages import CertificateRequest
    from edgeops_core.topics import utc_now_text
    from edgeops_fleet.certs import SIGN_INTERVAL_S, CertificateSigner

    sent: list[tuple[str, bytes]] = []
    signer = CertificateSigner(pki.ca.folder, "edgeops/v1", lambda d, p: sent.append((d, p)))
    pki.ca.issue("dev-a", tmp_path / "dev-a")  # dev-a holds a valid certificate; dev-x never had one

    def request(device: str, cn: str) -> bytes:
        return CertificateRequest(device_id=device, ts=utc_now_text(), csr=_csr(cn).decode(), reason="expiring").to_json()

    t = SIGN_INTERVAL_S + 1
    assert "expected 'dev-a'" in (signer.handle("edgeops/v1/dev-a/csr", request("dev-a", "dev-b"), now=0) or "")
    assert "at most one request" in (signer.handle("edgeops/v1/dev-a/csr", request("dev-a", "dev-a"), now=1) or "")
    assert "names device 'dev-b'" in (signer.handle("edgeops/v1/dev-a/csr", request("dev-b", "dev-b"), now=t) or "")
    assert signer.handle("edgeops/v1/dev-a/csr", b"{not json", now=2 * t) is not None
    assert "provision it again" in (signer.handle("edgeops/v1/dev-x/csr", request("dev-x", "dev-x"), now=0) or "")
    assert not sent
    assert signer.handle("edgeops/v1/dev-a/csr", request("dev-a", "dev-a"), now=3 * t) is None
    cmd = parse_command(sent[0][1])
    assert sent[0][0] == "dev-a" and cmd.type == "install_cert"
    assert str(cmd.args["certificate"]).startswith("-----BEGIN CERTIFICATE-----")
    # once its certificates are revoked, a device that is still connected gets no new one
    pki.ca.revoke(identity="dev-a")
    assert "provision it again" in (signer.handle("edgeops/v1/dev-a/csr", request("dev-a", "dev-a"), now=4 * t) or "")
    assert len(sent) == 1 and signer.counters["signed"] == 1 and signer.counters["refused"] == 6
    # one queued request per device: a flood from one cannot push another's out
    for _ in range(300):
        signer.take("edgeops/v1/dev-a/csr", b"junk")
    signer.take("edgeops/v1/dev-b/csr", b"junk")
    assert signer.counters["dropped"] == 299 and signer._queue.qsize() == 2


def test_renew_cert_on_an_agent_without_tls_is_rejected_not_failed() -> None:
    from types import SimpleNamespace

    from edgeops_agent.daemon import HANDLERS
    from edgeops_agent.errors import CommandRejectedError
    from edgeops_core import Command

    with pytest.raises(CommandRejectedError, match="does not connect over TLS"):
        HANDLERS["renew_cert"](SimpleNamespace(renewal=None), Command(id="r-1", type="renew_cert"))  # type: ignore[arg-type]


def test_fleet_cert_renew_follows_a_device_to_its_new_certificate(tmp_path: Path, built: Built, pki: Pki) -> None:
    """The operator's command (its own console identity, "watch"), a console with --ca signing, one agent."""
    from conftest import run_edgeops

    name = "tls-cli"
    store = Store.open(f"sqlite:///{tmp_path / 'console.db'}")
    url = BrokerUrl("127.0.0.1", pki.broker.port, TlsFiles.from_folder(pki.console_tls))
    console = Console(url, store, http=None, bundles_dir=tmp_path / "bundles", work_dir=tmp_path / "w", ca=pki.ca.folder)
    console.start()
    agent = Running(_agent(tmp_path, built, pki, name, extra=", renew_days = 0"))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not agent.daemon.link.connected.is_set():
            time.sleep(0.05)
        broker = f"mqtts://127.0.0.1:{pki.broker.port}"
        plain = run_edgeops("fleet", "cert", "renew", name, "--broker", broker, "--json")
        assert plain.returncode == 2 and "--tls" in plain.stderr
        proc = run_edgeops(
            "fleet", "cert", "renew", name, "--broker", broker, "--tls", pki.watch_tls, "--timeout", "40", "--json"
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        row = json.loads(proc.stdout)["devices"][0]
        assert row["device_id"] == name and row["outcome"] == "renewed"
        assert (tmp_path / name / "data" / "tls" / "identity.pem").exists()
    finally:
        agent.stop()
        console.stop()
        store.close()
