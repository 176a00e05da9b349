#!/usr/bin/env bash
# Fit on a single-host TPU VM (e.g. v5litepod-8: one process, 8 local chips): the batch of each
# step is split over the chips and CRD's Gram matrices are added with one psum.
#   tpu/fit_vm.sh NAME ZONE DATA WORKDIR [--method crd] [--config.KEY=VALUE ...]
# DATA and WORKDIR are paths on the TPU VM.
set -euo pipefail
NAME=${1:?usage: tpu/fit_vm.sh NAME ZONE DATA WORKDIR [fit.py arguments]}
ZONE=${2:?}; DATA=${3:?}; WORKDIR=${4:?}; shift 4
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 --command="
  cd ~/jaxad && python scripts/fit.py --data $(printf %q "$DATA") --workdir $(printf %q "$WORKDIR") $ARGS"
