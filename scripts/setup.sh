#!/usr/bin/env bash
# Set up edgeops in ./.venv on a fresh machine.
#   scripts/setup.sh         host toolchain (edgeops build/verify)
#   scripts/setup.sh --dev   plus test and lint tools, Mosquitto for the MQTT tests,
#                            Chromium for the report rendering test, systemd-analyze
#                            for the agent's unit file test and gcc/g++ (with binutils' nm)
#                            for the firmware export test, PostgreSQL's server for the
#                            console store's tests
# Safe to re-run: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "usage: scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done

say() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing mosquitto (Debian packages)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  else
    say "warning: mosquitto is missing and cannot be installed here (need root and apt-get); MQTT tests will fail"
  fi
fi

if [ "$dev" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (Debian packages; renders the build report in a test)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    say "warning: chromium is missing and cannot be installed here; the report rendering test will fail"
  fi
fi

if [ "$dev" = 1 ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing systemd (Debian packages; systemd-analyze verifies the agent's unit in a test)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
  else
    say "warning: systemd-analyze is missing and cannot be installed here; the unit file test will be skipped"
  fi
fi

if [ "$dev" = 1 ] && ! { command -v gcc && command -v g++ && command -v nm; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing gcc and g++ (Debian packages; the firmware export test compiles the generated C)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc g++ binutils libc6-dev >/dev/null
  else
    say "warning: gcc/g++ are missing and cannot be installed here; the firmware export test will fail"
  fi
fi

if [ "$dev" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing postgresql (Debian packages; the fleet console's store is tested on PostgreSQL too)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  else
    say "warning: PostgreSQL is missing and cannot be installed here; the console store's PostgreSQL tests will be skipped"
  fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  say "need Python >= 3.11, found $("$PY" --version 2>&1)"; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true

extras=host,ort,litert,tflm,console
[ "$dev" = 1 ] && extras=$extras,dev
say "installing edgeops[$extras] (torch pinned to the CPU build)"
# torch first, from the exact pin, so nothing else can choose another build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]" 2>&1 | grep -v "is ignored" >&2 || true
# litert-torch cannot be resolved together with model-signing (see the file's comment):
# install it on its own, then put back what model-signing needs.
if ! .venv/bin/python -c 'import importlib.metadata as m; assert m.version("litert-torch") == "0.10.0"' 2>/dev/null; then
  say "installing litert-torch (TFLite export for mobile and wearable)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-litert-torch.txt 2>&1 \
    | grep -v -e "is ignored" -e "dependency resolver" -e "incompatible" -e "has requirement" >&2 || true
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "pydantic>=2.12" "typing-extensions>=4.14.1" 2>&1 \
  | grep -v -e "is ignored" -e "dependency resolver" -e "incompatible" -e "has requirement" >&2 || true
.venv/bin/python -c 'import torch, onnxruntime, model_signing, litert_torch, ai_edge_litert, tflite_micro, edgeops_toolchain' \
  || { say "installation incomplete: see the pip output above"; exit 1; }
say "ready: .venv/bin/edgeops"
