r"""The small-scale comparison of MAE, partial reconstruction and PR-MIM (pr_mim_jax.tools.study).

  python -m pr_mim_jax.tools.study --config=pr_mim_jax/configs/study.py:setting=cpu --workdir=workdirs/study_cpu
  python -m pr_mim_jax.tools.study --config=pr_mim_jax/configs/study.py:setting=gpu --workdir=workdirs/study_gpu

Every method pre-trains with the same epochs, batch and seeds on the embedded shapes
dataset, read from memory (no TensorFlow needed); each is then scored by k-NN, a linear
probe and a short fine-tune. `cpu` took 22-23 minutes per seed on the project's 2-core
CPU machine (2026-12-07, docs/evaluation.md). `gpu` is sized for one GPU run of about 6
minutes: an estimate, it has not run on a GPU yet (about 840k images per seed through
the NumPy input pipeline).
"""

import ml_collections

from pr_mim_jax import errors
from pr_mim_jax.configs import args as config_args

SETTINGS = ("cpu", "gpu")


ARGUMENTS = dict(setting="cpu")  # FILE:key=value,...

def get_config(arg=None):
  arg = config_args.parse_arg(arg, **ARGUMENTS)
  if arg.setting not in SETTINGS:
    raise errors.UserError(f"config argument setting={arg.setting!r}: use one of {SETTINGS}")
  gpu = arg.setting == "gpu"
  c = ml_collections.ConfigDict()
  c.setting = arg.setting
  c.methods = "mae,partial,pr_mim"  # comma-separated; each at its default throw ratio (0 / 0.5)
  c.pr_mim_throw_ratios = ""  # extra PR-MIM runs, e.g. '0.25,0.625'
  c.seeds = "0"  # e.g. '0,1,2' for the seed-to-seed spread (each seed repeats everything)
  c.backend = "numpy"  # in-memory shapes source; 'auto' uses tfds when TensorFlow is there
  c.shapes = ml_collections.ConfigDict(dict(image_size=64, train_size=20000, test_size=2000))
  # The demo model: a narrowed Ti/8 encoder (width 128, 6 blocks) and a 64 x 2 decoder.
  c.model = ml_collections.ConfigDict(dict(
      variant="Ti/8", width=128, depth=6, heads=4, decoder_width=64, decoder_depth=2,
      decoder_heads=4))
  # Pre-training, the same for every method.
  c.pretrain = ml_collections.ConfigDict(dict(
      batch_size=128, epochs=8.0 if gpu else 2.0, warmup_epochs=1.0 if gpu else 0.5,
      base_lr=1e-3))
  c.knn = ml_collections.ConfigDict(dict(train_examples=5000 if gpu else 2000, test_examples=1000))
  c.linear_probe = ml_collections.ConfigDict(dict(
      batch_size=256, epochs=4.0 if gpu else 2.0, warmup_epochs=0.5,
      base_lr=6.4))  # MAE's peak lr (see pr_mim_jax/configs/classify.py)
  c.finetune = ml_collections.ConfigDict(dict(
      batch_size=128, epochs=2.0 if gpu else 1.0, warmup_epochs=0.2,
      base_lr=1e-3, layer_decay=0.75, drop_path=0.1))
  # Reconstruction loss over ALL masked tokens, on this many test images with fixed masks.
  c.reconstruction_examples = 1000 if gpu else 500
  return c
