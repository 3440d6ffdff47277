#!/usr/bin/env bash
# Installs everything Tandem needs on a fresh Debian machine: system packages, then torch
# (pinned, before anything that depends on it), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the prefix index and registry; prometheus + promtool: the observability tests.
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "setup: please install ${need[*]} (Debian/Ubuntu: apt-get install ${need[*]})" >&2
        exit 1
    fi
fi

PIP="python3 -m pip"
# torch first: a CPU wheel of 2.13.0 lies on local disk; an unpinned torch pulls a CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
