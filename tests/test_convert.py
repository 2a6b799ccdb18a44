"""python -m pr_mim_jax.interop.convert: MAE .pth -> workdir (probe, k-NN, resume) -> safetensors."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import ROOT, apply_overrides, load_config
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.configs import knn as knn_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.evaluation import classify
from pr_mim_jax.evaluation import init_run
from pr_mim_jax.evaluation import knn_eval
from pr_mim_jax.interop import convert
from pr_mim_jax.interop import pth_reader
from pr_mim_jax.interop import safe_replace
from pr_mim_jax.interop import timm_weights
from pr_mim_jax.interop import weight_files
from pr_mim_jax.models import posemb
from pr_mim_jax.parallel import sharding
from pr_mim_jax.training import checkpoint_errors
from pr_mim_jax.training import checkpointing
from pr_mim_jax.training import workdir_records

FIXTURES = ROOT / "tests" / "fixtures"
MAE_PTH = FIXTURES / "mae_tiny.pth"  # width 32, depth 1, 2 heads, patch 4, 16 px; decoder 16 x 1, 2 heads
DATA = {"data.shapes.image_size": 16, "data.shapes.train_size": 64, "data.shapes.test_size": 32,
        "data.backend": "numpy"}
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def pretrain_config():
  return apply_overrides(load_config("method=mae,dataset=shapes"),
                         {**DATA, "batch_size": 16, "knn.enabled": False})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("convert") / "mae_tiny"
  message = convert.convert(str(MAE_PTH), str(path), heads=2, decoder_heads=2,
                            config=pretrain_config())
  assert "decoder from the file" in message and "posemb sincos" in message, message
  return path


def mae_state():
  return pth_reader.state_dict(pth_reader.read(str(MAE_PTH)))


@pytest.mark.slow
def test_workdir_exports_back_to_the_same_mae_file(workdir, tmp_path):
  out = tmp_path / "mae.safetensors"
  convert.convert(str(workdir), str(out), "mae")
  back, want = safetensors.numpy.load_file(str(out)), mae_state()
  assert set(back) == set(want)
  for k in want:
    assert np.array_equal(back[k], want[k]), k
  meta = json.loads((tmp_path / "mae.json").read_text())
  assert meta["timm"]["kwargs"]["num_heads"] == 2 and meta["decoder"]["heads"] == 2
  assert meta["posemb"] == "sincos"


def test_export_of_a_non_standard_shape_says_the_kwargs_override_the_name(workdir, tmp_path):
  # width 32, depth 1, patch 4, 16 px: no timm ViT has this shape, and the JSON says so.
  out = tmp_path / "vit.safetensors"
  message = convert.convert(str(workdir), str(out))
  spec = json.loads((tmp_path / "vit.json").read_text())["timm"]
  assert spec["name"] == "vit_base_patch16_224"
  assert "kwargs override the architecture of vit_base_patch16_224" in spec["note"]
  for part in ("embed_dim=32 (not 768)", "depth=1 (not 12)", "num_heads=2 (not 12)",
               "patch_size=4 (not 16)", "img_size=16 (not 224)"):
    assert part in spec["note"]
  assert spec["note"] in message
  with safetensors.safe_open(str(out), "np") as f:
    assert json.loads(f.metadata()[weight_files.METADATA_KEY])["timm"] == spec


@pytest.mark.slow
def test_knn_and_linear_probe_start_from_a_converted_workdir(workdir, tmp_path):
  config = apply_overrides(knn_config.get_config(f"init={workdir},dataset=shapes"), {
      **DATA, "knn.train_examples": 64, "knn.test_examples": 32, "knn.batch_size": 32, "knn.k": 5})
  top1 = knn_eval.knn_eval(config, str(tmp_path / "knn"))["knn_top1"]
  assert top1 * 32 == pytest.approx(round(top1 * 32), abs=1e-6)  # a count of the 32 test images
  with open(tmp_path / "knn" / "metrics.jsonl") as f:
    assert json.loads(f.readline())["knn_top1"] == pytest.approx(top1)

  probe = apply_overrides(classify_config.get_config("linear_probe", f"init={workdir},dataset=shapes"),
                          {**DATA, "batch_size": 16, "eval.batch_size": 16})
  model_cfg = classify.check_config(probe).config.model
  assert (model_cfg.width, model_cfg.depth, model_cfg.heads, model_cfg.image_size) == (32, 1, 2, 16)
  mesh = sharding.make_mesh()
  with jax.set_mesh(mesh):
    encoder = init_run.read_pretrained_encoder(probe, mesh, False)
  np.testing.assert_array_equal(np.asarray(encoder["block0"]["mlp"]["fc1"]["kernel"]),
                                mae_state()["blocks.0.mlp.fc1.weight"].T)



def test_an_encoder_only_file_becomes_a_workdir_with_a_fresh_decoder(workdir, tmp_path):
  """timm weights (no decoder) in: the workdir's encoder is the file's and its decoder is new,
  as the message says; MAE's decoder into a CrossMAE config is refused, writing nothing."""
  vit = tmp_path / "vit.safetensors"
  convert.convert(str(workdir), str(vit))  # the encoder only, under timm's names
  message = convert.convert(str(vit), str(tmp_path / "wd"), config=pretrain_config())
  assert "decoder freshly initialised" in message, message
  ours, theirs = (convert.read_workdir_weights(w)[0] for w in (tmp_path / "wd", workdir))
  jax.tree.map(np.testing.assert_array_equal, ours["encoder"], theirs["encoder"])
  # The decoder takes the config's shape (2 blocks here, the file's source had 1) and new values.
  assert {"decoder_block0", "decoder_block1"} <= ours.keys() and "decoder_block1" not in theirs
  for group in ours.keys() & theirs.keys() - {"encoder"}:
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours[group]),
                                                        jax.tree.leaves(theirs[group]))), group
  crossmae = pretrain_config()
  crossmae.model.decoder = "cross_attention"
  with pytest.raises(UserError, match="config.model.decoder: 'cross_attention', but the weights "
                     "hold MAE's self-attention decoder; use 'self_attention'"):
    convert.convert(str(MAE_PTH), str(tmp_path / "x"), heads=2, decoder_heads=2, config=crossmae)
  assert not (tmp_path / "x").exists()

@pytest.mark.slow
def test_pretraining_resumes_from_a_converted_workdir(workdir, tmp_path):
  run = tmp_path / "continued"
  shutil.copytree(workdir, run)
  config = pretrain_config()
  convert.fit_config(config, weight_files.read_file_weights(MAE_PTH, 2, 2)[1])
  args = [sys.executable, "-m", "pr_mim_jax.main", "--config=pr_mim_jax/configs/pretrain.py:method=mae,dataset=shapes",
          f"--workdir={run}", "--config.batch_size=16", "--config.knn.enabled=False",
          "--config.train.total_steps=2", *[f"--config.{k}={v}" for k, v in DATA.items()],
          *convert.model_overrides(config)]
  result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from" in result.stderr and "at step 0" in result.stderr
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(run)))
  try:
    assert ckpt.all_steps() == [0, 2]
  finally:
    ckpt.close()
  # Step 0 can be asked for by number; -1 (the default) is the latest.
  step0, _, source0, _ = convert.read_workdir_weights(run, 0)
  latest, _, source, _ = convert.read_workdir_weights(run)
  assert source0.endswith("step 0") and source.endswith("step 2")
  jax.tree.map(np.testing.assert_array_equal, step0, convert.read_workdir_weights(workdir)[0])
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(step0), jax.tree.leaves(latest)))


def test_cli_lists_every_problem_and_writes_nothing(tmp_path):
  state = mae_state()
  del state["blocks.0.norm2.bias"]
  state["blocks.0.attn.q_norm.weight"] = np.ones(16, np.float32)
  state["norm.weight"] = np.ones(30, np.float32)
  bad = tmp_path / "bad.safetensors"
  safetensors.numpy.save_file(state, str(bad))
  target = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "pr_mim_jax.interop.convert", f"--from={bad}", f"--to={target}",
       "--heads=2", "--decoder_heads=2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: the weights do not fit"), result.stderr
  for part in ("1 missing: blocks.0.norm2.bias", "1 unknown: blocks.0.attn.q_norm.weight",
               "norm.weight (30,) (expected (32,))"):
    assert part in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_timm_file_round_trips_with_its_heads_in_the_metadata(tmp_path):
  out = tmp_path / "vit_s.safetensors"
  convert.convert(str(FIXTURES / "vit_s.safetensors"), str(out), heads=12)
  # 12 heads at width 384 is not standard: re-reading needs no --heads, the metadata has it.
  params, arch, _ = weight_files.read_file_weights(out)
  assert (arch.heads, arch.posemb, arch.mlp_ratio) == (12, "learned", 0.5)
  want = safetensors.numpy.load_file(str(FIXTURES / "vit_s.safetensors"))
  back = safetensors.numpy.load_file(str(out))
  assert set(back) == set(want) and all(np.array_equal(back[k], want[k]) for k in want)
  with pytest.raises(UserError, match="exists; pass --overwrite"):
    convert.convert(str(FIXTURES / "vit_s.safetensors"), str(out), heads=12)
  convert.convert(str(FIXTURES / "vit_ti.safetensors"), str(out), overwrite=True)
  assert weight_files.read_file_weights(out)[1].width == 192
  # Pre-training configs use MLP ratio 4: a workdir target says so, and nothing is written.
  with pytest.raises(UserError, match="MLP ratio 0.5"):
    convert.convert(str(FIXTURES / "vit_s.safetensors"), str(tmp_path / "wd"), heads=12,
                    config=pretrain_config())
  assert not (tmp_path / "wd").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["vit_s.json", "vit_s.safetensors"]


def _mode(path):
  return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("umask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["022", "077", "002"])
def test_exported_files_get_the_mode_the_umask_gives_new_files(tmp_path, umask, want):
  out = tmp_path / "vit_ti.safetensors"
  old = os.umask(umask)
  try:
    convert.convert(str(FIXTURES / "vit_ti.safetensors"), str(out))
    modes = (_mode(out), _mode(tmp_path / "vit_ti.json"))
    convert.convert(str(FIXTURES / "vit_ti.safetensors"), str(out), overwrite=True)
    replaced = (_mode(out), _mode(tmp_path / "vit_ti.json"))
  finally:
    os.umask(old)
  assert modes == replaced == (want, want), [oct(m) for m in modes + replaced]


def _write_safetensors_by_hand(path, state, dtype="BF16"):
  """The safetensors layout written independently: u64 header length, JSON header, bytes."""
  header, chunks, offset = {}, [], 0
  for name, array in state.items():
    raw = np.ascontiguousarray(array).tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def test_bfloat16_safetensors_are_read(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  want = {k: v.astype(ml_dtypes.bfloat16)
          for k, v in safetensors.numpy.load_file(str(FIXTURES / "vit_ti.safetensors")).items()}
  src = tmp_path / "bf16.safetensors"
  _write_safetensors_by_hand(src, want)
  out = tmp_path / "f32.safetensors"
  convert.convert(str(src), str(out))
  back = safetensors.numpy.load_file(str(out))
  assert set(back) == set(want)
  for k in want:
    assert back[k].dtype == np.float32 and np.array_equal(back[k], want[k].astype(np.float32)), k
  src.write_bytes(b"\x05" + bytes(20))  # not safetensors: a clear error, nothing written
  with pytest.raises(UserError, match="neither a torch.save file nor safetensors"):
    convert.convert(str(src), str(tmp_path / "x.safetensors"))
  assert not (tmp_path / "x.safetensors").exists()


def test_safetensors_of_a_compiled_ddp_model_are_read(tmp_path):
  """A torch.compile'd model inside DDP saves 'module._orig_mod.NAME': read as NAME."""
  want = safetensors.numpy.load_file(str(VIT_TI))
  src = tmp_path / "compiled.safetensors"
  safetensors.numpy.save_file({f"module._orig_mod.{k}": v for k, v in want.items()}, str(src))
  params, arch = weight_files.read_file_weights(src)[:2]
  plain = weight_files.read_file_weights(VIT_TI)[0]
  assert arch.width == 192
  assert jax.tree.structure(params) == jax.tree.structure(plain)
  jax.tree.map(np.testing.assert_array_equal, params, plain)


def test_importing_defines_no_flags_so_it_coexists_with_main():
  # A library user (or a test) imports convert beside pr_mim_jax.main: no DuplicateFlagError,
  # and no TensorFlow pulled in.
  code = ("import sys, pr_mim_jax.main, pr_mim_jax.interop.convert, pr_mim_jax.tools.benchmark; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


# --- refusals: a clear UserError, and nothing of the user's replaced ------------------------

VIT_TI = FIXTURES / "vit_ti.safetensors"


def _fake_workdir(path, config):
  """A directory with only a config.json: enough for every check made before the restore."""
  path.mkdir()
  (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
  return path


def test_the_json_beside_a_safetensors_target_is_kept_without_overwrite(tmp_path):
  (tmp_path / "config.json").write_text("mine")
  with pytest.raises(UserError, match=r"config.json \(written next to config.safetensors\) "
                     "exists; pass --overwrite"):
    convert.convert(str(VIT_TI), str(tmp_path / "config.safetensors"))
  assert (tmp_path / "config.json").read_text() == "mine"
  (tmp_path / "model.json").mkdir()
  (tmp_path / "model.json" / "keep.txt").write_text("mine")
  with pytest.raises(UserError, match="model.json .* is a directory, which --overwrite does not"):
    convert.convert(str(VIT_TI), str(tmp_path / "model.safetensors"), overwrite=True)
  assert (tmp_path / "model.json" / "keep.txt").read_text() == "mine"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.json"]


def test_overwrite_replaces_a_workdir_but_no_other_directory_or_file(tmp_path):
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="notes is a directory but not a pr_mim_jax workdir"):
    convert.convert(str(MAE_PTH), str(notes), heads=2, decoder_heads=2, overwrite=True)
  with pytest.raises(UserError, match="notes is a directory, which --overwrite does not"):
    convert.convert(str(VIT_TI), str(notes), "timm", overwrite=True)
  assert (notes / "notes.txt").read_text() == "mine"
  (tmp_path / "wd").write_text("a file")
  with pytest.raises(UserError, match="wd is a file, which --overwrite does not replace with a "
                     "workdir"):
    convert.convert(str(MAE_PTH), str(tmp_path / "wd"), "workdir", heads=2, decoder_heads=2,
                    overwrite=True)
  assert (tmp_path / "wd").read_text() == "a file"
  (tmp_path / "link").symlink_to(_fake_workdir(tmp_path / "real", {"model": {}}))
  with pytest.raises(UserError, match="link is a symbolic link; give the path it points to"):
    convert.convert(str(MAE_PTH), str(tmp_path / "link"), heads=2, decoder_heads=2,
                    overwrite=True)
  assert (tmp_path / "link" / "config.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes", "real", "wd"]


def test_crossmae_workdir_is_not_exported_as_an_mae_decoder(tmp_path):
  src = _fake_workdir(tmp_path / "cross", {"mode": "pretrain",
                                           "model": {"decoder": "cross_attention"}})
  for kwargs in (dict(fmt="mae"), dict(with_decoder=True)):
    with pytest.raises(UserError, match="'cross_attention'.*Use --format=timm"):
      convert.convert(str(src), str(tmp_path / "x.safetensors"), **kwargs)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cross"]


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_mae_files_keep_their_sincos_tables(tmp_path, dtype):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  np_dtype = {"F16": np.float16, "BF16": ml_dtypes.bfloat16}[dtype]
  state = mae_state()
  src = tmp_path / "half.safetensors"
  _write_safetensors_by_hand(src, {k: v.astype(np_dtype) for k, v in state.items()}, dtype)
  _, arch, _ = weight_files.read_file_weights(src, 2, 2)
  assert arch.posemb == "sincos" and arch.has_decoder
  convert.convert(str(src), str(tmp_path / "mae.safetensors"), "mae", heads=2, decoder_heads=2)
  back = safetensors.numpy.load_file(str(tmp_path / "mae.safetensors"))
  assert np.array_equal(back["decoder_pos_embed"], state["decoder_pos_embed"])
  # A decoder that cannot be ours does not stop a timm (encoder only) export.
  state["decoder_pos_embed"] = state["decoder_pos_embed"] + 0.5
  _write_safetensors_by_hand(src, {k: v.astype(np_dtype) for k, v in state.items()}, dtype)
  convert.convert(str(src), str(tmp_path / "vit.safetensors"), heads=2)
  assert "ignored: the MAE decoder" in json.loads((tmp_path / "vit.json").read_text())["source"]
  assert not any(k.startswith("decoder") for k in safetensors.numpy.load_file(
      str(tmp_path / "vit.safetensors")))


def _metadata_file(value):
  safetensors.numpy.save_file(safetensors.numpy.load_file(str(VIT_TI)), "src.safetensors",
                              metadata={weight_files.METADATA_KEY: value})
  return "src.safetensors"


def _damaged_file(cut=None, raw=None):
  """VIT_TI's bytes cut to `cut` (a slice), or `raw` bytes, as src.safetensors."""
  pathlib.Path("src.safetensors").write_bytes(raw if raw is not None else VIT_TI.read_bytes()[cut])
  return "src.safetensors"


CORRUPT = "starts like safetensors but cannot be read; it looks truncated or corrupt"


@pytest.mark.parametrize("case", ["proc_file", "proc_workdir", "dot", "bad_json", "no_model",
                                  "meta_not_json", "meta_list", "knn_config", "cut_in_header",
                                  "cut_in_data", "zero_header_length"])
def test_bad_paths_and_inputs_are_one_line_errors(tmp_path, monkeypatch, case):
  monkeypatch.chdir(tmp_path)
  wd = lambda config: str(_fake_workdir(tmp_path / "src", config))  # pylint: disable=unnecessary-lambda-assignment
  src, to, kwargs, match = {
      "proc_file": (lambda: str(VIT_TI), "/proc/x.safetensors", {}, "cannot write in /proc"),
      "proc_workdir": (lambda: str(MAE_PTH), "/proc/xwd", dict(heads=2, decoder_heads=2),
                       "cannot write in /proc"),
      "dot": (lambda: str(VIT_TI), ".", dict(fmt="timm", overwrite=True),
              "names no file or directory"),
      "bad_json": (lambda: wd("{"), "x.safetensors", {}, "config.json is not readable JSON"),
      "no_model": (lambda: wd({"mode": "pretrain"}), "x.safetensors", {}, "has no `model`"),
      "meta_not_json": (lambda: _metadata_file("{"), "x.safetensors", {},
                        "'pr_mim_jax' is not a JSON object"),
      "meta_list": (lambda: _metadata_file("[1]"), "x.safetensors", {},
                    "'pr_mim_jax' is not a JSON object"),
      "knn_config": (lambda: str(MAE_PTH), "wd", dict(config=knn_config.get_config("init=x")),
                     "--config: a knn config; a workdir target needs a pre-training config"),
      # A download cut short, in the JSON header or in the tensors' bytes after it.
      "cut_in_header": (lambda: _damaged_file(slice(200)), "x.safetensors", {}, CORRUPT),
      "cut_in_data": (lambda: _damaged_file(slice(-100)), "x.safetensors", {},
                      CORRUPT + r" \(ValueError: tensor .* offsets"),
      "zero_header_length": (lambda: _damaged_file(raw=bytes(8) + b"{}"), "x.safetensors", {},
                             CORRUPT + r" \(ValueError: header length 0 is not plausible"),
  }[case]
  src = src()
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(UserError, match=match):
    convert.convert(src, to, **kwargs)
  assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_sources_are_told_apart_by_content_not_suffix(tmp_path, suffix):
  src = tmp_path / f"vit_ti{suffix}"
  shutil.copy(VIT_TI, src)
  assert weight_files.read_file_weights(src)[1].width == 192
  src.write_bytes(MAE_PTH.read_bytes()[:40000])
  with pytest.raises(UserError, match="looks truncated or corrupt"):
    weight_files.read_file_weights(src)


@pytest.mark.parametrize("case", ["step", "heads", "with_decoder", "config", "decoder_heads"])
def test_flags_that_do_not_apply_are_errors(tmp_path, case):
  src = _fake_workdir(tmp_path / "src", {"model": {}})
  args, match = {
      "step": ((str(VIT_TI), str(tmp_path / "x.safetensors")), dict(step=3)),
      "heads": ((str(src), str(tmp_path / "x.safetensors")), dict(heads=3)),
      "with_decoder": ((str(MAE_PTH), str(tmp_path / "wd")), dict(with_decoder=True)),
      "config": ((str(VIT_TI), str(tmp_path / "x.safetensors")), dict(config=pretrain_config())),
      "decoder_heads": ((str(MAE_PTH), str(tmp_path / "x.safetensors")),
                        dict(heads=2, decoder_heads=2)),  # a timm target: no decoder to read
  }[case], f"--{case}"
  with pytest.raises(UserError, match=match):
    convert.convert(*args[0], **args[1])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("flag", ["heads", "decoder_heads"])
def test_negative_heads_are_a_one_line_error(tmp_path, flag):
  with pytest.raises(UserError, match=f"--{flag}=-2: a number of heads must be positive"):
    convert.convert(str(MAE_PTH), str(tmp_path / "x.safetensors"), "mae",
                    **dict(dict(heads=2, decoder_heads=2), **{flag: -2}))
  assert not list(tmp_path.iterdir())


# --- architecture fields, metadata and file plumbing, without a model run -------------------

# MAE's ViT-S-like encoder at 224 px with the official 512 x 8, 16-head decoder: learned
# position table, and every field different from the default pre-training config's.
MAE_S16 = timm_weights.Arch(width=384, depth=12, heads=6, patch=16, grid=14, mlp_hidden=1536,
                            posemb="learned", decoder_width=512, decoder_depth=8, decoder_heads=16,
                            decoder_hidden=2048, pred_dim=768)


def _params_of(arch):
  """Params with the shapes arch_from_config reads (zeros: only the shapes matter)."""
  return {"encoder": {"block0": {"mlp": {"fc1": {"kernel": np.zeros((arch.width, arch.mlp_hidden))}}}},
          "decoder_block0": {"mlp": {"fc1": {"kernel": np.zeros((arch.decoder_width,
                                                                 arch.decoder_hidden))}}},
          "decoder_pred": {"kernel": np.zeros((arch.decoder_width, arch.pred_dim))}}


@pytest.mark.parametrize("arch,model", [
    (MAE_S16, ("S/16", 0, 0, 0, 224, "learned", 512, 8, 16)),
    # Not a standard depth / heads: the variant of that width, the shape spelled out; a 4x8
    # grid of 8 px patches is 32 px (grid and patch differ, so a swap shows).
    (dataclasses.replace(MAE_S16, depth=4, heads=4, patch=8, grid=4),
     ("S/8", 384, 4, 4, 32, "learned", 512, 8, 16)),
    (dataclasses.replace(MAE_S16, width=96, heads=3, mlp_hidden=384, posemb="sincos", patch=4, grid=8,
                         decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_hidden=256),
     ("B/4", 96, 12, 3, 32, "sincos", 64, 2, 4)),  # no variant is 96 wide: B's name
], ids=["exact", "by_width", "no_width"])
def test_fit_config_round_trips_the_architecture(arch, model):
  config = pretrain_config()
  convert.fit_config(config, arch)
  fields = ("variant", "width", "depth", "heads", "image_size", "posemb", "decoder_width",
            "decoder_depth", "decoder_heads")
  assert tuple(config.model[f] for f in fields) == model
  # Read back as a workdir source would: the same Arch.
  assert convert.arch_from_config(config.model, _params_of(arch)) == arch
  # The printed overrides give a default config the same model fields.
  other = pretrain_config()
  for flag in convert.model_overrides(config):
    name, _, value = flag[len("--config.model."):].partition("=")
    other.model[name] = type(other.model[name])(value)
  assert tuple(other.model[f] for f in fields) == model


def test_fit_config_refuses_a_decoder_mlp_ratio_other_than_4():
  with pytest.raises(UserError, match=r"MLP ratio 4 \(decoder: 2\)"):
    convert.fit_config(pretrain_config(), dataclasses.replace(MAE_S16, decoder_hidden=1024))


def _random_mae_file(path, arch):
  rng = np.random.default_rng(0)
  state = {k: (0.05 * rng.standard_normal(s)).astype(np.float32)
           for k, s in timm_weights.expected_shapes(arch, True).items()}
  state["pos_embed"] = posemb.sincos_2d(arch.width, arch.grid)[None]
  state["decoder_pos_embed"] = posemb.sincos_2d(arch.decoder_width, arch.grid)[None]
  safetensors.numpy.save_file(state, str(path))
  return state


def test_an_mae_export_records_both_head_counts_and_reads_back_without_flags(tmp_path):
  """Encoder and decoder heads differ (4 vs 2) and neither width is standard: the export's
  record keeps each, so re-reading it needs no --heads / --decoder_heads."""
  arch = timm_weights.Arch(width=32, depth=1, heads=4, patch=4, grid=2, mlp_hidden=128,
                           posemb="sincos", decoder_width=16, decoder_depth=1, decoder_heads=2,
                           decoder_hidden=64, pred_dim=48)
  state = _random_mae_file(tmp_path / "src.safetensors", arch)
  out = tmp_path / "mae.safetensors"
  convert.convert(str(tmp_path / "src.safetensors"), str(out), "mae", heads=4, decoder_heads=2)
  meta = json.loads((tmp_path / "mae.json").read_text())
  assert meta["timm"]["kwargs"]["num_heads"] == 4 and meta["decoder"] == dict(
      width=16, depth=1, heads=2, mlp_hidden=64, pred_dim=48)
  assert weight_files.read_file_weights(out)[1] == arch
  back = safetensors.numpy.load_file(str(out))
  assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("case", ["step_0_of_a_file", "decoder_heads_of_a_workdir"])
def test_flags_that_do_not_apply_are_errors_at_any_value(tmp_path, case):
  src = _fake_workdir(tmp_path / "src", {"model": {}})
  args, kwargs, match = {
      "step_0_of_a_file": ((str(VIT_TI), str(tmp_path / "x.safetensors")), dict(step=0), "--step"),
      "decoder_heads_of_a_workdir": ((str(src), str(tmp_path / "x.safetensors")), dict(
          fmt="mae", decoder_heads=2), "--heads / --decoder_heads"),
  }[case]
  with pytest.raises(UserError, match=match):
    convert.convert(*args, **kwargs)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_existing_directory_is_a_workdir_target_whatever_its_name(tmp_path):
  (tmp_path / "runs.v2").mkdir()
  assert convert.target_format(str(tmp_path / "runs.v2"), "", False) == "workdir"
  assert convert.target_format(str(tmp_path / "plain"), "", False) == "workdir"
  assert convert.target_format(str(tmp_path / "vit.safetensors"), "", True) == "mae"
  with pytest.raises(UserError, match="cannot tell the format"):
    convert.target_format(str(tmp_path / "runs.v3"), "", False)


def test_merge_puts_the_file_in_and_names_what_stays_fresh():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  fresh = {"encoder": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "decoder_pred": {"b": jnp.zeros(4)}}
  merged, left = convert._merge(fresh, {"encoder": {"w": np.ones((2, 3)), "b": np.full(3, 2.0)}})
  np.testing.assert_array_equal(merged["encoder"]["w"], np.ones((2, 3)))
  np.testing.assert_array_equal(merged["encoder"]["b"], np.full(3, 2.0))
  np.testing.assert_array_equal(merged["decoder_pred"]["b"], np.zeros(4))
  assert left == ["decoder_pred"]
  with pytest.raises(timm_weights.WeightsError, match=r"2 arrays do not fit.*encoder/w: file \(3, 2\), "
                     r"model \(2, 3\)") as e:
    convert._merge(fresh, {"encoder": {"w": np.ones((3, 2)), "extra": np.ones(1)}})
  assert "encoder/extra (not in the model)" in str(e.value)


def test_replace_swaps_a_workdir_in_and_leaves_nothing_behind(tmp_path):
  old, new = tmp_path / "wd", tmp_path / ".wd.tmp"
  old.mkdir()
  (old / "config.json").write_text("old")
  (old / "stale.txt").write_text("old")
  new.mkdir()
  (new / "config.json").write_text("new")
  safe_replace.replace(new, old)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["wd"]
  assert sorted(p.name for p in old.iterdir()) == ["config.json"]
  assert (old / "config.json").read_text() == "new"
  (tmp_path / "f.tmp").write_text("new")
  (tmp_path / "f").write_text("old")
  safe_replace.replace(tmp_path / "f.tmp", tmp_path / "f")
  assert (tmp_path / "f").read_text() == "new" and not (tmp_path / "f.tmp").exists()


def test_a_failed_move_leaves_the_old_file_and_workdir_in_place(tmp_path, monkeypatch):
  """The old target stays where it was until the new one is in place: a rename that fails
  (a full disk, another process) loses nothing."""
  def fail(*args):
    raise OSError(28, "No space left on device")
  (tmp_path / "f").write_text("old")
  (tmp_path / "f.tmp").write_text("new")
  with monkeypatch.context() as m:
    m.setattr(os, "replace", fail)
    with pytest.raises(OSError):
      safe_replace.replace(tmp_path / "f.tmp", tmp_path / "f")
  assert (tmp_path / "f").read_text() == "old"
  old, new = tmp_path / "wd", tmp_path / ".wd.tmp"
  for path, text in ((old, "old"), (new, "new")):
    path.mkdir()
    (path / "config.json").write_text(text)
  real_rename = type(old).rename
  def rename(self, target):  # moving the old workdir aside works; moving the new one in fails
    if self == new:
      fail()
    return real_rename(self, target)
  with monkeypatch.context() as m:
    m.setattr(type(old), "rename", rename)
    with pytest.raises(OSError):
      safe_replace.replace(new, old)
  assert (old / "config.json").read_text() == "old"


@pytest.mark.parametrize("where,error,why", [
    # safetensors' own error for a full disk, as seen on a 64 KiB tmpfs
    ("save_file", safetensors.SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
     "Error while serializing: I/O error: No space left on device (os error 28)"),
    ("as_new_file", OSError(28, "No space left on device"), "No space left on device"),
])
def test_a_failed_export_is_one_line_and_keeps_the_old_files(tmp_path, monkeypatch, where, error,
                                                             why):
  out = tmp_path / "vit_ti.safetensors"
  convert.convert(str(VIT_TI), str(out))
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(safetensors.numpy if where == "save_file" else safe_replace, where, fail)
  with pytest.raises(UserError) as e:
    convert.convert(str(FIXTURES / "vit_s.safetensors"), str(out), heads=12, overwrite=True)
  assert str(e.value) == (f"--to={out}: writing it failed ({why}); nothing was replaced and no "
                          "partial file is left. Free space (or fix the permissions), then rerun "
                          "the same command")
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporaries


def _files(folder):
  """Every file below `folder` (hidden temporaries too), with its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("existing", [True, False])
def test_a_failed_move_of_the_weights_puts_the_old_json_back(tmp_path, monkeypatch, existing):
  """The JSON moves into place first; if the weights' rename then fails, the JSON beside them
  is the old one again (or gone, for a new target): never new metadata with old weights."""
  out = tmp_path / "vit.safetensors"
  if existing:
    convert.convert(str(VIT_TI), str(out))
  before = _files(tmp_path)
  real_replace = os.replace
  def replace(src, dst):
    if pathlib.Path(dst) == out:
      raise OSError(16, "Device or resource busy")
    real_replace(src, dst)
  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(UserError) as e:
    convert.convert(str(FIXTURES / "vit_s.safetensors"), str(out), heads=12, overwrite=True)
  assert str(e.value).startswith(f"--to={out}: writing it failed (Device or resource busy); "
                                 "nothing was replaced and no partial file is left.")
  assert _files(tmp_path) == before


@pytest.mark.parametrize("where", ["write_records", "write_checkpoint"])
def test_a_failed_workdir_write_is_one_line_and_keeps_the_old_workdir(tmp_path, monkeypatch,
                                                                      where):
  """A full disk while a workdir target is written (its config.json, or the checkpoint, which
  raises the trainer's CheckpointError) is convert's own line, not advice to resume training;
  the workdir it would replace is untouched and no temporary directory is left."""
  old = _fake_workdir(tmp_path / "wd", {"model": {}})
  before = _files(tmp_path)
  full = OSError(28, "No space left on device")
  def fail(directory, *args):
    if where == "write_records":
      raise full
    raise checkpoint_errors.write_failed(0, directory, full) from full
  monkeypatch.setattr((workdir_records if where == "write_records" else checkpointing), where,
                      fail)
  with pytest.raises(UserError) as e:
    convert.convert(str(MAE_PTH), str(old), heads=2, decoder_heads=2, overwrite=True,
                    config=pretrain_config())
  assert str(e.value) == (f"--to={old}: writing it failed (No space left on device); nothing was "
                          "replaced and no partial file is left. Free space (or fix the "
                          "permissions), then rerun the same command")
  assert _files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["wd"]


def test_a_scan_layers_config_gets_the_files_weights(tmp_path):
  """A workdir target whose config scans the blocks holds them stacked, with the file's values."""
  config = apply_overrides(pretrain_config(), {"model.scan_layers": True})
  convert.convert(str(MAE_PTH), str(tmp_path / "wd"), heads=2, decoder_heads=2, config=config)
  assert json.loads((tmp_path / "wd" / "config.json").read_text())["model"]["scan_layers"]
  params = convert.read_workdir_weights(tmp_path / "wd")[0]
  state = mae_state()
  np.testing.assert_array_equal(params["encoder"]["block0"]["mlp"]["fc1"]["kernel"],
                                state["blocks.0.mlp.fc1.weight"].T)
  jax.tree.map(np.testing.assert_array_equal, params,
               weight_files.read_file_weights(MAE_PTH, 2, 2)[0])


def test_the_parent_directory_is_never_a_target(tmp_path, monkeypatch):
  """--to=.. from inside a workdir would replace the workdir holding the current directory."""
  wd = _fake_workdir(tmp_path / "wd", {"model": {}})
  (wd / "sub").mkdir()
  monkeypatch.chdir(wd / "sub")
  with pytest.raises(UserError, match="names no file or directory of its own"):
    safe_replace.check_target(pathlib.Path(".."), "workdir", overwrite=True)
  assert (wd / "config.json").is_file()


def test_an_empty_directory_is_a_new_workdir_target_and_a_missing_parent_is_named(tmp_path):
  (tmp_path / "empty").mkdir()
  safe_replace.check_target(tmp_path / "empty", "workdir", overwrite=False)  # nothing to lose
  with pytest.raises(UserError, match="empty exists; pass --overwrite"):
    safe_replace.check_target(tmp_path / "empty", "timm", overwrite=False)
  with pytest.raises(UserError, match="the directory .*missing does not exist"):
    safe_replace.check_target(tmp_path / "missing" / "x.safetensors", "timm", overwrite=False)


def test_a_classifier_head_is_dropped_and_said_so(tmp_path):
  state = safetensors.numpy.load_file(str(VIT_TI))
  src = tmp_path / "with_head.safetensors"
  safetensors.numpy.save_file(dict(state, **{"head.weight": np.ones((10, 192), np.float32),
                                             "head.bias": np.ones(10, np.float32)}), str(src))
  params, _, description = weight_files.read_file_weights(src)
  assert description.endswith("(ignored: head.weight, head.bias)")
  jax.tree.map(np.testing.assert_array_equal, params, weight_files.read_file_weights(VIT_TI)[0])


def test_a_legacy_pickle_source_is_named_as_such(tmp_path):
  src = tmp_path / "old.pth"
  src.write_bytes(b"\x80\x02}q\x00.")  # pickle protocol 2: an empty dict, as torch < 1.6 saved
  with pytest.raises(UserError, match=r"a legacy \(pre-1.6\) torch.save file"):
    weight_files.read_file_weights(src)


def test_workdir_to_workdir_is_refused(tmp_path):
  src = _fake_workdir(tmp_path / "src", {"mode": "pretrain", "model": {}})
  with pytest.raises(UserError, match="both workdirs; nothing to convert"):
    convert.convert(str(src), str(tmp_path / "copy"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- a fine-tuned / probed classifier workdir -> a timm classifier -------------------------

def classifier_workdir(path, mode, pool, *, ema=False, num_classes=5, seed=0):
  """A fine-tuning / probing workdir as the trainer leaves it (config.json, a checkpoint of a
  ClassifierState at step 3) with random weights and, for the probe, BatchNorm statistics."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.models import classifier  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from pr_mim_jax.training import workdir_records  # pylint: disable=g-import-not-at-top
  config = classify_config.get_config(mode, "dataset=shapes")
  config.model.update(variant="B/4", width=32, depth=2, heads=4, image_size=16, posemb="learned")
  config.head.pool, config.ema.decay = pool, 0.99 if ema else 0.0
  model = classifier.from_config(config, num_classes)
  init = jax.jit(lambda rng: model.init(rng, np.zeros((1, 16, 16, 3), np.float32), train=False))
  variables = nn.unbox(init(jax.random.key(0)))  # jitted: eagerly, each op compiles alone
  rng = np.random.default_rng(seed)
  noise = lambda t: jax.tree.map(
      lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype), t)
  params = noise(variables["params"])
  stats = jax.tree.map(lambda x: rng.uniform(0.5, 2, x.shape).astype(x.dtype),
                       variables.get("batch_stats", {}))
  state = train_state.ClassifierState(step=np.int32(3), params=params, batch_stats=stats,
                                      opt_state={}, rng=np.zeros(2, np.uint32),
                                      ema_params=noise(params) if ema else None)
  workdir_records.write_records(str(path), config)
  checkpointing.write_checkpoint(str(path), 3, state)
  return model, state


def numpy_timm_logits(s, kwargs, images_nchw):
  """timm's VisionTransformer.forward (eval) in NumPy, from a timm state dict and its kwargs."""
  from test_timm_weights import _block, _ln  # pylint: disable=g-import-not-at-top
  s = {k: v.astype(np.float64) for k, v in s.items()}
  b, p, d = images_nchw.shape[0], kwargs["patch_size"], kwargs["embed_dim"]
  g = kwargs["img_size"] // p
  cols = images_nchw.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
  x = cols @ s["patch_embed.proj.weight"].reshape(d, -1).T + s["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(s["cls_token"], (b, 1, d)), x], 1) + s["pos_embed"]
  for i in range(kwargs["depth"]):
    x = _block(s, f"blocks.{i}", x, kwargs["num_heads"])
  if kwargs["global_pool"] == "avg":  # norm = Identity; fc_norm on the mean of the patches
    feats = _ln(x[:, 1:].mean(1), s["fc_norm.weight"], s["fc_norm.bias"])
  else:
    feats = _ln(x, s["norm.weight"], s["norm.bias"])[:, 0]
  return feats @ s["head.weight"].T + s["head.bias"]


@pytest.mark.parametrize("mode,pool,ema", [("finetune", "gap", False), ("finetune", "cls", True),
                                           ("linear_probe", "cls", False)])
def test_a_classifier_workdir_exports_as_a_timm_classifier(tmp_path, mode, pool, ema):
  model, state = classifier_workdir(tmp_path / "run", mode, pool, ema=ema)
  out = tmp_path / "clf.safetensors"
  message = convert.convert(str(tmp_path / "run"), str(out), ema=ema)
  want_pool = {"gap": "avg", "cls": "token"}[pool]
  assert f"5 classes, global_pool={want_pool!r}" in message, message
  kwargs = json.loads((tmp_path / "clf.json").read_text())["timm"]["kwargs"]
  assert (kwargs["num_classes"], kwargs["global_pool"]) == (5, want_pool) and kwargs["class_token"]
  exported = safetensors.numpy.load_file(str(out))
  assert ("fc_norm.weight" in exported) == (pool == "gap") != ("norm.weight" in exported)
  images = np.random.default_rng(1).standard_normal((2, 3, 16, 16))
  variables = {"params": state.ema_params if ema else state.params,
               "batch_stats": state.batch_stats}
  ours = np.asarray(model.apply(variables, images.transpose(0, 2, 3, 1).astype(np.float32),
                                train=False))
  np.testing.assert_allclose(numpy_timm_logits(exported, kwargs, images), ours,
                             rtol=1e-4, atol=1e-4 * np.abs(ours).max())


def test_classifier_workdir_flags_that_do_not_apply_are_errors(tmp_path):
  classifier_workdir(tmp_path / "run", "finetune", "gap")
  with pytest.raises(UserError, match="trained without an EMA"):
    convert.convert(str(tmp_path / "run"), str(tmp_path / "a.safetensors"), ema=True)
  with pytest.raises(UserError, match="finetune workdir has no decoder"):
    convert.convert(str(tmp_path / "run"), str(tmp_path / "b.safetensors"), "mae")
  with pytest.raises(UserError, match="--ema: reads a fine-tuning"):
    convert.convert(str(MAE_PTH), str(tmp_path / "c.safetensors"), ema=True, heads=2)
  assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.slow
def test_a_probe_exported_at_an_earlier_step_uses_that_steps_batchnorm_statistics(tmp_path):
  """--step picks the params and the BatchNorm statistics of one checkpoint: the folded head
  gives that step's logits even when a later checkpoint has other statistics."""
  model, state = classifier_workdir(tmp_path / "run", "linear_probe", "cls")
  later = state.replace(step=np.int32(5),
                        batch_stats=jax.tree.map(lambda x: 3.0 * x + 1.0, state.batch_stats))
  checkpointing.write_checkpoint(str(tmp_path / "run"), 5, later)
  out = tmp_path / "clf.safetensors"
  convert.convert(str(tmp_path / "run"), str(out), step=3)
  meta = json.loads((tmp_path / "clf.json").read_text())
  assert meta["source"].endswith("step 3")
  kwargs = meta["timm"]["kwargs"]
  images = np.random.default_rng(2).standard_normal((2, 3, 16, 16))
  ours = np.asarray(model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                images.transpose(0, 2, 3, 1).astype(np.float32), train=False))
  np.testing.assert_allclose(numpy_timm_logits(safetensors.numpy.load_file(str(out)), kwargs,
                                               images), ours, rtol=1e-4,
                             atol=1e-4 * np.abs(ours).max())
