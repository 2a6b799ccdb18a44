"""Analytic FLOP count of one pre-training step, per image, split by where it is spent.

Counts what our model executes, the way `torch.utils.flop_counter` counts: only matrix
products (2*M*N*K each; attention's two products included), no elementwise work. The
backward pass costs two products per forward product (gradients of both operands), except
the patch embedding, whose input is data and needs no gradient (one product). XLA's
`cost_analysis()` on GPU is unreliable (on one H200, in two undated reference runs before
this code, it reported 2.5 and 5.9 GFLOP/img for a ~58 GFLOP MAE-B/16 step), so this is the
number to trust; tests cross-check it against XLA's CPU count.
"""

import dataclasses

from pr_mim_jax.method.masking import TokenSplit
from pr_mim_jax.models.mae import MaskedAutoencoder

GIGA = 1e9


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """fwd+bwd GFLOP per image."""
  encoder: float
  decoder: float
  thrown: float  # reconstruction of thrown tokens (PR-MIM); 0 otherwise

  @property
  def total(self) -> float:
    return self.encoder + self.decoder + self.thrown


def _block(tokens: int, width: int, mlp_ratio: float, context: int = 0) -> float:
  """Forward FLOPs of one pre-norm block; `context` > 0: cross-attention to that many tokens."""
  mlp = 2 * 2 * tokens * width * int(width * mlp_ratio)
  proj = 2 * tokens * width * width
  if context:
    qkv = 2 * tokens * width * width + 2 * context * width * 2 * width
    attn = 2 * 2 * tokens * context * width
  else:
    qkv = 2 * tokens * width * 3 * width
    attn = 2 * 2 * tokens * tokens * width
  return qkv + attn + proj + mlp


def step_flops(model: MaskedAutoencoder, split: TokenSplit, reconstruct_thrown: bool) -> StepFlops:
  """fwd+bwd GFLOP per image of `train_step` for this model and token split."""
  spec, d, dd = model.spec, model.spec.width, model.decoder_width
  pred_dim = model.pred_dim or spec.patch ** 2 * 3
  enc_tokens = 1 + split.n_vis
  patch_embed = 2 * split.n_vis * spec.patch ** 2 * 3 * d
  encoder = spec.depth * _block(enc_tokens, d, model.mlp_ratio)

  decoder = 2 * enc_tokens * d * dd  # decoder_embed
  if model.decoder == "self_attention":
    kept = enc_tokens + split.n_dec
    decoder += model.decoder_depth * _block(kept, dd, model.mlp_ratio)
  else:
    kept = enc_tokens
    decoder += model.decoder_depth * _block(split.n_dec, dd, model.mlp_ratio, context=enc_tokens)
  decoder += 2 * split.n_dec * dd * pred_dim  # prediction head

  thrown = 0.0
  n = split.n_throw
  if reconstruct_thrown and n:
    thrown = 2 * n * dd * pred_dim  # the shared prediction head
    if model.aggregator == "last_block":
      thrown += _block(n, dd, model.mlp_ratio, context=kept)
    else:
      keys = model.window ** 2 + 1  # box + the global key
      thrown += 2 * n * keys * dd  # weighted sum of neighbour features
      if model.aggregator == "local_attention":
        kw = model.key_width
        canvas_tokens = split.num_patches * model.num_stages + model.num_stages  # + global key
        thrown += 2 * n * dd * kw  # query projection
        thrown += 2 * canvas_tokens * dd * kw  # key projection of the canvas, per stage
        thrown += 2 * n * keys * kw  # query . key
        thrown += 2 * 2 * n * dd * kw  # narrow residual MLP
  return StepFlops(encoder=(3 * encoder + 2 * patch_embed) / GIGA, decoder=3 * decoder / GIGA,
                   thrown=3 * thrown / GIGA)
