r"""k-NN accuracy of any pre-training checkpoint's encoder (the DINO-style protocol).

  python -m pr_mim_jax.main --config=pr_mim_jax/configs/knn.py:init=workdirs/demo,dataset=shapes \
      --workdir=workdirs/demo_knn [--config.init.step=500]

Cosine similarity on average-pooled (or cls) features, k = 20 neighbours weighted by
exp(sim / 0.07). The architecture comes from the pre-training run's config.json.
"""

import ml_collections

from pr_mim_jax.configs import args as config_args


ARGUMENTS = dict(init="", dataset="imagenet2012")  # FILE:key=value,...

def get_config(arg=None):
  arg = config_args.parse_arg(arg, **ARGUMENTS)
  demo = arg.dataset == "shapes"
  c = ml_collections.ConfigDict()
  c.mode = "knn"  # no seed: the first N examples of each split, no randomness
  c.compilation_cache_dir = ""
  c.init = ml_collections.ConfigDict(dict(workdir=arg.init, step=-1))  # -1 = latest
  # '' / 0: from the pre-training run's config.json.
  c.model = ml_collections.ConfigDict(dict(
      variant="", width=0, depth=0, heads=0, posemb="", image_size=0,
      compute_dtype="float32" if demo else "bfloat16"))  # inference: no drop path
  c.knn = ml_collections.ConfigDict(dict(
      k=20, temperature=0.07, feature="mean",  # 'mean' | 'cls'
      train_examples=20000 if demo else 100000, test_examples=2000 if demo else 50000,
      batch_size=256))
  c.data = ml_collections.ConfigDict(dict(
      dataset=arg.dataset, train_split="train", eval_split="test" if demo else "validation",
      data_dir=ml_collections.FieldReference(None, field_type=str),
      shapes=dict(image_size=64, train_size=20000, test_size=2000, seed=0,
                  difficulty="hard"),  # 'hard' | 'easy' (sanity check; shapes.py)
      num_parallel_calls=-1, backend="auto", dali_device="gpu",
      tune_malloc=True))  # keep freed host buffers mapped (data/host_memory.py)
  return c
