"""The mini-world base that ships with the repo, and the command that remakes it.

Pretraining a base that can render text at all takes minutes on a 2-core CPU (the DiT has to
learn which glyph token goes in which image column), more than the recipe's time budget leaves.
So the repo carries the output of one pretraining run, made by

    python -m opd_jax.main --config=configs/mini/pretrain.py:ship --workdir=runs/mini_base

as `opd_jax/assets/mini_world_base.safetensors` (weights, float32, '/'-joined pytree paths)
plus `mini_world_base.json` (the artifact meta, the pretraining config that made it, the
dataset version, its final loss and measured seconds, the machine and commit).

`run_pretrain` with `config.reuse_shipped` (what the recipe does) returns the shipped base
instead of training when the shipped config equals the requested one, ignoring only fields
that do not change what the weights are (IGNORED_FIELDS; the seed among them: the recipe seed
varies every later stage, while the base stays this one run). Any other difference means a
new base, so it trains.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from opd_jax.errors import InputError
from opd_jax.mini_world import artifacts
from opd_jax.mini_world import tfds_builder

ASSET_PREFIX = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'assets',
                            'mini_world_base')
# Config fields that do not change what the shipped weights are.
IGNORED_FIELDS = ('seed', 'reuse_shipped', 'ship', 'data.data_dir', 'train.log_every', 'mesh',
                  'train.checkpoint_every', 'train.keep_checkpoints', 'train.async_checkpoints',
                  'train.allow_changed_config')


def _flatten(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, path + '/'))
    else:
      out[path] = np.ascontiguousarray(np.asarray(v, np.float32))
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split('/')]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def comparable(config_dict: dict) -> dict:
  """The pretraining config without IGNORED_FIELDS (nested dict)."""
  out = json.loads(json.dumps(config_dict))
  for field in IGNORED_FIELDS:
    *parents, leaf = field.split('.')
    node = out
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return out


def _differences(a: Any, b: Any, path: str = '') -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    diffs = []
    for k in sorted(set(a) | set(b)):
      diffs += _differences(a.get(k, '<absent>'), b.get(k, '<absent>'), f'{path}{k}.')
    return diffs
  return [] if a == b else [f'{path[:-1]}: shipped {a!r}, requested {b!r}']


def _git_commit() -> str:
  """HEAD, with '+uncommitted changes' when the tracked code differs from it."""
  def git(*args):
    return subprocess.run(['git', *args], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True).stdout.strip()
  try:
    dirty = git('status', '--porcelain', '--untracked-files=no')
    return git('rev-parse', 'HEAD') + (' +uncommitted changes' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def ship(base_dir: str, config, *, train_seconds: float, final_loss: float | None,
         prefix: str | None = None) -> str:
  """Writes the base artifact in `base_dir` as the shipped asset `prefix`.{safetensors,json}."""
  prefix = prefix or ASSET_PREFIX
  base = artifacts.load_base(base_dir)
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  tmp = prefix + '.tmp'
  # Both files are written under temporary names and then renamed, so an interrupted export
  # never leaves weights that disagree with their description.
  save_file(_flatten({'dit': base.dit, 'text_encoder': base.text_encoder}), tmp + '.safetensors')
  record = {
      'meta': base.meta,
      'config': config.to_dict(),
      'dataset_version': str(tfds_builder.MiniWorld.VERSION),
      'train_seconds': round(float(train_seconds), 1),
      'final_loss': final_loss,
      'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
      'commit': _git_commit(),
      'command': 'python -m opd_jax.main --config=configs/mini/pretrain.py:ship '
                 '--workdir=runs/mini_base',
  }
  with open(tmp + '.json', 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)
  os.replace(tmp + '.safetensors', prefix + '.safetensors')
  os.replace(tmp + '.json', prefix + '.json')
  return prefix


def read_record(prefix: str | None = None) -> dict | None:
  """The shipped base's description, or None when no base is shipped at `prefix`."""
  path = (prefix or ASSET_PREFIX) + '.json'
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def mismatch(config, prefix: str | None = None) -> list[str]:
  """Why the shipped base is not the output of `config` ([] when it is)."""
  record = read_record(prefix)
  if record is None:
    return [f'no shipped base at {prefix or ASSET_PREFIX}.json']
  diffs = _differences(comparable(record['config']), comparable(config.to_dict()))
  version = str(tfds_builder.MiniWorld.VERSION)
  if record['dataset_version'] != version:
    diffs.append(f'dataset version: shipped {record["dataset_version"]}, current {version}')
  return diffs


def load(prefix: str | None = None) -> tuple[artifacts.BaseModel, dict]:
  """(the shipped base, its record); a clear error when the files are missing or corrupt."""
  prefix = prefix or ASSET_PREFIX
  record = read_record(prefix)
  if record is None:
    raise InputError(f'{prefix}.json not found: no shipped mini-world base')
  try:
    params = _unflatten(load_file(prefix + '.safetensors'))
  except Exception as e:  # safetensors raises its own error types for truncated files
    raise InputError(f'{prefix}.safetensors is missing or corrupt ({e}); remake it with '
                     f'{record["command"]}') from None
  return artifacts.BaseModel(params['dit'], params['text_encoder'], record['meta']), record
