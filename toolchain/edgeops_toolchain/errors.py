"""Errors of the host toolchain, on top of :mod:`edgeops_core.errors`::

    EdgeopsError
    ├── InputError (edgeops_core)
    │   ├── ProjectError         edgeops.toml missing/malformed, entry point unusable
    │   ├── DataError            the dataset failed its checks (NaN, shapes, leakage...)
    │   ├── ExportError          the project's model cannot be exported/converted
    │   └── FirmwareExportError  a bundle cannot be exported as firmware source (not TFLite
    │                            Micro, an operator without a resolver method, --out in use)
    └── BuildError
        ├── BudgetExceededError  the model breaks one or more target budgets
        ├── UnsupportedTargetError  the target's runtime has no exporter in this toolchain
        └── SigningError         model_signing failed to sign the bundle

CLI exit codes are derived from this tree (see ``docs/cli.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgeops_core import EdgeopsError, InputError

if TYPE_CHECKING:
    from edgeops_toolchain.validate import BudgetCheck

__all__ = [
    "BudgetExceededError",
    "BuildError",
    "DataError",
    "ExportError",
    "FirmwareExportError",
    "ProjectError",
    "SigningError",
    "UnsupportedTargetError",
]


class ProjectError(InputError):
    """The project file or an entry point it names is missing, malformed or invalid."""


class DataError(InputError):
    """The dataset failed a data check."""


class ExportError(InputError):
    """The project's model could not be exported to the target format."""


class FirmwareExportError(InputError):
    """``edgeops export``: the bundle or the output folder cannot be used for firmware source."""


class BuildError(EdgeopsError):
    """The build could not produce an acceptable bundle."""


class BudgetExceededError(BuildError):
    """One or more budgets failed.

    Attributes:
        checks: every budget check of the build, passing and failing.
    """

    def __init__(self, checks: Sequence[BudgetCheck]) -> None:
        failed = [c for c in checks if not c.passed]
        detail = "; ".join(f"{c.name}: measured {c.measured_text}, limit {c.limit_text}" for c in failed)
        super().__init__(f"{len(failed)} budget(s) exceeded: {detail}")
        self.checks = tuple(checks)


class UnsupportedTargetError(BuildError):
    """The target's runtime has no exporter in this toolchain."""


class SigningError(BuildError):
    """Signing the bundle failed."""
