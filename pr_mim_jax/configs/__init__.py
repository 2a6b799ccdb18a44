"""The run configs, one module per job (ml_collections, data only).

`--config` takes a file path with big_vision's `:key=value,...` arguments, for example
`--config=pr_mim_jax/configs/pretrain.py:method=pr_mim`. Outside the source tree, the bare
name works too (`--config=pretrain:method=pr_mim`): it resolves to the file of the installed
package. `classify` holds the defaults that `linear_probe` and `finetune` share.
"""

# The configs a run names (`--config=NAME`); `classify` is only shared defaults.
JOBS = ("pretrain", "linear_probe", "finetune", "knn", "study")
