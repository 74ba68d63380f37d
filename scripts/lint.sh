#!/usr/bin/env bash
# Static checks in one command: ruff (lint + format check) and mypy --strict.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check agent toolchain firmware-sim tests bench examples
.venv/bin/ruff format --check agent toolchain firmware-sim tests bench examples
.venv/bin/mypy
