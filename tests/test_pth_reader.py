"""The torch-free .pth reader: a real torch.save file, views, and what it refuses."""

import argparse
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from conftest import ROOT
from pr_mim_jax.interop import pth_reader

FIXTURES = ROOT / "tests" / "fixtures"


def test_reads_a_real_torch_save_file_exactly():
  tree = pth_reader.read(str(FIXTURES / "mae_tiny.pth"))
  expected = np.load(FIXTURES / "mae_tiny_expected.npz")
  for key in expected.files:
    group, name = key.split("/")
    got = tree[group][name]
    if got.dtype.name == "bfloat16":
      got = got.astype(np.float32)
    assert got.shape == expected[key].shape and got.dtype == expected[key].dtype, key
    np.testing.assert_array_equal(got, expected[key], err_msg=key)
  assert tree["views"]["half"].dtype == np.float16 and tree["views"]["long"].dtype == np.int64
  # MAE's training args: an inert placeholder, readable, none of argparse's code ran.
  assert isinstance(tree["args"], pth_reader.Opaque)
  assert tree["args"].global_name == "argparse.Namespace" and tree["args"].mask_ratio == 0.75
  assert tree["epoch"] == 799
  state = pth_reader.state_dict(tree)
  assert "decoder_pred.weight" in state and "views" not in state


def test_matches_torch_load_when_torch_is_installed():
  torch = pytest.importorskip("torch")
  ours = pth_reader.state_dict(pth_reader.read(str(FIXTURES / "mae_tiny.pth")))
  # torch's own safe loader refuses argparse.Namespace (MAE's 'args') unless allowed.
  with torch.serialization.safe_globals([argparse.Namespace]):
    theirs = torch.load(FIXTURES / "mae_tiny.pth", weights_only=True)["model"]
  assert set(ours) == set(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v.numpy())


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch should_not_exist",))


def _fake_torch_zip(path, obj):
  buf = io.BytesIO()
  pickle.Pickler(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())


def test_refuses_pickled_code_and_names_the_global(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "evil.pth"
  _fake_torch_zip(path, {"model": _Evil()})
  with pytest.raises(pth_reader.PthError, match=r"refusing to unpickle the global (posix|os)\.system"):
    pth_reader.read(str(path))
  assert not (tmp_path / "should_not_exist").exists()


def test_refuses_legacy_and_foreign_files(tmp_path):
  legacy = tmp_path / "old.pth"
  legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  # (tmp_path holds this test's name, "legacy" too: match the message's own words.)
  with pytest.raises(pth_reader.PthError, match=r"a legacy \(pre-1.6\) torch.save file; re-save "
                     r"it with a recent torch \(torch.save\(torch.load\(PATH\), NEW_PATH\)\)"):
    pth_reader.read(str(legacy))
  text = tmp_path / "notes.pth"
  text.write_text("hello")
  with pytest.raises(pth_reader.PthError, match="neither"):
    pth_reader.read(str(text))
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes((FIXTURES / "mae_tiny.pth").read_bytes()[:40000])
  with pytest.raises(pth_reader.PthError, match="looks truncated or corrupt"):
    pth_reader.read(str(truncated))
  with pytest.raises(pth_reader.PthError, match="no state dict"):
    pth_reader.state_dict({"epoch": 3})


def test_state_dict_finds_the_weights():
  w = np.ones(2, np.float32)
  assert set(pth_reader.state_dict({"state_dict": {"module.a": w}, "epoch": 1})) == {"a"}
  assert set(pth_reader.state_dict({"a": w, "b": w})) == {"a", "b"}


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_state_dict_removes_ddp_and_torch_compile_prefixes(prefix):
  """torch.compile's wrapper saves every name under '_orig_mod.', DDP under 'module.', and the
  two nest either way; a prefix only some names share is a real name and stays."""
  w = np.ones(2, np.float32)
  tree = {"model": {f"{prefix}blocks.0.x": w, f"{prefix}cls_token": w}}
  assert set(pth_reader.state_dict(tree)) == {"blocks.0.x", "cls_token"}
  assert set(pth_reader.state_dict({f"{prefix}a": w, "b": w})) == {f"{prefix}a", "b"}


def _zip_with_name_bytes(path, old: bytes, new: bytes, count: int):
  """A small torch-like zip whose stored name bytes `old` are replaced `count` times
  (-1: everywhere), as a flipped byte in a download would."""
  buf = io.BytesIO()
  pickle.Pickler(buf, protocol=2).dump({"a": 1})
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/\u00e9.txt", b"x")  # a non-ASCII name: stored with the UTF-8 flag
  path.write_bytes(path.read_bytes().replace(old, new, count))


def test_corrupt_zip_records_are_one_clear_error(tmp_path):
  # A name in the zip index that is not UTF-8: zipfile raises UnicodeDecodeError.
  bad_index = tmp_path / "bad_index.pth"
  _zip_with_name_bytes(bad_index, "\u00e9".encode(), b"\xff\xfe", -1)
  with pytest.raises(pth_reader.PthError, match="index cannot be read.*truncated or corrupt"):
    pth_reader.read(str(bad_index))
  # data.pkl's local header disagrees with the index (only the first copy of the name changed).
  bad_header = tmp_path / "bad_header.pth"
  _zip_with_name_bytes(bad_header, b"archive/data.pkl", b"archivX/data.pkl", 1)
  with pytest.raises(pth_reader.PthError, match="damaged checkpoint.*BadZipFile"):
    pth_reader.read(str(bad_header))


def test_torchscript_archives_are_named_as_such(tmp_path):
  """torch.jit.save's zip has <prefix>/data.pkl (pickling __torch__.* module classes) next
  to constants.pkl and code/; the error says TorchScript, not just the refused global."""
  path = tmp_path / "scripted.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("scripted/data.pkl", b"\x80\x02c__torch__\nLinear\nq\x00)\x81q\x01.")
    z.writestr("scripted/constants.pkl", pickle.dumps((), protocol=2))
    z.writestr("scripted/code/__torch__/linear.py", b"class Linear(Module): ...")
  with pytest.raises(pth_reader.PthError, match=r"a TorchScript archive \(torch.jit.save\)"):
    pth_reader.read(str(path))


# --- hand-built torch.save files (pickle opcodes written out, no torch needed) ---------------
# The layout torch.save writes: <prefix>/data.pkl whose tensors are
# torch._utils._rebuild_tensor_v2(persistent ('storage', torch.<T>Storage, key, 'cpu', numel),
# offset, size, stride, requires_grad, OrderedDict()), <prefix>/data/<key> the raw storage
# bytes, and <prefix>/byteorder. (torch.load(weights_only=True) reads these files too.)

def _op_str(s):
  b = s.encode()
  return b"X" + len(b).to_bytes(4, "little") + b


def _op_int(i):
  return b"J" + int(i).to_bytes(4, "little", signed=True)


def _op_global(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _op_tuple(items):
  return b"(" + b"".join(items) + b"t"


def _tensor_ops(storage, key, numel, offset, size, stride, parameter=False):
  empty_ordered_dict = _op_global("collections", "OrderedDict") + b")R"
  pid = _op_tuple([_op_str("storage"), _op_global("torch", storage), _op_str(key),
                   _op_str("cpu"), _op_int(numel)]) + b"Q"
  ops = _op_global("torch._utils", "_rebuild_tensor_v2") + _op_tuple([
      pid, _op_int(offset), _op_tuple(map(_op_int, size)), _op_tuple(map(_op_int, stride)),
      b"\x89", empty_ordered_dict]) + b"R"
  if parameter:
    ops = _op_global("torch._utils", "_rebuild_parameter") + _op_tuple(
        [ops, b"\x88", empty_ordered_dict]) + b"R"
  return ops


def _torch_zip(path, tensors, storages, byteorder="little"):
  """tensors: name -> _tensor_ops(...); storages: key -> raw bytes."""
  pkl = b"\x80\x02}" + b"".join(_op_str(k) + v + b"s" for k, v in tensors.items()) + b"."
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/version", "3\n")
    if byteorder is not None:
      z.writestr("archive/byteorder", byteorder)
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return str(path)


def test_big_endian_storages_are_byte_swapped(tmp_path):
  want = np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5
  for order, byteorder in ((">", "big"), ("<", "little"), ("<", None)):  # None: older files
    path = _torch_zip(tmp_path / f"{byteorder}.pth",
                      {"w": _tensor_ops("FloatStorage", "0", 6, 0, (2, 3), (3, 1))},
                      {"0": want.astype(f"{order}f4").tobytes()}, byteorder)
    got = pth_reader.read(path)["w"]
    assert got.dtype == np.float32 and got.dtype.isnative, byteorder
    np.testing.assert_array_equal(got, want, err_msg=str(byteorder))


def test_parameters_and_shared_storage_views(tmp_path):
  """nn.Parameter (torch.save of a module's parameters) reads as its array; two views of one
  storage (a transposed one, one at an offset) read as their own elements."""
  data = np.arange(12, dtype=np.float64)
  path = _torch_zip(tmp_path / "p.pth", {
      "p": _tensor_ops("DoubleStorage", "0", 12, 0, (3, 4), (4, 1), parameter=True),
      "t": _tensor_ops("DoubleStorage", "0", 12, 0, (4, 3), (1, 4)),
      "tail": _tensor_ops("DoubleStorage", "0", 12, 5, (2, 3), (3, 1))}, {"0": data.tobytes()})
  tree = pth_reader.read(path)
  assert all(tree[k].dtype == np.float64 for k in ("p", "t", "tail"))
  np.testing.assert_array_equal(tree["p"], data.reshape(3, 4))
  np.testing.assert_array_equal(tree["t"], data.reshape(3, 4).T)
  np.testing.assert_array_equal(tree["tail"], data[5:11].reshape(2, 3))


def test_empty_tensors_keep_their_dtype(tmp_path):
  path = _torch_zip(tmp_path / "e.pth", {"e": _tensor_ops("HalfStorage", "0", 0, 0, (0, 3), (3, 1))},
                    {"0": b""})
  got = pth_reader.read(path)["e"]
  assert got.shape == (0, 3) and got.dtype == np.float16


@pytest.mark.parametrize("case", ["one_past_the_end", "offset_past_the_end", "negative_stride",
                                  "negative_offset", "short_storage"])
def test_views_outside_their_storage_are_refused(tmp_path, case):
  raw = np.arange(6, dtype=np.float32).tobytes()
  numel, offset, size, stride, match = {
      # 6 elements: offset 1 + 6 elements reaches element 6, one past the end.
      "one_past_the_end": (6, 1, (6,), (1,), "reaches past its storage of 6 elements"),
      "offset_past_the_end": (6, 0, (2, 3), (4, 1), "reaches past its storage of 6 elements"),
      "negative_stride": (6, 5, (6,), (-1,), "malformed"),
      "negative_offset": (6, -2, (2,), (1,), "reaches past its storage of 6 elements"),
      "short_storage": (7, 0, (7,), (1,), "holds 24 bytes, 28 expected"),
  }[case]
  path = _torch_zip(tmp_path / "v.pth", {"v": _tensor_ops("FloatStorage", "0", numel, offset, size,
                                                          stride)}, {"0": raw})
  with pytest.raises(pth_reader.PthError, match=match):
    pth_reader.read(path)
  # The largest view that fits is read.
  fits = _torch_zip(tmp_path / "ok.pth", {"v": _tensor_ops("FloatStorage", "0", 6, 0, (6,), (1,))},
                    {"0": raw})
  np.testing.assert_array_equal(pth_reader.read(fits)["v"], np.arange(6, dtype=np.float32))


def test_state_dict_prefers_model_over_model_ema():
  """DeiT / MAE fine-tuning checkpoints keep 'model' and 'model_ema': 'model' is read."""
  a, b = np.zeros(2, np.float32), np.ones(2, np.float32)
  for tree in ({"model": {"w": a}, "model_ema": {"w": b}}, {"model_ema": {"w": b}, "model": {"w": a}},
               {"state_dict": {"w": a}, "model_ema": {"w": b}}):
    np.testing.assert_array_equal(pth_reader.state_dict(tree)["w"], a)
  np.testing.assert_array_equal(pth_reader.state_dict({"model_ema": {"w": b}, "epoch": 3})["w"], b)


def test_storage_names_are_whitelisted_only_under_torch(tmp_path):
  """Only torch.<T>Storage is a storage type: the same name from any other module is a
  global like any other, refused by its full name."""
  path = tmp_path / "s.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02" + _op_global("evil", "FloatStorage") + b".")
  with pytest.raises(pth_reader.PthError,
                     match=r"refusing to unpickle the global evil\.FloatStorage"):
    pth_reader.read(str(path))
