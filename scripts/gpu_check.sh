#!/usr/bin/env bash
# The checks for a machine with an NVIDIA GPU, in one go (under 10 minutes), ending with one
# summary: pass/fail per step, its time and its key figures.
#
#   bash scripts/gpu_check.sh [--no-setup] [--vllm-python PATH]
#
#   setup        scripts/setup.sh --cuda (CUDA torch 2.13.0; the nixl-cu12/ucxx-cu12 wheels)
#   cuda         torch sees the GPU
#   kernels      the Triton kernels, compiled, against the torch/float64 references
#                (float32, bfloat16, float16; tests/engine/kernels)
#   engine       the model and the engine with the Triton kernels on CUDA against transformers,
#                the warm-up, the layer-group readiness events
#   kv           KV blocks VRAM -> VRAM between two processes, NIXL and ucxx (tests/kv_transfer)
#   bench        the engine bench on CUDA (with vLLM when --vllm-python is given)
#
# The pytest steps are the CI tests run with TANDEM_TEST_DEVICE=cuda. Without a GPU it stops
# at once, before installing anything. The whole check keeps to a budget of
# $TANDEM_GPU_CHECK_BUDGET_S seconds (default 570, under 10 minutes): a step gets at most what
# is left of it, and a step with nothing left is skipped (and counts as a failure).
set -uo pipefail
cd "$(dirname "$0")/.."

SETUP=1
VLLM_PYTHON=""
while [ $# -gt 0 ]; do
    case "$1" in
        --no-setup) SETUP=0 ;;
        --vllm-python) VLLM_PYTHON="${2:?--vllm-python needs a path}"; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi missing or lists no GPU);" \
         "nothing was installed or run" >&2
    exit 1
fi

export UCX_WARN_UNUSED_ENV_VARS=n
export TANDEM_TEST_DEVICE=cuda
LOG_DIR="${TANDEM_GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$LOG_DIR"
SUMMARY=()
FAILED=0
BUDGET_S="${TANDEM_GPU_CHECK_BUDGET_S:-570}"
CHECK_STARTED=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs it, records pass/fail and time
    local name="$1" limit="$2"; shift 2
    local started rc figures left
    started=$(date +%s)
    left=$(( BUDGET_S - (started - CHECK_STARTED) ))
    if [ "$left" -le 0 ]; then
        echo "== $name: skipped, the $BUDGET_S s budget is spent"
        SUMMARY+=("SKIP  $name  the $BUDGET_S s budget is spent")
        FAILED=1
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name: $*"
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    rc=$?
    figures=$(grep -E "passed|failed|error|tok/s|GB/s" "$LOG_DIR/$name.log" | tail -n 3 | tr '\n' ' ')
    if [ $rc -eq 0 ]; then
        SUMMARY+=("PASS  $name  $(( $(date +%s) - started )) s  $figures")
    else
        [ $rc -eq 124 ] && figures="timed out after $limit s; $figures"
        SUMMARY+=("FAIL  $name  $(( $(date +%s) - started )) s  rc=$rc  $figures")
        FAILED=1
    fi
    return $rc
}

nvidia-smi -L
if [ "$SETUP" = "1" ]; then
    step setup 300 bash scripts/setup.sh --cuda || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
fi
step cuda 60 python3 -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" \
    || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
step kernels 180 python3 -m pytest -q tests/engine/kernels
step engine 180 python3 -m pytest -q tests/engine/test_triton_in_model.py \
    tests/engine/test_warmup.py tests/engine/test_layer_ready.py tests/engine/model/test_llama.py
step kv 240 python3 -m pytest -q tests/kv_transfer/test_roundtrip.py \
    tests/kv_transfer/test_buffers.py tests/kv_transfer/test_handshake.py
bench=(python3 -m engine.bench --repeats 1 --device cuda)
[ -n "$VLLM_PYTHON" ] && bench+=(--vllm-python "$VLLM_PYTHON")
step bench 300 "${bench[@]}"

echo
echo "gpu_check summary (logs in $LOG_DIR):"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
