"""The closed loop's commands (docs/autopilot.md): ``edgeops data …`` and ``edgeops fleet autopilot|retrain|approve|runs``.

Both are clients of the console's HTTP API (docs/console.md), like the other ``fleet``
commands: field datasets live in the console's store, the autopilot runs in the console.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from edgeops_core import InputError
from edgeops_toolchain.cli_common import _run
from edgeops_toolchain.fleet_cli import ConsoleClient, _console_option, _rows, _stdout, _token_option, _when, fleet, parse_group

__all__ = ["data", "demo"]


def _object(doc: dict[str, object], key: str) -> dict[str, Any]:
    from edgeops_fleet.errors import ConsoleError

    value = doc.get(key)
    if not isinstance(value, dict):
        raise ConsoleError(f"the console's answer has no {key!r} object; is it an edgeops console?")
    return value


# -- edgeops data ----------------------------------------------------------------------------------


@click.group()
def data() -> None:
    """Field datasets: labelled rows the console collected from devices, by content digest."""


@data.command("list")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def data_list(ctx: click.Context, console_url: str, token: str | None, as_json: bool) -> None:
    """List the field datasets, newest first."""

    def body() -> None:
        rows = _rows(ConsoleClient(console_url, token).get("/api/datasets"), "datasets")
        if as_json:
            click.echo(json.dumps({"ok": True, "datasets": rows}))
            return
        if not rows:
            click.echo("the console holds no field dataset yet")
            return
        from rich.table import Table

        table = Table(title=f"field datasets ({len(rows)})")
        for col in ("digest", "created", "rows", "labelled", "devices", "time range", "releases", "run"):
            table.add_column(col)
        for r in rows:
            p = r.get("provenance") or {}
            table.add_row(
                str(r["digest"])[:19] + "…",
                _when(r.get("created_at")),
                str(r.get("rows")),
                str(r.get("labelled")),
                str(len(p.get("devices") or [])),
                f"{p.get('first_ts')} → {p.get('last_ts')}",
                ",".join(map(str, p.get("releases") or [])),
                str(r.get("run_id") or ""),
            )
        _stdout().print(table)

    _run(ctx, as_json, body)


@data.command("show")
@click.argument("digest")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def data_show(ctx: click.Context, digest: str, console_url: str, token: str | None, as_json: bool) -> None:
    """Show one dataset's provenance: devices, time range, releases, labelled fraction (DIGEST or a unique prefix)."""

    def body() -> None:
        row = _object(ConsoleClient(console_url, token).get(f"/api/datasets/{_digest_path(digest)}"), "dataset")
        if as_json:
            click.echo(json.dumps({"ok": True, "dataset": row}))
            return
        p = row.get("provenance") or {}
        rows, labelled = int(row.get("rows") or 0), int(row.get("labelled") or 0)
        group = p.get("group") or {}
        tags = ",".join(f"{k}={v}" for k, v in (group.get("tags") or {}).items())
        lines = [
            f"dataset   {row['digest']}",
            f"rows      {rows} ({labelled} labelled, {labelled / rows:.0%})" if rows else "rows      0",
            f"group     target={group.get('target')}{',' + tags if tags else ''}",
            f"devices   {len(p.get('devices') or [])}: {', '.join(p.get('devices') or [])}",
            f"time      {p.get('first_ts')} → {p.get('last_ts')} ({p.get('uploads')} upload(s))",
            f"releases  {', '.join(map(str, p.get('releases') or [])) or '-'} (the model releases that served the rows)",
            f"created   {p.get('created')} by autopilot run {row.get('run_id') or '-'}",
        ]
        click.echo("\n".join(lines))

    _run(ctx, as_json, body)


@data.command("export")
@click.argument("digest")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="File to write [default: ./<digest>.npz].")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def data_export(ctx: click.Context, digest: str, out: Path | None, console_url: str, token: str | None, as_json: bool) -> None:
    """Write a dataset as a .npz file a project can name in `[data] field` (its digest is checked first)."""

    def body() -> None:
        from edgeops_agent.store import write_durably
        from edgeops_core.fielddata import FieldDataset

        client = ConsoleClient(console_url, token)
        wanted = _digest_path(digest)
        row = _object(client.get(f"/api/datasets/{wanted}"), "dataset")
        if not str(row.get("digest", "")).startswith(wanted):
            raise InputError(f"the console answered {digest} with another dataset ({row.get('digest')}); nothing was written")
        raw = client.get_bytes(f"/api/datasets/{row['digest']}/data")
        dataset = FieldDataset.from_bytes(raw, expect_digest=str(row["digest"]))  # never write what does not check
        path = out if out is not None else Path(f"{dataset.digest.removeprefix('sha256:')}.npz")
        write_durably(path, raw)
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": True,
                        "path": str(path),
                        "digest": dataset.digest,
                        "rows": len(dataset.y),
                        "labelled": int(dataset.labelled),
                    }
                )
            )
        else:
            click.echo(f"wrote {path}: {len(dataset.y)} rows, {dataset.labelled} labelled ({dataset.digest})")

    _run(ctx, as_json, body)


def _digest_path(text: str) -> str:
    hexpart = text.strip().removeprefix("sha256:")
    if not hexpart or len(hexpart) > 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InputError(f"a dataset digest is sha256:<hex> or a prefix of its hex digits, got {text!r}")
    return "sha256:" + hexpart


# -- edgeops fleet autopilot / retrain / approve / runs ---------------------------------------------------


@fleet.group("autopilot")
def autopilot() -> None:
    """Per-group autopilot: when to retrain, and whether to deploy without a person (docs/autopilot.md)."""


_SETTINGS = (
    ("drift_devices", int), ("drift_window_s", float), ("drift_hold_s", float), ("schedule_s", float), ("new_labels", int),
    ("min_labelled", int),
    ("margin", float), ("collect_s", float), ("field_window_s", float), ("upload_rows", int), ("cooldown_s", float),
    ("soak_s", float), ("deadline_s", float), ("build_timeout_s", float),
)  # fmt: skip


@autopilot.command("set")
@click.argument("group")
@click.option(
    "--mode", type=click.Choice(["off", "propose", "auto"]), required=True, help="off, propose (wait for approve) or auto."
)
@click.option("--project", type=click.Path(path_type=Path, file_okay=False), default=None, help="Project folder to retrain.")
@click.option("--champion", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Bundle the group runs now.")
@click.option(
    "--signing-key", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Private key builds sign with."
)
@click.option(
    "--public-key", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Public key bundles verify with."
)
@click.option("--waves", default=None, help="Rollout waves, e.g. 1,50%,100%.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="drift_devices, drift_window_s, drift_hold_s, schedule_s, new_labels, min_labelled, margin, collect_s, "
                   "field_window_s, upload_rows, cooldown_s, soak_s, deadline_s, build_timeout_s "
                   "(none turns schedule_s/new_labels off).")  # fmt: skip
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE", help="A rollout gate (docs/fleet.md). Repeatable.")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def autopilot_set(
    ctx: click.Context,
    group: str,
    mode: str,
    project: Path | None,
    champion: Path | None,
    signing_key: Path | None,
    public_key: Path | None,
    waves: str | None,
    settings: tuple[str, ...],
    gates: tuple[str, ...],
    console_url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Set GROUP's autopilot (GROUP is target=T[,k=v]); it replaces the previous settings."""

    def body() -> None:
        doc: dict[str, Any] = {"group": parse_group(group), "mode": mode}
        for name, path in (
            ("project", project),
            ("champion", champion),
            ("signing_key", signing_key),
            ("public_key", public_key),
        ):
            if path is not None:
                doc[name] = str(path.resolve())
        if waves is not None:
            doc["waves"] = waves
        kinds = dict(_SETTINGS)
        for item in settings:
            name, sep, value = item.partition("=")
            if not sep or name not in kinds:
                raise InputError(f"--set must be NAME=VALUE with NAME one of {', '.join(kinds)}, got {item!r}")
            try:
                doc[name] = None if value.lower() in ("none", "off") else kinds[name](value)
                if doc[name] is not None and not math.isfinite(doc[name]):
                    raise ValueError(value)
            except (ValueError, OverflowError):
                kind = "integer" if kinds[name] is int else "number"
                raise InputError(f"--set {name}: expected a finite {kind}, got {value!r}") from None
        if gates:
            doc["gates"] = {}
            for item in gates:
                name, sep, value = item.partition("=")
                if not sep:
                    raise InputError(f"--gate must be NAME=VALUE, got {item!r}")
                doc["gates"][name] = value
        answer = ConsoleClient(console_url, token).put("/api/autopilot", doc)
        if as_json:
            click.echo(json.dumps({"ok": True, **answer}))
        else:
            config = _object(answer, "config")
            click.echo(f"autopilot for {answer.get('group_key')}: mode {config['mode']}, project {config.get('project')}")

    _run(ctx, as_json, body)


@autopilot.command("show")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def autopilot_show(ctx: click.Context, console_url: str, token: str | None, as_json: bool) -> None:
    """Show every group's autopilot."""

    def body() -> None:
        rows = _rows(ConsoleClient(console_url, token).get("/api/autopilot"), "autopilots")
        if as_json:
            click.echo(json.dumps({"ok": True, "autopilots": rows}))
            return
        if not rows:
            click.echo("no autopilot is set")
        for r in rows:
            c = r.get("config") or {}
            triggers = [f"drift on {c.get('drift_devices')} device(s) within {c.get('drift_window_s')} s"]
            if c.get("schedule_s"):
                triggers.append(f"every {c['schedule_s']} s")
            if c.get("new_labels"):
                triggers.append(f"{c['new_labels']} new labels")
            click.echo(
                f"{r.get('group_key')}: mode {c.get('mode')}; project {c.get('project')}; triggers: {'; '.join(triggers)}; "
                f"margin {c.get('margin')}; waves {c.get('waves')}"
            )

    _run(ctx, as_json, body)


@fleet.command("retrain")
@click.argument("group")
@click.option("--reason", default=None, help="Why (recorded on the run).")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def retrain(ctx: click.Context, group: str, reason: str | None, console_url: str, token: str | None, as_json: bool) -> None:
    """Retrain GROUP now (target=T[,k=v]); merged into the group's run if one is active."""

    def body() -> None:
        doc: dict[str, object] = {"group": parse_group(group)}
        if reason:
            doc["reason"] = reason
        run = _object(ConsoleClient(console_url, token).post("/api/autopilot/retrain", doc), "run")
        if as_json:
            click.echo(json.dumps({"ok": True, "run": run}))
        else:
            merged = len(run.get("triggers") or []) > 1
            click.echo(f"run {run['run_id']}: {run['state']}{' (the request was merged into this active run)' if merged else ''}")

    _run(ctx, as_json, body)


@fleet.command("approve")
@click.argument("run_id")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def approve(ctx: click.Context, run_id: str, console_url: str, token: str | None, as_json: bool) -> None:
    """Let a proposed autopilot run roll its challenger out."""

    def body() -> None:
        run = _object(ConsoleClient(console_url, token).post(f"/api/autopilot/runs/{run_id}/approve"), "run")
        if as_json:
            click.echo(json.dumps({"ok": True, "run": run}))
        else:
            click.echo(f"run {run['run_id']}: {run['state']} (rollout {run.get('rollout_id') or '-'})")

    _run(ctx, as_json, body)


@fleet.command("runs")
@click.argument("run_id", required=False)
@click.option("--group", default=None, metavar="target=T[,k=v]", help="Only this group's runs.")
@_console_option
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def runs(ctx: click.Context, run_id: str | None, group: str | None, console_url: str, token: str | None, as_json: bool) -> None:
    """Autopilot runs, newest first; with RUN_ID, one run step by step."""

    def body() -> None:
        from edgeops_fleet.rollout import group_key

        client = ConsoleClient(console_url, token)
        if run_id is not None:
            run = _object(client.get(f"/api/autopilot/runs/{run_id}"), "run")
            if as_json:
                click.echo(json.dumps({"ok": True, "run": run}))
                return
            click.echo(f"run {run['run_id']} ({run['group_key']}, mode {run['mode']}): {run['state']}")
            for t in run.get("triggers") or []:
                click.echo(f"  trigger {t.get('trigger')}{' (merged)' if t.get('merged') else ''}: {t.get('detail')}")
            for step in run.get("steps") or []:
                at = datetime.fromtimestamp(float(step["at"]), UTC).strftime("%H:%M:%S")
                click.echo(f"  {at} {step.get('state') or '':<11} {step.get('note')}")
            for name in ("datasets", "metrics", "decision", "reason", "rollout_id"):
                if run.get(name):
                    click.echo(f"  {name}: {json.dumps(run[name]) if isinstance(run[name], dict | list) else run[name]}")
            return
        params = [("group", group_key(parse_group(group)))] if group else None
        rows = _rows(client.get("/api/autopilot/runs", params), "runs")
        if as_json:
            click.echo(json.dumps({"ok": True, "runs": rows}))
            return
        if not rows:
            click.echo("no autopilot run yet")
            return
        from rich.table import Table

        table = Table(title=f"autopilot runs ({len(rows)})")
        for col in ("run", "group", "trigger", "state", "champion", "challenger", "release", "reason"):
            table.add_column(col)
        for r in rows:
            m = r.get("metrics") or {}
            table.add_row(
                str(r["run_id"]),
                str(r["group_key"]),
                str(r["trigger"]),
                str(r["state"]),
                _pct(m.get("champion_accuracy")),
                _pct(m.get("challenger_accuracy")),
                str(r.get("release") or ""),
                str(r.get("reason") or "")[:80],
            )
        _stdout().print(table)

    _run(ctx, as_json, body)


def _pct(value: object) -> str:
    return f"{float(value):.2%}" if isinstance(value, int | float) else "-"


# -- edgeops demo ----------------------------------------------------------------------------------------


@click.command("demo")
@click.option(
    "--broker", default=None, metavar="mqtt://HOST:PORT", help="Use this broker [default: start a Mosquitto on a free port]."
)
@click.option("--devices", type=int, default=20, show_default=True, help="Simulated ECUs; half of them get the shift.")
@click.option("--out", "-o", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="New or empty folder for everything the demo writes [default: demo-runs/<time>].")  # fmt: skip
@click.option("--deadline", "deadline_s", type=float, default=540.0, show_default=True, help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of progress and a summary.")
@click.pass_context
def demo(ctx: click.Context, broker: str | None, devices: int, out: Path | None, deadline_s: float, as_json: bool) -> None:
    """The whole loop, unattended: drift on a cohort → field samples → retrain → staged rollout → recovery.

    Writes demo-report.html (accuracy, drift score and release per device over time) into --out.
    Exit 0 when the shifted cohort recovered to within 2 points of its accuracy before the
    shift, 1 when it did not (the report says how far it got).
    """
    import sys
    import time

    from edgeops_toolchain.demo import DemoOptions, run_demo, summary_lines

    result: dict[str, Any] = {}

    def body() -> None:
        if broker is not None:
            from edgeops_fleet import parse_broker_url

            parse_broker_url(broker)
        folder = out if out is not None else Path("demo-runs") / time.strftime("%Y%m%dT%H%M%S")
        opts = DemoOptions(out=folder, devices=devices, broker=broker, deadline_s=deadline_s)
        quiet = as_json or not sys.stderr.isatty()
        if quiet:
            summary = run_demo(opts, lambda text: None)
        else:
            from rich.console import Console as RichConsole

            err = RichConsole(stderr=True)
            started = time.monotonic()
            with err.status("starting") as status:

                def say(text: str) -> None:
                    status.update(f"[{time.monotonic() - started:4.0f} s] {text}")
                    if not text.startswith("t = "):
                        err.log(text)

                summary = run_demo(opts, say)
        result.update(summary)
        if as_json:
            click.echo(json.dumps({k: v for k, v in summary.items() if k != "marks_epoch"}, default=str))
        else:
            for line in summary_lines(summary):
                click.echo(line)

    _run(ctx, as_json, body)
    if result and not result.get("ok"):
        ctx.exit(1)
