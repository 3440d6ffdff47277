#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), then starts a local cluster (redis, a prefill and a
# decode worker, the router) serving SmolLM2-135M-Instruct (converted at set-up), asks it a few
# chat questions, prints the answers and keeps serving until Ctrl-C. Extra arguments go to
# `tandem up` (e.g. --prefill 2 --decode 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export UCX_WARN_UNUSED_ENV_VARS=n
exec tandem up --demo "$@"
