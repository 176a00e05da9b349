#!/usr/bin/env bash
# Fit on a TPU pod slice (several hosts): the same scripts/fit.py runs on every worker with
# --coordinator auto, so jax.distributed.initialize finds the coordinator, the process count and
# each worker's id from the TPU metadata. Each worker reads its share of DATA's training images
# (DATA must hold the same files on every worker: a copy on each, or a shared mount), each step's
# batch is --config.batch_size images per worker, the Gram matrices are added over every chip of
# the slice, and worker 0 writes WORKDIR (on its own disk) and evaluates.
#   tpu/fit_pod.sh NAME ZONE DATA WORKDIR [--method crd] [--config.KEY=VALUE ...]
set -euo pipefail
NAME=${1:?usage: tpu/fit_pod.sh NAME ZONE DATA WORKDIR [fit.py arguments]}
ZONE=${2:?}; DATA=${3:?}; WORKDIR=${4:?}; shift 4
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command="
  cd ~/jaxad && python scripts/fit.py --coordinator auto --data $(printf %q "$DATA") --workdir $(printf %q "$WORKDIR") $ARGS"
