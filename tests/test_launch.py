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
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
  assert f"comes first, not {args[0]}; usage: " in result.stderr
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


def _run(script, args, env, cwd=ROOT):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=60, check=False)


def _one_error_line(result) -> str:
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
  return result.stderr


@pytest.mark.parametrize("script", ["gpu_local.sh", "slurm_gpu.sbatch", "tpu_pod.sh",
                                    "gpu_benchmark.sh"])
@pytest.mark.parametrize("args,says", [
    ([], "missing; usage: "),  # before: bash's "launch/X: line 8: 1: usage: ...", exit 1
    ([""], "missing; usage: "),  # WORKDIR="$UNSET_VARIABLE" passes one empty argument
    (["-h"], "comes first, not -h; usage: ")])
def test_no_workdir_is_one_error_line_and_runs_nothing(tmp_path, script, args, says):
  ran = 'touch "$RAN_FILE"\n'
  env = _fake_bin(tmp_path, {"python": ran, "srun": ran, "gcloud": ran})
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", RAN_FILE=str(tmp_path / "ran"),
             VENV=str(tmp_path))
  (tmp_path / "bin" / "activate").write_text("")
  assert says in _one_error_line(_run(script, args, env, cwd=tmp_path))
  assert not (tmp_path / "ran").exists()


def test_tpu_pod_names_every_missing_variable_at_once(tmp_path):
  # Before: only the first one ("TPU_NAME: set TPU_NAME"), one rerun per variable.
  env = _fake_bin(tmp_path, {"gcloud": 'touch "$RAN_FILE"\n'})
  env["RAN_FILE"] = str(tmp_path / "ran")
  for name in ("TPU_NAME", "ZONE", "PROJECT"):
    env.pop(name, None)
  env["ZONE"] = "z"
  assert "set TPU_NAME PROJECT (" in _one_error_line(_run("tpu_pod.sh", ["gs://b/w"], env))
  assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("workdir", ["/home/me/run", "workdirs/run", "gs://"])
def test_tpu_pod_refuses_a_workdir_the_workers_do_not_share(tmp_path, workdir):
  # Before: every worker of the slice wrote its part of each checkpoint to its own disk.
  env = _fake_bin(tmp_path, {"gcloud": 'touch "$RAN_FILE"\n'})
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", RAN_FILE=str(tmp_path / "ran"))
  err = _one_error_line(_run("tpu_pod.sh", [workdir], env))
  assert f"WORKDIR must be a gs:// path that every worker can write, not {workdir};" in err
  assert ("set SHARED_WORKDIR=1" in err) == workdir.startswith("/")
  assert not (tmp_path / "ran").exists()


def test_tpu_pod_takes_an_absolute_workdir_that_is_said_to_be_shared(tmp_path):
  """A Filestore / NFS mount every worker sees, or a one-host slice: SHARED_WORKDIR=1."""
  env = _fake_bin(tmp_path, {"gcloud": 'echo "gcloud $*" >> "$RAN_FILE"\n'})
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", RAN_FILE=str(tmp_path / "ran"),
             SHARED_WORKDIR="1", REPO="https://example.invalid/pr_mim_jax.git")
  result = _run("tpu_pod.sh", ["/mnt/shared/run"], env)
  assert result.returncode == 0, result.stderr
  assert "--workdir=/mnt/shared/run" in (tmp_path / "ran").read_text()


def test_tpu_pod_ships_the_checkout_without_its_virtual_environments(tmp_path):
  # Before: only a folder named exactly .venv was left out, so the README's .venv-tpu and
  # .venv-gpu (gigabytes) went to every worker; the archive was a fixed /tmp file.
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  (checkout / "launch" / "tpu_pod.sh").write_text((ROOT / "launch" / "tpu_pod.sh").read_text())
  for path in ("pr_mim_jax/main.py", "requirements.txt", ".venv/bin/python",
               ".venv-tpu/lib/libtpu.so", ".venv-gpu/lib/cuda.so", "workdirs/run/log.txt"):
    (checkout / path).parent.mkdir(parents=True, exist_ok=True)
    (checkout / path).write_text("x")
  # The fake gcloud lists the archive it is asked to copy.
  gcloud = ('for a in "$@"; do case "$a" in *.tgz) [ -f "$a" ] && tar tzf "$a" >> "$LIST";; '
            'esac; done\n')
  env = _fake_bin(tmp_path, {"gcloud": gcloud})
  (tmp_path / "tmp").mkdir()
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", LIST=str(tmp_path / "list"),
             TMPDIR=str(tmp_path / "tmp"))
  env.pop("REPO", None)
  result = subprocess.run(["bash", str(checkout / "launch" / "tpu_pod.sh"), "gs://b/w"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 0, result.stderr
  shipped = {p.removeprefix("./").rstrip("/") for p in (tmp_path / "list").read_text().split()}
  assert {"pr_mim_jax/main.py", "requirements.txt", "launch/tpu_pod.sh"} <= shipped
  assert not [p for p in shipped if p.startswith((".venv", "workdirs"))], sorted(shipped)
  assert list((tmp_path / "tmp").iterdir()) == []  # the archive is removed after the copy


def test_slurm_refuses_a_venv_that_is_not_there_before_srun(tmp_path):
  # Before: srun started every node, and each failed on its own ". .venv/bin/activate".
  env = _fake_bin(tmp_path, {"srun": 'touch "$RAN_FILE"\n'})
  env.update(VENV=str(tmp_path / "no_venv"), RAN_FILE=str(tmp_path / "ran"))
  err = _one_error_line(_run("slurm_gpu.sbatch", ["/w"], env, cwd=tmp_path))
  assert f"VENV={tmp_path / 'no_venv'} has no bin/activate" in err
  assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_gpu_local_inside_a_slurm_allocation_runs_one_process(tmp_path):
  """`salloc -n 8` leaves SLURM_NTASKS=8 in the shell; gpu_local.sh is still one process,
  and says so (the script forces nothing: under srun, or with JAX_COORDINATOR_ADDRESS etc.,
  the same command is one process of a job). Before: JAX was asked to auto-detect a cluster
  there and raised a ValueError traceback ("coordinator_address should be defined"). A bad
  config value stops the run right after the distributed start-up, so the test needs no
  training."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}
  env.update(SLURM_JOB_ID="5", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_LOCALID="0",
             SLURM_NNODES="1", JAX_PLATFORMS="cpu",
             CONFIG="pr_mim_jax/configs/pretrain.py:dataset=shapes")
  result = _run("gpu_local.sh", [str(tmp_path / "w"), "--config.train.log_every=0"], env)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.splitlines()[-1].startswith("error: config.train.log_every"), result.stderr
  assert "Traceback" not in result.stderr
  assert "no srun step: running as one process" in result.stderr


def test_tpu_pod_writes_its_archive_to_a_fresh_file_under_tmpdir(tmp_path):
  # Two launches at once (two slices) must not overwrite each other's archive.
  gcloud = ('for a in "$@"; do case "$a" in *.tgz) [ -f "$a" ] && echo "$a" >> "$LIST";; '
            'esac; done\n')
  env = _fake_bin(tmp_path, {"gcloud": gcloud, "tar": 'touch "${2}"\n'})
  (tmp_path / "tmp").mkdir()
  env.update(TPU_NAME="t", ZONE="z", PROJECT="p", LIST=str(tmp_path / "list"),
             TMPDIR=str(tmp_path / "tmp"))
  env.pop("REPO", None)
  for _ in range(2):
    result = _run("tpu_pod.sh", ["gs://b/w"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
  first, second = (tmp_path / "list").read_text().split()
  assert first != second
  assert os.path.dirname(first) == os.path.dirname(second) == str(tmp_path / "tmp")


def _slurm_env(tmp_path, **env):
  srun = 'shift; exec "$@"\n'  # drop --kill-on-bad-exit=1, run the command here
  out = _fake_bin(tmp_path, {"srun": srun, "python": PYTHON})
  out.pop("VENV", None)
  out.update(ARGS_FILE=str(tmp_path / "args"), **env)
  return out


def _venv(path):
  (path / "bin").mkdir(parents=True)
  (path / "bin" / "activate").write_text("")
  return path


@pytest.mark.parametrize("venv_name", ["my venv", "v'1"])
def test_slurm_activates_a_venv_whose_path_has_spaces_or_quotes(tmp_path, venv_name):
  venv = _venv(tmp_path / venv_name)
  env = _slurm_env(tmp_path, VENV=str(venv))
  result = _run("slurm_gpu.sbatch", ["/w"], env)
  assert result.returncode == 0, result.stderr
  assert _args(tmp_path / "args")[3] == "--workdir=/w"


def test_slurm_uses_the_venv_of_the_directory_it_was_submitted_from(tmp_path):
  submit = tmp_path / "checkout"
  _venv(submit / ".venv")
  result = _run("slurm_gpu.sbatch", ["/w"], _slurm_env(tmp_path), cwd=submit)
  assert result.returncode == 0, result.stderr
  assert _args(tmp_path / "args")[:2] == ["-m", "pr_mim_jax.main"]


def test_slurm_refuses_a_venv_folder_without_an_activate_script(tmp_path):
  # VENV at a conda env or at the checkout itself: a folder, but nothing to activate.
  env = _fake_bin(tmp_path, {"srun": 'touch "$RAN_FILE"\n'})
  env.update(VENV=str(tmp_path), RAN_FILE=str(tmp_path / "ran"))
  err = _one_error_line(_run("slurm_gpu.sbatch", ["/w"], env, cwd=tmp_path))
  assert f"VENV={tmp_path} has no bin/activate" in err
  assert "or set VENV to the venv's path on the shared file system" in err
  assert not (tmp_path / "ran").exists()
