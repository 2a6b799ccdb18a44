#!/usr/bin/env bash
# The whole GPU benchmark in one command: the ViT-B/16 and ViT-L/16 train steps of MAE,
# partial reconstruction and PR-MIM (224 px, batch 256, bf16, mask 0.75, throw 0.5), each in
# a fresh process, plus the bf16 matmul ceiling; then JSON and markdown.
#   launch/gpu_benchmark.sh OUT_DIR [sweep] [--config.FIELD=VALUE ...]
# `sweep` instead times the optimisation levers on B/16 (MAE and PR-MIM): attention
# xla / cudnn / cudnn_padded, AdamW mu in bf16, and remat none (the default before
# dots_saveable: what remat costs in time), one file each.
# No TensorFlow needed. Environment: STEPS (timed steps, default 20), BATCH (default 256).
set -euo pipefail
usage="usage: launch/gpu_benchmark.sh OUT_DIR [sweep] [--config.FIELD=VALUE ...]"
die() { echo "error: $*" >&2; exit 2; }
[ $# -gt 0 ] && [ -n "$1" ] || die "OUT_DIR missing; $usage"
out=$1
# A flag or `sweep` in OUT_DIR's place means OUT_DIR was left out (./sweep names a folder).
case $out in -*|sweep) die "OUT_DIR comes first, not $out; $usage";; esac
shift
mode=main
if [ "${1:-}" = sweep ]; then mode=sweep; shift; fi
mkdir -p "$out" 2>/dev/null || {
  echo "error: OUT_DIR $out: cannot create that folder (a file of that name, or no permission)" >&2
  exit 2
}
common=(--config=pr_mim_jax/configs/pretrain.py --batch="${BATCH:-256}" --steps="${STEPS:-20}" --warmup=3)

status=0  # the last failed run's exit code; the runs after a failed one still run
bench() {  # NAME [extra flags...]: one harness run -> OUT/NAME.json + OUT/NAME.md
  local name=$1 rc=0
  shift
  echo "== $name" >&2
  python -m pr_mim_jax.tools.benchmark "${common[@]}" --json="$out/$name.json" \
      --markdown="$out/$name.md" "$@" >"$out/$name.log" || rc=$?
  { echo "## $name"; echo
    if [ "$rc" -le 1 ]; then cat "$out/$name.md"  # 1: every setting failed, as it says
    else echo "no report: exit code $rc (its error line is on stderr)"; fi
    echo; } >>"$out/summary.md"
  if [ "$rc" -ne 0 ]; then echo "$name: exit code $rc" >&2; status=$rc; fi
}

: >"$out/summary.md"
if [ "$mode" = main ]; then
  bench vit_b16 --methods=mae,partial,pr_mim --variants=B/16 "$@"
  bench vit_l16 --methods=mae,partial,pr_mim --variants=L/16 "$@"
else
  for attention in xla cudnn cudnn_padded; do
    bench "b16_attention_$attention" --methods=mae,pr_mim --variants=B/16 \
        --config.model.attention="$attention" "$@"
  done
  bench b16_mu_bf16 --methods=mae,pr_mim --variants=B/16 --config.optim.mu_dtype=bfloat16 "$@"
  bench b16_remat_none --methods=mae,pr_mim --variants=B/16 --config.model.remat=none "$@"
fi
echo "wrote $out/summary.md and one .json / .md / .log per run" >&2
exit "$status"
