"""Writing convert's outputs without losing data: what --to may replace, and the rename.

Outputs are built under a temporary name next to the target and renamed into place (a
.safetensors target and its JSON together, all or none). An existing target (or the JSON
beside a .safetensors one) is replaced only with --overwrite, and then only a file or a
pr_mim_jax workdir (a directory with config.json): never another directory, nor a symbolic
link. New files get the mode open() gives (0666 less the umask).
"""

import os
import pathlib
import shutil
import tempfile

from pr_mim_jax.errors import UserError


def sidecar(path: pathlib.Path) -> pathlib.Path:
  """The JSON written next to a .safetensors target."""
  return path.with_suffix(".json")


def _check_replaceable(path: pathlib.Path, workdir: bool, overwrite: bool, what: str) -> None:
  """Refuses to write `path` over anything but (with --overwrite) a file of ours or, for a
  workdir, a pr_mim_jax workdir: a command never removes data it did not write."""
  if path.is_symlink():
    raise UserError(f"--to: {path}{what} is a symbolic link; give the path it points to "
                    f"({os.readlink(path)}) or remove the link")
  if not path.exists() or (workdir and path.is_dir() and not any(path.iterdir())):
    return
  if not overwrite:
    raise UserError(f"--to: {path}{what} exists; pass --overwrite to replace it, or choose "
                    "another path")
  if path.is_dir() != workdir:
    raise UserError(f"--to: {path}{what} is {'a directory' if path.is_dir() else 'a file'}, "
                    f"which --overwrite does not replace with a {'workdir' if workdir else 'file'}; "
                    "choose another path, or remove it yourself")
  if workdir and not (path / "config.json").is_file():
    raise UserError(f"--to: {path} is a directory but not a pr_mim_jax workdir (no config.json), "
                    "so --overwrite does not replace it; choose another path, or remove it yourself")


def _check_writable(directory: pathlib.Path) -> None:
  """A UserError now, not a traceback after reading the weights, if `directory` takes no files."""
  try:
    tempfile.TemporaryFile(dir=directory).close()
  except OSError as e:
    raise UserError(f"--to: cannot write in {directory} ({e.strerror}); choose a directory "
                    "you can write to") from None


def check_target(path: pathlib.Path, fmt: str, overwrite: bool) -> None:
  """Everything the write will replace (a .safetensors target's JSON too) may be replaced."""
  if path.name in ("", ".", ".."):
    raise UserError(f"--to: {path} names no file or directory of its own; give a new path, "
                    "e.g. out/vit.safetensors or workdirs/converted")
  if not path.parent.is_dir():
    raise UserError(f"--to: the directory {path.parent} does not exist")
  _check_replaceable(path, fmt == "workdir", overwrite, "")
  if fmt != "workdir":
    _check_replaceable(sidecar(path), False, overwrite, f" (written next to {path.name})")
  _check_writable(path.parent)


def replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
  """Moves tmp onto path (a file or a directory), removing what was there. A directory is
  moved aside first and put back if the new one cannot be moved in, so path always holds
  the old or the new one."""
  if path.is_dir():
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    path.rename(old)
    try:
      tmp.rename(path)
    except BaseException:
      old.rename(path)
      raise
    shutil.rmtree(old)
  else:
    os.replace(tmp, path)


def replace_together(moves: list[tuple[pathlib.Path, pathlib.Path]]) -> None:
  """Moves each (tmp, file) of `moves` onto its file, all or none: when a move fails, the files
  moved before it get their old contents back (or go, if new), so a .safetensors file and its
  JSON never pair a new one with an old one. Each but the last is copied aside first; the
  last needs no copy, since a failed rename leaves its file as it was."""
  olds = []  # [(file, its old contents aside, or None where it did not exist)]
  try:
    for i, (tmp, path) in enumerate(moves):
      if i < len(moves) - 1:
        old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.is_file() else None
        if old is not None:
          shutil.copy2(path, old)
        olds.append((path, old))
      os.replace(tmp, path)
  except BaseException:
    for path, old in reversed(olds):
      if old is None:
        path.unlink(missing_ok=True)
      else:
        os.replace(old, path)
    raise
  finally:
    for _, old in olds:
      if old is not None:
        old.unlink(missing_ok=True)


def _umask() -> int:
  """The process umask, read by setting it and putting it back (there is no getter); it is
  077 for that instant, so nothing another thread creates meanwhile is exposed."""
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


def as_new_file(path: pathlib.Path) -> None:
  """Gives `path` the mode open() gives a new file (0666 less the umask): safetensors writes
  0600, which would keep a file meant for sharing from others the umask lets read it."""
  os.chmod(path, 0o666 & ~_umask())
