#!/usr/bin/env bash
# Issue 4's GPU checks, for a machine with CUDA (run by hand; CI has no GPU): the gpu-marked tests, then
# scripts/bench.py in fp16 for each architecture (and bf16 for BERT) against sentence-transformers on the
# same GPU, then a profile of one encode. Results go to $OUT (default /tmp/minisbert-gpu). RUNS picks the
# benchmark runs ("model:dtype ..."), NO_PROFILE=1 skips the profile, N sets the number of texts.
#
#     bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minisbert-gpu}
N=${N:-4096}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
$PY -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'sentence-transformers', st.__version__, torch.cuda.get_device_name())"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_fast.py 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -15
RUNS=${RUNS:-"random-bert:float16 random-deberta:float16 random-roberta:float16 random-bert:bfloat16"}
for run in $RUNS; do
    set -- ${run/:/ }
    $PY scripts/bench.py --model "$1" --device cuda --dtype "$2" --n "$N" --repeats 5 --no-onnx \
        --json "$OUT/bench-$1-$2.json" 2>&1 | tee -a "$OUT/bench.txt" | tail -8
done
[ -n "${NO_PROFILE:-}" ] && exit 0
$PY scripts/profile_encode.py --model random-bert --device cuda --dtype float16 --n 2048 --st --rows 25 \
    > "$OUT/profile-bert-fp16.txt" 2>&1
grep "^==" "$OUT/profile-bert-fp16.txt"
