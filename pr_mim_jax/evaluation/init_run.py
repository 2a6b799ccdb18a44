"""The run a probe, fine-tune or k-NN evaluation starts from (config.init.workdir).

Its config.json gives the architecture left empty in the evaluation's config (resolve_model)
and, by model size, MAE's fine-tuning recipe for the fields left None (resolve_config); its
checkpoint gives the encoder weights (read_pretrained_encoder), and nothing else is read.
"""

import json
import logging

import ml_collections
from etils import epath

from pr_mim_jax.errors import UserError
from pr_mim_jax.models import vit
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpointing

ARCH_FIELDS = ("variant", "width", "depth", "heads", "posemb", "image_size")


def pretrained_config(init_workdir: str):
  """The config.json a pre-training run left in its workdir (a ConfigDict)."""
  path = epath.Path(init_workdir) / "config.json"
  if epath.Path(init_workdir).is_file():  # e.g. an official MAE .pth or a timm .safetensors
    raise UserError(f"config.init.workdir: {init_workdir} is a file, not a workdir; convert "
                    "PyTorch / timm weights to one first: python -m pr_mim_jax.interop.convert "
                    f"--from={init_workdir} --to=DIR, then init=DIR")
  if not path.exists():
    raise UserError(f"config.init.workdir: {init_workdir} has no config.json; point it at a "
                    "pre-training workdir (python -m pr_mim_jax.main --config=pretrain ... "
                    "--workdir=DIR); probing and fine-tuning also take init= (empty) with "
                    "--config.model.variant=... for random init")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise UserError(f"config.init.workdir: {path} is not valid JSON ({e})") from None
  if config.get("mode") in ("linear_probe", "finetune"):  # it has an encoder, but not MAE's
    logging.warning("config.init.workdir: %s is a %s run, not a pre-training run: its encoder "
                    "as that run left it is the starting point (its own config.init.workdir: "
                    "%r)", init_workdir, config.mode, config.get("init", {}).get("workdir"))
  if config.get("mode") == "knn":  # a k-NN workdir: a config.json, but no checkpoint
    raise UserError(f"config.init.workdir: {init_workdir} is a k-NN evaluation's workdir, "
                    "which holds no checkpoint; point it at the run it evaluated (its "
                    f"config.init.workdir: {config.init.workdir!r})")
  try:
    vit.parse_variant(config.model.variant)
  except (AttributeError, KeyError, TypeError, ValueError):
    raise UserError(f"config.init.workdir: {path} names no model (config.model.variant); "
                    "point it at a pre-training, probing or fine-tuning workdir") from None
  return config


def resolve_model(config) -> ml_collections.ConfigDict:
  """config.model with the architecture fields left empty ('' / 0) taken from the init run.

  A field set in both with different values is an error, except image_size: a different
  resolution is allowed and the position embeddings are interpolated. width, depth and heads
  compare as built: the init run's 0 means its variant's value.
  """
  model = ml_collections.ConfigDict(config.model.to_dict())
  if config.init.workdir:
    pre = pretrained_config(config.init.workdir).model
    spec = vit.parse_variant(pre.variant)
    for field in ARCH_FIELDS:
      built = pre[field] or getattr(spec, field, pre[field])
      if not model[field]:
        model[field] = pre[field]
      elif field != "image_size" and model[field] != built:
        raise UserError(f"config.model.{field}: {model[field]!r} differs from the pre-trained "
                        f"model's {built!r} ({config.init.workdir}/config.json); leave it "
                        "empty to use the pre-trained value")
    model.pretrained_image_size = pre.image_size
  else:
    model.posemb = model.posemb or "sincos"
    for field in ("variant", "image_size"):
      if not model[field]:
        raise UserError(f"config.model.{field}: needed when config.init.workdir is empty "
                        "(random init); set it, or set init=WORKDIR of a pre-training run")
    model.pretrained_image_size = model.image_size
  return model


# MAE's fine-tuning recipe per model size (its FINETUNE.md), for the RECIPE_FIELDS in order.
MAE_FINETUNE_RECIPES = {"B": (100.0, 5e-4, 0.65, 0.1), "L": (50.0, 1e-3, 0.75, 0.2),
                        "H": (50.0, 1e-3, 0.75, 0.3)}
RECIPE_FIELDS = (("optim", "epochs"), ("optim", "base_lr"), ("optim", "layer_decay"),
                 ("model", "drop_path"))


def resolve_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` with what it leaves empty filled in: config.model from the init run
  (resolve_model) and the RECIPE_FIELDS left None from MAE's recipe for that model's size.
  The recipe follows the model actually loaded, so a pre-trained ViT-L gets L's recipe."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model = resolve_model(config)
  empty = [(group, field) for group, field in RECIPE_FIELDS if resolved[group][field] is None]
  if not empty:
    return resolved
  size = resolved.model.variant.split("/")[0]
  if size not in MAE_FINETUNE_RECIPES:
    names = ", ".join(f"config.{group}.{field}" for group, field in empty)
    raise UserError(f"{names}: MAE's fine-tuning recipes cover ViT-B, L and H, and this model "
                    f"is {resolved.model.variant}; set them, e.g. from the ViT-B recipe: "
                    "--config.optim.epochs=100 --config.optim.base_lr=5e-4 "
                    "--config.optim.layer_decay=0.65 --config.model.drop_path=0.1")
  for (group, field), value in zip(RECIPE_FIELDS, MAE_FINETUNE_RECIPES[size]):
    if resolved[group][field] is None:
      resolved[group][field] = value
  return resolved


def read_pretrained_encoder(config, mesh, scan_layers: bool):
  """Encoder params of the init run's checkpoint (replicated), or None for random init.

  Laid out for an encoder with `scan_layers` (stacked 'blocks') or without, whichever layout
  the checkpoint was saved in."""
  if not config.init.workdir:
    logging.warning("config.init.workdir is empty: the encoder starts from random init")
    return None
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(config.init.workdir),
                                    max_to_keep=1 << 30)
  try:
    encoder, step = ckpt.restore_subtree(("params", "encoder"), sharding.replicated(mesh),
                                         None if config.init.step < 0 else config.init.step)
  finally:
    ckpt.close()
  logging.info("encoder from %s, step %d", ckpt.directory, step)
  return vit.scan_params(encoder) if scan_layers else vit.unscan_params(encoder)
