"""The benchmark suite, the same on every backend: the search step of the ``first`` and ``mid``
stages in each program layout, and the retraining step; one markdown table (printed, and beside
the JSON file as ``.md``) and one JSON file.

  python scripts/bench.py                       # batch 128; 8 cells, C=16; DL2 in 20 cells, C=36
  python scripts/bench.py --layers 3 --channels 4 --batch 8 --steps 2 --compile_cache  # CPU smoke
  python scripts/bench.py --cases mid/pieces,retrain --batch 32
  python scripts/bench.py --jobs 8 --compile_cache --variant 'at0 --xla_gpu_autotune_level=0'

Every case runs in a fresh process (an honest cold compile; a crash or a timeout loses that case
only) with an empty persistent compilation cache of its own; ``--compile_cache`` reruns it with
the cache its first run filled (a warm rerun or resume). A case gets at most ``--timeout_s`` and
an equal share of what is left of ``--budget_s`` among the cases left; a case whose share is too
short to start is reported as skipped, one that runs out of time with what it measured so far.
``--jobs N`` runs the cold runs N at a time first (their compile and step times are then
contended), the warm reruns alone after them; ``--variant 'NAME ARG...'`` runs every case again
as ``CASE+NAME`` with those arguments (XLA flags or config overrides): a short loan of an
accelerator measures layouts and options side by side.

Per case: build (the network and its state, placed on the devices as the runs place them),
compile (the update as the runs compile it), the first step, time to the first step (those
three), step (median of ``--steps`` timed steps after the first; for a search step also its
alpha and weight halves apart), images/s (one split's batch per step), memory (the device's
peak where the backend reports it, else the process's peak RSS) and the programs compiled (or
loaded from the cache) in each phase: after the compile only small eager programs should
compile, and no program of the update again (``recompiles``); the compile's seconds of tracing,
lowering and XLA (``--profile_compile``: and its longest activities).
``first``: the prdarts4 start set on every edge; ``mid``: max/avg pool, conv(3,1,[]),
conv(3,1,[1]), conv(5,1,[]), conv(3,2,[]) on every edge; images are random. Depth and width come
from ``--search_config`` and ``--train_config`` (any key can be overridden:
``--search_config.search.dw_form=dense``), or ``--layers`` and ``--channels`` for both.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import gzip
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import monitoring  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prnas_jax import (  # noqa: E402
    cli, data, network, ops, parallel, search_step, space, supernet, train, train_step)
from prnas_jax.config import PROGRAMS  # noqa: E402
from prnas_jax.ops import Conv, Pool  # noqa: E402

STAGES = {
    'first': ops.START_SETS['prdarts4'],
    'mid': (Pool('max', 3), Pool('avg', 3), Conv(3), Conv(3, 1, (1,)), Conv(5), Conv(3, 2)),
}
CASES = tuple(f'{stage}/{programs}' for stage in STAGES for programs in PROGRAMS
              if programs != 'auto') + ('retrain',)
MIN_CASE_S = 20  # a case given less is skipped: starting JAX and building take seconds
MEAN, STD = (0.5,) * 3, (0.25,) * 3

_SEARCH = config_flags.DEFINE_config_file('search_config', str(ROOT / 'configs' / 'dl2.py'),
                                          'Search config of the search-step cases.',
                                          lock_config=True)
_TRAIN = config_flags.DEFINE_config_file('train_config', str(ROOT / 'configs' / 'train_cifar.py'),
                                         'Retraining config of the retrain case.', lock_config=True)
_CASES = flags.DEFINE_list('cases', list(CASES), 'Cases whose names contain one of these words, '
                           f'run in the words\' order; names: {", ".join(CASES)}.')
_LAYERS = flags.DEFINE_integer('layers', 0, 'Cells of every network (0: the configs\').')
_CHANNELS = flags.DEFINE_integer('channels', 0, 'Initial channels of every network (0: the '
                                 'configs\').')
BATCH = flags.DEFINE_integer('batch', 128, 'Batch size (of each split in a search step).',
                              lower_bound=1)
STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps after the first step.', lower_bound=1)
_BUDGET = flags.DEFINE_float('budget_s', 0, 'Seconds for the whole suite (0: no limit).')
_TIMEOUT = flags.DEFINE_float('timeout_s', 600, 'Seconds for one case at most.')
_COMPILE_CACHE = flags.DEFINE_bool('compile_cache', False, 'Rerun every case with the persistent '
                                   'compilation cache its first run filled.')
_JOBS = flags.DEFINE_integer('jobs', 1, 'Cold runs at a time (> 1: all cold runs first, in '
                             'half the budget; then the warm reruns, one at a time).',
                             lower_bound=1)
_VARIANTS = flags.DEFINE_multi_string(
    'variant', [], 'NAME ARG...: every case again as CASE+NAME, its child given the ARGs (XLA '
    'flags, --xla_..., go to XLA_FLAGS, the rest to the child\'s flags); e.g. '
    '--variant "shift --search_config.search.dw_form=shift" --variant "at0 '
    '--xla_gpu_autotune_level=0".')
_PROFILE = flags.DEFINE_bool(
    'profile_compile', False, 'Profile each case\'s compile phase (jax.profiler, no Python '
    'tracer) and keep in its row the activities of the longest summed time (compile_profile).')
_PROFILE_STEPS = flags.DEFINE_integer(
    'profile_steps', 0, 'Profile this many steps after the timed ones and keep in each row the '
    'activities (kernels on an accelerator) of the longest time per step (step_profile) and '
    'each thread\'s time per step (step_profile_threads).', lower_bound=0)
_FLOPS = flags.DEFINE_bool('flops', False, 'Also XLA\'s FLOP count of a step and the FLOP/s.')
_OUT = flags.DEFINE_string('out', 'runs/bench.json', 'The JSON file; the table goes beside it '
                           '(.md).')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run the one case of --cases in this '
                             'process and append its fields to this file as JSON lines.')

_COMPILED = []  # programs compiled or loaded from the persistent cache in this process, in order
_CACHE_HITS = []
_PARTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',  # JAX's compile events -> parts
          '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
          '/jax/core/compile/backend_compile_duration': 'xla'}
_SECONDS = collections.Counter()  # part -> seconds summed over this process's compiles
_RECORDS = []  # the Record of this process, told of every program compiled
PROFILE_TOP = 40  # activities kept of a profiled compile


def _on_duration(event, duration, **kwargs):
  part = _PARTS.get(event)
  if part:
    _SECONDS[part] += duration
  if part == 'xla':
    _COMPILED.append(str(kwargs.get('fun_name', '?')))
    for rec in _RECORDS:
      rec.compiled()


def _on_event(event, **kwargs):
  if event == '/jax/compilation_cache/cache_hits':
    _CACHE_HITS.append(1)


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _memory() -> dict:
  """The device's peak bytes in use where the backend reports them (GPU, TPU), else the
  process's peak RSS, in MiB."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'memory_mib': stats['peak_bytes_in_use'] / 2**20, 'memory_kind': 'device peak',
            'peak_rss_mib': rss}
  return {'memory_mib': rss, 'memory_kind': 'peak RSS', 'peak_rss_mib': rss}


@contextlib.contextmanager
def _profiled(fields: dict, key: str, per: int = 1):
  """Profiles the block (host activities and, on an accelerator, its kernels) and sets
  ``fields[key]`` to the ``PROFILE_TOP`` activities of the longest summed time, each ``[thread,
  name, seconds, count]`` divided by ``per`` (the steps profiled), ``thread`` being its process
  and thread (``/device:GPU:0/Stream #13(...)``, ``/host:CPU/python``), and
  ``fields[key + '_threads']`` to each thread's ``[seconds, count]`` (nested activities count in
  their callers' time too)."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with tempfile.TemporaryDirectory(prefix='prnas_profile_') as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True, profiler_options=options):
      yield
    trace = json.loads(gzip.decompress(next(Path(folder).rglob('perfetto_trace.json.gz'))
                                       .read_bytes()))
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {}
  for event in events:
    if event.get('ph') == 'M' and event.get('name') in ('process_name', 'thread_name'):
      names[event['pid'], event.get('tid')] = re.sub(r'/-?\d+$', '', event['args']['name'])
  seconds, counts = collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') == 'X':
      where = (f'{names.get((event.get("pid"), None), "?")}/'
               f'{names.get((event.get("pid"), event.get("tid")), "?")}')
      seconds[where, event['name']] += event.get('dur', 0) / 1e6 / per
      counts[where, event['name']] += 1 / per
  threads = collections.defaultdict(lambda: [0.0, 0.0])
  for (where, name), t in seconds.items():
    threads[where][0] += t
    threads[where][1] += counts[where, name]
  fields[key] = [[where, name, round(t, 6), round(counts[where, name], 2)]
                 for (where, name), t in seconds.most_common(PROFILE_TOP)]
  fields[f'{key}_threads'] = {where: [round(t, 6), round(n, 2)]
                              for where, (t, n) in sorted(threads.items())}


class Record:
  """The fields of one case, handed to ``report`` at the start of every phase with everything
  measured so far, so that a case killed on the way still says what it measured and where."""
  profile = False  # profile the compile phase (_profiled)
  profile_steps = 0  # steps to profile after the timed ones

  def __init__(self, report, batch: int, dw_form: str, search: bool, **fields):
    """``dw_form``: the config's ('' = the backend's default for a search or training)."""
    t0 = time.perf_counter()
    devices = jax.devices()  # starts the backend
    self.report, self.batch, self.before = report, batch, set()  # programs of build, compile
    self.current, self.lock = None, threading.Lock()  # the phase and the parts when it began
    self.fields = {**fields, 'batch': batch, 'dw_form': dw_form or ops.default_dw_form(search),
                   'backend': jax.default_backend(), 'device': devices[0].device_kind,
                   'devices': len(devices), 'jax': jax.__version__,
                   'xla_flags': os.environ.get('XLA_FLAGS', ''),
                   'backend_s': time.perf_counter() - t0}
    _RECORDS.append(self)

  def update(self, phase: str, **fields) -> None:
    with self.lock:
      self.fields.update(fields, phase=phase, cache_hits=len(_CACHE_HITS), **_memory())
      self.report(dict(self.fields))

  def compiled(self) -> None:
    """Reports the phase's seconds of each part of JAX's compiles so far (``{name}_trace_s``,
    ``_lower_s``, ``_xla_s``: summed over threads), so that a phase killed on the way says
    where its time went; the rest of a compile phase is its programs' first runs."""
    with self.lock:
      if self.current:
        name, start = self.current
        self.fields.update({f'{name}_{part}_s': _SECONDS[part] - start[part]
                            for part in _PARTS.values()})
        self.report(dict(self.fields))

  @contextlib.contextmanager
  def phase(self, name: str):
    """Times the block: ``{name}_s``, ``{name}_cores`` (CPU seconds per second),
    ``{name}_programs`` (programs compiled or loaded) and its compiles' parts (``compiled``)."""
    self.update(name)
    n, t0, cpu0 = len(_COMPILED), time.perf_counter(), _cpu_seconds()
    self.current = name, collections.Counter(_SECONDS)
    profiled = {}
    with (_profiled(profiled, 'compile_profile') if self.profile and name == 'compile'
          else contextlib.nullcontext()):
      yield
    self.compiled()
    self.fields.update(profiled)
    self.current = None
    seconds = time.perf_counter() - t0
    self.before.update(_COMPILED[n:])
    self.fields.update({f'{name}_s': seconds, f'{name}_cores': (_cpu_seconds() - cpu0) / seconds,
                        f'{name}_programs': len(_COMPILED) - n})

  def steps(self, step, state, n: int, more=dict):
    """Runs ``step(state, i) -> state`` for the first step and ``n`` timed steps and reports
    their figures, with the fields ``more()`` returns then, before any profiled steps (which a
    timeout may cut short)."""
    self.update('first step')
    start, times, cpu = len(_COMPILED), [], []
    for i in range(n + 1):
      if i == 1:
        f = self.fields
        self.update('steps', first_step_s=times[0],
                    time_to_first_step_s=f['build_s'] + f['compile_s'] + times[0])
      t0, cpu0 = time.perf_counter(), _cpu_seconds()
      state = jax.block_until_ready(step(state, i))
      times.append(time.perf_counter() - t0)
      cpu.append(_cpu_seconds() - cpu0)
    after = _COMPILED[start:]
    step_s = statistics.median(times[1:])
    counts = {'compiles_after_warmup': len(after),
              'compiled_after_warmup': dict(collections.Counter(after)),
              'recompiles': sum(name in self.before for name in after)}
    self.update('done', step_s=step_s, images_per_s=self.batch / step_s,
                step_cores=sum(cpu[1:]) / sum(times[1:]), **more(),
                **(counts if _COMPILED else {}))  # none if this jax reports no compiles
    if self.profile_steps:
      profiled = {}
      with _profiled(profiled, 'step_profile', self.profile_steps):
        for i in range(self.profile_steps):
          state = jax.block_until_ready(step(state, 1 + i % n))
      self.update('done', **profiled)
    return state


def _random_batches(n: int, batch: int, size: int, classes: int) -> list[dict]:
  rng = np.random.default_rng(0)
  return [parallel.shard_batch({'image': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                                'label': rng.integers(0, classes, batch).astype(np.int32)})
          for _ in range(n)]


def stage_space(stage: str) -> dict:
  """The search space of ``stage``: a name in ``STAGES`` (that set on every edge), or the path
  of a search's ``stages/stage<i>.json`` (the space it left for stage i+1)."""
  if stage in STAGES:
    return space.initial_space(STAGES[stage])
  record = json.loads(Path(stage).read_text())
  return {kind: space.CellSpace.from_json(obj) for kind, obj in record['space'].items()}


def search_case(config, stage: str, batch: int, steps: int, report=lambda fields: None,
                flops: bool = False) -> dict:
  """Times the search step (alpha update + weight update) of ``stage`` (``stage_space``) under
  the search ``config`` (depth, width, layout, depthwise form, remat, optimizers), state and
  batches placed as ``search.Search`` places them; returns the fields."""
  s = config.search
  net_space = stage_space(stage)
  cfg = search_step.StepConfig.from_config(s, 0, MEAN, STD)
  rec = Record(report, batch, case=f'{stage}/{cfg.programs}', stage=stage, programs=cfg.programs,
               layers=s.layers, channels=s.init_channels, dw_form=s.dw_form, search=True,
               remat=s.remat, fuse_edges=s.fuse_edges)
  batches = _random_batches(2 * steps + 2, batch, 32, 10)
  keys = [jax.random.key(i) for i in range(steps + 1)]
  with rec.phase('build'):
    net = supernet.build(net_space, layers=s.layers, channels=s.init_channels,
                         dw_form=s.dw_form, remat=s.remat, fuse_edges=s.fuse_edges)
    k_init, k_alpha = jax.random.split(jax.random.key(config.seed))
    variables = supernet.init_variables(net, k_init, (32, 32, 3))
    alphas = supernet.init_alphas(k_alpha, supernet.alpha_masks(net.edge_ops()))
    state = jax.block_until_ready(parallel.replicate(search_step.create_state(variables, alphas,
                                                                              cfg)))
  with rec.phase('compile'):
    update, _ = search_step.compile_update_step(state, batches[0], net=net, cfg=cfg)

  halves = {True: [], False: []}  # update_alphas -> seconds of each update

  def timed(state, batch, update_alphas, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(update(state, batch, update_alphas, *args))
    halves[bool(update_alphas)].append(time.perf_counter() - t0)
    return out

  def step(state, i):
    return search_step.search_step(timed, state, batches[2 * i], batches[2 * i + 1], True, s.lr,
                                   0.0, keys[i])[0]
  state = rec.steps(step, state, steps, lambda: {
      'alpha_s': statistics.median(halves[True][1:]),
      'weight_s': statistics.median(halves[False][1:])})
  if flops:  # XLA's cost analysis of the whole update before optimisation (equal for every
    # layout), twice: an alpha and a weight update per step
    lowered = search_step.update_step.lower(state, batches[0], *search_step.probe_args(),
                                            net=net, cfg=cfg)
    count = 2 * (lowered.cost_analysis() or {}).get('flops', math.nan)
    rec.update('done', flops=count, flop_per_s=count / rec.fields['step_s'])
  return rec.fields


def train_case(config, batch: int, steps: int, report=lambda fields: None,
               flops: bool = False) -> dict:
  """Times the retraining step of the retraining ``config`` (genotype, depth, width, auxiliary
  head, drop-path), state and batches placed as ``train.Training`` places them; returns the
  fields."""
  m, size = config.model, config.image_size or 32
  rec = Record(report, batch, case='retrain', genotype=config.genotype, layers=m.layers,
               channels=m.init_channels, dw_form=m.dw_form, search=False,
               remat=m.remat, scan_cells=m.scan_cells,
               programs=train_step.program_layout(m.programs, m.scan_cells))
  cfg = train_step.TrainConfig.from_config(config, MEAN, STD,
                                           'imagenet' if m.stem == 'imagenet' else 'cifar')
  classes = data.num_classes(config.data)
  batches = _random_batches(steps + 1, batch, size, classes)
  keys = [jax.random.key(i) for i in range(steps + 1)]
  with rec.phase('build'):
    net = train.build_network(config, classes, (size, size, 3))
    state = jax.block_until_ready(parallel.replicate(train.initial_state(net, cfg, config.seed,
                                                                         (size, size, 3))))
  with rec.phase('compile'):
    step, _ = train_step.compile_train_step(state, batches[0], net=net, cfg=cfg)
  rec.fields['params'] = network.param_count(state.params)
  lr, drop = np.float32(config.lr), np.float32(m.drop_path)
  state = rec.steps(lambda state, i: step(state, batches[i], lr, drop, keys[i])[0], state, steps)
  if flops:  # XLA's cost analysis of the whole step before optimisation (equal for both layouts)
    lowered = train_step.train_step.lower(state, batches[0], lr, drop, keys[0], net=net, cfg=cfg)
    count = (lowered.cost_analysis() or {}).get('flops', math.nan)
    rec.update('done', flops=count, flop_per_s=count / rec.fields['step_s'])
  return rec.fields


def select(words) -> list[str]:
  """The cases whose names contain one of ``words``, in the words' order."""
  chosen = []
  for word in words:
    chosen += [c for c in CASES if word in c and c not in chosen]
  return chosen


def variants(specs) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
  """``--variant`` values ``'NAME ARG...'``: NAME -> (its XLA flags, its other arguments)."""
  out = {}
  for spec in specs:
    name, *args = spec.split()
    if not name.replace('-', '').replace('_', '').isalnum() or name in out:
      sys.exit(f'error: --variant {spec!r}: start it with a new name of letters, digits, - or _')
    out[name] = (tuple(a for a in args if a.startswith('--xla_')),
                 tuple(a for a in args if not a.startswith('--xla_')))
  return out


def with_xla_flags(given: str, new) -> str:
  """``given`` (an XLA_FLAGS value) with the flags ``new`` in place of any of the same name."""
  names = {flag.split('=')[0] for flag in new}
  return ' '.join([*(f for f in given.split() if f.split('=')[0] not in names), *new])


def run_child(case: str, argv, limit: float, cache_dir: Path, result: Path,
              variants: dict | None = None) -> dict:
  """Runs ``case`` (``CASE+NAME``: with the arguments of ``variants[NAME]``, as ``variants``
  returns them) in a fresh process (this script with ``argv``) for at most ``limit``
  seconds with ``cache_dir`` as its persistent compilation cache; its last fields, ``status``
  (ok, timeout, failed), ``error`` and ``wall_s``."""
  case, _, variant = case.partition('+')
  xla, extra = variants[variant] if variant else ((), ())
  env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
         'XLA_FLAGS': with_xla_flags(os.environ.get('XLA_FLAGS', ''), xla)}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, __file__, *argv, *extra, '--cases', case, '--child',
                           str(result)], env=env, capture_output=True, text=True, timeout=limit)
    status = 'ok' if proc.returncode == 0 else 'failed'
    log = proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    status = 'timeout'
    log = ''.join(x.decode(errors='replace') if isinstance(x, bytes) else x or ''
                  for x in (e.stdout, e.stderr))
  row = {'wall_s': time.perf_counter() - t0}
  lines = result.read_text().splitlines() if result.exists() else []
  row.update(json.loads(lines[-1]) if lines else {})
  row['status'] = status
  if status == 'failed':
    row['error'] = error_line(log, proc.returncode)
  return row


def error_line(log: str, returncode: int) -> str:
  """What a failed child's output says went wrong: the message of XLA's last fatal check
  (``F1204 12:27:54.393734 6026 file.cc:703] Check failed: ...``), else the last Python
  error (``module.SomeError: ...``), else its last line."""
  lines = [line.strip() for line in log.splitlines() if line.strip()]
  fatal = [line.split('] ', 1)[-1] for line in lines if re.match(r'F\d{4} ', line)]
  errors = [line for line in lines if re.match(r'[\w.]*(Error|Exception)\b', line)]
  return (fatal or errors or lines or [f'exit status {returncode}'])[-1]


def run_suite(cases, argv, budget_s: float, timeout_s: float, compile_cache: bool,
              workdir: Path, run=run_child, clock=time.perf_counter, jobs: int = 1) -> list[dict]:
  """Runs ``cases`` (each cold, then warm with ``compile_cache``) through ``run`` within
  ``budget_s`` seconds (0: no limit); the rows, skipped runs included. With ``jobs`` > 1 the
  cold runs go first, ``jobs`` at a time, in half the budget (all of it without warm reruns);
  the warm reruns follow one at a time, so that theirs are the step times measured alone."""
  start, rows = clock(), {}
  runs = [(case, cache) for case in cases for cache in ('cold', 'warm')[:1 + compile_cache]]

  def one(n, case, cache, limit):
    row = {'case': case, 'cache': cache}
    left = budget_s - (clock() - start) if budget_s else math.inf
    cold = rows[case, 'cold']['status'] if cache == 'warm' else 'ok'
    if cold != 'ok':
      row.update(status='skipped', reason=f'cold run {cold}')
    elif limit < MIN_CASE_S:
      row.update(status='skipped', reason=f'budget: {max(left, 0):.0f} s left for '
                 f'{n} case{"s" * (n > 1)}')
    else:
      name = f'{case.replace("/", "-")}-{cache}'
      row.update(run(case, argv, limit, workdir / case.replace('/', '-'),
                     workdir / f'{name}.jsonl'))
      row.update(case=case, cache=cache, limit_s=limit)
    rows[case, cache] = row
    print(f'{case} ({cache}): {_status(row)}, {row.get("wall_s", 0):.0f} s', flush=True)

  if jobs > 1:
    waves = math.ceil(len(cases) / jobs)
    limit = min(timeout_s, budget_s / (1 + compile_cache) / waves if budget_s else math.inf)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
      list(pool.map(lambda case: one(len(cases), case, 'cold', limit), cases))
    runs = [r for r in runs if r[1] == 'warm']
  for n, (case, cache) in enumerate(runs):
    cases_left = len({c for c, _ in runs[n:]})
    left = budget_s - (clock() - start) if budget_s else math.inf
    one(cases_left, case, cache, min(timeout_s, left / cases_left))
  return [rows[case, cache] for case in cases for cache in ('cold', 'warm')[:1 + compile_cache]]


def _status(row) -> str:
  text = row['status']
  if text in ('timeout', 'failed') and 'phase' in row:
    text += f' in {row["phase"]}'
  detail = row.get('error') or row.get('reason')
  return f'{text}: {detail[:80]}' if detail else text


def _number(value) -> str:
  if value is None:
    return ''
  if isinstance(value, int):
    return str(value)
  return f'{value:.0f}' if value >= 100 else f'{value:.1f}' if value >= 10 else (
      f'{value:.2f}' if value >= 1 else f'{value:.3f}')


COLUMNS = (('build s', 'build_s'), ('compile s', 'compile_s'), ('first step s', 'first_step_s'),
           ('to first step s', 'time_to_first_step_s'), ('step s', 'step_s'),
           ('alpha s', 'alpha_s'), ('weight s', 'weight_s'),
           ('images/s', 'images_per_s'), ('memory MiB', 'memory_mib'),
           ('compiles after warmup', 'compiles_after_warmup'), ('wall s', 'wall_s'))


def table(rows) -> str:
  """The rows as one markdown table."""
  head = ['case', 'cache', 'status', *(name for name, _ in COLUMNS)]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [row['case'], row['cache'], _status(row),
             *(_number(row.get(key)) for _, key in COLUMNS)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _shrink(section, layers: str, channels: str) -> None:
  if _LAYERS.value:
    section[layers] = _LAYERS.value
  if _CHANNELS.value:
    section[channels] = _CHANNELS.value


def child(case: str, path: Path) -> None:
  cli.use_compile_cache(True)  # as the runs use it, in the folder run_child chose
  Record.profile, Record.profile_steps = _PROFILE.value, _PROFILE_STEPS.value

  def report(fields):
    with open(path, 'a') as f:
      f.write(json.dumps(fields) + '\n')

  if case == 'retrain':
    config = _TRAIN.value
    _shrink(config.model, 'layers', 'init_channels')
    train_case(config, BATCH.value, STEPS.value, report, _FLOPS.value)
  else:
    config = _SEARCH.value
    _shrink(config.search, 'layers', 'init_channels')
    stage, config.search.programs = case.split('/')
    search_case(config, stage, BATCH.value, STEPS.value, report, _FLOPS.value)


def main(argv):
  cases = select(_CASES.value)
  if not cases:
    sys.exit(f'error: --cases {",".join(_CASES.value)} names no case: use words of '
             f'{", ".join(CASES)}')
  if _CHILD.value:
    return child(cases[0], Path(_CHILD.value))
  named = variants(_VARIANTS.value)
  cases = [case + suffix for case in cases for suffix in ('', *(f'+{name}' for name in named))]
  if _JOBS.value > 1:  # processes sharing one accelerator: none may take most of its memory
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='prnas_bench_') as workdir:
    rows = run_suite(cases, sys.argv[1:], _BUDGET.value, _TIMEOUT.value, _COMPILE_CACHE.value,
                     Path(workdir), functools.partial(run_child, variants=named),
                     jobs=_JOBS.value)
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  text = table(rows)
  out.write_text(json.dumps({'command': ' '.join(sys.argv), 'elapsed_s': time.perf_counter() - t0,
                             'budget_s': _BUDGET.value, 'jobs': _JOBS.value,
                             'rows': rows}, indent=1) + '\n')
  out.with_suffix('.md').write_text(text + '\n')
  print(text)
  print(f'{out}, {out.with_suffix(".md")}: {time.perf_counter() - t0:.0f} s')


if __name__ == '__main__':
  cli.prepare_process()  # as the entry points prepare theirs
  app.run(main)
