"""``edgeops keys root|rotate|revoke|renew|show`` and ``edgeops fleet trust-push`` (docs/cli.md, docs/security.md).

The logic is :mod:`edgeops_toolchain.keyring` (the host's trust files) and
:mod:`edgeops_fleet.trust_push` (the MQTT side); both load only when a command runs, so
``edgeops --help`` stays fast. These commands join the ``keys`` group of
:mod:`edgeops_toolchain.cli_common` and the ``fleet`` group of :mod:`edgeops_toolchain.fleet_cli`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgeops_core import DEFAULT_PREFIX, InputError, check_device_id
from edgeops_toolchain.cli_common import _run, keys
from edgeops_toolchain.fleet_cli import EXIT_NOT_COMMITTED, _broker_option, _stdout, broker_url, fleet

if TYPE_CHECKING:
    from edgeops_core.trust import ReleaseKeyList

__all__ = ["root", "trust_push"]

_root_key_option = click.option(
    "--root-key",
    "root_keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A root private key (from `keys root init --out DIR`). Repeatable: at least the root's threshold.",
)
_expires_option = click.option(
    "--expires-days", type=int, default=365, show_default=True, help="Days until the new document expires."
)


def _list_line(doc: ReleaseKeyList) -> str:
    return f"release-key list version {doc.version} ({len(doc.keys)} key(s), {len(doc.revoked)} revoked), expires {doc.expires}"


@keys.group("root")
def root() -> None:
    """The root of trust: offline keys that sign the release-key list (docs/security.md)."""


@root.command("init")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for the root keys.")
@click.option("--keys", "n_keys", type=int, default=1, show_default=True, help="How many root keys.")
@click.option("--threshold", type=int, default=1, show_default=True, help="How many of them must sign.")
@_expires_option
@click.option(
    "--signing-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The release key to list first (private PEM) [default: the key builds sign with].",
)
@click.pass_context
def root_init(ctx: click.Context, out: Path, n_keys: int, threshold: int, expires_days: int, signing_key: Path | None) -> None:
    """Make root keys in --out (mode 0600: move them offline), root v1 and release-key list v1.

    The public root.json goes to devices (`edgeops-agent trust root`); both documents are
    also copied to $EDGEOPS_HOME/trust, where builds and `fleet trust-push` find them.
    """
    from edgeops_toolchain.keyring import init_root

    def body() -> None:
        made = init_root(out, keys=n_keys, threshold=threshold, expires_days=expires_days, signing_key=signing_key)
        r = made.root
        click.echo(f"root version 1: {r.threshold} of {len(r.keys)} key(s) must sign, expires {r.expires}")
        for path in made.root_keys:
            click.echo(f"  root key {path} (keep offline)")
        click.echo(f"{_list_line(made.release_keys)}: signing key sha256:{next(iter(made.release_keys.keys))[:16]}…")
        click.echo(
            f"provision devices with: edgeops-agent trust root {out / 'root.json'} --release-keys {out / 'release-keys.json'}"
        )

    _run(ctx, False, body)


@root.command("rotate")
@_root_key_option
@click.option(
    "--new-root-key",
    "new_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A key of the new root (private PEM). Repeatable.",
)
@click.option("--generate", type=int, default=0, help="Make N new root keys instead (with --out).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None, help="Folder for generated keys.")
@click.option("--threshold", type=int, default=None, help="The new root's threshold [default: the old one].")
@_expires_option
@click.pass_context
def root_rotate(
    ctx: click.Context,
    root_keys: tuple[Path, ...],
    new_keys: tuple[Path, ...],
    generate: int,
    out: Path | None,
    threshold: int | None,
    expires_days: int,
) -> None:
    """Replace the root: version + 1, signed by the old root's keys and the new ones (TUF 5.3.4).

    The release-key list is signed again by the new keys; push both with `fleet trust-push`.
    """
    from edgeops_toolchain.keyring import rotate_root

    def body() -> None:
        done = rotate_root(
            root_keys, new_keys=new_keys, generate=generate, out=out, threshold=threshold, expires_days=expires_days
        )
        r = done.root
        click.echo(f"root version {r.version}: {r.threshold} of {len(r.keys)} key(s) must sign, expires {r.expires}")
        for path in done.new_keys:
            click.echo(f"  root key {path} (keep offline)")
        if done.release_keys is not None:
            click.echo(_list_line(done.release_keys))
        click.echo("send it to devices: edgeops fleet trust-push --broker URL --all-known")

    _run(ctx, False, body)


@keys.command("rotate")
@_root_key_option
@click.option(
    "--new-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="List this public key (PEM) instead of generating a new signing key.",
)
@_expires_option
@click.pass_context
def rotate(ctx: click.Context, root_keys: tuple[Path, ...], new_key: Path | None, expires_days: int) -> None:
    """Add a new release key (list version + 1); by default a new key pair that builds then sign with.

    The old key stays listed until `edgeops keys revoke` (docs/security.md, key rotation).
    """
    from edgeops_toolchain.keyring import rotate_release_key

    def body() -> None:
        done = rotate_release_key(root_keys, new_key=new_key, expires_days=expires_days)
        click.echo(f"{_list_line(done.release_keys)}: added key sha256:{done.new_keyid[:16]}…")
        if done.signing_key is not None:
            click.echo(
                f"builds now sign with {done.signing_key}" + (f"; the old key is in {done.retired}" if done.retired else "")
            )
        click.echo("send it to devices: edgeops fleet trust-push --broker URL --all-known")

    _run(ctx, False, body)


@keys.command("revoke")
@click.argument("keyid")
@_root_key_option
@_expires_option
@click.pass_context
def revoke(ctx: click.Context, keyid: str, root_keys: tuple[Path, ...], expires_days: int) -> None:
    """Revoke release key KEYID (64 hex digits, or a unique prefix of 8 or more): list version + 1.

    Devices that take the list refuse every bundle that key signed, installed ones included
    (docs/adr/0018). The current signing key cannot be revoked: rotate first.
    """
    from edgeops_toolchain.keyring import revoke_release_key

    def body() -> None:
        doc = revoke_release_key(keyid, root_keys, expires_days=expires_days)
        click.echo(f"{_list_line(doc)}: revoked key sha256:{doc.revoked[-1][:16]}…")
        click.echo("send it to devices: edgeops fleet trust-push --broker URL --all-known")

    _run(ctx, False, body)


@keys.command("renew")
@_root_key_option
@_expires_option
@click.pass_context
def renew(ctx: click.Context, root_keys: tuple[Path, ...], expires_days: int) -> None:
    """Re-sign the release-key list with a later expiry (version + 1, same keys)."""
    from edgeops_toolchain.keyring import renew_release_keys

    def body() -> None:
        click.echo(_list_line(renew_release_keys(root_keys, expires_days=expires_days)))

    _run(ctx, False, body)


@keys.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def show(ctx: click.Context, as_json: bool) -> None:
    """Show this host's root, release-key list and signing key."""
    from edgeops_toolchain.keyring import load_host_trust, trust_dir
    from edgeops_toolchain.signing import edgeops_home, load_signing_key

    def body() -> None:
        host = load_host_trust()
        dev = edgeops_home() / "keys" / "dev-signing.pem"
        signing = load_signing_key(dev).fingerprint if dev.exists() else None
        doc: dict[str, Any] = {
            "ok": True,
            "trust_dir": str(trust_dir()),
            "signing_key": signing,
            "root": None,
            "release_keys": None,
        }
        if host is not None:
            r, rk = host.root, host.release_keys
            doc["root"] = {"version": r.version, "expires": r.expires, "threshold": r.threshold, "keys": sorted(r.keys)}
            doc["root_versions"] = [h.version for h in host.root_history()]
            if rk is not None:
                doc["release_keys"] = {
                    "version": rk.version,
                    "expires": rk.expires,
                    "keys": sorted(rk.keys),
                    "revoked": list(rk.revoked),
                }
        if as_json:
            click.echo(json.dumps(doc))
            return
        if host is None:
            click.echo(f"no root of trust on this host ({trust_dir()}): development setup (`edgeops keys root init`)")
        else:
            click.echo(f"root:     version {r.version}, {r.threshold} of {len(r.keys)} key(s), expires {r.expires}")
            for k in sorted(r.keys):
                click.echo(f"  {k}")
            if rk is not None:
                click.echo(f"release keys: list version {rk.version}, expires {rk.expires}")
                for k in sorted(rk.keys):
                    click.echo(f"  {k}{'  (signing key)' if k == signing else ''}")
                for k in rk.revoked:
                    click.echo(f"  {k}  REVOKED")
        if signing is not None:
            listed = host is None or (host.release_keys is not None and signing in host.release_keys.keys)
            click.echo(f"signing key: sha256:{signing[:16]}… ({dev})" + ("" if listed else "  NOT IN THE RELEASE-KEY LIST"))

    _run(ctx, as_json, body)


@fleet.command("trust-push")
@_broker_option
@click.option("--device", "-d", "devices", multiple=True, metavar="ID", help="Device id. Repeatable.")
@click.option("--all-known", is_flag=True, help="Every device with a retained state on the broker.")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True, help="Seconds to wait for the answers.")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def trust_push(
    ctx: click.Context, broker: str, devices: tuple[str, ...], all_known: bool, timeout_s: float, prefix: str, as_json: bool
) -> None:
    """Send this host's roots and release-key list to devices (a trust_update command) and wait for each answer.

    Exit 0: every device trusts them now; 3: at least one refused, rejected, failed or timed out.
    """
    from edgeops_core.messages import trust_update_command
    from edgeops_fleet import fleet_status
    from edgeops_fleet.trust_push import push_trust_update
    from edgeops_toolchain.keyring import load_host_trust, trust_dir

    def body() -> None:
        url = broker_url(broker)
        if bool(devices) == all_known:
            raise InputError("name the devices: --device ID (repeatable), or --all-known")
        if not 0 < timeout_s < math.inf:
            raise InputError(f"--timeout must be > 0 seconds, got {timeout_s:g}")
        for device_id in devices:
            check_device_id(device_id)
        host = load_host_trust()
        if host is None:
            raise InputError(f"{trust_dir() / 'root.json'}: no root of trust on this host; nothing to push")
        roots, listed = host.update_documents()
        payload = trust_update_command(roots, listed)
        if roots and roots[0]["signed"]["version"] > 1:  # older roots did not fit in one command
            click.echo(
                f"warning: the command carries roots {roots[0]['signed']['version']}..{host.root.version} (what fits in one "
                f"command): a device on a root older than version {host.oldest_reachable_root()} cannot catch up and must "
                "be provisioned again",
                err=True,
            )
        targets = list(devices) or [row.device_id for row in fleet_status(url, prefix=prefix)]
        if not targets:
            raise InputError(f"no device has a retained state under {prefix}/ on {url}")
        reports = push_trust_update(url, targets, payload, prefix=prefix, timeout_s=timeout_s)
        failed = [r for r in reports if r.outcome != "updated"]
        code = EXIT_NOT_COMMITTED if failed else 0
        if as_json:
            click.echo(json.dumps({"ok": not failed, "exit_code": code, "devices": [r.to_dict() for r in reports]}))
        else:
            from rich.table import Table

            table = Table(title=f"trust_update: root version {host.root.version}, release-key list version "
                          f"{listed['signed']['version'] if listed else '-'}")  # fmt: skip
            for col in ("device", "outcome", "root", "keys", "message"):
                table.add_column(col)
            for r in reports:
                style = "green" if r.outcome == "updated" else "red"
                table.add_row(r.device_id, f"[{style}]{r.outcome}[/]", str(r.root_version or ""), str(r.keys_version or ""),
                              r.message or ("" if r.changed else "already trusted"))  # fmt: skip
            _stdout().print(table)
        for r in failed:
            click.echo(f"error: device {r.device_id}: {r.outcome}: {r.message}", err=True)
        if failed:
            sys.exit(code)

    _run(ctx, as_json, body)
