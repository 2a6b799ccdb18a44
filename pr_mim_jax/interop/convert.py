r"""Command line: weights in and out, between our workdirs and timm / official MAE files.

  python -m pr_mim_jax.interop.convert --from=mae_pretrain_vit_base.pth --to=workdirs/mae_b16
  python -m pr_mim_jax.interop.convert --from=workdirs/demo --to=vit.safetensors [--with_decoder]

Sources (told apart by content): a `torch.save` file (.pth / .pt / .bin, read without
torch by pth_reader), a .safetensors file, or a pre-training workdir (`--step=N`, default -1:
the latest checkpoint). A fine-tuning or linear-probing workdir exports to timm as a whole
classifier (`--ema`: its EMA weights): head.*, num_classes, and global_pool from its pool
('gap': 'avg', the final norm as fc_norm; 'cls': 'token'); a probe's BatchNorm is folded
into head.*. Targets, from --to unless --format names one:
- `workdir` (a path without a suffix): config.json (a pre-training config, `--config`, for
  the file's architecture) plus a step-0 checkpoint of a complete pre-training state, so
  every mode runs from it: `init=WORKDIR` for probing / fine-tuning / k-NN, or
  `--workdir=WORKDIR` with the same config to continue pre-training.
- `timm` (a .safetensors path): the encoder in timm's names, plus `<to minus suffix>.json`
  naming the timm model and its arguments (also in the file's metadata). The name is
  timm's own only when the shape (width, depth, heads, patch, image size, MLP ratio 4) is
  exactly one of timm's plain ViTs (e.g. vit_base_patch16_224). Any other shape (our demo's
  128-wide, 6-block ViT/8) gets the nearest plain ViT, of the same patch size where timm
  has one, as the entrypoint the kwargs override, and a "note" naming every overridden
  value, also printed: timm.create_model(name, pretrained=False, **kwargs) builds the
  right model either way, since timm's vit_* entrypoints let kwargs override their shape.
  A source file's MAE decoder is not read for it.
- `mae`: timm plus the official MAE decoder keys (or `--with_decoder`); refused for a
  workdir whose decoder is not self-attention (CrossMAE's), which MAE's code would misrun.
Every problem (missing / unknown keys, shapes) is reported at once and nothing is written;
a flag that does not apply to the source / target is an error. Files are read by
weight_files; what --to may replace, and how outputs move into place, is safe_replace's.
"""

import json
import os
import pathlib
import shutil
import sys
import types

import numpy as np
from absl import flags

from pr_mim_jax import cli
from pr_mim_jax.configs import pretrain as pretrain_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.interop import safe_replace
from pr_mim_jax.interop import timm_weights
from pr_mim_jax.interop import weight_files

FORMATS = ("workdir", "timm", "mae")
DEFAULT_CONFIG = "pr_mim_jax/configs/pretrain.py:method=mae"



def _define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined when it runs (so importing this module defines none)."""
  return types.SimpleNamespace(
      src=flags.DEFINE_string("from", None, "A .pth/.pt/.bin or .safetensors file, or a workdir."),
      to=flags.DEFINE_string("to", None, "A workdir, or a .safetensors file."),
      format=flags.DEFINE_string("format", "", f"Target format, one of {FORMATS}; '' = from --to."),
      with_decoder=flags.DEFINE_bool("with_decoder", False,
                                     "Export MAE's decoder keys too (= --format=mae)."),
      step=flags.DEFINE_integer("step", -1, "Checkpoint step of a workdir source; -1 = latest."),
      ema=flags.DEFINE_bool("ema", False, "Export the EMA weights of a fine-tuning / probing "
                            "workdir source (config.ema.decay > 0)."),
      heads=flags.DEFINE_integer("heads", 0, "Encoder heads, when the width is not a standard one."),
      decoder_heads=flags.DEFINE_integer("decoder_heads", 0, "Decoder heads (MAE's 512 wide: 16)."),
      overwrite=flags.DEFINE_bool("overwrite", False, "Replace an existing target."),
      config=cli.define_config_file(
          "config", None, f"Pre-training config of a workdir target (default {DEFAULT_CONFIG}); "
          "its model fields are set from the weights.", lock_config=True))


# --- sources -------------------------------------------------------------------------------

CLASSIFIER_MODES = ("finetune", "linear_probe")  # workdirs exported as timm classifiers


def _is_workdir(path: pathlib.Path) -> bool:
  return path.is_dir()


def is_classifier(config) -> bool:
  return config.get("mode", "pretrain") in CLASSIFIER_MODES


def _workdir_config(path: pathlib.Path):
  """The pre-training config of a source workdir, from its config.json."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = path / "config.json"
  if not cfg.is_file():
    raise UserError(f"--from: {path} is a directory without config.json; point it at a "
                    "pre-training workdir")
  try:
    raw = json.loads(cfg.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise UserError(f"--from: {cfg} is not readable JSON ({e}); restore the workdir's "
                    "config.json (it is written when the run starts)") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
    raise UserError(f"--from: {cfg} has no `model` field; it is not a pre-training workdir's "
                    "config. Restore it, or point --from at a pre-training workdir")
  config = ml_collections.ConfigDict(raw)
  if config.get("mode", "pretrain") not in ("pretrain", *CLASSIFIER_MODES):
    raise UserError(f"--from: {path} is a {config.mode} workdir, which has no weights of its "
                    "own; export a pre-training, fine-tuning or linear-probing workdir")
  return config


def check_mae_export(config, fmt: str) -> None:
  """Official MAE's decoder is self-attention: a workdir with another decoder (CrossMAE's
  cross-attention) would load into its code as a different model, so it is refused."""
  if fmt == "mae" and is_classifier(config):
    raise UserError(f"--format=mae / --with_decoder: a {config.mode} workdir has no decoder; "
                    "use --format=timm (the classifier in timm's names)")
  decoder = config.model.get("decoder", "self_attention")
  if fmt == "mae" and decoder != "self_attention":
    raise UserError(f"--format=mae / --with_decoder: the workdir's decoder is {decoder!r} "
                    "(config.model.decoder), but official MAE's decoder is self-attention and "
                    "would run these weights as another model. Use --format=timm to export "
                    "the encoder alone")


def arch_from_config(model, params) -> timm_weights.Arch:
  """The Arch of a pre-training config's model fields and its (unscanned) params."""
  from pr_mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  spec = vit.parse_variant(model.variant)
  enc = params["encoder"]
  dec = dict(decoder_width=model.decoder_width, decoder_depth=model.decoder_depth,
             decoder_heads=model.decoder_heads,
             decoder_hidden=np.shape(params["decoder_block0"]["mlp"]["fc1"]["kernel"])[1],
             pred_dim=np.shape(params["decoder_pred"]["kernel"])[1]) if "decoder_block0" in params else {}
  return timm_weights.Arch(
      width=model.width or spec.width, depth=model.depth or spec.depth,
      heads=model.heads or spec.heads, patch=spec.patch, grid=model.image_size // spec.patch,
      mlp_hidden=np.shape(enc["block0"]["mlp"]["fc1"]["kernel"])[1], posemb=model.posemb, **dec)


def read_workdir_weights(path, step: int = -1, ema: bool = False):
  """(params as NumPy, arch, description, config) of a workdir's checkpoint. A pre-training
  workdir's params are the MAE's; a fine-tuning / probing one's are {'encoder', 'head'},
  plus 'batch_stats' (the probe head's BatchNorm statistics); `ema` reads its EMA weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  config = _workdir_config(path)
  classifier = is_classifier(config)
  if ema and not classifier:
    raise UserError("--ema: a pre-training workdir keeps no EMA weights; drop --ema")
  if ema and not config.get("ema", {}).get("decay", 0):
    raise UserError(f"--ema: {path} was trained without an EMA (config.ema.decay is 0); "
                    "drop --ema")
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(path)), max_to_keep=1 << 30)
  try:
    params, step = ckpt.restore_subtree(("ema_params" if ema else "params",), sharding,
                                        None if step < 0 else step)
    if classifier and config.head.kind == "batchnorm_linear":
      params = dict(params, batch_stats=ckpt.restore_subtree(("batch_stats",), sharding, step)[0])
  finally:
    ckpt.close()
  params = vit.unscan_params(jax.tree.map(np.asarray, params))
  source = f"{path} step {step}{' (EMA weights)' if ema else ''}"
  return params, arch_from_config(config.model, params), source, config


# --- targets -------------------------------------------------------------------------------

def target_format(to: str, fmt: str, with_decoder: bool) -> str:
  if fmt and fmt not in FORMATS:
    raise UserError(f"--format: unknown value {fmt!r}; use one of {FORMATS}")
  if not fmt:
    suffix = pathlib.Path(to).suffix
    if suffix == ".safetensors":
      fmt = "timm"
    elif not suffix or pathlib.Path(to).is_dir():
      fmt = "workdir"
    else:
      raise UserError(f"--to: cannot tell the format of {to}; write a .safetensors file (timm) "
                      "or a workdir (a directory), or pass --format")
  if fmt == "workdir" and with_decoder:
    raise UserError("--with_decoder: applies to .safetensors targets (it means --format=mae); "
                    "a workdir target takes the decoder from the file when it has one")
  if fmt == "timm" and with_decoder:
    fmt = "mae"
  return fmt


def timm_metadata(arch: timm_weights.Arch, with_decoder: bool, source: str,
                  num_classes: int = 0, global_pool: str = "token") -> dict:
  decoder = (dict(width=arch.decoder_width, depth=arch.decoder_depth, heads=arch.decoder_heads,
                  mlp_hidden=arch.decoder_hidden, pred_dim=arch.pred_dim)
             if with_decoder else None)
  return {"timm": timm_weights.timm_model(arch, num_classes, global_pool), "posemb": arch.posemb,
          "decoder": decoder, "source": source,
          "written_by": "python -m pr_mim_jax.interop.convert"}


def _write_failed(to: pathlib.Path, e: Exception) -> UserError:
  """The one line for a write that failed (a full disk, a quota, permissions). Everything is
  written under temporary names and moved into place all or none, so `to` is as it was."""
  cause = e.__cause__ if isinstance(e, UserError) and e.__cause__ is not None else e
  lines = str(cause).strip().splitlines() or [type(cause).__name__]
  why = getattr(cause, "strerror", None) or lines[0]
  why = why if len(why) <= 160 else "..." + why[-160:]  # a library's long message ends in why
  return UserError(f"--to={to}: writing it failed ({why}); nothing was replaced and no partial "
                   "file is left. Free space (or fix the permissions), then rerun the same "
                   "command")


def write_timm(params, arch, to: pathlib.Path, with_decoder: bool, source: str,
               head_config=None) -> str:
  """The encoder (and with_decoder, MAE's decoder) as safetensors + the JSON next to it;
  with head_config (a fine-tuning / probing workdir's config.head) the whole classifier."""
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if with_decoder and not arch.has_decoder:
    raise UserError(f"--with_decoder: {source} has no decoder")
  state = timm_weights.to_state_dict(params, arch, with_decoder)
  num_classes, pool = 0, "token"
  if head_config is not None:
    state = timm_weights.classifier_state(state, params["head"], params.get("batch_stats", {})
                                          .get("head", {}), head_config.pool, head_config.kind)
    num_classes, pool = state["head.bias"].shape[0], timm_weights.POOL_TO_TIMM[head_config.pool]
  meta = timm_metadata(arch, with_decoder, source, num_classes, pool)
  json_path = safe_replace.sidecar(to)
  tmp, tmp_json = (p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in (to, json_path))
  try:
    try:
      safetensors.numpy.save_file(state, str(tmp), metadata={
          "format": "pt", weight_files.METADATA_KEY: json.dumps(meta, sort_keys=True)})
      safe_replace.as_new_file(tmp)
      tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
      safe_replace.replace_together([(tmp_json, json_path), (tmp, to)])
    except (OSError, safetensors.SafetensorError) as e:
      raise _write_failed(to, e) from e
  finally:
    for p in (tmp, tmp_json):
      p.unlink(missing_ok=True)
  note = meta["timm"].get("note")
  what = (f", a classifier: {num_classes} classes, global_pool={pool!r}"
          if head_config is not None else ", with the MAE decoder" if with_decoder else "")
  return (f"wrote {to} ({len(state)} arrays{what}) "
          f"and {json_path}: timm.create_model({meta['timm']['name']!r}, **kwargs)"
          + (f"; {note}" if note else ""))


def default_config():
  """The packaged pretrain config with method=mae (DEFAULT_CONFIG)."""
  return pretrain_config.get_config(DEFAULT_CONFIG.partition(":")[2])


def fit_config(config, arch: timm_weights.Arch) -> None:
  """Sets config.model's architecture fields from the weights'."""
  from pr_mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  if arch.mlp_hidden != 4 * arch.width or (arch.has_decoder and
                                           arch.decoder_hidden != 4 * arch.decoder_width):
    raise UserError(f"the weights have MLP ratio {arch.mlp_ratio:g} (decoder: "
                    f"{arch.decoder_hidden / max(arch.decoder_width, 1):g}); pre-training configs "
                    "use 4. Convert to .safetensors instead, or to a workdir from a 4x model")
  m = config.model
  exact = next((n for n, shape in vit.VARIANTS.items()
                if shape == (arch.width, arch.depth, arch.heads)), None)
  by_width = next((n for n, (w, _, _) in vit.VARIANTS.items() if w == arch.width), "B")
  m.variant = f"{exact or by_width}/{arch.patch}"
  m.width, m.depth, m.heads = (0, 0, 0) if exact else (arch.width, arch.depth, arch.heads)
  m.image_size, m.posemb = arch.image_size, arch.posemb
  if arch.has_decoder:
    m.decoder_width, m.decoder_depth, m.decoder_heads = (
        arch.decoder_width, arch.decoder_depth, arch.decoder_heads)
    if m.decoder != "self_attention":
      raise UserError(f"config.model.decoder: {m.decoder!r}, but the weights hold MAE's "
                      "self-attention decoder; use 'self_attention'")


def _merge(fresh, loaded):
  """fresh params (jax arrays) with every array of `loaded` put in; a WeightsError lists the
  arrays that do not fit. Returns (params, top-level groups left fresh)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  flat_fresh = flax.traverse_util.flatten_dict(fresh, sep="/")
  flat_loaded = flax.traverse_util.flatten_dict(loaded, sep="/")
  problems = [f"{k} (not in the model)" for k in flat_loaded if k not in flat_fresh]
  problems += [f"{k}: file {np.shape(v)}, model {flat_fresh[k].shape}"
               for k, v in flat_loaded.items()
               if k in flat_fresh and tuple(np.shape(v)) != tuple(flat_fresh[k].shape)]
  if problems:
    raise timm_weights.WeightsError(
        f"{len(problems)} arrays do not fit the configured model: {timm_weights.listing(problems)}")
  out = {k: (jax.device_put(flat_loaded[k], v.sharding) if k in flat_loaded else v)
         for k, v in flat_fresh.items()}
  fresh_groups = sorted({k.split("/")[0] for k in flat_fresh if k not in flat_loaded})
  return flax.traverse_util.unflatten_dict(out, sep="/"), fresh_groups


def write_workdir(params, arch, to: pathlib.Path, config, source: str) -> str:
  """config.json + a step-0 pre-training checkpoint of the loaded weights (see module doc)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import checkpointing, config_validation, optim, pretrain, trainer  # pylint: disable=g-import-not-at-top,g-multiple-import
  from pr_mim_jax.training import train_step, workdir_records  # pylint: disable=g-import-not-at-top,g-multiple-import
  fit_config(config, arch)
  trainer.setup_jax(config)
  config_validation.validate_mesh(config)
  mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
  config_validation.validate_pretrain(config, sharding.num_batch_shards(mesh))
  model = train_step.model_from_config(config)
  task = train_step.task_from_config(config)
  tx = optim.make_optimizer(config.optim, lambda step: 0.0)  # the state's shape only
  if config.model.scan_layers:
    params = vit.scan_params(params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _ = pretrain.create_state(model, tx, task.split, config.seed, mesh, rules)
    merged, fresh = _merge(state.params, params)
    state = state.replace(params=merged)
  tmp = to.with_name(f".{to.name}.tmp-{os.getpid()}")
  try:
    try:
      workdir_records.write_records(str(tmp), config)
      checkpointing.write_checkpoint(str(tmp), 0, state)
      safe_replace.replace(tmp, to)
    except (OSError, checkpointing.CheckpointError) as e:
      raise _write_failed(to, e) from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  what = (f"{config.method}, {config.model.variant} width {arch.width} depth {arch.depth} "
          f"heads {arch.heads}, {arch.image_size} px, posemb {arch.posemb}")
  fresh_note = f"; freshly initialised: {', '.join(fresh)}" if fresh else ""
  return (f"wrote {to}: step-0 pre-training state ({what}) from {source}; decoder "
          f"{'from the file' if arch.has_decoder else 'freshly initialised'}{fresh_note}. "
          f"To continue pre-training, use its config with: {' '.join(model_overrides(config))}")


def model_overrides(config) -> list[str]:
  """--config.model.* flags that give another pre-training config this architecture."""
  fields = ("variant", "width", "depth", "heads", "image_size", "posemb", "decoder_width",
            "decoder_depth", "decoder_heads")
  return [f"--config.model.{f}={config.model[f]}" for f in fields]


def check_flags(src_is_workdir: bool, fmt: str, step: int, heads: int, decoder_heads: int,
                config, ema: bool = False) -> None:
  """A UserError for a flag that does not apply to this source / target (never ignored),
  or a negative number of heads (which would fail later as a reshape traceback)."""
  for name, value in (("heads", heads), ("decoder_heads", decoder_heads)):
    if value < 0:
      raise UserError(f"--{name}={value}: a number of heads must be positive (0, the default: "
                      "from the width or the file's metadata)")
  if ema and not src_is_workdir:
    raise UserError("--ema: reads a fine-tuning / probing workdir's EMA weights; --from is a "
                    "file. Drop --ema")
  if step != -1 and not src_is_workdir:
    raise UserError("--step: picks a checkpoint of a workdir source; --from is a file, which "
                    "has one set of weights. Drop --step")
  if (heads or decoder_heads) and src_is_workdir:
    raise UserError("--heads / --decoder_heads: a workdir source's config has its heads; "
                    "drop the flags")
  if decoder_heads and fmt == "timm":
    raise UserError("--decoder_heads: a timm target holds the encoder alone, so the decoder is "
                    "not read; drop the flag, or keep the decoder with --with_decoder")
  if config is not None and fmt != "workdir":
    raise UserError(f"--config: sets up a workdir target; a {fmt} file holds no config. Drop "
                    "--config, or write a workdir")
  if config is not None and cli.config_kind(config) != "pretrain":
    raise UserError(f"--config: a {cli.config_kind(config)} config; a workdir target needs a "
                    f"pre-training config, e.g. --config={DEFAULT_CONFIG}")


def convert(src: str, to: str, fmt: str = "", *, with_decoder: bool = False, step: int = -1,
            heads: int = 0, decoder_heads: int = 0, overwrite: bool = False, config=None,
            ema: bool = False) -> str:
  """Reads `src`, writes `to`; returns a one-line summary. Raises UserError, writing nothing."""
  src_path, to_path = pathlib.Path(src), pathlib.Path(to)
  fmt = target_format(to, fmt, with_decoder)
  check_flags(_is_workdir(src_path), fmt, step, heads, decoder_heads, config, ema)
  safe_replace.check_target(to_path, fmt, overwrite)
  if _is_workdir(src_path):
    if fmt == "workdir":
      raise UserError("--from and --to are both workdirs; nothing to convert")
    check_mae_export(_workdir_config(src_path), fmt)
    params, arch, source, src_config = read_workdir_weights(src_path, step, ema)
    if is_classifier(src_config):
      return write_timm(params, arch, to_path, False, source, src_config.head)
  else:
    params, arch, source = weight_files.read_file_weights(src_path, heads, decoder_heads,
                                                          decoder=fmt != "timm")
  if fmt == "workdir":
    return write_workdir(params, arch, to_path, config if config is not None else default_config(),
                         source)
  return write_timm(params, arch, to_path, fmt == "mae", source)


def _run(f: types.SimpleNamespace) -> int:
  print(convert(f.src.value, f.to.value, f.format.value, with_decoder=f.with_decoder.value,
                step=f.step.value, heads=f.heads.value, decoder_heads=f.decoder_heads.value,
                overwrite=f.overwrite.value, config=f.config.value, ema=f.ema.value))
  return 0


def main(argv=None) -> int:
  f = _define_flags()
  return cli.run(lambda: _run(f), {"from": "mae_pretrain_vit_base.pth", "to": "workdirs/mae_b16"},
                 argv)


if __name__ == "__main__":
  sys.exit(main())
