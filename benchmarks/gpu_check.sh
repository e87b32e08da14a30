#!/usr/bin/env bash
# The GPU checks in one run (about 8 minutes on one GPU), each step under a timeout, every result
# as JSON or a log under $OUT (default ./gpu_out):
#   0. tests/test_engine_fuzz.py on the GPU (ARPO_REF_TEST_DEVICE=cuda): every decoding path
#      against fresh forwards, and random sequences through the compiled step (CUDA graphs);
#   1. bench_generation.py --arch qwen2.5-0.5b: ms per decoding step, eager and compiled, next to
#      the bandwidth floor (B = 8 and 64, 512-token history);
#      then the same eager step with flex attention (B = 64): is it equal and faster than SDPA?
#   2. gpu_train_step.py: one RL step of configs/small/qwen2.5-0.5b_reasoning_paper.yaml.
# A step that fails or times out is recorded (its log and exit status) and the next one still runs.
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_check.sh    # on a CPU: the same steps at tiny sizes (seconds)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SMOKE_ARGS=()
# On a CPU the flex step is expected to fail clearly (flex attention is CUDA only here).
[ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS=(--smoke)

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, exit status to $OUT/NAME.rc
    local name=$1 seconds=$2; shift 2
    echo "== $name (timeout ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$OUT/$name.rc"
    echo "   exit $rc after $((SECONDS - start))s"
    tail -n 15 "$OUT/$name.log"
}

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")' | tee "$OUT/device.txt"
FUZZ_DEVICE=cuda FUZZ_ARGS=()
[ "${SMOKE:-0}" = 1 ] && FUZZ_DEVICE=cpu FUZZ_ARGS=(-k "qwen2 and eager")
ARPO_REF_TEST_DEVICE=$FUZZ_DEVICE run engine_fuzz 150 "$PY" -m pytest tests/test_engine_fuzz.py -q -s \
    -p no:cacheprovider "${FUZZ_ARGS[@]}"
run decode_step 150 "$PY" benchmarks/bench_generation.py --arch qwen2.5-0.5b --rows 8 64 --context 512 \
    --steps 32 --repeats 3 --compile yes --out "$OUT/decode_step.json" "${SMOKE_ARGS[@]}"
run decode_step_flex 45 "$PY" benchmarks/bench_generation.py --arch qwen2.5-0.5b --rows 64 --context 512 \
    --steps 32 --repeats 2 --compile no --attention flex_attention --out "$OUT/decode_step_flex.json" "${SMOKE_ARGS[@]}"
# TORCH_LOGS=recompiles: the log names every recompilation of the decoding step and its reason.
TORCH_LOGS=recompiles run train_step 180 "$PY" benchmarks/gpu_train_step.py --config configs/small/qwen2.5-0.5b_reasoning_paper.yaml \
    --dump-after 160 --json "$OUT/train_step.json" "${SMOKE_ARGS[@]}"
echo "results in $OUT:"; ls -l "$OUT"
