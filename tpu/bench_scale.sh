#!/usr/bin/env bash
# The scale benchmark on worker 0 of a TPU VM, into ~/jaxad/BENCHMARKS.md there, copied back to
# tpu-results/ here with its plots; merge it with
#   python scripts/bench.py --import-from tpu-results/BENCHMARKS.md --section scale-tpu
# and copy tpu-results/benchmarks/scale-tpu_*.png into benchmarks/.
#   tpu/bench_scale.sh NAME ZONE
set -euo pipefail
NAME=${1:?usage: tpu/bench_scale.sh NAME ZONE}
ZONE=${2:?}
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 --command="
  cd ~/jaxad && python scripts/bench.py --scale --section scale-tpu --scale-nn-gb 8"
mkdir -p tpu-results/benchmarks
gcloud compute tpus tpu-vm scp "$NAME":~/jaxad/BENCHMARKS.md tpu-results/ --zone "$ZONE" --worker=0
gcloud compute tpus tpu-vm scp "$NAME":'~/jaxad/benchmarks/scale-tpu_*.png' tpu-results/benchmarks/ --zone "$ZONE" --worker=0
