"""``edgeops fleet ca | provision | cert | broker-config``: the fleet CA and the broker that enforces it.

The logic is :mod:`edgeops_fleet.pki` (docs/security.md); this module parses options and
prints. Every command but ``cert renew`` works on a CA folder on this machine (``--ca DIR``)
and never talks to a broker or the console, so it runs where the CA key is kept: offline.
``cert renew`` only asks devices over MQTT to renew; the console with ``--ca`` signs.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from edgeops_core import DEFAULT_PREFIX, InputError
from edgeops_toolchain.cli_common import _run
from edgeops_toolchain.fleet_cli import _broker_option, _stdout, broker_url, fleet

__all__ = ["ca", "cert"]

_ca_option = click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The CA folder (`edgeops fleet ca init DIR`).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _when(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_serial(text: str) -> int:
    """A serial as `cert list` prints it (hex, optionally 0x-prefixed or colon-separated)."""
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{1,40}", digits):
        raise InputError(f"--serial must be a hex serial number as `edgeops fleet cert list` prints it, got {text!r}")
    return int(digits, 16)


def _identity(name: str, console: bool) -> str:
    from edgeops_fleet.pki import console_identity

    return console_identity(name) if console else name


# -- edgeops fleet ca ------------------------------------------------------------------------------


@fleet.group("ca")
def ca() -> None:
    """The fleet's certificate authority (keep its folder offline)."""


@ca.command("init")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option("--name", default="edgeops fleet CA", show_default=True, help="The CA certificate's common name.")
@click.option("--days", type=int, default=3650, show_default=True, help="Validity of the CA certificate.")
@click.option("--force", is_flag=True, help="Replace a CA already in FOLDER (every certificate it issued stops working).")
@_json_option
@click.pass_context
def ca_init(ctx: click.Context, folder: Path, name: str, days: int, force: bool, as_json: bool) -> None:
    """Create a CA in FOLDER: ca.crt, ca.key (0600), index.json and an empty crl.pem."""

    def body() -> None:
        from edgeops_fleet.pki import CertificateAuthority

        authority = CertificateAuthority.init(folder, name=name, days=days, force=force)
        cert = authority.certificate
        doc = {
            "ok": True,
            "folder": str(folder),
            "certificate": str(folder / "ca.crt"),
            "name": name,
            "serial": format(cert.serial_number, "x"),
            "not_after": _when(cert.not_valid_after_utc),
        }
        if as_json:
            click.echo(json.dumps(doc))
            return
        click.echo(f"CA {name!r} in {folder}, valid until {doc['not_after']}")
        click.echo(f"devices and the broker trust {folder / 'ca.crt'}; keep {folder / 'ca.key'} offline")

    _run(ctx, as_json, body)


@ca.command("crl")
@_ca_option
@click.option("--days", type=int, default=365, show_default=True, help="Days until the CRL's nextUpdate.")
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write a copy here (the broker's crl.pem), replaced atomically.",
)
@_json_option
@click.pass_context
def ca_crl(ctx: click.Context, ca_dir: Path, days: int, out: Path | None, as_json: bool) -> None:
    """Re-sign the CRL with a fresh nextUpdate (past it, the broker refuses EVERY client)."""

    def body() -> None:
        from cryptography import x509

        from edgeops_fleet.pki import CertificateAuthority

        authority = CertificateAuthority.load(ca_dir)
        path = authority.refresh_crl(days=days)
        if out is not None:
            authority.export_crl(out)
        crl = x509.load_pem_x509_crl(authority.crl_pem())
        doc = {
            "ok": True,
            "crl": str(path),
            "copy": None if out is None else str(out),
            "revoked": len(crl),
            "next_update": _when(crl.next_update_utc),
        }
        if as_json:
            click.echo(json.dumps(doc))
            return
        click.echo(f"{path}: {len(crl)} revoked, next update {doc['next_update']}" + (f"; copied to {out}" if out else ""))
        click.echo("the broker reads it on SIGHUP (new connections); restart it to drop connections of revoked devices")

    _run(ctx, as_json, body)


# -- edgeops fleet provision -----------------------------------------------------------------------


@fleet.command("provision")
@click.argument("device_id")
@_ca_option
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder: ca.crt, client.crt and client.key (0600).",
)
@click.option("--days", type=int, default=365, show_default=True, help="Validity of the certificate.")
@click.option(
    "--csr",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Sign this CSR (PEM) made on the device: only ca.crt and client.crt are written, the key stays on the device.",
)
@click.option("--console", is_flag=True, help="DEVICE_ID is a console name: the identity is console:DEVICE_ID.")
@click.option("--force", is_flag=True, help="Replace files already in --out.")
@_json_option
@click.pass_context
def provision(
    ctx: click.Context,
    device_id: str,
    ca_dir: Path,
    out: Path,
    days: int,
    csr: Path | None,
    console: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Issue a client certificate to DEVICE_ID (or a console) from the CA in --ca."""

    def body() -> None:
        from cryptography import x509

        from edgeops_fleet.pki import CertificateAuthority, PkiError

        identity = _identity(device_id, console)
        authority = CertificateAuthority.load(ca_dir)
        if csr is not None:
            try:
                request = csr.read_bytes()
            except OSError as exc:
                raise PkiError(f"cannot read --csr {csr}: {exc.strerror or exc}") from exc
            files = authority.write_csr_cert(request, identity, out, days=days, force=force)
        else:
            files = authority.issue(identity, out, days=days, force=force)
        leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
        doc = {
            "ok": True,
            "identity": identity,
            "serial": format(leaf.serial_number, "x"),
            "not_after": _when(leaf.not_valid_after_utc),
            "ca": str(files.ca),
            "cert": str(files.cert),
            "key": None if files.key is None else str(files.key),
        }
        if as_json:
            click.echo(json.dumps(doc))
            return
        click.echo(f"{identity}: certificate {doc['serial']} valid until {doc['not_after']}")
        click.echo(f"  {files.ca}\n  {files.cert}" + (f"\n  {files.key} (mode 0600)" if files.key else ""))

    _run(ctx, as_json, body)


# -- edgeops fleet cert ----------------------------------------------------------------------------


@fleet.group("cert")
def cert() -> None:
    """Certificates the fleet CA issued: list and revoke."""


@cert.command("revoke")
@click.argument("device_id", required=False)
@click.option("--serial", default=None, metavar="HEX", help="Revoke this one certificate (as `cert list` prints it).")
@_ca_option
@click.option("--console", is_flag=True, help="DEVICE_ID is a console name.")
@click.option(
    "--crl-out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also copy the new CRL here (the broker's crl.pem), replaced atomically.",
)
@_json_option
@click.pass_context
def cert_revoke(
    ctx: click.Context,
    device_id: str | None,
    serial: str | None,
    ca_dir: Path,
    console: bool,
    crl_out: Path | None,
    as_json: bool,
) -> None:
    """Revoke every certificate of DEVICE_ID, or one by --serial; re-signs the CA's crl.pem.

    Then the broker needs the new crl.pem (--crl-out) and a SIGHUP, which refuses new
    connections with a revoked certificate, or a restart, which also drops a connection
    the device already has (docs/security.md, runbook).
    """

    def body() -> None:
        from edgeops_fleet.pki import CertificateAuthority

        if (device_id is None) == (serial is None):
            raise InputError("give either DEVICE_ID or --serial HEX (one of them)")
        authority = CertificateAuthority.load(ca_dir)
        if serial is not None:
            revoked = authority.revoke(serial=_parse_serial(serial))
        else:
            revoked = authority.revoke(identity=_identity(str(device_id), console))
        if crl_out is not None:
            authority.export_crl(crl_out)
        serials = [format(s, "x") for s in revoked]
        if as_json:
            doc = {
                "ok": True,
                "revoked": serials,
                "crl": str(ca_dir / "crl.pem"),
                "copy": None if crl_out is None else str(crl_out),
            }
            click.echo(json.dumps(doc))
            return
        if not serials:
            click.echo("nothing to revoke: already revoked")
            return
        for s in serials:
            click.echo(f"revoked {s}")
        copied = f"copied to {crl_out}" if crl_out is not None else f"copy {ca_dir / 'crl.pem'} to the broker's crl.pem"
        click.echo(f"{copied}; then SIGHUP the broker (refuses new connections) or restart it (drops open ones too)")

    _run(ctx, as_json, body)


@cert.command("renew")
@click.argument("devices", nargs=-1, required=True)
@_broker_option
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Seconds to wait for every device.")
@_json_option
@click.pass_context
def cert_renew(ctx: click.Context, devices: tuple[str, ...], broker: str, prefix: str, timeout_s: float, as_json: bool) -> None:
    """Ask DEVICES to renew their certificate now and follow each to its answer.

    Each device makes a new key and sends a CSR; a console running with --ca signs it; the
    device swaps once the broker accepted the new certificate. Exit 0 when every device
    renewed, 3 otherwise (each is named with why).
    """
    import math

    from edgeops_fleet.certs import request_renewals

    def body() -> None:
        if not 0 < timeout_s < math.inf:
            raise InputError(f"--timeout must be > 0 seconds, got {timeout_s:g}")
        answers = request_renewals(broker_url(broker), devices, prefix=prefix, timeout_s=timeout_s)
        ok = all(outcome == "renewed" for outcome, _ in answers.values())
        if as_json:
            rows = [{"device_id": d, "outcome": o, "message": m} for d, (o, m) in answers.items()]
            click.echo(json.dumps({"ok": ok, "devices": rows}))
        else:
            for d, (outcome, message) in answers.items():
                click.echo(f"{d}: {outcome} ({message})" if message else f"{d}: {outcome}")
        if not ok:
            sys.exit(3)  # SystemExit passes _run (not a failure of the command itself)

    _run(ctx, as_json, body)


def _status(row: dict[str, Any], now: datetime) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    return "expired" if row["not_after"] <= now else "valid"


@cert.command("list")
@_ca_option
@_json_option
@click.pass_context
def cert_list(ctx: click.Context, ca_dir: Path, as_json: bool) -> None:
    """List every certificate the CA issued, with its status (valid, expired, revoked)."""

    def body() -> None:
        from edgeops_fleet.pki import CertificateAuthority

        rows = CertificateAuthority.load(ca_dir).issued()
        now = datetime.now(UTC)
        docs = [
            {
                "serial": format(r["serial"], "x"),
                "identity": r["identity"],
                "kind": r["kind"],
                "status": _status(r, now),
                "not_before": _when(r["not_before"]),
                "not_after": _when(r["not_after"]),
                "revoked_at": _when(r["revoked_at"]),
                "sha256": r["sha256"],
            }
            for r in rows
        ]
        if as_json:
            click.echo(json.dumps({"ok": True, "certificates": docs}))
            return
        if not docs:
            click.echo("the CA has issued no certificate yet")
            return
        from rich.table import Table

        table = Table(title=f"certificates ({len(docs)})")
        for col in ("serial", "identity", "kind", "status", "not after", "revoked at"):
            table.add_column(col)
        for d in docs:
            colour = {"valid": "green", "expired": "yellow", "revoked": "red"}[d["status"]]
            table.add_row(
                d["serial"], d["identity"], d["kind"], f"[{colour}]{d['status']}[/]", d["not_after"], d["revoked_at"] or ""
            )
        _stdout().print(table)

    _run(ctx, as_json, body)


# -- edgeops fleet broker-config -------------------------------------------------------------------


@fleet.command("broker-config")
@_ca_option
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for the broker's files.")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True, help="TLS listener port.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address the listener binds.")  # noqa: S104
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME",
    help="DNS name or IP address clients connect to (server certificate SAN). Repeatable [default: localhost, 127.0.0.1].",
)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="The fleet's topic prefix.")
@click.option(
    "--console",
    "consoles",
    multiple=True,
    metavar="NAME",
    help="Console name granted the console's rights. Repeatable [default: main].",
)
@click.option(
    "--persistence",
    "persistence_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where mosquitto keeps sessions [default: OUT/data].",
)
@click.option("--user", default=None, help="`user` line: the account mosquitto runs as (it must read OUT).")
@click.option("--force", is_flag=True, help="Replace an earlier configuration (and its server certificate) in --out.")
@_json_option
@click.pass_context
def broker_config(
    ctx: click.Context,
    ca_dir: Path,
    out: Path,
    port: int,
    bind: str,
    hosts: tuple[str, ...],
    prefix: str,
    consoles: tuple[str, ...],
    persistence_dir: Path | None,
    user: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a Mosquitto configuration that enforces the fleet's identities and topic ACL."""

    def body() -> None:
        from edgeops_fleet.pki import CertificateAuthority, write_broker_config

        conf = write_broker_config(
            CertificateAuthority.load(ca_dir),
            out,
            port=port,
            bind=bind,
            hosts=hosts or ("localhost", "127.0.0.1"),
            prefix=prefix,
            consoles=consoles or ("main",),
            persistence_dir=persistence_dir,
            user=user,
            force=force,
        )
        doc = {
            "ok": True,
            "config": str(conf),
            "acl": str(conf.parent / "acl"),
            "listener": f"{bind}:{port}",
            "hosts": list(hosts or ("localhost", "127.0.0.1")),
            "consoles": [f"console:{c}" for c in (consoles or ("main",))],
        }
        if as_json:
            click.echo(json.dumps(doc))
            return
        click.echo(f"wrote {conf} (TLS listener {bind}:{port}, ACL {doc['acl']})")
        click.echo(f"run: mosquitto -c {conf}")

    _run(ctx, as_json, body)
