r"""Masked-image-model pre-training: MAE, partial reconstruction or PR-MIM.

`method=` picks the method and expands into the masking / reconstruction fields below;
explicit --config.* overrides win, and inconsistent combinations are rejected before
anything compiles. ImageNet scale follows MAE (800 epochs, or 1600 via
--config.optim.epochs=1600; global batch 4096, base lr 1.5e-4, 40 warmup epochs, mask
0.75, norm_pixel target); partial and PR-MIM throw 0.5 of all patches. `dataset=shapes`
gives demo-scale settings for the embedded dataset, sized for a CPU laptop.

  python -m pr_mim_jax.main --config=pr_mim_jax/configs/pretrain.py:dataset=shapes --workdir=workdirs/demo
  python -m pr_mim_jax.main --config=pr_mim_jax/configs/pretrain.py:method=mae,dataset=shapes --workdir=workdirs/mae
  python -m pr_mim_jax.main --config=pr_mim_jax/configs/pretrain.py:method=pr_mim,variant=L/16 \
      --workdir=gs://bucket/prmim_l --config.data.data_dir=gs://bucket/tfds
"""

import ml_collections

from pr_mim_jax import errors
from pr_mim_jax.configs import args as config_args
from pr_mim_jax.method.methods import METHODS


ARGUMENTS = dict(method="pr_mim", variant="", dataset="imagenet2012")  # FILE:key=value,...

def get_config(arg=None):
  arg = config_args.parse_arg(arg, **ARGUMENTS)
  if arg.method not in METHODS:
    raise errors.UserError(f"config argument method={arg.method!r}: use one of {sorted(METHODS)}")
  throw_ratio, throw_strategy, thrown_reconstruction = METHODS[arg.method]
  # The embedded dataset gets a narrow 6-block encoder unless a variant is named.
  demo = arg.dataset == "shapes"
  tiny = demo and not arg.variant
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
  c.method = arg.method  # 'mae' | 'partial' | 'pr_mim'; checked against the fields below
  c.seed = 0
  c.batch_size = 128 if demo else 4096  # global
  c.compilation_cache_dir = ""  # e.g. ~/.cache/pr_mim_jax/xla; '' = off

  c.model = ml_collections.ConfigDict(dict(
      variant="Ti/8" if tiny else (arg.variant or "B/16"),
      image_size=64 if demo else 224,
      width=128 if tiny else 0, depth=6 if tiny else 0, heads=4 if tiny else 0,  # 0: from variant
      decoder_width=64 if demo else 512,
      decoder_depth=2 if demo else 8,
      decoder_heads=4 if demo else 16,
      posemb="sincos",  # 'sincos' (fixed, MAE) | 'learned' (timm)
      decoder="self_attention",  # 'self_attention' (MAE) | 'cross_attention' (CrossMAE)
      compute_dtype="float32" if demo else "bfloat16",  # params stay float32
      # Per block: 'none' | 'full' | 'dots_saveable' (keep the weight-matmul outputs, recompute
      # norms, attention and GELU: 19.5 -> 8.0 GiB for MAE-B/16 at 256 per H100 in XLA's
      # compile-time plan of 2026-11-28, docs/performance.md).
      remat="none" if demo else "dots_saveable",
      scan_layers=False,  # nn.scan over encoder blocks (params 'blocks' with a layer axis)
      attention="einsum",  # 'einsum' | 'xla' | 'cudnn' | 'cudnn_padded' (models/vit.py)
  ))
  c.masking = ml_collections.ConfigDict(dict(
      mask_ratio=0.75,  # visible tokens: int(L (1 - mask_ratio)), truncated as in MAE
      throw_ratio=throw_ratio,  # a share of ALL patches; 0 <= throw_ratio < mask_ratio
      throw_strategy=throw_strategy,  # 'random' | 'running_cell' | 'furthest'; mae throws none
  ))
  # How thrown tokens are reconstructed (PR-MIM); unused when thrown_reconstruction='none'.
  c.reconstruction = ml_collections.ConfigDict(dict(
      thrown_reconstruction=thrown_reconstruction,  # 'none' | 'progressive'
      num_stages=1,  # groups of thrown tokens, each from the tokens reconstructed before it
      window=3,  # odd box side of the neighbourhood each thrown token aggregates
      aggregator="local_attention",  # 'local_attention' | 'interpolate' | 'last_block'
      key_width=64,  # local_attention: query/key and MLP width
      heads=4,  # local_attention: heads (divide key_width and the decoder width)
  ))
  c.loss = ml_collections.ConfigDict(dict(
      target="norm_pixel",  # 'norm_pixel' | 'pixel' | 'hog'
      # Loss weight of thrown tokens vs 1 for decoded ones: PR-MIM only (mae has no thrown
      # tokens, partial never scores them).
      thrown_loss_weight=1.0,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-3 if demo else 1.5e-4,  # lr = base_lr * batch_size / 256
      weight_decay=0.05, b1=0.9, b2=0.95,
      epochs=6.0 if demo else 800.0,
      warmup_epochs=1.0 if demo else 40.0,
      clip_grad_norm=0.0,  # 0 = off
      mu_dtype="",  # AdamW first moment: '' = float32 like the params | 'bfloat16'
  ))

  c.data = ml_collections.ConfigDict(dict(
      dataset=arg.dataset,  # 'shapes' | a tfds name | 'folder:/path/to/images'
      train_split="train",
      eval_split="test" if demo else "validation",
      data_dir=ml_collections.FieldReference(None, field_type=str),  # tfds data_dir; None = default
      shapes=dict(image_size=64, train_size=20000, test_size=2000, seed=0,
                  difficulty="hard"),  # 'hard' | 'easy' (sanity check; shapes.py)
      crop_min_scale=0.5 if demo else 0.2,  # random resized crop area share in [this, 1] (MAE: 0.2)
      prefetch=2,  # device batches prefetched
      num_parallel_calls=-1,  # -1 = AUTOTUNE
      backend="auto",  # 'tf' (tf.data) | 'numpy' (no TensorFlow) | 'dali' | 'auto' = tf if installed
      dali_device="gpu",  # backend='dali': 'gpu' (nvJPEG on the first local GPU) | 'cpu'
      tune_malloc=True,  # keep freed host buffers mapped (data/host_memory.py)
  ))

  c.train = ml_collections.ConfigDict(dict(
      total_steps=0,  # 0: from optim.epochs and the dataset size
      log_every=50 if demo else 100,
      checkpoint_every=500 if demo else 2000,
      keep_checkpoints=3,
      image_every=500 if demo else 5000,
      num_images=8,
      grad_accum_steps=1,  # micro-batches per step (same update, less activation memory)
      # A profiler trace (TensorBoard / Perfetto) of steps start+1 .. start+steps, written
      # to workdir/profile; 0 steps = no trace.
      profile_start_step=10, profile_steps=0,
  ))
  c.knn = ml_collections.ConfigDict(dict(
      k=20, temperature=0.07,
      train_examples=5000, test_examples=1000,
      every=0,  # steps between k-NN evaluations; 0 = only at the end (beside random init)
      batch_size=256,
      feature="mean",  # 'mean' (average-pooled patch tokens) | 'cls'
      enabled=True,
  ))

  # Device mesh (axes data, fsdp, tensor; the batch is split over data x fsdp). ICI sizes
  # within a slice, -1 = the devices left (at most one -1). Default: pure data parallel;
  # fsdp > 1 shards params + optimizer state (ZeRO-3); tensor > 1 shards heads and MLP.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Sizes across slices (multi-slice TPU, over DCN); all 1 = one slice.
  c.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  # Logical axis -> comma-separated mesh axes ('' = replicated).
  c.sharding_rules = ml_collections.ConfigDict(dict(
      batch="data,fsdp", tokens="", embed="fsdp", mlp="tensor", heads="tensor", kv=""))
  return c
