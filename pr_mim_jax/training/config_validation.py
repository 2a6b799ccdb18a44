"""Every config check, before anything compiles: pre-training, the probe and fine-tuning,
and the k-NN evaluation. The loops call them once per run (their check_config).

Each failure is a UserError whose one-line message names the field and the fix. The
allowed values of a field are defined once, beside the code that uses them.
"""

import math

import ml_collections

from pr_mim_jax.data import dali_batches
from pr_mim_jax.data import datasets
from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError
from pr_mim_jax.method import masking
from pr_mim_jax.method import targets
from pr_mim_jax.method.methods import METHODS
from pr_mim_jax.models import classifier
from pr_mim_jax.models import mae
from pr_mim_jax.models import progressive
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import knn as knn_lib
from pr_mim_jax.training import optim

POSEMBS = ("sincos", "learned")
DTYPES = ("bfloat16", "float32")


def _require(ok: bool, field: str, problem: str, fix: str):
  if not ok:
    raise UserError(f"config.{field}: {problem}; {fix}")


def _positive_int(field, value):
  _require(isinstance(value, int) and value > 0, field, f"got {value!r}", "use an integer > 0")


def validate_seed(config):
  """The run's seed, which also seeds each epoch's shuffle (numpy: only integers >= 0)."""
  _require(isinstance(config.seed, int) and config.seed >= 0, "seed", f"got {config.seed!r}",
           "use an integer >= 0")


def validate_model(model):
  try:
    spec = vit.parse_variant(model.variant)
  except ValueError as e:
    raise UserError(f"config.model.variant: {e}") from None
  size, patch = model.image_size, spec.patch
  _positive_int("model.image_size", size)
  _require(size % patch == 0, "model.image_size",
           f"{size} is not divisible by the patch size {patch} of variant {model.variant!r}",
           f"use a multiple of {patch}, e.g. {max(patch, size // patch * patch)}")
  width = model.width or spec.width
  heads = model.heads or spec.heads
  for field in ("width", "depth", "heads"):
    _require(isinstance(model[field], int) and model[field] >= 0, f"model.{field}",
             f"got {model[field]!r}", "use an integer >= 0")
  _require(width % heads == 0, "model.width", f"width {width} is not divisible by {heads} heads",
           "change model.width or model.heads")
  for field in ("decoder_width", "decoder_depth", "decoder_heads"):
    _positive_int(f"model.{field}", model[field])
  _require(model.decoder_width % model.decoder_heads == 0, "model.decoder_width",
           f"{model.decoder_width} is not divisible by decoder_heads={model.decoder_heads}",
           "change model.decoder_width or model.decoder_heads")
  _require(model.posemb in POSEMBS, "model.posemb", f"unknown value {model.posemb!r}",
           f"use one of {POSEMBS}")
  _require(model.posemb != "sincos" or width % 4 == 0, "model.width",
           f"sin-cos position embeddings need a width divisible by 4, got {width}",
           "use a multiple of 4 or model.posemb='learned'")
  _require(model.decoder_width % 4 == 0, "model.decoder_width",
           f"the decoder's sin-cos position embeddings need a width divisible by 4, got "
           f"{model.decoder_width}", "use a multiple of 4")
  _require(model.decoder in mae.DECODERS, "model.decoder", f"unknown value {model.decoder!r}",
           f"use one of {mae.DECODERS}")
  _require(model.compute_dtype in DTYPES, "model.compute_dtype",
           f"unknown value {model.compute_dtype!r}", f"use one of {DTYPES}")
  remat = model.get("remat", "none")
  _require(remat in vit.REMAT_POLICIES, "model.remat", f"unknown value {remat!r}",
           f"use one of {tuple(vit.REMAT_POLICIES)}")
  scan = model.get("scan_layers", False)
  _require(isinstance(scan, bool), "model.scan_layers", f"got {scan!r}", "use True or False")
  attention = model.get("attention", "einsum")
  _require(attention in vit.ATTENTIONS, "model.attention", f"unknown value {attention!r}",
           f"use one of {vit.ATTENTIONS} ('cudnn*' need an NVIDIA GPU)")
  return spec


def validate_attention_backend(model, backend: str):
  """cuDNN attention runs only on a GPU: `backend` is jax.default_backend() where the run
  executes (not checked by the deviceless compiles for a GPU target, which allow it)."""
  attention = model.get("attention", "einsum")
  _require(not attention.startswith("cudnn") or backend == "gpu", "model.attention",
           f"{attention!r} needs an NVIDIA GPU, and JAX runs on {backend!r} here",
           "use 'xla' or 'einsum'")


def validate_masking(masking_cfg, num_patches: int) -> masking.TokenSplit:
  mask, throw = masking_cfg.mask_ratio, masking_cfg.throw_ratio
  _require(0.0 < mask < 1.0, "masking.mask_ratio", f"{mask} is outside (0, 1)", "use e.g. 0.75")
  _require(0.0 <= throw < mask, "masking.throw_ratio",
           f"{throw} is outside [0, mask_ratio={mask})",
           "it is a share of ALL patches; use 0 for MAE or e.g. 0.5 with mask_ratio 0.75")
  _require(masking_cfg.throw_strategy in masking.THROW_STRATEGIES, "masking.throw_strategy",
           f"unknown value {masking_cfg.throw_strategy!r}", f"use one of {masking.THROW_STRATEGIES}")
  try:
    return masking.token_split(num_patches, mask, throw)
  except ValueError as e:
    raise UserError(f"config.masking: {e}; change mask_ratio/throw_ratio") from None


def validate_method(config, split: masking.TokenSplit):
  """The method switch against the fields it expands into; PR-MIM's reconstruction fields."""
  method, rec = config.method, config.reconstruction
  _require(method in METHODS, "method", f"unknown value {method!r}", f"use one of {tuple(METHODS)}")
  _require(rec.thrown_reconstruction in mae.THROWN_RECONSTRUCTIONS,
           "reconstruction.thrown_reconstruction", f"unknown value {rec.thrown_reconstruction!r}",
           f"use one of {mae.THROWN_RECONSTRUCTIONS}")
  if method == "mae":  # the ratio itself, not its rounded count: config.json records it
    _require(config.masking.throw_ratio == 0, "masking.throw_ratio",
             f"method 'mae' decodes every masked token but throw_ratio={config.masking.throw_ratio}",
             "set it to 0, or use method=partial or method=pr_mim")
  else:
    _require(split.n_throw > 0, "masking.throw_ratio",
             f"method {method!r} needs thrown tokens but throw_ratio={config.masking.throw_ratio} "
             f"throws none of {split.num_patches} patches", "use e.g. 0.5, or method=mae")
  expected = METHODS[method][2]
  _require(rec.thrown_reconstruction == expected, "reconstruction.thrown_reconstruction",
           f"method {method!r} implies {expected!r}, got {rec.thrown_reconstruction!r}",
           "drop the override, or pick the method that matches (pr_mim reconstructs thrown "
           "tokens progressively; partial and mae do not)")
  _require(rec.aggregator in progressive.AGGREGATORS, "reconstruction.aggregator",
           f"unknown value {rec.aggregator!r}", f"use one of {progressive.AGGREGATORS}")
  _require(isinstance(rec.window, int) and rec.window > 0 and rec.window % 2 == 1,
           "reconstruction.window", f"got {rec.window!r}", "use an odd integer > 0, e.g. 3")
  _positive_int("reconstruction.num_stages", rec.num_stages)
  if rec.thrown_reconstruction == "progressive":
    _require(rec.num_stages <= split.n_throw, "reconstruction.num_stages",
             f"{rec.num_stages} stages exceed the {split.n_throw} thrown tokens",
             f"use at most {split.n_throw}")
    _require(rec.aggregator != "last_block" or rec.num_stages == 1, "reconstruction.num_stages",
             "the last_block aggregator reconstructs every thrown token in one pass",
             "use num_stages=1 with aggregator='last_block'")
  _positive_int("reconstruction.key_width", rec.key_width)
  _positive_int("reconstruction.heads", rec.heads)
  if rec.aggregator == "local_attention":
    _require(rec.key_width % rec.heads == 0 and config.model.decoder_width % rec.heads == 0,
             "reconstruction.heads", f"{rec.heads} heads must divide key_width={rec.key_width} "
             f"and model.decoder_width={config.model.decoder_width}", "use e.g. 4")
  _require(config.loss.thrown_loss_weight >= 0, "loss.thrown_loss_weight",
           f"got {config.loss.thrown_loss_weight}", "use a weight >= 0 (1.0 = same as decoded tokens)")


def validate_optim(optim):
  # inf passes the range checks below, then trains to NaN (base_lr) or fails converting the
  # step count (epochs): reject it here with the field named.
  for field in ("base_lr", "weight_decay", "epochs", "warmup_epochs", "clip_grad_norm"):
    _require(math.isfinite(optim[field]), f"optim.{field}", f"got {optim[field]}",
             "use a finite number")
  _require(optim.base_lr > 0, "optim.base_lr", f"got {optim.base_lr}", "use a value > 0, e.g. 1.5e-4")
  _require(optim.weight_decay >= 0, "optim.weight_decay", f"got {optim.weight_decay}", "use >= 0")
  for field in ("b1", "b2"):
    _require(0.0 <= optim[field] < 1.0, f"optim.{field}", f"{optim[field]} is outside [0, 1)",
             "use e.g. b1=0.9, b2=0.95")
  _require(optim.epochs > 0, "optim.epochs", f"got {optim.epochs}", "use a value > 0")
  _require(0 <= optim.warmup_epochs < optim.epochs, "optim.warmup_epochs",
           f"{optim.warmup_epochs} is outside [0, epochs={optim.epochs})", "use fewer warmup epochs")
  _require(optim.clip_grad_norm >= 0, "optim.clip_grad_norm", f"got {optim.clip_grad_norm}",
           "use 0 (off) or a positive max norm")
  mu_dtype = optim.get("mu_dtype", "")
  _require(mu_dtype in ("",) + DTYPES, "optim.mu_dtype", f"unknown value {mu_dtype!r}",
           "use '' (the params' float32) or 'bfloat16'")


def _or_fewer_devices(batch) -> str:
  """The other way out, for a resumed run, which may not change its batch_size."""
  if not isinstance(batch, int) or batch <= 0:
    return ""
  return (", or (resuming a run, which keeps its batch_size) devices on the batch axes "
          f"that divide {batch}")


def validate_train(config, num_batch_shards: int):
  _positive_int("batch_size", config.batch_size)
  _require(config.batch_size % num_batch_shards == 0, "batch_size",
           f"global batch {config.batch_size} is not divisible by the {num_batch_shards} devices "
           "on the batch axes", f"use a multiple of {num_batch_shards}"
           f"{_or_fewer_devices(config.batch_size)}")
  train = config.train
  _require(isinstance(train.total_steps, int) and train.total_steps >= 0, "train.total_steps",
           f"got {train.total_steps!r}", "use 0 (from epochs) or a positive integer")
  for field in ("log_every", "checkpoint_every", "keep_checkpoints", "image_every", "num_images"):
    _positive_int(f"train.{field}", train[field])
  for field in ("profile_start_step", "profile_steps"):
    value = train.get(field, 0)
    _require(isinstance(value, int) and value >= 0, f"train.{field}", f"got {value!r}",
             "use an integer >= 0 (profile_steps=0: no trace)")
  accum = train.get("grad_accum_steps", 1)
  _positive_int("train.grad_accum_steps", accum)
  _require(config.batch_size % (accum * num_batch_shards) == 0, "train.grad_accum_steps",
           f"global batch {config.batch_size} is not divisible by grad_accum_steps={accum} x "
           f"{num_batch_shards} batch shards", f"use a batch_size that is a multiple of "
           f"{accum * num_batch_shards}, or fewer grad_accum_steps")
  validate_knn(config.knn)
  _require(config.knn.every >= 0, "knn.every", f"got {config.knn.every}",
           "use 0 (only at the end) or a step count")


def validate_knn(knn):
  """config.knn: the pre-training monitor's and the k-NN evaluation's shared fields."""
  for field in ("k", "train_examples", "test_examples", "batch_size"):
    _positive_int(f"knn.{field}", knn[field])
  _require(knn.k <= knn.train_examples, "knn.k", f"k={knn.k} exceeds knn.train_examples",
           "lower knn.k")
  _require(knn.temperature > 0, "knn.temperature", f"got {knn.temperature}", "use e.g. 0.07")
  _require(knn.feature in knn_lib.FEATURES, "knn.feature", f"unknown value {knn.feature!r}",
           f"use one of {knn_lib.FEATURES}")


def validate_data_source(data):
  """data.backend / data.dali_device names: a bad one would otherwise surface only when the
  input pipeline starts, after the model state is built (the 'shapes' source is lazy)."""
  backend = data.get("backend", "auto")
  _require(backend in datasets.BACKENDS, "data.backend", f"unknown value {backend!r}",
           f"use one of {datasets.BACKENDS}")
  device = data.get("dali_device", "gpu")
  _require(device in dali_batches.DEVICES, "data.dali_device", f"unknown value {device!r}",
           f"use one of {dali_batches.DEVICES} (read only with data.backend='dali')")


def validate_data(data):
  _require(0.0 < data.crop_min_scale <= 1.0, "data.crop_min_scale",
           f"{data.crop_min_scale} is outside (0, 1]", "use e.g. 0.2 (MAE)")
  validate_data_source(data)


def validate_mesh(config):
  """config.mesh / mesh_dcn sizes and config.sharding_rules names (device count aside)."""
  for name in ("mesh", "mesh_dcn"):
    node = config[name]
    _require(set(node) == set(sharding.MESH_AXES), name, f"has axes {sorted(node)}",
             f"use exactly {sharding.MESH_AXES}")
    for axis in sharding.MESH_AXES:
      size = node[axis]
      ok = isinstance(size, int) and (size >= 1 or (size == -1 and name == "mesh"))
      _require(ok, f"{name}.{axis}", f"got {size!r}",
               "use an integer >= 1 or -1 (the devices left)" if name == "mesh"
               else "use an integer >= 1 (slices along this axis)")
  fills = [a for a in sharding.MESH_AXES if config.mesh[a] == -1]
  _require(len(fills) <= 1, "mesh", f"{fills} are all -1", "use -1 on one axis at most")
  rules = config.sharding_rules
  unknown = sorted(set(rules) - set(sharding.LOGICAL_AXES))
  _require(not unknown, "sharding_rules", f"unknown logical axes {unknown}",
           f"use only {sharding.LOGICAL_AXES}")
  for logical in sharding.LOGICAL_AXES:
    _require(logical in rules and isinstance(rules[logical], str), f"sharding_rules.{logical}",
             f"got {rules.get(logical)!r}", "use comma-separated mesh axes, '' = replicated")
    axes = [a.strip() for a in rules[logical].split(",") if a.strip()]
    bad = [a for a in axes if a not in sharding.MESH_AXES]
    _require(not bad, f"sharding_rules.{logical}", f"unknown mesh axes {bad}",
             f"use names from {sharding.MESH_AXES}")
    _require(len(set(axes)) == len(axes), f"sharding_rules.{logical}",
             f"repeats a mesh axis in {rules[logical]!r}", "name each mesh axis once")


def validate_pretrain(config, num_batch_shards: int):
  """All config checks that need no data access; raise UserError on the first problem."""
  spec = validate_model(config.model)
  split = validate_masking(config.masking, (config.model.image_size // spec.patch) ** 2)
  validate_method(config, split)
  _require(config.loss.target in targets.TARGETS, "loss.target",
           f"unknown value {config.loss.target!r}", f"use one of {targets.TARGETS}")
  _require(config.loss.target != "hog" or targets.hog_supported(spec.patch), "loss.target",
           f"'hog' splits each patch into 2x2 cells and needs an even patch size, got {spec.patch}",
           "use a variant with an even patch size or another target")
  validate_optim(config.optim)
  validate_data(config.data)
  validate_mesh(config)
  validate_train(config, num_batch_shards)
  validate_seed(config)


def validate_init_step(config):
  step = config.init.step
  _require(isinstance(step, int) and step >= -1, "init.step", f"got {step!r}",
           "use -1 (the latest checkpoint) or the step of a saved checkpoint, e.g. 0")


def validate_encoder(model):
  """An encoder's fields as a probe, fine-tune or k-NN run resolves them against its init run:
  validate_model's checks, less the decoder's (these runs have none)."""
  validate_model(ml_collections.ConfigDict(dict(model.to_dict(), decoder_width=4, decoder_depth=1,
                                                decoder_heads=1, decoder="self_attention")))


def validate_knn_eval(config):
  """The k-NN evaluation (configs/knn.py), before its init run is read. Its model, once
  resolved against that run, is validate_encoder's (knn_eval.check_knn_config)."""
  _require(bool(config.init.workdir), "init.workdir", "k-NN needs a pre-training run",
           "use pr_mim_jax/configs/knn.py:init=WORKDIR")
  validate_init_step(config)
  validate_knn(config.knn)
  dtype = config.model.compute_dtype
  _require(dtype in DTYPES, "model.compute_dtype", f"unknown value {dtype!r}", f"use one of {DTYPES}")
  validate_data_source(config.data)


def validate_effective_classify(config):
  """Probe / fine-tune fields that the run's mode would silently ignore (or misapply): each
  is an error, so an override never looks as if it changed a run that it did not."""
  probe = config.mode == "linear_probe"
  freeze = config.head.freeze_encoder
  _require(freeze == probe, "head.freeze_encoder",
           "linear probing trains only the head (LARS updates no encoder weight): an unfrozen "
           "encoder changes nothing but its cost" if probe else
           "fine-tuning's AdamW would still weight-decay the frozen encoder it never trains",
           "use True" if probe else "use False, or pr_mim_jax/configs/linear_probe.py to train "
           "only a head")
  _require(not freeze or config.model.drop_path == 0.0, "model.drop_path",
           f"{config.model.drop_path} has no effect: a frozen encoder runs deterministically",
           "use 0")
  if config.optim.optimizer == "lars":  # make_probe_optimizer: LARS on the head, nothing else
    _require(config.optim.layer_decay == 1.0, "optim.layer_decay",
             f"{config.optim.layer_decay} has no effect: layer decay scales fine-tuning's AdamW, "
             "and LARS trains only the head", "use 1.0")
    _require(config.optim.clip_grad_norm == 0.0, "optim.clip_grad_norm",
             f"{config.optim.clip_grad_norm} has no effect: LARS does not clip gradients (its "
             "trust ratio bounds each update)", "use 0")


def validate_classify(config, num_batch_shards: int):
  """A probe or fine-tune config resolved against its init run (init_run.resolve_config).
  The mesh and init.step are checked before that (validate_mesh, validate_init_step)."""
  model = config.model
  validate_encoder(model)
  _require(model.pretrained_image_size % vit.parse_variant(model.variant).patch == 0,
           "init.workdir", "the pre-trained image size is not a multiple of the patch size",
           "use a matching pre-training run")
  _require(0.0 <= model.drop_path < 1.0, "model.drop_path", f"got {model.drop_path}",
           "use a rate in [0, 1), e.g. 0.1")
  _require(config.head.pool in classifier.POOLS, "head.pool", f"unknown value {config.head.pool!r}",
           f"use one of {classifier.POOLS}")
  _require(config.head.kind in classifier.HEADS, "head.kind", f"unknown value {config.head.kind!r}",
           f"use one of {classifier.HEADS}")
  o = config.optim
  _require(o.optimizer in optim.CLASSIFY_OPTIMIZERS, "optim.optimizer",
           f"unknown value {o.optimizer!r}", f"use one of {optim.CLASSIFY_OPTIMIZERS}")
  _require(config.mode != "linear_probe" or o.optimizer == "lars", "optim.optimizer",
           "linear probing trains the head with LARS", "use 'lars'")
  _require(config.mode != "finetune" or o.optimizer == "adamw", "optim.optimizer",
           "fine-tuning trains the whole model, and 'lars' here updates only the head",
           "use 'adamw' (or pr_mim_jax/configs/linear_probe.py for a probe)")
  validate_effective_classify(config)
  _require(0.0 < o.layer_decay <= 1.0, "optim.layer_decay", f"got {o.layer_decay}",
           "use a factor in (0, 1], 1 = off")
  _require(0.0 <= o.momentum < 1.0, "optim.momentum", f"got {o.momentum}", "use e.g. 0.9")
  validate_optim(o)
  for field in ("mixup_alpha", "cutmix_alpha"):
    _require(config.mixup[field] >= 0, f"mixup.{field}", f"got {config.mixup[field]}",
             "use 0 (off) or a Beta parameter > 0")
  for field in ("prob", "switch_prob"):
    _require(0.0 <= config.mixup[field] <= 1.0, f"mixup.{field}", f"got {config.mixup[field]}",
             "use a probability in [0, 1]")
  _require(0.0 <= config.label_smoothing < 1.0, "label_smoothing",
           f"got {config.label_smoothing}", "use a value in [0, 1), e.g. 0.1")
  _require(0.0 <= config.ema.decay < 1.0, "ema.decay", f"got {config.ema.decay}",
           "use 0 (off) or e.g. 0.9999")
  _require(config.data.augment in pipeline.AUGMENTS, "data.augment",
           f"unknown value {config.data.augment!r}", f"use one of {pipeline.AUGMENTS}")
  erase = config.data.random_erase
  _require(0.0 <= erase <= 1.0, "data.random_erase", f"got {erase}",
           "use a probability in [0, 1], 0 = off")
  _require(erase == 0.0 or config.data.augment == "randaugment", "data.random_erase",
           f"{erase} has no effect with data.augment={config.data.augment!r} (erasing is part "
           "of the 'randaugment' recipe)", "use 0, or data.augment='randaugment'")
  validate_data(config.data)
  validate_seed(config)
  for field in ("batch_size", "eval.batch_size"):
    value = config.eval.batch_size if field == "eval.batch_size" else config.batch_size
    _require(isinstance(value, int) and value > 0 and value % num_batch_shards == 0, field,
             f"got {value!r}", f"use a positive multiple of {num_batch_shards}"
             f"{_or_fewer_devices(value) if field == 'batch_size' else ''}")
  for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _positive_int(f"train.{field}", config.train[field])
  for field in ("total_steps", "eval_every"):
    _require(isinstance(config.train[field], int) and config.train[field] >= 0, f"train.{field}",
             f"got {config.train[field]!r}", "use an integer >= 0")
