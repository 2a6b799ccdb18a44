r"""Linear probing of a pre-trained encoder (MAE's recipe: frozen encoder, BN + linear, LARS).

  python -m pr_mim_jax.main --config=pr_mim_jax/configs/linear_probe.py:init=workdirs/demo,dataset=shapes \
      --workdir=workdirs/demo_probe
  python -m pr_mim_jax.main --config=pr_mim_jax/configs/linear_probe.py:init=gs://bucket/prmim_b \
      --workdir=gs://bucket/prmim_b_probe --config.data.data_dir=gs://bucket/tfds

Fields and defaults: pr_mim_jax/configs/classify.py.
"""

from pr_mim_jax.configs import classify

ARGUMENTS = classify.ARGUMENTS


def get_config(arg=None):
  return classify.get_config("linear_probe", arg)
