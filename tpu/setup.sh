#!/usr/bin/env bash
# Install jaxad on every worker of a TPU VM or pod slice (the repository is copied from here).
#   tpu/setup.sh NAME ZONE
# Each worker gets ~/jaxad and jax[tpu]; a single-host TPU VM has one worker, which --worker=all reaches too.
set -euo pipefail
NAME=${1:?usage: tpu/setup.sh NAME ZONE}
ZONE=${2:?usage: tpu/setup.sh NAME ZONE}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

git -C "$ROOT" archive --format=tar.gz -o /tmp/jaxad.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/jaxad.tar.gz "$NAME":~/jaxad.tar.gz --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command='
  set -e
  rm -rf ~/jaxad && mkdir ~/jaxad && tar -xzf ~/jaxad.tar.gz -C ~/jaxad
  pip install -q -e ~/jaxad "jax[tpu]"
  python -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())"'
