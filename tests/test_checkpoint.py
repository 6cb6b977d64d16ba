"""Orbax checkpoints: restore onto another mesh, retention, an empty directory.

Exact resume, NaN states never saved, damaged and unusable checkpoints: tests/test_loop.py.
"""

import os
import shutil

import jax
import numpy as np

from opd_testing import mesh_of, tiny_config
from opd_jax.train.checkpoint import Checkpointer
from opd_jax.opd.trainer import train_opd


def _config(rounds, **kw):
  return tiny_config(**{'train.num_steps': rounds, 'train.checkpoint_every': 2, **kw})


def _same(a, b, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_restore_onto_a_different_mesh(tmp_path, capsys):
  # The global batch is prompts_per_device × batch devices: 4 × 2 before, 1 × 8 after.
  full, _ = train_opd(_config(4, **{'data.batch_size_per_device': 4}), str(tmp_path / 'a'),
                      mesh=mesh_of(2))
  # The 2-device run as a run killed after saving step 2 leaves it (its step-4 checkpoint gone),
  # resumed on 4 data × 2 fsdp devices.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '4')
  capsys.readouterr()
  resumed, _ = train_opd(_config(4, **{'data.batch_size_per_device': 1}), str(tmp_path / 'b'),
                         mesh=mesh_of(4, 2))
  assert 'resumed from step 2' in capsys.readouterr().out
  _same(full.params, resumed.params, atol=1e-5)
  _same(full.opt_state, resumed.opt_state, atol=1e-5)


def test_keeps_only_the_newest_checkpoints(tmp_path):
  train_opd(_config(6, **{'train.keep_checkpoints': 2}), str(tmp_path), mesh=mesh_of(1))
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps == [4, 6]


def test_restore_without_checkpoint_is_none(tmp_path):
  assert Checkpointer(str(tmp_path / 'empty')).restore(None) is None
