"""Tests for pr_mim_jax/configs/pretrain.py, config_args, config_validation and the CLI's user errors."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from pr_mim_jax.configs import args as config_args
from pr_mim_jax.configs import classify as classify_config
from pr_mim_jax.configs import knn as knn_config
from pr_mim_jax.configs import pretrain as pretrain_config
from pr_mim_jax.errors import UserError
from pr_mim_jax.training import config_validation

ROOT = pathlib.Path(__file__).resolve().parents[1]


get_config = pretrain_config.get_config


# ----------------------------------------------------------------------------------------
# Defaults.

def test_defaults_match_mae():
  c = get_config()
  assert c.mode == 'pretrain'
  assert c.batch_size == 4096
  assert c.optim.base_lr == pytest.approx(1.5e-4)
  assert c.optim.epochs == 800
  assert c.optim.warmup_epochs == 40
  assert c.optim.weight_decay == pytest.approx(0.05)
  assert (c.optim.b1, c.optim.b2) == (0.9, 0.95)
  assert c.optim.clip_grad_norm == 0
  # The default method is PR-MIM: throw 0.5 of all patches, furthest sampling, progressive.
  assert c.method == 'pr_mim'
  assert c.masking.mask_ratio == 0.75 and c.masking.throw_ratio == 0.5
  assert c.masking.throw_strategy == 'furthest'
  r = c.reconstruction
  assert r.thrown_reconstruction == 'progressive'
  assert (r.num_stages, r.window) == (1, 3)
  assert r.aggregator in ('local_attention', 'interpolate', 'last_block')
  assert c.loss.target == 'norm_pixel' and c.loss.thrown_loss_weight == 1.0
  m = c.model
  assert m.decoder == 'self_attention'
  assert m.variant == 'B/16' and m.image_size == 224
  assert (m.width, m.depth, m.heads) == (0, 0, 0)  # from the variant
  assert (m.decoder_width, m.decoder_depth, m.decoder_heads) == (512, 8, 16)
  assert m.posemb == 'sincos'
  assert m.compute_dtype == 'bfloat16'
  assert c.data.dataset == 'imagenet2012'
  assert c.data.eval_split == 'validation'


@pytest.mark.parametrize('method,throw,strategy,reconstruction', [
    ('mae', 0.0, 'random', 'none'),
    ('partial', 0.5, 'random', 'none'),
    ('pr_mim', 0.5, 'furthest', 'progressive'),
])
@pytest.mark.parametrize('dataset', ['imagenet2012', 'shapes'])
def test_method_argument_expands(method, throw, strategy, reconstruction, dataset):
  c = get_config(f'method={method},dataset={dataset}')
  assert c.method == method
  assert (c.masking.throw_ratio, c.masking.throw_strategy) == (throw, strategy)
  assert c.reconstruction.thrown_reconstruction == reconstruction
  config_validation.validate_pretrain(c, 1)


def test_method_overrides_win_when_consistent():
  c = get_config('method=partial')
  c.masking.throw_strategy = 'furthest'  # partial reconstruction with furthest sampling
  c.masking.throw_ratio = 0.25
  config_validation.validate_pretrain(c, 1)
  c = get_config('method=pr_mim')
  c.masking.throw_strategy = 'running_cell'
  c.reconstruction.aggregator = 'last_block'
  config_validation.validate_pretrain(c, 1)


def test_unknown_method_argument():
  with pytest.raises(UserError, match='method'):
    get_config('method=simmim')


@pytest.mark.parametrize('variant', ['Ti/16', 'S/16', 'B/16', 'L/16', 'H/14'])
def test_every_variant_validates(variant):
  c = get_config(f'variant={variant}')
  assert c.model.variant == variant
  config_validation.validate_pretrain(c, 1)


def test_get_config_none_and_empty_are_defaults():
  assert get_config(None).to_dict() == get_config('').to_dict() == get_config().to_dict()


def test_variant_argument():
  c = get_config('variant=L/16')
  assert c.model.variant == 'L/16'
  assert c.batch_size == 4096
  config_validation.validate_pretrain(c, 1)


def test_shapes_demo_settings():
  """Demo scale (exact sizes are tuning choices; check the properties that matter)."""
  c = get_config('dataset=shapes')
  mae_c = get_config()
  assert c.data.dataset == 'shapes'
  assert c.batch_size == 128
  m = c.model
  assert m.variant == 'Ti/8' and m.image_size == 64
  assert m.image_size == c.data.shapes.image_size
  assert 0 < m.depth < 12
  assert 0 < m.decoder_width < mae_c.model.decoder_width
  assert 0 < m.decoder_depth < mae_c.model.decoder_depth
  assert m.compute_dtype == 'float32'
  assert c.optim.base_lr == pytest.approx(1e-3)
  assert c.optim.epochs == 6 and c.optim.warmup_epochs == 1
  assert c.data.crop_min_scale == 0.5 and mae_c.data.crop_min_scale == 0.2  # MAE's default
  assert c.data.eval_split == 'test'
  assert c.batch_size <= c.data.shapes.train_size
  # The demo keeps MAE's masking and target.
  assert c.masking.mask_ratio == 0.75 and c.loss.target == 'norm_pixel'
  config_validation.validate_pretrain(c, 1)


@pytest.mark.parametrize('arg', ['bogus=1', 'dataset', 'variant=B/16,nope=2'])
def test_get_config_bad_arg(arg):
  with pytest.raises(UserError):
    get_config(arg)


# ----------------------------------------------------------------------------------------
# parse_arg.

def test_parse_arg_types():
  out = config_args.parse_arg('a=3,b=hello,c=true,d=0.25', a=0, b='x', c=False, d=1.0)
  assert isinstance(out, ml_collections.ConfigDict)
  assert out.a == 3 and type(out.a) is int
  assert out.b == 'hello'
  assert out.c is True
  assert out.d == 0.25 and type(out.d) is float
  # Defaults are kept for keys not given; None / '' give all defaults.
  assert config_args.parse_arg('a=5', a=0, b='x').b == 'x'
  assert config_args.parse_arg(None, a=0).a == 0
  assert config_args.parse_arg('', a=0).a == 0
  for text, expected in [('1', True), ('YES', True), ('False', False), ('no', False), ('0', False)]:
    assert config_args.parse_arg(f'c={text}', c=True if not expected else False).c is expected
  # Values may contain '/'.
  assert config_args.parse_arg('v=L/14', v='B/16').v == 'L/14'


@pytest.mark.parametrize('arg,match', [
    ('nope=1', 'nope'),
    ('a=x', 'a'),
    ('a=1.5', 'a'),
    ('c=maybe', 'c'),
    ('a', 'key=value'),
])
def test_parse_arg_errors(arg, match):
  with pytest.raises(UserError, match=match) as e:
    config_args.parse_arg(arg, a=0, c=False)
  assert '\n' not in str(e.value)


def test_parse_arg_unknown_key_lists_known_keys():
  with pytest.raises(UserError) as e:
    config_args.parse_arg('nope=1', alpha=0, beta='x')
  assert 'alpha' in str(e.value) and 'beta' in str(e.value)


# ----------------------------------------------------------------------------------------
# validate_pretrain: every check, each naming its field.

def _set(config, dotted, value):
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _validate_pretrain(overrides):
  """validate_pretrain (8 batch shards) of the default config with `overrides` set."""
  config = get_config()
  for key, value in overrides.items():
    _set(config, key, value)
  config_validation.validate_pretrain(config, 8)


# (overrides, field the message must name). One entry per check in config_validation.py.
INVALID = [
    ({'model.variant': 'X/16'}, 'model.variant'),
    ({'model.variant': 'B'}, 'model.variant'),
    ({'model.image_size': 0}, 'model.image_size'),
    ({'model.image_size': -224}, 'model.image_size'),
    ({'model.image_size': 200}, 'model.image_size'),  # not a multiple of 16
    ({'model.width': -1}, 'model.width'),
    ({'model.depth': -1}, 'model.depth'),
    ({'model.heads': -1}, 'model.heads'),
    ({'model.decoder_width': -8}, 'model.decoder_width'),
    ({'model.decoder_depth': -1}, 'model.decoder_depth'),
    ({'model.decoder_heads': -1}, 'model.decoder_heads'),
    ({'model.width': 100, 'model.heads': 3}, 'model.width'),  # not divisible by heads
    ({'model.decoder_width': 510}, 'model.decoder_width'),  # not divisible by 16 heads
    ({'model.decoder_width': 0}, 'model.decoder_width'),
    ({'model.decoder_heads': 0}, 'decoder_heads'),
    ({'model.width': 18, 'model.heads': 3}, 'model.width'),  # sin-cos needs width % 4
    ({'model.decoder_width': 18, 'model.decoder_heads': 3}, 'model.decoder_width'),
    ({'model.posemb': 'rope'}, 'model.posemb'),
    ({'model.compute_dtype': 'float16'}, 'model.compute_dtype'),
    ({'data.crop_min_scale': 0.0}, 'data.crop_min_scale'),
    ({'data.crop_min_scale': 1.5}, 'data.crop_min_scale'),
    ({'masking.mask_ratio': 1.5}, 'masking.mask_ratio'),
    ({'masking.mask_ratio': 1.0}, 'masking.mask_ratio'),
    ({'masking.mask_ratio': 0.0}, 'masking.mask_ratio'),
    ({'masking.mask_ratio': -0.5}, 'masking.mask_ratio'),
    ({'masking.throw_ratio': 0.75}, 'masking.throw_ratio'),  # == mask_ratio
    ({'masking.throw_ratio': 0.9}, 'masking.throw_ratio'),
    ({'masking.throw_ratio': -0.1}, 'masking.throw_ratio'),
    ({'masking.mask_ratio': 0.999}, 'masking'),  # int(196 * 0.001) = 0 visible
    ({'masking.throw_ratio': 0.749}, 'masking'),  # 49 visible + 147 thrown: 0 decoded
    ({'loss.target': 'sift'}, 'loss.target'),
    ({'model.variant': 'B/7', 'loss.target': 'hog'}, 'loss.target'),  # odd patch: no 2x2 cells
    ({'model.decoder': 'mlp'}, 'model.decoder'),
    ({'method': 'simmim'}, 'method'),
    ({'method': 'mae'}, 'masking.throw_ratio'),  # mae with the default throw 0.5
    ({'masking.throw_ratio': 0.0}, 'masking.throw_ratio'),  # pr_mim needs thrown tokens
    ({'masking.throw_ratio': 0.002}, 'masking.throw_ratio'),  # round(0.39) = 0 thrown
    ({'method': 'partial'}, 'reconstruction.thrown_reconstruction'),  # + progressive
    ({'reconstruction.thrown_reconstruction': 'none'}, 'reconstruction.thrown_reconstruction'),
    ({'reconstruction.thrown_reconstruction': 'magic'}, 'reconstruction.thrown_reconstruction'),
    ({'masking.throw_strategy': 'grid'}, 'masking.throw_strategy'),
    ({'reconstruction.aggregator': 'mlp'}, 'reconstruction.aggregator'),
    ({'reconstruction.window': 2}, 'reconstruction.window'),
    ({'reconstruction.window': 0}, 'reconstruction.window'),
    ({'reconstruction.window': -3}, 'reconstruction.window'),
    ({'reconstruction.num_stages': 0}, 'reconstruction.num_stages'),
    ({'reconstruction.num_stages': 99}, 'reconstruction.num_stages'),  # 98 thrown tokens
    ({'reconstruction.aggregator': 'last_block', 'reconstruction.num_stages': 2},
     'reconstruction.num_stages'),
    ({'reconstruction.key_width': 0}, 'reconstruction.key_width'),
    ({'reconstruction.heads': 0}, 'reconstruction.heads'),
    ({'reconstruction.heads': 3}, 'reconstruction.heads'),  # does not divide 64 or 512
    ({'loss.thrown_loss_weight': -1.0}, 'loss.thrown_loss_weight'),
    ({'optim.base_lr': -1e-4}, 'optim.base_lr'),
    ({'optim.base_lr': 0.0}, 'optim.base_lr'),
    ({'optim.weight_decay': -0.05}, 'optim.weight_decay'),
    ({'optim.b1': 1.0}, 'optim.b1'),
    ({'optim.b1': -0.1}, 'optim.b1'),
    ({'optim.b2': 1.5}, 'optim.b2'),
    ({'optim.epochs': 0.0}, 'optim.epochs'),
    ({'optim.warmup_epochs': 800.0}, 'optim.warmup_epochs'),  # == epochs
    ({'optim.warmup_epochs': 900.0}, 'optim.warmup_epochs'),
    ({'optim.warmup_epochs': -1.0}, 'optim.warmup_epochs'),
    ({'optim.clip_grad_norm': -1.0}, 'optim.clip_grad_norm'),
    ({'optim.base_lr': float('inf')}, 'optim.base_lr'),  # passes > 0, then trains to NaN
    ({'optim.epochs': float('inf')}, 'optim.epochs'),  # int(inf) steps: OverflowError
    ({'optim.warmup_epochs': float('nan')}, 'optim.warmup_epochs'),
    ({'data.backend': 'torch'}, 'data.backend'),
    ({'data.dali_device': 'tpu'}, 'data.dali_device'),
    ({'batch_size': 0}, 'batch_size'),
    ({'batch_size': -8}, 'batch_size'),
    ({'batch_size': 4095}, 'batch_size'),  # not divisible by 8 shards
    ({'train.total_steps': -1}, 'train.total_steps'),
    ({'train.log_every': 0}, 'train.log_every'),
    ({'train.checkpoint_every': 0}, 'train.checkpoint_every'),
    ({'train.keep_checkpoints': 0}, 'train.keep_checkpoints'),
    ({'train.image_every': -1}, 'train.image_every'),
    ({'train.num_images': 0}, 'train.num_images'),
    ({'knn.k': 0}, 'knn.k'),
    ({'knn.train_examples': 0}, 'knn.train_examples'),
    ({'knn.test_examples': 0}, 'knn.test_examples'),
    ({'knn.batch_size': 0}, 'knn.batch_size'),
    ({'knn.k': 6000}, 'knn.k'),  # more neighbours than knn.train_examples (5000)
    ({'knn.every': -1}, 'knn.every'),
    ({'knn.temperature': 0.0}, 'knn.temperature'),
    ({'knn.feature': 'max'}, 'knn.feature'),
    ({'model.remat': 'some'}, 'model.remat'),
    ({'model.scan_layers': None}, 'model.scan_layers'),
    ({'model.attention': 'flash'}, 'model.attention'),
    ({'optim.mu_dtype': 'float16'}, 'optim.mu_dtype'),
    ({'train.profile_steps': -1}, 'train.profile_steps'),
    ({'train.profile_start_step': -3}, 'train.profile_start_step'),
    ({'train.grad_accum_steps': 0}, 'train.grad_accum_steps'),
    ({'train.grad_accum_steps': 3}, 'train.grad_accum_steps'),  # 4096 % (3 * 8 shards)
    ({'mesh.fsdp': 0}, 'config.mesh.fsdp'),
    ({'mesh.tensor': -2}, 'config.mesh.tensor'),
    ({'mesh_dcn.data': -1}, 'config.mesh_dcn.data'),
    ({'mesh_dcn.tensor': 0}, 'config.mesh_dcn.tensor'),
    ({'mesh.fsdp': -1}, 'config.mesh:'),  # data is -1 too
    ({'sharding_rules.embed': 'model'}, 'config.sharding_rules.embed'),
    ({'sharding_rules.heads': 'tensor,tensor'}, 'config.sharding_rules.heads'),
    # It seeds the shuffle, which raised inside tf.data, after the compile, as 4 tracebacks.
    ({'seed': -1}, 'config.seed: got -1; use an integer >= 0'),
]


@pytest.mark.parametrize('overrides,field', INVALID,
                         ids=[f'{f}:{list(o.values())}' for o, f in INVALID])
def test_validate_rejects_with_field_name(overrides, field):
  with pytest.raises(UserError) as e:
    _validate_pretrain(overrides)
  message = str(e.value)
  assert field in message, message
  assert message.startswith('config.'), message
  assert '\n' not in message


# The probe / fine-tune and k-NN checks, on a config as init_run.resolve_config returns it.
INVALID_CLASSIFY = [
    ({'head.pool': 'max'}, "config.head.pool: unknown value 'max'"),
    ({'head.kind': 'mlp'}, "config.head.kind: unknown value 'mlp'"),
    ({'optim.optimizer': 'sgd'}, "config.optim.optimizer: unknown value 'sgd'"),
    ({'optim.optimizer': 'lars'}, 'config.optim.optimizer: fine-tuning trains the whole model'),
    ({'optim.layer_decay': 1.5}, 'config.optim.layer_decay: got 1.5'),
    ({'optim.momentum': 1.0}, 'config.optim.momentum: got 1.0'),
    ({'mixup.prob': 2.0}, 'config.mixup.prob: got 2.0'),
    ({'mixup.cutmix_alpha': -1.0}, 'config.mixup.cutmix_alpha: got -1.0'),
    ({'label_smoothing': 1.0}, 'config.label_smoothing: got 1.0'),
    ({'ema.decay': 1.0}, 'config.ema.decay: got 1.0'),
    ({'data.augment': 'autoaugment'}, "config.data.augment: unknown value 'autoaugment'"),
    ({'eval.batch_size': 0}, 'config.eval.batch_size: got 0'),
    ({'batch_size': 12}, 'config.batch_size: got 12; use a positive multiple of 8, or (resuming '
                         'a run, which keeps its batch_size) devices on the batch axes that divide 12'),
    ({'eval.batch_size': 12}, 'config.eval.batch_size: got 12; use a positive multiple of 8'),
    ({'train.eval_every': -1}, 'config.train.eval_every: got -1'),
    ({'train.keep_checkpoints': 0}, 'config.train.keep_checkpoints: got 0'),
    ({'model.drop_path': 1.0}, 'config.model.drop_path: got 1.0'),
    ({'model.pretrained_image_size': 30}, 'config.init.workdir: the pre-trained image size'),
    # AdamW would weight-decay a frozen encoder that it never trains.
    ({'head.freeze_encoder': True}, 'config.head.freeze_encoder: fine-tuning'),
    ({'data.random_erase': 1.5}, 'config.data.random_erase: got 1.5'),
    ({'data.augment': 'crop_flip'}, 'config.data.random_erase: 0.25 has no effect'),
    ({'data.backend': 'torch'}, "config.data.backend: unknown value 'torch'"),
    ({'seed': -3}, 'config.seed: got -3; use an integer >= 0'),
]

# A probe config (LARS on the head of a frozen encoder) with a field it would ignore.
INVALID_PROBE = [
    ({'head.freeze_encoder': False}, 'config.head.freeze_encoder: linear probing'),
    ({'model.drop_path': 0.1}, 'config.model.drop_path: 0.1 has no effect'),
    ({'optim.layer_decay': 0.75}, 'config.optim.layer_decay: 0.75 has no effect'),
    ({'optim.clip_grad_norm': 1.0}, 'config.optim.clip_grad_norm: 1.0 has no effect'),
    ({'data.random_erase': 0.25}, 'config.data.random_erase: 0.25 has no effect'),
]


def _resolved_config(mode: str):
  """A probe or fine-tune config as init_run.resolve_config leaves it, for a tiny Ti/8."""
  config = classify_config.get_config(mode, 'dataset=shapes')
  config.batch_size = config.eval.batch_size = 64
  config.model = ml_collections.ConfigDict(dict(
      config.model.to_dict(), variant='Ti/8', width=32, depth=2, heads=2, posemb='sincos',
      image_size=32, pretrained_image_size=32))
  return config


def _resolved_finetune_config():
  return _resolved_config('finetune')


def _resolved_probe_config():
  return _resolved_config('linear_probe')


def test_a_resolved_finetune_config_passes():
  config_validation.validate_classify(_resolved_finetune_config(), 8)
  config_validation.validate_classify(_resolved_probe_config(), 8)


CLASSIFY_CASES = ([('probe', o, m) for o, m in INVALID_PROBE] +
                  [('finetune', o, m) for o, m in INVALID_CLASSIFY])


@pytest.mark.parametrize('mode,overrides,message', CLASSIFY_CASES,
                         ids=[f"{mode}-{m.split(':')[0]}" for mode, _, m in CLASSIFY_CASES])
def test_classify_checks_name_the_field(mode, overrides, message):
  """Probe cases include fields the probe would silently ignore."""
  config = _resolved_probe_config() if mode == 'probe' else _resolved_finetune_config()
  for key, value in overrides.items():
    _set(config, key, value)
  with pytest.raises(UserError) as e:
    config_validation.validate_classify(config, 8)
  assert str(e.value).startswith(message), str(e.value)
  assert '\n' not in str(e.value)


def test_linear_probing_must_use_lars():
  config = _resolved_finetune_config()
  config.mode = 'linear_probe'
  with pytest.raises(UserError, match='config.optim.optimizer: linear probing trains the head'):
    config_validation.validate_classify(config, 8)


INVALID_KNN_EVAL = [
    ({'init.workdir': ''}, 'config.init.workdir: k-NN needs a pre-training run'),
    ({'init.step': -2}, 'config.init.step: got -2'),
    ({'knn.k': 0}, 'config.knn.k: got 0'),
    ({'knn.k': 30000}, 'config.knn.k: k=30000 exceeds knn.train_examples'),
    ({'knn.feature': 'max'}, "config.knn.feature: unknown value 'max'"),
    ({'knn.temperature': 0.0}, 'config.knn.temperature: got 0.0'),
    ({'model.compute_dtype': 'half'}, "config.model.compute_dtype: unknown value 'half'"),
    ({'data.backend': 'torch'}, "config.data.backend: unknown value 'torch'"),
]


@pytest.mark.parametrize('overrides,message', INVALID_KNN_EVAL,
                         ids=[m.split(':')[0] + str(i) for i, (_, m) in enumerate(INVALID_KNN_EVAL)])
def test_knn_eval_checks_name_the_field(overrides, message):
  config = knn_config.get_config('init=workdirs/demo,dataset=shapes')
  config_validation.validate_knn_eval(config)  # the defaults pass
  for key, value in overrides.items():
    _set(config, key, value)
  with pytest.raises(UserError) as e:
    config_validation.validate_knn_eval(config)
  assert str(e.value).startswith(message), str(e.value)


def test_encoder_check_of_a_resolved_knn_model():
  """The k-NN model once resolved against its init run: 70 px is not a multiple of 8."""
  model = knn_config.get_config('init=workdirs/demo,dataset=shapes').model
  model.update(variant='Ti/8', width=128, depth=6, heads=4, posemb='sincos', image_size=64)
  config_validation.validate_encoder(model)
  model.image_size = 70
  with pytest.raises(UserError, match='^config.model.image_size: 70 is not divisible by the patch'):
    config_validation.validate_encoder(model)


def test_knn_config_has_only_fields_the_run_reads():
  """k-NN embeds the first N examples of each split in inference: no seed, no drop path."""
  config = knn_config.get_config('init=workdirs/demo,dataset=shapes')
  assert 'seed' not in config and 'drop_path' not in config.model


def test_knn_docs_state_the_configs_protocol_and_default_dataset():
  """docs/evaluation.md's k-NN row and the README's timing row state what knn.py runs (k, the
  temperature, mean pooling; the demo's 20,000 / 2,000 images, ImageNet's 100,000 / 50,000);
  without `dataset=` it scores imagenet2012, the neighbours drawn from the train split."""
  doc = (ROOT / 'docs' / 'evaluation.md').read_text()
  readme = (ROOT / 'README.md').read_text()
  c = knn_config.get_config('init=w')
  assert c.knn.feature == 'mean'
  assert f'k = {c.knn.k}, votes exp(sim / {c.knn.temperature}) (DINO), mean-pooled' in doc
  demo = knn_config.get_config('init=w,dataset=shapes')
  sizes = f'{demo.knn.train_examples:,} train, {demo.knn.test_examples:,} test images'
  assert f'k-NN ({sizes})' in readme
  assert (f'the first {demo.knn.train_examples:,} train / {demo.knn.test_examples:,} test images '
          f'on `shapes`, {c.knn.train_examples:,} train / {c.knn.test_examples:,} validation '
          'images otherwise') in ' '.join(doc.split())
  assert (c.data.dataset, c.data.train_split) == ('imagenet2012', 'train')
  assert demo.data.train_split == 'train'


def test_every_check_is_covered():
  """Each `_require` / `_positive_int` call site field appears in a list of bad values above
  (a guard against new checks being added without a test)."""
  source = (ROOT / 'pr_mim_jax' / 'training' / 'config_validation.py').read_text()
  covered = ({f for _, f in INVALID} | {m.split(':')[0].removeprefix('config.')
                                        for _, m in INVALID_CLASSIFY + INVALID_PROBE + INVALID_KNN_EVAL})
  literal_fields = set()
  for line in source.splitlines():
    for prefix in ('_require(', '_positive_int('):
      if prefix in line and '"' in line.split(prefix, 1)[1]:
        literal = line.split(prefix, 1)[1].split('"')[1]
        if '{' not in literal and ('.' in literal or literal == 'batch_size'):
          literal_fields.add(literal)
  missing = literal_fields - covered
  assert not missing, missing


@pytest.mark.parametrize('arg,shards', [(None, 1), (None, 8), (None, 4096),
                                        ('dataset=shapes', 1), ('dataset=shapes', 8),
                                        ('variant=S/16', 2)])
def test_valid_configs_pass(arg, shards):
  config_validation.validate_pretrain(get_config(arg), shards)


def test_valid_variations_pass():
  c = get_config()
  c.masking.throw_ratio = 0.5  # PR-MIM: share of all patches, below mask_ratio
  c.model.posemb = 'learned'
  c.model.compute_dtype = 'float32'
  c.loss.target = 'pixel'
  c.optim.warmup_epochs = 0.0
  c.optim.clip_grad_norm = 1.0
  c.train.total_steps = 100
  c.knn.every = 0
  c.knn.feature = 'cls'
  c.model.width, c.model.depth, c.model.heads = 256, 2, 4
  config_validation.validate_pretrain(c, 4)


# ----------------------------------------------------------------------------------------
# Command line: user errors exit with code 2 and one `error:` line, no traceback.

def _run_main(*args, extra_env=None):
  env = dict(os.environ)
  env.update(extra_env or {})
  return subprocess.run([sys.executable, '-m', 'pr_mim_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)


def _check_user_error(proc, *names):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:')]
  assert len(errors) == 1, proc.stderr
  assert lines[-1] == errors[0], proc.stderr
  for name in names:
    assert name in errors[0], errors[0]
  return errors[0]


def test_cli_unknown_override(tmp_path):
  proc = _run_main('--config=pr_mim_jax/configs/pretrain.py:dataset=shapes', f'--workdir={tmp_path}/wd',
                   '--config.model.nope=1')
  _check_user_error(proc, 'model.nope')
  assert not (tmp_path / 'wd').exists()


def test_cli_invalid_value_fails_before_compiling(tmp_path):
  proc = _run_main('--config=pr_mim_jax/configs/pretrain.py:dataset=shapes', f'--workdir={tmp_path}/wd',
                   '--config.masking.mask_ratio=1.5', extra_env={'JAX_LOG_COMPILES': '1'})
  _check_user_error(proc, 'masking.mask_ratio')
  assert 'Compiling' not in proc.stderr, proc.stderr
  assert not (tmp_path / 'wd').exists()


@pytest.mark.parametrize('override,field', [
    ('--config.data.backend=torch', 'config.data.backend'),  # was found after the model state
    ('--config.optim.epochs=inf', 'config.optim.epochs'),  # was an OverflowError traceback
])
def test_cli_value_checked_before_the_run_starts(tmp_path, override, field):
  proc = _run_main('--config=pr_mim_jax/configs/pretrain.py:dataset=shapes',
                   f'--workdir={tmp_path}/wd', override)
  _check_user_error(proc, field)
  assert not (tmp_path / 'wd').exists()


def test_cli_bad_config_arg(tmp_path):
  proc = _run_main('--config=pr_mim_jax/configs/pretrain.py:bogus=1', f'--workdir={tmp_path}/wd')
  _check_user_error(proc, 'bogus')
  assert not (tmp_path / 'wd').exists()


def test_cli_missing_workdir():
  proc = _run_main('--config=pr_mim_jax/configs/pretrain.py:dataset=shapes')
  _check_user_error(proc, '--workdir')


# ----------------------------------------------------------------------------------------
# The README's config table.

def _readme_config_rows():
  """(field names, default cell) per row of README.md's pre-training config table.

  A name cell lists backticked names; `.x` is a sibling of the name before it, `_x` swaps
  the last `_part` of it (`decoder_width`, `_depth`), and `a.*` covers every field of `a`."""
  text = (ROOT / 'README.md').read_text()
  table = text.split('| field | default (ImageNet / shapes) | meaning |')[1].split('\n\n')[0]
  rows = []
  for line in table.strip().splitlines()[1:]:
    name_cell, default_cell = [cell.strip() for cell in line.strip('|').split(' | ')[:2]]
    names = []
    for token in name_cell.replace('`', ' ').replace(',', ' ').split():
      if token.startswith('.'):
        token = names[-1].rsplit('.', 1)[0] + token
      elif token.startswith('_'):
        token = names[-1].rsplit('_', 1)[0] + token
      names.append(token)
    rows.append((names, default_cell))
  return rows


def _leaf_fields(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_fields(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def test_readme_config_table_names_every_field_and_only_real_ones():
  documented = [name for names, _ in _readme_config_rows() for name in names]
  fields = set(_leaf_fields(get_config())) - {'mode'}  # mode: set by the config file
  covered = lambda field: any(field == d or (d.endswith('.*') and field.startswith(d[:-1]))
                              for d in documented)
  assert not [f for f in sorted(fields) if not covered(f)], 'README config table lacks these'
  assert not [d for d in documented if not d.endswith('.*') and d not in fields], (
      'README config table names fields that do not exist')


def _readme_value(text):
  text = text.split(' (')[0].strip().strip('`')  # drop "(mae: 0)"-style notes
  return {'True': True, 'False': False, 'None': None, "''": ''}.get(text, text)


def test_readme_config_table_defaults_match_the_configs():
  """Single-field rows whose default is one plain value (or ImageNet / shapes) match."""
  imagenet, shapes = get_config(), get_config('dataset=shapes')
  checked = 0
  for names, cell in _readme_config_rows():
    parts = cell.split(' / ')
    if len(names) != 1 or len(parts) > 2 or ', ' in cell or names[0].endswith('.*'):
      continue
    for config, text in zip((imagenet, shapes), parts if len(parts) == 2 else parts * 2):
      actual = config
      for key in names[0].split('.'):
        actual = actual[key]
      expected = _readme_value(text)
      if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        expected = float(expected)
      assert actual == expected, (names[0], cell, actual)
    checked += 1
  assert checked >= 25, checked  # most rows are plain; a parser gone blind fails here


def test_readme_config_table_multi_field_defaults_match_the_configs():
  """Rows naming several fields: 'a, b / c, d' lists each field's value in order (one value
  stands for all of them, as `0 / 128, 6, 4` for width, depth and heads)."""
  imagenet, shapes = get_config(), get_config('dataset=shapes')
  checked = 0
  for names, cell in _readme_config_rows():
    if len(names) == 1 or any(n.endswith('.*') for n in names):
      continue
    parts = cell.split(' / ')
    for config, text in zip((imagenet, shapes), parts if len(parts) == 2 else parts * 2):
      values = [v.strip() for v in text.split(', ')]
      values = values * len(names) if len(values) == 1 else values
      assert len(values) == len(names), (names, cell)
      for name, value in zip(names, values):
        actual = config
        for key in name.split('.'):
          actual = actual[key]
        expected = _readme_value(value)
        if isinstance(actual, (int, float)) and not isinstance(actual, bool):
          expected = float(expected)
        assert actual == expected, (name, cell, actual)
    checked += 1
  assert checked >= 12, checked


@pytest.mark.parametrize('attention', ['cudnn', 'cudnn_padded'])
def test_cudnn_attention_needs_a_gpu_backend(attention):
  model = ml_collections.ConfigDict(dict(attention=attention))
  config_validation.validate_attention_backend(model, 'gpu')
  with pytest.raises(UserError) as e:
    config_validation.validate_attention_backend(model, 'cpu')
  assert str(e.value) == (f"config.model.attention: {attention!r} needs an NVIDIA GPU, and JAX "
                          "runs on 'cpu' here; use 'xla' or 'einsum'")
  config_validation.validate_attention_backend(ml_collections.ConfigDict(dict(attention='xla')),
                                               'cpu')


@pytest.mark.parametrize('overrides', [
    {'knn.k': 5000},  # every one of the 5000 knn.train_examples is a neighbour
    {'reconstruction.num_stages': 98},  # one thrown token per stage: 196 * 0.5 = 98 thrown
    {'optim.b1': 0.0, 'optim.b2': 0.0},  # no moment averaging: allowed, [0, 1)
    {'data.crop_min_scale': 1.0},  # crops of the whole image
    {'loss.thrown_loss_weight': 0.0},  # thrown tokens reconstructed, not scored
    {'optim.weight_decay': 0.0, 'optim.clip_grad_norm': 0.0},  # both off
    {'train.total_steps': 0, 'knn.every': 0},  # steps from epochs; k-NN only at the end
    {'train.profile_start_step': 0, 'train.profile_steps': 0},  # no trace
    {'optim.mu_dtype': ''},  # the params' float32
    {'model.width': 0, 'model.depth': 0, 'model.heads': 0},  # the variant's sizes
], ids=lambda o: ','.join(o))
def test_the_edges_of_each_allowed_range_and_the_off_values_pass(overrides):
  _validate_pretrain(overrides)


def test_grad_accum_must_divide_each_shards_batch_not_only_the_global_one():
  """16 examples on 8 batch shards are 2 per shard: 2 micro-batches split them, 4 cannot
  (16 % 4 == 0, but a shard's 2 examples are not 4 micro-batches)."""
  config = get_config('dataset=shapes')
  config.batch_size = 16
  config.train.grad_accum_steps = 2
  config_validation.validate_pretrain(config, 8)
  config.train.grad_accum_steps = 4
  with pytest.raises(UserError, match=r'^config\.train\.grad_accum_steps: global batch 16 '):
    config_validation.validate_pretrain(config, 8)


def test_layer_decay_above_1_is_refused_and_1_passes():
  """A factor > 1 would give the early layers larger learning rates than the head."""
  config = _resolved_finetune_config()
  config.optim.layer_decay = 1.0
  config_validation.validate_classify(config, 8)
  config.optim.layer_decay = 1.01
  with pytest.raises(UserError, match=r'^config\.optim\.layer_decay: got 1.01'):
    config_validation.validate_classify(config, 8)


def test_shapes_with_a_named_variant_keeps_its_shape_and_the_demo_scale():
  """README: `dataset=shapes` switches to demo-scale settings, and only the default
  variant becomes the narrow 6-block Ti/8 (width 128): a named one keeps its own shape
  (width/depth/heads 0 = from the variant) at the demo's 64 px, decoder, batch and split."""
  c = get_config('variant=S/16,dataset=shapes')
  demo = get_config('dataset=shapes')
  m = c.model
  assert m.variant == 'S/16'
  assert (m.width, m.depth, m.heads) == (0, 0, 0)  # S/16's own 384 x 12 x 6
  assert m.image_size == 64 == c.data.shapes.image_size
  assert (m.decoder_width, m.decoder_depth, m.decoder_heads) == (64, 2, 4)  # README: 64, 2, 4
  assert m.compute_dtype == 'float32' and m.remat == 'none'
  assert c.batch_size == 128 and c.data.eval_split == 'test'
  for key in ('base_lr', 'epochs', 'warmup_epochs'):
    assert c.optim[key] == demo.optim[key], key
  assert c.data.crop_min_scale == demo.data.crop_min_scale == 0.5
  config_validation.validate_pretrain(c, 1)


def test_parse_arg_keeps_an_equals_sign_inside_a_value():
  """Only the first '=' separates key from value: a workdir may contain '=' itself."""
  out = config_args.parse_arg('init=/runs/lr=1e-3,variant=L/16', init='', variant='')
  assert (out.init, out.variant) == ('/runs/lr=1e-3', 'L/16')


def test_parse_arg_ignores_empty_items():
  """A trailing or doubled comma names nothing: the text's own keys still apply."""
  out = config_args.parse_arg('a=3,,b=y,', a=0, b='x')
  assert (out.a, out.b) == (3, 'y')


def _methods():
  from pr_mim_jax.method import methods  # pylint: disable=g-import-not-at-top
  return methods


@pytest.mark.parametrize('start', ['mae', 'partial', 'pr_mim'])
@pytest.mark.parametrize('method,throw,strategy,reconstruction', [
    ('mae', 0.0, 'random', 'none'),
    ('partial', 0.5, 'random', 'none'),
    ('pr_mim', 0.5, 'furthest', 'progressive'),
])
def test_with_method_sets_every_field_of_the_method(start, method, throw, strategy,
                                                    reconstruction):
  """From any method's config, every field the method implies is switched (DESIGN.md:
  mae throws nothing; partial throws at random, unsupervised; PR-MIM furthest + progressive)
  and the result validates; the config passed in is left as it was."""
  config = get_config(f'method={start}')
  before = config.to_dict()
  c = _methods().with_method(config, method)
  assert c.method == method
  assert (c.masking.throw_ratio, c.masking.throw_strategy) == (throw, strategy)
  assert c.reconstruction.thrown_reconstruction == reconstruction
  config_validation.validate_pretrain(c, 1)
  assert config.to_dict() == before


def test_with_method_takes_an_explicit_throw_ratio_even_zero():
  methods = _methods()
  assert methods.with_method(get_config(), 'pr_mim', 0.25).masking.throw_ratio == 0.25
  assert methods.with_method(get_config(), 'partial', 0.625).masking.throw_ratio == 0.625
  assert methods.with_method(get_config(), 'partial', 0.0).masking.throw_ratio == 0.0


def test_sweep_gives_one_config_per_variant_and_method_with_the_variants_shape():
  """Naming variants drops a narrowed shape (the demo's width 128, 6 blocks, 4 heads):
  each config then has the named variant's own shape."""
  methods = _methods()
  demo = get_config('dataset=shapes')
  configs = methods.sweep(demo, ['mae', 'pr_mim'], ['Ti/8', 'S/8'])
  assert sorted((c.model.variant, c.method) for c in configs) == [
      ('S/8', 'mae'), ('S/8', 'pr_mim'), ('Ti/8', 'mae'), ('Ti/8', 'pr_mim')]
  for c in configs:
    assert (c.model.width, c.model.depth, c.model.heads) == (0, 0, 0)
    assert c.masking.throw_ratio == (0.0 if c.method == 'mae' else 0.5)
    config_validation.validate_pretrain(c, 1)
  assert (demo.model.width, demo.method) == (128, 'pr_mim')  # the input is unchanged


def test_sweep_without_lists_keeps_the_configs_own_method_and_variant():
  methods = _methods()
  config = get_config('method=partial,dataset=shapes')
  (only,) = methods.sweep(config, [], [])
  assert only.to_dict() == config.to_dict()
  assert only is not config
  (c,) = methods.sweep(config, [], ['S/8'])
  assert (c.method, c.model.variant, c.model.width) == ('partial', 'S/8', 0)
  assert [c.method for c in methods.sweep(config, ['mae'], [])] == ['mae']


# ----------------------------------------------------------------------------------------
# The evaluation configs' defaults against MAE's published code and docs/evaluation.md
# (MAE's main_linprobe.py / main_finetune.py, util/lars.py; timm's create_transform and
# Mixup defaults as MAE calls them).

def test_linear_probe_trains_without_the_finetuning_regularisers():
  """MAE's linear probe: RandomResizedCrop (torchvision's scale 0.08-1) + flip, no mixup,
  cutmix, label smoothing or erasing, LARS with momentum 0.9, no drop path or layer decay."""
  c = classify_config.get_config('linear_probe', '')
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing) == (0.0, 0.0, 0.0)
  assert c.data.random_erase == 0.0 and c.data.augment == 'crop_flip'
  assert c.data.crop_min_scale == pytest.approx(0.08)
  assert (c.model.drop_path, c.optim.layer_decay, c.optim.momentum) == (0.0, 1.0, 0.9)
  assert c.optim.clip_grad_norm == 0.0 and c.ema.decay == 0.0
  assert (c.model.image_size, c.data.eval_split) == (224, 'validation')  # random init: MAE's


def test_finetune_augmentation_and_mixing_are_maes():
  """MAE fine-tunes with timm's rand-m9-mstd0.5 (2 ops), crop scale 0.08-1, erasing 0.25,
  mixup 0.8 / cutmix 1.0 applied to every batch (prob 1.0), switching half the time (0.5),
  AdamW b1 0.9, no gradient clipping, no EMA, at 224 px."""
  c = classify_config.get_config('finetune', '')
  assert c.data.randaugment.to_dict() == dict(num_ops=2, magnitude=9, magnitude_std=0.5)
  assert c.data.crop_min_scale == pytest.approx(0.08)
  assert (c.mixup.prob, c.mixup.switch_prob) == (1.0, 0.5)
  assert (c.optim.optimizer, c.optim.b1, c.optim.clip_grad_norm) == ('adamw', 0.9, 0.0)
  assert c.ema.decay == 0.0 and c.head.freeze_encoder is False
  assert (c.model.image_size, c.data.eval_split) == (224, 'validation')


@pytest.mark.parametrize('mode', ['linear_probe', 'finetune'])
def test_eval_configs_share_the_arguments(mode):
  """The per-mode config files are classify's modes with classify's arguments."""
  from pr_mim_jax.configs import finetune, linear_probe  # pylint: disable=g-import-not-at-top
  module = {'linear_probe': linear_probe, 'finetune': finetune}[mode]
  c = module.get_config('init=/runs/pre,variant=L/16,dataset=shapes')
  assert c.mode == mode
  assert (c.init.workdir, c.init.step, c.model.variant, c.data.dataset) == (
      '/runs/pre', -1, 'L/16', 'shapes')
  assert c.head.freeze_encoder is (mode == 'linear_probe')


@pytest.mark.parametrize('name', ['linear_probe', 'finetune', 'knn'])
def test_eval_config_help_lists_the_arguments_it_takes(name):
  """`--help --config=FILE` lists the FILE:key=value arguments that get_config accepts, with
  their defaults (init, dataset; variant for the classifiers), never "takes no arguments"."""
  from pr_mim_jax import cli_help  # pylint: disable=g-import-not-at-top
  text = cli_help.config_file_help('config', str(ROOT / 'pr_mim_jax' / 'configs' / f'{name}.py'))
  assert "init  (default '')" in text and "dataset  (default 'imagenet2012')" in text
  assert ("variant  (default '')" in text) is (name != 'knn')
  assert 'takes no arguments' not in text


def test_demo_eval_recipes_match_docs_evaluation_table():
  """docs/evaluation.md, "Recipes", embedded-dataset column: probe batch 256, 10 epochs (1
  warmup), lr 6.4 (MAE's peak lr kept, see classify.py); fine-tune batch 128, 5 epochs (1),
  base lr 1e-3, layer decay 0.75, drop path 0.1; crop 0.5-1; the rest as at ImageNet."""
  probe = classify_config.get_config('linear_probe', 'dataset=shapes')
  ft = classify_config.get_config('finetune', 'dataset=shapes')
  assert (probe.batch_size, probe.optim.epochs, probe.optim.warmup_epochs) == (256, 10.0, 1.0)
  assert probe.optim.base_lr == pytest.approx(6.4) == pytest.approx(0.1 * 16384 / 256)
  assert (probe.optim.optimizer, probe.optim.weight_decay) == ('lars', 0.0)
  assert (ft.batch_size, ft.optim.epochs, ft.optim.warmup_epochs) == (128, 5.0, 1.0)
  assert (ft.optim.base_lr, ft.optim.layer_decay, ft.model.drop_path) == (1e-3, 0.75, 0.1)
  assert (ft.optim.weight_decay, ft.optim.b1, ft.optim.b2) == (0.05, 0.9, 0.999)
  assert (ft.mixup.mixup_alpha, ft.mixup.cutmix_alpha, ft.label_smoothing) == (0.8, 1.0, 0.1)
  assert (ft.data.augment, ft.data.random_erase) == ('randaugment', 0.25)
  for c in (probe, ft):
    assert c.data.crop_min_scale == 0.5 and c.data.eval_split == 'test'
    assert c.model.image_size == 0  # the pre-training run's resolution
    assert c.model.compute_dtype == 'float32'


def test_knn_defaults_are_the_documented_protocol():
  """README, Evaluation: cosine k-NN, k = 20, votes weighted by exp(sim / 0.07), on
  average-pooled features; ImageNet scores the whole 50,000-image validation split."""
  c = knn_config.get_config('init=/runs/pre')
  assert (c.knn.k, c.knn.temperature, c.knn.feature) == (20, 0.07, 'mean')
  assert (c.data.eval_split, c.knn.test_examples) == ('validation', 50000)
  assert c.model.compute_dtype == 'bfloat16' and c.init.to_dict() == dict(
      workdir='/runs/pre', step=-1)
  demo = knn_config.get_config('init=/runs/pre,dataset=shapes')
  assert (demo.data.eval_split, demo.model.compute_dtype) == ('test', 'float32')
  # The demo scores every image of the embedded dataset's splits.
  assert (demo.knn.train_examples, demo.knn.test_examples) == (
      demo.data.shapes.train_size, demo.data.shapes.test_size) == (20000, 2000)


@pytest.mark.parametrize('setting', ['cpu', 'gpu'])
def test_study_runs_the_demo_model_and_recipes(setting):
  """The study compares all three methods on the pre-training demo's model, with the demo
  fine-tune recipe and the probe's MAE peak lr (pretrain.py / classify.py at shapes)."""
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  c = study_config.get_config(f'setting={setting}')
  assert c.setting == setting
  assert c.methods.split(',') == ['mae', 'partial', 'pr_mim'] and c.seeds == '0'
  demo = get_config('dataset=shapes').model
  for key in ('variant', 'width', 'depth', 'heads', 'decoder_width', 'decoder_depth',
              'decoder_heads'):
    assert c.model[key] == demo[key], key
  assert c.shapes.to_dict() == dict(image_size=64, train_size=20000, test_size=2000)
  ft = classify_config.get_config('finetune', 'dataset=shapes')
  assert (c.finetune.base_lr, c.finetune.layer_decay, c.finetune.drop_path) == (
      ft.optim.base_lr, ft.optim.layer_decay, ft.model.drop_path) == (1e-3, 0.75, 0.1)
  assert c.finetune.batch_size == ft.batch_size == 128
  probe = classify_config.get_config('linear_probe', 'dataset=shapes')
  assert c.linear_probe.base_lr == probe.optim.base_lr == 6.4
  assert c.linear_probe.batch_size == probe.batch_size == 256
  assert (c.pretrain.batch_size, c.pretrain.base_lr) == (128, 1e-3)


def test_study_settings_are_the_documented_ones():
  """docs/evaluation.md: cpu pre-trains 2 epochs, k-NN on 2,000 / 1,000 images, a 2-epoch
  probe, a 1-epoch fine-tune and 500 reconstruction images; gpu 8, 4 and 2 epochs."""
  from pr_mim_jax.configs import study as study_config  # pylint: disable=g-import-not-at-top
  cpu, gpu = study_config.get_config('setting=cpu'), study_config.get_config('setting=gpu')
  assert (cpu.pretrain.epochs, cpu.linear_probe.epochs, cpu.finetune.epochs) == (2.0, 2.0, 1.0)
  assert (cpu.knn.train_examples, cpu.knn.test_examples) == (2000, 1000)
  assert cpu.reconstruction_examples == 500
  assert (gpu.pretrain.epochs, gpu.linear_probe.epochs, gpu.finetune.epochs) == (8.0, 4.0, 2.0)
  for c in (cpu, gpu):  # warmup shorter than training
    for part in (c.pretrain, c.linear_probe, c.finetune):
      assert 0 < part.warmup_epochs < part.epochs
  with pytest.raises(UserError, match='setting'):
    study_config.get_config('setting=tpu')


# Checks whose message another, later check would also match by field name alone: each case
# pins the check that must answer, and the advice it gives.
FIRST_ANSWER = [
    ({'model.image_size': 200}, 'config.model.image_size: 200 is not divisible by the patch size '
                                "16 of variant 'B/16'; use a multiple of 16, e.g. 192"),
    ({'model.image_size': 8}, 'config.model.image_size: 8 is not divisible by the patch size 16 '
                              "of variant 'B/16'; use a multiple of 16, e.g. 16"),
    ({'model.decoder_width': 520}, 'config.model.decoder_width: 520 is not divisible by '
                                   'decoder_heads=16; change model.decoder_width or '
                                   'model.decoder_heads'),
    ({'model.decoder_width': 18, 'model.decoder_heads': 3, 'reconstruction.heads': 1},
     "config.model.decoder_width: the decoder's sin-cos position embeddings need a width "
     'divisible by 4, got 18; use a multiple of 4'),
    ({'masking.throw_ratio': 0.9}, 'config.masking.throw_ratio: 0.9 is outside [0, '
                                   'mask_ratio=0.75); it is a share of ALL patches; use 0 for MAE '
                                   'or e.g. 0.5 with mask_ratio 0.75'),
    ({'method': 'mae', 'reconstruction.thrown_reconstruction': 'none'},
     "config.masking.throw_ratio: method 'mae' decodes every masked token but throw_ratio=0.5; "
     'set it to 0, or use method=partial or method=pr_mim'),
    # 0.001 of 196 patches rounds to none thrown, but a run's config.json would still say 0.001
    ({'method': 'mae', 'reconstruction.thrown_reconstruction': 'none', 'masking.throw_ratio': 1e-3},
     "config.masking.throw_ratio: method 'mae' decodes every masked token but throw_ratio=0.001; "
     'set it to 0, or use method=partial or method=pr_mim'),
    ({'reconstruction.heads': 3, 'reconstruction.key_width': 48},
     'config.reconstruction.heads: 3 heads must divide key_width=48 and '
     'model.decoder_width=512; use e.g. 4'),
    ({'optim.clip_grad_norm': float('inf')}, 'config.optim.clip_grad_norm: got inf; use a '
                                             'finite number'),
    ({'batch_size': 4095}, 'config.batch_size: global batch 4095 is not divisible by the 8 '
                           'devices on the batch axes; use a multiple of 8, or (resuming a run, '
                           'which keeps its batch_size) devices on the batch axes that divide '
                           '4095'),
]


@pytest.mark.parametrize('overrides,message', FIRST_ANSWER,
                         ids=[m.split(':')[0] + str(list(o.values())) for o, m in FIRST_ANSWER])
def test_the_check_that_answers_names_its_field_and_the_fix(overrides, message):
  with pytest.raises(UserError) as e:
    _validate_pretrain(overrides)
  assert str(e.value) == message


@pytest.mark.parametrize('backend', ['cpu', 'tpu'])
def test_cudnn_attention_is_refused_on_every_backend_but_gpu(backend):
  model = ml_collections.ConfigDict(dict(attention='cudnn'))
  with pytest.raises(UserError, match=rf"^config\.model\.attention: .* runs on '{backend}' here"):
    config_validation.validate_attention_backend(model, backend)


def test_a_layer_decay_of_0_is_refused():
  """0 would scale every encoder layer's learning rate to 0: fine-tuning only the head."""
  config = _resolved_finetune_config()
  config.optim.layer_decay = 0.0
  with pytest.raises(UserError, match=r'^config\.optim\.layer_decay: got 0.0; use a factor in'):
    config_validation.validate_classify(config, 8)
