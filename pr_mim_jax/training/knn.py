"""Cosine k-NN classification on frozen encoder features (the pre-training monitor and the
k-NN evaluation).

Each test feature votes with its k most similar train features, weighted by
exp(similarity / T) as in DINO's k-NN protocol (k = 20, T = 0.07).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pr_mim_jax.data import pixels
from pr_mim_jax.parallel import sharding


FEATURES = ("mean", "cls")


def pool_features(tokens, feature: str):
  """[B, 1+L, D] encoder output -> [B, D]: average of patch tokens, or the cls token."""
  if feature == "mean":
    return tokens[:, 1:].mean(axis=1)
  if feature == "cls":
    return tokens[:, 0]
  raise ValueError(f"unknown k-NN feature {feature!r}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _embed(model, feature, params, images):
  # MaskedAutoencoder.encode, or a bare vit.Encoder's __call__.
  tokens = model.apply({"params": params}, pixels.model_input(images),
                       method=getattr(type(model), "encode", None))  # [B, 1+L, D]
  return pool_features(tokens, feature).astype(jnp.float32)


def extract_features(model, params, images: np.ndarray, *, feature: str, batch_size: int):
  """[N, H, W, 3] images (uint8 pixels or normalised) -> [N, D] float32 features, in
  batches (last one padded)."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    padded = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk
    out.append(sharding.to_host(_embed(model, feature, params, padded))[:len(chunk)])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_predict(train_feats, train_labels, test_feats, *, k: int, num_classes: int,
                temperature: float = 0.07):
  """Class scores [M, C] for test features [M, D] from train features [N, D]."""
  normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sims = normalize(test_feats) @ normalize(train_feats).T  # [M, N]
  top_sims, top_idx = jax.lax.top_k(sims, k)  # [M, k]
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes)  # [M, k, C]
  return jnp.einsum("mk,mkc->mc", jnp.exp(top_sims / temperature), votes)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, *, k: int = 20,
                 temperature: float = 0.07, chunk: int = 1024) -> float:
  """Top-1 accuracy of the weighted cosine k-NN classifier (test features in chunks)."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  correct = 0
  for start in range(0, len(test_feats), chunk):
    scores = knn_predict(train_feats, train_labels, test_feats[start:start + chunk],
                         k=min(k, len(train_feats)), num_classes=num_classes,
                         temperature=temperature)
    correct += int(np.sum(np.asarray(scores).argmax(-1) == test_labels[start:start + chunk]))
  return correct / len(test_feats)
