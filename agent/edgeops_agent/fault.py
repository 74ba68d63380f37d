"""A test-only fault knob: slow or failing predictions while one release is active.

Set ``EDGEOPS_AGENT_FAULT`` to comma-separated ``key=value`` pairs::

    EDGEOPS_AGENT_FAULT="release=2,latency_ms=5"          # each prediction sleeps 5 ms
    EDGEOPS_AGENT_FAULT="release=2,error_rate=0.2"        # one prediction in five fails
    EDGEOPS_AGENT_FAULT="release=2,latency_ms=5,error_rate=0.2"

While the active model's release is ``release``, each prediction (a ``predict_batch`` row
each) sleeps ``latency_ms`` inside the timed section, so the latency telemetry and the
trial's p99 see it, and fails with probability ``error_rate`` as a runtime error: counted in
telemetry ``inference.errors`` under the type ``"runtime"`` and raised as
:class:`InjectedFaultError`. The draws come from a random generator seeded with the
release, so a run is repeatable. Any other release serves untouched: this is how the fleet
console's tests make one release fail its rollout gate.

The value is parsed strictly when the daemon starts (:func:`fault_from_environ`); a
malformed one stops it with one line (a :class:`~edgeops_agent.errors.ConfigError`). Unset
-- always, outside tests -- predictions pay one ``is None`` test. Never set it on a device.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edgeops_agent.errors import AgentError, ConfigError

__all__ = ["FAULT_ENV", "RUNTIME_ERROR_TYPE", "FaultInjection", "InjectedFaultError", "fault_from_environ", "parse_fault"]

#: The environment variable holding the fault specification.
FAULT_ENV = "EDGEOPS_AGENT_FAULT"
#: The ``inference.errors`` type an injected failure is counted under.
RUNTIME_ERROR_TYPE = "runtime"


class InjectedFaultError(AgentError):
    """A prediction failed on purpose (:data:`FAULT_ENV`); counted as a ``runtime`` error."""

    counted_as = RUNTIME_ERROR_TYPE


@dataclass(frozen=True)
class FaultInjection:
    """What to do to predictions while release :attr:`release` is active.

    Attributes:
        release: the release the fault applies to (>= 1).
        latency_ms: extra time per prediction (>= 0, finite).
        error_rate: probability that a prediction fails (0..1).
    """

    release: int
    latency_ms: float = 0.0
    error_rate: float = 0.0
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(init=False, repr=False, compare=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # Not for secrets: a repeatable sequence of draws is the point.
        # numpy's generator, not the random module: importing random loads _hashlib, which the
        # serving agent keeps out of memory (test_serving_agent_does_not_load_the_signature_stack).
        object.__setattr__(self, "_rng", np.random.default_rng(self.release))

    def apply(self) -> None:
        """Sleep :attr:`latency_ms`, then fail with probability :attr:`error_rate`.

        Raises:
            InjectedFaultError: this prediction drew a failure.
        """
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000.0)
        if self.error_rate:
            with self._lock:  # one sequence of draws whatever the threads: repeatable counts
                draw = float(self._rng.random())
            if draw < self.error_rate:
                raise InjectedFaultError(
                    f"injected fault ({FAULT_ENV}): release {self.release} fails at rate {self.error_rate:g}"
                )


def parse_fault(text: str) -> FaultInjection:
    """Parse ``release=N[,latency_ms=X][,error_rate=P]`` (at least one of the last two).

    Raises:
        ConfigError: an unknown or repeated key, a malformed number, a value out of range.
    """
    expected = f"{FAULT_ENV} must be 'release=N,latency_ms=X' and/or 'error_rate=P' (N >= 1, X >= 0 ms, P in 0..1)"
    values: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in ("release", "latency_ms", "error_rate") or key in values or not value.strip():
            raise ConfigError(f"{expected}, got {text!r}")
        values[key] = value.strip()
    if "release" not in values or len(values) < 2:
        raise ConfigError(f"{expected}, got {text!r}")
    try:
        release = int(values["release"])
        latency = float(values.get("latency_ms", "0"))
        rate = float(values.get("error_rate", "0"))
    except ValueError:
        raise ConfigError(f"{expected}, got {text!r}") from None
    if release < 1 or not math.isfinite(latency) or latency < 0 or not 0 <= rate <= 1:
        raise ConfigError(f"{expected}, got {text!r}")
    return FaultInjection(release=release, latency_ms=latency, error_rate=rate)


def fault_from_environ() -> FaultInjection | None:
    """The fault :data:`FAULT_ENV` asks for, or ``None`` when it is unset or empty.

    Raises:
        ConfigError: the value is malformed.
    """
    text = os.environ.get(FAULT_ENV, "")
    return parse_fault(text) if text else None
