"""Shared fixtures.

Builds are real (torch training, ONNX export, onnxruntime quantization, model_signing) but
small: the example project with fewer windows and epochs. One build is shared by the whole
session; tests that tamper with it work on copies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# One OpenMP thread for torch here and in every build the tests start (subprocesses inherit it).
# The tests train a ~110 k-parameter MLP on 1 500 windows: each step's kernels take microseconds,
# so a second thread adds hand-offs, and on a busy 2-core machine (CI; a suite run beside other
# work) the two spinning threads starve each other: one such training took 10-19 s on two
# threads and 3 s on one. A build stays bit-reproducible (the thread count is fixed), and no
# test is about the thread count; a count set by whoever runs the suite wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import edgeops_toolchain  # noqa: F401  (sets MKL's reproducibility mode before any test imports torch)
from broker import Broker

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "vibration"
EDGEOPS = [sys.executable, "-m", "edgeops_toolchain"]
#: The device-side command, as a device runs it (a fresh interpreter, edgeops_agent only).
AGENT = [sys.executable, "-c", "from edgeops_agent.cli import main; main()"]


def make_small_project(dest: Path, *, n_train: int = 1500, epochs: int = 10, extra: str = "") -> Path:
    """Copy the example project into ``dest`` with a smaller dataset and fewer epochs."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in EXAMPLE.glob("*.py"):
        shutil.copy2(path, dest / path.name)
    text = (EXAMPLE / "edgeops.toml").read_text()
    text = text.replace("n_train = 6000, n_val = 1000, n_test = 2000", f"n_train = {n_train}, n_val = 400, n_test = 800")
    text = text.replace("epochs = 30", f"epochs = {epochs}")
    (dest / "edgeops.toml").write_text(text + extra)
    return dest


def run_edgeops(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``edgeops`` CLI in a subprocess (as a user would)."""
    return subprocess.run(
        [*EDGEOPS, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
        check=False,
    )


def run_agent(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``edgeops-agent`` CLI in a subprocess."""
    return subprocess.run([*AGENT, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(autouse=True)
def _edgeops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep dev keys and release counters of every test out of the user's home."""
    monkeypatch.setenv("EDGEOPS_HOME", str(tmp_path / "edgeops-home"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of the test's own on a free loopback port (persistence on: stop/start keep sessions)."""
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@contextlib.contextmanager
def mount_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (``"1m"``) mounted on ``mount`` (root only, else the test is
    skipped); unmounted afterwards. For full-disk tests that need a disk that really fills."""
    mount.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root only); unmounted afterwards."""
    with mount_tmpfs(tmp_path / "fs", "1m") as mount:
        yield mount


def fill_disk(filler: Path) -> None:
    """Write ``filler`` until its file system is full to the last byte."""
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 512):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


@dataclass(frozen=True)
class Built:
    """The session's ECU build."""

    bundle: Path
    public_key: Path
    private_key: Path
    result: dict[str, object]
    home: Path


@pytest.fixture(scope="session")
def small_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_small_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, small_project: Path) -> Built:
    """Build the small project for ecu once, through the CLI, signed with a generated key."""
    home = tmp_path_factory.mktemp("build-home")
    keys = tmp_path_factory.mktemp("keys")
    out = tmp_path_factory.mktemp("dist")
    env = {"EDGEOPS_HOME": str(home)}
    gen = run_edgeops("keys", "generate", keys, env=env)
    assert gen.returncode == 0, gen.stderr
    proc = run_edgeops(
        "build",
        "--target",
        "ecu",
        "--project",
        small_project,
        "--out",
        out,
        "--key",
        keys / "edgeops-signing.pem",
        "--json",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    return Built(
        bundle=Path(str(result["bundle"])),
        public_key=keys / "edgeops-signing.pub.pem",
        private_key=keys / "edgeops-signing.pem",
        result=result,
        home=home,
    )
