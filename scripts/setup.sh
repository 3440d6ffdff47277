#!/usr/bin/env bash
# Installs everything Tandem needs on a fresh Debian machine: system packages, then torch
# (pinned, before anything that depends on it), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    if ! command -v redis-server >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    fi
fi

PIP="python3 -m pip"
# torch first: a CPU wheel of 2.13.0 lies on local disk; an unpinned torch pulls a CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
