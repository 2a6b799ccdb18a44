r"""Command line: weights in and out, between our workdirs and timm / official MAE files.

  python -m pr_mim_jax.interop.convert --from=mae_pretrain_vit_base.pth --to=workdirs/mae_b16
  python -m pr_mim_jax.interop.convert --from=workdirs/demo --to=vit.safetensors [--with_decoder]

Sources (told apart by content): a `torch.save` file (.pth / .pt / .bin, read without
torch by pth_reader), a .safetensors file, or a pre-training workdir (`--step=N`, default -1:
the latest checkpoint). Targets, from --to unless --format names one:
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
a flag that does not apply to the source / target is an error. Outputs are built next to
the target and renamed into place, with the permissions any new file gets (0666 less the
umask; safetensors itself would leave 0600). An existing target, or the JSON beside a
.safetensors one, is kept unless --overwrite, and even then only files and pr_mim_jax
workdirs (with config.json) are replaced: never another directory, nor a symbolic link.
"""

import json
import os
import pathlib
import shutil
import sys
import tempfile
import types

import ml_dtypes
import numpy as np
from absl import flags
from ml_collections import config_flags

from pr_mim_jax import cli
from pr_mim_jax.configs import pretrain as pretrain_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.interop import pth_reader
from pr_mim_jax.interop import timm_weights

FORMATS = ("workdir", "timm", "mae")
METADATA_KEY = "pr_mim_jax"
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
      heads=flags.DEFINE_integer("heads", 0, "Encoder heads, when the width is not a standard one."),
      decoder_heads=flags.DEFINE_integer("decoder_heads", 0, "Decoder heads (MAE's 512 wide: 16)."),
      overwrite=flags.DEFINE_bool("overwrite", False, "Replace an existing target."),
      config=config_flags.DEFINE_config_file(
          "config", None, f"Pre-training config of a workdir target (default {DEFAULT_CONFIG}); "
          "its model fields are set from the weights.", lock_config=True))


# --- sources -------------------------------------------------------------------------------

def _is_workdir(path: pathlib.Path) -> bool:
  return path.is_dir()


def _read_file(path: pathlib.Path) -> tuple[dict, dict]:
  """(state dict of NumPy arrays, our metadata from a safetensors header or {}). The kind
  is told by content, not suffix: JSON after 8 bytes is safetensors (a zip has its
  compression method there), a zip or a pickle is torch.save."""
  if not path.is_file():
    raise UserError(f"--from: {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(9)
  if head[8:9] != b"{":
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
      return pth_reader.state_dict(pth_reader.read(str(path)), str(path)), {}
    raise UserError(f"--from: {path} is neither a torch.save file nor safetensors")
  try:
    state, metadata = _read_safetensors(path)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"--from: {path} starts like safetensors but cannot be read; it looks "
                    f"truncated or corrupt ({type(e).__name__}: {str(e)[:200]})") from None
  return state, _our_metadata(metadata, path)


def _our_metadata(metadata: dict, path: pathlib.Path) -> dict:
  """The dict our exports keep under METADATA_KEY in a safetensors header; {} if absent."""
  if METADATA_KEY not in metadata:
    return {}
  try:
    ours = json.loads(metadata[METADATA_KEY])
  except (TypeError, ValueError):
    ours = None
  if not isinstance(ours, dict):
    raise UserError(f"--from: {path}: the header metadata {METADATA_KEY!r} is not a JSON object; "
                    "it is only our export record, so re-export the file or save it without it")
  return ours


def _read_safetensors(path: pathlib.Path) -> tuple[dict, dict]:
  """(name -> array, header metadata) of a .safetensors file, read from its own layout: an
  8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}},
  then the bytes. Read by hand because safetensors' NumPy API rejects bfloat16 tensors,
  which timm's hub files may hold."""
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    if not 2 <= size <= 100 << 20:
      raise ValueError(f"header length {size} is not plausible")
    header = json.loads(f.read(size))
    data = f.read()
  metadata = header.pop("__metadata__", None) or {}
  state = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    if info["dtype"] not in dtypes or not 0 <= begin <= end <= len(data):
      raise ValueError(f"tensor {name}: dtype {info['dtype']} or offsets {begin}..{end} unusable")
    state[name] = np.frombuffer(data[begin:end], np.dtype(dtypes[info["dtype"]]).newbyteorder(
        "<")).reshape(info["shape"])
  return state, metadata


def read_file_weights(path, heads: int = 0, decoder_heads: int = 0, decoder: bool = True):
  """(params, arch, description) of a timm / MAE file. Heads: the flags, else our export
  metadata, else the standard widths. decoder=False drops MAE's decoder keys unread (a
  timm target holds the encoder alone)."""
  path = pathlib.Path(path)
  state, meta = _read_file(path)
  heads = heads or meta.get("timm", {}).get("kwargs", {}).get("num_heads", 0)
  decoder_heads = decoder_heads or (meta.get("decoder") or {}).get("heads", 0)
  ignored = [k for k in timm_weights.IGNORED if k in state]
  if not decoder and timm_weights.has_decoder_keys(state):
    state = {k: v for k, v in state.items() if not timm_weights.is_decoder_key(k)}
    ignored.append("the MAE decoder")
  arch = timm_weights.infer_arch(state, heads, decoder_heads)
  params = timm_weights.from_state_dict(state, arch)
  note = f" (ignored: {', '.join(ignored)})" if ignored else ""
  return params, arch, f"{path}{note}"


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
  if config.get("mode", "pretrain") != "pretrain":
    raise UserError(f"--from: {path} is a {config.mode} workdir; export a pre-training workdir")
  return config


def check_mae_export(config, fmt: str) -> None:
  """Official MAE's decoder is self-attention: a workdir with another decoder (CrossMAE's
  cross-attention) would load into its code as a different model, so it is refused."""
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


def read_workdir_weights(path, step: int = -1):
  """(params as NumPy, arch, description, config) of a pre-training workdir's checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.models import vit  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  config = _workdir_config(path)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(path)), max_to_keep=1 << 30)
  try:
    params, step = ckpt.restore_subtree(
        ("params",), jax.sharding.SingleDeviceSharding(jax.devices()[0]), None if step < 0 else step)
  finally:
    ckpt.close()
  params = vit.unscan_params(jax.tree.map(np.asarray, params))
  return params, arch_from_config(config.model, params), f"{path} step {step}", config


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


def sidecar(path: pathlib.Path) -> pathlib.Path:
  """The JSON written next to a .safetensors target."""
  return path.with_suffix(".json")


def _check_replaceable(path: pathlib.Path, workdir: bool, overwrite: bool, what: str) -> None:
  """Refuses to write `path` over anything but (with --overwrite) a file of ours or, for a
  workdir, a pr_mim_jax workdir: a command never removes data it did not write."""
  if path.is_symlink():
    raise UserError(f"--to: {path}{what} is a symbolic link; give the path it points to "
                    f"({os.readlink(path)}) or remove the link")
  if not path.exists() or (workdir and path.is_dir() and not any(path.iterdir())):
    return
  if not overwrite:
    raise UserError(f"--to: {path}{what} exists; pass --overwrite to replace it, or choose "
                    "another path")
  if path.is_dir() != workdir:
    raise UserError(f"--to: {path}{what} is {'a directory' if path.is_dir() else 'a file'}, "
                    f"which --overwrite does not replace with a {'workdir' if workdir else 'file'}; "
                    "choose another path, or remove it yourself")
  if workdir and not (path / "config.json").is_file():
    raise UserError(f"--to: {path} is a directory but not a pr_mim_jax workdir (no config.json), "
                    "so --overwrite does not replace it; choose another path, or remove it yourself")


def _check_writable(directory: pathlib.Path) -> None:
  """A UserError now, not a traceback after reading the weights, if `directory` takes no files."""
  try:
    tempfile.TemporaryFile(dir=directory).close()
  except OSError as e:
    raise UserError(f"--to: cannot write in {directory} ({e.strerror}); choose a directory "
                    "you can write to") from None


def _check_target(path: pathlib.Path, fmt: str, overwrite: bool) -> None:
  """Everything the write will replace (a .safetensors target's JSON too) may be replaced."""
  if path.name in ("", ".", ".."):
    raise UserError(f"--to: {path} names no file or directory of its own; give a new path, "
                    "e.g. out/vit.safetensors or workdirs/converted")
  if not path.parent.is_dir():
    raise UserError(f"--to: the directory {path.parent} does not exist")
  _check_replaceable(path, fmt == "workdir", overwrite, "")
  if fmt != "workdir":
    _check_replaceable(sidecar(path), False, overwrite, f" (written next to {path.name})")
  _check_writable(path.parent)


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """Moves tmp onto path (a file or a directory), removing what was there."""
  if path.is_dir():
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old)
  else:
    os.replace(tmp, path)


def _umask() -> int:
  """The process umask, read by setting it and putting it back (there is no getter); it is
  077 for that instant, so nothing another thread creates meanwhile is exposed."""
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


def _as_new_file(path: pathlib.Path) -> None:
  """Gives `path` the mode open() gives a new file (0666 less the umask): safetensors writes
  0600, which would keep a file meant for sharing from others the umask lets read it."""
  os.chmod(path, 0o666 & ~_umask())


def timm_metadata(arch: timm_weights.Arch, with_decoder: bool, source: str) -> dict:
  decoder = (dict(width=arch.decoder_width, depth=arch.decoder_depth, heads=arch.decoder_heads,
                  mlp_hidden=arch.decoder_hidden, pred_dim=arch.pred_dim)
             if with_decoder else None)
  return {"timm": timm_weights.timm_model(arch), "posemb": arch.posemb, "decoder": decoder,
          "source": source, "written_by": "python -m pr_mim_jax.interop.convert"}


def write_timm(params, arch, to: pathlib.Path, with_decoder: bool, source: str) -> str:
  """The encoder (and with_decoder, MAE's decoder) as safetensors + the JSON next to it."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if with_decoder and not arch.has_decoder:
    raise UserError(f"--with_decoder: {source} has no decoder")
  state = timm_weights.to_state_dict(params, arch, with_decoder)
  meta = timm_metadata(arch, with_decoder, source)
  json_path = sidecar(to)
  tmp, tmp_json = (p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in (to, json_path))
  try:
    safetensors.numpy.save_file(state, str(tmp), metadata={
        "format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    _as_new_file(tmp)
    tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _replace(tmp_json, json_path)
    _replace(tmp, to)
  finally:
    for p in (tmp, tmp_json):
      p.unlink(missing_ok=True)
  note = meta["timm"].get("note")
  return (f"wrote {to} ({len(state)} arrays{', with the MAE decoder' if with_decoder else ''}) "
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
    workdir_records.write_records(str(tmp), config)
    ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp)), async_save=False)
    try:
      ckpt.save(0, state)
    finally:
      ckpt.close()
    _replace(tmp, to)
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
                config) -> None:
  """A UserError for a flag that does not apply to this source / target (never ignored)."""
  if step != -1 and not src_is_workdir:
    raise UserError("--step: picks a checkpoint of a workdir source; --from is a file, which "
                    "has one set of weights. Drop --step")
  if (heads or decoder_heads) and src_is_workdir:
    raise UserError("--heads / --decoder_heads: a workdir source's config has its heads; "
                    "drop the flags")
  if config is not None and fmt != "workdir":
    raise UserError(f"--config: sets up a workdir target; a {fmt} file holds no config. Drop "
                    "--config, or write a workdir")
  if config is not None and cli.config_kind(config) != "pretrain":
    raise UserError(f"--config: a {cli.config_kind(config)} config; a workdir target needs a "
                    f"pre-training config, e.g. --config={DEFAULT_CONFIG}")


def convert(src: str, to: str, fmt: str = "", *, with_decoder: bool = False, step: int = -1,
            heads: int = 0, decoder_heads: int = 0, overwrite: bool = False, config=None) -> str:
  """Reads `src`, writes `to`; returns a one-line summary. Raises UserError, writing nothing."""
  src_path, to_path = pathlib.Path(src), pathlib.Path(to)
  fmt = target_format(to, fmt, with_decoder)
  check_flags(_is_workdir(src_path), fmt, step, heads, decoder_heads, config)
  _check_target(to_path, fmt, overwrite)
  if _is_workdir(src_path):
    if fmt == "workdir":
      raise UserError("--from and --to are both workdirs; nothing to convert")
    check_mae_export(_workdir_config(src_path), fmt)
    params, arch, source, _ = read_workdir_weights(src_path, step)
  else:
    params, arch, source = read_file_weights(src_path, heads, decoder_heads, fmt != "timm")
  if fmt == "workdir":
    return write_workdir(params, arch, to_path, config if config is not None else default_config(),
                         source)
  return write_timm(params, arch, to_path, fmt == "mae", source)


def _run(f: types.SimpleNamespace) -> int:
  print(convert(f.src.value, f.to.value, f.format.value, with_decoder=f.with_decoder.value,
                step=f.step.value, heads=f.heads.value, decoder_heads=f.decoder_heads.value,
                overwrite=f.overwrite.value, config=f.config.value))
  return 0


def main(argv=None) -> int:
  f = _define_flags()
  return cli.run(lambda: _run(f), {"from": "mae_pretrain_vit_base.pth", "to": "workdirs/mae_b16"},
                 argv)


if __name__ == "__main__":
  sys.exit(main())
