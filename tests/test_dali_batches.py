"""The 'dali' backend (DALI's CPU operators here; its nvJPEG path needs a GPU): the numpy
backend's boxes and flips, pixels as Pillow's antialiased bicubic, exact resume, clear errors.

DALI is not in requirements.txt (a 400 MB wheel, Linux only), so CI skips all but the
error test; `pip install nvidia-dali-cuda120` runs them."""

import io
import itertools

import ml_collections
import numpy as np
import pytest
from PIL import Image

from pr_mim_jax.data import augment_np, dali_batches, pipeline
from pr_mim_jax.errors import UserError

HAVE_DALI = dali_batches.importable()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI not installed "
                                "(pip install nvidia-dali-cuda120)")
SIZE, BATCH, SEED = 48, 8, 5


def _config(dataset, **kw):
  cfg = dict(dataset=dataset, train_split="train", eval_split="test", data_dir=None,
             shapes=dict(image_size=16, train_size=40, test_size=12, seed=0),
             num_parallel_calls=2, backend="dali", dali_device="cpu")
  return ml_collections.ConfigDict({**cfg, **kw})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """A labeled folder: 2 classes x 6 photo-like JPEGs of 160x120 (smooth fields, mild noise)."""
  root = tmp_path_factory.mktemp("photos")
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in ("a", "b"):
      (root / split / c).mkdir(parents=True)
      for i in range(6):
        coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((160, 120), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / c / f"{i}.jpg", quality=90)
  return str(root)


def _batches(data, start_step=0, n=2, labeled=False):
  fn = pipeline.labeled_host_batches if labeled else pipeline.host_batches
  it = fn(data, seed=SEED, global_batch=BATCH, image_size=SIZE, start_step=start_step)
  return list(itertools.islice(it, n))


@needs_dali
def test_train_batches_are_pillows_bicubic_of_the_numpy_backends_boxes(photos):
  data = _config(f"folder:{photos}")
  (b,) = _batches(data, n=1)
  assert b["image"].shape == (BATCH, SIZE, SIZE, 3) and b["image"].dtype == np.uint8
  from pr_mim_jax.data import sources  # pylint: disable=g-import-not-at-top
  src = sources.FolderSource(photos)
  flips = []
  for k, i in enumerate(b["index"]):
    raw = src.raw(int(i))
    rng = augment_np.example_rng(SEED, 0, k)
    top, left, h, w = augment_np.sample_crop_box(120, 160, rng)
    flips.append(rng.uniform() < 0.5)
    with Image.open(io.BytesIO(raw)) as img:  # the independent reference
      ref = np.asarray(img.convert("RGB").resize(
          (SIZE, SIZE), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
    ref = ref[:, ::-1] if flips[-1] else ref
    d = np.abs(b["image"][k].astype(int) - ref)
    assert d.mean() <= 1.0 and np.percentile(d, 99) <= 3, (k, d.mean(), d.max())
  assert 0 < sum(flips) < BATCH  # both kinds ran


@needs_dali
def test_same_step_same_batch_and_resume(photos):
  data = _config(f"folder:{photos}")
  first = _batches(data, n=3)
  again = _batches(data, n=3)
  resumed = _batches(data, start_step=2, n=1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(resumed[0]["image"], first[2]["image"])
  np.testing.assert_array_equal(resumed[0]["index"], first[2]["index"])
  assert not np.array_equal(first[0]["image"], first[1]["image"])


@needs_dali
def test_the_numpy_backends_examples_and_labels(photos):
  data = _config(f"folder:{photos}")
  dali = _batches(data, n=1, labeled=True)[0]
  data.backend = "numpy"
  ours = _batches(data, n=1, labeled=True)[0]
  np.testing.assert_array_equal(dali["label"], ours["label"])
  np.testing.assert_array_equal(dali["index"], ours["index"])
  # Same boxes and flips, other filters: each is within 1 level of Pillow on average (above,
  # and test_augment.py), so of each other within 2. Measured: 0.76.
  d = np.abs(dali["image"].astype(int) - ours["image"])
  assert d.mean() <= 2.0, d.mean()


@needs_dali
def test_eval_batches_match_the_numpy_backend(photos):
  data = _config(f"folder:{photos}")
  dali = list(pipeline.eval_host_batches(data, "test", global_batch=BATCH, image_size=SIZE))
  data.backend = "numpy"
  ours = list(pipeline.eval_host_batches(data, "test", global_batch=BATCH, image_size=SIZE))
  assert len(dali) == len(ours) == 2
  for a, b in zip(dali, ours):
    np.testing.assert_array_equal(a["mask"], b["mask"])
    np.testing.assert_array_equal(a["label"], b["label"])
    d = np.abs(a["image"].astype(int) - b["image"])
    assert d.mean() <= 1.5 and np.percentile(d, 99) <= 4, (d.mean(), d.max())


@needs_dali
def test_what_dali_does_not_serve_is_a_user_error(photos):
  with pytest.raises(UserError, match="shapes"):
    _batches(_config("shapes"), n=1)
  with pytest.raises(UserError, match="RandAugment"):
    pipeline.labeled_host_batches(_config(f"folder:{photos}"), seed=0, global_batch=BATCH,
                                  image_size=SIZE, augment="randaugment")
  with pytest.raises(UserError, match="dali_device"):
    _batches(_config(f"folder:{photos}", dali_device="tpu"), n=1)


@pytest.mark.skipif(HAVE_DALI, reason="checks the message shown when DALI is missing")
def test_without_dali_one_clear_error(tmp_path):
  with pytest.raises(UserError, match="nvidia-dali"):
    _batches(_config(f"folder:{tmp_path}"), n=1)
