#!/usr/bin/env bash
# Every accelerator measurement of the project in one command, within SUITE_BUDGET seconds (default 470, compilation
# included), written to one folder. GPU time is lent in short sessions: run this before anything else touches the
# device.
#
#   1. compare:   PyTorch (MedIM) vs JAX in GPU mode (benchmarks/compare_pytorch.py): float32 parity, encode and
#                 inference at batch 1 and 8 (fp32; our bf16 vs AMP bf16/fp16; torch.compile at batch 1), training
#                 micro-batch at batch 12 with 1 and 11 clicks (AMP fp16 + GradScaler vs our bf16)
#   2. inference: full-model inference, vit_b_ori, bf16, batch 1 and 8 (benchmarks/encoder.py --full)
#   3. train:     the train step, vit_b_ori 128³, batch 12, 1 and 11 clicks, bf16 (benchmarks/train_step.py --mode gpu;
#                 retried with XLA attention if cuDNN refuses)
#   4. pipeline:  the Grain training pipeline (benchmarks/pipeline.py)
#   5. scaling:   the scaling sweep's GPU mode (benchmarks/scaling.py --mode gpu), if that script exists
#   6. tests:     the GPU tests (python -m pytest -m gpu -q tests)
# Each part has its own time limit (PART_LIMIT_<NAME> overrides it) and the suite's deadline cuts the later ones, so
# one slow compile cannot swallow the rest. Parts share JAX's persistent compilation cache (same program, one
# compile). The last lines printed are a summary: each part's status and time, then the comparison table.
#
# The GPU machine (Python 3.12, jax, flax, optax, orbax, torch; no network) lacks grain, nibabel, ml-collections,
# medim and a few small packages. Fetch their wheels once on a machine with the package registry:
#   bash benchmarks/gpu_suite.sh --prepare-wheels         # writes .whl/ (gitignored, about 9 MiB)
# then, from the repository root, the device call is
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=540)
# The suite installs the wheels into /tmp/site itself (no-index, no-deps) and writes to $OUT (the device tool's
# output folder; gpu_results when unset) at most three files: suite.log (everything printed), results.json (every
# part's JSON, merged) and parts.tar.gz (each part's log and JSON).
#
# Dry run on a CPU (tiny settings, proves every command line; a few minutes):
#   SUITE_DRY=1 PYTHON=/path/to/venv/bin/python OUT=/tmp/suite bash benchmarks/gpu_suite.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
WHEELS="grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 nibabel==5.4.2 ml-collections==1.1.0 beartype==0.23.1
medim==0.1.2 appdirs==1.4.4"
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare-wheels" ]; then
  mkdir -p .whl
  # shellcheck disable=SC2086
  exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
fi

DRY=${SUITE_DRY:-0}
OUT=${OUT:-gpu_results}
WORK=$(mktemp -d /tmp/gpu_suite.XXXXXX)
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${SUITE_BUDGET:-470}))
SUMMARY="$WORK/summary.txt"
exec > >(tee "$OUT/suite.log") 2>&1

export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/sammed3d_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no .whl/ folder: run 'bash benchmarks/gpu_suite.sh --prepare-wheels' first and carry .whl"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

# part NAME LIMIT_SECONDS COMMAND...: runs COMMAND with the smaller of its limit and the time left; logs to $WORK.
part() {
  local name=$1 limit=$2
  shift 2
  local var="PART_LIMIT_${name//-/_}"
  limit=${!var:-$limit}
  local left=$((DEADLINE - $(date +%s) - 5))
  if [ "$left" -lt 20 ]; then
    printf '%-14s skipped (suite budget spent)\n' "$name" >>"$SUMMARY"
    echo "=== $name: skipped, the suite's budget is spent"
    return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v --line-buffered '^[WI][0-9]\{4\} ' | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  local status="ok"
  [ "$rc" -ne 0 ] && status="exit $rc"
  [ "$name" = tests ] && [ "$rc" -eq 5 ] && status="no GPU tests found"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMEOUT after $limit s"
  printf '%-14s %-24s %4d s\n' "$name" "$status" "$(($(date +%s) - t0))" >>"$SUMMARY"
  return "$rc"
}

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$WORK/gpu.txt"
$PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), jax.devices())" 2>&1 \
  | grep -v '^[WI][0-9]\{4\} ' | tee -a "$WORK/gpu.txt"
if [ "$DRY" != 1 ] && ! $PY -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" 2>/dev/null; then
  echo "jax sees no GPU: stopping before spending the lease"
  exit 2
fi

if [ "$DRY" = 1 ]; then
  part compare 900 $PY benchmarks/compare_pytorch.py --device cpu --quick --model small --json "$WORK/compare.json"
  part inference 600 $PY benchmarks/encoder.py --variant tiny --full --batch 1 2 --dtype float32 --no-naive \
    --repeats 1 --attention xla --json "$WORK/inference.json"
  for clicks in 1 11; do
    part "train-$clicks" 600 $PY benchmarks/train_step.py --mode cpu --variant tiny --clicks "$clicks" --steps 1 \
      --json "$WORK/train_step_$clicks.json"
  done
  part pipeline 300 $PY benchmarks/pipeline.py --workdir "$WORK/pipeline_data" --cases 1 --crop 32 --batch 1 \
    --batches 2 --warmup 1 --workers 0
  [ -f benchmarks/scaling.py ] && part scaling 60 $PY benchmarks/scaling.py --help
  part tests 300 $PY -m pytest -m gpu -q tests --collect-only -p no:cacheprovider
else
  part compare 210 $PY benchmarks/compare_pytorch.py --device gpu --repeats 10 --train-steps 3 \
    --json "$WORK/compare.json"
  part inference 75 $PY benchmarks/encoder.py --full --batch 1 8 --dtype bfloat16 --no-naive --repeats 30 \
    --json "$WORK/inference.json"
  for clicks in 1 11; do
    part "train-$clicks" 80 $PY benchmarks/train_step.py --mode gpu --clicks "$clicks" \
      --json "$WORK/train_step_$clicks.json" \
    || part "train-$clicks-xla" 80 $PY benchmarks/train_step.py --mode gpu --clicks "$clicks" --attention xla \
      --json "$WORK/train_step_${clicks}_xla.json"
  done
  part pipeline 60 $PY benchmarks/pipeline.py --workdir "$WORK/pipeline_data" --cases 2 --batches 20 \
    --workers 0 4
  [ -f benchmarks/scaling.py ] && part scaling 60 $PY benchmarks/scaling.py --mode gpu --json "$WORK/scaling.json"
  part tests 90 $PY -m pytest -m gpu -q tests -p no:cacheprovider
fi

# One JSON for every part, the logs in one archive, and the summary last (the device tool returns the output's end).
$PY - "$WORK" "$OUT/results.json" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {"gpu": (work / "gpu.txt").read_text() if (work / "gpu.txt").exists() else None}
for f in sorted(work.glob("*.json")):
    try:
        merged[f.stem] = json.loads(f.read_text())
    except ValueError as e:
        merged[f.stem] = f"unreadable: {e}"
out.write_text(json.dumps(merged, indent=1) + "\n")
EOF
tar -czf "$OUT/parts.tar.gz" -C "$WORK" --exclude=pipeline_data . 2>/dev/null
echo
echo "=== summary ($(($(date +%s) - START)) s of ${SUITE_BUDGET:-470} s; results in $OUT)"
cat "$SUMMARY"
[ -f "$WORK/compare.log" ] && sed -n '/^| task |/,$p' "$WORK/compare.log"
rm -rf "$WORK"
