"""The ``edgeops-agent`` command (device side).

Exit codes: 0 success, 2 bad input (usage, unreadable key), 4 bundle rejected.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeops_agent import __version__
from edgeops_core import BundleError, EdgeopsError, load_public_key, verify_bundle

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeops-agent")
def main() -> None:
    """edgeops-agent: verify and run edgeops bundles on a device."""


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--key",
    "-k",
    "keys",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Trusted public key (PEM). Repeatable.",
)
def verify(bundle: Path, keys: tuple[Path, ...]) -> None:
    """Check BUNDLE's signature, digests, members, manifest and expiry, offline."""
    try:
        verified = verify_bundle(bundle, [load_public_key(k) for k in keys])
    except EdgeopsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(4 if isinstance(exc, BundleError) else 2)
    m = verified.manifest
    click.echo(f"OK {m.name} {m.version} release {m.release} for {m.target}")
