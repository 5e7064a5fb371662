#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (e.g. v5e-256: 64 hosts x 4 chips) or a multi-slice job.
# Every worker runs the same command; JAX detects the pod (no coordinator or process id to set), every path is on
# Cloud Storage (pip install -e ".[gcs]" on each worker), and a maintenance event's SIGTERM saves a checkpoint.
set -euo pipefail
TPU=${TPU:?name of the TPU VM}; ZONE=${ZONE:?zone}; BUCKET=${BUCKET:?gs://bucket}
RUN=$BUCKET/runs/sammed3d
# The compilation cache on Cloud Storage too: it outlives the VMs, so a restarted job loads its compiled step.
CMD="cd ~/sammed3d_jax && python train.py --config configs/sammed3d.py --workdir $RUN --cache_dir=$BUCKET/jax_cache \
  --config.data.prepared_dir=$BUCKET/prepared --config.distributed.expect_devices=256 \
  --config.batch_size=256 --config.sharding.mesh='((\"data\",-1),)'"
# Resume after a pre-emption: the same command with --resume (the run's stored config is used).
if gsutil -q ls "$RUN/checkpoints" >/dev/null 2>&1; then CMD="$CMD --resume"; fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$CMD"

# Multi-slice (e.g. 2 x v5e-256 through a queued resource with --node-count=2): the slices are the DCN granules;
# data parallel across slices, FSDP inside each slice:
#   ... --config.sharding.mesh='(("data",1),("fsdp",-1))' --config.sharding.dcn_mesh='(("data",-1),)' \
#       --config.sharding.rules='((".*","fsdp"),)' --config.sharding.fsdp_axis=fsdp --config.distributed.expect_devices=512
