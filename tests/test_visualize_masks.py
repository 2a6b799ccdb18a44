"""visualize_masks: each picture shows its own throw strategy's split, under its own title."""

import jax
import numpy as np
import pytest

from conftest import TINY_OVERRIDES, apply_overrides, load_config
from pr_mim_jax.data import pipeline, pixels
from pr_mim_jax.errors import UserError
from pr_mim_jax.method import masking
from pr_mim_jax.tools import visualize_masks
from pr_mim_jax.training import visualize

NUM_IMAGES, SIZE, PATCH = 3, 16, 4  # Ti/4 on 16 px: a 4 x 4 grid of patches


def _tiny_config(tmp_path, **extra):
  config = apply_overrides(load_config(), {**TINY_OVERRIDES, **extra})
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.backend = "numpy"
  return config


def _classes(tile, original, factor):
  """[16] 'v' (the original's pixels), 'd' (flat grey) or 't' (anything else: the stripes)
  of each patch of one upscaled tile, read from the pixels."""
  px = PATCH * factor
  out = []
  for r in range(SIZE // PATCH):
    for c in range(SIZE // PATCH):
      cell = (slice(r * px, (r + 1) * px), slice(c * px, (c + 1) * px))
      if np.array_equal(tile[cell], original[cell]):
        out.append("v")
      elif np.all(tile[cell] == 128):
        out.append("d")
      else:
        out.append("t")
  return "".join(out)


def _expected(seed, strategy, split):
  """The classes of every patch per image, from the masks drawn with the --seed's key."""
  masks = masking.make_masks(jax.random.key(seed), NUM_IMAGES, split, strategy, SIZE // PATCH)
  out = []
  for b in range(NUM_IMAGES):
    classes = ["t"] * (SIZE // PATCH) ** 2
    for i in np.asarray(masks.ids_vis[b]):
      classes[i] = "v"
    for i in np.asarray(masks.ids_dec[b]):
      classes[i] = "d"
    out.append("".join(classes))
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_each_column_shows_its_titles_strategy(tmp_path, monkeypatch, capsys, seed):
  """MAE's config throws nothing: drawn at throw 0.5, 4 visible, 4 decoded, 8 thrown of 16."""
  drawn = []
  grid = visualize.grid

  def recording_grid(rows, gap=2, titles=None, legend=None):
    drawn.append((rows, titles))
    return grid(rows, gap, titles, legend)

  monkeypatch.setattr(visualize, "grid", recording_grid)
  config = _tiny_config(tmp_path, **{"masking.throw_ratio": 0.0})
  paths = visualize_masks.write_pictures(config, str(tmp_path / "out"), NUM_IMAGES, seed)
  out = capsys.readouterr().out
  assert "drawing the pictures with throw_ratio=0.5" in out
  assert "--num_images" not in out  # the split has enough images
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      *(f"masks_{s}.png" for s in masking.THROW_STRATEGIES), "masks_compare.png"]
  images, _ = pipeline.labeled_arrays(config.data, config.data.eval_split,
                                      num_examples=NUM_IMAGES, image_size=SIZE)
  factor = visualize.fit_factor(SIZE, visualize_masks.MIN_WIDTH)
  originals = visualize.upscale(pixels.denormalize(images), factor)  # [N, 192, 192, 3]
  split = masking.token_split((SIZE // PATCH) ** 2, 0.75, 0.5)
  expected = {s: _expected(seed, s, split) for s in masking.THROW_STRATEGIES}
  visible = [e.replace("d", "t") for e in expected["random"]]
  assert all(e.count("v") == 4 and e.count("d") == 4 for e in expected["random"])
  for s in masking.THROW_STRATEGIES:  # every strategy keeps the same visible set
    assert [e.replace("d", "t") for e in expected[s]] == visible
  assert len(drawn) == 4
  for (rows, titles), strategy in zip(drawn, masking.THROW_STRATEGIES):
    assert titles == ["original", f"token map: {strategy}"]
    assert len(rows) == NUM_IMAGES
    for row, original, want in zip(rows, originals, expected[strategy]):
      np.testing.assert_array_equal(row[0], original)
      assert _classes(row[1], original, factor) == want, strategy
  rows, titles = drawn[-1]
  assert titles == ["original", *masking.THROW_STRATEGIES]
  for b, (row, original) in enumerate(zip(rows, originals)):
    np.testing.assert_array_equal(row[0], original)
    for tile, strategy in zip(row[1:], titles[1:]):
      assert _classes(tile, original, factor) == expected[strategy][b], strategy


@pytest.mark.parametrize("overrides,num_images,message", [
    ({}, 0, "--num_images: got 0; use >= 1"),
    ({"model.image_size": 18}, 2, "config.model.image_size: 18 is not a positive multiple of "
     "the patch size 4"),
    ({"masking.throw_ratio": 0.8}, 2, "; lower throw_ratio or raise mask_ratio"),
])
def test_bad_settings_are_user_errors_naming_the_fix(tmp_path, overrides, num_images, message):
  config = _tiny_config(tmp_path, **overrides)
  with pytest.raises(UserError) as e:
    visualize_masks.write_pictures(config, str(tmp_path / "out"), num_images, 0)
  assert message in str(e.value)
  assert not list((tmp_path / "out").glob("*.png"))
