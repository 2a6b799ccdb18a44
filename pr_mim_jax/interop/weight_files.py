"""Reading timm / official MAE weight files into our params, without torch.

Sources are told apart by content, not suffix: a `torch.save` zip (or a legacy pickle, refused
with advice) goes through pth_reader, a .safetensors file is read from its own layout (so
bfloat16 works). Our own exports carry a record under METADATA_KEY in the safetensors header.
"""

import json
import pathlib

import ml_dtypes
import numpy as np

from pr_mim_jax.errors import UserError
from pr_mim_jax.interop import pth_reader
from pr_mim_jax.interop import timm_weights

METADATA_KEY = "pr_mim_jax"  # our export record in a safetensors header


def _read_file(path: pathlib.Path) -> tuple[dict, dict]:
  """(state dict of NumPy arrays, our metadata from a safetensors header or {}). The kind
  is told by content, not suffix: JSON after 8 bytes is safetensors (a zip has its
  compression method there), a zip or a pickle is torch.save."""
  if not path.is_file():
    raise UserError(f"--from: {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(9)
  if head[8:9] != b"{":
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
      return pth_reader.state_dict(pth_reader.read(str(path)), str(path)), {}
    raise UserError(f"--from: {path} is neither a torch.save file nor safetensors")
  try:
    state, metadata = _read_safetensors(path)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"--from: {path} starts like safetensors but cannot be read; it looks "
                    f"truncated or corrupt ({type(e).__name__}: {str(e)[:200]})") from None
  return pth_reader.without_wrappers(state), _our_metadata(metadata, path)


def _our_metadata(metadata: dict, path: pathlib.Path) -> dict:
  """The dict our exports keep under METADATA_KEY in a safetensors header; {} if absent."""
  if METADATA_KEY not in metadata:
    return {}
  try:
    ours = json.loads(metadata[METADATA_KEY])
  except (TypeError, ValueError):
    ours = None
  if not isinstance(ours, dict):
    raise UserError(f"--from: {path}: the header metadata {METADATA_KEY!r} is not a JSON object; "
                    "it is only our export record, so re-export the file or save it without it")
  return ours


def _read_safetensors(path: pathlib.Path) -> tuple[dict, dict]:
  """(name -> array, header metadata) of a .safetensors file, read from its own layout: an
  8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}},
  then the bytes. Read by hand because safetensors' NumPy API rejects bfloat16 tensors,
  which timm's hub files may hold."""
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    if not 2 <= size <= 100 << 20:
      raise ValueError(f"header length {size} is not plausible")
    header = json.loads(f.read(size))
    data = f.read()
  metadata = header.pop("__metadata__", None) or {}
  state = {}
  for name, info in header.items():
    begin, end = info["data_offsets"]
    if info["dtype"] not in dtypes or not 0 <= begin <= end <= len(data):
      raise ValueError(f"tensor {name}: dtype {info['dtype']} or offsets {begin}..{end} unusable")
    state[name] = np.frombuffer(data[begin:end], np.dtype(dtypes[info["dtype"]]).newbyteorder(
        "<")).reshape(info["shape"])
  return state, metadata


def read_file_weights(path, heads: int = 0, decoder_heads: int = 0, decoder: bool = True):
  """(params, arch, description) of a timm / MAE file. Heads: the flags, else our export
  metadata, else the standard widths. decoder=False drops MAE's decoder keys unread (a
  timm target holds the encoder alone)."""
  path = pathlib.Path(path)
  state, meta = _read_file(path)
  heads = heads or meta.get("timm", {}).get("kwargs", {}).get("num_heads", 0)
  decoder_heads = decoder_heads or (meta.get("decoder") or {}).get("heads", 0)
  ignored = [k for k in timm_weights.IGNORED if k in state]
  if not decoder and timm_weights.has_decoder_keys(state):
    state = {k: v for k, v in state.items() if not timm_weights.is_decoder_key(k)}
    ignored.append("the MAE decoder")
  arch = timm_weights.infer_arch(state, heads, decoder_heads)
  params = timm_weights.from_state_dict(state, arch)
  note = f" (ignored: {', '.join(ignored)})" if ignored else ""
  return params, arch, f"{path}{note}"
