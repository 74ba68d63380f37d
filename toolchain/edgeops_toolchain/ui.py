"""Terminal output of the CLI: step progress and the closing tables (rich).

Progress is drawn on stderr only when stderr is a terminal; piped or ``--json`` runs stay
quiet. Tables go to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeops_core import TargetProfile
from edgeops_toolchain.pipeline import Step
from edgeops_toolchain.registry import ReleaseRecord
from edgeops_toolchain.validate import BudgetCheck, format_value

__all__ = ["Reporter", "budget_table", "profiles_table", "releases_table"]


class Reporter:
    """A :class:`~edgeops_toolchain.pipeline.BuildProgress` drawing one rich line per step."""

    def __init__(self, *, enabled: bool) -> None:
        self._console = Console(stderr=True)
        self._enabled = enabled and sys.stderr.isatty()
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=self._console,
            disable=not self._enabled,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Reporter:
        self._progress.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.__exit__(et, ev, tb)

    def step_started(self, step: Step) -> None:
        """Add a line for ``step``."""
        self._tasks[step.name] = self._progress.add_task(step.title, total=None)

    def step_advanced(self, step: Step, done: int, total: int) -> None:
        """Move ``step``'s bar."""
        self._progress.update(self._tasks[step.name], completed=done, total=total)

    def step_finished(self, step: Step, seconds: float) -> None:
        """Mark ``step`` done with its duration."""
        task = self._tasks[step.name]
        self._progress.update(task, description=f"{step.title} [dim]({seconds:.1f} s)", completed=1, total=1)

    def step_cached(self, step: Step) -> None:
        """Show ``step`` as taken from the cache."""
        self._progress.add_task(f"{step.title} [dim](cached)", total=1, completed=1)

    def cache_corrupted(self, step: Step, reason: str) -> None:
        """Say that ``step``'s cache entry was corrupted and is being rebuilt."""
        if self._enabled:
            self._console.print(f"[yellow]cache entry of {step.name!r} is corrupted ({reason}); rebuilding it")


def _stdout() -> Console:
    # Piped output is read by people in logs and by grep: do not wrap it at 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


def budget_table(checks: Sequence[BudgetCheck], *, title: str) -> None:
    """Print the closing table: budget, measured, limit, pass/fail."""
    table = Table(title=title, title_justify="left")
    table.add_column("budget")
    table.add_column("measured", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("result")
    for c in checks:
        result = "[dim]info" if c.kind == "info" else ("[green]pass" if c.passed else "[bold red]FAIL")
        table.add_row(c.name, c.measured_text, c.limit_text, result)
    _stdout().print(table)


def profiles_table(profiles: Sequence[TargetProfile]) -> None:
    """Print the target profiles with their budgets."""
    table = Table(title="target profiles", title_justify="left")
    for col in ("name", "runtime", "precision", "threads", "model", "RAM", "latency", "min acc"):
        table.add_column(col, no_wrap=True)
    table.add_column("hardware")
    for p in profiles:
        b = p.budgets
        table.add_row(
            p.name,
            p.runtime,
            p.precision,
            str(p.threads),
            format_value(b.model_bytes, "bytes"),
            format_value(b.ram_bytes, "bytes"),
            f"{b.latency_ms:g} ms",
            f"{b.min_accuracy:.0%}",
            p.description,
        )
    _stdout().print(table)


def releases_table(rows: Sequence[ReleaseRecord]) -> None:
    """Print registry releases: identity, key metrics, where the bundle is."""
    table = Table(title="releases", title_justify="left")
    for col in ("name", "target", "release", "version", "created", "size", "accuracy", "drop", "bundle"):
        table.add_column(col, no_wrap=col != "bundle")
    for r in rows:
        m = r.metrics
        table.add_row(
            r.name,
            r.target,
            str(r.release),
            r.version,
            r.created,
            format_value(m.get("model_bytes", 0.0), "bytes"),
            *_quality(m),
            r.path,
        )
    _stdout().print(table)


def _quality(m: Mapping[str, float]) -> tuple[str, str]:
    """The ``accuracy`` and ``drop`` cells: what the release's task measures (accuracy, MAE, detection rate)."""
    if "mae_deployed" in m:
        return f"MAE {m['mae_deployed']:.4g}", f"+{m.get('mae_increase_percent', 0.0):.2f} %"
    if "anomaly_detection_rate_deployed" in m:
        detected = format_value(m["anomaly_detection_rate_deployed"], "%")
        return f"{detected} detected", format_value(m.get("anomaly_detection_drop_points", 0.0), "pt")
    return format_value(m.get("accuracy_deployed", 0.0), "%"), format_value(m.get("accuracy_drop_points", 0.0), "pt")
