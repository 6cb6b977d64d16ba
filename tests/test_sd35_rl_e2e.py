"""Stage 1 on SD3.5 end to end (configs/teachers_sd35m.py) on tiny random models built here.

A tiny SD3.5-architecture pipeline (dual attention + RMS qk-norm, its VAE decoding the images
the rewards score) is saved as a diffusers folder, the prompt cache is made by
`python -m opd_jax.tools.encode_prompts`, and tiny CLIP reward weights are written as HF
folders. Each RL trainer then runs on it through the real config: rollouts sampled in chunks
whose rewards are scored in a worker thread, the tiny PickScore on one task and an easy reward
(image brightness, standing in for the OCR reward's loader) on the other, which GRPO-Guard,
Flow-GRPO and DiffusionNFT must each visibly climb (at seed 0: see CLIMB below). DiffusionNFT
(θ_old in its state) resumes bit for bit and its PEFT export gives, in diffusers + peft, the JAX
teacher's velocities; the first RL step on a 4 data × 2 fsdp mesh logs what the 2-device run
logged.
"""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.teachers_sd35m import get_config
from opd_jax.mini_world.artifacts import load_adapter
from opd_jax.parallel.mesh import make_mesh
from opd_jax.rl.trainer import prepare, run_rl
from opd_jax.train.metric_writer import read_metrics

import clip_testing
import mini_testing
import sd3_testing

PROMPTS = {'text': ['a sign that says "OPEN"', 'the word "cat" on a wall', 'a label "7"',
                    'a shirt printed "hi"'],
           'aesthetics': ['a calm lake at dawn', 'a colourful garden', 'a misty forest',
                          'a red cat']}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd35_rl')
  sd3_testing.save_sd35(root)
  cache = sd3_testing.encode_prompt_files(root, PROMPTS)
  _, _, _, folders = clip_testing.reward_models(root / 'rewards')
  return {'base': str(root / 'sd35'), 'cache': cache, 'rewards': folders}


@pytest.fixture
def easy_text_reward(monkeypatch):
  """The 'ocr' reward's loader gives image brightness (tiny random models cannot write text)."""
  mini_testing.brightness_reward(monkeypatch, 'ocr')


def _config(files, trainer: str, steps: int, **overrides):
  c = get_config('multitask' if trainer != 'nft' else 'cascade')
  c.trainer = trainer
  c.schedule.mode = 'joint'
  c.data.tasks = ('text', 'aesthetics')
  with c.unlocked():
    c.rewards.tasks = {'text': 'ocr', 'aesthetics': 'pickscore'}
  c.rewards.update(pickscore=files['rewards']['pickscore'], clip=files['rewards']['clip'],
                   batch_size=4)
  c.base.path = files['base']
  c.data.embeddings_dir = files['cache']
  c.model.update(latent_size=8, latent_channels=4, dtype='float32', param_dtype='float32',
                 float32_matmul_output=False, float32_residual=False, float32_output=False)
  c.lora.update(rank=4, alpha=8.0)
  c.data.update(batch_size=4, group_size=4, sample_batches=2)
  c.rollout.num_steps = 4
  if trainer == 'nft':
    c.nft.timesteps_per_sample = 3   # int(4 · 0.99) of the 4-step schedule, as upstream's 9 of 10
  c.ema.update(every=1)
  c.train.update(num_steps=steps, checkpoint_every=2, async_checkpoints=False,
                 num_microbatches=2)    # 8-image minibatches on 2 devices: 2 images a micro-batch
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def _mesh(shape=None, n=1):
  return make_mesh(shape or {'data': n}, jax.devices()[:n])


# Each trainer's climb: the settings under which the easy reward rises on this tiny pipeline
# (measured while writing these tests: GRPO-Guard needs its clip range opened to 1e-3, DiffusionNFT
# 24 iterations — at 12 its rise stayed under 3 SE, at lr 0.1 with the mini world's options it fell).
# These rises hold at seed 0 (config.seed, the one the tests run) and NOT at seeds 1 and 2
# (measured: z = 1.4 and −0.9 for NFT, −0.9 and −0.3 for Flow-GRPO, 2.0 for GRPO-Guard at seed 1;
# lr 0.1 did not make them hold either): on this tiny random pipeline the images barely follow
# the LoRA, so a climb is within a few SE of the iteration noise. They check that each trainer
# still does at seed 0 what it did when written, not that it climbs for any seed.
CLIMB = {'optimizer.lr': 3e-2, 'grpo.clip_range': 1e-3, 'train.num_microbatches': 1}
FLOW_GRPO_CLIMB = {'optimizer.lr': 3e-2, 'grpo.clip_range': 0.05, 'train.num_microbatches': 1}
NFT_STEPS = 24
NFT_CLIMB = {'optimizer.lr': 3e-2, 'train.checkpoint_every': 4}   # 2 micro-batches (default here)


def _rises(workdir, task='text') -> tuple[np.ndarray, float, float]:
  """The task's reward per iteration, the rise from the first 4 to the last 4, and its SE."""
  curve = np.array([r[f'reward/{task}'] for r in read_metrics(str(workdir))])
  first, last = curve[:4], curve[-4:]
  return curve, last.mean() - first.mean(), np.sqrt(first.var(ddof=1) / 4 + last.var(ddof=1) / 4)


@pytest.fixture(scope='module')
def climb(files, tmp_path_factory):
  """GRPO-Guard for 12 iterations on 2 devices: (workdir, run_rl's result)."""
  workdir = tmp_path_factory.mktemp('climb')
  with pytest.MonkeyPatch.context() as mp:
    mini_testing.brightness_reward(mp, 'ocr')
    out = run_rl(_config(files, 'grpo_guard', 12, **CLIMB), str(workdir), mesh=_mesh(n=2))
  return workdir, out


@pytest.fixture(scope='module')
def nft_climb(files, tmp_path_factory):
  """DiffusionNFT (upstream's options, θ_old in its state) for 24 iterations on 2 devices."""
  workdir = tmp_path_factory.mktemp('nft_climb')
  config = _config(files, 'nft', NFT_STEPS, **NFT_CLIMB)
  with pytest.MonkeyPatch.context() as mp:
    mini_testing.brightness_reward(mp, 'ocr')
    out = run_rl(config, str(workdir), mesh=_mesh(n=2))
  return workdir, out, config


@pytest.mark.slow
def test_grpo_guard_teacher_climbs_an_easy_reward(climb):
  workdir, out = climb
  rows = read_metrics(str(workdir))
  assert [r['step'] for r in rows] == list(range(1, 13))
  curve, rise, se = _rises(workdir)
  assert rise > 3 * se, curve
  # The tiny PickScore scored the other task on every iteration.
  picks = np.array([r['reward/aesthetics'] for r in rows])
  assert np.all(np.isfinite(picks)) and np.ptp(picks) > 0
  assert all(r['guard_bias'] > 0 for r in rows[1:])
  assert os.path.isdir(out['teacher_dir'])
  assert os.path.exists(os.path.join(workdir, 'teacher_peft', 'adapter_config.json'))


@pytest.mark.slow
def test_flow_grpo_teacher_climbs_an_easy_reward(files, easy_text_reward, tmp_path):
  run_rl(_config(files, 'grpo', 12, **FLOW_GRPO_CLIMB), str(tmp_path), mesh=_mesh(n=2))
  curve, rise, se = _rises(tmp_path)
  assert rise > 3 * se, curve


@pytest.mark.slow
def test_nft_teacher_climbs_an_easy_reward(nft_climb):
  workdir, out, _ = nft_climb
  curve, rise, se = _rises(workdir)
  assert len(curve) == NFT_STEPS and rise > 3 * se, curve
  assert os.path.isdir(out['teacher_dir'])


def _saved_state(workdir, step: int) -> dict:
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


@pytest.mark.slow
def test_nft_resumes_exactly_and_its_peft_export_loads_in_diffusers(files, easy_text_reward,
                                                                     nft_climb, tmp_path):
  """The climb cut back to its step-20 checkpoint, resumed: the same final state (θ_old, which
  lags θ under the linear decay, included) and metrics; then the PEFT export in diffusers."""
  full, _, config = nft_climb
  resumed = tmp_path / 'resumed'
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(NFT_STEPS))
  for out in ('teacher', 'teacher_peft'):
    shutil.rmtree(resumed / out)
  run_rl(config, str(resumed), mesh=_mesh(n=2))
  a, b = _saved_state(full, NFT_STEPS), _saved_state(resumed, NFT_STEPS)
  assert sorted(a) == sorted(b) and any(k.startswith("['extra']['old']") for k in a)
  assert [k for k in a if not np.array_equal(a[k], b[k])] == []
  strip = lambda r: {k: v for k, v in r.items() if k != 'train_seconds'}
  assert [strip(r) for r in read_metrics(str(resumed))] == [
      strip(r) for r in read_metrics(str(full))]

  # The PEFT teacher (EMA weights), in diffusers + peft, gives the JAX teacher's velocities.
  moved = sd3_testing.assert_peft_matches(files['base'], load_adapter(str(full / 'teacher')).params,
                                          str(full / 'teacher_peft'), rank=4, alpha=8.0)
  assert moved > 1e-3     # the teacher moved away from the base: the comparison has teeth


@pytest.mark.slow
def test_one_rl_step_on_a_4x2_mesh_equals_the_2_device_run(files, easy_text_reward, climb):
  """The first iteration on 4 data × 2 fsdp devices logs what the 2-device run logged: the same
  rewards (same images), loss, gradient norm and, after the update, parameter norm."""
  trainer = prepare(_config(files, 'grpo_guard', 12, **CLIMB),
                    mesh=_mesh({'data': 4, 'fsdp': 2}, 8))
  _, metrics = trainer.step(trainer.init_state(), 0)
  trainer.scorer.close()
  first = read_metrics(str(climb[0]))[0]
  assert float(first['grad_norm']) > 0
  for k in ('reward/text', 'reward/aesthetics', 'loss', 'grad_norm', 'param_norm',
            'first_ratio_max_dev'):
    np.testing.assert_allclose(float(metrics[k]), first[k], rtol=1e-4, atol=1e-6, err_msg=k)
