"""Bundle verification with edgeops_core only: every tampering is caught and named."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import Built, run_edgeops
from edgeops_core import (
    BundleError,
    BundleFormatError,
    DigestMismatchError,
    ExpiredBundleError,
    Manifest,
    SignatureError,
    TrustedKey,
    load_public_key,
    pack_bundle,
    read_members,
    verify_bundle,
    verify_members,
)


@pytest.fixture(scope="module")
def members(built: Built) -> dict[str, bytes]:
    return read_members(built.bundle.read_bytes())


@pytest.fixture(scope="module")
def key(built: Built) -> TrustedKey:
    return load_public_key(built.public_key)


def test_built_bundle_verifies(built: Built, key: TrustedKey) -> None:
    verified = verify_bundle(built.bundle, [key])
    assert verified.manifest.target == "ecu"
    assert verified.manifest.model_file == "model.onnx"
    assert verified.signer == key.fingerprint
    with tarfile.open(built.bundle) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx", "model.sig"]
    assert built.bundle.name == f"{verified.manifest.name}-{verified.manifest.version}-ecu.edgeops"


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize("member", ["manifest.json", "model.onnx", "model.sig"])
def test_any_changed_byte_is_rejected_naming_the_member(members: dict[str, bytes], key: TrustedKey, member: str) -> None:
    data = members[member]
    rng = random.Random(member)
    # Every byte of the signature; a seeded sample plus both ends of the larger members.
    positions = range(len(data)) if member == "model.sig" else sorted({0, len(data) - 1, *rng.sample(range(len(data)), 300)})
    for index in positions:
        tampered = {**members, member: _flip(data, index)}
        with pytest.raises(BundleError) as info:
            verify_members(tampered, [key])
        assert info.value.member == member, f"byte {index} of {member}: {info.value}"
        assert member in str(info.value)


def test_digest_mismatch_names_member(members: dict[str, bytes], key: TrustedKey) -> None:
    with pytest.raises(DigestMismatchError, match=r"member 'model.onnx' was modified"):
        verify_members({**members, "model.onnx": members["model.onnx"] + b"\0"}, [key])


def test_untrusted_key_is_rejected(members: dict[str, bytes]) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SignatureError, match="not a trusted key"):
        verify_members(members, [TrustedKey.from_pem(pem)])
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify_members(members, [])


def test_expired_bundle_is_rejected(members: dict[str, bytes], key: TrustedKey) -> None:
    manifest = Manifest.from_json(members["manifest.json"])
    later = manifest.expires_at + timedelta(seconds=1)
    with pytest.raises(ExpiredBundleError, match="expired at"):
        verify_members(members, [key], now=later)
    verify_members(members, [key], now=datetime.now(UTC))


def _tar(entries: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info in entries:
            data = payloads.get(info.name)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


@pytest.mark.parametrize(
    ("evil_name", "kind", "message"),
    [
        ("extra.txt", tarfile.REGTYPE, "unexpected member 'extra.txt'"),
        ("../manifest.json", tarfile.REGTYPE, r"unexpected member '\.\./manifest.json'"),
        ("/etc/passwd", tarfile.REGTYPE, "unexpected member '/etc/passwd'"),
        ("sub/model.onnx", tarfile.REGTYPE, "unexpected member 'sub/model.onnx'"),
        ("model.tflite", tarfile.SYMTYPE, "'model.tflite' is not a regular file"),
        ("model.tflite", tarfile.DIRTYPE, "'model.tflite' is not a regular file"),
    ],
)
def test_unsafe_or_extra_members_are_rejected(members: dict[str, bytes], evil_name: str, kind: bytes, message: str) -> None:
    entries = [_file(n, d) for n, d in members.items()]
    evil = tarfile.TarInfo(evil_name)
    evil.type = kind
    if kind == tarfile.REGTYPE:
        evil.size = 3
    else:
        evil.linkname = "manifest.json"
    data = _tar([*entries, evil], {**members, evil_name: b"bad"})
    with pytest.raises(BundleFormatError, match=message):
        read_members(data)


def test_duplicate_and_missing_members_are_rejected(members: dict[str, bytes]) -> None:
    entries = [_file(n, d) for n, d in members.items()]
    with pytest.raises(BundleFormatError, match="appears twice"):
        read_members(_tar([*entries, _file("model.onnx", members["model.onnx"])], members))
    without_sig = {n: d for n, d in members.items() if n != "model.sig"}
    with pytest.raises(BundleFormatError, match=r"missing member model\.sig"):
        read_members(_tar([_file(n, d) for n, d in without_sig.items()], without_sig))
    with pytest.raises(BundleFormatError, match=r"need manifest\.json, one model and model\.sig"):
        pack_bundle(without_sig)


def test_signed_member_set_must_match(members: dict[str, bytes], key: TrustedKey) -> None:
    """A model renamed to .tflite is no longer covered by the signature."""
    renamed = {
        "manifest.json": members["manifest.json"],
        "model.tflite": members["model.onnx"],
        "model.sig": members["model.sig"],
    }
    with pytest.raises(DigestMismatchError) as info:
        verify_members(renamed, [key])
    assert info.value.member in {"model.onnx", "model.tflite"}


def test_not_a_tar_and_compressed_tar_are_rejected(tmp_path: Path, built: Built, key: TrustedKey) -> None:
    with pytest.raises(BundleFormatError, match="not a readable uncompressed tar"):
        verify_bundle(b"this is not a bundle" * 100, [key])
    import gzip

    with pytest.raises(BundleFormatError):
        verify_bundle(gzip.compress(built.bundle.read_bytes()), [key])
    with pytest.raises(BundleFormatError, match="cannot read bundle"):
        verify_bundle(tmp_path / "missing.edgeops", [key])


def test_cli_verify_ok_and_tampered(tmp_path: Path, built: Built, members: dict[str, bytes]) -> None:
    ok = run_edgeops("verify", built.bundle, "--key", built.public_key, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["target"] == "ecu"
    for member in members:
        tampered = {**members, member: _flip(members[member], len(members[member]) // 2)}
        path = tmp_path / f"tampered-{member}.edgeops"
        path.write_bytes(pack_bundle(tampered))
        proc = run_edgeops("verify", path, "--key", built.public_key)
        assert proc.returncode == 4, proc.stderr
        assert member in proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    # The device's own command runs the same verifier and refuses the same bundle.
    agent = subprocess.run(
        [sys.executable, "-c", "from edgeops_agent.cli import main; main()", "verify", path, "--key", built.public_key],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert agent.returncode == 4, agent.stderr
    assert agent.stderr.startswith("error: ") and "model.sig" in agent.stderr
    accepted = subprocess.run(
        [sys.executable, "-c", "from edgeops_agent.cli import main; main()", "verify", built.bundle, "--key", built.public_key],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert accepted.returncode == 0, accepted.stderr
    # The agent's own output format (the host's adds the runtime and signer): not the host CLI.
    assert accepted.stdout.startswith("OK vibration-classifier ") and accepted.stdout.rstrip().endswith("release 1 for ecu")


def test_cli_verify_bad_key_file_is_input_error(tmp_path: Path, built: Built) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    proc = run_edgeops("verify", built.bundle, "--key", bad)
    assert proc.returncode == 2
    assert "not a PEM public key" in proc.stderr
    missing = run_edgeops("verify", built.bundle, "--key", tmp_path / "missing.pem")
    assert missing.returncode == 2
    assert "cannot read public key" in missing.stderr
