#!/usr/bin/env bash
# Set up edgeops in ./.venv on a fresh machine.
#   scripts/setup.sh         host toolchain (edgeops build/verify)
#   scripts/setup.sh --dev   plus test and lint tools, and Mosquitto for the MQTT tests
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

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  say "need Python >= 3.11, found $("$PY" --version 2>&1)"; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true

extras=host
[ "$dev" = 1 ] && extras=host,dev
say "installing edgeops[$extras] (torch pinned to the CPU build)"
# torch first, from the exact pin, so nothing else can choose another build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]" 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -c 'import torch, onnxruntime, model_signing, edgeops_toolchain' \
  || { say "installation incomplete: see the pip output above"; exit 1; }
say "ready: .venv/bin/edgeops"
