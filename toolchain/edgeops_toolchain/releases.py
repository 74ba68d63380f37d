"""Release numbers: a monotonically increasing integer per (bundle name, target).

Devices refuse any bundle whose ``release`` is not greater than the highest they ever
installed, so the host must never hand out the same number twice. The counters live in
``$EDGEOPS_HOME/releases.json``, updated under an exclusive lock and written atomically.
A number is reserved when the build starts and committed only when the bundle is written,
so a failed build leaves the counter unchanged.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeops_core import write_atomically
from edgeops_toolchain.errors import BuildError
from edgeops_toolchain.signing import edgeops_home

__all__ = ["ReleaseCounter"]


class ReleaseCounter:
    """The per-user release counters (``$EDGEOPS_HOME/releases.json``)."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home or edgeops_home()
        self.path = self.home / "releases.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "releases.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, int] = {}
            if self.path.exists():
                try:
                    raw = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise BuildError(f"{self.path}: release counters are unreadable ({exc}); fix or remove the file") from exc
                if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
                    raise BuildError(f"{self.path}: release counters must map names to integers")
                data = raw
            yield data

    def last(self, name: str, target: str) -> int | None:
        """The last committed release of ``name`` for ``target``, if any."""
        with self._locked() as data:
            return data.get(f"{name}/{target}")

    def commit(self, name: str, target: str, release: int) -> None:
        """Record ``release`` as the last one of ``name``/``target``.

        Raises:
            BuildError: a newer release was committed meanwhile (a concurrent build).
        """
        key = f"{name}/{target}"
        with self._locked() as data:
            if data.get(key, 0) >= release:
                raise BuildError(f"release {release} of {key} is not newer than the recorded {data[key]}; build again")
            data[key] = release
            write_atomically(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
            os.chmod(self.path, 0o644)
