"""The stage loop: config validation, pruning/morphing across a stage, derivation, and a tiny
search end to end on the real CIFAR-10 copy."""
import ctypes
import gc
import json
import os
import resource
import runpy
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest

from prnas_jax import config as config_lib
from prnas_jax import checkpoint, cli, genotype, loop, metrics, search, search_step, space
from prnas_jax.errors import UserError
from prnas_jax.ops import Conv, Pool, Skip

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
  return runpy.run_path(str(ROOT / 'configs' / f'{name}.py'))['get_config']()


@pytest.mark.parametrize('name', ['dl1', 'dl2', 'dr', 'ur', 'darts', 'pdarts', 'tiny'])
def test_configs_are_valid(name):
  config = _load(name)
  config_lib.validate(config)
  assert len(config.search.stages.epochs) == {'darts': 1, 'pdarts': 3, 'tiny': 3}.get(name, 9)


def test_paper_configs():
  dl1, dl2, dr, ur = (_load(n) for n in ('dl1', 'dl2', 'dr', 'ur'))
  assert dl1.seed != dl2.seed
  assert [c.search.preset for c in (dl1, dr, ur)] == ['darts_like', 'r_depth', 'unrestricted']
  st = dl2.search.stages
  assert sum(st.epochs) == 100 and sum(st.grace_epochs) == 31
  assert list(st.keep) == [6, 6, 6, 6, 6, 4, 3, 2, 1] and list(st.new) == [3] * 5 + [0] * 4
  assert dl2.search.batch_size == 128 and dl2.search.start == 'prdarts4'
  pd = _load('pdarts')
  assert [pd.search.layers + a for a in pd.search.stages.add_layers] == [5, 11, 17]
  assert list(pd.search.stages.keep) == [5, 3, 1] and pd.search.max_skip_normal == 2


def _bad(mutate):
  config = _load('tiny')
  with config.unlocked():
    mutate(config)
  with pytest.raises(UserError) as info:
    search.check(config)
  assert '\n' not in str(info.value)
  return str(info.value)


def test_validation_names_the_key_and_the_fix():
  assert 'search.stages.keep has 2 entries but search.stages.epochs has 3' in _bad(
      lambda c: setattr(c.search.stages, 'keep', (4, 1)))
  assert 'keep[0] = 1 is less than search.stages.new[0] = 2' in _bad(
      lambda c: setattr(c.search.stages, 'keep', (1, 3, 1)))
  assert 'search.stages.epochs[1] = -2 is negative' in _bad(
      lambda c: setattr(c.search.stages, 'epochs', (2, -2, 2)))
  assert "unknown start set 'prdarts6'" in _bad(lambda c: setattr(c.search, 'start', 'prdarts6'))
  assert "unknown morph preset 'dartslike'" in _bad(
      lambda c: setattr(c.search, 'preset', 'dartslike'))
  assert 'new[-1] must be 0' in _bad(lambda c: setattr(c.search.stages, 'new', (2, 1, 1)))
  assert '--config.data.folder=PATH' in _bad(lambda c: setattr(c.data, 'dataset', 'folder'))


def _cli(*overrides):
  cmd = [sys.executable, '-m', 'prnas_jax.search', '--config', 'configs/tiny.py',
         '--workdir', '/nonexistent/run', *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_overrides_are_one_line():
  out = _cli('--config.search.lyers=3')
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      'error: unknown config key \'lyers\' in --config.search.lyers=3: did you mean layers?')
  assert 'Traceback' not in out.stderr
  out = _cli('--config.search.stages.keep=(4, 1)')  # stage lists are tuples: overridable
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(
      'error: search.stages.keep has 2 entries but')


def _probs(sp, values):
  """Hand-made end-of-stage probabilities: ``values[col]`` on every edge, renormalised."""
  out = {}
  for kind, cell in sp.items():
    out[kind] = []
    for e in range(cell.num_edges):
      cols = cell.active(e)
      p = np.array([values[c] for c in cols], float)
      out[kind].append(dict(zip(cols, p / p.sum())))
  return out


def test_prune_and_replace_a_stage():
  config = _load('tiny')
  sp = space.initial_space('prdarts4')
  probs = _probs(sp, [0.4, 0.1, 0.3, 0.2])  # max-pool, avg-pool, skip, conv
  events = space.prune_and_replace(sp, probs, config.search, 0, np.random.default_rng(0))
  for kind, cell in sp.items():
    ev = events[kind]
    assert ev['failed_morphs'] == 0
    assert ev['pruned'] == [['pool(avg,3)', 'skip']] * 14  # keep 4 - new 2: max-pool and conv stay
    assert len(ev['created']) == 28
    assert all(c['parent'] == 'conv(k=3,d=1,mul=[])' for c in ev['created'])
    assert all(c['parent_prob'] == pytest.approx(0.2 / 0.6) for c in ev['created'])
    for e in range(14):
      specs = [cell.candidates[c] for c in cell.active(e)]
      assert specs[:2] == [Pool('max', 3), Conv(3)] and len(specs) == 4
      assert set(specs[2:]) <= {Conv(5), Conv(3, 2), Conv(3, 1, (1,))}
      assert set(cell.pending[e]) == set(cell.active(e)[2:])
  # the last stage keeps exactly the most probable candidate, morphable or not
  last = space.prune_and_replace(sp, _probs(sp, [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
                                 config.search, 2, np.random.default_rng(0))
  assert all(sp['normal'].active(e) == [0] for e in range(14))
  assert last['normal']['created'] == []


def test_derive_on_hand_made_probabilities():
  sp = space.initial_space('prdarts4')
  probs = {kind: [] for kind in sp}
  # node i: the edge from input i+1 is strongest (conv), then input 0 (skip), others flat
  for kind in sp:
    for node, j in space.edge_inputs():
      if j == node + 1:
        p = [0.1, 0.1, 0.1, 0.7]
      elif j == 0:
        p = [0.1, 0.1, 0.6, 0.2]
      else:
        p = [0.25, 0.25, 0.25, 0.25]
      probs[kind].append(dict(enumerate(p)))
  geno = space.derive(sp, probs, max_skip_normal=-1)
  expected = tuple(e for i in range(4) for e in ((Skip(), 0), (Conv(3), i + 1)))
  assert geno.normal == expected and geno.reduce == expected
  assert geno.normal_concat == (2, 3, 4, 5)
  limited = space.derive(sp, probs, max_skip_normal=1)
  assert sum(isinstance(s, Skip) for s, _ in limited.normal) == 1
  assert limited.reduce == expected


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope='module')
def tiny_runs(cifar_subset, tmp_path_factory):
  """The tiny config searched once (fully optimised XLA), with the process's memory mappings
  before and after each stage's ``release_programs``. That the same seed gives the same search
  is checked in test_resume.py (an uninterrupted and a killed-and-resumed run)."""
  release, releases = search_step.release_programs, []

  def counted():
    before = _memory_mappings()
    release()
    releases.append((before, _memory_mappings()))
  jax.config.update('jax_disable_most_optimizations', False)
  search_step.release_programs = counted
  try:
    workdir = tmp_path_factory.mktemp('run')
    config = _load('tiny')
    with config.unlocked():
      config.data.dataset, config.data.folder = 'folder', str(cifar_subset)
      config.data.max_train = 1000  # 15 steps of 32 per epoch: CI time
    return [(search.run(config, workdir), workdir, releases)]
  finally:
    search_step.release_programs = release
    jax.config.update('jax_disable_most_optimizations', True)


MAPS = Path('/proc/self/maps')


def _memory_mappings() -> int | None:
  """The memory mappings this process holds (Linux), else None."""
  return len(MAPS.read_text().splitlines()) if MAPS.exists() else None


def test_tiny_search_end_to_end(tiny_runs):
  geno, workdir, _ = tiny_runs[0]
  for kind in ('normal', 'reduce'):
    entries = getattr(geno, kind)
    assert len(entries) == 8
    for node in range(4):
      (_, a), (_, b) = entries[2 * node:2 * node + 2]
      assert a < b < node + 2  # two distinct inputs per node
  assert genotype.load(workdir / 'genotype.json') == geno
  for name in ('config.json', 'log.txt', 'scalars.jsonl', 'stages/stage0.json',
               'stages/stage2.json'):
    assert (workdir / name).is_file(), name
  assert list((workdir / 'tb').iterdir())


@pytest.mark.skipif(not MAPS.exists(), reason='needs Linux /proc')
def test_each_stage_frees_its_programs(tiny_runs):
  """A stage's compiled programs are freed as it ends, so that the memory mappings their
  XLA:CPU executables hold (65,530 per process on Linux) do not pile up over the stages (the
  tiny search held 2,900, 10,600 and 22,500 at its stages' ends without this)."""
  releases = tiny_runs[0][2]
  assert len(releases) == 3
  (_, first), *_, (last_before, last) = releases
  assert last - first < (last_before - last) / 10, releases


def test_tiny_search_draws_its_pictures(tiny_runs, check_picture):
  workdir = tiny_runs[0][1]
  check_picture(workdir / 'report.png', min_size=(1200, 900))
  check_picture(workdir / 'pool.png', min_size=(600, 600))
  for cell in ('normal', 'reduce'):
    check_picture(workdir / f'cell_{cell}.png', min_size=(800, 300))


def test_tiny_search_learns(tiny_runs):
  records = metrics.read_scalars(tiny_runs[0][1])
  valid = [r['valid/accuracy'] for r in records if 'valid/accuracy' in r]
  assert len(valid) == 3
  assert max(valid) > 0.18  # ten classes, 500 validation images: chance is 0.10 +- 0.013


def test_tiny_search_stage_records(tiny_runs):
  workdir = tiny_runs[0][1]
  stage0 = json.loads((workdir / 'stages' / 'stage0.json').read_text())
  for kind in ('normal', 'reduce'):
    assert len(stage0['probs'][kind]) == 14
    assert all(abs(sum(e.values()) - 1) < 1e-5 for e in stage0['probs'][kind])
    created = stage0['events'][kind]['created']
    assert len(created) + stage0['events'][kind]['failed_morphs'] == 28
    cell = space.CellSpace.from_json(stage0['space'][kind])
    assert all(len(cell.active(e)) == 4 for e in range(14))
  stage1 = json.loads((workdir / 'stages' / 'stage1.json').read_text())
  # stage 1 trained exactly the pool that stage 0 left behind
  cell = space.CellSpace.from_json(stage0['space']['normal'])
  assert [sorted(e) for e in stage1['probs']['normal']] == [
      sorted(str(cell.candidates[c]) for c in cell.active(e)) for e in range(14)]
  records = metrics.read_scalars(workdir)
  compiles = [r['stage/compile_s'] for r in records if 'stage/compile_s' in r]
  assert len(compiles) == 3


def test_a_workdir_of_another_run_is_refused(tmp_path):
  """A start that stops before its first checkpoint leaves nothing that binds the workdir; a run
  with a checkpoint refuses another config unless ``overwrite``, which removes nothing before
  every check has passed."""
  config = _load('tiny')  # cifar10, neither prepared nor downloaded here: a run stops at the data
  config.data.download = False
  with pytest.raises(UserError, match='cifar10 has no prepared tfds copy'):
    search.run(config, tmp_path)
  other = _load('tiny')
  other.search.batch_size, other.data.download = 16, False
  with pytest.raises(UserError, match='cifar10 has no prepared tfds copy'):  # not yet a run: not refused
    search.run(other, tmp_path)
  assert not (tmp_path / 'config.json').exists()
  (tmp_path / 'scalars.jsonl').write_text('{"step": 0}\n')  # left by a start killed early
  cli.claim_workdir(tmp_path, other, False, search.OUTPUTS)
  assert not (tmp_path / 'scalars.jsonl').exists()
  checkpoints = checkpoint.Checkpoints(tmp_path / 'checkpoints', 2, cli.plain(config))
  checkpoints.save(0, {'x': np.zeros(1, np.float32)}, {})
  checkpoints.close()
  cli.check_claim(tmp_path, config, False)  # config.json of another config: the record decides
  cli.claim_workdir(tmp_path, config, False, search.OUTPUTS)
  assert json.loads((tmp_path / 'config.json').read_text()) == cli.plain(config)
  with pytest.raises(UserError) as info:
    search.run(other, tmp_path)
  assert str(info.value) == (f'{tmp_path} holds a different run (the config its checkpoints '
                             'record differs in search.batch_size): use a new --workdir, or pass '
                             '--overwrite to replace it')
  with pytest.raises(UserError, match='cifar10 has no prepared tfds copy'):
    search.run(other, tmp_path, overwrite=True)
  assert (tmp_path / 'checkpoints' / '0').is_dir()  # nothing removed


def test_compile_cache_goes_to_the_user_cache(tmp_path, monkeypatch):
  """Entry points turn on XLA's persistent cache under the user cache folder, unless it is off
  or JAX_COMPILATION_CACHE_DIR chose another folder."""
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    cli.use_compile_cache(False)
    assert jax.config.jax_compilation_cache_dir is None
    cli.use_compile_cache(True)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'prnas_jax' / 'xla')
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0  # small programs too
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'elsewhere'))
    cli.use_compile_cache(True)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'elsewhere')
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])


@pytest.mark.skipif(not cli.keep_freed_memory(), reason='not glibc')
def test_freed_memory_is_reused_without_page_faults():
  """After ``cli.keep_freed_memory`` (the suite's processes call it, as the entry points do) a
  freed 64 MiB block comes back for the next allocation already faulted in; by default glibc
  maps each such block afresh, 16,384 page faults every time."""
  libc, size = ctypes.CDLL(None), 64 * 2**20
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]

  def faults_to_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

  faults_to_fill()
  assert faults_to_fill() < 1000


def test_entry_points_set_the_xla_flags(monkeypatch):
  """``cli.set_xla_flags`` adds the flags measured for a jaxlib release to XLA_FLAGS once; a
  user's own value of a flag stays, and a release a flag was not measured with does not get it
  (XLA aborts on a flag it does not know). The suite runs with them, as users do."""
  cpu, gpu = '--xla_cpu_use_fusion_emitters=false', '--xla_gpu_enable_triton_gemm=false'
  monkeypatch.setattr(cli.importlib.metadata, 'version', lambda name: '0.10.2')
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  cli.set_xla_flags(env)
  cli.set_xla_flags(env)
  assert env == {'XLA_FLAGS': f'--xla_force_host_platform_device_count=8 {cpu} {gpu}'}
  mine = {'XLA_FLAGS': '--xla_cpu_use_fusion_emitters=true'}
  cli.set_xla_flags(mine)
  assert mine == {'XLA_FLAGS': f'--xla_cpu_use_fusion_emitters=true {gpu}'}
  unset = {}
  cli.set_xla_flags(unset)
  assert unset == {'XLA_FLAGS': f'{cpu} {gpu}'}
  monkeypatch.setattr(cli.importlib.metadata, 'version', lambda name: '0.11.2')
  gpu_machine = {}
  cli.set_xla_flags(gpu_machine)
  assert gpu_machine == {'XLA_FLAGS': gpu}
  monkeypatch.setattr(cli.importlib.metadata, 'version', lambda name: '0.12.0')
  other = {}
  cli.set_xla_flags(other)
  assert other == {}
  assert {cpu, gpu} <= set(os.environ['XLA_FLAGS'].split())


def test_a_frozen_heap_spares_what_lived_before_until_exit_even_on_error():
  class Node:
    pass
  node = Node()
  node.self = node  # a cycle: only the cycle collector frees it
  alive = weakref.ref(node)
  with pytest.raises(ValueError):
    with loop.frozen_heap():
      del node
      gc.collect()
      assert alive() is not None  # frozen on entry: not collected
      raise ValueError
  assert gc.get_freeze_count() == 0
  gc.collect()
  assert alive() is None
