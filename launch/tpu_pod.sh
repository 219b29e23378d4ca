#!/usr/bin/env bash
# Run a recipe on every host of a Cloud TPU VM pod slice (multi-host: jax.distributed starts by
# itself on TPU VMs). The repository must already be on every worker (e.g. `git clone` via the
# same ssh command) and the workdir on shared storage (a gs:// bucket).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/clip_vitb16.py gs://bucket/runs/clip_b16 [--config.x=y ...]
set -euo pipefail
if (( $# < 4 )); then
  sed -n '2,7p' "$0"
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo_dir=${REPO_DIR:-$(basename "$(git rev-parse --show-toplevel)")}
# Quote every argument for the remote shell: a shard pattern like '{00000..00099}.tar' must reach
# the trainer as one flag, not be brace-expanded into a hundred.
printf -v overrides '%q ' "$@"
printf -v remote 'cd %q && EXTRAS=tpu bash launch/setup.sh && .venv/bin/python -m pretrain.main --config=%q --workdir=%q --config.distributed=on %s' \
  "$repo_dir" "$config" "$workdir" "$overrides"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote"
