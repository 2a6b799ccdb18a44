"""Label smoothing, Mixup and CutMix for fine-tuning, in pure JAX (jit-able, static shapes).

Batch mode, as timm's Mixup(mode='batch'): one lambda and one box for the whole
batch; every example is mixed with its partner in the reversed batch (x[::-1]).
CutMix pastes a box covering about 1 - lam of the image, clipped at the borders,
and then sets lam to the share of pixels actually kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def one_hot_smoothed(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """int [B] -> float32 [B, C]: 1 - smoothing + smoothing / C on the label, smoothing / C off it."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def _cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int):
  """Box mask bool [H, W] of area share ~1 - lam at a uniform centre, and its exact lam."""
  k_y, k_x = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  half_h = (height * cut).astype(jnp.int32) // 2
  half_w = (width * cut).astype(jnp.int32) // 2
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0, y1 = jnp.clip(cy - half_h, 0, height), jnp.clip(cy + half_h, 0, height)
  x0, x1 = jnp.clip(cx - half_w, 0, width), jnp.clip(cx + half_w, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  return box, 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def mix(rng: jax.Array, images: jax.Array, targets: jax.Array, *, mixup_alpha: float,
        cutmix_alpha: float, switch_prob: float = 0.5,
        prob: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Mixup or CutMix of a batch with its reverse: images [B, H, W, C], targets [B, K].

  With probability `prob` mixes the batch: CutMix with probability switch_prob when both
  alphas are > 0 (else whichever is > 0), lam ~ Beta(alpha, alpha). Returns the mixed
  images and lam * targets + (1 - lam) * targets[::-1]. Both alphas 0: the inputs unchanged.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_lam, k_box = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = max(mixup_alpha, cutmix_alpha)
  lam = jax.random.beta(k_lam, alpha, alpha)
  other = images[::-1]
  box, box_lam = _cutmix_box(k_box, lam, images.shape[1], images.shape[2])
  cutmixed = jnp.where(box[None, :, :, None], other, images)
  mixed = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * other
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, box_lam, lam), 1.0).astype(targets.dtype)
  out = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed), images)
  return out, lam * targets + (1 - lam) * targets[::-1]
