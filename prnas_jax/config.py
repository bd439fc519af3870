"""Search and retraining configurations: defaults (the paper's settings) and validation.

Config files in ``configs/`` start from ``search_config()`` or ``train_config()`` and override
fields; every list in ``config.search.stages`` has one entry per stage. Loading a config imports
no JAX: the names it checks against other modules' registries (start sets, morph presets) are
checked where those live (``search.check``). Each step reads its hyper-parameters from a config
in one place: ``search_step.StepConfig.from_config``, ``train_step.TrainConfig.from_config``.
"""
from __future__ import annotations

import math

import ml_collections

from prnas_jax.errors import UserError

# search.programs: docs/design.md, "Program layouts"
PROGRAMS = ('auto', 'pieces', 'edges', 'candidates', 'whole')
ALPHA_PULLBACKS = ('auto', 'inputs', 'full')
STAGE_KEYS = ('epochs', 'grace_epochs', 'keep', 'new', 'add_layers', 'add_width', 'skip_dropout')

# Reference §5.1: the 9-stage schedule of the DL1, DL2, DR and UR searches.
# Tuples, so that a stage list can be overridden: --config.search.stages.keep='(6, 4, 1)'.
PAPER_STAGES = dict(
    epochs=(15, 15, 10, 10, 10, 10, 10, 10, 10),
    grace_epochs=(5, 5, 3, 3, 3, 3, 3, 3, 3),
    keep=(6, 6, 6, 6, 6, 4, 3, 2, 1),
    new=(3, 3, 3, 3, 3, 0, 0, 0, 0),
    add_layers=(0,) * 9,
    add_width=(0,) * 9,
    skip_dropout=(0.0,) * 9,
)


def data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dataset='cifar10',  # cifar10 | cifar100 | folder
      folder='',  # ROOT of ROOT/<split>/<class>/*.jpg|png when dataset='folder'
      tfds_data_dir='',  # '' = the tfds default
      download=True,  # cifar10/100 without a prepared tfds copy: fetch the official archive
      train_portion=0.5,  # first part trains the weights, the rest the alphas
      max_train=0,  # use a class-balanced subset of this many training images (0 = all)
  ))


def search_config() -> ml_collections.ConfigDict:
  """The PR-DARTS search on CIFAR-10 with the darts_like preset (DL1/DL2)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compile_cache = True  # XLA's persistent compilation cache (cli.use_compile_cache)
  c.data = data_config()
  c.search = ml_collections.ConfigDict(dict(
      start='prdarts4',  # prdarts4 | prdarts5 | darts
      preset='darts_like',  # darts_like | r_depth | unrestricted
      layers=8,
      init_channels=16,
      batch_size=128,  # 0 = per stage the largest that fits (autobatch), up to max_batch_size
      max_batch_size=128,
      memory_fraction=0.9,  # of a device's memory that an automatic batch may fill
      stages=ml_collections.ConfigDict(PAPER_STAGES),
      lr=0.025,
      lr_min=0.01,
      momentum=0.9,
      weight_decay=3e-4,
      clip=5.0,
      alpha_lr=6e-4,
      alpha_b1=0.5,
      alpha_b2=0.999,
      alpha_weight_decay=1e-3,
      alpha_clip=5.0,
      cutout=0,
      valid_epochs=5,  # evaluate on the alpha split in the last N epochs of each stage
      morph_tries=250,
      revive_after=200,
      keep_morphable=True,  # pruning spares each edge's best morphable candidate (not last stage)
      reinit_morphed_every_stage=False,  # True: the reference's every-stage re-initialisation
      drop_zero_last=False,  # the reference's --restrict_zero in the last stage
      max_skip_normal=-1,  # P-DARTS skip-connect limit on the final normal cell (-1 = off)
      dw_form='',  # depthwise form: '' = per backend, shift | shift_fused | dense | grouped
      remat=True,  # recompute each cell (each piece) in the backward pass: less memory
      # the pieces and whole layouts: a node's candidates of one spec on its edges side by side
      # (for GPUs, to measure there; on a CPU it steps 4-6x slower: docs/design.md)
      fuse_edges=False,
      programs='auto',  # compiled programs: pieces, edges, candidates, whole, or auto
      # ('edges' on a CPU, else 'pieces')
      alpha_pullback='auto',  # the alpha half's pullbacks: inputs (skip the weight gradients),
      # full (the weight half's programs: one compile less per piece), or auto (per stage)
      checkpoints_kept=2,  # the newest checkpoints kept in WORKDIR/checkpoints
  ))
  c.log_every = 50  # steps between progress lines
  return c


def _check_common(config, section: str, example: str, other: str) -> None:
  """The checks of both kinds of config: ``section`` is there (``other`` says where a config of
  the other kind goes), ``seed`` is an integer >= 0 and every number finite."""
  if section not in config:
    raise UserError(f'the config has no {section} section: pass one like --config {example} '
                    f'({other})')
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise UserError(f'seed = {config.seed!r}: use an integer >= 0')
  for key, value in _leaves(config.to_dict()):
    if any(isinstance(v, float) and not math.isfinite(v)
           for v in (value if isinstance(value, (list, tuple)) else [value])):
      raise UserError(f'{key} = {value}: give a finite number')


def _leaves(tree: dict, prefix: str = ''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def validate(config) -> None:
  """Raises a one-line UserError for the first problem in ``config``."""
  _check_common(config, 'search', 'configs/tiny.py',
                'a retraining config goes to python -m prnas_jax.train')
  s = config.search
  stages = s.stages
  for key in STAGE_KEYS:
    rate = key == 'skip_dropout'
    for i, v in enumerate(stages[key]):
      if isinstance(v, bool) or not isinstance(v, (int, float) if rate else int):
        kind, example = ('a number', '(0.0, 0.1, 0.2)') if rate else ('an integer', '(4, 3, 1)')
        raise UserError(f'search.stages.{key}[{i}] = {v!r} is not {kind}: give a tuple with one '
                        f"entry per stage, e.g. --config.search.stages.{key}='{example}'")
      if v < 0:
        raise UserError(f'search.stages.{key}[{i}] = {v} is negative: use a value >= 0')
  n = len(stages.epochs)
  for key in STAGE_KEYS:
    if len(stages[key]) != n:
      raise UserError(f'search.stages.{key} has {len(stages[key])} entries but '
                      f'search.stages.epochs has {n}: give every list in search.stages one entry '
                      'per stage')
  if n == 0:
    raise UserError('search.stages has no stage: give at least one entry per list')
  for i in range(n):
    if stages.keep[i] < 1:
      raise UserError(f'search.stages.keep[{i}] = 0: keep at least 1 candidate per edge')
    if stages.keep[i] < stages.new[i]:
      raise UserError(f'search.stages.keep[{i}] = {stages.keep[i]} is less than '
                      f'search.stages.new[{i}] = {stages.new[i]}: keep counts the new candidates '
                      'too, so use keep >= new')
    if stages.grace_epochs[i] > stages.epochs[i]:
      raise UserError(f'search.stages.grace_epochs[{i}] exceeds epochs[{i}]: use at most '
                      f'{stages.epochs[i]}')
    if stages.skip_dropout[i] >= 1:
      raise UserError(f'search.stages.skip_dropout[{i}] = {stages.skip_dropout[i]}: use a rate '
                      'in [0, 1)')
  if stages.new[-1]:
    raise UserError('search.stages.new[-1] must be 0: the last stage derives the genotype')
  if s.batch_size < 0 or s.layers < 3 or s.init_channels < 2 or s.init_channels % 2:
    raise UserError('search.batch_size must be >= 0 (0 = the largest that fits), search.layers '
                    '>= 3 and search.init_channels an even number >= 2')
  if not s.batch_size and (s.max_batch_size < 8 or not 0 < s.memory_fraction <= 1):
    raise UserError(f'search.batch_size=0 picks the batch: search.max_batch_size '
                    f'({s.max_batch_size}) must be >= 8 and search.memory_fraction '
                    f'({s.memory_fraction}) in (0, 1]')
  if s.programs not in PROGRAMS:
    raise UserError(f'search.programs = {s.programs!r} is unknown: use one of '
                    f'{", ".join(PROGRAMS)}')
  if s.alpha_pullback not in ALPHA_PULLBACKS:
    raise UserError(f'search.alpha_pullback = {s.alpha_pullback!r} is unknown: use one of '
                    f'{", ".join(ALPHA_PULLBACKS)}')
  if s.checkpoints_kept < 1:
    raise UserError(f'search.checkpoints_kept = {s.checkpoints_kept}: keep at least 1, the run '
                    'resumes from the newest checkpoint')
  if not 0 < config.data.train_portion < 1:
    raise UserError(f'data.train_portion = {config.data.train_portion}: use a value in (0, 1)')
  if config.data.dataset == 'folder' and not config.data.folder:
    raise UserError("data.dataset is 'folder' but data.folder is empty: pass "
                    '--config.data.folder=PATH')


SCHEDULES = ('cosine', 'linear')
TRAIN_PROGRAMS = ('auto', 'whole', 'pieces')  # model.programs: docs/design.md, "Program layouts"


def train_config() -> ml_collections.ConfigDict:
  """Retraining a genotype in the 20-cell CIFAR network (reference §8.1)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.compile_cache = True  # XLA's persistent compilation cache (cli.use_compile_cache)
  c.genotype = 'DL2'  # a registry name or a genotype file (ours or DARTS names)
  c.data = data_config()
  del c.data['train_portion']
  c.model = ml_collections.ConfigDict(dict(
      stem='cifar',  # cifar | imagenet
      layers=20,
      init_channels=36,
      auxiliary=True,
      aux_weight=0.4,
      drop_path=0.3,  # the rate ramps linearly from 0 to this over training
      dw_form='',  # depthwise form: '' = per backend, shift | shift_fused | dense | grouped
      remat=False,  # recompute cell activations in the backward pass: less memory, more time
      scan_cells=False,  # each run of like cells as one lax.scan: a shorter compile, slower step
      programs='auto',  # whole | pieces (stem, cells, heads compiled apart) | auto (per backend)
  ))
  c.epochs = 600  # 0 = build the network, print its parameter count, exit
  c.batch_size = 128
  c.test_batch_size = 500
  c.schedule = 'cosine'  # cosine (to lr_min) | linear (ImageNet: linear decay, 5-epoch tail)
  c.lr = 0.025
  c.lr_min = 0.0
  c.warmup_epochs = 0
  c.momentum = 0.9
  c.weight_decay = 3e-4
  c.clip = 5.0
  c.label_smoothing = 0.0
  c.cutout = 16
  c.image_size = 0  # ImageNet: the training crop (0 = the data's size)
  c.checkpoints_kept = 2
  c.log_every = 50  # steps between progress lines
  return c


def validate_train(config) -> None:
  """Raises a one-line UserError for the first problem in a retraining ``config``."""
  _check_common(config, 'model', 'configs/train_cifar.py',
                'a search config goes to python -m prnas_jax.search')
  m = config.model
  if m.stem not in ('cifar', 'imagenet'):
    raise UserError(f"model.stem {m.stem!r} is unknown: use 'cifar' or 'imagenet'")
  if config.schedule not in SCHEDULES:
    raise UserError(f'schedule {config.schedule!r} is unknown: use one of {", ".join(SCHEDULES)}')
  if config.epochs < 0 or config.batch_size < 1 or config.test_batch_size < 1:
    raise UserError('epochs must be >= 0 and batch_size, test_batch_size >= 1')
  if m.layers < 3 or m.init_channels < 2 or m.init_channels % 2:
    raise UserError(f'model.layers = {m.layers}, model.init_channels = {m.init_channels}: use '
                    'at least 3 layers and an even channel count >= 2')
  if m.programs not in TRAIN_PROGRAMS:
    raise UserError(f'model.programs = {m.programs!r} is unknown: use one of '
                    f'{", ".join(TRAIN_PROGRAMS)}')
  if m.programs == 'pieces' and m.scan_cells:
    raise UserError('model.programs=pieces and model.scan_cells=true exclude each other (the '
                    'pieces compile each cell apart): pass one of them')
  if not 0 <= m.drop_path < 1:
    raise UserError(f'model.drop_path = {m.drop_path}: use a rate in [0, 1)')
  if config.checkpoints_kept < 1:
    raise UserError('checkpoints_kept must be >= 1: the run resumes from the newest one')
  if config.data.dataset == 'folder' and not config.data.folder:
    raise UserError("data.dataset is 'folder' but data.folder is empty: pass "
                    '--config.data.folder=PATH')
