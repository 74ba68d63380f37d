"""``edgeops-sim``: run a fleet scenario against a real broker.

Exit codes: 0 the run completed with nothing lost and every device serving at the end;
1 it completed with findings (lost messages, devices not serving; see the summary);
2 a bad scenario or option (one line naming the key); 5 the run could not be carried out
(mosquitto missing, a device process that never became ready, the bundle rejected).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from edgeops_core import EdgeopsError, InputError
from edgeops_sim.runner import parse_broker_url
from edgeops_sim.runner import run as run_scenario
from edgeops_sim.scenario import load_scenario

__all__ = ["main"]


@click.group()
def main() -> None:
    """Simulated devices running the real edgeops agent against a real MQTT broker."""


@main.command("run")
@click.argument("scenario", type=click.Path(path_type=Path))
@click.option("--broker", "broker_url", default=None, help="mqtt://HOST:PORT of a broker to use (default: start our own).")
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="The signed bundle every device installs (overrides fleet.bundle).",
)
@click.option(
    "--key", type=click.Path(path_type=Path), default=None, help="The public key devices trust (overrides fleet.trust)."
)
@click.option(
    "--update-bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="The newer bundle the OTA faults deploy (overrides fleet.update_bundle).",
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: sim-runs/<scenario>-<time>).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def run_command(
    scenario: Path,
    broker_url: str | None,
    bundle: Path | None,
    key: Path | None,
    update_bundle: Path | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Run SCENARIO.toml: devices, drift, faults; write timelines and a summary."""
    try:
        if broker_url is not None:
            parse_broker_url(broker_url)
        loaded = load_scenario(
            scenario,
            bundle=bundle.resolve() if bundle else None,
            trust=key.resolve() if key else None,
            update_bundle=update_bundle.resolve() if update_bundle else None,
        )
        folder = out or Path("sim-runs") / f"{scenario.stem}-{time.strftime('%Y%m%dT%H%M%S')}"
        summary = _run(loaded, folder, broker_url, quiet=as_json or not sys.stderr.isatty())
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except EdgeopsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(5)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "per_device"} | {"out": str(folder)}))
    else:
        _print(summary, folder)
    sys.exit(0 if summary["ok"] else 1)


def _run(scenario: Any, folder: Path, broker_url: str | None, *, quiet: bool) -> dict[str, Any]:
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # a device-only install has no rich: no bar
        quiet = True
    if quiet:
        return run_scenario(scenario, folder, broker_url=broker_url)

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        return run_scenario(
            scenario, folder, broker_url=broker_url, progress=lambda f, text: bar.update(task, completed=f, description=text)
        )


def _print(summary: dict[str, Any], folder: Path) -> None:
    m = summary["messages"]
    lat = summary["ingest_latency_s"] or {}
    click.echo(f"{summary['devices']} devices in {summary['processes']} processes, {summary['duration_s']:g} s")
    click.echo(
        f"messages: {m['assigned']} sent, {m['received']} received, {m['lost']} lost, {m['duplicates']} duplicates, "
        f"{m['pending']} pending, {m['dropped']} dropped, {m['superseded']} superseded"
    )
    if lat:
        click.echo(f"ingest latency: p50 {lat['p50'] * 1000:.1f} ms, p99 {lat['p99'] * 1000:.1f} ms")
    click.echo(
        f"serving at the end: {summary['serving_at_end']} of {summary['devices']}; device crashes {summary['device_crashes']}"
    )
    for name, c in summary["cohorts"].items():
        drift = f"drift from {c['drift_start_s']:g} s, alarmed {c['devices_alarmed_after_drift']}" if c["drifted"] else "no drift"
        click.echo(f"cohort {name}: {c['devices']} devices, {drift}, false alarms {c['false_alarms']}, accuracy {c['accuracy']}")
    for f in summary["faults"]:
        if f["phase"] == "outcome":
            continue  # printed below
        where = f" {f['device']}" if "device" in f else ""
        click.echo(f"fault {f['kind']}{where} {f['phase']} at {f['t']:g} s")
    for u in summary.get("updates", []):
        click.echo(
            f"update of {u['device']} to release {u['release']}: {u['outcome'] or 'no final event'}"
            f"{' (' + u['reason'] + ')' if u['reason'] else ''}, {u['blocks_sent']} blocks sent for {u['blocks']}"
            f"{', ' + str(u['corrupted_sent']) + ' corrupted' if u['corrupted_sent'] else ''}"
        )
    click.echo(f"{'ok' if summary['ok'] else 'FINDINGS'}: timelines and summary.json in {folder}")
