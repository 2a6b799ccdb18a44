"""Launch scripts pass every argument through whole (run with fake gcloud / srun / python)."""

import os
import subprocess

import pytest

from conftest import ROOT

ODD = ["--config.data.dataset=folder:/data/my images", "--config.note=a'b;$(echo x)"]


def _fake_bin(tmp_path, fakes: dict) -> dict:
  """An environment whose PATH starts with tmp_path/bin, holding the given scripts."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in fakes.items():
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


# The fake python writes the arguments it was given, one per NUL-terminated record.
PYTHON = 'printf "%s\\0" "$@" > "$ARGS_FILE"\n'


def _args(path) -> list[str]:
  return path.read_bytes().decode().split("\0")[:-1]


def test_tpu_pod_passes_arguments_with_spaces_and_quotes_whole(tmp_path):
  # The fake gcloud runs only the training command, as a worker's shell would, from a home
  # directory holding the checkout's venv.
  gcloud = ('for a in "$@"; do case "$a" in --command=*pr_mim_jax.main*)\n'
            '  cd "$WORKER_HOME" && exec bash -c "${a#--command=}";; esac; done\n')
  home = tmp_path / "worker"
  (home / "pr_mim_jax" / ".venv" / "bin").mkdir(parents=True)
  (home / "pr_mim_jax" / ".venv" / "bin" / "activate").write_text("")
  env = _fake_bin(tmp_path, {"gcloud": gcloud, "python": PYTHON})
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", REPO="unused", WORKER_HOME=str(home),
             ARGS_FILE=str(tmp_path / "args"))
  result = subprocess.run(["bash", "launch/tpu_pod.sh", "gs://b/w", *ODD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert _args(tmp_path / "args") == [
      "-m", "pr_mim_jax.main", "--config=pr_mim_jax/configs/pretrain.py:variant=B/16",
      "--workdir=gs://b/w", *ODD]


def test_slurm_passes_arguments_whole_and_names_the_packaged_config(tmp_path):
  srun = 'shift; exec "$@"\n'  # drop --kill-on-bad-exit=1, run the command here
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "activate").write_text("")
  env = _fake_bin(tmp_path, {"srun": srun, "python": PYTHON})
  env.update(VENV=str(venv), ARGS_FILE=str(tmp_path / "args"))
  env.pop("XLA_CLIENT_MEM_FRACTION", None)
  result = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "/w", *ODD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  config, *rest = _args(tmp_path / "args")[2:]
  assert rest == ["--workdir=/w", *ODD]
  assert config == "--config=pr_mim_jax/configs/pretrain.py:variant=L/16"


@pytest.mark.parametrize("newer_set", [False, True])
def test_gpu_scripts_never_set_both_memory_fraction_variables(tmp_path, newer_set):
  # jaxlib refuses to start when XLA_CLIENT_MEM_FRACTION and the older name are both set.
  python = 'env | grep MEM_FRACTION | sort > "$ARGS_FILE"\n'
  env = _fake_bin(tmp_path, {"python": python})
  env["ARGS_FILE"] = str(tmp_path / "env")
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    env.pop(name, None)
  if newer_set:
    env["XLA_CLIENT_MEM_FRACTION"] = ".5"
  result = subprocess.run(["bash", "launch/gpu_local.sh", "/w"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  expected = "XLA_CLIENT_MEM_FRACTION=.5" if newer_set else "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
  assert (tmp_path / "env").read_text().split() == [expected]


@pytest.mark.parametrize("script,args", [
    ("gpu_local.sh", ["--config.optim.base_lr=1e-4"]),  # WORKDIR left out
    ("slurm_gpu.sbatch", ["--config=pr_mim_jax/configs/pretrain.py"]),
    ("tpu_pod.sh", ["--config.data.data_dir=gs://b/tfds"]),
    ("gpu_benchmark.sh", ["--config.model.remat=full"]),
    ("gpu_benchmark.sh", ["sweep"]),  # OUT_DIR left out
])
def test_a_flag_in_the_workdir_place_is_refused_before_anything_runs(tmp_path, script, args):
  # Before: the flag became the workdir (a folder named '--config...') and left the run.
  ran = 'touch "$RAN_FILE"\n'
  env = _fake_bin(tmp_path, {"python": ran, "srun": ran, "gcloud": ran})
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", RAN_FILE=str(tmp_path / "ran"))
  result = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2
  assert result.stderr.startswith("usage: ")
  assert f"first, not {args[0]})" in result.stderr
  assert not (tmp_path / "ran").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # no folder made


def test_tpu_pod_copies_its_own_checkout_from_any_directory(tmp_path):
  # Before: it archived the current directory (a home directory, say), not the checkout.
  tar = 'printf "%s\\0" "$PWD" "$@" > "$ARGS_FILE"\n'
  env = _fake_bin(tmp_path, {"gcloud": "exit 0\n", "tar": tar})
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", ARGS_FILE=str(tmp_path / "args"))
  env.pop("REPO", None)
  result = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "gs://b/w"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 0, result.stderr
  cwd, *args = _args(tmp_path / "args")
  archived = args[args.index("-C") + 1] if "-C" in args else cwd
  assert os.path.samefile(archived, ROOT) and args[-1] == "."
