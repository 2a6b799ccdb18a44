r"""End-to-end fine-tuning of a pre-trained encoder (MAE's recipe: layer decay, drop path,
RandAugment, mixup / cutmix, label smoothing, global average pooling).

  python -m pr_mim_jax.main --config=pr_mim_jax/configs/finetune.py:init=workdirs/demo,dataset=shapes \
      --workdir=workdirs/demo_finetune
  python -m pr_mim_jax.main --config=pr_mim_jax/configs/finetune.py:init=gs://bucket/prmim_l,variant=L/16 \
      --workdir=gs://bucket/prmim_l_ft --config.data.data_dir=gs://bucket/tfds

Fields and defaults: pr_mim_jax/configs/classify.py.
"""

from pr_mim_jax.configs import classify

ARGUMENTS = classify.ARGUMENTS


def get_config(arg=None):
  return classify.get_config("finetune", arg)
