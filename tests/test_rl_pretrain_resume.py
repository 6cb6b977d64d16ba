"""Exact resume of the RL trainers (Flow-GRPO, DiffusionNFT) and of base pretraining.

Each trainer runs 4 steps uninterrupted, saving checkpoints at steps 2 and 4. A copy of that
workdir cut back to step 2 — what a run killed after saving step 2 leaves behind, stale
metrics rows, TensorBoard events and all, but no step 4 and no output artifact — is then resumed
to step 4 the way a restarted job would: a fresh `run_rl` / `run_pretrain` that builds everything
anew. Resuming must not change a single bit: the final checkpoint (parameters, optimizer moments,
EMA, step counter, RNG key and trainer state such as DiffusionNFT's θ_old), the saved artifact
and every logged metric equal the uninterrupted run's.

Compiled programs persist on disk for the session (conftest.py), so the resumed run loads what
the uninterrupted run compiled instead of compiling it again.
"""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.mini import grpo as grpo_config
from configs.mini import nft as nft_config
from opd_jax.mini_world.artifacts import load_adapter, load_base
from opd_jax.pretrain.trainer import run_pretrain
from opd_jax.rl.trainer import run_rl
from opd_jax.train.metric_writer import read_metrics
import mini_testing

STEPS, CUT = 4, 2


def _grpo(workdir):
  config = mini_testing.tiny_rl_config(
      grpo_config, 'text', **{'train.num_steps': STEPS, 'train.checkpoint_every': CUT,
                              'grpo.kl_beta': 0.04})   # the KL term reads the reference too
  out = run_rl(config, str(workdir), mini_testing.tiny_base_dir(), mesh=mini_testing.mesh_of(1))
  adapter = load_adapter(out['teacher_dir'])
  return adapter.params, adapter.meta


def _nft(workdir):
  # old_decay > 0: θ_old (state.extra['old']) lags θ, so a resume that lost it would sample
  # from the wrong policy.
  config = mini_testing.tiny_rl_config(
      nft_config, 'aesthetics', **{'train.num_steps': STEPS, 'train.checkpoint_every': CUT,
                                   'nft.old_decay': 0.5})
  out = run_rl(config, str(workdir), mini_testing.tiny_base_dir(), mesh=mini_testing.mesh_of(1))
  adapter = load_adapter(out['teacher_dir'])
  return adapter.params, adapter.meta


def _pretrain(workdir):
  config = mini_testing.tiny_pretrain_config(
      **{'train.num_steps': STEPS, 'train.checkpoint_every': CUT, 'reuse_shipped': False})
  out = run_pretrain(config, str(workdir), mesh=mini_testing.mesh_of(1))
  base = load_base(out['base_dir'])
  return {'dit': base.dit, 'text_encoder': base.text_encoder}, base.meta


# trainer → (run it in a workdir and load its artifact, the artifact's directory in the workdir)
TRAINERS = {'grpo': (_grpo, 'teacher'), 'nft': (_nft, 'teacher'), 'pretrain': (_pretrain, 'base')}


def _saved_state(workdir, step: int) -> dict:
  """{leaf path: host array} of the checkpointed TrainState, read by Orbax without a target."""
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def _flat(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def _assert_bit_identical(expected: dict, actual: dict, what: str) -> None:
  assert sorted(actual) == sorted(expected), what
  differ = [k for k in expected if not np.array_equal(expected[k], actual[k])]
  assert not differ, f'{what}: {len(differ)} arrays differ, e.g. {differ[:3]}'


def _cut_back(src, dst, artifact: str):
  """A copy of workdir `src` as a run killed right after saving step CUT would have left it."""
  shutil.copytree(src, dst)
  for step in os.listdir(os.path.join(dst, 'checkpoints')):
    if step.isdigit() and int(step) > CUT:
      shutil.rmtree(os.path.join(dst, 'checkpoints', step))
  shutil.rmtree(os.path.join(dst, artifact))
  return dst


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(TRAINERS))
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, name):
  run, artifact = TRAINERS[name]
  full = tmp_path / 'uninterrupted'
  full_params, full_meta = run(full)
  full_state = _saved_state(full, STEPS)
  full_rows = read_metrics(full)

  resumed = _cut_back(full, tmp_path / 'resumed', artifact)
  assert sorted(os.listdir(resumed / 'checkpoints')) == [str(CUT)]
  params, meta = run(resumed)

  _assert_bit_identical(full_state, _saved_state(resumed, STEPS), 'final checkpoint')
  _assert_bit_identical(_flat(full_params), _flat(params), f'saved {artifact}')
  assert meta == full_meta
  # The checkpoint holds everything that evolves: moments, EMA, counter and key.
  assert any("['mu']" in k for k in full_state) and any("['nu']" in k for k in full_state)
  assert any(k.startswith("['ema_params']") for k in full_state)
  assert int(full_state["['step']"]) > 0 and full_state["['rng']"].dtype == np.uint32
  if name == 'nft':
    old = {k[len("['extra']['old']"):]: v for k, v in full_state.items()
           if k.startswith("['extra']['old']")}
    params_now = {k[len("['params']"):]: v for k, v in full_state.items()
                  if k.startswith("['params']")}
    assert old and sorted(old) == sorted(params_now)
    assert any(not np.array_equal(old[k], params_now[k]) for k in old), 'θ_old == θ: untested'
  # Every logged step once, with the values of the uninterrupted run (train_seconds aside).
  rows = read_metrics(resumed)
  assert [r['step'] for r in rows] == [r['step'] for r in full_rows]
  assert len({r['step'] for r in rows}) == len(rows)
  strip = lambda r: {k: v for k, v in r.items() if k != 'train_seconds'}
  assert [strip(r) for r in rows] == [strip(r) for r in full_rows]
  # Training time accumulates over the resume instead of restarting from zero.
  seconds = [r['train_seconds'] for r in rows]
  assert seconds == sorted(seconds)
  with open(resumed / 'metrics.jsonl') as f:
    assert len(f.read().splitlines()) == len(rows)   # no line left cut short
