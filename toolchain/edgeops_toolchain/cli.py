"""The ``edgeops`` command.

Exit codes (docs/cli.md):

==  ==========================================================================
0   success
1   internal error (a bug: please report it; ``--debug`` shows the traceback)
2   bad input: usage, unknown target, malformed project/profile TOML, bad data,
    a model that does not export, a missing or unusable key
3   a budget was exceeded (the closing table shows which)
4   bundle verification failed (``verify``, ``export``, ``evaluate``)
5   the build could not finish for another reason (unsupported target, signing)
==  ==========================================================================

Every error is one line on stderr (and one JSON object on stdout with ``--json``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import click

from edgeops_core import (
    InputError,
    TargetProfile,
    find_profile,
    list_profiles,
    load_public_key,
    verify_bundle,
)
from edgeops_toolchain import __version__
from edgeops_toolchain.cli_common import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_BUILD,
    EXIT_INTERNAL,
    EXIT_VERIFY,
    _run,
    _target_dirs,
    _targets_dir_option,
    keys,
)
from edgeops_toolchain.errors import BudgetExceededError
from edgeops_toolchain.field_cli import data, demo  # adds its commands to `fleet` too
from edgeops_toolchain.fleet_cli import fleet
from edgeops_toolchain.keys_cli import root  # noqa: F401 - adds root/rotate/revoke/renew/show to `keys`, trust-push to `fleet`
from edgeops_toolchain.pki_cli import ca  # noqa: F401 - adds ca, provision, cert, broker-config to `fleet`
from edgeops_toolchain.resources import example_dir

__all__ = ["EXIT_BAD_INPUT", "EXIT_BUDGET", "EXIT_BUILD", "EXIT_INTERNAL", "EXIT_VERIFY", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeops")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """edgeops: build, sign and verify edge model bundles."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


_cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Step cache folder [default: $EDGEOPS_CACHE_DIR or $EDGEOPS_HOME/cache].",
)
_signing_key_option = click.option(
    "--key",
    "-k",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="ECDSA private key (PEM) to sign with [default: per-user development key].",
)
_registry_option = click.option(
    "--registry",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Registry database [default: $EDGEOPS_REGISTRY or $EDGEOPS_HOME/registry.sqlite].",
)


@main.command()
@click.option("--target", "-t", required=True, help="Target profile name (see `edgeops targets`).")
@click.option(
    "--project",
    "-p",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Project folder with edgeops.toml [default: the built-in vibration example].",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("dist"),
    show_default=True,
    help="Where the bundle is written.",
)
@_signing_key_option
@_targets_dir_option
@_cache_dir_option
@click.option("--no-cache", is_flag=True, help="Run every step; refresh the cache entries with the new results.")
@_registry_option
@click.option(
    "--field-data",
    "field_data",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Field dataset (.npz) to train on and measure with, besides the project's [data] field. Repeatable.",
)
@click.option(
    "--release-above",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Make the release higher than N too (devices run release N, built where this registry never saw it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables and progress.")
@click.pass_context
def build(
    ctx: click.Context,
    target: str,
    project: Path | None,
    out: Path,
    key: Path | None,
    targets_dirs: tuple[Path, ...],
    cache_dir: Path | None,
    no_cache: bool,
    registry: Path | None,
    field_data: tuple[Path, ...],
    release_above: int,
    as_json: bool,
) -> None:
    """Train, export, quantize, validate, package and sign a bundle for TARGET.

    Steps whose inputs did not change since an earlier build come from the step cache;
    the closing lines say which. Field datasets (--field-data, [data] field) add their
    labelled rows to training, keep a held-out share for the field_holdout_accuracy metric
    and, by default, supply the drift reference (docs/projects.md).
    """
    from edgeops_toolchain.cache import default_cache_dir
    from edgeops_toolchain.pipeline import CacheOptions, run_build
    from edgeops_toolchain.project import load_project
    from edgeops_toolchain.ui import Reporter, budget_table

    def body() -> None:
        profile = find_profile(target, _target_dirs(targets_dirs))
        proj = load_project(project or example_dir()).with_field_data(field_data)
        reporter = Reporter(enabled=not as_json)
        cache = CacheOptions(root=cache_dir or default_cache_dir(), read=not no_cache)
        try:
            with reporter:
                result = run_build(
                    proj, profile, out, key=key, progress=reporter, cache=cache, registry=registry, release_above=release_above
                )
        except BudgetExceededError as exc:
            if not as_json:
                budget_table(exc.checks, title=f"{proj.name} {proj.version} → {profile.name}: budgets")
            raise
        m = result.manifest
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": True,
                        "bundle": str(result.bundle_path),
                        "report": str(result.report_path),
                        "name": m.name,
                        "version": m.version,
                        "release": m.release,
                        "target": m.target,
                        "signer": result.signer,
                        "public_key": str(result.public_key) if result.public_key else None,
                        "metrics": dict(m.metrics),
                        "field_datasets": list(m.lineage.field_datasets),
                        "budgets": [c.to_dict() for c in result.checks],
                        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
                        "cached_steps": list(result.cached),
                        "reused_bundle": result.reused,
                        "corrupted_cache_entries": [{"step": c.step, "reason": c.reason} for c in result.corrupted],
                    }
                )
            )
            return
        budget_table(result.checks, title=f"{m.name} {m.version} (release {m.release}) → {m.target}: budgets")
        for c in result.corrupted:
            click.echo(f"warning: cache entry of step {c.step!r} was corrupted ({c.reason}); it was rebuilt", err=True)
        if result.reused:
            click.echo(f"up to date: nothing changed since release {m.release}; the cached bundle was reused")
        elif result.cached:
            click.echo(f"from cache: {', '.join(result.cached)}")
        if m.lineage.field_datasets:
            click.echo(
                f"field data: {len(m.lineage.field_datasets)} dataset(s), {int(m.metrics['field_train_rows'])} rows "
                f"trained on, {int(m.metrics['field_holdout_rows'])} held out; drift reference from "
                f"{m.drift_reference.sample_count} rows"
            )
        click.echo(f"bundle: {result.bundle_path}")
        click.echo(f"report: {result.report_path}")
        if result.public_key is not None:
            note = "created now" if result.dev_key_created else "per-user"
            click.echo(
                f"signed with the development key ({note}); verify with: edgeops verify {result.bundle_path} "
                f"--key {result.public_key}"
            )
        else:
            click.echo(f"signed with {key} (key sha256:{result.signer[:16]}…)")

    _run(ctx, as_json, body)


@main.command()
@_targets_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def targets(ctx: click.Context, targets_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the target profiles and their budgets."""
    from edgeops_toolchain.ui import profiles_table

    def body() -> None:
        profiles = list_profiles(_target_dirs(targets_dirs))
        if as_json:
            click.echo(json.dumps([_profile_dict(p) for p in profiles]))
        else:
            profiles_table(profiles)

    _run(ctx, as_json, body)


def _profile_dict(p: TargetProfile) -> dict[str, Any]:
    return {
        "name": p.name,
        "description": p.description,
        "runtime": p.runtime,
        "format": p.format,
        "precision": p.precision,
        "threads": p.threads,
        "budgets": vars(p.budgets),
        "supported_ops": sorted(p.supported_ops),
        "source": str(p.source),
    }


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.pass_context
def init(ctx: click.Context, directory: Path) -> None:
    """Create a new project in DIRECTORY from the built-in example."""
    from edgeops_toolchain.project import PROJECT_FILE

    def body() -> None:
        if directory.exists() and any(directory.iterdir()):
            raise InputError(f"{directory} is not empty; choose a new or empty folder")
        source = example_dir()
        directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and (path.suffix == ".py" or path.name == PROJECT_FILE):
                shutil.copy2(path, directory / path.name)
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in directory.resolve().name.lower()).strip("-.") or "model"
        toml = directory / PROJECT_FILE
        toml.write_text(
            toml.read_text(encoding="utf-8").replace('name = "vibration-classifier"', f'name = "{name}"', 1), encoding="utf-8"
        )
        click.echo(f"created project {name!r} in {directory}; build it with: edgeops build --target ecu --project {directory}")

    _run(ctx, False, body)


@keys.command("generate")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--force", is_flag=True, help="Replace existing key files.")
@click.pass_context
def keys_generate(ctx: click.Context, directory: Path, force: bool) -> None:
    """Write an ECDSA P-256 key pair into DIRECTORY (private key mode 0600)."""
    from edgeops_toolchain.signing import generate_keypair

    def body() -> None:
        pair = generate_keypair(directory, force=force)
        click.echo(f"private key: {pair.private} (keep it secret; sign with --key)")
        click.echo(f"public key:  {pair.public} (give it to devices and to `edgeops verify --key`)")

    _run(ctx, False, body)


@main.command()
# No dir_okay=False: a directory, FIFO or device is a refused bundle (one error line, exit 4),
# checked by edgeops_core before anything is read, not a click usage error.
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "-k",
    "keys_",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def verify(ctx: click.Context, bundle: Path, keys_: tuple[Path, ...], as_json: bool) -> None:
    """Verify BUNDLE: signature, digests, member set, member names, manifest, expiry.

    Uses only edgeops_core, the same code the device agent runs.
    """

    def body() -> None:
        trusted = [load_public_key(k) for k in keys_]
        if not bundle.exists() and not bundle.is_symlink():
            raise InputError(f"{bundle}: no such bundle file")  # the caller's typo (2), not a rejected bundle (4)
        verified = verify_bundle(bundle, trusted)
        m = verified.manifest
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": True,
                        "bundle": str(bundle),
                        "name": m.name,
                        "version": m.version,
                        "release": m.release,
                        "target": m.target,
                        "runtime": m.runtime,
                        "expires": m.expires,
                        "signer": verified.signer,
                        "sha256": verified.digest,
                    }
                )
            )
        else:
            click.echo(
                f"OK {bundle.name}: {m.name} {m.version} release {m.release} for {m.target} ({m.runtime}), "
                f"signed by key sha256:{verified.signer[:16]}…, expires {m.expires}"
            )

    _run(ctx, as_json, body)


@main.command("export")
# Not dir_okay=False, as for verify: a directory given as BUNDLE is a refused bundle (exit 4).
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["c"]),
    required=True,
    help="c: C/C++ source for TensorFlow Lite Micro firmware (TFLite Micro bundles only).",
)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder to create (or an empty one); it appears complete or not at all.",
)
@click.option(
    "--key",
    "-k",
    "keys_",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable. [default: the per-user development key]",
)
@click.option("--force", is_flag=True, help="Replace --out when it holds an earlier export (and nothing else).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def export(ctx: click.Context, bundle: Path, fmt: str, out: Path, keys_: tuple[Path, ...], force: bool, as_json: bool) -> None:
    """Verify BUNDLE, then write it as firmware source into --out (see docs/mcu-export.md).

    The bundle is checked exactly as `edgeops verify` checks it, against --key or, without
    one, the development key `edgeops build` signs with.
    """
    from edgeops_toolchain.export_c import default_trusted_keys, export_c

    def body() -> None:
        trusted, dev = default_trusted_keys(keys_)
        result = export_c(bundle, out, trusted, force=force)
        m = result.manifest
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": True,
                        "format": fmt,
                        "bundle": str(bundle),
                        "out": str(result.out),
                        "name": m.name,
                        "version": m.version,
                        "release": m.release,
                        "target": m.target,
                        "signer": result.signer,
                        "development_key": dev,
                        "tflm_version": m.lineage.runtime_version,
                        "model_bytes": result.model_bytes,
                        "model_sha256": result.model_sha256,
                        "arena_bytes": int(m.metrics["arena_bytes"]),
                        "operators": list(result.operators),
                        "files": [{"name": f.name, "bytes": len(f.data), "needs_tflm": f.needs_tflm} for f in result.files],
                    }
                )
            )
            return
        key = "the development key" if dev else "key"
        click.echo(
            f"verified {bundle.name}: {m.name} {m.version} release {m.release}, signed by {key} sha256:{result.signer[:16]}…"
        )
        click.echo(f"wrote {len(result.files)} files to {result.out}: {', '.join(f.name for f in result.files)}")
        click.echo(
            f"  model {result.model_bytes} bytes (sha256 {result.model_sha256[:16]}…), arena {int(m.metrics['arena_bytes'])} "
            f"bytes, {len(result.operators)} operator(s): {', '.join(result.operators)}"
        )
        tflm = m.lineage.runtime_version or "not recorded in this bundle"
        click.echo(f"  TFLite Micro it was validated with: {tflm}; model_ops.* and self_test.* need its headers")

    _run(ctx, as_json, body)


@main.command()
# Not dir_okay=False, as for verify: a directory given as BUNDLE is a refused bundle (exit 4).
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--field-data",
    "field_data",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Field dataset (.npz) with labelled rows. Repeatable: the rows are merged as a build merges them.",
)
@click.option(
    "--split",
    type=click.Choice(["holdout", "all"]),
    default="holdout",
    show_default=True,
    help="holdout: the labelled rows no build trains on; all: every labelled row.",
)
@click.option(
    "--key",
    "-k",
    "keys_",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable. [default: the per-user development key]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def evaluate(
    ctx: click.Context, bundle: Path, field_data: tuple[Path, ...], split: str, keys_: tuple[Path, ...], as_json: bool
) -> None:
    """Verify BUNDLE, then measure its model's accuracy on labelled field rows.

    The model runs in the bundle's own runtime, as the build measured it. The bundle is
    checked exactly as `edgeops verify` checks it, against --key or, without one, the
    development key `edgeops build` signs with.
    """
    from edgeops_toolchain.evaluate import evaluate_bundle
    from edgeops_toolchain.export_c import default_trusted_keys

    def body() -> None:
        trusted, _dev = default_trusted_keys(keys_)
        result = evaluate_bundle(bundle, field_data, trusted, split=split)
        m = result.manifest
        if as_json:
            click.echo(json.dumps(result.to_dict()))
            return
        accuracy = "n/a (no labelled rows)" if result.accuracy is None else f"{result.accuracy * 100:.2f} %"
        click.echo(
            f"{m.name} {m.version} release {m.release} → {m.target}: accuracy {accuracy} on {result.rows} {split} row(s) "
            f"of {len(result.field_datasets)} field dataset(s)"
        )
        for label, c in result.per_class.items():
            value = "-" if c.accuracy is None else f"{c.accuracy * 100:.2f} %"
            click.echo(f"  {label:<24}{c.rows:>8} rows  {value}")

    _run(ctx, as_json, body)


@main.group()
def registry() -> None:
    """Query the local registry of built releases."""


@registry.command("list")
@click.option("--name", default=None, help="Only this bundle name.")
@click.option("--target", "-t", default=None, help="Only this target.")
@_registry_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def registry_list(ctx: click.Context, name: str | None, target: str | None, registry: Path | None, as_json: bool) -> None:
    """List releases, newest first per name and target."""
    from edgeops_toolchain.registry import Registry
    from edgeops_toolchain.ui import releases_table

    def body() -> None:
        with Registry(registry) as reg:
            rows = reg.releases(name=name, target=target)
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in rows]))
        elif not rows:
            click.echo("no releases recorded yet; `edgeops build --target ecu` makes one")
        else:
            releases_table(rows)

    _run(ctx, as_json, body)


@registry.command("show")
@click.argument("name")
@click.option("--target", "-t", required=True, help="Target of the release.")
@click.option("--release", "-r", "number", type=int, default=None, help="Release number [default: the newest].")
@_registry_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def registry_show(ctx: click.Context, name: str, target: str, number: int | None, registry: Path | None, as_json: bool) -> None:
    """Show one release of NAME: bundle, metrics, lineage, and the builds that produced it."""
    from edgeops_toolchain.registry import Registry

    def body() -> None:
        with Registry(registry) as reg:
            record = reg.latest(name, target) if number is None else reg.release(name, target, number)
            if record is None:
                which = "release" if number is None else f"release {number}"
                raise InputError(f"the registry has no {which} of {name!r} for target {target!r}; see `edgeops registry list`")
            builds = [b for b in reg.builds(name=name, target=target) if b.release == record.release]
        if as_json:
            click.echo(json.dumps({**record.to_dict(), "builds": [vars(b) for b in builds]}))
            return
        click.echo(f"{record.name} {record.version} release {record.release} → {record.target}")
        for label, value in (
            ("bundle", record.path),
            ("sha256", record.bundle_sha256),
            ("report", record.report_path or "-"),
            ("signer", record.signer),
            ("created", record.created),
            ("expires", record.expires),
        ):
            click.echo(f"  {label:<9}{value}")
        click.echo("  metrics:")
        for k, v in sorted(record.metrics.items()):
            click.echo(f"    {k:<24}{v:g}")
        click.echo("  lineage:")
        for k, v in sorted(record.lineage.items()):
            click.echo(f"    {k:<24}{json.dumps(v, sort_keys=True) if isinstance(v, dict) else v}")
        click.echo(f"  builds: {len(builds)} ({sum(b.reused for b in builds)} reused the cached bundle)")

    _run(ctx, as_json, body)


@main.group()
def cache() -> None:
    """Inspect or clear the step cache."""


@cache.command("info")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def cache_info(ctx: click.Context, cache_dir: Path | None, as_json: bool) -> None:
    """Show where the cache is and what it holds."""
    from edgeops_toolchain.cache import StepCache, default_cache_dir

    def body() -> None:
        stats = StepCache(cache_dir or default_cache_dir()).stats()
        if as_json:
            click.echo(
                json.dumps(
                    {"root": str(stats.root), "entries": stats.entries, "bytes": stats.bytes, "per_step": dict(stats.per_step)}
                )
            )
            return
        per = ", ".join(f"{k} {v}" for k, v in sorted(stats.per_step.items())) or "empty"
        click.echo(f"{stats.root}: {stats.entries} entries, {stats.bytes / 1024 / 1024:.1f} MiB ({per})")

    _run(ctx, as_json, body)


@cache.command("clear")
@_cache_dir_option
@click.pass_context
def cache_clear(ctx: click.Context, cache_dir: Path | None) -> None:
    """Delete every cache entry (the next build runs every step)."""
    from edgeops_toolchain.cache import StepCache, default_cache_dir

    def body() -> None:
        store = StepCache(cache_dir or default_cache_dir())
        click.echo(f"deleted {store.clear()} entries from {store.root}")

    _run(ctx, False, body)


@main.group()
def release() -> None:
    """Manage releases (see docs/cache-and-registry.md)."""


@release.command("revert")
@click.argument("name")
@click.option("--to", "to", type=int, required=True, help="The earlier release whose model is shipped again.")
@click.option("--target", "-t", default=None, help="Target of the releases [default: the only one NAME has].")
@_registry_option
@_signing_key_option
@click.option(
    "--verify-key",
    "verify_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Public key (PEM) the earlier bundle is verified against [default: the public half of --key]. Repeatable.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("dist"),
    show_default=True,
    help="Where the new bundle is written.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def release_revert(
    ctx: click.Context,
    name: str,
    to: int,
    target: str | None,
    registry: Path | None,
    key: Path | None,
    verify_keys: tuple[Path, ...],
    out: Path,
    as_json: bool,
) -> None:
    """Sign release --to of NAME again as a new, higher release.

    Devices never go back to a lower release (anti-rollback), so a bad release is taken
    back by shipping the earlier model forward: same model bytes, the next release number,
    lineage.reverted_to naming the release it reverts to. A rollout then ships it.
    """
    from edgeops_toolchain.revert import revert_release

    def body() -> None:
        result = revert_release(name, to=to, target=target, registry=registry, key=key, verify_keys=verify_keys, out_dir=out)
        m = result.manifest
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "ok": True,
                        "bundle": str(result.bundle_path),
                        "name": m.name,
                        "version": m.version,
                        "release": m.release,
                        "target": m.target,
                        "reverted_to": m.lineage.reverted_to,
                        "parent_release": m.lineage.parent_release,
                        "sha256": result.bundle_sha256,
                        "model_sha256": result.model_sha256,
                        "signer": result.signer,
                        "public_key": str(result.public_key) if result.public_key else None,
                        "created": m.created,
                        "expires": m.expires,
                    }
                )
            )
            return
        click.echo(
            f"release {m.release} of {m.name} for {m.target} ships release {m.lineage.reverted_to}'s model "
            f"(reverts from release {m.lineage.parent_release}); version {m.version}, expires {m.expires}"
        )
        click.echo(f"bundle: {result.bundle_path}")
        click.echo(f"model sha256: {result.model_sha256} (unchanged)")
        if result.public_key is not None:
            click.echo(
                f"signed with the development key; verify with: edgeops verify {result.bundle_path} --key {result.public_key}"
            )
        else:
            click.echo(f"signed with {key} (key sha256:{result.signer[:16]}…)")

    _run(ctx, as_json, body)


main.add_command(keys)
main.add_command(fleet)
main.add_command(data)
main.add_command(demo)
