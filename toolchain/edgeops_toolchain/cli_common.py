"""What every ``edgeops`` command module shares: exit codes, the one-line failure, the
``--targets-dir`` option and the ``keys`` group that :mod:`edgeops_toolchain.keys_cli` extends.

The command modules depend on this one, never on :mod:`edgeops_toolchain.cli`, which imports
them all to assemble ``edgeops``: cli_common ← fleet_cli ← field_cli, keys_cli, pki_cli ← cli.
Any of them can be imported first.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from edgeops_core import BundleError, EdgeopsError, InputError
from edgeops_toolchain.errors import BudgetExceededError
from edgeops_toolchain.resources import builtin_targets_dir
from edgeops_toolchain.signing import edgeops_home

__all__ = ["EXIT_BAD_INPUT", "EXIT_BUDGET", "EXIT_BUILD", "EXIT_INTERNAL", "EXIT_VERIFY"]

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_BUDGET = 3
EXIT_VERIFY = 4
EXIT_BUILD = 5


def _exit_code(exc: EdgeopsError) -> int:
    if isinstance(exc, InputError):
        return EXIT_BAD_INPUT
    if isinstance(exc, BudgetExceededError):
        return EXIT_BUDGET
    if isinstance(exc, BundleError):
        return EXIT_VERIFY
    return EXIT_BUILD


def _fail(exc: BaseException, *, as_json: bool, debug: bool) -> None:
    """Print one line (or one JSON object) for ``exc`` and exit with its code."""
    if isinstance(exc, EdgeopsError):
        code, message = _exit_code(exc), str(exc)
    else:
        code, message = EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"
        if debug:
            traceback.print_exception(exc)
    if as_json:
        payload: dict[str, Any] = {"ok": False, "exit_code": code, "error": {"type": type(exc).__name__, "message": message}}
        if isinstance(exc, BudgetExceededError):
            payload["budgets"] = [c.to_dict() for c in exc.checks]
        click.echo(json.dumps(payload))
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run(ctx: click.Context, as_json: bool, body: Callable[[], None]) -> None:
    try:
        body()
    except Exception as exc:  # noqa: BLE001 - the CLI turns every failure into one line
        _fail(exc, as_json=as_json, debug=ctx.obj.get("debug", False))


def _target_dirs(extra: Sequence[Path]) -> list[Path]:
    """Built-in profiles, then ``$EDGEOPS_HOME/targets`` if present, then ``--targets-dir``."""
    user = edgeops_home() / "targets"
    return [builtin_targets_dir(), *([user] if user.is_dir() else []), *extra]


_targets_dir_option = click.option(
    "--targets-dir",
    "targets_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Extra folder of target profiles (*.toml); overrides built-ins of the same name. Repeatable.",
)


@click.group()
def keys() -> None:
    """Manage signing keys."""
