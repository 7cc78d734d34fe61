#!/usr/bin/env bash
# Prepare, on a machine WITH network, what benchmarks/gpu_check.sh needs on a GPU machine without it.
#   bash benchmarks/fetch_wheels.sh PYVER [DIR]     PYVER: the GPU machine's Python (`python3 --version` there),
#                                                    e.g. 3.12; DIR: default .wheels (git-ignored), carry it there
# The GPU machine is assumed to have torch (CUDA) and transformers. Beyond them the check needs the wheels
# below, pinned to the versions it was tested with (torch 2.13, transformers 5.24; liger-kernel, CUDA only,
# has not run here: the release current when this was written), each fetched on its own so that one without
# a wheel for PYVER leaves the others; and pycocoevalcap's Python scorers (BLEU, ROUGE-L, CIDEr-D) WITHOUT
# its ~100 MB of Java jars (no Java there: METEOR is reported missing, PTB tokenization falls back to
# Python). QLORA=1 would also need bitsandbytes: not part of the check. W&B is not needed: the check runs
# with WANDB_MODE=disabled, which never imports it.
set -uo pipefail
pyver=${1:?usage: bash benchmarks/fetch_wheels.sh PYVER [DIR]   (PYVER: the GPU machine\'s Python, e.g. 3.12)}
if [[ ! $pyver =~ ^3\.[0-9]+$ ]]; then
    echo "PYVER must look like 3.12 (the GPU machine's python3 --version), not '$pyver'" >&2
    exit 2
fi
dir=${2:-.wheels}
wheels=(colorlog==6.12.0 python-dotenv==1.2.2 pillow==13.0.0 pyyaml==6.0.3 psutil==7.2.2 accelerate==1.15.0
        peft==0.21.2 liger-kernel==0.8.5 pycocoevalcap==1.2)
mkdir -p "$dir"
missing=()
for wheel in "${wheels[@]}"; do
    pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -d "$dir" "$wheel" || missing+=("$wheel")
done
scorers=$(ls "$dir"/pycocoevalcap-*.whl 2>/dev/null | head -1)
if [ -n "$scorers" ]; then
    rm -rf "$dir/site" && mkdir -p "$dir/site"
    python3 - "$scorers" "$dir/site" <<'PY'
import sys, zipfile
wheel, site = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:  # the scorers' .py files only, no jars, no data
    for name in z.namelist():
        if name.startswith("pycocoevalcap/") and name.endswith(".py"):
            z.extract(name, site)
PY
    rm "$scorers"
fi
du -sh "$dir"
if [ ${#missing[@]} -gt 0 ]; then
    echo "no wheel for Python $pyver: ${missing[*]} (the check goes on without them)" >&2
    exit 1
fi
echo "ready: carry $dir to the GPU machine, then: bash benchmarks/gpu_check.sh OUT_DIR $dir"
