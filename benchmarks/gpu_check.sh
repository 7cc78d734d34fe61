#!/usr/bin/env bash
# The GPU check: the GPU figures the README quotes, in one run that fits an 8-minute slot.
#   bash benchmarks/gpu_check.sh [--full | --tiny] OUT_DIR [WHEELS_DIR]   (WHEELS_DIR: benchmarks/fetch_wheels.sh)
# Needs a CUDA GPU with torch and transformers, no network; what else is missing is installed from WHEELS_DIR,
# one wheel per pip call. Phases run in order of importance, each in its own process under a time limit
# taken from what is left of the budget, each writing OUT_DIR/PHASE.json section by section as it measures
# and OUT_DIR/PHASE.log; a phase that runs out of time keeps what it measured and the next one starts.
# OUT_DIR/phases.json: the status, exit code and seconds of every phase.
#   bench     batch 64, TOP_K=3, bf16: plain, eager, fast path (COMPILE=1), fast path + CUDA graphs (COMPILE=max):
#             samples/s, launches per step, enqueue vs wall, useful-FLOP share, warm-up of every shape, memory,
#             equality with eager over two accumulated micro-batches; --caption latency at batch 1 and 32; targets;
#             the GPU and the versions (nvidia-smi.txt beside)
#   e2e       the script itself: --train (1 epoch, 300 images) and --test on the fast path
#   compile   warm-up of one training shape, whole decoder stack (as before) vs one block at a time, empty caches
#   liger     eager and fast path with LIGER=1, alone in its process (if liger-kernel imports)
# --full, for a second slot, instead: max batch on a 24 GiB card, the variants (mlp/top-3, qformer/top-3,
#   mlp/LoRA-16), --train/--test eager vs fast vs max (2 epochs, 600 images), the whole stack with a dynamic length.
# --tiny: the phases of both on CPU at toy widths (but liger and max batch: CUDA only), torch.compile with
#   aot_eager; the test suite runs it, so the check's code runs on every commit; its figures mean nothing.
set -uo pipefail
mode=default
case "${1:-}" in --full | --tiny) mode=${1#--}; shift ;; esac
out=${1:?usage: bash benchmarks/gpu_check.sh [--full | --tiny] OUT_DIR [WHEELS_DIR]}
wheels=$(realpath -m "${2:-.wheels}")
mkdir -p "$out" && out=$(realpath "$out")
cd "$(dirname "$0")/.."
py=$(command -v python3 || command -v python)
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS
# seconds for everything, installs included; a phase past it is stopped (TERM, then KILL 20 s later)
budget=${GPU_CHECK_SECONDS:-$([ "$mode" = full ] && echo 570 || echo 450)}
if [ "$mode" = tiny ]; then
    device=(--device cpu --tiny) batch=(--batch-size 4 --eval-batch-size 8) steps=(--steps 2 --warmup 1)
    small=(--images 4 --gen-images 2 --loop-images 1 --max-new-tokens 2 --fast) variant_steps=(--steps 1 --warmup 1)
    e2e=(--e2e-images 12 --e2e-modes eager --max-new-tokens 2) budget=${GPU_CHECK_SECONDS:-3600}
else
    device=(--device cuda) batch=(--batch-size 64 --eval-batch-size 64) steps=(--steps 10 --warmup 3)
    small=() variant_steps=(--steps 5 --warmup 2) e2e=(--e2e-images 300 --e2e-modes fast)
fi

# What the script and the benchmark need beyond torch and transformers (module:wheel).
for need in colorlog:colorlog dotenv:python-dotenv PIL:pillow yaml:pyyaml psutil:psutil accelerate:accelerate \
            peft:peft liger_kernel:liger-kernel; do
    if ! "$py" -c "import ${need%%:*}" 2>/dev/null && [ -d "$wheels" ]; then
        "$py" -m pip install --quiet --no-index --find-links "$wheels" "${need#*:}" >> "$out/pip.log" 2>&1 \
            || echo "could not install ${need#*:} (see $out/pip.log); going on without it"
    fi
done
if ! "$py" -c "import pycocoevalcap.bleu.bleu" 2>/dev/null && [ -d "$wheels/site" ]; then
    export PYTHONPATH="$wheels/site${PYTHONPATH:+:$PYTHONPATH}"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
phases=() failures=0
record() {  # name, status, exit code, seconds: rewrites phases.json
    phases+=("\"$1\": {\"status\": \"$2\", \"exit\": $3, \"seconds\": $4}")
    (IFS=,; printf '{%s}\n' "${phases[*]}") > "$out/phases.json"
}
phase() {  # name, time cap in seconds, then bench_train.py's arguments
    local name=$1 cap=$2 left=$((budget - (SECONDS - started))) t0=$SECONDS rc status
    shift 2
    if [ "$left" -lt 30 ]; then
        echo "[$(date +%T)] $name: skipped, the time budget is spent"; record "$name" skipped null 0; return
    fi
    if [ "$mode" = tiny ] || [ "$cap" -gt "$left" ]; then  # toy runs on a busy CPU: only the budget limits them
        cap=$left
    fi
    echo "[$(date +%T)] $name (at most $cap s)"
    timeout --kill-after=20 "$cap" "$py" benchmarks/bench_train.py "$@" --workdir "$work" --json "$out/$name.json" \
        > "$out/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        3) status="targets missed" ;;
        124 | 137) status="timed out" failures=$((failures + 1)) ;;
        *) status=failed failures=$((failures + 1)) ;;
    esac
    echo "[$(date +%T)] $name: $status after $((SECONDS - t0)) s (see $out/$name.log)"
    record "$name" "$status" "$rc" $((SECONDS - t0))
}

if [ "$mode" != tiny ] && ! "$py" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "no CUDA GPU visible: nothing to measure (bash benchmarks/gpu_check.sh --tiny OUT_DIR checks the check on CPU)"
    exit 2
fi
[ "$mode" != tiny ] && nvidia-smi > "$out/nvidia-smi.txt" 2>&1

if [ "$mode" != full ]; then
    phase bench 300 "${device[@]}" "${batch[@]}" "${steps[@]}" "${small[@]}" --check
    phase e2e 150 "${device[@]}" "${batch[@]}" --e2e --e2e-epochs 1 "${e2e[@]}" --out "$out"
    phase compile 200 "${device[@]}" "${batch[@]}" --compile-strategies whole-stack,regional
    if [ "$mode" != tiny ] && "$py" -c "import liger_kernel" 2>/dev/null; then
        phase liger 150 "${device[@]}" "${batch[@]}" "${steps[@]}" --liger --check
    fi
fi
if [ "$mode" != default ]; then
    [ "$mode" = full ] && phase max_batch 200 "${device[@]}" "${batch[@]}" --max-batch
    phase variants 150 "${device[@]}" "${batch[@]}" "${variant_steps[@]}" --variants
    [ "$mode" = full ] && phase e2e_long 250 "${device[@]}" "${batch[@]}" --e2e --e2e-images 600 --e2e-epochs 2 \
        --e2e-modes eager,fast,max --out "$out/long"
    phase compile_dynamic 150 "${device[@]}" "${batch[@]}" --compile-strategies whole-stack-dynamic
fi
echo "[$(date +%T)] done in $((SECONDS - started)) s, $failures phase(s) failed or timed out: $out (see phases.json)"
[ "$failures" -eq 0 ]
