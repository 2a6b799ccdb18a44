"""Reads PyTorch checkpoints (`torch.save` zip files) into NumPy, without torch.

`torch.load` unpickles arbitrary code; this reader never does. A `torch.save` file (torch
>= 1.6) is a zip: `<prefix>/data.pkl` holds the object tree, `<prefix>/data/<key>` the raw
bytes of each storage. The unpickler resolves only a whitelist of globals:
- tensors: `torch._utils._rebuild_tensor_v2` and `_rebuild_parameter`, over the typed
  storages `torch.FloatStorage`, `HalfStorage`, `BFloat16Storage`, ... (NumPy arrays;
  bfloat16 through ml_dtypes). Views (offsets, strides) are copied out of their storage.
- containers: `collections.OrderedDict` (a dict) and `torch.Size` (a tuple).
- `argparse.Namespace` (MAE's training checkpoints keep their args in it): read as an inert
  `Opaque` placeholder holding the pickled attributes, so such files load; nothing of the
  class's own code runs.
Any other global stops the read with a `PthError` naming it. Old (pre-1.6, non-zip) files
and TorchScript archives are refused with a message saying so.
"""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

from pr_mim_jax.errors import UserError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_OPAQUE = ("argparse.Namespace",)
_STATE_DICT_KEYS = ("model", "state_dict", "model_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class PthError(UserError):
  """A file this reader will not or cannot read; the message says which and why."""


class Opaque:
  """Stand-in for a whitelisted non-tensor object (e.g. argparse.Namespace): keeps its
  pickled attributes in __dict__, runs none of the original class's code."""
  global_name = ""

  def __repr__(self):
    return f"Opaque({self.global_name}, {vars(self)})"


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _strided_copy(storage: np.ndarray, offset: int, size, stride) -> np.ndarray:
  """A contiguous copy of the view storage[offset + sum(i_k * stride_k)] of shape `size`."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride):
    raise PthError(f"tensor view with size {size} and stride {stride} is malformed")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= storage.size:
    raise PthError(f"tensor view (offset {offset}, size {size}, stride {stride}) reaches past "
                   f"its storage of {storage.size} elements")
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * item for s in stride),
                                         writeable=False)
  return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  return _strided_copy(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "torch.Size": tuple,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only whitelisted globals; storages come from the zip as NumPy arrays."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages = {}
    order = f"{prefix}/byteorder"
    big = order in archive.namelist() and archive.read(order).strip() == b"big"
    self._byteorder = ">" if big else "<"

  def find_class(self, module, name):
    full = f"{module}.{name}"
    if full in _GLOBALS:
      return _GLOBALS[full]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if full in _OPAQUE:
      return type(name, (Opaque,), {"global_name": full})
    raise PthError(f"{self._path}: refusing to unpickle the global {full} (only tensors, dicts "
                   "and argparse.Namespace are read; no pickled code runs). Save the weights "
                   "alone, e.g. torch.save(model.state_dict(), PATH) or as .safetensors")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise PthError(f"{self._path}: unsupported storage record {pid!r:.80}")
    _, storage_type, key, _, numel = pid[:5]
    if key not in self._storages:
      name = f"{self._prefix}/data/{key}"
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise PthError(f"{self._path}: storage {name} is missing from the archive") from None
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      if len(raw) < numel * dtype.itemsize:
        raise PthError(f"{self._path}: storage {name} holds {len(raw)} bytes, "
                       f"{numel * dtype.itemsize} expected")
      array = np.frombuffer(raw, dtype, count=numel)
      self._storages[key] = array.astype(array.dtype.newbyteorder("="))
    return self._storages[key]


def read(path: str):
  """The object tree of a `torch.save` file, tensors as NumPy arrays (see module doc)."""
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":
      raise PthError(f"{path}: a legacy (pre-1.6) torch.save file; re-save it with a recent "
                     "torch (torch.save(torch.load(PATH), NEW_PATH)) or as .safetensors") from None
    if head == b"PK":
      raise PthError(f"{path}: a zip file whose index cannot be read; it looks truncated or "
                     "corrupt (an interrupted download or copy?). Fetch it again") from None
    raise PthError(f"{path}: neither a torch.save zip file nor safetensors") from None
  except OSError as e:
    raise PthError(f"{path}: cannot read ({e.strerror})") from None
  except Exception as e:  # pylint: disable=broad-except  # e.g. a name in the index not UTF-8
    raise PthError(_corrupt(path, e)) from None
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if any(n.endswith("/constants.pkl") and n.count("/") == 1 for n in names):
      # torch.jit.save also writes a data.pkl, of its own module classes: say what it is.
      raise PthError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save "
                     "checkpoint; save the weights alone, e.g. torch.save(model.state_dict(), "
                     "PATH) or as .safetensors")
    if not pickles:
      raise PthError(f"{path}: a zip without <prefix>/data.pkl, not a torch.save checkpoint")
    prefix = pickles[0].split("/")[0]
    try:  # opening data.pkl checks its local header against the index: corrupt files fail here
      with archive.open(pickles[0]) as f:
        return _Unpickler(f, archive, prefix, path).load()
    except PthError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # damaged zip records or pickle stream
      raise PthError(f"{path}: damaged checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def _corrupt(path: str, error: Exception) -> str:
  """The message for a zip whose index cannot be parsed."""
  return (f"{path}: a zip file whose index cannot be read ({type(error).__name__}); it looks "
          "truncated or corrupt (an interrupted download or copy?). Fetch it again")


def _is_tensor_dict(node) -> bool:
  return isinstance(node, dict) and bool(node) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in node.items())


def state_dict(tree, path: str = "checkpoint") -> dict[str, np.ndarray]:
  """The flat name -> array dict of a checkpoint: under 'model', 'state_dict' or
  'model_ema' (first found), else the top level, without wrapper prefixes."""
  if isinstance(tree, dict):
    for key in _STATE_DICT_KEYS:
      if _is_tensor_dict(tree.get(key)):
        tree = tree[key]
        break
  if not _is_tensor_dict(tree):
    keys = sorted(map(str, tree))[:10] if isinstance(tree, dict) else type(tree).__name__
    raise PthError(f"{path}: no state dict of tensors found at the top level or under "
                   f"{_STATE_DICT_KEYS} (it has {keys})")
  return without_wrappers(tree)


def without_wrappers(state: dict) -> dict:
  """state with the prefixes that wrappers add to every name removed, in any nesting: DDP's
  'module.' and torch.compile's '_orig_mod.' (a compiled model's state_dict)."""
  state = dict(state)
  while True:
    prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
    if prefix is None:
      return state
    state = {k[len(prefix):]: v for k, v in state.items()}
