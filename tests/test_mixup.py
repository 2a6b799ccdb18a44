"""Label smoothing, Mixup and CutMix: target sums, recovered lambdas, identity cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr_mim_jax.evaluation import mixup

B, H, W, C = 8, 12, 16, 10


def _batch():
  """Distinct constant images (value i + 1) with distinct labels, so mixing is readable."""
  images = jnp.broadcast_to(jnp.arange(1.0, B + 1)[:, None, None, None], (B, H, W, 3))
  return images, jnp.arange(B) % C


@functools.partial(jax.jit, static_argnames=("mixup_alpha", "cutmix_alpha", "prob", "smoothing"))
def _mix(rng, *, mixup_alpha, cutmix_alpha, prob=1.0, smoothing=0.0):
  images, labels = _batch()
  targets = mixup.one_hot_smoothed(labels, C, smoothing)
  return mixup.mix(rng, images, targets, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                   prob=prob)


def _lam(targets, smoothing=0.0):
  """lam per example from mixed targets: the weight of the example's own label."""
  own = np.asarray(targets)[np.arange(B), np.arange(B) % C]
  off = smoothing / C
  return (own - off) / (1 - smoothing)


def test_one_hot_smoothed():
  t = mixup.one_hot_smoothed(jnp.array([0, 3]), 5, 0.1)
  np.testing.assert_allclose(t[0], [0.92, 0.02, 0.02, 0.02, 0.02], atol=1e-6)
  np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(mixup.one_hot_smoothed(jnp.array([1]), 3, 0.0), [[0, 1, 0]])


@pytest.mark.slow
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_targets_sum_to_one(smoothing, mixup_alpha, cutmix_alpha):
  for s in range(4):
    _, t = _mix(jax.random.key(s), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                smoothing=smoothing)
    assert t.shape == (B, C)
    np.testing.assert_allclose(t.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_cutmix_pixel_share_equals_target_lambda():
  own = np.arange(1.0, B + 1)[:, None, None]
  lams = []
  for s in range(12):
    x, t = _mix(jax.random.key(s), mixup_alpha=0.0, cutmix_alpha=1.0)
    x = np.asarray(x)[..., 0]  # [B, H, W]
    from_own, from_other = x == own, x == own[::-1]
    assert (from_own | from_other).all()  # pasted, not blended
    lam = _lam(t)
    np.testing.assert_allclose(lam, from_own.mean((1, 2)), atol=1e-6)  # pair (i, B-1-i) distinct
    lams.append(lam[0])
  assert np.ptp(lams) > 0.2  # boxes of various sizes


@pytest.mark.slow
def test_mixup_is_lambda_blend():
  images, _ = _batch()
  for s in range(4):
    x, t = _mix(jax.random.key(s), mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = _lam(t)
    assert np.ptp(lam) < 1e-6  # one lambda per batch
    want = lam[0] * images + (1 - lam[0]) * images[::-1]
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_switch_uses_both():
  kinds = set()
  for s in range(16):
    x, _ = _mix(jax.random.key(s), mixup_alpha=0.8, cutmix_alpha=1.0)
    own = np.arange(1.0, B + 1)[:, None, None]
    kinds.add(bool(((x[..., 0] == own) | (x[..., 0] == own[::-1])).all()))  # True: cutmix
  assert kinds == {True, False}


@pytest.mark.slow
def test_identity():
  images, labels = _batch()
  targets = mixup.one_hot_smoothed(labels, C, 0.1)
  for kw in (dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0),
             dict(mixup_alpha=0.0, cutmix_alpha=0.0)):
    x, t = mixup.mix(jax.random.key(0), images, targets, **kw)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(t, targets)


@pytest.mark.parametrize("lam,sides", [(0.64, (6, 8)), (0.19, (10, 14))])
def test_cutmix_box_sides_follow_timm(lam, sides):
  """timm's rand_bbox: cut = sqrt(1 - lam); a box of 2 * (int(side * cut) // 2) pixels per
  axis around a uniform centre, clipped at the borders. H=12, W=16: lam 0.64 gives cut 0.6,
  int(7.2) = 7 and int(9.6) = 9, so 6 x 8; lam 0.19 gives cut 0.9, so 10 x 14. Clipped boxes
  are smaller; the returned lam is 1 - the box's pixel share."""
  boxes, lams = jax.vmap(lambda k: mixup._cutmix_box(k, jnp.float32(lam), H, W))(
      jax.random.split(jax.random.key(0), 200))
  boxes, lams = np.asarray(boxes), np.asarray(lams)
  heights, widths = boxes.any(2).sum(1), boxes.any(1).sum(1)  # [200]
  np.testing.assert_array_equal(boxes.sum((1, 2)), heights * widths)  # rectangles
  assert (heights.max(), widths.max()) == sides  # whole boxes: centres away from the borders
  np.testing.assert_allclose(lams, 1 - boxes.mean((1, 2)), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("switch_prob,prob", [(0.5, 1.0), (0.2, 0.6)])
def test_switch_and_apply_probabilities(switch_prob, prob):
  """Over 800 batches: unmixed with probability 1 - prob, then CutMix (pixels pasted from the
  partner) with probability switch_prob, else Mixup (pixels blended). Bounds: 5 binomial
  standard deviations."""
  images, labels = _batch()
  targets = mixup.one_hot_smoothed(labels, C)
  mix = lambda k: mixup.mix(k, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0,
                            switch_prob=switch_prob, prob=prob)[0][..., 0]  # [B, H, W]
  x = np.asarray(jax.vmap(mix)(jax.random.split(jax.random.key(1), 800)))  # [800, B, H, W]
  own = np.asarray(images)[None, ..., 0]
  unchanged = (x == own).all((1, 2, 3))
  pasted = ((x == own) | (x == own[:, ::-1])).all((1, 2, 3)) & ~unchanged
  # An empty CutMix box also leaves a batch unchanged: count those with the unmixed ones.
  bound = lambda p: 5 * np.sqrt(p * (1 - p) / 800)
  assert abs(unchanged.mean() - (1 - prob)) < bound(1 - prob) + 0.02
  assert abs(pasted.mean() - prob * switch_prob) < bound(prob * switch_prob) + 0.02


def test_targets_mix_with_the_same_partner_as_the_pixels():
  """Example i takes pixels from example B-1-i, so its target is lam on its own label and
  1 - lam on its partner's label, for Mixup and CutMix alike."""
  own = np.arange(1.0, B + 1)[:, None, None]
  for cutmix in (False, True):
    for s in range(3):
      x, t = _mix(jax.random.key(s), mixup_alpha=0.0 if cutmix else 0.8,
                  cutmix_alpha=1.0 if cutmix else 0.0)
      t = np.asarray(t)
      lam = _lam(t)
      partner = (np.arange(B) % C)[::-1]
      np.testing.assert_allclose(t[np.arange(B), partner], 1 - lam, atol=1e-6)
      x = np.asarray(x)[..., 0]
      if cutmix:
        np.testing.assert_allclose((x == own[::-1]).mean((1, 2)), 1 - lam, atol=1e-6)
      else:
        want = lam[:, None, None] * own + (1 - lam[:, None, None]) * own[::-1]  # [B, 1, 1]
        np.testing.assert_allclose(x, np.broadcast_to(want, x.shape), rtol=1e-5)


def test_mixup_lambda_is_symmetric_beta():
  """lam ~ Beta(alpha, alpha) (timm): over 2000 batches its law is within a KS distance of
  0.045 of Beta(0.8, 0.8) (p < 1e-3) and its mean within 5 standard errors of 1/2."""
  scipy_stats = pytest.importorskip("scipy.stats")
  targets = mixup.one_hot_smoothed(jnp.arange(2), 2)
  images = jnp.zeros((2, 2, 2, 1))
  lam = jax.jit(jax.vmap(lambda k: mixup.mix(k, images, targets, mixup_alpha=0.8,
                                             cutmix_alpha=0.0)[1][0, 0]))(
      jax.random.split(jax.random.key(2), 2000))
  lam = np.sort(np.asarray(lam, np.float64))
  cdf = scipy_stats.beta(0.8, 0.8).cdf(lam)
  n = len(lam)
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  assert ks < 0.045
  assert abs(lam.mean() - 0.5) < 5 * np.sqrt(0.64 / (2.56 * 2.6) / n)


def test_cutmix_box_centres_are_uniform_so_boxes_clip_at_borders():
  """timm's rand_bbox draws the centre uniformly over the whole image, so boxes clip. lam 0.19
  at H=12: half-height 5, unclipped iff 5 <= cy <= 7, a share of 3/12 of the rows."""
  boxes, _ = jax.vmap(lambda k: mixup._cutmix_box(k, jnp.float32(0.19), H, W))(
      jax.random.split(jax.random.key(1), 400))
  heights = np.asarray(boxes).any(2).sum(1)
  assert heights.min() <= 6  # centre in the first or last row: 5 or 6 rows kept
  assert abs(np.mean(heights == 10) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 400)


def test_each_of_mixup_and_cutmix_draws_lambda_with_its_own_alpha():
  """mixup_alpha 50 (lam ~ 1/2, sd 0.05) and cutmix_alpha 0.05 (lam near 0 or 1): every
  blended (Mixup) batch of 400 has its lam within 0.3 and 0.7, as Beta(50, 50) gives."""
  images, labels = _batch()
  targets = mixup.one_hot_smoothed(labels, C)
  mix = lambda k: mixup.mix(k, images, targets, mixup_alpha=50.0, cutmix_alpha=0.05)
  x, t = jax.vmap(mix)(jax.random.split(jax.random.key(3), 400))  # [400, B, H, W, 3], [400, B, C]
  x, lam = np.asarray(x)[..., 0], np.asarray(t)[:, 0, 0]  # [400, B, H, W], [400]
  own = np.asarray(images)[None, ..., 0]
  blended = ~((x == own) | (x == own[:, ::-1])).all((1, 2, 3))
  assert blended.sum() > 100
  assert np.all((lam[blended] > 0.3) & (lam[blended] < 0.7))


def test_cutmix_boxes_reach_every_pixel_the_last_row_and_column_included():
  """Boxes clip at the image's borders, not one pixel inside: over 400 centres every pixel,
  the last row and column included, falls in some box (a box kept off the last column would
  never mix it)."""
  boxes, _ = jax.vmap(lambda k: mixup._cutmix_box(k, jnp.float32(0.19), H, W))(
      jax.random.split(jax.random.key(4), 400))
  assert np.asarray(boxes).any(0).all()
