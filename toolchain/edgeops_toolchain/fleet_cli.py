"""``edgeops fleet``: deploy a bundle to devices over MQTT and show the fleet (docs/cli.md).

The logic is :mod:`edgeops_fleet` (it depends on ``edgeops_core`` only); this module adds
what the toolchain owns: the development key ``build`` signs with, the exit codes and the
rich tables. Exit 3 here means at least one device did not commit (the output names it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgeops_core import DEFAULT_PREFIX, InputError, check_device_id, find_profile, verify_bundle_file
from edgeops_toolchain.cli_common import _run, _targets_dir_option

if TYPE_CHECKING:  # rich and the fleet package load only when a fleet command runs (`edgeops --help` stays fast)
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from edgeops_fleet import BrokerUrl, DeviceReport, DeviceStatus

__all__ = ["EXIT_INTERRUPTED", "EXIT_NOT_COMMITTED", "fleet"]

#: At least one device refused, rolled back, failed or timed out.
EXIT_NOT_COMMITTED = 3
#: Interrupted (Ctrl-C), as shells report SIGINT.
EXIT_INTERRUPTED = 130


@click.group()
def fleet() -> None:
    """Deploy bundles to devices over MQTT and show the fleet."""


def _remember_tls(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    ctx.meta["edgeops.tls"] = value


def _broker_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--broker URL`` and ``--tls DIR`` (read back by :func:`broker_url`)."""
    fn = click.option(
        "--tls",
        type=click.Path(path_type=Path, file_okay=False),
        envvar="EDGEOPS_MQTT_TLS",
        expose_value=False,
        callback=_remember_tls,
        help="Folder with ca.crt, client.crt, client.key (edgeops fleet provision NAME --console) for an mqtts:// broker "
        "[env: EDGEOPS_MQTT_TLS].",
    )(fn)
    return click.option("--broker", required=True, metavar="mqtt[s]://HOST:PORT", help="The MQTT broker.")(fn)


def broker_url(url: str) -> BrokerUrl:
    """``--broker`` parsed, with the command's ``--tls`` folder.

    Raises:
        InputError: a malformed URL, ``mqtts://`` without ``--tls`` (or the reverse), unusable TLS files.
    """
    from edgeops_fleet import parse_broker_url

    ctx = click.get_current_context(silent=True)
    return parse_broker_url(url, ctx.meta.get("edgeops.tls") if ctx is not None else None)


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
    from edgeops_fleet import Deployer
    from edgeops_toolchain.export_c import default_trusted_keys

    def body() -> None:
        url = broker_url(broker)
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
    from edgeops_fleet import fleet_status

    def body() -> None:
        url = broker_url(broker)
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


# -- the console: `serve` and the commands that talk to it over HTTP ------------------------------

#: Where the CLI finds the console when neither --console nor $EDGEOPS_CONSOLE says.
DEFAULT_CONSOLE_URL = "http://127.0.0.1:8780"
_HTTP_TIMEOUT_S = 30.0
#: The largest answer read from the console (a fleet's history page is far smaller).
_MAX_ANSWER_BYTES = 64 * 1024 * 1024

_console_option = click.option(
    "--console",
    "console_url",
    envvar="EDGEOPS_CONSOLE",
    default=DEFAULT_CONSOLE_URL,
    show_default=True,
    metavar="URL",
    help="The console's HTTP address [env: EDGEOPS_CONSOLE].",
)
_token_option = click.option(
    "--token",
    envvar="EDGEOPS_CONSOLE_TOKEN",
    default=None,
    metavar="TOKEN",
    help="The console's API token [env: EDGEOPS_CONSOLE_TOKEN].",
)


class ConsoleClient:
    """A small JSON client of the console's HTTP API (stdlib ``urllib``; docs/console.md).

    Errors become one line each: :class:`~edgeops_fleet.errors.ConsoleError` when the console
    cannot be reached, refuses the token or fails; :class:`~edgeops_core.InputError` when it
    refuses the request as bad input (400) or does not know the device/rollout (404).
    """

    def __init__(self, url: str, token: str | None, *, timeout_s: float = _HTTP_TIMEOUT_S) -> None:
        """Check ``url`` (``http(s)://HOST[:PORT]``).

        Raises:
            InputError: another scheme, no host, or a path/query in the URL.
        """
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise InputError(f"console URL {url!r}: {exc}; expected http://HOST:PORT") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise InputError(f"console URL {url!r} must be http://HOST:PORT (as `edgeops fleet serve --http` binds)")
        # A header value cannot hold line breaks (http.client refuses them, echoing the token).
        if token is not None and not all(33 <= ord(c) <= 126 for c in token):
            raise InputError("the console token must be printable ASCII without spaces or line breaks (--token)")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.token, self.timeout_s = token, timeout_s

    def get(self, path: str, params: list[tuple[str, str]] | None = None) -> dict[str, object]:
        """``GET path?params`` → the decoded JSON object."""
        from urllib.parse import urlencode

        doc: dict[str, object] = self._call("GET", path + (f"?{urlencode(params)}" if params else ""), None)
        return doc

    def post(self, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        """``POST path`` with a JSON body → the decoded JSON object."""
        doc: dict[str, object] = self._call("POST", path, json.dumps(body or {}).encode())
        return doc

    def put(self, path: str, body: dict[str, object]) -> dict[str, object]:
        """``PUT path`` with a JSON body → the decoded JSON object."""
        doc: dict[str, object] = self._call("PUT", path, json.dumps(body).encode())
        return doc

    def get_bytes(self, path: str) -> bytes:
        """``GET path`` → the answer's bytes (a dataset file)."""
        raw = self._call("GET", path, None, as_bytes=True)
        assert isinstance(raw, bytes)
        return raw

    def _call(self, method: str, path: str, data: bytes | None, *, as_bytes: bool = False) -> Any:
        import http.client
        import urllib.error
        import urllib.request

        from edgeops_core._json import load_untrusted_json
        from edgeops_fleet.errors import ConsoleError

        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - http(s) checked above
        request.add_header("Accept", "application/octet-stream" if as_bytes else "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                raw = response.read(_MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as exc:
            with exc:
                message = _error_message(exc.read(64 * 1024)) or exc.reason
            if exc.code == 401:
                raise ConsoleError(
                    f"the console at {self.url} refused the request: {message} (--token or $EDGEOPS_CONSOLE_TOKEN)"
                ) from None
            if exc.code in (400, 404, 413):
                raise InputError(str(message)) from None
            raise ConsoleError(f"the console at {self.url} answered {exc.code}: {message}") from None
        except http.client.HTTPException as exc:  # not HTTP at all: another service on that port
            raise ConsoleError(
                f"{self.url} did not answer in HTTP ({type(exc).__name__}); is it an edgeops console? (--console URL)"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            reason = getattr(reason, "strerror", None) or reason
            raise ConsoleError(
                f"cannot reach the console at {self.url}: {reason} (is `edgeops fleet serve` running? --console URL)"
            ) from None
        if len(raw) > _MAX_ANSWER_BYTES:
            raise ConsoleError(
                f"the console at {self.url} answered more than {_MAX_ANSWER_BYTES} bytes; is it an edgeops console?"
            )
        if as_bytes:
            return raw
        try:
            doc = load_untrusted_json(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ConsoleError(f"the console at {self.url} answered {method} {path} with something that is not a JSON object")
        return doc


def _rows(doc: dict[str, object], key: str) -> list[dict[str, Any]]:
    """``doc[key]`` as a list of objects (the console's answer is checked like any input)."""
    from edgeops_fleet.errors import ConsoleError

    rows = doc.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConsoleError(f"the console's answer has no list of objects {key!r}; is it an edgeops console?")
    return rows


def _row(doc: dict[str, object]) -> dict[str, Any]:
    """``doc["rollout"]`` as an object."""
    from edgeops_fleet.errors import ConsoleError

    row = doc.get("rollout")
    if not isinstance(row, dict):
        raise ConsoleError("the console's answer has no 'rollout' object; is it an edgeops console?")
    return row


def _error_message(raw: bytes) -> str | None:
    from edgeops_core._json import load_untrusted_json

    try:
        doc = load_untrusted_json(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:300] or None
    return str(doc["error"]) if isinstance(doc, dict) and "error" in doc else None


def _parse_tags(values: tuple[str, ...] | list[str], *, option: str = "--tag", key_word: str = "KEY") -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(f"{option} must be {key_word}=VALUE, got {item!r}")
        tags[key.strip()] = value.strip()
    return tags


def parse_group(text: str, tags: tuple[str, ...] = ()) -> dict[str, object]:
    """``--group target=ecu[,k=v...]`` plus ``--tag k=v`` → ``{"target": ..., "tags": {...}}``.

    Raises:
        InputError: not KEY=VALUE pairs, or no ``target``.
    """
    pairs = _parse_tags([p for p in text.split(",") if p.strip()] or [text], option="--group")
    target = pairs.pop("target", None)
    if not target:
        raise InputError(f"--group must name a target, e.g. --group target=ecu (tags: target=ecu,site=a), got {text!r}")
    return {"target": target, "tags": {**pairs, **_parse_tags(tags)}}


def _group_params(group: str | None, target: str | None, tags: tuple[str, ...]) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if group is not None:
        g = parse_group(group, tags)
        if target is not None and target != g["target"]:
            raise InputError(f"--target {target} contradicts --group {group}")
        target, tag_map = str(g["target"]), dict(g["tags"])  # type: ignore[call-overload]
    else:
        tag_map = _parse_tags(tags)
    if target:
        params.append(("target", target))
    params.extend(("tag", f"{k}={v}") for k, v in tag_map.items())
    return params


@fleet.command("serve")
@_broker_option
@click.option(
    "--db", "db_url", default=None, metavar="URL", help="Database URL [default: $EDGEOPS_CONSOLE_DB or SQLite in $EDGEOPS_HOME]."
)
@click.option(
    "--http", "http_address", default="127.0.0.1:8780", show_default=True, metavar="HOST:PORT", help="HTTP API and dashboard."
)
@_token_option
@_prefix_option
@click.option("--bundles", "bundles_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where rollout bundles are kept [default: $EDGEOPS_HOME/console-bundles].")  # fmt: skip
@click.option("--client-id", default="edgeops-console", show_default=True, help="MQTT client id (names the broker session).")
@click.option("--ca", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The fleet CA folder: sign the devices' certificate renewals (docs/security.md).")  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    broker: str,
    db_url: str | None,
    http_address: str,
    token: str | None,
    prefix: str,
    bundles_dir: Path | None,
    client_id: str,
    ca: Path | None,
) -> None:
    """Run the fleet console: ingest, rollouts, OTA blocks, HTTP API and dashboard, until SIGTERM/SIGINT."""
    import logging

    def body() -> None:
        from edgeops_fleet.console import Console, is_loopback, parse_http_address
        from edgeops_fleet.store import Store, default_db_url

        url = broker_url(broker)
        http = parse_http_address(http_address)
        # Checked before the database is opened: a refused configuration changes nothing.
        if not token and not is_loopback(http[0]):
            raise InputError(
                f"refusing to serve HTTP on {http_address} without a token: anything but loopback needs "
                "--token TOKEN (or $EDGEOPS_CONSOLE_TOKEN)"
            )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        database = db_url or default_db_url()
        store = Store.open(database)
        try:
            console = Console(
                url,
                store,
                prefix=prefix,
                http=http,
                token=token or None,
                bundles_dir=bundles_dir,
                client_id=client_id,
                ca=ca,
            )

            def started() -> None:
                where = console.http_address
                http_text = f"http://{where[0]}:{where[1]}" if where else "off"
                click.echo(f"console: broker {url}, HTTP {http_text}, database {store.url}", err=True)

            console.run_forever(on_started=started)
        finally:
            store.close()

    _run(ctx, False, body)


def _when(epoch: object) -> str:
    """Epoch seconds → ``HH:MM:SS`` today, ``YYYY-MM-DD HH:MM`` before (UTC); ``-`` for none."""
    from datetime import UTC, datetime

    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return "-"
    stamp = datetime.fromtimestamp(float(epoch), UTC)
    if stamp.date() == datetime.now(UTC).date():
        return stamp.strftime("%H:%M:%S")
    return stamp.strftime("%Y-%m-%d %H:%M")


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def _devices_table(rows: list[dict[str, object]], *, title: str) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for name in ("device", "online", "target", "tags", "model", "release", "health", "ota", "last seen", "last error"):
        table.add_column(name)
    for d in rows:
        online = d.get("online")
        ota = "-" if not d.get("ota_phase") else f"{d.get('ota_phase')} ({d.get('ota_release') or '?'})"
        table.add_row(
            _cell(d.get("device_id")),
            "-" if online is None else ("[green]yes[/]" if online else "[red]no[/]"),
            _cell(d.get("target")),
            _cell(d.get("tags")),
            _cell(d.get("model") or d.get("name")),
            _cell(d.get("release")) + (" [red](unknown release)[/]" if d.get("release_known") is False else ""),
            _cell(d.get("health")),
            ota,
            _when(d.get("last_seen")),
            _cell(d.get("last_error")) if d.get("last_error") else "",
        )
    return table


@fleet.command("devices")
@click.option("--group", default=None, metavar="target=T[,k=v]", help="The group: a target and tags.")
@click.option("--target", default=None, help="Only devices of this target.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only devices with this tag. Repeatable.")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def devices_cmd(
    ctx: click.Context,
    group: str | None,
    target: str | None,
    tags: tuple[str, ...],
    console_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """List the devices the console knows (by target and tags)."""

    def body() -> None:
        params = _group_params(group, target, tags)
        rows = _rows(ConsoleClient(console_url, token).get("/api/devices", params), "devices")
        if as_json:
            click.echo(json.dumps({"ok": True, "devices": rows}))
        elif not rows:
            click.echo("no device matches" if params else "the console knows no device yet")
        else:
            _stdout().print(_devices_table(rows, title=f"fleet ({len(rows)} devices)"))

    _run(ctx, as_json, body)


def _summary(row: dict[str, object]) -> str:
    """One history row in a few words (telemetry counters, event type, state health)."""
    p = row.get("payload")
    if not isinstance(p, dict):
        return ""
    kind = row.get("kind")
    if kind == "telemetry":
        inf, lat = p.get("inference") or {}, p.get("latency_ms") or {}
        drift = p.get("drift") or {}
        parts = [f"n={inf.get('count')}", f"errors={inf.get('error_count')}", f"p99={_cell(lat.get('p99'))} ms"]
        anomaly = inf.get("anomaly")
        if isinstance(anomaly, dict):  # an anomaly model: its flagged inputs this interval
            parts.append(f"anomalies={_cell(anomaly.get('count'))} ({_cell(anomaly.get('rate'))})")
        if drift:
            parts.append(f"psi={_cell(drift.get('max_psi'))}{' ALARM' if drift.get('alarm') else ''}")
        return " ".join(parts)
    if kind == "event":
        detail = p.get("detail") or {}
        extra = " ".join(f"{k}={v}" for k, v in list(detail.items())[:4]) if isinstance(detail, dict) else ""
        return f"{p.get('type')} {extra}".strip()
    return f"online={_cell(p.get('online'))} health={p.get('health')}"


@fleet.command("history")
@click.argument("device")
@click.option("--since", default=None, metavar="DURATION|ISO", help="From this long ago (10m, 2h) or this time.")
@click.option("--kinds", default=None, metavar="K[,K]", help="state, telemetry, event.")
@click.option("--limit", type=int, default=1000, show_default=True, help="Most rows.")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def history_cmd(
    ctx: click.Context,
    device: str,
    since: str | None,
    kinds: str | None,
    limit: int,
    console_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Show one device's stored history (telemetry, events, states) and its sequence gaps."""

    def body() -> None:
        check_device_id(device)
        params = [("limit", str(limit))]
        if since:
            params.append(("since", _since_param(since)))
        if kinds:
            params.append(("kinds", kinds))
        doc = ConsoleClient(console_url, token).get(f"/api/devices/{device}/history", params)
        rows = _rows(doc, "history")
        gaps = [g for g in doc.get("gaps") or [] if isinstance(g, list) and len(g) == 2]  # type: ignore[attr-defined]
        if as_json:
            click.echo(json.dumps({"ok": True, "device_id": device, "history": rows, "gaps": gaps}))
            return
        from rich.table import Table

        table = Table(title=f"{device}: {len(rows)} message(s)")
        for name in ("received", "kind", "seq", "release", "summary"):
            table.add_column(name)
        for r in rows:
            table.add_row(
                _when(r.get("received_at")), _cell(r.get("kind")), _cell(r.get("seq")), _cell(r.get("release")), _summary(r)
            )
        _stdout().print(table)
        if gaps:
            click.echo("gaps (seq never received): " + ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gaps))

    _run(ctx, as_json, body)


def _since_param(text: str) -> str:
    """``--since``: a duration (sent as epoch seconds from this clock) or an ISO time (sent as is)."""
    from edgeops_fleet.rollout import parse_duration

    try:
        return f"{time.time() - parse_duration(text):.3f}"
    except InputError:
        pass
    from datetime import datetime

    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"--since must be a duration (10m, 2h, 1d) or an ISO time (2026-01-31T12:00:00Z), got {text!r}"
        ) from None
    if stamp.tzinfo is None:
        raise InputError(f"--since {text!r} has no time zone; add Z or +00:00")
    return f"{stamp.timestamp():.3f}"


@fleet.command("watch")
@click.option("--interval", "interval_s", type=float, default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--count", type=int, default=None, help="Stop after this many polls [default: until Ctrl-C].")
@click.option("--group", default=None, metavar="target=T[,k=v]", help="The group: a target and tags.")
@click.option("--target", default=None, help="Only devices of this target.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only devices with this tag. Repeatable.")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="One JSON line per poll.")
@click.pass_context
def watch(
    ctx: click.Context,
    interval_s: float,
    count: int | None,
    group: str | None,
    target: str | None,
    tags: tuple[str, ...],
    console_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """A live fleet table (a terminal), or one JSON line / one plain table per poll."""

    def body() -> None:
        if not 0.1 <= interval_s < math.inf:
            raise InputError(f"--interval must be >= 0.1 seconds, got {interval_s:g}")
        if count is not None and count < 1:
            raise InputError(f"--count must be >= 1, got {count}")
        params = _group_params(group, target, tags)
        client = ConsoleClient(console_url, token)
        live_on = not as_json and sys.stdout.isatty()
        polls = 0
        live: Live | None = None
        try:
            while True:
                rows = _rows(client.get("/api/devices", params), "devices")
                polls += 1
                online = sum(1 for r in rows if r.get("online"))
                title = f"fleet: {len(rows)} device(s), {online} online · {time.strftime('%H:%M:%S')}"
                if as_json:
                    click.echo(json.dumps({"ok": True, "time": time.time(), "devices": rows}))
                elif live_on:
                    if live is None:
                        from rich.live import Live

                        live = Live(_devices_table(rows, title=title), refresh_per_second=4)
                        live.__enter__()
                    else:
                        live.update(_devices_table(rows, title=title))
                else:
                    _stdout().print(_devices_table(rows, title=title))
                if count is not None and polls >= count:
                    return
                time.sleep(interval_s)
        except KeyboardInterrupt:
            return
        finally:
            if live is not None:
                live.__exit__(None, None, None)

    _run(ctx, as_json, body)


# -- rollouts -------------------------------------------------------------------------------------


@fleet.group("rollout")
def rollout() -> None:
    """Staged rollouts through the console: start, status, pause, resume, abort."""


def _rollout_summary(r: dict[str, Any]) -> str:
    """One line: id, release, group, state, wave."""
    waves = r.get("waves")
    waves = waves if isinstance(waves, list) else []
    current = r.get("current_wave")
    wave = f"wave {current + 1} of {len(waves)}" if isinstance(current, int) else f"{len(waves)} wave(s)"
    return (
        f"rollout {r.get('rollout_id')}: {r.get('name')} release {r.get('release')} to {r.get('group_key')}: "
        f"{r.get('state')}, {wave}" + (f" ({r.get('message')})" if r.get("message") else "")
    )


def _rollout_tables(doc: dict[str, Any]) -> list[Table]:
    """A rollout's waves with their gate results (value vs limit), then its devices."""
    from rich.table import Table

    r = doc.get("rollout")
    r = r if isinstance(r, dict) else {}
    waves = Table(title=_rollout_summary(r))
    for name in ("wave", "size", "state", "devices", "gate", "value", "limit", "result"):
        waves.add_column(name)
    for w in doc.get("waves") or []:
        if not isinstance(w, dict):
            continue
        head = (_cell(w.get("number")), _cell(w.get("spec")), _cell(w.get("state")), str(len(w.get("devices") or [])))
        gates = w.get("gate")
        gates = gates if isinstance(gates, dict) else {}
        if not gates:
            waves.add_row(*head, "-", "-", "-", _cell(w.get("passed")))
        for i, (name, g) in enumerate(gates.items()):
            g = g if isinstance(g, dict) else {}
            passed = g.get("passed")
            mark = "-" if passed is None else ("[green]pass[/]" if passed else "[red]fail[/]")
            waves.add_row(*(head if i == 0 else ("", "", "", "")), name, _cell(g.get("value")), _cell(g.get("limit")), mark)
    devices = Table(title="devices")
    for name in ("device", "wave", "status", "deploy", "reason"):
        devices.add_column(name)
    for d in doc.get("devices") or []:
        if not isinstance(d, dict):
            continue
        reason = str(d.get("reason") or "")
        if d.get("message"):
            reason = f"{reason}: {d.get('message')}" if reason else str(d.get("message"))
        wave = d.get("wave")
        devices.add_row(
            _cell(d.get("device_id")),
            "-" if not isinstance(wave, int) else str(wave + 1),
            _cell(d.get("status")),
            _cell(d.get("deploy_id")),
            reason,
        )
    return [waves, devices]


def _signer_pem(trusted: list[object], signer: str) -> str:
    """The PEM text of the trusted key that signed the bundle (sent to the console to verify with)."""
    from cryptography.hazmat.primitives import serialization

    for key in trusted:
        if getattr(key, "fingerprint", None) == signer:
            return str(
                key.key.public_bytes(  # type: ignore[attr-defined]
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode()
            )
    raise InputError(f"no trusted key has the signer's fingerprint {signer[:16]}…")


@rollout.command("start")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--group", required=True, metavar="target=T[,k=v]", help="The devices: a target, optionally tags.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Narrow the group by a tag. Repeatable.")
@click.option("--waves", required=True, metavar="1,10%,50%,100%", help="Cumulative wave sizes: counts or percents.")
@click.option("--soak", required=True, metavar="DURATION", help="Health soak per wave (90s, 10m, 1h).")
@click.option("--deadline", default="24h", show_default=True, metavar="DURATION", help="Offline devices are offered until then.")
@click.option(
    "--key",
    "-k",
    "keys_",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable. [default: the per-user development key]",
)
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE", help="A gate threshold (docs/fleet.md). Repeatable.")
@click.option("--allow-bad", is_flag=True, help="Start even though the release is marked bad for the group.")
@_targets_dir_option
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def rollout_start(
    ctx: click.Context,
    bundle: Path,
    group: str,
    tags: tuple[str, ...],
    waves: str,
    soak: str,
    deadline: str,
    keys_: tuple[Path, ...],
    gates: tuple[str, ...],
    allow_bad: bool,
    targets_dirs: tuple[Path, ...],
    console_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Verify BUNDLE with --key, then start a staged rollout of it on the console.

    The latency gate's budget comes from the target profile of the bundle's target
    (override with --gate latency_p99_ms=MS).
    """

    def body() -> None:
        from edgeops_fleet.rollout import Gates, parse_duration, parse_waves
        from edgeops_toolchain.cli_common import _target_dirs
        from edgeops_toolchain.export_c import default_trusted_keys

        client = ConsoleClient(console_url, token)
        group_doc = parse_group(group, tags)
        wave_list = parse_waves(waves)
        soak_s, deadline_s = parse_duration(soak), parse_duration(deadline)
        gate_set = Gates.parse(gates)  # every gate option checked here, before any file is read
        trusted, dev = default_trusted_keys(keys_)
        if not bundle.exists() and not bundle.is_symlink():
            raise InputError(f"{bundle}: no such bundle file")
        verified = verify_bundle_file(bundle, trusted)
        m = verified.manifest
        if m.target != group_doc["target"]:
            raise InputError(f"{bundle.name} is for target {m.target!r}, the group is target {group_doc['target']!r}")
        if not any(g.partition("=")[0].strip() == "latency_p99_ms" for g in gates):
            profile = find_profile(m.target, _target_dirs(targets_dirs))
            gate_set = dataclasses.replace(gate_set, latency_p99_ms=profile.budgets.latency_ms)
        request: dict[str, object] = {
            "bundle": str(bundle.resolve()),
            "key": _signer_pem(list(trusted), verified.signer),
            "group": group_doc,
            "waves": list(wave_list),
            "soak": soak_s,
            "deadline": deadline_s,
            "gates": gate_set.to_dict(),
            "allow_bad": allow_bad,
        }
        row = _row(client.post("/api/rollouts", request))
        if as_json:
            click.echo(json.dumps({"ok": True, "development_key": dev, "rollout": row}))
        else:
            key = "the development key" if dev else "key"
            click.echo(f"verified {bundle.name}: {m.name} {m.version} release {m.release} for {m.target}, signed by {key}")
            click.echo(f"started {_rollout_summary(row)}")

    _run(ctx, as_json, body)


@rollout.command("status")
@click.argument("rollout_id", required=False)
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def rollout_status(ctx: click.Context, rollout_id: str | None, console_url: str, token: str | None, as_json: bool) -> None:
    """Every rollout (newest first), or one with its waves, gates and devices."""

    def body() -> None:
        client = ConsoleClient(console_url, token)
        if rollout_id is None:
            rows = _rows(client.get("/api/rollouts"), "rollouts")
            if as_json:
                click.echo(json.dumps({"ok": True, "rollouts": rows}))
            elif not rows:
                click.echo("no rollout yet")
            else:
                for r in rows:
                    click.echo(_rollout_summary(r))
            return
        doc = client.get(f"/api/rollouts/{_path_id(rollout_id)}")
        _row(doc)
        if as_json:
            click.echo(json.dumps({"ok": True, **doc}))
        else:
            out = _stdout()
            for table in _rollout_tables(doc):
                out.print(table)

    _run(ctx, as_json, body)


def _path_id(rollout_id: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", rollout_id):
        raise InputError(f"rollout id must be 1-64 characters [A-Za-z0-9._:-], got {rollout_id!r}")
    return rollout_id


def _rollout_action(action: str) -> click.Command:
    @click.argument("rollout_id")
    @_console_option
    @_token_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @click.pass_context
    def command(ctx: click.Context, rollout_id: str, console_url: str, token: str | None, as_json: bool) -> None:
        def body() -> None:
            row = _row(ConsoleClient(console_url, token).post(f"/api/rollouts/{_path_id(rollout_id)}/{action}"))
            if as_json:
                click.echo(json.dumps({"ok": True, "rollout": row}))
            else:
                click.echo(_rollout_summary(row))

        _run(ctx, as_json, body)

    command.__doc__ = {
        "pause": "Pause ROLLOUT_ID: no new wave starts and no device is offered until resume.",
        "resume": "Resume a paused ROLLOUT_ID.",
        "abort": "Abort ROLLOUT_ID: the current wave's held devices go back to the previous model.",
    }[action]
    return rollout.command(action)(command)


for _action in ("pause", "resume", "abort"):
    _rollout_action(_action)
