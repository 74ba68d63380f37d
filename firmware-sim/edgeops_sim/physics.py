"""Sensor physics: the example project's generator, driven by named physical quantities.

A generator is a Python file (numpy only) that defines ``QUANTITIES`` (name → an object
with ``nominal``, ``low``, ``high`` and ``unit``) and ``simulate(n, rng, quantities) ->
(features float32 [n, F], labels int64 [n])``, with each quantity a scalar or one value per
row. The built-in vibration example (``examples/vibration/vibration_data.py``) is one:
shaft speed, load, bearing wear, sensor gain and noise. It is loaded by path, never as part
of the toolchain, so the simulator imports nothing host-side.

:class:`Sensors` makes one batch per tick for every device of a host at once (one call of
``simulate``, vectorized over the devices), with each device's quantities at that moment
(:meth:`edgeops_sim.scenario.Scenario.quantities_at`).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgeops_sim.errors import ScenarioError

__all__ = ["Generator", "Sensors", "load_generator"]


@dataclass(frozen=True)
class Generator:
    """A loaded generator: its quantities (name → (nominal, low, high, unit)) and its function."""

    path: Path
    quantities: Mapping[str, tuple[float, float, float, str]]
    module: ModuleType

    def simulate(self, n: int, rng: np.random.Generator, values: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``n`` windows under ``values``: ``(features float32 [n, F], labels int64 [n])``."""
        x, y = self.module.simulate(n, rng, values)
        return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def load_generator(path: Path) -> Generator:
    """Load the generator file at ``path``.

    Raises:
        ScenarioError: the file is missing, does not import, or lacks ``QUANTITIES``/``simulate``.
    """
    if not path.is_file():
        raise ScenarioError(f"generator {path} does not exist (fleet.generator names a Python file)")
    name = f"_edgeops_sim_generator_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        module = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ScenarioError(f"generator {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a user's file: any failure is one line
            del sys.modules[name]
            raise ScenarioError(f"generator {path} failed to import: {type(exc).__name__}: {exc}") from None
    raw = getattr(module, "QUANTITIES", None)
    if not isinstance(raw, Mapping) or not callable(getattr(module, "simulate", None)):
        raise ScenarioError(f"generator {path} must define QUANTITIES (a mapping) and simulate(n, rng, quantities)")
    quantities: dict[str, tuple[float, float, float, str]] = {}
    for key, q in raw.items():
        try:
            nominal, low, high = float(q.nominal), float(q.low), float(q.high)
        except (AttributeError, TypeError, ValueError):
            raise ScenarioError(f"generator {path}: quantity {key!r} needs numeric nominal, low and high") from None
        if not all(map(math.isfinite, (nominal, low, high))) or not low <= nominal <= high:
            raise ScenarioError(f"generator {path}: quantity {key!r} needs low <= nominal <= high")
        quantities[str(key)] = (nominal, low, high, str(getattr(q, "unit", "")))
    return Generator(path, quantities, module)


class Sensors:
    """One vectorized batch of windows per tick for a list of devices."""

    def __init__(self, generator: Generator, seed: int) -> None:
        self.generator = generator
        self.rng = np.random.default_rng(seed)

    def batch(self, values: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """One window per entry of ``values`` (that device's quantities now): ``(features, labels)``."""
        n = len(values)
        names = self.generator.quantities
        columns = {q: np.fromiter((v.get(q, names[q][0]) for v in values), dtype=np.float64, count=n) for q in names}
        return self.generator.simulate(n, self.rng, columns)
