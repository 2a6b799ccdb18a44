"""The 'dali' backend (DALI's CPU operators here; its nvJPEG path needs a GPU): the numpy
backend's boxes and flips, pixels as Pillow's antialiased bicubic, exact resume, clear errors.

DALI is not in requirements.txt (a 400 MB wheel, Linux only), so CI skips all but the
error test; `pip install nvidia-dali-cuda120` runs them."""

import io
import itertools
import os

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
  from pr_mim_jax.data import folder_sources  # pylint: disable=g-import-not-at-top
  src = folder_sources.FolderSource(os.path.join(photos, "train"))  # what pre-training reads
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
def test_train_resize_is_bicubic_not_bilinear(tmp_path):
  """On sharp edges (8 PNG checkerboards of 5-9 px cells, levels 64 and 192) the two filters
  part: each DALI crop is nearer Pillow's bicubic of its box than Pillow's bilinear."""
  for i, cell in enumerate((5, 6, 7, 9, 5, 6, 7, 9)):
    yy, xx = np.mgrid[:120, :160]
    board = np.where((yy // cell + xx // cell) % 2, 192, 64).astype(np.uint8)
    Image.fromarray(np.repeat(board[..., None], 3, axis=-1)).save(tmp_path / f"{i}.png")
  (b,) = _batches(_config(f"folder:{tmp_path}"), n=1)
  for k, i in enumerate(b["index"]):
    rng = augment_np.example_rng(SEED, 0, k)
    top, left, h, w = augment_np.sample_crop_box(120, 160, rng)
    flip = rng.uniform() < 0.5
    got = b["image"][k].astype(int)
    with Image.open(tmp_path / f"{int(i)}.png") as img:
      err = {}
      for name, f in (("bicubic", Image.Resampling.BICUBIC),
                      ("bilinear", Image.Resampling.BILINEAR)):
        ref = np.asarray(img.convert("RGB").resize((SIZE, SIZE), f,
                                                   box=(left, top, left + w, top + h)))
        err[name] = np.abs(got - (ref[:, ::-1] if flip else ref)).mean()
    assert err["bicubic"] < 0.5 * err["bilinear"], (k, err)


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
def test_eval_crops_are_the_numpy_backends_for_any_shape(tmp_path):
  """Lossless PNGs of 101x77, 48x48 (the output size) and 77x101: the same resize and crop
  geometry as the numpy backend, so pixels within one level, and native-size images kept as
  they are. (DALI's own resize_shorter and centre crop round the 101x77 case differently.)"""
  rng = np.random.default_rng(0)
  for c, (w, h) in zip("abc", [(101, 77), (SIZE, SIZE), (77, 101)]):
    for split in ("train", "test"):  # the train split names the classes
      (tmp_path / split / c).mkdir(parents=True)
    for i in range(4):
      coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
      pixels = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
      for split in ("train", "test"):
        Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
  data = _config(f"folder:{tmp_path}")
  images = {}
  for backend in ("dali", "numpy"):
    data.backend = backend
    images[backend] = np.concatenate([b["image"] for b in pipeline.eval_host_batches(
        data, "test", global_batch=4, image_size=SIZE)]).astype(int)  # classes a, b, c in order
  d = np.abs(images["dali"] - images["numpy"])
  np.testing.assert_array_equal(d[4:8], 0)
  assert d.mean() <= 0.25 and d.max() <= 2, (d.mean(), d.max())


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


# ----------------------------------------------------------------------------------------
# The Python side of the backend (which boxes, flips, examples and labels go to DALI), with a
# stand-in for the DALI pipeline: runs without DALI installed.

class _PngSource:
  """Labeled in-file examples: example i is a distinct 160x120 PNG (SIZE x SIZE for i in
  `native`), its label 10 + i."""

  def __init__(self, n=8, native=()):
    rng = np.random.default_rng(1)
    self.png = []
    for i in range(n):
      coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
      pixels = np.asarray(Image.fromarray(coarse).resize(
          (SIZE, SIZE) if i in native else (160, 120), Image.BICUBIC))
      out = io.BytesIO()
      Image.fromarray(pixels).save(out, format="PNG")
      self.png.append(out.getvalue())

  def raw(self, i):
    return self.png[i]

  def label(self, i):
    return 10 + i


class _FakePipe:
  """What DALI's pipelines in dali_batches do, in Pillow: train = image_slice at anchor
  (top, left) and shape (height, width), bicubic resize, horizontal flip; eval = bicubic
  resize to `resized` (height, width), then the size x size slice at anchor (top, left).
  Records what it was fed."""

  INPUTS = {"train": {"encoded", "anchor", "shape", "flip"},
            "eval": {"encoded", "resized", "anchor"}}

  def __init__(self, kind, size):
    self.kind, self.size, self.fed, self.runs = kind, size, {}, []

  def feed_input(self, name, data):
    assert name in self.INPUTS[self.kind], f"the {self.kind} pipeline has no input {name!r}"
    self.fed[name] = data

  def run(self):
    assert set(self.fed) == self.INPUTS[self.kind], sorted(self.fed)
    out = []
    for k, enc in enumerate(self.fed["encoded"]):
      with Image.open(io.BytesIO(enc.tobytes())) as img:
        img = img.convert("RGB")
        if self.kind == "train":
          (top, left), (h, w) = self.fed["anchor"][k], self.fed["shape"][k]
          img = img.resize((self.size, self.size), Image.Resampling.BICUBIC,
                           box=(left, top, left + w, top + h))
          pixels = np.asarray(img)
          pixels = pixels[:, ::-1] if int(self.fed["flip"][k]) else pixels
        else:
          (nh, nw), (top, left) = self.fed["resized"][k].astype(int), self.fed["anchor"][k]
          pixels = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC))  # same size: a copy
          pixels = pixels[int(top):int(top) + self.size, int(left):int(left) + self.size]
      out.append(pixels)
    self.runs.append(dict(self.fed))
    self.fed = {}
    tensor = np.stack(out)
    cpu = type("Cpu", (), {"as_tensor": lambda _: tensor})()
    return (type("Out", (), {"as_cpu": lambda _: cpu})(),)


def _fake_batches(monkeypatch, kind, steps, *, seed=SEED, size=SIZE, min_scale=0.5,
                  source=None):
  from pr_mim_jax.data import sampler  # pylint: disable=g-import-not-at-top
  pipes = []

  def fake_pipeline(k, *, local, size, threads, device):
    del local, threads, device
    pipes.append(_FakePipe(k, size))
    return pipes[-1]

  monkeypatch.setattr(dali_batches, "_pipeline", fake_pipeline)
  steps = [sampler.StepIndices(st, np.array(ix, np.int64), np.array(pos, np.int64))
           for st, ix, pos in steps]
  source = source or _PngSource()
  out = list(dali_batches.batches(source, steps, kind=kind, seed=seed, size=size,
                                  min_scale=min_scale, local=len(steps[0].indices), labeled=True,
                                  threads=1, device="cpu"))
  return source, steps, out, pipes[0]


def test_train_batch_feeds_dali_the_numpy_backends_boxes_and_flips(monkeypatch):
  """A second host's share of step 3 (positions 4..7 of the global batch, examples in shuffled
  order), min_scale 0.5: each image is the numpy backend's train_augment of that example, up
  to the resize filter; labels and indices are the examples'."""
  source, steps, out, pipe = _fake_batches(
      monkeypatch, "train", [(3, [5, 0, 7, 2], [4, 5, 6, 7]), (4, [1, 6, 3, 4], [4, 5, 6, 7])])
  flips = []
  for s, b in zip(steps, out):
    assert b["image"].shape == (4, SIZE, SIZE, 3)
    np.testing.assert_array_equal(b["index"], s.indices)
    np.testing.assert_array_equal(b["label"], 10 + s.indices)
    for k, (i, p) in enumerate(zip(s.indices, s.positions)):
      ref = augment_np.train_augment(source.raw(int(i)),
                                     augment_np.example_rng(SEED, s.step, int(p)), SIZE, 0.5)
      d = np.abs(b["image"][k].astype(int) - ref)
      assert d.mean() <= 2.0, (s.step, k, d.mean())
  for run in pipe.runs:
    flips += [int(f) for f in run["flip"]]
    for (top, left), (h, w) in zip(run["anchor"], run["shape"]):
      assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
      assert h * w >= 0.5 * 120 * 160 * 0.99  # min_scale reaches DALI's boxes
  assert 0 < sum(flips) < len(flips)  # both kinds ran


def test_eval_batch_feeds_the_numpy_backends_resize_and_centre_crop(monkeypatch):
  """160x120 at 48 px: shorter side int(48 / 0.875) = 54, longer int(54 * 160 / 120) = 72,
  centre crop at (3, 12). A 48x48 image is kept as it is, as the numpy and tf backends do."""
  source, steps, out, pipe = _fake_batches(monkeypatch, "eval", [(0, [2, 3, 4, 5], [0, 1, 2, 3])],
                                           source=_PngSource(native=(5,)))
  (b,) = out
  np.testing.assert_array_equal(b["label"], [12, 13, 14, 15])
  np.testing.assert_array_equal(pipe.runs[0]["resized"], [[54, 72]] * 3 + [[48, 48]])
  np.testing.assert_array_equal(pipe.runs[0]["anchor"], [[3, 12]] * 3 + [[0, 0]])
  for k, i in enumerate(steps[0].indices):
    ref = augment_np.eval_transform(source.raw(int(i)), SIZE)
    assert np.abs(b["image"][k].astype(int) - ref).mean() <= 2.0, k
  with Image.open(io.BytesIO(source.raw(5))) as img:
    np.testing.assert_array_equal(b["image"][3], np.asarray(img.convert("RGB")))


def test_device_choice(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  assert dali_batches._device_id("cpu") is None  # pylint: disable=protected-access
  with pytest.raises(UserError, match="data.dali_device='tpu'"):
    dali_batches._device_id("tpu")  # pylint: disable=protected-access
  devs = [types.SimpleNamespace(platform="cpu", local_hardware_id=0),
          types.SimpleNamespace(platform="gpu", local_hardware_id=3),
          types.SimpleNamespace(platform="gpu", local_hardware_id=1)]
  monkeypatch.setattr(jax, "local_devices", lambda: devs)
  assert dali_batches._device_id("gpu") == 3  # pylint: disable=protected-access
  monkeypatch.setattr(jax, "local_devices", lambda: devs[:1])
  with pytest.raises(UserError, match="needs a local GPU"):
    dali_batches._device_id("gpu")  # pylint: disable=protected-access


def test_in_memory_pixels_are_a_user_error():
  arrays = type("Arr", (), {"raw": lambda self, i: np.zeros((8, 8, 3), np.uint8)})()
  with pytest.raises(UserError, match="in-memory 'shapes'"):
    dali_batches._raw(arrays, 0)  # pylint: disable=protected-access
