"""``edgeops export --format c``: wearable bundles of both examples as TFLite Micro firmware source.

Each export is compiled with the system gcc/g++ (as C11 and as C++11) together with a C
harness written here, which hashes the model array with its own sha256 and prints every
constant and vector; the test compares them with the signed bundle. Files that include
TensorFlow Lite Micro's headers are syntax-checked without them: they must fail, and only
on a missing TFLite Micro header. The quantized self-test vectors are then run through the
real TFLite Micro interpreter in the exported arena size, as ``self_test.cc`` does on the device.
``self_test.cc`` itself is compiled and run too (classifiers, and small regression and anomaly
bundles), against test-only stand-ins for TFLite Micro's headers whose ``Invoke()`` replays the
real interpreter's outputs: no TFLite Micro source tree is installed, only its Python runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGEOPS, REPO, Built, make_small_project, run_edgeops
from edgeops_core import Manifest, SelfTestVector, load_public_key, pack_bundle, read_members, verify_bundle_file
from edgeops_toolchain import export_c as export_module
from edgeops_toolchain.errors import BuildError, FirmwareExportError
from edgeops_toolchain.export_c import (
    FILES,
    OPERATOR_METHODS,
    TFLM_FILES,
    export_c,
    render_c_sources,
    resolver_methods,
)
from edgeops_toolchain.signing import sign_members
from edgeops_toolchain.tflite_export import tflite_ops
from test_tasks import _DATA as _TASK_DATA
from test_tasks import _MODEL as _TASK_MODEL

C_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]
CXX_FLAGS = ["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"]
MISSING_TFLM_HEADER = re.compile(r"fatal error: tensorflow/lite/[\w/]+\.h: No such file or directory")


def _compiler(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/setup.sh --dev installs it"
    return path


# -- fixtures: one wearable build of each example, signed with the home's development key ----


@dataclasses.dataclass(frozen=True)
class Wearable:
    home: Path
    bundles: dict[str, Path]

    @property
    def env(self) -> dict[str, str]:
        return {"EDGEOPS_HOME": str(self.home)}


@pytest.fixture(scope="module")
def wearable(tmp_path_factory: pytest.TempPathFactory) -> Wearable:
    """Small wearable builds of examples/vibration and examples/digits (fewer rows and epochs)."""
    home = tmp_path_factory.mktemp("export-home")
    dist = tmp_path_factory.mktemp("export-dist")
    digits = tmp_path_factory.mktemp("digits")
    for path in (REPO / "examples" / "digits").glob("*.py"):
        shutil.copy2(path, digits / path.name)
    toml = (REPO / "examples" / "digits" / "edgeops.toml").read_text()
    assert "epochs = 40" in toml
    (digits / "edgeops.toml").write_text(toml.replace("epochs = 40", "epochs = 12"))
    projects = {"vibration": make_small_project(tmp_path_factory.mktemp("vibration")), "digits": digits}
    bundles = {}
    for name, project in projects.items():
        # No --key: signed with the home's development key, which export then trusts by default.
        proc = run_edgeops("build", "-t", "wearable", "-p", project, "-o", dist, "--json", env={"EDGEOPS_HOME": str(home)})
        assert proc.returncode == 0, proc.stderr
        bundles[name] = Path(json.loads(proc.stdout)["bundle"])
    return Wearable(home=home, bundles=bundles)


def _export(wearable: Wearable, bundle: Path, out: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_edgeops("export", bundle, "--format", "c", "--out", out, *args, env=wearable.env)


# -- the C harness ------------------------------------------------------------------------------


def _sha256_constants() -> list[int]:
    """SHA-256's round constants: the first 32 bits of the cube roots' fractions of the first 64 primes."""
    primes: list[int] = []
    n = 2
    while len(primes) < 64:
        if all(n % p for p in primes):
            primes.append(n)
        n += 1

    def icbrt(x: int) -> int:
        lo, hi = 0, 1 << 64
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if mid**3 <= x else (lo, mid - 1)
        return lo

    return [icbrt(p << 96) & 0xFFFFFFFF for p in primes]


HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_config.h"
#include "model_data.h"
#include "self_test_data.h"

static const uint32_t K[64] = {K_VALUES};
#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* A minimal SHA-256 (FIPS 180-4), checked below against known answers. */
static void sha256(const unsigned char *msg, size_t len, unsigned char out[32]) {
  uint32_t h[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                   0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
  size_t total = ((len + 9 + 63) / 64) * 64;
  for (size_t off = 0; off < total; off += 64) {
    uint32_t w[64];
    for (int i = 0; i < 64; ++i) {
      size_t p = off + (size_t)i;
      unsigned char byte;
      if (p < len) byte = msg[p];
      else if (p == len) byte = 0x80;
      else if (p >= total - 8) byte = (unsigned char)(((uint64_t)len * 8u) >> (8u * (total - 1 - p)));
      else byte = 0;
      if (i % 4 == 0) w[i / 4] = 0;
      w[i / 4] |= (uint32_t)byte << (8 * (3 - i % 4));
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
      uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
  }
  for (int i = 0; i < 32; ++i) out[i] = (unsigned char)(h[i / 4] >> (8 * (3 - i % 4)));
}

static void hex(const char *tag, const unsigned char *bytes, size_t n) {
  printf("%s ", tag);
  for (size_t i = 0; i < n; ++i) printf("%02x", bytes[i]);
  printf("\n");
}

static void floats(const char *tag, int v, const float *x, int n) {
  printf("%s %d", tag, v);
  for (int i = 0; i < n; ++i) printf(" %.9g", (double)x[i]);
  printf("\n");
}

int main(int argc, char **argv) {
  unsigned char digest[32];
  sha256((const unsigned char *)"", 0, digest);
  hex("kat_empty", digest, 32);
  sha256((const unsigned char *)"abc", 3, digest);
  hex("kat_abc", digest, 32);
  static unsigned char million[1000000];
  memset(million, 'a', sizeof million);
  sha256(million, sizeof million, digest);
  hex("kat_million_a", digest, 32);

  sha256(edgeops_model_data, edgeops_model_data_len, digest);
  hex("sha256", digest, 32);
  printf("const_hex %s\n", edgeops_model_sha256);
  hex("const_bytes", edgeops_model_sha256_bytes, 32);
  printf("len %u %u\n", edgeops_model_data_len, (unsigned)sizeof edgeops_model_data);
  printf("aligned16 %d\n", (int)((uintptr_t)edgeops_model_data % 16 == 0));

  /* The array against the model member the test wrote (argv[1]). */
  FILE *fh = argc < 2 ? NULL : fopen(argv[1], "rb");
  if (fh == NULL) return 2;
  unsigned char *file = malloc(edgeops_model_data_len + 1);
  size_t got = fread(file, 1, edgeops_model_data_len + 1, fh);
  fclose(fh);
  printf("file_equal %d\n", (int)(got == edgeops_model_data_len && memcmp(file, edgeops_model_data, got) == 0));
  free(file);

  printf("arena %u\n", (unsigned)EDGEOPS_ARENA_BYTES);
  const int in_dims[] = EDGEOPS_INPUT_DIMS, out_dims[] = EDGEOPS_OUTPUT_DIMS;
  printf("in_dims %d", EDGEOPS_INPUT_RANK);
  for (int i = 0; i < EDGEOPS_INPUT_RANK; ++i) printf(" %d", in_dims[i]);
  printf("\nout_dims %d", EDGEOPS_OUTPUT_RANK);
  for (int i = 0; i < EDGEOPS_OUTPUT_RANK; ++i) printf(" %d", out_dims[i]);
  printf("\n");
  printf("in_q %.9g %d\n", (double)EDGEOPS_INPUT_SCALE, EDGEOPS_INPUT_ZERO_POINT);
  printf("out_q %.9g %d\n", (double)EDGEOPS_OUTPUT_SCALE, EDGEOPS_OUTPUT_ZERO_POINT);
  printf("elements %d %d\n", EDGEOPS_INPUT_ELEMENTS, EDGEOPS_OUTPUT_ELEMENTS);
  printf("input_is_int8 %d\n", (int)(sizeof(edgeops_input_t) == 1 && (edgeops_input_t)-1 < 0));
  const char *labels[] = EDGEOPS_LABELS;
  printf("labels %d", EDGEOPS_LABEL_COUNT);
  for (int i = 0; i < EDGEOPS_LABEL_COUNT; ++i) {
    printf(" ");
    for (const char *c = labels[i]; *c; ++c) printf("%02x", (unsigned char)*c);
  }
  printf("\n");
  const char *ops[] = EDGEOPS_OPS;
  printf("ops %d", EDGEOPS_OP_COUNT);
  for (int i = 0; i < EDGEOPS_OP_COUNT; ++i) printf(" %s", ops[i]);
  printf("\n");
  printf("meta %s %s %d %s [%s]\n", EDGEOPS_MODEL_NAME, EDGEOPS_MODEL_VERSION, EDGEOPS_MODEL_RELEASE, EDGEOPS_MODEL_TARGET,
         EDGEOPS_TFLM_VERSION);
#if EDGEOPS_PREPROCESSING_STANDARDIZE
  const float mean[] = EDGEOPS_PREPROCESSING_MEAN, std[] = EDGEOPS_PREPROCESSING_STD;
  floats("mean", 0, mean, EDGEOPS_INPUT_ELEMENTS);
  floats("std", 0, std, EDGEOPS_INPUT_ELEMENTS);
#endif
  printf("self_test %d %.17g\n", EDGEOPS_SELF_TEST_COUNT, EDGEOPS_SELF_TEST_ATOL);
  for (int v = 0; v < EDGEOPS_SELF_TEST_COUNT; ++v) {
    floats("raw", v, edgeops_self_test_raw[v], EDGEOPS_INPUT_ELEMENTS);
    printf("fed %d", v);
    for (int i = 0; i < EDGEOPS_INPUT_ELEMENTS; ++i) printf(" %d", (int)edgeops_self_test_input[v][i]);
    printf("\n");
    floats("expected", v, edgeops_self_test_expected[v], EDGEOPS_OUTPUT_ELEMENTS);
    printf("label %d %d\n", v, edgeops_self_test_label[v]);
  }
  return 0;
}
"""


def _run_harness(out: Path, model: bytes, work: Path) -> dict[str, list[list[str]]]:
    """Compile the C-compatible files with the harness, as C and as C++ (linked into C), run both.

    Returns:
        Each output line's first word → the rest of each such line, split on spaces.
    """
    gcc, gxx = _compiler("gcc"), _compiler("g++")
    work.mkdir(parents=True, exist_ok=True)
    harness = work / "harness.c"
    harness.write_text(HARNESS.replace("K_VALUES", ", ".join(f"0x{k:08x}u" for k in _sha256_constants())))
    model_file = work / "model.tflite"
    model_file.write_bytes(model)
    include = ["-I", str(out)]
    as_c = work / "as_c"
    data_files = [str(out / "model_data.cc"), str(out / "self_test_data.cc")]
    subprocess.run([gcc, *C_FLAGS, *include, str(harness), "-x", "c", *data_files, "-o", str(as_c)], check=True)
    objects = []
    for name in ("model_data.cc", "self_test_data.cc"):
        obj = work / f"{name}.o"
        subprocess.run([gxx, *CXX_FLAGS, *include, "-c", str(out / name), "-o", str(obj)], check=True)
        objects.append(str(obj))
    subprocess.run([gcc, *C_FLAGS, *include, "-c", str(harness), "-o", str(work / "harness.o")], check=True)
    mixed = work / "mixed"
    subprocess.run([gcc, str(work / "harness.o"), *objects, "-o", str(mixed)], check=True)
    outputs = [
        subprocess.run([str(exe), str(model_file)], capture_output=True, text=True, check=True).stdout for exe in (as_c, mixed)
    ]
    assert outputs[0] == outputs[1]  # the same data compiled as C and as C++
    parsed: dict[str, list[list[str]]] = {}
    for line in outputs[0].splitlines():
        tag, *rest = line.split(" ")
        parsed.setdefault(tag, []).append(rest)
    return parsed


def _syntax(compiler: str, flags: list[str], language: str, out: Path, name: str) -> subprocess.CompletedProcess[str]:
    cmd = [compiler, *flags, "-fsyntax-only", "-x", language, "-I", str(out), str(out / name)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _f32(values: list[str]) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64).astype(np.float32)


# -- the main check: both examples, exported, compiled, compared ---------------------------------


@pytest.mark.parametrize("example", ["vibration", "digits"])
def test_wearable_bundle_exports_and_compiles(wearable: Wearable, tmp_path: Path, example: str) -> None:
    import tflite_micro
    from tflite_micro.python.tflite_micro import runtime

    bundle = wearable.bundles[example]
    verified = verify_bundle_file(bundle, [load_public_key(wearable.home / "keys" / "dev-signing.pub.pem")])
    m, model = verified.manifest, verified.read_model()
    out = tmp_path / "firmware"
    proc = _export(wearable, bundle, out, "--json")  # no --key: the development key, as build used
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["development_key"] is True and result["signer"] == verified.signer

    # Exactly the documented files; the TFLite Micro ones declared in --json and in each file.
    assert [f["name"] for f in result["files"]] == list(FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    declared = {f["name"] for f in result["files"] if f["needs_tflm"]}
    assert declared == TFLM_FILES == {"model_ops.h", "model_ops.cc", "self_test.h", "self_test.cc"}
    for name in FILES:
        if name == "README.md":
            continue
        head = (out / name).read_text().splitlines()[:6]
        line = next(x for x in head if "Needs TensorFlow Lite Micro headers:" in x)
        assert ("headers: yes" in line) == (name in declared), (name, line)

    # The manifest records the TFLite Micro the build validated with; the README and the config name it.
    assert m.lineage.runtime_version == tflite_micro.__version__ == result["tflm_version"]
    readme = (out / "README.md").read_text()
    assert f"TFLite Micro `{tflite_micro.__version__}`" in readme
    commit = tflite_micro.__version__.rsplit("-g", 1)[1]
    assert f"source commit `{commit}`" in readme

    # The C harness: the array's bytes, their sha256, the config and the vectors.
    h = _run_harness(out, model, tmp_path / "harness")
    assert h["kat_empty"] == [[hashlib.sha256(b"").hexdigest()]]
    assert h["kat_abc"] == [[hashlib.sha256(b"abc").hexdigest()]]
    assert h["kat_million_a"] == [[hashlib.sha256(b"a" * 1_000_000).hexdigest()]]
    digest = verified.model_sha256  # the digest the signed statement lists for the model
    assert digest == hashlib.sha256(model).hexdigest() == result["model_sha256"]
    assert h["sha256"] == h["const_hex"] == h["const_bytes"] == [[digest]]
    assert h["len"] == [[str(len(model))] * 2] and h["aligned16"] == [["1"]] and h["file_equal"] == [["1"]]
    assert h["arena"] == [[str(int(m.metrics["arena_bytes"]))]] and result["arena_bytes"] == m.metrics["arena_bytes"]
    in_shape, n_out = m.inputs[0].shape, len(m.labels)  # digits: an N-d input [1, 1, 8, 8]
    n_in = int(np.prod(in_shape))
    assert h["in_dims"] == [[str(len(in_shape)), *(str(d) for d in in_shape)]] and h["out_dims"] == [["2", "1", str(n_out)]]
    assert h["elements"] == [[str(n_in), str(n_out)]] and h["input_is_int8"] == [["1"]]
    q_in, q_out = m.inputs[0].quantization, m.outputs[0].quantization
    assert q_in is not None and q_out is not None
    for tag, q in (("in_q", q_in), ("out_q", q_out)):
        ((scale, zero),) = h[tag]
        assert np.float32(float(scale)) == np.float32(q.scale) and int(zero) == q.zero_point
    assert h["labels"] == [[str(n_out), *(label.encode().hex() for label in m.labels)]]
    ops = sorted(tflite_ops(model))
    assert h["ops"] == [[str(len(ops)), *ops]] and result["operators"] == ops
    assert h["meta"] == [[m.name, m.version, str(m.release), m.target, f"[{tflite_micro.__version__}]"]]
    if m.preprocessing.kind == "standardize":
        assert np.array_equal(_f32(h["mean"][0][1:]), np.float32(m.preprocessing.mean))
        assert np.array_equal(_f32(h["std"][0][1:]), np.float32(m.preprocessing.std))
    else:
        assert "mean" not in h

    vectors = m.self_test.vectors
    ((count, atol),) = h["self_test"]
    assert int(count) == len(vectors) and float(atol) == m.self_test.atol  # %.17g: the exact double
    raw = np.stack([_f32(row[1:]) for row in h["raw"]])
    fed = np.asarray([[int(v) for v in row[1:]] for row in h["fed"]], dtype=np.int64)
    expected = np.stack([_f32(row[1:]) for row in h["expected"]])
    labels = [int(row[1]) for row in h["label"]]
    assert np.array_equal(raw, np.float32([v.input for v in vectors]))
    assert np.array_equal(expected, np.float32([v.expected for v in vectors]))
    assert labels == [v.label for v in vectors]
    # The inputs as the device feeds them: preprocessing, then int8 quantization (float32, round half to even).
    x = np.float32([v.input for v in vectors])
    if m.preprocessing.kind == "standardize":
        x = (x - np.float32(m.preprocessing.mean)) / np.float32(m.preprocessing.std)
    want = np.clip(np.rint(x / np.float32(q_in.scale)) + q_in.zero_point, -128, 127)
    assert np.array_equal(fed, want.astype(np.int64))

    # What self_test.cc does on the device, with the real TFLite Micro and the exported arena size.
    it = runtime.Interpreter.from_bytes(model, arena_size=int(m.metrics["arena_bytes"]))
    failed = 0
    for row, v in zip(fed, vectors, strict=True):
        it.set_input(row.astype(np.int8).reshape(in_shape), 0)
        it.invoke()
        y = (it.get_output(0).reshape(-1).astype(np.float32) - np.float32(q_out.zero_point)) * np.float32(q_out.scale)
        failed += not (float(np.abs(y - np.float32(v.expected)).max()) <= m.self_test.atol and int(y.argmax()) == v.label)
    assert failed == 0

    # The resolver: exactly the model's operators, through TFLite Micro's method names.
    calls = re.findall(r"resolver\.(\w+)\(\) != kTfLiteOk\) return kTfLiteError;  // (\w+)", (out / "model_ops.cc").read_text())
    assert calls == [(OPERATOR_METHODS[op], op) for op in ops]
    assert "tflite::MicroMutableOpResolver<EDGEOPS_OP_COUNT>" in (out / "model_ops.h").read_text()
    assert f"#define EDGEOPS_OP_COUNT {len(ops)}\n" in (out / "model_config.h").read_text()
    if example == "digits":
        assert {"CONV_2D", "MAX_POOL_2D"} <= set(ops)  # a CNN, not only FULLY_CONNECTED

    # Without TFLite Micro's headers, exactly the declared files fail, and only on those headers.
    gcc, gxx = _compiler("gcc"), _compiler("g++")
    for name in FILES:
        if name == "README.md":
            continue
        cxx = _syntax(gxx, CXX_FLAGS, "c++", out, name)
        if name in declared:
            assert cxx.returncode != 0 and MISSING_TFLM_HEADER.search(cxx.stderr), (name, cxx.stderr)
            assert len(re.findall(r"error:", cxx.stderr)) == 1, cxx.stderr  # nothing else is wrong before it
        else:
            assert cxx.returncode == 0, (name, cxx.stderr)
            c = _syntax(gcc, C_FLAGS, "c", out, name)
            assert c.returncode == 0, (name, c.stderr)


def test_operator_table_is_tflite_micros_own() -> None:
    """Every mapped operator is a TFLite builtin with a kernel in the installed TFLite Micro, and
    every builtin kernel it has is mapped: the table neither guesses nor misses one."""
    from ai_edge_litert import schema_py_generated as schema

    from edgeops_core import find_profile
    from edgeops_toolchain.resources import builtin_targets_dir

    spec = importlib.util.find_spec("tflite_micro.python.tflite_micro._runtime")
    assert spec is not None and spec.origin
    symbols = subprocess.run(["nm", "-DC", spec.origin], capture_output=True, text=True, check=True).stdout
    kernels = set(re.findall(r"Register_([A-Z0-9_]+)\(\)", symbols))
    builtins = {k for k in vars(schema.BuiltinOperator) if not k.startswith("_")}
    assert set(OPERATOR_METHODS) <= builtins
    assert set(OPERATOR_METHODS) == kernels & builtins
    assert len(set(OPERATOR_METHODS.values())) == len(OPERATOR_METHODS)
    assert all(re.fullmatch(r"Add[A-Z][A-Za-z0-9]*", m) for m in OPERATOR_METHODS.values())
    # Spot checks against micro_mutable_op_resolver.h.
    assert OPERATOR_METHODS["FULLY_CONNECTED"] == "AddFullyConnected" and OPERATOR_METHODS["CONV_2D"] == "AddConv2D"
    assert OPERATOR_METHODS["DEPTHWISE_CONV_2D"] == "AddDepthwiseConv2D" and OPERATOR_METHODS["SOFTMAX"] == "AddSoftmax"
    wearable = find_profile("wearable", [builtin_targets_dir()])
    assert wearable.supported_ops <= set(OPERATOR_METHODS)


def test_an_operator_without_a_resolver_method_is_named() -> None:
    with pytest.raises(FirmwareExportError, match=r"operator\(s\) CUSTOM:MyOp, LSH_PROJECTION with no TFLite Micro"):
        resolver_methods(["FULLY_CONNECTED", "LSH_PROJECTION", "CUSTOM:MyOp"])
    assert resolver_methods(["SOFTMAX", "ADD", "SOFTMAX"]) == [("ADD", "AddAdd"), ("SOFTMAX", "AddSoftmax")]


def _patch_operator(model: bytes, old: str, new: str) -> bytes:
    """The flatbuffer with operator code ``old`` replaced by ``new`` (both fields of OperatorCode)."""
    from ai_edge_litert import schema_py_generated as schema

    codes = vars(schema.BuiltinOperator)
    data = bytearray(model)
    root = schema.Model.GetRootAsModel(data, 0)
    for i in range(root.OperatorCodesLength()):
        table = root.OperatorCodes(i)
        if max(table.BuiltinCode(), table.DeprecatedBuiltinCode()) == codes[old]:
            for field, fmt in ((10, "<i"), (4, "<b")):  # builtin_code (int32), deprecated_builtin_code (int8)
                offset = table._tab.Offset(field)
                if offset:
                    struct.pack_into(fmt, data, table._tab.Pos + offset, codes[new])
    return bytes(data)


def test_a_signed_bundle_with_an_unmappable_operator_is_refused_naming_it(wearable: Wearable, tmp_path: Path) -> None:
    bundle = wearable.bundles["vibration"]
    members = read_members(bundle.read_bytes())
    model = _patch_operator(members["model.tflite"], "FULLY_CONNECTED", "LSH_PROJECTION")
    assert tflite_ops(model) == {"LSH_PROJECTION"}
    body = {"manifest.json": members["manifest.json"], "model.tflite": model}
    sig = sign_members(body, wearable.home / "keys" / "dev-signing.pem", subject="odd-op")
    odd = tmp_path / "odd-op.edgeops"
    odd.write_bytes(pack_bundle({**body, "model.sig": sig}))
    proc = _export(wearable, odd, tmp_path / "out")
    assert proc.returncode == 2 and "LSH_PROJECTION" in proc.stderr and "MicroMutableOpResolver" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["odd-op.edgeops"]


# -- bad input ------------------------------------------------------------------------------------


def test_onnx_bundle_is_refused_with_the_reason(built: Built, tmp_path: Path) -> None:
    proc = run_edgeops("export", built.bundle, "--format", "c", "--out", tmp_path / "out", "--key", built.public_key, "--json")
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["type"] == "FirmwareExportError"
    assert "runtime is 'onnxruntime' (target 'ecu')" in error["message"] and "TFLite Micro bundles only" in error["message"]
    assert proc.stderr == f"error: {error['message']}\n"
    assert not (tmp_path / "out").exists()


def test_tampered_bundle_is_refused_with_the_verify_exit_code(wearable: Wearable, tmp_path: Path) -> None:
    key = wearable.home / "keys" / "dev-signing.pub.pem"
    good = verify_bundle_file(wearable.bundles["vibration"], [load_public_key(key)])
    data = bytearray(wearable.bundles["vibration"].read_bytes())
    data[good.model_offset + good.model_size // 2] ^= 0x01  # one bit inside the model member
    tampered = tmp_path / "tampered.edgeops"
    tampered.write_bytes(bytes(data))
    verify = run_edgeops("verify", tampered, "--key", key)
    export = _export(wearable, tampered, tmp_path / "out", "--key", key)
    assert verify.returncode == export.returncode == 4
    assert export.stderr == verify.stderr and "model.tflite" in export.stderr  # the same one line, naming the member
    # A key that did not sign it, a directory given as the bundle, a missing file.
    other = tmp_path / "other-keys"
    assert run_edgeops("keys", "generate", other).returncode == 0
    wrong = _export(wearable, wearable.bundles["vibration"], tmp_path / "out", "--key", other / "edgeops-signing.pub.pem")
    assert wrong.returncode == 4 and "not a trusted key" in wrong.stderr, wrong.stderr
    assert _export(wearable, tmp_path, tmp_path / "out").returncode == 4
    missing = _export(wearable, tmp_path / "nope.edgeops", tmp_path / "out")
    assert missing.returncode == 2 and "no such bundle file" in missing.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_without_a_key_the_development_key_is_required(wearable: Wearable, tmp_path: Path) -> None:
    proc = run_edgeops(
        "export", wearable.bundles["vibration"], "--format", "c", "--out", tmp_path / "out",
        env={"EDGEOPS_HOME": str(tmp_path / "empty-home")},
    )  # fmt: skip
    assert proc.returncode == 2 and "no --key given and no development key" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_out_folder_rules_and_force(wearable: Wearable, tmp_path: Path) -> None:
    bundle, out = wearable.bundles["digits"], tmp_path / "fw"
    out.mkdir()  # an existing empty folder is fine
    assert _export(wearable, bundle, out).returncode == 0
    reference = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "model_data.cc").write_text("edited")
    refused = _export(wearable, bundle, out)
    assert refused.returncode == 2 and "is not empty" in refused.stderr and "--force" in refused.stderr
    assert (out / "model_data.cc").read_text() == "edited"
    # --force replaces an earlier export; same bundle, same bytes.
    assert _export(wearable, bundle, out, "--force").returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference
    # ...but never deletes what an export did not write.
    (out / "CMakeLists.txt").write_text("mine")
    foreign = _export(wearable, bundle, out, "--force")
    assert foreign.returncode == 2 and "CMakeLists.txt" in foreign.stderr and "nothing was changed" in foreign.stderr
    assert (out / "CMakeLists.txt").read_text() == "mine" and (out / "model_data.cc").read_bytes() == reference["model_data.cc"]
    # A file, a link, and a parent that is a file.
    (tmp_path / "afile").write_text("x")
    assert _export(wearable, bundle, tmp_path / "afile").returncode == 2
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    link = _export(wearable, bundle, tmp_path / "link")
    assert link.returncode == 2 and "symbolic link" in link.stderr and not any((tmp_path / "empty").iterdir())
    under_file = _export(wearable, bundle, tmp_path / "afile" / "fw")
    assert under_file.returncode == 5 and "cannot create the output folder" in under_file.stderr, under_file.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "fw", "link"]  # no temporary folder left


def test_concurrent_exports_to_one_folder_leave_one_complete_export(wearable: Wearable, tmp_path: Path) -> None:
    bundle, out = wearable.bundles["digits"], tmp_path / "fw"
    cmd = [*EDGEOPS, "export", str(bundle), "--format", "c", "--out", str(out)]
    env = {**os.environ, **wearable.env}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2, 2], results
    assert all("is not empty" in err for code, err in results if code == 2)
    reference = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(reference) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw"]
    # Concurrent --force exports over it: each replaces it whole or steps aside; never a mix, never a crash.
    procs = [
        subprocess.Popen([*cmd, "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    assert {code for code, _ in results} <= {0, 2} and 0 in {code for code, _ in results}, results
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw"]


def test_kill_9_never_leaves_a_partial_export(wearable: Wearable, tmp_path: Path) -> None:
    bundle = wearable.bundles["vibration"]
    reference = tmp_path / "reference"
    assert _export(wearable, bundle, reference).returncode == 0
    env = {**os.environ, **wearable.env}
    for i, delay in enumerate((0.4, 0.7, 0.9, 1.1, 1.4)):
        out = tmp_path / f"fw{i}"
        proc = subprocess.Popen([*EDGEOPS, "export", str(bundle), "--format", "c", "--out", str(out)], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if out.exists():  # either nothing, or the whole export
            assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}
    # What a kill can leave is a hidden staging folder beside --out, never a visible partial one.
    for p in tmp_path.iterdir():
        assert p.name == "reference" or re.fullmatch(r"fw\d|\.edgeops-export-[0-9a-f]{16}", p.name), p.name


def test_a_write_failure_leaves_nothing_and_a_failed_replace_keeps_the_old_export(
    wearable: Wearable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = wearable.bundles["digits"]
    trusted = [load_public_key(wearable.home / "keys" / "dev-signing.pub.pem")]
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(export_module.os, "fsync", failing_fsync)
    with pytest.raises(BuildError, match="cannot write the export: No space left on device"):
        export_c(bundle, tmp_path / "fw", trusted)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export_module.os, "fsync", real_fsync)

    export_c(bundle, tmp_path / "fw", trusted)
    before = {p.name: p.read_bytes() for p in (tmp_path / "fw").iterdir()}
    real_rename = os.rename

    def failing_rename(src: str | Path, dst: str | Path) -> None:
        # Half-way through moving the new files in, after the old ones were moved aside.
        if Path(dst).name == "model_ops.h" and Path(src).parent.name.startswith(".edgeops-export-"):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(export_module.os, "rename", failing_rename)
    with pytest.raises(BuildError, match="cannot move the export into place"):
        export_c(bundle, tmp_path / "fw", trusted, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "fw").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fw"]


def test_hostile_text_in_the_manifest_stays_valid_c(wearable: Wearable, tmp_path: Path) -> None:
    """Labels are the project's own strings: quotes, backslashes, trigraphs, newlines, UTF-8
    and comment terminators must come out as the same bytes, not as broken or altered C."""
    members = read_members(wearable.bundles["vibration"].read_bytes())
    manifest = Manifest.from_json(members["manifest.json"])
    labels = ('say "hi"', "back\\slash", "tri??/graph??=", "two\nlines */ x", "ünïcode ✓")
    hostile = dataclasses.replace(manifest, labels=labels)
    files = render_c_sources(hostile, members["model.tflite"], source="evil */ name\n#define X.edgeops")
    out = tmp_path / "fw"
    out.mkdir()
    for f in files:
        (out / f.name).write_bytes(f.data)
    h = _run_harness(out, members["model.tflite"], tmp_path / "harness")
    assert h["labels"] == [[str(len(labels)), *(label.encode().hex() for label in labels)]]
    # The bundle name only appears reduced to safe characters: it cannot end a comment.
    assert all(b"#define X" not in f.data and b"evil____name__define_X.edgeops" in f.data for f in files)


def test_lineage_runtime_version_is_optional_and_typed(wearable: Wearable) -> None:
    """Bundles built before the field existed still parse (None); a wrong type is refused."""
    from edgeops_core import ManifestError

    raw = json.loads(read_members(wearable.bundles["digits"].read_bytes())["manifest.json"])
    assert isinstance(raw["lineage"]["runtime_version"], str)
    assert Manifest.from_json(json.dumps(raw).encode()).to_dict() == raw
    del raw["lineage"]["runtime_version"]
    old = Manifest.from_json(json.dumps(raw).encode())
    assert old.lineage.runtime_version is None
    readme = next(
        f
        for f in render_c_sources(
            old, read_members(wearable.bundles["digits"].read_bytes())["model.tflite"], source="old.edgeops"
        )
        if f.name == "README.md"
    )
    assert b"does not record the TFLite Micro version" in readme.data
    raw["lineage"]["runtime_version"] = 3
    with pytest.raises(ManifestError, match=r"lineage\.runtime_version"):
        Manifest.from_json(json.dumps(raw).encode())


# -- tasks: the generated self_test.cc, run, on regression and anomaly bundles (issue 12, review H2) --

# The tiny regression and anomaly projects of tests/test_tasks.py (its generators and models),
# built for wearable with fewer epochs and, for the regression, half the training rows.
_TASK_TOMLS = {
    "regression": """
[project]
name = "tiny-regression"
version = "1.0.0"

[task]
kind = "regression"

[model]
entry = "task_model:mlp"

[data]
entry = "task_data:regression"
params = { n_train = 200 }

[train]
epochs = 10
batch_size = 32
learning_rate = 0.01

[quantization]
calibration_samples = 100
""",
    "anomaly": """
[project]
name = "tiny-anomaly"
version = "1.0.0"

[task]
kind = "anomaly"
normal_label = "normal"
target_fpr = 0.02

[model]
entry = "task_model:autoencoder"

[data]
entry = "task_data:anomaly"

[train]
epochs = 10
batch_size = 32
learning_rate = 0.01

[quantization]
calibration_samples = 100
""",
}


@pytest.fixture(scope="module")
def task_bundles(tmp_path_factory: pytest.TempPathFactory) -> Wearable:
    """A wearable regression bundle and a wearable anomaly bundle, built at the same time."""
    home = tmp_path_factory.mktemp("task-home")
    dist = tmp_path_factory.mktemp("task-dist")
    env = {**os.environ, "EDGEOPS_HOME": str(home)}
    procs = {}
    for kind, toml in _TASK_TOMLS.items():
        project = tmp_path_factory.mktemp(kind)
        (project / "task_data.py").write_text(_TASK_DATA)
        (project / "task_model.py").write_text(_TASK_MODEL)
        (project / "edgeops.toml").write_text(toml)
        cmd = [*EDGEOPS, "build", "-t", "wearable", "-p", str(project), "-o", str(dist / kind), "--no-cache", "--json"]
        procs[kind] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bundles = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout + stderr
        bundles[kind] = Path(json.loads(stdout)["bundle"])
    return Wearable(home=home, bundles=bundles)


def _stand_in_tflm(folder: Path) -> Path:
    """Test-only stand-ins for the TFLite Micro headers ``self_test.cc`` and ``model_ops.cc`` include.

    No TFLite Micro source tree is installed, only its Python runtime: these declare just what
    the generated files use, and ``MicroInterpreter::Invoke`` replays the outputs the real
    interpreter gave for each input (``replay.cc``, written per export by :func:`_run_self_test`).
    An input it was not given fails the invocation. The export itself never ships these.
    """
    micro = folder / "tensorflow" / "lite" / "micro"
    schema = folder / "tensorflow" / "lite" / "schema"
    micro.mkdir(parents=True, exist_ok=True)
    schema.mkdir(parents=True, exist_ok=True)
    (micro / "micro_interpreter.h").write_text(
        """#ifndef STAND_IN_MICRO_INTERPRETER_H_
#define STAND_IN_MICRO_INTERPRETER_H_
#include <stddef.h>
#include <stdint.h>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
typedef enum { kTfLiteNoType = 0, kTfLiteFloat32 = 1, kTfLiteUInt8 = 3, kTfLiteInt8 = 9 } TfLiteType;
typedef union { float* f; uint8_t* uint8; int8_t* int8; } TfLitePtrUnion;
typedef struct { TfLiteType type; TfLitePtrUnion data; size_t bytes; } TfLiteTensor;
#define TFLITE_SCHEMA_VERSION 3
namespace tflite {
struct Model {
  uint32_t version() const { return TFLITE_SCHEMA_VERSION; }
};
inline const Model* GetModel(const void* data) { return static_cast<const Model*>(data); }
class MicroInterpreter {
 public:
  template <typename Resolver>
  MicroInterpreter(const Model*, const Resolver&, uint8_t*, size_t) : in_(), out_() {}
  TfLiteStatus AllocateTensors();
  TfLiteTensor* input(size_t i) { return i == 0 ? &in_ : nullptr; }
  TfLiteTensor* output(size_t i) { return i == 0 ? &out_ : nullptr; }
  TfLiteStatus Invoke();
 private:
  TfLiteTensor in_, out_;
};
}  // namespace tflite
#endif
"""
    )
    methods = "\n".join(f"  TfLiteStatus {m}() {{ return kTfLiteOk; }}" for m in sorted(set(OPERATOR_METHODS.values())))
    (micro / "micro_mutable_op_resolver.h").write_text(
        f"""#ifndef STAND_IN_MICRO_MUTABLE_OP_RESOLVER_H_
#define STAND_IN_MICRO_MUTABLE_OP_RESOLVER_H_
#include "tensorflow/lite/micro/micro_interpreter.h"
namespace tflite {{
template <unsigned int N>
class MicroMutableOpResolver {{
 public:
{methods}
}};
}}  // namespace tflite
#endif
"""
    )
    (schema / "schema_generated.h").write_text('#include "tensorflow/lite/micro/micro_interpreter.h"\n')
    return folder


_REPLAY = r"""
#include <stdio.h>
#include <string.h>

#include "model_config.h"
#include "self_test.h"

static const int8_t kInputs[REPLAY_COUNT][EDGEOPS_INPUT_ELEMENTS] = {REPLAY_INPUTS};
static const int8_t kOutputs[REPLAY_COUNT][EDGEOPS_OUTPUT_ELEMENTS] = {REPLAY_OUTPUTS};
static int8_t input_buffer[EDGEOPS_INPUT_ELEMENTS];
static int8_t output_buffer[EDGEOPS_OUTPUT_ELEMENTS];
static int invocations = 0;

TfLiteStatus tflite::MicroInterpreter::AllocateTensors() {
  in_.type = kTfLiteInt8;
  in_.data.int8 = input_buffer;
  in_.bytes = sizeof input_buffer;
  out_.type = kTfLiteInt8;
  out_.data.int8 = output_buffer;
  out_.bytes = sizeof output_buffer;
  return kTfLiteOk;
}

TfLiteStatus tflite::MicroInterpreter::Invoke() {
  ++invocations;
  for (int r = 0; r < REPLAY_COUNT; ++r) {
    if (memcmp(kInputs[r], input_buffer, sizeof input_buffer) == 0) {
      memcpy(output_buffer, kOutputs[r], sizeof output_buffer);
      return kTfLiteOk;
    }
  }
  return kTfLiteError;
}

alignas(16) static uint8_t arena[EDGEOPS_ARENA_BYTES];

int main() {
  const int failed = edgeops_self_test_run(arena, sizeof arena);
  printf("failed %d invocations %d\n", failed, invocations);
#ifdef EDGEOPS_ANOMALY_THRESHOLD
  printf("threshold %.17g\n", static_cast<double>(EDGEOPS_ANOMALY_THRESHOLD));
#endif
  return 0;
}
"""


def _c_rows(rows: np.ndarray) -> str:
    return ", ".join("{" + ", ".join(str(int(v)) for v in row) + "}" for row in rows)


def _tflm_outputs(m: Manifest, model: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The self-test inputs as the device feeds them, and the real TFLite Micro's int8 outputs for them."""
    from tflite_micro.python.tflite_micro import runtime

    fed = export_module.self_test_tensors(m)
    it = runtime.Interpreter.from_bytes(model, arena_size=int(m.metrics["arena_bytes"]))
    outputs = []
    for row in fed:
        it.set_input(np.asarray(row, dtype=np.int8).reshape(m.inputs[0].shape), 0)
        it.invoke()
        outputs.append(it.get_output(0).reshape(-1))
    return np.asarray(fed, dtype=np.int8), np.asarray(outputs, dtype=np.int8)


def _run_self_test(files: dict[str, bytes], replay: tuple[np.ndarray, np.ndarray], work: Path) -> dict[str, str]:
    """Compile the exported ``self_test.cc`` (and the rest) against the stand-in headers and run
    ``edgeops_self_test_run`` over the replayed TFLite Micro outputs.

    Returns:
        Each output line's first word → the rest of the line.
    """
    out = work / "export"
    out.mkdir(parents=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    inputs, outputs = replay
    main = work / "replay.cc"
    main.write_text(
        _REPLAY.replace("REPLAY_COUNT", str(len(inputs)))
        .replace("REPLAY_INPUTS", _c_rows(inputs))
        .replace("REPLAY_OUTPUTS", _c_rows(outputs))
    )
    stand_in = _stand_in_tflm(work / "stand-in")
    sources = [str(main), *(str(out / n) for n in ("self_test.cc", "model_ops.cc", "model_data.cc", "self_test_data.cc"))]
    exe = work / "self_test"
    cmd = [_compiler("g++"), *CXX_FLAGS, "-O1", "-I", str(out), "-I", str(stand_in), *sources, "-o", str(exe)]
    subprocess.run(cmd, check=True)
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(line.split(" ", 1) for line in lines)


def _bundle_parts(wearable: Wearable, kind: str) -> tuple[Manifest, bytes]:
    verified = verify_bundle_file(wearable.bundles[kind], [load_public_key(wearable.home / "keys" / "dev-signing.pub.pem")])
    return verified.manifest, verified.read_model()


def _rendered(m: Manifest, model: bytes) -> dict[str, bytes]:
    return {f.name: f.data for f in render_c_sources(m, model, source="tampered.edgeops")}


def _with_vectors(m: Manifest, vectors: list[SelfTestVector], threshold: float | None = None) -> Manifest:
    task = m.task if threshold is None else dataclasses.replace(m.task, threshold=threshold)
    return dataclasses.replace(m, task=task, self_test=dataclasses.replace(m.self_test, vectors=tuple(vectors)))


@pytest.mark.parametrize("kind", ["vibration", "digits"])
def test_the_generated_self_test_runs_a_classifier(wearable: Wearable, tmp_path: Path, kind: str) -> None:
    """``self_test.cc`` itself, compiled and run: a classifier's vectors pass; a wrong top-1 label fails."""
    m, model = _bundle_parts(wearable, kind)
    out = tmp_path / "fw"
    assert _export(wearable, wearable.bundles[kind], out).returncode == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert b"EDGEOPS_TASK_" not in files["model_config.h"]  # a classifier's files are as before tasks
    replay = _tflm_outputs(m, model)
    ran = _run_self_test(files, replay, tmp_path / "ok")
    assert ran["failed"] == f"0 invocations {len(m.self_test.vectors)}"
    vectors = list(m.self_test.vectors)
    vectors[0] = dataclasses.replace(vectors[0], label=(vectors[0].label + 1) % len(m.labels))
    assert _run_self_test(_rendered(_with_vectors(m, vectors), model), replay, tmp_path / "bad")["failed"].startswith("1 ")


def test_the_generated_self_test_passes_a_regression(task_bundles: Wearable, tmp_path: Path) -> None:
    m, model = _bundle_parts(task_bundles, "regression")
    assert m.task.kind == "regression" and len(m.labels) == 2
    out = tmp_path / "fw"
    proc = _export(task_bundles, task_bundles.bundles["regression"], out)
    assert proc.returncode == 0, proc.stderr
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    config, check = files["model_config.h"].decode(), files["self_test.cc"].decode()
    assert "#define EDGEOPS_TASK_REGRESSION 1\n" in config and "EDGEOPS_TASK_ANOMALY" not in config
    assert "top != edgeops_self_test_label" not in check and "best" not in check  # no argmax: a regression has no class
    assert "one logit per label" not in files["README.md"].decode()
    h = _run_harness(out, model, tmp_path / "harness")  # the C-compatible files still compile as C11 and C++11
    assert [int(row[1]) for row in h["label"]] == [v.label for v in m.self_test.vectors] == [0] * len(m.self_test.vectors)
    replay = _tflm_outputs(m, model)
    # The regression's "top-1" is not always output 0 (label 0): the old argmax check failed here.
    assert any(int(np.argmax(row)) != 0 for row in np.float32([v.expected for v in m.self_test.vectors]))
    assert _run_self_test(files, replay, tmp_path / "ok")["failed"] == f"0 invocations {len(m.self_test.vectors)}"
    # Outputs are still checked within atol.
    vectors = list(m.self_test.vectors)
    v = vectors[1]
    vectors[1] = dataclasses.replace(v, expected=(v.expected[0] + 3 * m.self_test.atol, *v.expected[1:]))
    assert _run_self_test(_rendered(_with_vectors(m, vectors), model), replay, tmp_path / "bad")["failed"].startswith("1 ")


def test_the_generated_self_test_checks_an_anomaly_verdict_as_the_agent_does(task_bundles: Wearable, tmp_path: Path) -> None:
    m, model = _bundle_parts(task_bundles, "anomaly")
    t, atol = m.task.threshold, m.self_test.atol
    assert m.task.kind == "anomaly" and t is not None and m.labels == ("anomaly_score",)
    out = tmp_path / "fw"
    proc = _export(task_bundles, task_bundles.bundles["anomaly"], out)
    assert proc.returncode == 0, proc.stderr
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    config = files["model_config.h"].decode()
    assert "#define EDGEOPS_TASK_ANOMALY 1\n" in config and "EDGEOPS_TASK_REGRESSION" not in config
    assert f"#define EDGEOPS_ANOMALY_TARGET_FPR {m.task.target_fpr!r}\n" in config
    readme = files["README.md"].decode()
    assert "one logit per label" not in readme and "score > `EDGEOPS_ANOMALY_THRESHOLD`" in readme
    vectors = list(m.self_test.vectors)
    assert {v.label for v in vectors} == {0, 1}  # both verdicts are exercised
    h = _run_harness(out, model, tmp_path / "harness")  # the C-compatible files still compile as C11 and C++11
    assert [int(row[1]) for row in h["label"]] == [v.label for v in vectors]
    replay = _tflm_outputs(m, model)
    ran = _run_self_test(files, replay, tmp_path / "ok")
    assert ran["failed"] == f"0 invocations {len(vectors)}"
    # The C float threshold is the manifest's threshold as float32 (a float32 score, kept exact).
    assert float(ran["threshold"]) == float(np.float32(t)) == t

    # An anomalous vector far from the threshold, its expected verdict flipped: the self-test fails.
    far = next(i for i, v in enumerate(vectors) if v.label == 1 and v.expected[0] - t > atol)
    flipped = list(vectors)
    flipped[far] = dataclasses.replace(vectors[far], label=0)
    assert _run_self_test(_rendered(_with_vectors(m, flipped), model), replay, tmp_path / "flipped")["failed"].startswith("1 ")

    # Within atol of the threshold either verdict passes, as on the agent: move the threshold to
    # just above one vector's expected score, relabel every vector by it, then flip that vector.
    near = far
    t_near = float(np.float32(vectors[near].expected[0] + atol / 2))
    relabelled = [dataclasses.replace(v, label=int(v.expected[0] > t_near)) for v in vectors]
    assert relabelled[near].label == 0
    relabelled[near] = dataclasses.replace(relabelled[near], label=1)
    near_m = _with_vectors(m, relabelled, t_near)
    assert _run_self_test(_rendered(near_m, model), replay, tmp_path / "near")["failed"] == f"0 invocations {len(vectors)}"


def test_an_anomaly_threshold_that_is_not_a_float32_is_rounded_to_the_agents_verdict(task_bundles: Wearable) -> None:
    """The agent compares its float32 score with task.threshold as a double; the firmware compares
    floats. The float written is the largest not above the threshold, so both agree on every score."""
    m, model = _bundle_parts(task_bundles, "anomaly")
    t = 0.1  # float32(0.1) is above 0.1: rounding to nearest would call a score of exactly float32(0.1) normal
    config = _rendered(dataclasses.replace(m, task=dataclasses.replace(m.task, threshold=t)), model)["model_config.h"].decode()
    (written,) = re.findall(r"#define EDGEOPS_ANOMALY_THRESHOLD \((\S+)f\)\n", config)
    c_threshold = np.float32(written)
    assert float(c_threshold) < t < float(np.nextafter(c_threshold, np.float32(1), dtype=np.float32))
    up = np.float32(1)
    scores = [np.nextafter(c_threshold, -up, dtype=np.float32), c_threshold, np.float32(t)]
    scores.append(np.nextafter(np.float32(t), up, dtype=np.float32))  # the float32s around the threshold
    assert [bool(s > c_threshold) for s in scores] == [float(s) > t for s in scores] == [False, False, True, True]
    # A threshold no float32 can hold is refused, naming it.
    with pytest.raises(FirmwareExportError, match=r"task\.threshold 1e\+39 is not a finite float32"):
        render_c_sources(dataclasses.replace(m, task=dataclasses.replace(m.task, threshold=1e39)), model, source="x")
