#!/usr/bin/env bash
# The GPU check: every GPU figure the README quotes, in one run of about 10 minutes.
#   benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]      (WHEELS_DIR from benchmarks/fetch_wheels.sh, default .wheels)
# Needs a CUDA GPU with torch and transformers; no network. Writes into OUT_DIR:
#   env.txt          GPU, driver, torch/transformers versions
#   bench.json/.log  bench_train.py at batch 64, TOP_K=3, bf16: plain, eager and fast path (+ Liger if installed),
#                    kernel launches, enqueue vs wall, FLOP share, compile warm-up and graphs, memory, max batch
#   e2e.json, e2e/   the script end to end (--train 2 epochs + --test) at the real shapes, eager vs fast path
#   variants.json    trainable parameters, step time and memory of mlp/top-3, qformer/top-3, mlp/LoRA-16
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-.wheels}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python -c "import colorlog, dotenv, peft, liger_kernel" 2>/dev/null && [ -d "$wheels" ]; then
    pip install --quiet --no-index --find-links "$wheels" colorlog python-dotenv peft liger-kernel
fi
if ! python -c "import pycocoevalcap.bleu.bleu" 2>/dev/null && [ -d "$wheels/site" ]; then
    export PYTHONPATH="$PWD/$wheels/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi; python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"; } > "$out/env.txt" 2>&1
python -c "import liger_kernel" 2>/dev/null && liger=--liger || liger=
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
run() {  # name, then the command; its output goes to OUT_DIR/name.log, a failure does not stop the rest
    local name=$1; shift
    echo "[$(date +%T)] $name: $*"
    "$@" > "$out/$name.log" 2>&1 || { echo "[$(date +%T)] $name failed (exit $?), see $out/$name.log"; status=1; }
}
run bench python benchmarks/bench_train.py --device cuda --batch-size 64 --steps 10 --warmup 3 --max-batch $liger \
    --workdir "$work" --json "$out/bench.json"
run e2e python benchmarks/bench_train.py --device cuda --batch-size 64 --e2e --workdir "$work" --out "$out" \
    --json "$out/e2e.json"
run variants python benchmarks/bench_train.py --device cuda --batch-size 64 --steps 5 --warmup 2 --variants \
    --workdir "$work" --json "$out/variants.json"
echo "[$(date +%T)] done: $out"
exit $status
