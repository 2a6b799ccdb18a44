"""End-to-end input pipeline: folders, tfds, shapes; TF and NumPy backends; resume; processes."""

import itertools
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from conftest import run_with_fake_devices
from pr_mim_jax.data import (datasets, folder_sources, pipeline, prefetch, sampler, sources,
                             tfds_sources)
from pr_mim_jax.errors import UserError

SIZE, BATCH, SEED = 16, 8, 3
HAVE_TF = datasets.tf_importable()
needs_tf = pytest.mark.skipif(not HAVE_TF, reason="tensorflow / tensorflow_datasets not installed")


def _config(dataset, **kw):
  cfg = dict(dataset=dataset, train_split="train", eval_split="test", data_dir=None,
             shapes=dict(image_size=16, train_size=40, test_size=12, seed=0), prefetch=2,
             num_parallel_calls=-1)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def _take(it, n):
  out = list(itertools.islice(it, n))
  if hasattr(it, "close"):
    it.close()
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """21 images (PNG/JPG/JPEG, upper-case suffixes, nested, grayscale, RGBA, palette) + non-images."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(21):
    sub = root / ["", "a", "a/b", "c"][i % 4]
    sub.mkdir(parents=True, exist_ok=True)
    arr = (rng.uniform(size=(18 + i % 5, 20 + i % 7, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    kind = i % 6
    if kind == 0:
      img.convert("L").save(sub / f"gray{i}.png")
    elif kind == 1:
      img.save(sub / f"photo{i}.JPG", quality=90)
    elif kind == 2:
      img.convert("RGBA").save(sub / f"alpha{i}.png")
    elif kind == 3:
      img.convert("P").save(sub / f"pal{i}.PNG")
    elif kind == 4:
      img.save(sub / f"photo{i}.jpeg")
    else:
      img.save(sub / f"rgb{i}.png")
  (root / "notes.txt").write_text("not an image")
  (root / "a" / "x.gif").write_bytes(b"GIF89a")
  return str(root)


def _sharding():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  return NamedSharding(mesh, PartitionSpec("data"))


# ---------------------------------------------------------------------- folders


def test_folder_listing(folder):
  paths = folder_sources.list_image_files(folder)
  assert len(paths) == 21 == pipeline.num_examples(_config(f"folder:{folder}"), "train")
  rel = [os.path.relpath(p, folder) for p in paths]
  assert rel == sorted(rel)
  assert not any(p.endswith((".txt", ".gif")) for p in paths)


@needs_tf
def test_folder_decoding_tf_matches_numpy_backend(folder):
  """Grayscale, RGBA and palette PNGs become the same RGB pixels in TF and OpenCV."""
  from pr_mim_jax.data import augment  # pylint: disable=g-import-not-at-top
  src = folder_sources.FolderSource(folder)
  for i, path in enumerate(src.paths):
    tf_img = augment.decode(src.tf_parse(src.keys([i])[0])["image"]).numpy()
    np_img = src.image(i)
    assert tf_img.shape == np_img.shape and tf_img.shape[-1] == 3
    diff = np.abs(tf_img.astype(int) - np_img.astype(int))
    is_jpeg = path.lower().endswith((".jpg", ".jpeg"))
    assert diff.max() <= (8 if is_jpeg else 0), path  # libjpeg IDCT variants
    if is_jpeg:
      assert diff.mean() < 2, path


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_train_batches_folder(folder, backend):
  data = _config(f"folder:{folder}")
  batches = _take(pipeline.train_batches(data, seed=SEED, global_batch=BATCH, image_size=SIZE,
                                         start_step=0, sharding=_sharding(), backend=backend), 3)
  for b in batches:
    assert set(b) == {"image"}
    x = b["image"]
    # uint8 pixels travel to the device; the step normalises them.
    assert isinstance(x, jax.Array) and x.shape == (BATCH, SIZE, SIZE, 3) and x.dtype == np.uint8
    assert np.asarray(x).max() > 100


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_resume_is_bit_exact(folder, backend):
  data = _config(f"folder:{folder}")
  kw = dict(seed=SEED, global_batch=BATCH, image_size=SIZE, sharding=_sharding(), backend=backend)
  full = _take(pipeline.train_batches(data, start_step=0, **kw), 6)  # 2 steps/epoch: 3 epochs
  resumed = _take(pipeline.train_batches(data, start_step=3, **kw), 3)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
  assert not np.array_equal(np.asarray(full[3]["image"]), np.asarray(full[4]["image"]))


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_process_split_equals_global_batch(folder, backend):
  data = _config(f"folder:{folder}")
  kw = dict(seed=SEED, global_batch=BATCH, image_size=SIZE, start_step=1, backend=backend)
  single = _take(pipeline.host_batches(data, **kw), 3)
  parts = [_take(pipeline.host_batches(data, process_index=p, process_count=2, **kw), 3)
           for p in range(2)]
  for s in range(3):
    for key in ("image", "index"):
      joined = np.concatenate([parts[0][s][key], parts[1][s][key]])
      np.testing.assert_array_equal(single[s][key], joined)
    want = sampler.global_batch_indices(SEED, 1 + s, 21, BATCH)
    np.testing.assert_array_equal(single[s]["index"], want)


@needs_tf
def test_numpy_backend_matches_tf_indices(folder):
  data = _config(f"folder:{folder}")
  kw = dict(seed=SEED, global_batch=BATCH, image_size=SIZE, start_step=2)
  tf_b = _take(pipeline.host_batches(data, backend="tf", **kw), 3)
  np_b = _take(pipeline.host_batches(data, backend="numpy", **kw), 3)
  for a, b in zip(tf_b, np_b):
    np.testing.assert_array_equal(a["index"], b["index"])
    assert a["image"].shape == b["image"].shape and a["image"].dtype == b["image"].dtype
    # Same crops are not promised, but the same images: similar statistics.
    assert abs(a["image"].mean() - b["image"].mean()) < 28  # pixel levels: 1/2 std of ImageNet


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
  """3 good PNGs and 3 unreadable images: empty, a truncated JPEG, text named .png."""
  root = tmp_path_factory.mktemp("broken")
  for i in range(3):
    Image.new("RGB", (20, 24), (60 * i, 0, 0)).save(root / f"good{i}.png")
  (root / "empty.jpg").write_bytes(b"")
  Image.new("RGB", (20, 24)).save(root / "full.jpg")
  (root / "cut.jpg").write_bytes((root / "full.jpg").read_bytes()[:300])
  (root / "full.jpg").unlink()
  (root / "notes.png").write_text("not an image")
  return str(root)


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_unreadable_image_names_its_file(broken_folder, backend):
  data = _config(f"folder:{broken_folder}")
  with pytest.raises(UserError, match="remove or replace") as e:
    _take(pipeline.host_batches(data, seed=0, global_batch=6, image_size=SIZE, backend=backend), 1)
  bad = ("empty.jpg", "cut.jpg", "notes.png")
  named = {n for n in bad if f"{broken_folder}/{n}" in str(e.value)}
  # numpy stops at the first bad file; tf re-decodes the failed batch and names them all.
  assert named == set(bad) if backend == "tf" else len(named) == 1
  assert "good" not in str(e.value)


@needs_tf
def test_unreadable_image_error_does_not_keep_the_tf_iterator_alive(broken_folder):
  """The error (kept by the caller until it prints it) must not hold tf.data's iterator:
  one finalized after Python shut down logged "Error occurred when finalizing
  GeneratorDataset iterator" under the one error line."""
  import gc  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def live_iterators():
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, tf.data.Iterator)}

  before = live_iterators()
  data = _config(f"folder:{broken_folder}")
  batches = pipeline.host_batches(data, seed=0, global_batch=6, image_size=SIZE, backend="tf")
  with pytest.raises(UserError, match="remove or replace") as e:
    _take(batches, 1)
  del batches
  assert e.value.__cause__ is not None  # the chain to tf's error is kept for log.txt
  assert not live_iterators() - before


def test_unlabeled_folder_has_no_labeled_split(folder):
  with pytest.raises(UserError, match="no labeled split 'train'"):
    pipeline.labeled_arrays(_config(f"folder:{folder}"), "test", num_examples=4, image_size=SIZE)


# ----------------------------------------------------------------- check_dataset


def test_check_dataset_folder_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    pipeline.check_dataset(_config(f"folder:{tmp_path}/nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=f"{tmp_path}/empty has no"):
    pipeline.check_dataset(_config(f"folder:{tmp_path}/empty"))
  (tmp_path / "docs" / "sub").mkdir(parents=True)
  (tmp_path / "docs" / "sub" / "readme.txt").write_text("hi")
  with pytest.raises(UserError, match=f"{tmp_path}/docs has no"):
    pipeline.check_dataset(_config(f"folder:{tmp_path}/docs"))
  with pytest.raises(UserError, match="no path"):
    pipeline.check_dataset(_config("folder:"))


def test_check_dataset_shapes():
  pipeline.check_dataset(_config("shapes"))
  with pytest.raises(UserError, match="validation"):
    pipeline.check_dataset(_config("shapes", eval_split="validation"))
  with pytest.raises(UserError, match="image_size"):
    pipeline.check_dataset(
        _config("shapes", shapes=dict(image_size=4, train_size=8, test_size=8, seed=0)))


@needs_tf
def test_check_dataset_tfds_errors(tmp_path):
  with pytest.raises(UserError, match="imagenett.*imagenette"):
    pipeline.check_dataset(_config("imagenett", data_dir=str(tmp_path)))
  with pytest.raises(UserError, match=f"data_dir {tmp_path}/missing does not exist"):
    pipeline.check_dataset(_config("cifar10", data_dir=str(tmp_path / "missing")))
  with pytest.raises(UserError, match="cifar10 is not prepared"):
    pipeline.check_dataset(_config("cifar10", data_dir=str(tmp_path)))
  with pytest.raises(UserError) as e:
    pipeline.check_dataset(_config("imagenet2012", data_dir=str(tmp_path)))
  msg = str(e.value)
  assert f"{tmp_path}/downloads/manual" in msg
  assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
  assert "file_format='array_record').download_and_prepare()" in msg and "\n" not in msg
  assert "tfds build" not in msg  # the tfds CLI needs apache-beam, which requirements leave out


@pytest.mark.parametrize("name,first", [("shapez", "shapes"), ("shape", "shapes"),
                                        ("smalnorb", "smallnorb"), ("imagenett", "imagenette")])
def test_typo_hint_ranks_our_own_dataset_first_when_close(name, first):
  tfds_names = ["shapes3d", "savee", "smallnorb", "imagenette", "imagenet2012", "shapes"]
  close = tfds_sources.close_dataset_names(name, tfds_names)
  assert close[0] == first and len(close) == len(set(close)) <= 3
  assert ("shapes" in close) == name.startswith("shape")


@needs_tf
def test_unknown_tfds_name_suggests_shapes_first(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tfds, "list_builders", lambda **kw: ["savee", "shapes3d", "smallnorb"])
  for name in ("shapez", "shape"):
    with pytest.raises(UserError, match=f"unknown dataset '{name}': did you mean shapes, "):
      tfds_sources.tfds_builder(name, str(tmp_path))


@needs_tf
def test_unprepared_tfds_dataset_is_one_error_without_tfds_warning(tmp_path, caplog):
  """tfds warns "Variant folder ... has no dataset_info.json" when asked about a folder that
  does not exist yet; that line must not come before our one-line error."""
  with caplog.at_level("WARNING"):
    with pytest.raises(UserError, match="cifar10 is not prepared"):
      pipeline.check_dataset(_config("cifar10", data_dir=str(tmp_path)))
  assert "Variant folder" not in caplog.text


def test_tfds_name_on_numpy_backend_fails():
  with pytest.raises(UserError, match="data.backend=tf or auto" if HAVE_TF else "needs tensorflow"):
    pipeline.host_batches(_config("cifar10", backend="numpy"), seed=0, global_batch=8, image_size=SIZE)
  with pytest.raises(UserError, match="unknown data backend"):
    pipeline.host_batches(_config("shapes"), seed=0, global_batch=8, image_size=SIZE, backend="torch")


# --------------------------------------------------------------- tfds by name


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A tiny labeled tfds dataset (JPEG images of varying size), prepared as array_record."""
  if not HAVE_TF:
    pytest.skip("tensorflow / tensorflow_datasets not installed")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class PrMimTinyImages(tfds.core.GeneratorBasedBuilder):
    """20 train + 6 test images; the label is the image's mean colour bucket."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=3)}),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20, 0), "test": self._generate_examples(6, 100),
              "unlabeled": self._generate_examples(5, 200, labeled=False)}

    def _generate_examples(self, n, offset, labeled=True):
      for i in range(n):
        label = i % 3
        img = np.full((20 + i % 4, 24, 3), 40 + 80 * label, np.uint8)
        yield i, {"image": img, "label": label if labeled else -1}  # -1: tfds's "no label"

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  PrMimTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.mark.slow
def test_tfds_train_and_labeled(tiny_tfds):
  data = _config("pr_mim_tiny_images", data_dir=tiny_tfds)
  pipeline.check_dataset(data)
  assert pipeline.num_examples(data, "train") == 20 and pipeline.num_examples(data, "test") == 6
  kw = dict(seed=SEED, global_batch=BATCH, image_size=SIZE, sharding=_sharding())
  full = _take(pipeline.train_batches(data, start_step=0, **kw), 4)
  resumed = _take(pipeline.train_batches(data, start_step=2, **kw), 2)
  for a, b in zip(full[2:], resumed):
    assert a["image"].shape == (BATCH, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
  # Constant-colour images stay constant through crop/resize/flip.
  host = _take(pipeline.host_batches(data, seed=SEED, global_batch=BATCH, image_size=SIZE), 1)[0]
  pix = np.asarray(host["image"])
  expect = 40 + 80 * (host["index"] % 3)
  assert np.abs(pix.astype(int) - expect[:, None, None, None]).max() <= 3  # JPEG

  images, labels = pipeline.labeled_arrays(data, "test", num_examples=100, image_size=SIZE)
  assert images.shape == (6, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.tolist() == [i % 3 for i in range(6)]
  pix = np.asarray(images)
  assert np.abs(pix.astype(int) - (40 + 80 * labels)[:, None, None, None]).max() <= 3
  with pytest.raises(UserError, match="no split 'validation'"):
    pipeline.labeled_arrays(data, "validation", num_examples=4, image_size=SIZE)


# ----------------------------------------------------------------------- shapes


def test_shapes_numpy_backend():
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data = _config("shapes")
  assert pipeline.num_examples(data, "train") == 40 and pipeline.num_examples(data, "test") == 12
  images, labels = pipeline.labeled_arrays(data, "test", num_examples=10, image_size=16, backend="numpy")
  raw, want = shapes.generate(10, image_size=16, seed=0, split="test")
  np.testing.assert_array_equal(labels, want)
  np.testing.assert_array_equal(np.asarray(images), raw)  # native size: unchanged
  it = pipeline.host_batches(data, seed=0, global_batch=BATCH, image_size=SIZE, backend="numpy")
  batch = _take(it, 1)[0]
  assert batch["image"].shape == (BATCH, SIZE, SIZE, 3)


@needs_tf  # shapes_tfds is a tfds builder
def test_shapes_generation_estimate():
  from pr_mim_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  durations = [shapes_tfds.rough_duration(shapes_tfds.estimate_seconds(n, size))
               for n, size in ((52, 16), (22000, 64), (50000, 224))]
  assert durations == ["a few seconds", "about 98 s", "about 27 min"]


@needs_tf
def test_shapes_tf_backend(tmp_path, capsys):
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data = _config("shapes", data_dir=str(tmp_path))
  images, labels = pipeline.labeled_arrays(data, "test", num_examples=12, image_size=16, backend="tf")
  # Generated on first use: our one line before and after, not tfds's "Downloading ..." banner.
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 2, printed
  assert printed == [
      "shapes: generating the shapes dataset (52 images of 16x16, a few seconds, once; later runs "
      f"reuse it) in {tmp_path}/shapes/s16_tr40_te12_seed0/1.1.0", printed[1]]
  assert printed[1].startswith("shapes: generated 52 images in ") and printed[1].endswith(" s")
  raw, want = shapes.generate(12, image_size=16, seed=0, split="test")
  np.testing.assert_array_equal(labels, want)
  np.testing.assert_array_equal(np.asarray(images), raw)
  kw = dict(seed=0, global_batch=BATCH, image_size=SIZE, start_step=4)
  tf_b = _take(pipeline.host_batches(data, backend="tf", **kw), 2)
  np_b = _take(pipeline.host_batches(data, backend="numpy", **kw), 2)
  for a, b in zip(tf_b, np_b):
    np.testing.assert_array_equal(a["index"], b["index"])
    assert a["image"].shape == b["image"].shape == (BATCH, SIZE, SIZE, 3)


# ---------------------------------------------------------------- TF-free, sharding


def test_without_tensorflow(folder, tmp_path):
  """Without tensorflow, 'auto' uses NumPy for folders/shapes and explains tfds names."""
  script = f"""
import sys
sys.modules['tensorflow'] = None
sys.modules['tensorflow_datasets'] = None
import ml_collections
from pr_mim_jax.data import pipeline
from pr_mim_jax.errors import UserError
cfg = lambda name: ml_collections.ConfigDict(dict(dataset=name, train_split='train', eval_split='test',
    data_dir=None, shapes=dict(image_size=16, train_size=16, test_size=8, seed=0), prefetch=1,
    num_parallel_calls=2))
pipeline.check_dataset(cfg('shapes'))
pipeline.check_dataset(cfg('folder:{folder}'))
b = next(pipeline.host_batches(cfg('folder:{folder}'), seed=0, global_batch=4, image_size=8))
assert b['image'].shape == (4, 8, 8, 3), b['image'].shape
x, y = pipeline.labeled_arrays(cfg('shapes'), 'test', num_examples=4, image_size=16)
assert x.shape == (4, 16, 16, 3) and y.shape == (4,)
b = next(pipeline.labeled_host_batches(cfg('shapes'), seed=0, global_batch=4, image_size=16,
                                       augment='randaugment'))
assert b['image'].shape == (4, 16, 16, 3) and b['label'].shape == (4,)
assert sum(b['mask'].sum() for b in pipeline.eval_host_batches(cfg('shapes'), 'test',
                                                               global_batch=3, image_size=16)) == 8
try:
  pipeline.check_dataset(cfg('imagenet2012'))
except UserError as e:
  assert 'needs tensorflow' in str(e), e
else:
  raise AssertionError('no UserError')
assert 'tensorflow.python' not in sys.modules
print('OK')
"""
  out = run_with_fake_devices(script, devices=1, timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_an_iterator_left_open_until_exit_ends_quietly():
  """A numpy-backend iterator still open when the interpreter exits: its pool's shutdown
  ran during module teardown and printed 'Exception ignored ... AttributeError'."""
  script = """
import ml_collections
from pr_mim_jax.data import pipeline
cfg = ml_collections.ConfigDict(dict(dataset='shapes', train_split='train', data_dir=None,
    backend='numpy', shapes=dict(image_size=16, train_size=16, test_size=8, seed=0)))
batches = pipeline.host_batches(cfg, seed=0, global_batch=4, image_size=8)  # kept to the end
print(next(batches)['image'].shape)
"""
  out = run_with_fake_devices(script, devices=1, timeout=120)
  assert out.returncode == 0 and "(4, 8, 8, 3)" in out.stdout, out.stderr[-3000:]
  assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_sharding_positions_follow_device_rows():
  class FakeSharding:
    def __init__(self, slices):
      self.slices = slices

    def addressable_devices_indices_map(self, shape):
      return {d: (slice(a, b), slice(None)) for d, (a, b) in enumerate(self.slices)}

  positions = pipeline._sharding_positions  # pylint: disable=protected-access
  pos = positions(FakeSharding([(24, 28), (8, 12)]), (32, 4, 4, 3))
  np.testing.assert_array_equal(pos, np.r_[8:12, 24:28])
  pos = positions(FakeSharding([(0, 16), (0, 16)]), (16, 4, 4, 3))  # replicated
  np.testing.assert_array_equal(pos, np.arange(16))


def test_device_prefetcher_order_errors_and_stop():
  closed = []

  def numbers(fail_at=None):
    try:
      for i in itertools.count():
        if i == fail_at:
          raise UserError("broken example")
        yield i
    finally:
      closed.append(True)

  p = prefetch.DevicePrefetcher(numbers(), 2)
  assert _take(p, 5) == [0, 1, 2, 3, 4]  # _take closes it
  p._thread.join(5)  # pylint: disable=protected-access
  assert not p._thread.is_alive() and closed  # pylint: disable=protected-access
  with pytest.raises(StopIteration):
    next(p)
  p = prefetch.DevicePrefetcher(numbers(fail_at=3), 2)
  assert [next(p) for _ in range(3)] == [0, 1, 2]
  with pytest.raises(UserError, match="broken example"):
    next(p)


# ------------------------------------------------------------ labeled use: folders

CLASSES = ("ant", "bee", "cat")  # class folders; colour of class c: 30 + 90 c


@pytest.fixture(scope="module")
def labeled_folder(tmp_path_factory):
  """root/train/{ant,bee,cat}/ (4 each, one nested, one JPEG) and root/val/{ant,cat}/ (2 + 3)."""
  root = tmp_path_factory.mktemp("labeled")
  counts = {"train": (4, 4, 4), "val": (2, 0, 3)}
  for split, per_class in counts.items():
    for c, n in enumerate(per_class):
      for i in range(n):
        sub = root / split / CLASSES[c] / ("deep" if (split, c, i) == ("train", 1, 0) else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(np.full((20 + i, 24, 3), 30 + 90 * c, np.uint8))
        img.save(sub / (f"{i}.jpg" if (split, i) == ("train", 3) else f"{i}.png"))
  return str(root)


def _colour_labels(images):
  """Class of constant-colour images from their mean pixel (colour 30 + 90 c)."""
  return np.round((np.asarray(images).mean((1, 2, 3)) - 30) / 90).astype(int)


def test_labeled_folder_classes_and_counts(labeled_folder):
  data = _config(f"folder:{labeled_folder}", eval_split="val")
  pipeline.check_labeled_dataset(data)
  assert pipeline.num_classes(data) == 3
  assert pipeline.num_examples(data, "train", labeled=True) == 12
  assert pipeline.num_examples(data, "val", labeled=True) == 5
  assert pipeline.num_examples(data, "train") == 12  # unlabeled: root/train, not val's images
  src = folder_sources.LabeledFolderSource(labeled_folder, "val", CLASSES)
  assert src.labels.tolist() == [0, 0, 2, 2, 2]
  for backend in ["numpy"] + (["tf"] if HAVE_TF else []):
    x, y = pipeline.labeled_arrays(data, "val", num_examples=10, image_size=SIZE, backend=backend)
    assert x.shape == (5, SIZE, SIZE, 3) and y.tolist() == [0, 0, 2, 2, 2]
    np.testing.assert_array_equal(_colour_labels(x), y)


def test_labeled_folder_errors(labeled_folder, tmp_path):
  data = lambda **kw: _config(f"folder:{tmp_path}", **kw)
  for c in ("a", "b"):
    (tmp_path / "train" / c).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "x.png")
  (tmp_path / "val" / "zebra").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(tmp_path / "val" / "zebra" / "x.png")
  with pytest.raises(UserError, match="class folders zebra"):
    pipeline.check_labeled_dataset(data(eval_split="val"))
  with pytest.raises(UserError, match="no labeled split 'test'"):
    pipeline.check_labeled_dataset(data(eval_split="test"))
  Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")
  pipeline.check_dataset(data())  # pre-training: any tree of images
  folder_sources.folder_classes.cache_clear()
  folder_sources.list_image_files.cache_clear()
  with pytest.raises(UserError, match="loose.png is not inside a class folder"):
    pipeline.num_classes(data())


# --------------------------------------------------------------------- eval batches


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("shapes_tfds"))


def _eval_cases():
  return [(k, "numpy") for k in ("shapes", "folder")] + [
      pytest.param(k, "tf", marks=needs_tf) for k in ("shapes", "folder")]


@pytest.mark.slow
@pytest.mark.parametrize("kind,backend", _eval_cases())
def test_eval_covers_each_example_once(kind, backend, labeled_folder, shapes_dir):
  if kind == "shapes":
    data, split, limit = _config("shapes", data_dir=shapes_dir), "test", 11
  else:
    data, split, limit = _config(f"folder:{labeled_folder}", eval_split="val"), "val", None
  want_x, want_y = pipeline.labeled_arrays(data, split, num_examples=limit or 99, image_size=SIZE,
                                           backend=backend)
  n, batch = len(want_y), 6
  for procs in (1, 2, 3):
    parts = [list(pipeline.eval_host_batches(data, split, global_batch=batch, image_size=SIZE,
                                             process_index=p, process_count=procs,
                                             backend=backend, num_examples=limit))
             for p in range(procs)]
    assert [len(p) for p in parts] == [pipeline.num_eval_batches(n, batch)] * procs
    # Global rows in order: batch by batch, the processes' parts side by side.
    got = {key: np.concatenate([np.concatenate([p[b][key] for p in parts])
                                for b in range(len(parts[0]))]) for key in parts[0][0]}
    assert got["mask"].tolist() == [1.0] * n + [0.0] * (len(got["mask"]) - n)
    assert got["index"][:n].tolist() == list(range(n))
    np.testing.assert_array_equal(got["image"][:n], want_x)
    np.testing.assert_array_equal(got["label"][:n], want_y)
    assert not got["image"][n:].any() and not got["label"][n:].any()  # padding: zeros, label 0


def test_eval_batches_device(labeled_folder):
  data = _config(f"folder:{labeled_folder}", eval_split="val")
  batches = list(pipeline.eval_batches(data, "val", global_batch=4, image_size=SIZE,
                                       sharding=_sharding(), backend="numpy"))
  assert len(batches) == 2
  for b in batches:
    assert set(b) == {"image", "label", "mask"} and b["image"].shape == (4, SIZE, SIZE, 3)
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])
  correct = sum(float((np.asarray(b["mask"]) * (np.asarray(b["label"]) == 2)).sum())
                for b in batches)
  assert mask.sum() == 5 and labels[mask > 0].tolist() == [0, 0, 2, 2, 2] and correct == 3
  with pytest.raises(UserError, match="num_examples > 0"):
    pipeline.eval_batches(data, "val", global_batch=4, image_size=SIZE, sharding=_sharding(),
                          backend="numpy", num_examples=0)


# ---------------------------------------------------------- labeled train batches


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["crop_flip", "randaugment"])
@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_labeled_train_batches(labeled_folder, backend, augment):
  data = _config(f"folder:{labeled_folder}", eval_split="val", random_erase=0.5,
                 randaugment=dict(num_ops=2, magnitude=8, magnitude_std=0.5))
  kw = dict(seed=SEED, global_batch=4, image_size=SIZE, sharding=_sharding(), backend=backend,
            augment=augment)
  full = _take(pipeline.labeled_train_batches(data, start_step=0, **kw), 5)  # 3 steps/epoch
  resumed = _take(pipeline.labeled_train_batches(data, start_step=3, **kw), 2)
  for a, b in zip(full[3:], resumed):
    assert set(a) == {"image", "label"} and a["label"].dtype == np.int32
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  x = np.concatenate([np.asarray(b["image"]) for b in full])  # [20, S, S, 3]
  assert np.isfinite(x).all()
  if augment == "crop_flip":  # constant-colour classes: labels follow the pixels
    np.testing.assert_array_equal(_colour_labels(x), np.concatenate([b["label"] for b in full]))
  else:  # erasing and geometric fills break up the constant colours
    assert 4 < (np.ptp(x, axis=(1, 2)).max(-1) > 0.1).sum() < 20
  src = folder_sources.LabeledFolderSource(labeled_folder, "train", CLASSES)
  host = _take(pipeline.labeled_host_batches(data, seed=SEED, global_batch=4, image_size=SIZE,
                                             process_index=1, process_count=2, backend=backend,
                                             augment=augment), 3)
  for s, b in enumerate(host):
    want = sampler.global_batch_indices(SEED, s, 12, 4)[2:]
    np.testing.assert_array_equal(b["index"], want)
    np.testing.assert_array_equal(b["label"], src.labels[want])


def test_labeled_train_needs_labels(folder):
  with pytest.raises(UserError, match="unknown augmentation"):
    pipeline.labeled_host_batches(_config("shapes"), seed=0, global_batch=4, image_size=SIZE,
                                  augment="autoaugment", backend="numpy")
  with pytest.raises(UserError, match="no labeled split"):
    pipeline.labeled_host_batches(_config(f"folder:{folder}"), seed=0, global_batch=4,
                                  image_size=SIZE, backend="numpy")


def test_tfds_labeled_use(tiny_tfds):
  data = _config("pr_mim_tiny_images", data_dir=tiny_tfds)
  pipeline.check_labeled_dataset(data)
  assert pipeline.num_classes(data) == 3
  host = _take(pipeline.labeled_host_batches(data, seed=SEED, global_batch=BATCH,
                                             image_size=SIZE), 2)
  for b in host:
    np.testing.assert_array_equal(b["label"], b["index"] % 3)
  batches = list(pipeline.eval_host_batches(data, "test", global_batch=4, image_size=SIZE))
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
  assert batches[-1]["mask"].tolist() == [1, 1, 0, 0]
  with pytest.raises(UserError, match=r"example 0 of split 'unlabeled' .* has label -1"):
    list(pipeline.eval_host_batches(data, "unlabeled", global_batch=4, image_size=SIZE))


# ------------------------------------------- rows as functions of (seed, step, position)


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_train_rows_are_the_augmentation_of_seed_step_and_position(folder, backend):
  """The design's determinism contract: row p of the global batch at step s is the training
  augmentation of example global_batch_indices(seed, s)[p], keyed by (seed, s, p). Process 1
  of 2 holds positions 4..7, so keying by local row or by example index shows."""
  from pr_mim_jax.data import augment_np  # pylint: disable=g-import-not-at-top
  data = _config(f"folder:{folder}")
  src = folder_sources.FolderSource(folder)
  host = _take(pipeline.host_batches(data, seed=SEED, global_batch=BATCH, image_size=SIZE,
                                     start_step=2, process_index=1, process_count=2,
                                     backend=backend), 2)
  for s, b in enumerate(host, start=2):
    want_idx = sampler.global_batch_indices(SEED, s, 21, BATCH)[4:]
    np.testing.assert_array_equal(b["index"], want_idx)
    for row, (i, pos) in enumerate(zip(want_idx, range(4, 8))):
      if backend == "tf":
        from pr_mim_jax.data import augment  # pylint: disable=g-import-not-at-top
        want = augment.train_augment(src.raw(int(i)), SEED, s, pos, SIZE).numpy()
      else:
        want = augment_np.train_augment(src.raw(int(i)), augment_np.example_rng(SEED, s, pos),
                                        SIZE)
      diff = np.abs(b["image"][row].astype(int) - want.astype(int))
      assert diff.max() <= 1, (s, row)


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_crop_min_scale_reaches_the_crop(backend, shapes_dir):
  """data.crop_min_scale=1.0 leaves one box, the whole image (area share 1, so only a
  square box fits a square image): every 16 x 16 shapes image comes out itself or mirrored."""
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  data = _config("shapes", data_dir=shapes_dir, crop_min_scale=1.0)
  raw, _ = shapes.generate(40, image_size=16, seed=0, split="train")
  flips = []
  for b in _take(pipeline.host_batches(data, seed=SEED, global_batch=BATCH, image_size=16,
                                       backend=backend), 3):
    for img, i in zip(b["image"].astype(int), b["index"]):
      same, mirrored = (np.abs(img - r).max() for r in (raw[i], raw[i][:, ::-1]))
      assert min(same, mirrored) <= 1, i
      flips.append(mirrored < same)
  assert 0 < np.mean(flips) < 1


def test_randaugment_settings_come_from_the_config():
  """data.randaugment.{num_ops, magnitude, magnitude_std} and data.random_erase, else MAE's
  fine-tuning recipe: rand-m9-mstd0.5 (2 ops), erasing 0.25."""
  cfg = pipeline._randaugment_cfg  # pylint: disable=protected-access
  assert cfg(_config("shapes")) == dict(num_ops=2, magnitude=9.0, magnitude_std=0.5,
                                        erase_prob=0.25)
  data = _config("shapes", random_erase=0.1,
                 randaugment=dict(num_ops=3, magnitude=5, magnitude_std=0.2))
  assert cfg(data) == dict(num_ops=3, magnitude=5.0, magnitude_std=0.2, erase_prob=0.1)


def test_randaugment_without_ops_or_erasing_is_the_normalised_crop():
  """num_ops=0 and random_erase=0 through the config: the labeled 'randaugment' batch is the
  'crop_flip' batch normalised (float32), row for row."""
  from pr_mim_jax.data import pixels  # pylint: disable=g-import-not-at-top
  data = _config("shapes", random_erase=0.0, randaugment=dict(num_ops=0))
  kw = dict(seed=SEED, global_batch=BATCH, image_size=16, backend="numpy", start_step=1)
  ra = _take(pipeline.labeled_host_batches(data, augment="randaugment", **kw), 2)
  plain = _take(pipeline.labeled_host_batches(data, augment="crop_flip", **kw), 2)
  for a, b in zip(ra, plain):
    assert a["image"].dtype == pipeline.image_dtype("randaugment") == np.float32
    assert b["image"].dtype == pipeline.image_dtype("crop_flip") == np.uint8
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["image"], pixels.normalize(b["image"]), atol=1e-6)
  spec = pipeline.abstract_batch(BATCH, 16, _sharding(), labeled=True, augment="randaugment")
  assert spec["image"].dtype == np.float32 and spec["label"].dtype == np.int32


def test_labeled_arrays_across_chunks_drop_the_padding(monkeypatch):
  """labeled_arrays reads in chunks; with chunks of 4, 10 examples are 3 chunks, the last
  padded by 2 rows: the result is still exactly the 10 examples in order."""
  from pr_mim_jax.data import shapes  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipeline, "_LABELED_CHUNK", 4)
  images, labels = pipeline.labeled_arrays(_config("shapes"), "test", num_examples=10,
                                           image_size=16, backend="numpy")
  raw, want = shapes.generate(10, image_size=16, seed=0, split="test")
  np.testing.assert_array_equal(labels, want)
  np.testing.assert_array_equal(images, raw)


def test_eval_batches_with_a_full_rank_batch_sharding(labeled_folder):
  """A batch sharding written for the images, P('data', None, None, None), also places the
  rank-1 labels and mask (its leading entry)."""
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data", None, None, None))
  data = _config(f"folder:{labeled_folder}", eval_split="val")
  batches = list(pipeline.eval_batches(data, "val", global_batch=4, image_size=SIZE,
                                       sharding=sharding, backend="numpy"))
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  assert labels[mask > 0].tolist() == [0, 0, 2, 2, 2]
  assert batches[0]["label"].sharding.spec == PartitionSpec("data")


def test_device_prefetcher_waits_for_a_slow_loader_and_stays_bounded():
  """A batch that takes longer than the consumer's 1 s poll still arrives (the loader is alive,
  so an empty queue is no end), and the loader runs at most `size` items (+ the one it holds)
  ahead of the consumer."""
  import time  # pylint: disable=g-import-not-at-top

  def slow():
    yield 0
    time.sleep(1.3)
    yield 1

  assert list(prefetch.DevicePrefetcher(slow(), 2)) == [0, 1]
  produced = []

  def counted():
    for i in range(100):
      produced.append(i)
      yield i

  p = prefetch.DevicePrefetcher(counted(), 2)
  time.sleep(0.3)
  assert 2 <= len(produced) <= 3
  assert [next(p) for _ in range(5)] == [0, 1, 2, 3, 4]
  p.close(timeout=5)


def test_device_prefetcher_closes_its_iterator_from_the_loader_thread():
  """A tf.data iterator must be shut down by the thread that drives it: closing the
  prefetcher makes the loader thread call the iterator's close() (a plain iterator, which
  garbage collection would never close)."""
  import threading  # pylint: disable=g-import-not-at-top

  class Source:
    def __init__(self):
      self.i, self.closed_in = 0, []

    def __iter__(self):
      return self

    def __next__(self):
      self.i += 1
      return self.i

    def close(self):
      self.closed_in.append(threading.current_thread().name)

  src = Source()
  p = prefetch.DevicePrefetcher(src, 2)
  assert [next(p) for _ in range(3)] == [1, 2, 3]
  p.close(timeout=5)
  assert src.closed_in == ["device_prefetch"]


def test_negative_labels_stop_labeled_reading(labeled_folder, monkeypatch):
  """tfds writes -1 for an unlabeled example: labeled evaluation and training stop with a
  UserError naming the example, at the batch that holds it; unlabeled reading is unchecked."""
  real = folder_sources.LabeledFolderSource.label
  monkeypatch.setattr(folder_sources.LabeledFolderSource, "label",
                      lambda self, i: -1 if i == 3 else real(self, i))
  data = _config(f"folder:{labeled_folder}", eval_split="val")
  src = folder_sources.LabeledFolderSource(labeled_folder, "val", CLASSES)
  it = pipeline.eval_host_batches(data, "val", global_batch=2, image_size=SIZE, backend="numpy")
  assert next(it)["label"].tolist() == [0, 0]  # examples 0, 1
  with pytest.raises(UserError, match=f"{src.where(3)} has label -1"):
    next(it)  # examples 2, 3
  with pytest.raises(UserError, match="has label -1"):
    _take(pipeline.labeled_host_batches(data, seed=0, global_batch=12, image_size=SIZE,
                                        backend="numpy"), 1)  # all 12 train examples
  b = _take(pipeline.host_batches(data, seed=0, global_batch=12, image_size=SIZE,
                                  backend="numpy"), 1)[0]
  assert sorted(b["index"].tolist()) == list(range(12))


def test_a_negative_label_in_memory_is_a_user_error_too():
  """The in-memory source (shapes on the numpy backend) names its example like the others."""
  src = sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, -1], np.int32))
  batches = iter([{"label": np.array([0, -1], np.int32), "index": np.array([0, 1])}])
  with pytest.raises(UserError, match="example 1 of the in-memory dataset has label -1"):
    list(pipeline._labels_checked(batches, src))  # pylint: disable=protected-access


@pytest.mark.parametrize("backend", [pytest.param("tf", marks=needs_tf), "numpy"])
def test_randaugment_crops_with_crop_min_scale(backend, shapes_dir):
  """data.crop_min_scale reaches the fine-tuning recipe's crop too: with no ops and no erasing,
  the 'randaugment' batch is the 'crop_flip' batch at the same (non-default) scale, normalised."""
  from pr_mim_jax.data import pixels  # pylint: disable=g-import-not-at-top
  data = _config("shapes", data_dir=shapes_dir, random_erase=0.0, randaugment=dict(num_ops=0),
                 crop_min_scale=0.9)
  kw = dict(seed=SEED, global_batch=BATCH, image_size=16, backend=backend)
  ra = _take(pipeline.labeled_host_batches(data, augment="randaugment", **kw), 2)
  plain = _take(pipeline.labeled_host_batches(data, augment="crop_flip", **kw), 2)
  for a, b in zip(ra, plain):
    np.testing.assert_allclose(a["image"], pixels.normalize(b["image"]), atol=1e-6)


def test_global_batch_not_divisible_by_the_processes_is_a_user_error(monkeypatch):
  """With 3 processes a global batch of 8 cannot split evenly: one clear error, before any
  data is read."""
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 3)
  for make in (pipeline.train_batches, pipeline.labeled_train_batches):
    kw = dict(augment="crop_flip") if make is pipeline.labeled_train_batches else {}
    with pytest.raises(UserError, match="not divisible by the 3 processes; use a multiple of 3"):
      make(_config("shapes"), seed=0, global_batch=8, image_size=16, start_step=0,
           sharding=_sharding(), backend="numpy", **kw)


def test_device_prefetcher_waits_for_a_slow_consumer():
  """A consumer slower than the loader (a long training step) still gets every item, in
  order: a full queue makes the loader wait, never drop or stop."""
  import time  # pylint: disable=g-import-not-at-top

  p = prefetch.DevicePrefetcher(iter(range(4)), 1)
  got = []
  for item in p:
    got.append(item)
    time.sleep(0.5)
  assert got == [0, 1, 2, 3]


def test_data_prefetch_sets_how_far_the_loader_runs_ahead():
  """data.prefetch=4: the loader thread prepares 4 device batches (+ the one it holds) ahead
  of a consumer that has not started."""
  import time  # pylint: disable=g-import-not-at-top
  produced = []

  def host():
    for i in range(20):
      produced.append(i)
      yield {"image": np.full((2, 1, 1, 3), i, np.uint8), "index": np.arange(2)}

  device_batches = pipeline._device_batches  # pylint: disable=protected-access
  it = device_batches(_config("shapes", prefetch=4), host(), _sharding(), 2)
  deadline = time.monotonic() + 10
  while len(produced) < 4 and time.monotonic() < deadline:  # the loader fills the queue
    time.sleep(0.05)
  time.sleep(0.3)  # and then waits
  assert 4 <= len(produced) <= 5
  assert [int(np.asarray(b["image"])[0, 0, 0, 0]) for b in _take(it, 6)] == list(range(6))


def test_device_prefetcher_delivers_an_item_put_as_its_wait_timed_out():
  """The loader may put its last item and end just after the consumer's poll timed out: the
  consumer must still get that item, not take the ended thread for an empty stream."""
  import queue  # pylint: disable=g-import-not-at-top

  p = prefetch.DevicePrefetcher(iter(["last"]), 1)
  p._thread.join(5)  # pylint: disable=protected-access
  real_get, timeouts = p._queue.get, []  # pylint: disable=protected-access

  def get(timeout):  # the first wait times out while the item arrives
    if not timeouts:
      timeouts.append(timeout)
      raise queue.Empty
    return real_get(timeout=timeout)

  p._queue.get = get  # pylint: disable=protected-access
  assert list(p) == ["last"]


def test_a_split_smaller_than_one_batch_fails_when_the_batches_are_made():
  """40 training examples cannot fill a global batch of 64: host_batches raises the error as
  it is called (before the trainer compiles), not at the first batch."""
  for make in (pipeline.host_batches, pipeline.labeled_host_batches):
    with pytest.raises(UserError, match="fewer than one global batch of 64"):
      make(_config("shapes"), seed=0, global_batch=64, image_size=16, backend="numpy")


def test_the_first_unlabeled_example_of_a_batch_is_named():
  """Two unlabeled rows in one batch: the error names the first, in batch order."""
  src = sources.ArraySource(np.zeros((4, 4, 4, 3), np.uint8), np.array([0, -1, 1, -1], np.int32))
  batches = iter([{"label": np.array([0, -1, 1, -1], np.int32), "index": np.arange(4)}])
  with pytest.raises(UserError, match="example 1 of the in-memory dataset has label -1"):
    list(pipeline._labels_checked(batches, src))  # pylint: disable=protected-access
