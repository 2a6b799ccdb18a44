r"""Defaults of the two supervised evaluations, linear probing and fine-tuning (data only).

pr_mim_jax/configs/linear_probe.py and pr_mim_jax/configs/finetune.py return `get_config(mode, arg)`. ImageNet
scale follows MAE: linear probe with LARS (base lr 0.1, batch 16384, 90 epochs, 10 warmup,
no weight decay, cls token, BatchNorm head without affine); fine-tuning with AdamW (batch
1024, 5 warmup epochs, weight decay 0.05, b2 0.999, layer decay, drop path, RandAugment
m9-mstd0.5, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, global
average pooling). Fine-tuning's epochs, base lr, layer decay and drop path are left None:
the run fills them from MAE's recipe for the model's size (B, L or H), the model being the
pre-trained one unless `variant=` names it (evaluation/init_run.py, MAE_FINETUNE_RECIPES).
`dataset=shapes` gives settings sized for the embedded dataset.

Arguments: init=WORKDIR (a pre-training workdir; its latest checkpoint unless
--config.init.step=N is set; -1 = latest; '' = random init, a baseline), variant= (the
init run's by default; needed for random init), dataset=. The resolution is the init
run's (model.image_size 0), or 224 px for random init at ImageNet scale.
"""

import ml_collections

from pr_mim_jax import errors
from pr_mim_jax.configs import args as config_args

MODES = ("linear_probe", "finetune")


ARGUMENTS = dict(init="", variant="", dataset="imagenet2012")  # FILE:key=value,...

def get_config(mode: str, arg=None):
  arg = config_args.parse_arg(arg, **ARGUMENTS)
  if mode not in MODES:
    raise errors.UserError(f"unknown evaluation mode {mode!r}; use one of {MODES}")
  probe = mode == "linear_probe"
  demo = arg.dataset == "shapes"

  def from_recipe():  # None: MAE's fine-tuning recipe for the resolved model's size
    return ml_collections.FieldReference(None, field_type=float)

  c = ml_collections.ConfigDict()
  c.mode = mode
  c.seed = 0
  c.compilation_cache_dir = ""  # e.g. ~/.cache/pr_mim_jax/xla; '' = off
  # The pre-training run to start from: its workdir (orbax checkpoint + config.json).
  c.init = ml_collections.ConfigDict(dict(workdir=arg.init, step=-1))  # -1 = latest
  if demo:
    c.batch_size = 256 if probe else 128
  else:
    c.batch_size = 16384 if probe else 1024

  # Architecture fields left empty ('' / 0) come from the pre-training run's config.json.
  c.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, width=0, depth=0, heads=0, posemb="",
      # 0: the init run's. Random init at ImageNet scale: MAE's 224. Another size than the
      # init run's may be set; the position embeddings are then interpolated.
      image_size=0 if demo or arg.init else 224,
      compute_dtype="float32" if demo else "bfloat16",
      remat="none", scan_layers=False, attention="einsum",  # options as in pre-training
      drop_path=0.0 if probe else (0.1 if demo else from_recipe()),
  ))
  c.head = ml_collections.ConfigDict(dict(
      pool="cls" if probe else "gap",  # 'cls' token | 'gap' (mean of patch tokens + norm)
      kind="batchnorm_linear" if probe else "linear",  # MAE: BN without affine for probing
      # stop_gradient on the features; the encoder runs deterministically (no drop path).
      # Fixed by the mode: True to probe, False to fine-tune (config_validation checks it).
      freeze_encoder=probe,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      optimizer="lars" if probe else "adamw",
      # lr = base_lr * batch_size / 256. The demo probe keeps MAE's peak lr (0.1 x 16384 / 256
      # = 6.4) at batch 256: LARS's trust ratio sets each step's size relative to the weights,
      # so the linear-scaling rule would only shrink it 64-fold on a small dataset.
      base_lr=(6.4 if demo else 0.1) if probe else (1e-3 if demo else from_recipe()),
      weight_decay=0.0 if probe else 0.05,
      momentum=0.9,  # lars
      b1=0.9, b2=0.999,  # adamw
      layer_decay=1.0 if probe else (0.75 if demo else from_recipe()),  # adamw; lars: 1
      epochs=(10.0 if probe else 5.0) if demo else (90.0 if probe else from_recipe()),
      warmup_epochs=1.0 if demo else (10.0 if probe else 5.0),
      clip_grad_norm=0.0,  # adamw, 0 = off; lars does not clip (0)
  ))
  c.mixup = ml_collections.ConfigDict(dict(
      mixup_alpha=0.0 if probe else 0.8, cutmix_alpha=0.0 if probe else 1.0,
      prob=1.0, switch_prob=0.5,
  ))
  c.label_smoothing = 0.0 if probe else 0.1
  c.ema = ml_collections.ConfigDict(dict(decay=0.0))  # e.g. 0.9999; 0 = off

  c.data = ml_collections.ConfigDict(dict(
      dataset=arg.dataset,  # 'shapes' | a labeled tfds name | 'folder:/root' (root/<split>/<class>/)
      train_split="train",
      eval_split="test" if demo else "validation",
      data_dir=ml_collections.FieldReference(None, field_type=str),
      shapes=dict(image_size=64, train_size=20000, test_size=2000, seed=0,
                  difficulty="hard"),  # 'hard' | 'easy' (sanity check; shapes.py)
      augment="crop_flip" if probe else "randaugment",  # 'crop_flip' | 'randaugment'
      # Random resized crop area share in [this, 1]: torchvision's 0.08 as MAE; 0.5 for the
      # 64 px shapes, where a small crop often cuts the one shape that defines the class.
      crop_min_scale=0.5 if demo else 0.08,
      randaugment=dict(num_ops=2, magnitude=9, magnitude_std=0.5),  # augment='randaugment' only
      random_erase=0.0 if probe else 0.25,  # probability; augment='randaugment' only
      tune_malloc=True,  # keep freed host buffers mapped (data/host_memory.py)
      prefetch=2,
      num_parallel_calls=-1,
      backend="auto",  # 'tf' | 'numpy' | 'dali' (crop_flip only) | 'auto'
      dali_device="gpu",  # backend='dali': 'gpu' | 'cpu'
  ))
  c.train = ml_collections.ConfigDict(dict(
      total_steps=0,  # 0: from optim.epochs and the dataset size
      log_every=50 if demo else 100,
      eval_every=0,  # steps between evaluations; 0 = once per epoch
      checkpoint_every=500 if demo else 2000,
      keep_checkpoints=2,
  ))
  c.eval = ml_collections.ConfigDict(dict(batch_size=500 if demo else 1000, num_examples=0))  # 0 = all

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.mesh_dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.sharding_rules = ml_collections.ConfigDict(dict(
      batch="data,fsdp", tokens="", embed="fsdp", mlp="tensor", heads="tensor", kv=""))
  return c
