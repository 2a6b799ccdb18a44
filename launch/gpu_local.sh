#!/usr/bin/env bash
# One node, all of its GPUs, one process (JAX drives every local GPU from it).
#   launch/gpu_local.sh WORKDIR [--config.FIELD=VALUE ...]
# Environment: CONFIG (default pr_mim_jax/configs/pretrain.py:variant=B/16), DATA_DIR (tfds data_dir),
# CUDA_VISIBLE_DEVICES to choose GPUs. Install first: pip install -U "jax[cuda12]" -r requirements.txt
set -euo pipefail
usage="usage: launch/gpu_local.sh WORKDIR [--config.FIELD=VALUE ...]"
die() { echo "error: $*" >&2; exit 2; }
[ $# -gt 0 ] && [ -n "$1" ] || die "WORKDIR missing; $usage"
workdir=$1
# A flag in WORKDIR's place would become the workdir and be dropped from the run.
case $workdir in -*) die "WORKDIR comes first, not $workdir; $usage";; esac
shift
args=(--config="${CONFIG:-pr_mim_jax/configs/pretrain.py:variant=B/16}" --workdir="$workdir")
[ -n "${DATA_DIR:-}" ] && args+=(--config.data.data_dir="$DATA_DIR")
# Let XLA take most of the GPU memory up front; TF never touches the GPU.
# (Not when the newer XLA_CLIENT_MEM_FRACTION is set: jax refuses the two together.)
[ -n "${XLA_CLIENT_MEM_FRACTION:-}" ] ||
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m pr_mim_jax.main "${args[@]}" "$@"
