"""timm / official MAE weights <-> our params: golden timm features, round trips, MAE loss.

The golden fixtures (tests/fixtures/, written by make_timm_fixtures.py with real timm) are
always checked; the live test reruns the comparison against timm itself where it imports.
"""

import dataclasses
import functools
import json

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from scipy import special

from conftest import ROOT
from pr_mim_jax.interop import timm_weights
from pr_mim_jax.method import masking
from pr_mim_jax.models import mae
from pr_mim_jax.models import posemb
from pr_mim_jax.models import vit
from pr_mim_jax.training import pretrain
from pr_mim_jax.training import train_step

FIXTURES = ROOT / "tests" / "fixtures"
CONFIGS = json.loads((FIXTURES / "timm_fixtures.json").read_text())
MODELS = ("vit_ti", "vit_s")
RTOL = 1e-4


def encoder_of(arch):
  return vit.Encoder(vit.VitSpec(arch.width, arch.depth, arch.heads, arch.patch),
                     arch.image_size, arch.posemb, arch.mlp_ratio)


def our_features(state, heads, images_nchw):
  """[B, 1+L, D] features of our encoder loaded from a timm state dict."""
  arch = timm_weights.infer_arch(state, heads)
  params = timm_weights.from_state_dict(state, arch)
  images = np.asarray(images_nchw, np.float32).transpose(0, 2, 3, 1)  # NCHW -> NHWC
  return np.asarray(encoder_of(arch).apply({"params": params["encoder"]}, images))


def assert_close(got, want):
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < RTOL and np.allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max()), rel


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_weights_give_timms_features(name):
  state = safetensors.numpy.load_file(str(FIXTURES / f"{name}.safetensors"))
  golden = np.load(FIXTURES / "timm_golden.npz")
  got = our_features(state, CONFIGS[name]["kwargs"]["num_heads"], golden[f"{name}/input"])
  assert_close(got, golden[f"{name}/features"])


def tiny_mae(posemb_kind="sincos", scan=False):
  model = mae.MaskedAutoencoder(vit.VitSpec(32, 2, 4, 4), 16, decoder_width=16, decoder_depth=2,
                                decoder_heads=2, posemb=posemb_kind, scan_layers=scan)
  split = masking.token_split(16, 0.75)
  shapes = jax.eval_shape(functools.partial(pretrain.init_params, model, split), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)  # random values: faster than running init, no zero biases
  return model, split, jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def arch_of(model, params):
  params = vit.unscan_params(params)
  return timm_weights.Arch(
      width=32, depth=2, heads=4, patch=4, grid=4, posemb=model.posemb,
      mlp_hidden=params["encoder"]["block0"]["mlp"]["fc1"]["kernel"].shape[1],
      decoder_width=16, decoder_depth=2, decoder_heads=2, decoder_hidden=64, pred_dim=48)


@pytest.mark.parametrize("kind,scan", [("sincos", False), ("learned", False), ("learned", True)])
def test_export_then_import_is_bit_exact(kind, scan):
  model, _, params = tiny_mae(kind, scan)
  state = timm_weights.to_state_dict(params, arch_of(model, params), with_decoder=True)
  arch = timm_weights.infer_arch(state, heads=4, decoder_heads=2)
  assert arch == arch_of(model, params)
  back = timm_weights.from_state_dict(state, arch)
  want = vit.unscan_params(params)
  assert jax.tree.structure(back) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    assert a.dtype == np.float32 and np.array_equal(a, b)
  # Encoder only: the timm file has no decoder keys, and imports as an encoder alone.
  enc_only = timm_weights.to_state_dict(params, arch)
  assert not timm_weights.has_decoder_keys(enc_only)
  assert set(timm_weights.from_state_dict(enc_only, timm_weights.infer_arch(enc_only, 4))) == {"encoder"}


def random_mae_state(rng, d=32, depth=2, dd=16, ddepth=1, patch=4, grid=4):
  """A state dict with the official MAE names and shapes, random values."""
  arch = timm_weights.Arch(width=d, depth=depth, heads=4, patch=patch, grid=grid, mlp_hidden=4 * d,
                           posemb="sincos", decoder_width=dd, decoder_depth=ddepth, decoder_heads=2,
                           decoder_hidden=4 * dd, pred_dim=patch * patch * 3)
  state = {k: (0.05 * rng.standard_normal(s)).astype(np.float32)
           for k, s in timm_weights.expected_shapes(arch, True).items()}
  for k in state:
    if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm.weight"):
      state[k] += 1
  state["pos_embed"] = posemb.sincos_2d(d, grid)[None]
  state["decoder_pos_embed"] = posemb.sincos_2d(dd, grid)[None]
  return state


# --- an independent NumPy MAE (official layout: torch weights, NCHW, unshuffle by ids_restore)

def _ln(x, w, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * w + b


def _linear(s, name, x):
  return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def _block(s, p, x, heads):
  b, n, d = x.shape
  h = _ln(x, s[f"{p}.norm1.weight"], s[f"{p}.norm1.bias"])
  qkv = _linear(s, f"{p}.attn.qkv", h).reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
  logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  x = x + _linear(s, f"{p}.attn.proj", (probs @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, n, d))
  h = _linear(s, f"{p}.mlp.fc1", _ln(x, s[f"{p}.norm2.weight"], s[f"{p}.norm2.bias"]))
  return x + _linear(s, f"{p}.mlp.fc2", 0.5 * h * (1 + special.erf(h / np.sqrt(2))))


def numpy_mae_loss(s, imgs, ids_keep, ids_restore, mask, heads=4, dec_heads=2, patch=4):
  """MAE forward + norm_pix loss; imgs [B, 3, H, W] float64; mask [B, L] 1 = masked."""
  s = {k: v.astype(np.float64) for k, v in s.items()}
  b, _, hgt, _ = imgs.shape
  g = hgt // patch
  cols = imgs.reshape(b, 3, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
  x = cols @ s["patch_embed.proj.weight"].reshape(s["patch_embed.proj.weight"].shape[0], -1).T
  x = x + s["patch_embed.proj.bias"] + s["pos_embed"][:, 1:]
  x = np.take_along_axis(x, ids_keep[..., None], axis=1)
  cls = np.broadcast_to(s["cls_token"] + s["pos_embed"][:, :1], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1)
  for i in range(len({k.split(".")[1] for k in s if k.startswith("blocks.")})):
    x = _block(s, f"blocks.{i}", x, heads)
  x = _linear(s, "decoder_embed", _ln(x, s["norm.weight"], s["norm.bias"]))
  n_mask = ids_restore.shape[1] + 1 - x.shape[1]
  full = np.concatenate([x[:, 1:], np.broadcast_to(s["mask_token"], (b, n_mask, x.shape[-1]))], 1)
  full = np.take_along_axis(full, ids_restore[..., None], axis=1)
  x = np.concatenate([x[:, :1], full], 1) + s["decoder_pos_embed"]
  for i in range(len({k.split(".")[1] for k in s if k.startswith("decoder_blocks.")})):
    x = _block(s, f"decoder_blocks.{i}", x, dec_heads)
  pred = _linear(s, "decoder_pred", _ln(x, s["decoder_norm.weight"], s["decoder_norm.bias"]))[:, 1:]
  target = imgs.reshape(b, 3, g, patch, g, patch).transpose(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
  target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  loss = ((pred - target) ** 2).mean(-1)
  return (loss * mask).sum() / mask.sum()


@pytest.mark.slow
@pytest.mark.parametrize("ddepth", [1, 2])
def test_official_mae_state_dict_gives_the_reference_loss(ddepth):
  """Two decoder blocks too: decoder_blocks.N must load into decoder_block{N}, in order."""
  rng = np.random.default_rng(0)
  state = random_mae_state(rng, ddepth=ddepth)
  arch = timm_weights.infer_arch(state, heads=4, decoder_heads=2)
  assert arch.posemb == "sincos" and arch.decoder_depth == ddepth
  params = timm_weights.from_state_dict(state, arch)
  model = mae.MaskedAutoencoder(vit.VitSpec(32, 2, 4, 4), 16, decoder_width=16,
                                decoder_depth=ddepth, decoder_heads=2)
  split = masking.token_split(16, 0.75)
  fresh = jax.eval_shape(functools.partial(pretrain.init_params, model, split), jax.random.PRNGKey(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(params)
  images = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  order = np.stack([rng.permutation(16) for _ in range(2)]).astype(np.int32)  # [B, L]
  masks = masking.Masks(order[:, :4], order[:, 4:], order[:, 16:], np.argsort(order, 1).astype(np.int32))
  task = train_step.Task(split=split, grid=4, patch=4, target="norm_pixel")
  ours, _ = train_step.loss_fn(params, model, images, masks, task)
  mask = np.ones((2, 16))
  np.put_along_axis(mask, order[:, :4], 0.0, axis=1)
  want = numpy_mae_loss(state, images.transpose(0, 3, 1, 2).astype(np.float64), order[:, :4],
                        np.argsort(order, 1), mask)
  assert float(ours) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_sincos_tables_rounded_to_half_precision_still_count(dtype):
  table = posemb.sincos_2d(32, 4)
  assert timm_weights.is_sincos(table.astype(dtype), 4)
  learned = table + 0.02 * np.random.default_rng(0).standard_normal(table.shape)
  assert not timm_weights.is_sincos(learned.astype(dtype), 4)
  assert not timm_weights.is_sincos((table + 2e-4).astype(np.float32), 4)  # float32: 1e-5


def test_problems_are_listed_together():
  state = random_mae_state(np.random.default_rng(1))
  arch = timm_weights.infer_arch(state, heads=4, decoder_heads=2)
  del state["blocks.1.mlp.fc2.bias"]
  state["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
  state["norm.bias"] = np.zeros(31, np.float32)
  state["head.weight"] = np.zeros((10, 32), np.float32)  # a classifier head is ignored
  with pytest.raises(timm_weights.WeightsError) as e:
    timm_weights.from_state_dict(state, arch)
  msg = str(e.value)
  assert "1 missing: blocks.1.mlp.fc2.bias" in msg and "1 unknown: blocks.0.ls1.gamma" in msg
  assert "norm.bias (31,) (expected (32,))" in msg and "head.weight" not in msg


def test_refuses_non_vits_and_odd_grids():
  with pytest.raises(timm_weights.WeightsError, match="not a ViT.*conv1.weight"):
    timm_weights.infer_arch({"conv1.weight": np.zeros((8, 3, 3, 3))})
  state = random_mae_state(np.random.default_rng(2))
  state["pos_embed"] = np.zeros((1, 1 + 12, 32), np.float32)
  with pytest.raises(timm_weights.WeightsError, match="not a square grid"):
    timm_weights.infer_arch(state, heads=4, decoder_heads=2)
  with pytest.raises(timm_weights.WeightsError, match="pass --heads"):
    timm_weights.infer_arch(random_mae_state(np.random.default_rng(3)))


def test_register_tokens_and_no_embed_class_are_named_not_called_odd_grids():
  """timm's DeiT III / ViT-reg layouts: pos_embed [1, L, D] without a class row (16 rows
  for a 4x4 grid), or a reg_token; each refusal says which, not 'not a square grid'."""
  state = random_mae_state(np.random.default_rng(4))
  state["pos_embed"] = state["pos_embed"][:, 1:]  # [1, 16, 32]: no class-token row
  with pytest.raises(timm_weights.WeightsError, match="16 rows.*4x4 grid.*no_embed_class"):
    timm_weights.infer_arch(state, heads=4, decoder_heads=2)
  state = random_mae_state(np.random.default_rng(5))
  state["reg_token"] = np.zeros((1, 4, 32), np.float32)
  state["pos_embed"] = np.zeros((1, 1 + 4 + 16, 32), np.float32)  # class + 4 registers + 4x4
  with pytest.raises(timm_weights.WeightsError, match=r"register tokens \(reg_token \(1, 4, 32\)\)"):
    timm_weights.infer_arch(state, heads=4, decoder_heads=2)


def test_a_global_pool_model_is_named():
  """timm's global_pool='avg' (MAE's fine-tuned files) has fc_norm.* and no norm.*: the refusal
  names it rather than listing unknown and missing keys."""
  state = random_mae_state(np.random.default_rng(6))
  state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
  with pytest.raises(timm_weights.WeightsError, match="fc_norm and no final norm: a global-pool"):
    timm_weights.infer_arch(state, heads=4, decoder_heads=2)


def built_shape(spec):
  """The shape timm.create_model(name, **kwargs) builds: vit_* entrypoints call
  VisionTransformer(**dict(their shape, **kwargs)), so the kwargs win."""
  own = timm_weights.timm_architectures()[spec["name"]]
  return {k: v for k, v in dict(own, **spec["kwargs"]).items() if k in own}


def test_timm_names_are_exact_or_say_what_the_kwargs_override():
  vit_b16 = timm_weights.Arch(width=768, depth=12, heads=12, patch=16, grid=14, mlp_hidden=3072,
                              posemb="learned")
  spec = timm_weights.timm_model(vit_b16)
  assert spec["name"] == "vit_base_patch16_224" and "note" not in spec
  assert built_shape(spec) == timm_weights.shape_kwargs(vit_b16)
  # The demo's encoder (128 wide, 6 blocks, 4 heads, patch 8, 32 px) is no standard ViT.
  demo = timm_weights.Arch(width=128, depth=6, heads=4, patch=8, grid=4, mlp_hidden=512,
                           posemb="sincos")
  spec = timm_weights.timm_model(demo)
  assert spec["name"] == "vit_base_patch8_224", spec
  for part in ("not a standard timm model", "override the architecture of vit_base_patch8_224",
               "embed_dim=128 (not 768)", "depth=6 (not 12)", "num_heads=4 (not 12)",
               "img_size=32 (not 224)"):
    assert part in spec["note"], spec["note"]
  assert "patch_size" not in spec["note"] and "mlp_ratio" not in spec["note"]
  assert built_shape(spec) == timm_weights.shape_kwargs(demo)
  # No plain timm ViT has patch 4: the fallback base, with the patch size in the note.
  odd = dataclasses.replace(demo, patch=4, grid=8)
  spec = timm_weights.timm_model(odd)
  assert spec["name"] == timm_weights.TIMM_FALLBACK and "patch_size=4 (not 16)" in spec["note"]
  assert built_shape(spec) == timm_weights.shape_kwargs(odd)


@pytest.mark.parametrize("name", MODELS)
def test_timm_kwargs_are_the_ones_real_timm_built_the_fixtures_with(name):
  state = safetensors.numpy.load_file(str(FIXTURES / f"{name}.safetensors"))
  spec = timm_weights.timm_model(timm_weights.infer_arch(state, CONFIGS[name]["kwargs"]["num_heads"]))
  assert spec["kwargs"] == CONFIGS[name]["kwargs"]
  # Depth 2 at patch 8: a patch-8 base (S/8 for the S width, else B/8), overridden and said so.
  assert spec["name"] == {"vit_s": "vit_small_patch8_224"}.get(name, "vit_base_patch8_224")
  assert "kwargs override" in spec["note"] and "depth=2 (not 12)" in spec["note"]
  assert set(timm_weights.timm_architectures()[spec["name"]]) <= set(spec["kwargs"])  # all set


def test_long_lists_are_truncated():
  assert timm_weights.listing([str(i) for i in range(25)]) == (
      "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... and 15 more")


# --- live timm ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_live_timm_round_trip(name):
  """A fresh random timm model: our conversion matches forward_features, and our export
  loads into timm (strict) and gives our features."""
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  cfg = CONFIGS[name]
  torch.manual_seed(7)
  model = timm.create_model(cfg["timm_name"], pretrained=False, **cfg["kwargs"]).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  size = cfg["kwargs"]["img_size"]
  x = torch.randn(2, 3, size, size)
  with torch.no_grad():
    want = model.forward_features(x).numpy()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  heads = cfg["kwargs"]["num_heads"]
  assert_close(our_features(state, heads, x.numpy()), want)

  arch = timm_weights.infer_arch(state, heads)
  params = timm_weights.from_state_dict(state, arch)
  params["encoder"] = jax.tree.map(lambda a: a * 1.5, params["encoder"])  # not timm's values
  exported = timm_weights.to_state_dict(params, arch)
  spec = timm_weights.timm_model(arch)
  fresh = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"]).eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  with torch.no_grad():
    theirs = fresh.forward_features(x).numpy()
  ours = np.asarray(encoder_of(arch).apply({"params": params["encoder"]},
                                           x.numpy().transpose(0, 2, 3, 1)))
  assert_close(ours, theirs)


def test_official_mae_decoder_has_16_heads_unless_told_otherwise():
  """MAE's models_mae.py: decoder_embed_dim=512, decoder_num_heads=16 for every size."""
  state = random_mae_state(np.random.default_rng(7), dd=512, ddepth=1)
  arch = timm_weights.infer_arch(state, heads=4)
  assert (arch.decoder_width, arch.decoder_heads, arch.decoder_hidden) == (512, 16, 2048)
  qkv = timm_weights.from_state_dict(state, arch)["decoder_block0"]["attn"]["qkv"]["kernel"]
  assert qkv.shape == (512, 3, 16, 32)
  assert timm_weights.infer_arch(state, heads=4, decoder_heads=8).decoder_heads == 8  # the flag wins


def test_a_learned_decoder_position_table_is_refused():
  """Our decoder adds the fixed sin-cos table; a trained decoder_pos_embed cannot be loaded."""
  state = random_mae_state(np.random.default_rng(8))
  arch = timm_weights.infer_arch(state, heads=4, decoder_heads=2)
  state["decoder_pos_embed"] = state["decoder_pos_embed"] + 0.01
  with pytest.raises(timm_weights.WeightsError, match="decoder_pos_embed is not the fixed 2-D sin-cos"):
    timm_weights.from_state_dict(state, arch)


def test_heads_that_do_not_divide_the_width_and_gaps_in_block_numbers_are_refused():
  state = random_mae_state(np.random.default_rng(9))
  with pytest.raises(timm_weights.WeightsError, match="width 32 is not divisible by 5 heads"):
    timm_weights.infer_arch(state, heads=5, decoder_heads=2)
  with pytest.raises(timm_weights.WeightsError, match="decoder width 16 is not divisible by 3 heads"):
    timm_weights.infer_arch(state, heads=4, decoder_heads=3)
  for k in [k for k in state if k.startswith("blocks.1.")]:
    state["blocks.2." + k[len("blocks.1."):]] = state.pop(k)
  with pytest.raises(timm_weights.WeightsError, match=r"blocks\.N are not numbered 0\.\.1: \[0, 2\]"):
    timm_weights.infer_arch(state, heads=4, decoder_heads=2)


def test_lists_at_the_limit_are_not_truncated():
  assert timm_weights.listing([str(i) for i in range(10)]) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
  assert timm_weights.listing("abc", limit=2) == "a, b, ... and 1 more"


@pytest.mark.parametrize("name,shape", [
    ("vit_tiny_patch16_224", (192, 12, 3, 16, 224)),
    ("vit_small_patch16_224", (384, 12, 6, 16, 224)),
    ("vit_base_patch16_384", (768, 12, 12, 16, 384)),
    ("vit_large_patch16_224", (1024, 24, 16, 16, 224)),
    ("vit_huge_patch14_224", (1280, 32, 16, 14, 224))])
def test_standard_vits_get_timms_own_name_and_no_note(name, shape):
  """timm's plain ViTs (width, depth, heads as in its vision_transformer.py): an export of one
  is named by its entrypoint, with no note claiming the kwargs override it."""
  width, depth, heads, patch, img = shape
  arch = timm_weights.Arch(width=width, depth=depth, heads=heads, patch=patch, grid=img // patch,
                           mlp_hidden=4 * width, posemb="learned")
  spec = timm_weights.timm_model(arch)
  assert spec["name"] == name and "note" not in spec, spec


def test_a_width_not_divisible_by_4_reads_as_a_learned_table():
  """No 2-D sin-cos table exists for such a width, so its pos_embed is a learned one (not an
  error from building the sin-cos table to compare with)."""
  arch = timm_weights.Arch(width=6, depth=1, heads=2, patch=2, grid=2, mlp_hidden=24,
                           posemb="learned")
  rng = np.random.default_rng(10)
  state = {k: rng.standard_normal(s).astype(np.float32)
           for k, s in timm_weights.expected_shapes(arch, False).items()}
  assert timm_weights.infer_arch(state, heads=2) == arch
  params = timm_weights.from_state_dict(state, arch)
  np.testing.assert_array_equal(params["encoder"]["pos_embedding"], state["pos_embed"][0])
