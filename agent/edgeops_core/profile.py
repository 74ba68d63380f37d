"""Target profiles: what a device class can run and the budgets a model must meet there.

A profile is a TOML file ``<name>.toml``; the file's stem is the target name. It is loaded
into a frozen :class:`TargetProfile` that validates itself, so a profile that loads is a
profile the build can trust. Unknown keys are rejected: a misspelt budget must fail loudly
rather than silently not apply. Units are in the field names (``_bytes``, ``_ms``).

Profiles are searched in a list of folders; a later folder overrides an earlier one with a
file of the same name, which is how users replace or add targets (``--targets-dir``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops_core.errors import ProfileError, UnknownTargetError
from edgeops_core.fields import FieldReader, load_toml

__all__ = ["FORMATS_BY_RUNTIME", "Budgets", "TargetProfile", "find_profile", "list_profiles", "load_profile"]

#: Which model file format each runtime executes.
FORMATS_BY_RUNTIME: Mapping[str, str] = {
    "onnxruntime": "onnx",
    "litert": "tflite",
    "tflite-micro": "tflite",
}
_PRECISIONS = ("int8", "fp16", "fp32")
_TOP_KEYS = {"name", "description", "hardware", "runtime", "format", "precision", "threads", "budgets", "operators"}
_BUDGET_KEYS = {
    "model_bytes",
    "ram_bytes",
    "latency_ms",
    "macs_per_second",
    "min_accuracy",
    "max_accuracy_drop_points",
    "max_mae_increase_percent",
    "max_detection_drop_points",
}
#: Defaults of the budgets added with regression and anomaly tasks, so that profiles written
#: before them still load: int8 may raise a regression's MAE by 10 % of the float MAE (an int8
#: output alone moves in steps of 1/255 of its range), and
#: lower an anomaly model's detection rate (at its own fitted threshold) by 2 points.
DEFAULT_MAX_MAE_INCREASE_PERCENT = 10.0
DEFAULT_MAX_DETECTION_DROP_POINTS = 2.0


@dataclass(frozen=True)
class Budgets:
    """Limits a model must meet on the target.

    Attributes:
        model_bytes: largest model file (flash/storage) in bytes.
        ram_bytes: largest peak working memory (RAM for the runtime, or the TFLM arena).
        latency_ms: largest single-sample latency, applied to the host measurement at the
            profile's thread count and to the MAC-count estimate.
        macs_per_second: the throughput assumed for the target's CPU when estimating
            latency from the model's multiply-accumulate count.
        min_accuracy: smallest accepted accuracy of the deployed (quantized) model, 0..1.
        max_accuracy_drop_points: largest accepted accuracy loss from quantization, in
            percentage points.
        max_mae_increase_percent: regression models: largest accepted increase of the mean
            absolute error from quantization, in percent of the float model's MAE.
        max_detection_drop_points: anomaly models: largest accepted loss of detection rate on
            the fault rows from quantization (each model at its own threshold), in percentage
            points.

    ``min_accuracy`` and ``max_accuracy_drop_points`` apply to classifiers only, the last two
    to their task only.
    """

    model_bytes: int
    ram_bytes: int
    latency_ms: float
    macs_per_second: float
    min_accuracy: float
    max_accuracy_drop_points: float
    max_mae_increase_percent: float = DEFAULT_MAX_MAE_INCREASE_PERCENT
    max_detection_drop_points: float = DEFAULT_MAX_DETECTION_DROP_POINTS


@dataclass(frozen=True)
class TargetProfile:
    """A validated target profile.

    Attributes:
        name: the target name (the TOML file's stem).
        description: one line saying which class of hardware the profile stands for.
        runtime: ``onnxruntime``, ``litert`` or ``tflite-micro``.
        format: model file format, ``onnx`` or ``tflite`` (implied by the runtime).
        precision: ``int8``, ``fp16`` or ``fp32``.
        threads: CPU threads the runtime may use on the device (and when measuring).
        budgets: the limits a build must meet.
        supported_ops: operator names the target's runtime executes.
        source: the file the profile was loaded from.
    """

    name: str
    description: str
    runtime: str
    format: str
    precision: str
    threads: int
    budgets: Budgets
    supported_ops: frozenset[str]
    source: Path

    @property
    def model_file(self) -> str:
        """The bundle member name of the model for this profile (``model.onnx``...)."""
        return f"model.{self.format}"


def _parse(data: Mapping[str, Any], path: Path) -> TargetProfile:
    r = FieldReader(ProfileError, str(path))
    r.only(data, _TOP_KEYS, "")
    name = path.stem
    if "name" in data and r.string(data, "name") != name:
        raise ProfileError(f"{path}: field 'name' is {data['name']!r} but the file is named {name}.toml")
    runtime = r.string(data, "runtime")
    if runtime not in FORMATS_BY_RUNTIME:
        raise r.fail("runtime", f"one of {', '.join(FORMATS_BY_RUNTIME)}", runtime)
    fmt = FORMATS_BY_RUNTIME[runtime]
    if "format" in data and r.string(data, "format") != fmt:
        raise ProfileError(f"{path}: runtime {runtime!r} runs format {fmt!r}, but the profile says {data['format']!r}")
    precision = r.string(data, "precision")
    if precision not in _PRECISIONS:
        raise r.fail("precision", f"one of {', '.join(_PRECISIONS)}", precision)
    b = r.mapping(r.get(data, "budgets", ""), "budgets")
    r.only(b, _BUDGET_KEYS, "budgets")
    budgets = Budgets(
        model_bytes=r.integer(b, "model_bytes", "budgets", minimum=1),
        ram_bytes=r.integer(b, "ram_bytes", "budgets", minimum=1),
        latency_ms=r.number(b, "latency_ms", "budgets", minimum=0, exclusive_minimum=True),
        macs_per_second=r.number(b, "macs_per_second", "budgets", minimum=0, exclusive_minimum=True),
        min_accuracy=r.number(b, "min_accuracy", "budgets", minimum=0, maximum=1),
        max_accuracy_drop_points=r.number(b, "max_accuracy_drop_points", "budgets", minimum=0, maximum=100),
        max_mae_increase_percent=r.number(b, "max_mae_increase_percent", "budgets", minimum=0)
        if "max_mae_increase_percent" in b
        else DEFAULT_MAX_MAE_INCREASE_PERCENT,
        max_detection_drop_points=r.number(b, "max_detection_drop_points", "budgets", minimum=0, maximum=100)
        if "max_detection_drop_points" in b
        else DEFAULT_MAX_DETECTION_DROP_POINTS,
    )
    ops = r.mapping(r.get(data, "operators", ""), "operators")
    r.only(ops, {"supported"}, "operators")
    supported = r.strings(ops, "supported", "operators")
    if not supported:
        raise ProfileError(f"{path}: field 'operators.supported' must list at least one operator")
    description = r.string(data, "description") if "description" in data else ""
    return TargetProfile(
        name=name,
        description=description,
        runtime=runtime,
        format=fmt,
        precision=precision,
        threads=r.integer(data, "threads", minimum=1),
        budgets=budgets,
        supported_ops=frozenset(supported),
        source=path,
    )


def load_profile(path: Path) -> TargetProfile:
    """Load and validate one profile file.

    Raises:
        ProfileError: the file is unreadable, not valid TOML (the message gives the line),
            or fails validation (the message names the field).
    """
    return _parse(load_toml(path, ProfileError, "target profile"), path)


def _profile_files(dirs: Iterable[Path]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            raise ProfileError(f"{folder}: targets folder does not exist")
        for path in sorted(folder.glob("*.toml")):
            files[path.stem] = path  # later folders override earlier ones
    return files


def list_profiles(dirs: Iterable[Path]) -> list[TargetProfile]:
    """Load every profile found in ``dirs`` (later folders override earlier ones), by name.

    Raises:
        ProfileError: a folder is missing or any profile in it is invalid.
    """
    return [load_profile(p) for _, p in sorted(_profile_files(dirs).items())]


def find_profile(name: str, dirs: Iterable[Path]) -> TargetProfile:
    """Load the profile called ``name`` from ``dirs``.

    Raises:
        UnknownTargetError: no such profile; the message lists the valid names.
        ProfileError: the profile exists but is invalid.
    """
    files = _profile_files(dirs)
    if name not in files:
        valid = ", ".join(sorted(files)) or "(none)"
        raise UnknownTargetError(f"unknown target {name!r}; valid targets: {valid}")
    return load_profile(files[name])
