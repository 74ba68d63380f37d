"""``edgeops fleet``: deploy a bundle to devices over MQTT and show the fleet (docs/cli.md).

The logic is :mod:`edgeops_fleet` (it depends on ``edgeops_core`` only); this module adds
what the toolchain owns: the development key ``build`` signs with, the exit codes and the
rich tables. Exit 3 here means at least one device did not commit (the output names it).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgeops_core import DEFAULT_PREFIX, InputError, check_device_id, verify_bundle_file
from edgeops_toolchain.cli import _run

if TYPE_CHECKING:  # rich and the fleet package load only when a fleet command runs (`edgeops --help` stays fast)
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from edgeops_fleet import DeviceReport, DeviceStatus

__all__ = ["EXIT_INTERRUPTED", "EXIT_NOT_COMMITTED", "fleet"]

#: At least one device refused, rolled back, failed or timed out.
EXIT_NOT_COMMITTED = 3
#: Interrupted (Ctrl-C), as shells report SIGINT.
EXIT_INTERRUPTED = 130


@click.group()
def fleet() -> None:
    """Deploy bundles to devices over MQTT and show the fleet."""


_broker_option = click.option("--broker", required=True, metavar="mqtt://HOST:PORT", help="The MQTT broker.")
_prefix_option = click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topic prefix.")


@fleet.command("deploy")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", "-d", "devices", multiple=True, required=True, metavar="ID", help="Device id. Repeatable.")
@_broker_option
@click.option(
    "--key",
    "-k",
    "keys_",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable. [default: the per-user development key]",
)
@click.option("--max-rate", type=float, default=None, metavar="KIB_PER_S", help="Cap per device, KiB/s.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True, help="Seconds to wait for every device.")
@click.option("--retry-bad", is_flag=True, help="Fetch it even on devices that rolled this bundle back before.")
@_prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def deploy(
    ctx: click.Context,
    bundle: Path,
    devices: tuple[str, ...],
    broker: str,
    keys_: tuple[Path, ...],
    max_rate: float | None,
    timeout_s: float,
    retry_bad: bool,
    prefix: str,
    as_json: bool,
) -> None:
    """Verify BUNDLE, send it to every --device and follow each one to its final event.

    Exit 0: every device committed the release; 3: at least one refused, rolled back,
    failed or timed out (each is named with its reason).
    """
    from edgeops_fleet import Deployer, parse_broker_url
    from edgeops_toolchain.export_c import default_trusted_keys

    def body() -> None:
        url = parse_broker_url(broker)
        for device_id in devices:
            check_device_id(device_id)
        if max_rate is not None and not 0 < max_rate < math.inf:
            raise InputError(f"--max-rate must be > 0 KiB/s, got {max_rate:g}")
        if not 0 < timeout_s < math.inf:
            raise InputError(f"--timeout must be > 0 seconds, got {timeout_s:g}")
        trusted, dev = default_trusted_keys(keys_)
        if not bundle.exists() and not bundle.is_symlink():
            raise InputError(f"{bundle}: no such bundle file")
        verified = verify_bundle_file(bundle, trusted)
        deployer = Deployer(verified, devices, url, prefix=prefix, max_bytes_per_s=None if max_rate is None else max_rate * 1024)
        d, m = deployer.deploy, verified.manifest
        if not as_json:
            key = "the development key" if dev else "key"
            click.echo(
                f"verified {bundle.name}: {m.name} {m.version} release {m.release} for {m.target}, signed by {key} "
                f"sha256:{verified.signer[:16]}…; deploy {d.deploy_id}: {d.size} bytes in {d.block_count} blocks "
                f"to {len(deployer.devices)} device(s) via {url}"
            )
        started = time.monotonic()
        try:
            with _Live(enabled=not as_json, title=f"deploy {d.deploy_id}: {m.name} release {m.release}") as live:
                reports = deployer.run(timeout_s, on_tick=live.update)
        except KeyboardInterrupt:  # run() closed the session; devices finish what they fetched on their own
            click.echo(f"error: interrupted; deploy {d.deploy_id} stops being served (see `edgeops fleet status`)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        elapsed = time.monotonic() - started
        failed = [r for r in reports if r.outcome != "committed"]
        code = EXIT_NOT_COMMITTED if failed else 0
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": not failed,
                        "exit_code": code,
                        "deploy_id": d.deploy_id,
                        "bundle": str(bundle),
                        "name": m.name,
                        "version": m.version,
                        "release": m.release,
                        "target": m.target,
                        "sha256": d.sha256,
                        "size": d.size,
                        "block_size": d.block_size,
                        "block_count": d.block_count,
                        "development_key": dev,
                        "elapsed_s": round(elapsed, 3),
                        "devices": [r.to_dict() for r in reports],
                    }
                )
            )
        else:
            title = f"deploy {d.deploy_id}: {m.name} release {m.release} ({elapsed:.1f} s)"
            _stdout().print(_deploy_table(reports, title=title))
        for r in failed:
            click.echo(f"error: device {r.device_id}: {r.outcome} ({r.reason}): {r.message}", err=True)
        if failed:
            sys.exit(code)

    _run(ctx, as_json, body)


@fleet.command("status")
@_broker_option
@_prefix_option
@click.option("--wait", "wait_s", type=float, default=5.0, show_default=True, help="Longest wait for retained states (s).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, broker: str, prefix: str, wait_s: float, as_json: bool) -> None:
    """List every device the broker holds a retained state for."""
    from edgeops_fleet import fleet_status, parse_broker_url

    def body() -> None:
        url = parse_broker_url(broker)
        if not 0 < wait_s < math.inf:
            raise InputError(f"--wait must be > 0 seconds, got {wait_s:g}")
        rows = fleet_status(url, prefix=prefix, max_wait_s=wait_s)
        if as_json:
            click.echo(json.dumps({"ok": True, "broker": str(url), "devices": [r.to_dict() for r in rows]}))
        elif not rows:
            click.echo(f"no device has a retained state under {prefix}/ on {url}")
        else:
            _stdout().print(_fleet_table(rows))

    _run(ctx, as_json, body)


def _deploy_rows(table: Table, reports: list[DeviceReport]) -> None:
    styles = {"committed": "green", "timed_out": "yellow"}
    for r in reports:
        outcome = r.outcome or "-"
        style = styles.get(outcome, "red") if r.outcome else ""
        progress = f"{r.blocks_received}/{r.blocks_total}" if r.blocks_total else "-"
        online = "-" if r.online is None else ("yes" if r.online else "no")
        reason = r.reason if r.reason is None or r.message is None else f"{r.reason}: {r.message}"
        table.add_row(
            r.device_id,
            online,
            r.phase or "waiting",
            progress,
            f"{r.bytes_sent / 1024:.0f}",
            f"[{style}]{outcome}[/]" if style else outcome,
            reason or "",
        )


def _deploy_table(reports: list[DeviceReport], *, title: str) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("device", "left"), ("online", "left"), ("phase", "left"), ("blocks", "right"),
                          ("KiB sent", "right"), ("outcome", "left"), ("reason", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    _deploy_rows(table, reports)
    return table


def _fleet_table(rows: list[DeviceStatus]) -> Table:
    from rich.table import Table

    table = Table(title="fleet")
    for name in ("device", "online", "target", "model", "release", "slot", "health", "ota", "last error"):
        table.add_column(name)
    for s in rows:
        if s.error is not None:
            table.add_row(s.device_id, "-", "-", "-", "-", "-", "-", "-", f"[red]{s.error}[/]")
            continue
        ota = "-" if s.ota_phase is None else f"{s.ota_phase} (release {s.ota_release})"
        table.add_row(
            s.device_id,
            "[green]yes[/]" if s.online else "[red]no[/]",
            s.target or "-",
            s.model or "-",
            "-" if s.release is None else str(s.release),
            s.slot or "-",
            s.health or "-",
            ota,
            s.last_error or "",
        )
    return table


def _stdout() -> Console:
    """The console for the final tables: a pipe gets full rows rather than 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


class _Live:
    """The live progress table on stderr, drawn only on a terminal."""

    def __init__(self, *, enabled: bool, title: str) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._title = title
        self._live: Live | None = None

    def __enter__(self) -> _Live:
        if self._enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def update(self, reports: list[DeviceReport]) -> None:
        """Redraw with the latest per-device reports."""
        if self._live is not None:
            self._live.update(_deploy_table(reports, title=self._title))
