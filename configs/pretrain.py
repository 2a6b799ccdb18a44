r"""MAE-style pre-training.

ImageNet scale follows MAE (800 epochs, global batch 4096, base lr 1.5e-4, 40 warmup
epochs, mask 0.75, norm_pixel target). `dataset=shapes` gives demo-scale settings for
the embedded dataset, sized for a CPU laptop.

  python -m pr_mim_jax.main --config=configs/pretrain.py:dataset=shapes --workdir=workdirs/demo
  python -m pr_mim_jax.main --config=configs/pretrain.py:variant=L/16 --workdir=gs://bucket/mae_l \
      --config.data.data_dir=gs://bucket/tfds
"""

import ml_collections

from pr_mim_jax import config_args


def get_config(arg=None):
  arg = config_args.parse_arg(arg, variant="", dataset="imagenet2012")
  # The embedded dataset gets a narrow 6-block encoder unless a variant is named.
  demo = arg.dataset == "shapes"
  tiny = demo and not arg.variant
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
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
      compute_dtype="float32" if demo else "bfloat16",  # params stay float32
  ))
  c.masking = ml_collections.ConfigDict(dict(mask_ratio=0.75, throw_ratio=0.0))
  c.loss = ml_collections.ConfigDict(dict(target="norm_pixel"))  # 'norm_pixel' | 'pixel'
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=1e-3 if demo else 1.5e-4,  # lr = base_lr * batch_size / 256
      weight_decay=0.05, b1=0.9, b2=0.95,
      epochs=6.0 if demo else 800.0,
      warmup_epochs=1.0 if demo else 40.0,
      clip_grad_norm=0.0,  # 0 = off
  ))

  c.data = ml_collections.ConfigDict(dict(
      dataset=arg.dataset,  # 'shapes' | a tfds name | 'folder:/path/to/images'
      train_split="train",
      eval_split="test" if demo else "validation",
      data_dir=ml_collections.FieldReference(None, field_type=str),  # tfds data_dir; None = default
      shapes=dict(image_size=64, train_size=20000, test_size=2000, seed=0),
      crop_min_scale=0.5 if demo else 0.2,  # random resized crop area share in [this, 1] (MAE: 0.2)
      prefetch=2,  # device batches prefetched
      num_parallel_calls=-1,  # -1 = AUTOTUNE
      backend="auto",  # 'tf' (tf.data) | 'numpy' (no TensorFlow) | 'auto' = tf if installed
  ))

  c.train = ml_collections.ConfigDict(dict(
      total_steps=0,  # 0: from optim.epochs and the dataset size
      log_every=50 if demo else 100,
      checkpoint_every=500 if demo else 2000,
      keep_checkpoints=3,
      image_every=500 if demo else 5000,
      num_images=8,
  ))
  c.knn = ml_collections.ConfigDict(dict(
      k=20, temperature=0.07,
      train_examples=5000, test_examples=1000,
      every=0,  # steps between k-NN evaluations; 0 = only at init and end
      batch_size=256,
      feature="mean",  # 'mean' (average-pooled patch tokens) | 'cls'
      enabled=True,
  ))
  return c
