"""Cross-checks with the standard OpenSSF tool: our bundles are ordinary model signatures."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import Built
from edgeops_core import DigestMismatchError, load_public_key, verify_members

MODEL_SIGNING = [sys.executable, "-m", "model_signing"]


def _unpack(bundle: Path, dest: Path) -> Path:
    dest.mkdir()
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _verify_cli(folder: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODEL_SIGNING, "verify", "key", str(folder), "--signature", str(folder / "model.sig"), "--public_key", str(public_key)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_model_signing_cli_accepts_unpacked_bundle(tmp_path: Path, built: Built) -> None:
    folder = _unpack(built.bundle, tmp_path / "bundle")
    proc = _verify_cli(folder, built.public_key)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("member", ["manifest.json", "model.onnx"])
def test_model_signing_cli_rejects_tampered_bundle(tmp_path: Path, built: Built, member: str) -> None:
    folder = _unpack(built.bundle, tmp_path / "bundle")
    data = bytearray((folder / member).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / member).write_bytes(bytes(data))
    proc = _verify_cli(folder, built.public_key)
    assert proc.returncode != 0


def test_model_signing_cli_rejects_extra_file(tmp_path: Path, built: Built) -> None:
    folder = _unpack(built.bundle, tmp_path / "bundle")
    (folder / "extra.bin").write_bytes(b"x")
    assert _verify_cli(folder, built.public_key).returncode != 0


def test_core_verifies_signature_made_by_model_signing_cli(tmp_path: Path, built: Built) -> None:
    """The other direction: `model_signing sign key` output verifies with edgeops_core."""
    folder = _unpack(built.bundle, tmp_path / "resign")
    (folder / "model.sig").unlink()
    proc = subprocess.run(
        [
            *MODEL_SIGNING,
            "sign",
            "key",
            str(folder),
            "--signature",
            str(tmp_path / "model.sig"),
            "--private_key",
            str(built.private_key),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    members = {p.name: p.read_bytes() for p in folder.iterdir()}
    members["model.sig"] = (tmp_path / "model.sig").read_bytes()
    manifest, _ = verify_members(members, [load_public_key(built.public_key)])
    assert manifest.target == "ecu"
    # That signature does not transfer to other content.
    members["manifest.json"] = members["manifest.json"].replace(b'"release":', b'"release": ')
    with pytest.raises(DigestMismatchError, match=r"manifest\.json"):
        verify_members(members, [load_public_key(built.public_key)])
