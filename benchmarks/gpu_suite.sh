#!/usr/bin/env bash
# Every accelerator measurement of the project in one command (GPU time is lent in short sessions):
#   OUT=gpu_results bash benchmarks/gpu_suite.sh
# 1. full-model inference (encode + one decode + upsampling to 128³), vit_b_ori, bfloat16, batch 1 and 8;
# 2. the train step, vit_b_ori 128³, batch 12, 1 and 11 clicks, bfloat16 (cuDNN attention, XLA if cuDNN refuses).
# Logs and JSON go to $OUT; each part has its own time limit so a slow compile cannot swallow the rest.
set -u -o pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  2>&1 | tee -a "$OUT/gpu.txt"
timeout "${INFER_TIMEOUT:-110}" $PY benchmarks/encoder.py --full --batch 1 8 --dtype bfloat16 --no-naive \
  --repeats 30 --json "$OUT/inference.json" 2>&1 | grep -v "^W0000\|^I0000" | tee "$OUT/inference.log"
for clicks in 1 11; do
  timeout "${TRAIN_TIMEOUT:-120}" $PY benchmarks/train_step.py --mode gpu --clicks "$clicks" \
    --json "$OUT/train_step_$clicks.json" 2>&1 | tee "$OUT/train_step_$clicks.log" \
  || timeout "${TRAIN_TIMEOUT:-120}" $PY benchmarks/train_step.py --mode gpu --clicks "$clicks" --attention xla \
    --json "$OUT/train_step_${clicks}_xla.json" 2>&1 | tee "$OUT/train_step_${clicks}_xla.log"
done
