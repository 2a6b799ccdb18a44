r"""Pictures of the token split under each throw strategy, on real images of a config's dataset.

  python -m pr_mim_jax.tools.visualize_masks --config=pr_mim_jax/configs/pretrain.py:dataset=shapes --out=DIR \
      [--num_images=8] [--seed=0]

Writes masks_random.png, masks_running_cell.png, masks_furthest.png (one row per image:
original | token map) and masks_compare.png (original | random | running_cell | furthest).
All strategies draw from the same rng, so every row has the same visible set in every
picture. Markings are those of visualize.token_map: visible as is, decoded flat grey, thrown
opaque black-and-yellow diagonal stripes (visible on any image). A title band names the
columns and a legend under the tiles explains the markings. Uses the config's image size,
patch, mask_ratio and throw_ratio (0.5 when the config throws nothing, e.g. MAE) and the eval
split of its dataset (an image folder without one: the images pre-training reads). Tiles are
upscaled (nearest neighbour) to at least 192 px.
"""

import os
import sys
import types

import jax
import numpy as np
from absl import flags
from etils import epath

from pr_mim_jax import cli
from pr_mim_jax.data import augment_np, folder_sources, pipeline, pixels, sources
from pr_mim_jax.errors import UserError
from pr_mim_jax.method import masking
from pr_mim_jax.models import vit
from pr_mim_jax.training import visualize



def _define_flags() -> types.SimpleNamespace:
  """The CLI's flags, defined when it runs (so importing this module defines none)."""
  return types.SimpleNamespace(
      config=cli.define_config_file("config", None, "Pre-training config.",
                                    lock_config=True),
      out=flags.DEFINE_string("out", None, "Output directory for the PNGs (created if missing)."),
      num_images=flags.DEFINE_integer("num_images", 8, "Images (rows) per picture."),
      seed=flags.DEFINE_integer("seed", 0, "Seed of the masks."))

MIN_WIDTH = 192  # px; smaller images are upscaled by an integer factor (room for titles)
DEFAULT_THROW = 0.5  # throw_ratio used when the config throws nothing


def _prepare_out(out: str) -> None:
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise UserError(f"--out: cannot create {out}: {e.strerror or e}") from None
  if not os.access(out, os.W_OK | os.X_OK):
    raise UserError(f"--out: {out} is not writable; choose another directory")


def _split_and_patch(config) -> tuple[masking.TokenSplit, int, float]:
  """(token split, patch, throw_ratio used) from the config; UserError naming the field."""
  try:
    patch = vit.parse_variant(config.model.variant).patch
  except ValueError as e:
    raise UserError(f"config.model.variant: {e}") from None
  size = config.model.image_size
  if size <= 0 or size % patch:
    raise UserError(f"config.model.image_size: {size} is not a positive multiple of the patch "
                    f"size {patch}")
  throw = float(config.masking.throw_ratio) or DEFAULT_THROW
  try:
    split = masking.token_split((size // patch) ** 2, config.masking.mask_ratio, throw)
  except ValueError as e:
    raise UserError(f"config.masking: {e}; lower throw_ratio or raise mask_ratio") from None
  return split, patch, throw


def _images(data, num_images: int, size: int) -> tuple[np.ndarray, str]:
  """(uint8 [N, S, S, 3] eval-transformed images, where they come from): the first of the
  eval split; for an image folder without that split (pre-training's unlabeled layout, which
  masks need no labels for), the first images pre-training reads."""
  kind, root = sources.parse_dataset(data.dataset)
  if kind != "folder" or (epath.Path(root) / data.eval_split).is_dir():
    images, _ = pipeline.labeled_arrays(data, data.eval_split, num_examples=num_images,
                                        image_size=size)
    return images, f"split {data.eval_split!r}"
  source = folder_sources.FolderSource(folder_sources.pretrain_folder(root, data.train_split))
  print(f"{root} has no folder {data.eval_split!r} (data.eval_split): drawing the images "
        f"pre-training reads, from {source.name}", flush=True)
  out = []
  for i in range(min(num_images, len(source))):
    try:
      out.append(augment_np.eval_transform(source.raw(i), size))
    except augment_np.DecodeError as e:
      raise UserError(f"image {source.where(i)} does not decode ({e}); remove or replace it, "
                      "then rerun") from e
  return np.stack(out), source.name


def write_pictures(config, out: str, num_images: int = 8, seed: int = 0) -> list[str]:
  """Writes the four PNGs into `out` and returns their paths."""
  if num_images < 1:
    raise UserError(f"--num_images: got {num_images}; use >= 1")
  _prepare_out(out)
  split, patch, throw = _split_and_patch(config)
  if not config.masking.throw_ratio:
    print(f"config.masking.throw_ratio is 0; drawing the pictures with throw_ratio={throw}",
          flush=True)
  size = config.model.image_size
  images, where = _images(config.data, num_images, size)  # [N, S, S, 3]
  if images.shape[0] < num_images:
    print(f"--num_images={num_images}: {where} has {images.shape[0]} images; drawing those",
          flush=True)
  grid = size // patch
  rng = jax.random.key(seed)  # one rng for all strategies: same visible sets
  maps = {}
  for strategy in masking.THROW_STRATEGIES:
    masks = jax.device_get(masking.make_masks(rng, images.shape[0], split, strategy, grid))
    maps[strategy] = visualize.token_map(images, masks.ids_vis, masks.ids_dec, masks.ids_throw,
                                         patch, pixels.denormalize)  # [N, S, S, 3]
  factor = visualize.fit_factor(size, MIN_WIDTH)
  originals = visualize.upscale(pixels.denormalize(images), factor)
  maps = {k: visualize.upscale(v, factor) for k, v in maps.items()}

  legend = visualize.legend_items()
  pictures = {f"masks_{s}.png": visualize.grid([[o, m] for o, m in zip(originals, maps[s])],
                                               titles=["original", f"token map: {s}"],
                                               legend=legend)
              for s in masking.THROW_STRATEGIES}
  pictures["masks_compare.png"] = visualize.grid(
      [[o, *(maps[s][i] for s in masking.THROW_STRATEGIES)] for i, o in enumerate(originals)],
      titles=["original", *masking.THROW_STRATEGIES], legend=legend)
  paths = []
  for name, picture in pictures.items():
    path = os.path.join(out, name)
    try:
      with open(path, "wb") as f:
        f.write(visualize.encode_png(picture))
    except OSError as e:
      raise UserError(f"--out: cannot write {path}: {e.strerror or e}") from None
    paths.append(path)
  return paths


def _run(f: types.SimpleNamespace) -> None:
  for path in write_pictures(f.config.value, f.out.value, f.num_images.value, f.seed.value):
    print(path, flush=True)


def main(argv=None) -> int:
  f = _define_flags()
  return cli.run(lambda: _run(f), {"config": "pr_mim_jax/configs/pretrain.py:dataset=shapes",
                                   "out": "/tmp/masks"}, argv,
                 config_kinds=("pretrain",))


if __name__ == "__main__":
  sys.exit(main())
