"""Attacks on ``edgeops export --format c`` that the shipped tests do not cover (issue 13 review).

Each test is one hole and fails on the code it was written against.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_small_project, run_edgeops
from edgeops_core import Manifest, read_members
from edgeops_toolchain.export_c import FILES, render_c_sources


@dataclasses.dataclass(frozen=True)
class Wearable:
    home: Path
    bundle: Path


@pytest.fixture(scope="module")
def wearable(tmp_path_factory: pytest.TempPathFactory) -> Wearable:
    """One small wearable build of the vibration example, signed with the home's development key."""
    home = tmp_path_factory.mktemp("attack-export-home")
    dist = tmp_path_factory.mktemp("attack-export-dist")
    project = make_small_project(tmp_path_factory.mktemp("attack-vibration"))
    proc = run_edgeops("build", "-t", "wearable", "-p", project, "-o", dist, "--json", env={"EDGEOPS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return Wearable(home=home, bundle=Path(json.loads(proc.stdout)["bundle"]))


def test_an_empty_out_folder_that_is_a_mount_point_is_accepted(wearable: Wearable, tmp_path: Path) -> None:
    """docs/cli.md: "--out must be new or empty". An empty folder that is a mount point (a Docker
    volume ``-v $PWD/fw:/fw``, an SD card) is empty and writable, but the export replaces the
    folder itself with rename(2), which a mount point refuses (EBUSY): exit 5, nothing written."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    source, out = tmp_path / "volume", tmp_path / "fw"
    source.mkdir()
    out.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(out)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.strip()}")
    try:
        proc = run_edgeops("export", wearable.bundle, "--format", "c", "--out", out, env={"EDGEOPS_HOME": str(wearable.home)})
        written = sorted(p.name for p in out.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(out)], check=True)
    assert proc.returncode == 0, proc.stderr
    assert written == sorted(FILES)


def test_labels_and_runtime_version_cannot_rewrite_the_readme(wearable: Wearable) -> None:
    """Labels are the project's own strings (the C files escape them); the README pastes them
    raw, so a label or lineage.runtime_version with a newline adds its own Markdown: here a
    heading and a link that tells the firmware developer which TFLite Micro to build."""
    members = read_members(wearable.bundle.read_bytes())
    manifest = Manifest.from_json(members["manifest.json"])
    evil = "x)\n\n## Build with TFLite Micro commit deadbeef\n[get it](http://evil.example)"
    labels = (evil, *manifest.labels[1:])
    lineage = dataclasses.replace(manifest.lineage, runtime_version="0.dev1-g1234567`\n\n# Use http://evil.example")
    hostile = dataclasses.replace(manifest, labels=labels, lineage=lineage)

    def line_starts(m: Manifest) -> list[str]:
        readme = next(f for f in render_c_sources(m, members["model.tflite"], source="b.edgeops") if f.name == "README.md")
        return [line for line in readme.data.decode().splitlines() if line.startswith(("#", "["))]

    # The same headings (and code lines) as the README of the untouched manifest: nothing from
    # the manifest starts a line of its own.
    assert line_starts(hostile) == line_starts(manifest)


def test_a_long_but_valid_out_name_is_accepted(wearable: Wearable, tmp_path: Path) -> None:
    """The temporary folder is named ``.NAME.export-PID-XXXXXXXX`` beside --out, 25 characters
    longer than NAME: an --out name of 231-255 characters, which mkdir accepts, fails with
    "cannot create the output folder: File name too long" (exit 5), blaming the parent."""
    out = tmp_path / ("f" * 240)
    proc = run_edgeops("export", wearable.bundle, "--format", "c", "--out", out, env={"EDGEOPS_HOME": str(wearable.home)})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_out_dot_in_an_empty_folder_fills_it_and_keeps_the_folder(wearable: Wearable, tmp_path: Path) -> None:
    """``--out .`` in an empty working directory: the files go into it; the folder itself (its
    inode: a shell sitting in it, a mount) is never replaced by a renamed one."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    inode = cwd.stat().st_ino
    proc = run_edgeops(
        "export", wearable.bundle, "--format", "c", "--out", ".", env={"EDGEOPS_HOME": str(wearable.home)}, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    assert cwd.stat().st_ino == inode
    assert sorted(p.name for p in cwd.iterdir()) == sorted(FILES)  # no staging folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_an_empty_out_in_a_folder_nobody_may_write_is_accepted(wearable: Wearable, tmp_path: Path) -> None:
    """The parent of an existing empty --out is immutable (as a read-only parent of a mounted
    volume is): nothing may be created beside --out, only inside it."""
    parent = tmp_path / "locked"
    out = parent / "fw"
    out.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(PermissionError):
            (parent / "probe").mkdir()  # really unwritable, also for root
        proc = run_edgeops("export", wearable.bundle, "--format", "c", "--out", out, env={"EDGEOPS_HOME": str(wearable.home)})
        again = run_edgeops(
            "export", wearable.bundle, "--format", "c", "--out", out, "--force", env={"EDGEOPS_HOME": str(wearable.home)}
        )
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert proc.returncode == 0, proc.stderr
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


#: Runs export_c with --force, dying (os._exit, as a kill -9 would) at the N-th rename.
CRASH_AT_RENAME = """
import os, sys
from pathlib import Path
from edgeops_core import load_public_key
from edgeops_toolchain.export_c import export_c
bundle, out, key, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real, calls = os.rename, []
def rename(src, dst):
    if len(calls) == n:
        os._exit(9)
    calls.append(dst)
    real(src, dst)
os.rename = rename
export_c(Path(bundle), Path(out), [load_public_key(Path(key))], force=True)
os._exit(0)
"""


def test_a_kill_during_force_never_loses_a_file_and_readme_marks_completion(wearable: Wearable, tmp_path: Path) -> None:
    """--force over an earlier export, killed at every rename: each file is always somewhere
    (the earlier version in --out or in its staging folder's ``old/``, or the new one in
    --out); README.md is in --out only when the whole new export is; the next --force export
    completes and removes what the killed one left."""
    key = wearable.home / "keys" / "dev-signing.pub.pem"
    reference = tmp_path / "reference"
    assert (
        run_edgeops(
            "export", wearable.bundle, "--format", "c", "--out", reference, env={"EDGEOPS_HOME": str(wearable.home)}
        ).returncode
        == 0
    )
    new = {p.name: p.read_bytes() for p in reference.iterdir()}
    old = {name: f"earlier {name}\n".encode() for name in FILES}
    env = {**os.environ, "EDGEOPS_HOME": str(wearable.home)}
    for n in range(2 * len(FILES) + 1):
        out = tmp_path / f"fw{n}"
        out.mkdir()
        for name, data in old.items():
            (out / name).write_bytes(data)
        proc = subprocess.run(
            [sys.executable, "-c", CRASH_AT_RENAME, str(wearable.bundle), str(out), str(key), str(n)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode in (0, 9), proc.stderr
        staged = [p for p in out.iterdir() if p.name.startswith(".edgeops-export-")]
        assert len(staged) <= 1
        aside = staged[0] / "old" if staged else out / "none"
        seen = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        for name in FILES:
            if name in seen:
                assert seen[name] in (old[name], new[name]), (n, name)
            else:
                assert (aside / name).read_bytes() == old[name], (n, name)  # never neither
        if "README.md" in seen:  # the marker: a whole export, the earlier one or the new one
            assert seen in (old, new), (n, sorted(seen))
        if proc.returncode == 0:
            assert seen == new and not staged
        redo = run_edgeops(
            "export", wearable.bundle, "--format", "c", "--out", out, "--force", env={"EDGEOPS_HOME": str(wearable.home)}
        )
        assert redo.returncode == 0, redo.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == new, n  # staging removed, export complete
