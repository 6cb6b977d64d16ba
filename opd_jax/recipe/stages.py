"""The mini-world recipe as a chain of cached stages (configs/opd.py).

    pretrain  →  teacher_<task> (one per task)  →  opd
             ↘  multitask_rl, cascade_rl (the baselines)
    all of them  →  report

Each stage runs the same trainer a stage config under configs/mini/ runs alone, in its own
directory WORKDIR/<stage>/, and ends by writing WORKDIR/<stage>/stage.json (its key, the
artifact it produced — a path relative to WORKDIR, so a copied workdir uses its own files — and
its training seconds). A stage whose stage.json carries the current key and whose artifact is
intact (`artifacts.verify`) is cached and skipped; a missing or corrupt artifact re-runs the
stage. The key hashes the stage's config section, the run seed and the keys of the stages it
depends on, so changing a teacher's settings re-runs that teacher, the student and the report,
and nothing else. An interrupted stage (a kill, SIGTERM, a crash) resumes from its checkpoints
when the command runs again with the same settings.

The OPD student and the two baselines are evaluated during training by a `Probe` (off the
clock) for the reward-vs-wall-clock plot; the report evaluates every model on the held-out
prompts and writes report.json / report.md / PNGs (`opd_jax.recipe.report`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import ml_collections

from opd_jax.errors import ConfigError, InputError
from opd_jax.mini_world import artifacts

STAGE_FILE = 'stage.json'
KEY_FILE = 'stage_key'


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  deps: tuple[str, ...]
  run: Callable[['Recipe', str], dict]   # (recipe, stage dir) → result dict (JSON-able); an
                                         # 'artifact' entry is an absolute path in WORKDIR
  # Dotted config fields outside the stage's section that also shape its result (e.g. the
  # report's probe settings for a stage that records a curve): part of its key.
  also_keyed: tuple[str, ...] = ()


def _field(config, path: str):
  """config's dotted field `path`, JSON-able (a section as a dict)."""
  node = config
  for part in path.split('.'):
    node = node[part]
  return node.to_dict() if hasattr(node, 'to_dict') else node


def expand_stages(spec: str | tuple, tasks: tuple[str, ...]) -> list[str]:
  """'pretrain,teachers,opd' → ['pretrain', 'teacher_composition', ..., 'opd'].

  'teachers' and 'opd_single' stand for one stage per task.
  """
  words = spec.split(',') if isinstance(spec, str) else list(spec)
  out = []
  for w in (w.strip() for w in words if w.strip()):
    if w == 'teachers':
      out += [f'teacher_{t}' for t in tasks]
    elif w == 'opd_single':
      out += [f'opd_single_{t}' for t in tasks]
    else:
      out.append(w)
  return out


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj: Any) -> None:
  """Writes atomically: a crash never leaves a half-written stage.json."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class Recipe:
  """Runs the selected stages of a configs/opd.py config in `workdir`, skipping cached ones."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               stages: dict[str, Stage], mesh=None):
    self.config, self.workdir, self.mesh = config, os.path.abspath(workdir), mesh
    self.stages = stages
    self.tasks = tuple(config.tasks)
    self._keys: dict[str, str] = {}

  # --- bookkeeping ------------------------------------------------------------------------------
  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def stage_config(self, name: str) -> ml_collections.ConfigDict:
    """The stage's config section with the run seed applied (a copy)."""
    if name.startswith('teacher_'):
      node = self.config.teachers[name.split('_', 1)[1]]
    elif name.startswith('opd_single_'):
      node = self.config.opd     # the student's settings, with one teacher
    else:
      node = self.config[name]
    c = copy.deepcopy(node)
    if 'seed' in c:
      c.seed = int(self.config.seed)
    return c

  def key(self, name: str) -> str:
    if name not in self._keys:
      stage = self.stages[name]
      key = {'stage': name, 'seed': self.config.seed,
             'config': self.stage_config(name).to_dict(),
             'deps': [self.key(d) for d in stage.deps]}
      if stage.also_keyed:
        key['also'] = {path: _field(self.config, path) for path in stage.also_keyed}
      self._keys[name] = _hash(key)
    return self._keys[name]

  def cached(self, name: str, verbose: bool = False) -> dict | None:
    """The stage's result if it completed with the current key and its artifact is intact."""
    path = os.path.join(self.stage_dir(name), STAGE_FILE)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        record = json.load(f)
    except (OSError, json.JSONDecodeError):
      return None
    if record.get('key') != self.key(name):
      return None
    if 'artifact' in record:
      record['artifact'] = os.path.join(self.workdir, record['artifact'])
      try:
        artifacts.verify(record['artifact'])
      except InputError as e:
        if verbose and jax.process_index() == 0:
          print(f'[{name}] its saved artifact is unusable ({e}); running the stage again',
                flush=True)
        return None
    return record

  def result(self, name: str) -> dict:
    record = self.cached(name)
    if record is None:
      raise ConfigError(f'config.stages: stage {name!r} has no up-to-date result in '
                        f'{self.stage_dir(name)}; add it to config.stages')
    return record

  def artifact(self, name: str) -> str:
    """The absolute path of a completed stage's artifact."""
    return self.result(name)['artifact']

  # --- running ----------------------------------------------------------------------------------
  def run(self, selected: list[str]) -> dict[str, dict]:
    unknown = [s for s in selected if s not in self.stages]
    if unknown:
      raise ConfigError(f'config.stages: unknown stage(s) {unknown}; choose from '
                        f'{["teachers", "opd_single"] + list(self.stages)}')
    order = [s for s in self.stages if s in selected]   # dependency order
    for name in order:
      for dep in self.stages[name].deps:
        if dep not in order and self.cached(dep) is None:
          raise ConfigError(f'config.stages: stage {name!r} needs {dep!r}, which is neither '
                            f'selected nor cached in {self.workdir}')
    results = {}
    for name in order:
      results[name] = self._run_one(name)
    return results

  def _run_one(self, name: str) -> dict:
    record = self.cached(name, verbose=True)
    lead = jax.process_index() == 0
    if record is not None and name != 'report':
      if lead:
        print(f'[{name}] cached ({record["train_seconds"]:.0f} s of training)', flush=True)
      return record
    directory = self.stage_dir(name)
    key_path = os.path.join(directory, KEY_FILE)
    key = None
    if os.path.exists(key_path):
      with open(key_path) as f:
        key = f.read()
    if os.path.exists(directory) and key != self.key(name) and name != 'report':
      if lead:
        print(f'[{name}] settings changed: starting it afresh', flush=True)
      shutil.rmtree(directory)
    elif os.path.exists(os.path.join(directory, STAGE_FILE)) and lead:
      os.remove(os.path.join(directory, STAGE_FILE))   # its artifact is gone: make it again
    os.makedirs(directory, exist_ok=True)
    with open(key_path, 'w') as f:
      f.write(self.key(name))
    if lead:
      print(f'[{name}] running', flush=True)
    began = time.time()
    result = self.stages[name].run(self, directory)
    wall = time.time() - began
    record = {'key': self.key(name), 'stage': name, 'wall_seconds': wall,
              'train_seconds': result.pop('train_seconds', wall), **result}
    if 'artifact' in record:
      record['artifact'] = os.path.relpath(record['artifact'], self.workdir)
    if lead:
      _write_json(os.path.join(directory, STAGE_FILE), record)
      print(f'[{name}] done in {wall:.0f} s', flush=True)
    if 'artifact' in record:
      record['artifact'] = os.path.join(self.workdir, record['artifact'])
    return record
