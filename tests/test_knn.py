"""The weighted cosine k-NN classifier against a hand-computed case and a NumPy loop."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from pr_mim_jax.training import knn


def numpy_knn_scores(train, train_labels, test, k, temperature, num_classes):
  """DINO's vote, one test image at a time: the k most cosine-similar train images each add
  exp(sim / T) to their class."""
  scores = np.zeros((len(test), num_classes))
  unit = lambda x: x / np.linalg.norm(x)
  for m, query in enumerate(test):
    sims = np.array([unit(query) @ unit(t) for t in train])
    for n in sorted(range(len(train)), key=lambda n: -sims[n])[:k]:
      scores[m, train_labels[n]] += np.exp(sims[n] / temperature)
  return scores


def test_scores_by_hand():
  """Train points at 0, 60 and 180 degrees (classes 0, 1, 1); the query at 0 degrees.
  k = 2 keeps cos 1 (class 0) and cos 0.5 (class 1): scores e^(1/T) and e^(0.5/T). The
  lengths differ on purpose: the similarity is cosine, so they must not matter."""
  train = np.array([[3.0, 0.0], [0.5, 0.5 * np.sqrt(3.0)], [-1.0, 0.0]], np.float32)
  test = np.array([[0.2, 0.0]], np.float32)
  scores = knn.knn_predict(train, np.array([0, 1, 1]), test, k=2, num_classes=3,
                           temperature=0.5)
  np.testing.assert_allclose(np.asarray(scores), [[np.e ** 2, np.e, 0.0]], rtol=1e-5)


def test_the_far_majority_does_not_outvote_the_near_neighbour():
  """With k = 3 the two far class-1 votes (cos 0) weigh e^0 each, the near class-0 vote
  e^(1/0.07): the weighting, not the count, decides."""
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], np.float32)
  accuracy = knn.knn_accuracy(train, np.array([0, 1, 1]), np.array([[1.0, 0.01]], np.float32),
                              np.array([0]), k=3)
  assert accuracy == 1.0


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (7, 0.5)])
def test_matches_a_numpy_loop(k, temperature):
  rng = np.random.default_rng(k)
  train = rng.normal(size=(40, 6)).astype(np.float32)
  test = rng.normal(size=(13, 6)).astype(np.float32)
  train_labels, test_labels = rng.integers(0, 4, 40), rng.integers(0, 4, 13)
  expected = numpy_knn_scores(train, train_labels, test, k, temperature, 4)
  scores = np.asarray(knn.knn_predict(train, train_labels, test, k=k, num_classes=4,
                                      temperature=temperature))
  np.testing.assert_allclose(scores, expected, rtol=1e-4)
  # Accuracy over test chunks of 5 (13 = 5 + 5 + 3) counts the same images as one chunk.
  accuracy = knn.knn_accuracy(train, train_labels, test, test_labels, k=k,
                              temperature=temperature, chunk=5)
  assert accuracy == np.mean(expected.argmax(-1) == test_labels)


def test_k_above_the_train_set_uses_all_of_it():
  train = np.eye(3, dtype=np.float32)
  accuracy = knn.knn_accuracy(train, np.array([0, 1, 2]), train, np.array([0, 1, 2]), k=20)
  assert accuracy == 1.0


def test_pool_features():
  tokens = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # [B, 1+L, D]
  np.testing.assert_array_equal(knn.pool_features(tokens, "cls"), tokens[:, 0])
  np.testing.assert_array_equal(knn.pool_features(tokens, "mean"), [[3.0, 4.0], [9.0, 10.0]])


class _Tokens(nn.Module):
  """A stand-in encoder: pixel (i, j) becomes patch token i * W + j, times a per-channel scale;
  the 'cls' token is the per-channel max over the image."""

  @nn.compact
  def __call__(self, images):  # [B, H, W, 3] -> [B, 1 + H * W, 3]
    scale = self.param("scale", nn.initializers.ones, (3,))
    tokens = images.reshape(images.shape[0], -1, 3) * scale
    return jnp.concatenate([tokens.max(axis=1, keepdims=True), tokens], axis=1)


def test_extract_features_normalises_batches_and_drops_the_padding():
  """7 uint8 images in batches of 3 (the last padded): one feature per image, computed on
  normalised pixels (ImageNet statistics written out), equal to the float path's."""
  images = np.random.default_rng(0).integers(0, 256, (7, 2, 2, 3)).astype(np.uint8)
  params = {"scale": jnp.array([1.0, 2.0, 3.0])}
  normed = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  tokens = normed.reshape(7, 4, 3) * np.array([1.0, 2.0, 3.0])
  for feature, want in (("mean", tokens.mean(1)), ("cls", tokens.max(1))):
    got = knn.extract_features(_Tokens(), params, images, feature=feature, batch_size=3)
    assert got.shape == (7, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    floats = knn.extract_features(_Tokens(), params, normed.astype(np.float32), feature=feature,
                                  batch_size=4)
    np.testing.assert_allclose(floats, want, rtol=1e-5, atol=1e-5)


def test_a_zero_feature_does_not_poison_the_scores():
  """A zero vector has no direction: its cosine similarity is 0, not NaN."""
  train = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  scores = np.asarray(knn.knn_predict(train, np.array([0, 1, 2]), np.array([[1.0, 0.1]], np.float32),
                                      k=3, num_classes=3, temperature=1.0))
  assert np.isfinite(scores).all()
  unit = np.array([1.0, 0.1]) / np.linalg.norm([1.0, 0.1])
  np.testing.assert_allclose(scores, [[1.0, np.exp(unit[0]), np.exp(unit[1])]], rtol=1e-5)


def _at_cosines(cosines):
  """float32 [N, 2] unit vectors at the given cosine similarities to the query (1, 0)."""
  c = np.asarray(cosines, np.float64)
  return np.stack([c, np.sqrt(1.0 - c ** 2)], axis=1).astype(np.float32)


def test_defaults_are_dinos_k_and_temperature():
  """knn_accuracy without k or temperature votes as DINO: k = 20, T = 0.07. Five class-0
  neighbours at cos 0.95 against fifteen class-1 at cos 0.9: with k = 20 the fifteen win
  (5 e^(0.05/0.07) = 10.2 < 15), with k = 10 class 0 would. One class-0 neighbour at cos 1
  against four class-1 at cos 0.9: at T = 0.07 the one wins (e^(0.1/0.07) = 4.2 > 4), at
  T = 0.1 it would not (e = 2.7)."""
  query, label = np.array([[1.0, 0.0]], np.float32), np.array([1])
  train = _at_cosines([0.95] * 5 + [0.9] * 15)
  assert knn.knn_accuracy(train, np.array([0] * 5 + [1] * 15), query, label) == 1.0
  train = _at_cosines([1.0] + [0.9] * 4)
  assert knn.knn_accuracy(train, np.array([0] + [1] * 4), query, np.array([0])) == 1.0


@pytest.mark.parametrize("n_test,chunk", [(6, 5), (11, 5), (1, 4)])
def test_accuracy_counts_every_test_image_once(n_test, chunk):
  """A last chunk of one image, or a single chunk, is counted: the accuracy equals a NumPy
  loop's over all n_test images."""
  rng = np.random.default_rng(n_test)
  train = rng.normal(size=(30, 5)).astype(np.float32)
  test = rng.normal(size=(n_test, 5)).astype(np.float32)
  train_labels, test_labels = rng.integers(0, 3, 30), rng.integers(0, 3, n_test)
  want = numpy_knn_scores(train, train_labels, test, 4, 0.07, 3).argmax(-1) == test_labels
  # The last image alone decides whether a dropped last chunk shows: make it correct.
  test_labels[-1] = numpy_knn_scores(train, train_labels, test[-1:], 4, 0.07, 3).argmax()
  want[-1] = True
  got = knn.knn_accuracy(train, train_labels, test, test_labels, k=4, chunk=chunk)
  assert got == pytest.approx(want.mean())


class _HalfTokens(nn.Module):
  """A stand-in encoder computing in bfloat16, as the k-NN config's ImageNet default."""

  @nn.compact
  def __call__(self, images):  # [B, H, W, 3] -> [B, 1 + H * W, 3] bfloat16
    tokens = images.reshape(images.shape[0], -1, 3).astype(jnp.bfloat16)
    return jnp.concatenate([tokens[:, :1], tokens], axis=1)


def test_extract_features_of_a_bfloat16_encoder_are_float32():
  """The cosine similarities are computed on float32 features whatever the encoder's compute
  dtype (bfloat16 keeps 3 significant digits, enough to reorder close neighbours)."""
  images = np.random.default_rng(0).integers(0, 256, (5, 2, 2, 3)).astype(np.uint8)
  got = knn.extract_features(_HalfTokens(), {}, images, feature="mean", batch_size=2)
  assert got.shape == (5, 3) and got.dtype == np.float32


def test_ties_go_to_the_earlier_train_image_and_the_lower_class():
  """Exact ties (duplicate images) resolve as the NumPy loop above does, a stable sort and
  argmax: with k = 1 the earlier of two equal train features votes; two equal votes of
  classes 2 and 1 elect class 1. So a rerun on the same features gives the same accuracy."""
  query = np.array([[1.0, 0.0]], np.float32)
  twins = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  assert knn.knn_accuracy(twins, np.array([2, 1, 0]), query, np.array([2]), k=1) == 1.0
  assert knn.knn_accuracy(twins, np.array([2, 1, 0]), query, np.array([1]), k=2) == 1.0
