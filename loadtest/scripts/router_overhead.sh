#!/usr/bin/env bash
# Router overhead at scale, one command: N instant HTTP backends (instant_backend.py) measured
# directly and through vllm-router and sglang-router (round_robin, cache_aware), then N instant
# Tandem workers (instant_worker.py: N/2 prefill + N/2 decode, the real gRPC protocol, no engine,
# no transfer) measured directly (tandem-direct: a decode worker's Generate, one hop) and through
# Tandem's router (each policy), all with the same load: 64-token prompts, 1 output token,
# concurrency 1 (latency) and C (the ceiling).
# Over HTTP the prompts go to /v1/chat/completions as text: sglang-router's /v1/completions
# takes a string or strings, not token ids (422 "data did not match any variant of untagged enum
# StringOrArray").
#
#   loadtest/scripts/router_overhead.sh [OUT] [N] [C] [DURATION_S] [PROCESSES]
#
# PROCESSES > 1 sends each point from up to that many client processes at once, merged into one
# run (parallel_load.py): one Python client process tops out below these servers' ceilings.
#
# Routers come from their own venvs (VLLM_ROUTER_VENV, SGLANG_ROUTER_VENV; default
# /work/venvs/{vllm,sglang}-router); one that is missing is skipped. Needs PYTHONPATH at the
# repository root. Writes OUT/<name>/run.json ... and OUT/compare/compare.md.
set -euo pipefail
OUT=${1:-loadtest/results/router-overhead}
N=${2:-32}
C=${3:-32}
DURATION=${4:-10}
PROCS=${5:-1}
VR=${VLLM_ROUTER_VENV:-/work/venvs/vllm-router}
SR=${SGLANG_ROUTER_VENV:-/work/venvs/sglang-router}
MODEL=${MODEL:-$(python3 -c "from engine.default_model import smollm2_dir; print(smollm2_dir())")}
BASE=19100
RPORT=19090
SHAPE=(--input-len 64 --output-len 1 --tokenizer "$MODEL" --duration "$DURATION"
       --max-requests 20000 --no-progress)
LOAD=("${SHAPE[@]}" --concurrency 1 "$C")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_http() {  # URL: up to 60 s for a 200
  for _ in $(seq 600); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "no answer from $1" >&2; return 1
}
http_run() {  # NAME URL
  local target=(--target openai --endpoint chat --url "$2" --model instant)
  if [ "$PROCS" -gt 1 ]; then
    python3 loadtest/scripts/parallel_load.py --processes "$PROCS" --concurrency 1 "$C" \
        --name "$1" --out "$OUT/$1" -- "${target[@]}" "${SHAPE[@]}"
  else
    python3 -m loadtest run "${target[@]}" "${LOAD[@]}" --name "$1" --out "$OUT/$1"
  fi
  runs+=("$OUT/$1/run.json")
}
runs=()
urls=()
for i in $(seq 1 "$N"); do
  python3 loadtest/scripts/instant_backend.py --port $((BASE + i)) & pids+=($!)
  urls+=("http://127.0.0.1:$((BASE + i))")
done
for u in "${urls[@]}"; do wait_http "$u/health"; done
http_run direct "${urls[0]}"
for policy in round_robin cache_aware; do
  if [ -x "$VR/bin/vllm-router" ]; then
    "$VR/bin/vllm-router" --host 127.0.0.1 --port $RPORT --worker-urls "${urls[@]}" \
        --policy $policy --prometheus-port 19091 --log-level warning & rp=$!; pids+=($rp)
    wait_http "http://127.0.0.1:$RPORT/v1/models"
    http_run "vllm-router-$policy" "http://127.0.0.1:$RPORT"
    kill $rp; wait $rp 2>/dev/null || true
  fi
  if [ -x "$SR/bin/python" ]; then
    "$SR/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port $RPORT \
        --worker-urls "${urls[@]}" --policy $policy --prometheus-port 19092 \
        --log-level warn & rp=$!; pids+=($rp)
    wait_http "http://127.0.0.1:$RPORT/v1/models"
    http_run "sglang-router-$policy" "http://127.0.0.1:$RPORT"
    kill $rp; wait $rp 2>/dev/null || true
  fi
done
cleanup; pids=()
python3 loadtest/scripts/cluster_bench.py --model "$MODEL" --engine instant --direct \
    --prefill $((N / 2)) --decode $((N / 2)) --policies round_robin least_loaded kv_aware \
    --label tandem- --processes "$PROCS" --out "$OUT" -- "${LOAD[@]}"
for run in direct round_robin least_loaded kv_aware; do runs+=("$OUT/tandem-$run/run.json"); done
python3 -m loadtest compare "${runs[@]}" --out "$OUT/compare"
