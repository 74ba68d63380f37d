"""Hostile bundles from issue 7: every byte signed or refused, bounded memory, typed errors.

Each test here failed on the code before the fix it covers (defects 1-3 of issue 7 and
the manifest claims that were not true).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import Built, run_agent, run_edgeops
from edgeops_core import (
    MAX_BUNDLE_BYTES,
    BundleFormatError,
    DigestMismatchError,
    Manifest,
    ManifestError,
    SignatureError,
    TrustedKey,
    load_public_key,
    pack_bundle,
    read_bundle_file,
    read_members,
    verify_bundle,
    verify_bundle_file,
    verify_members,
)
from edgeops_core.digest import sha256_hex
from edgeops_toolchain.signing import sign_members


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def data(built: Built) -> bytes:
    return built.bundle.read_bytes()


@pytest.fixture(scope="module")
def members(data: bytes) -> dict[str, bytes]:
    return read_members(data)


@pytest.fixture(scope="module")
def key(built: Built) -> TrustedKey:
    return load_public_key(built.public_key)


def _evil_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        payload = b"#!/bin/sh\necho owned\n"
        info = tarfile.TarInfo("evil.sh")
        info.size = len(payload)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _refused_everywhere(blob: bytes, path: Path, key: TrustedKey, match: str) -> None:
    with pytest.raises(BundleFormatError, match=match):
        read_members(blob)
    with pytest.raises(BundleFormatError, match=match):
        verify_bundle(blob, [key])
    path.write_bytes(blob)
    with pytest.raises(BundleFormatError, match=match):
        verify_bundle(path, [key])
    with pytest.raises(BundleFormatError, match=match):
        verify_bundle_file(path, [key])


# --- defect 1: bytes after the end-of-archive, truncation, order, free header bytes -----


def test_tar_member_appended_after_end_of_archive_is_refused(tmp_path: Path, built: Built, data: bytes, key: TrustedKey) -> None:
    blob = data + _evil_tar()
    with tarfile.open(fileobj=io.BytesIO(blob), ignore_zeros=True) as tar:
        assert "evil.sh" in tar.getnames()  # what `tar -t --ignore-zeros` would show
    _refused_everywhere(blob, tmp_path / "evil.edgeops", key, "after the end-of-archive")
    proc = run_edgeops("verify", tmp_path / "evil.edgeops", "--key", built.public_key)
    _one_error_line(proc, 4, "after the end-of-archive")


@pytest.mark.parametrize("extra", [b"\x01", os.urandom(700), b"\0" * 10240, b"\0" * 512])
def test_bytes_appended_after_end_of_archive_are_refused(tmp_path: Path, data: bytes, key: TrustedKey, extra: bytes) -> None:
    _refused_everywhere(data + extra, tmp_path / "tail.edgeops", key, "after the end-of-archive")


def test_a_nonzero_byte_in_the_end_of_archive_or_padding_is_refused(tmp_path: Path, data: bytes, key: TrustedKey) -> None:
    trailer_start = len(data.rstrip(b"\0"))
    for index in (trailer_start + 600, len(data) - 1, trailer_start + 1030):
        blob = data[:index] + b"\x07" + data[index + 1 :]
        _refused_everywhere(blob, tmp_path / "nz.edgeops", key, "end-of-archive|padding")


def test_truncated_bundles_are_refused(tmp_path: Path, data: bytes, key: TrustedKey) -> None:
    end_of_members = len(data.rstrip(b"\0"))
    end_of_members += -end_of_members % 512
    for cut in sorted({1, 512, 1024, len(data) - end_of_members, len(data) - end_of_members + 100, len(data) // 2}):
        _refused_everywhere(data[:-cut], tmp_path / "cut.edgeops", key, "truncat|end-of-archive")


def _raw_tar(order: list[tuple[str, bytes]], **fields: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in order:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mode = 0o644
            for attr, value in fields.items():
                setattr(info, attr, value)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def test_members_out_of_order_are_refused(tmp_path: Path, members: dict[str, bytes], key: TrustedKey) -> None:
    swapped = _raw_tar([(n, members[n]) for n in ("model.onnx", "manifest.json", "model.sig")])
    _refused_everywhere(swapped, tmp_path / "order.edgeops", key, "order")
    sig_first = _raw_tar([(n, members[n]) for n in ("model.sig", "manifest.json", "model.onnx")])
    _refused_everywhere(sig_first, tmp_path / "order2.edgeops", key, "order")


@pytest.mark.parametrize(("attr", "value"), [("uname", "evil"), ("mode", 0o4755), ("uid", 1000), ("gname", "x")])
def test_unsigned_header_fields_must_be_canonical(
    tmp_path: Path, members: dict[str, bytes], key: TrustedKey, attr: str, value: object
) -> None:
    blob = _raw_tar([(n, members[n]) for n in ("manifest.json", "model.onnx", "model.sig")], **{attr: value})
    _refused_everywhere(blob, tmp_path / "hdr.edgeops", key, "header")


# --- defect 2: deep nesting is a typed error, never RecursionError ------------------------


DEEP = b"[" * 100_000 + b"]" * 100_000


def _sign_payload(private_key: Path, payload: bytes) -> bytes:
    """A model.sig envelope (the model_signing layout) over an arbitrary, validly signed payload."""
    private = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    ptype = "application/vnd.in-toto+json"
    pae = f"DSSEv1 {len(ptype)} {ptype} {len(payload)} ".encode() + payload
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    doc = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": sha256_hex(pem)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": ptype,
            "signatures": [{"sig": base64.b64encode(private.sign(pae, ec.ECDSA(hashes.SHA256()))).decode(), "keyid": ""}],
        },
    }
    return json.dumps(doc).encode()


def test_deeply_nested_json_is_a_typed_error(built: Built, members: dict[str, bytes], key: TrustedKey) -> None:
    with pytest.raises(SignatureError, match="nest"):
        verify_members({**members, "model.sig": DEEP}, [key])
    # A deep statement behind a valid signature.
    with pytest.raises(SignatureError, match="nest"):
        verify_members({**members, "model.sig": _sign_payload(built.private_key, DEEP)}, [key])
    with pytest.raises(ManifestError, match="nest"):
        Manifest.from_json(DEEP)
    # A manifest nested deeper than the readers allow, but not deep enough for RecursionError.
    raw = json.loads(members["manifest.json"])
    raw["lineage"]["hyperparameters"]["deep"] = json.loads(b"[" * 200 + b"]" * 200)
    with pytest.raises(ManifestError, match="nest"):
        Manifest.from_json(json.dumps(raw).encode())


def test_signed_statement_with_a_malformed_subject_is_a_typed_error(
    built: Built, members: dict[str, bytes], key: TrustedKey
) -> None:
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "x", "digest": 5}],
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": {"serialization": {"method": "files", "hash_type": "sha256"}, "resources": []},
    }
    sig = _sign_payload(built.private_key, json.dumps(statement).encode())
    with pytest.raises(SignatureError, match="subject digest"):
        verify_members({**members, "model.sig": sig}, [key])


def test_deeply_nested_signature_exits_4_in_every_cli(tmp_path: Path, built: Built, members: dict[str, bytes]) -> None:
    path = tmp_path / "deep.edgeops"
    path.write_bytes(pack_bundle({**members, "model.sig": DEEP}))
    _one_error_line(run_edgeops("verify", path, "--key", built.public_key), 4, "model.sig")
    _one_error_line(run_agent("verify", path, "--key", built.public_key), 4, "model.sig")
    device = tmp_path / "device"
    assert run_agent("trust", "add", built.public_key, "-d", device).returncode == 0
    _one_error_line(run_agent("install", path, "-d", device, "-t", "ecu"), 4, "model.sig")


# --- defect 3: size and file type before reading -----------------------------------------

_MAXRSS = """
import sys
sys.argv = ["edgeops", *sys.argv[1:]]
code = 0
try:
    {main}
except SystemExit as exc:
    code = exc.code
# VmHWM, not ru_maxrss: ru_maxrss keeps the parent's peak across fork and exec.
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(code)
"""


def _measured(main: str, *args: str | Path) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """Run a CLI in a child, returning (process, peak RSS in KiB, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _MAXRSS.format(main=main), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc, int(proc.stdout.strip().splitlines()[-1]), time.monotonic() - start


HOST_MAIN = "from edgeops_toolchain.cli import main; main()"
AGENT_MAIN = "from edgeops_agent.cli import main; main()"


@pytest.mark.parametrize("main", [HOST_MAIN, AGENT_MAIN], ids=["edgeops", "edgeops-agent"])
def test_huge_sparse_file_is_refused_before_reading(tmp_path: Path, built: Built, main: str) -> None:
    huge = tmp_path / "huge.edgeops"
    with open(huge, "wb") as fh:
        fh.truncate(2 * 1024**3)
    proc, rss_kib, seconds = _measured(main, "verify", huge, "--key", built.public_key)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr)
    _one_error_line(proc, 4, "limit")
    assert rss_kib < 200 * 1024, f"peak RSS {rss_kib} KiB"
    assert seconds < 20


@pytest.mark.parametrize("main", [HOST_MAIN, AGENT_MAIN], ids=["edgeops", "edgeops-agent"])
def test_devices_directories_and_fifos_are_refused(tmp_path: Path, built: Built, main: str) -> None:
    fifo = tmp_path / "pipe.edgeops"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.edgeops"
    folder.mkdir()
    for path in (Path("/dev/zero"), fifo, folder):
        proc, rss_kib, _ = _measured(main, "verify", path, "--key", built.public_key)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr)
        _one_error_line(proc, 4, "not a regular file")
        assert rss_kib < 200 * 1024


def test_file_one_byte_over_the_cap_is_refused(tmp_path: Path, key: TrustedKey) -> None:
    over = tmp_path / "over.edgeops"
    with open(over, "wb") as fh:
        fh.truncate(MAX_BUNDLE_BYTES + 1)
    with pytest.raises(BundleFormatError, match="limit"):
        read_bundle_file(over)
    with pytest.raises(BundleFormatError, match="limit"):
        verify_bundle(over, [key])
    with pytest.raises(BundleFormatError, match="limit"):
        verify_bundle_file(over, [key])


def test_read_bundle_file_refuses_what_is_not_a_regular_file(tmp_path: Path, data: bytes) -> None:
    """The safe whole-file reader for callers that need the bytes (install)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo, tmp_path):
        with pytest.raises(BundleFormatError, match="not a regular file"):
            read_bundle_file(path)
    with pytest.raises(BundleFormatError, match="cannot read bundle"):
        read_bundle_file(tmp_path / "missing.edgeops")
    ok = tmp_path / "ok.edgeops"
    ok.write_bytes(data)
    assert read_bundle_file(ok) == data


# --- the streaming verifier (seam for OTA) ------------------------------------------------


def test_verify_bundle_file_locates_the_model_and_hashes_the_file(built: Built, data: bytes, key: TrustedKey) -> None:
    verified = verify_bundle_file(built.bundle, [key])
    members = read_members(data)
    assert verified.manifest == Manifest.from_json(members["manifest.json"])
    assert verified.digest == sha256_hex(data)
    assert verified.size == len(data)
    assert verified.signer == key.fingerprint
    model = data[verified.model_offset : verified.model_offset + verified.model_size]
    assert model == members["model.onnx"]
    assert verified.read_model() == model
    assert verify_bundle(built.bundle, [key]).model == model
    assert verify_bundle(built.bundle, [key]).digest == verified.digest
    # The accepted trailer is exactly tarfile's: two zero blocks, zeros to a 10240-byte record.
    assert len(data) % 10240 == 0
    assert read_members(pack_bundle(members, mtime=123456)) == members


def test_model_changed_after_verification_is_caught_when_read(tmp_path: Path, data: bytes, key: TrustedKey) -> None:
    path = tmp_path / "b.edgeops"
    path.write_bytes(data)
    verified = verify_bundle_file(path, [key])
    with open(path, "r+b") as fh:
        fh.seek(verified.model_offset + 10)
        fh.write(bytes([data[verified.model_offset + 10] ^ 1]))
    with pytest.raises(DigestMismatchError, match="changed after the bundle was verified"):
        verified.read_model()


def test_oversized_manifest_and_signature_members_are_refused(members: dict[str, bytes], key: TrustedKey) -> None:
    big_sig = pack_bundle({**members, "model.sig": b" " * (1024 * 1024 + 1)})
    with pytest.raises(BundleFormatError, match=r"model\.sig.*limit") as info:
        read_members(big_sig)
    assert info.value.member == "model.sig"
    big_manifest = pack_bundle({**members, "manifest.json": b" " * (4 * 1024 * 1024 + 1)})
    with pytest.raises(BundleFormatError, match=r"manifest\.json.*limit"):
        read_members(big_manifest)


def test_streaming_verify_memory_does_not_grow_with_the_model(tmp_path: Path, built: Built, members: dict[str, bytes]) -> None:
    model = random.Random(7).randbytes(96 * 1024 * 1024)
    body = {"manifest.json": members["manifest.json"], "model.onnx": model}
    sig = sign_members(body, built.private_key, subject="big")
    path = tmp_path / "big.edgeops"
    path.write_bytes(pack_bundle({**body, "model.sig": sig}))
    del model, body
    proc, rss_kib, _ = _measured(HOST_MAIN, "verify", path, "--key", built.public_key)
    assert proc.returncode == 0, proc.stderr
    assert rss_kib < 90 * 1024, f"peak RSS {rss_kib} KiB for a 96 MiB model"


# --- manifest claims that were not true ---------------------------------------------------


@pytest.fixture(scope="module")
def manifest(members: dict[str, bytes]) -> Manifest:
    return Manifest.from_json(members["manifest.json"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_manifest_constructor_rejects_non_finite_numbers(manifest: Manifest, bad: float) -> None:
    with pytest.raises(ManifestError, match="finite"):
        dataclasses.replace(manifest, metrics={**manifest.metrics, "accuracy_float": bad})
    with pytest.raises(ManifestError, match="finite"):
        dataclasses.replace(manifest, lineage=dataclasses.replace(manifest.lineage, hyperparameters={"train": {"lr": bad}}))
    with pytest.raises(ManifestError, match="finite"):
        dataclasses.replace(manifest, self_test=dataclasses.replace(manifest.self_test, atol=bad))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"runtime": "tensorflow"}, "runtime"),
        ({"runtime": "litert"}, "runtime"),  # litert runs model.tflite, the manifest says model.onnx
        ({"precision": "int4"}, "precision"),
    ],
)
def test_manifest_runtime_and_precision_are_validated(
    manifest: Manifest, members: dict[str, bytes], change: dict[str, str], needle: str
) -> None:
    with pytest.raises(ManifestError, match=needle):
        dataclasses.replace(manifest, **change)  # type: ignore[arg-type]
    raw = json.loads(members["manifest.json"])
    raw.update(change)
    with pytest.raises(ManifestError, match=needle):
        Manifest.from_json(json.dumps(raw).encode())


def test_manifest_huge_integer_is_a_typed_error(members: dict[str, bytes]) -> None:
    text = members["manifest.json"].decode()
    raw = json.loads(text)
    raw["metrics"]["model_bytes"] = 10**400
    with pytest.raises(ManifestError):
        Manifest.from_json(json.dumps(raw).encode())
