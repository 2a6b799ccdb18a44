#!/usr/bin/env bash
# Pre-train on a Cloud TPU VM slice: create (or reuse) it, install on every worker, run on all
# workers at once and stream the logs. jax.distributed detects the pod by itself.
#   launch/tpu_pod.sh WORKDIR [--config.FIELD=VALUE ...]      (WORKDIR: a gs:// path, or an
#   absolute path with SHARED_WORKDIR=1: a file system every worker mounts, or a one-host slice)
# Environment (required): TPU_NAME, ZONE, PROJECT. Optional: ACCELERATOR (default v4-32),
# RUNTIME (default tpu-ubuntu2204-base), CONFIG (default pr_mim_jax/configs/pretrain.py:variant=B/16),
# DATA_DIR (gs:// tfds data_dir), REPO (git URL to clone; default: copy this checkout).
set -euo pipefail
usage="usage: launch/tpu_pod.sh gs://BUCKET/WORKDIR [--config.FIELD=VALUE ...]"
die() { echo "error: $*" >&2; exit 2; }
[ $# -gt 0 ] && [ -n "$1" ] || die "WORKDIR missing; $usage"
workdir=$1
# A flag in WORKDIR's place would become the workdir and be dropped from the run.
case $workdir in -*) die "WORKDIR comes first, not $workdir; $usage";; esac
# Every worker writes its part of each checkpoint to WORKDIR: a local path would leave the
# parts on different VMs (and lose them with the slice).
case $workdir in
  gs://?*) ;;
  /*) [ "${SHARED_WORKDIR:-}" = 1 ] || die "WORKDIR must be a gs:// path that every worker \
can write, not $workdir; for a file system every worker mounts (or a one-host slice) set \
SHARED_WORKDIR=1; $usage";;
  *) die "WORKDIR must be a gs:// path that every worker can write, not $workdir; $usage";;
esac
shift
missing=()
for name in TPU_NAME ZONE PROJECT; do [ -n "${!name:-}" ] || missing+=("$name"); done
[ ${#missing[@]} -eq 0 ] || die "set ${missing[*]} (the TPU VM's name, its zone and the \
Google Cloud project), e.g. TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project"
accelerator=${ACCELERATOR:-v4-32}
runtime=${RUNTIME:-tpu-ubuntu2204-base}
config=${CONFIG:-pr_mim_jax/configs/pretrain.py:variant=B/16}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # this checkout, wherever this runs from
tpu=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")

if ! "${tpu[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
  "${tpu[@]}" create "$TPU_NAME" --accelerator-type="$accelerator" --version="$runtime"
fi

# The same code on every worker: clone REPO, or copy this checkout.
if [ -n "${REPO:-}" ]; then
  "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="rm -rf pr_mim_jax && git clone -q $REPO pr_mim_jax"
else
  archive=$(mktemp "${TMPDIR:-/tmp}/pr_mim_jax.XXXXXX.tgz")  # one per launch
  trap 'rm -f "$archive"' EXIT
  # Not the virtual environments (.venv, .venv-tpu, .venv-gpu), runs or git history.
  tar czf "$archive" --exclude='.venv*' --exclude=workdirs --exclude=.git -C "$root" .
  "${tpu[@]}" scp "$archive" "$TPU_NAME":pr_mim_jax.tgz --worker=all
  "${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="rm -rf pr_mim_jax && mkdir pr_mim_jax && tar xzf pr_mim_jax.tgz -C pr_mim_jax"
fi
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="cd pr_mim_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U 'jax[tpu]' -r requirements.txt"

args=(--config="$config" --workdir="$workdir")
[ -n "${DATA_DIR:-}" ] && args+=(--config.data.data_dir="$DATA_DIR")
# Every worker runs the same command; ssh streams all workers' output here. Each argument is
# quoted for the workers' shell, so values with spaces or shell characters arrive whole.
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="cd pr_mim_jax && . .venv/bin/activate && python -m pr_mim_jax.main $(printf '%q ' "${args[@]}" "$@")"
