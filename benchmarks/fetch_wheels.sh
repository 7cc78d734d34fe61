#!/usr/bin/env bash
# Prepare, on a machine WITH network, what benchmarks/gpu_check.sh needs on a GPU machine without it.
#   benchmarks/fetch_wheels.sh [DIR]     (default .wheels, git-ignored; carry it to the GPU machine)
# The GPU machine is assumed to have torch and transformers. What the script needs beyond them:
# colorlog, python-dotenv, peft (TUNING=lora, in the variant costs) and liger-kernel (LIGER=1) as
# wheels, and pycocoevalcap's Python scorers (BLEU, ROUGE-L, CIDEr-D)
# WITHOUT its ~100 MB of Java jars (no Java there: METEOR is reported missing, PTB tokenization falls
# back to Python). QLORA=1 would also need bitsandbytes (43 MB, --platform manylinux_2_24_x86_64): not
# part of the check. W&B is not needed: the checks run with WANDB_MODE=disabled, which never imports it.
set -euo pipefail
dir=${1:-.wheels}
py=${PYTHON_VERSION:-3.12}
mkdir -p "$dir"
pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --platform manylinux2014_x86_64 \
    --platform any -d "$dir" colorlog python-dotenv peft accelerate psutil pyyaml liger-kernel pycocoevalcap
wheel=$(ls "$dir"/pycocoevalcap-*.whl)
rm -rf "$dir/site" && mkdir -p "$dir/site"
python - "$wheel" "$dir/site" <<'PY'
import sys, zipfile
wheel, site = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:  # the scorers' .py files only, no jars, no data
    for name in z.namelist():
        if name.startswith("pycocoevalcap/") and name.endswith(".py"):
            z.extract(name, site)
PY
rm "$wheel"
du -sh "$dir"
echo "ready: carry $dir to the GPU machine; benchmarks/gpu_check.sh OUT_DIR $dir"
