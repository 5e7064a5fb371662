#!/bin/sh
# The CVPR 2025 interactive 3-D challenge container's entry: the evaluator runs `sh predict.sh` in /workspace with one
# case in /workspace/inputs and reads /workspace/outputs/<case>.npz (segs). Each step is a fresh container, so the
# previous step's output is replaced (--overwrite). The SAMMED3D_* variables only serve tests and local runs.
set -e
exec "${PYTHON:-python}" -m sammed3d_jax.cvpr25 predict \
    --inputs "${SAMMED3D_INPUTS:-/workspace/inputs}" \
    --outputs "${SAMMED3D_OUTPUTS:-/workspace/outputs}" \
    --checkpoint "${SAMMED3D_CHECKPOINT:-/opt/sammed3d_jax/checkpoint}" \
    --overwrite "$@"
