#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), then runs lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export UCX_WARN_UNUSED_ENV_VARS=n
python3 -m ruff check .
python3 -m mypy .
python3 -m pytest -q "$@"
