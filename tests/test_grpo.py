"""Flow-GRPO and GRPO-Guard on the mini world: advantages, task schedule, ratio == 1, a smoke run,
learning. (GRPO-Guard's formulas: test_grpo_guard.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mini import opd as opd_config
from configs.mini import common
from configs.mini import grpo as grpo_config
from configs.mini import multitask_rl as multitask_rl_config
from opd_jax.mini_world import conditioning
from opd_jax.rl import advantages, grpo, prompts, sampler
from opd_jax.mini_world.artifacts import load_adapter
from opd_jax.opd.setup import build_opd, device_batch
from opd_jax.rl.trainer import run_rl
import mini_testing
from xla_testing import FUSION_EMITTERS


def test_group_advantages_normalise_per_prompt_group():
  rng = np.random.default_rng(0)
  group = np.repeat(np.arange(4), 6)
  task = np.repeat([0, 0, 1, 1], 6)
  rewards = rng.uniform(size=24) * np.repeat([1.0, 0.1, 10.0, 1.0], 6)
  rewards[18:] = 0.3                       # a constant group: no signal, zero advantage
  adv = advantages.group_advantages(rewards, group, task, 'group')
  for g in range(4):
    a = adv[group == g]
    assert abs(a.mean()) < 1e-5
    assert abs(a.std() - (0.0 if g == 3 else 1.0)) < 1e-2
  np.testing.assert_array_equal(adv[18:], 0.0)
  # The reward scale of a group does not matter.
  np.testing.assert_allclose(
      advantages.group_advantages(rewards[:18] * 7, group[:18], task[:18], 'group', eps=0.0),
      advantages.group_advantages(rewards[:18], group[:18], task[:18], 'group', eps=0.0),
      rtol=1e-5)


def test_group_advantages_with_per_task_std():
  rng = np.random.default_rng(1)
  group = np.repeat(np.arange(4), 5)
  task = np.repeat([0, 0, 1, 1], 5)
  rewards = rng.uniform(size=20) * np.repeat([1.0, 1.0, 100.0, 100.0], 5)
  adv = advantages.group_advantages(rewards, group, task, 'task', eps=0.0)
  centred = rewards - np.repeat([rewards[group == g].mean() for g in range(4)], 5)
  for k in range(2):
    sel = task == k
    np.testing.assert_allclose(adv[sel], centred[sel] / rewards[sel].std(), rtol=1e-5)
    assert abs(adv[group == 2 * k].mean()) < 1e-5
  # Each task is normalised by its own scale: both tasks' advantages are O(1).
  assert 0.3 < np.abs(adv[task == 0]).mean() / np.abs(adv[task == 1]).mean() < 3
  with pytest.raises(ValueError, match='std_scope'):
    advantages.group_advantages(rewards, group, task, 'batch')


def test_task_schedules():
  assert prompts.active_tasks('joint', 3, 5, 9) == (0, 1, 2)
  assert [prompts.active_tasks('cascade', 3, s, 9) for s in range(9)] == (
      [(0,)] * 3 + [(1,)] * 3 + [(2,)] * 3)
  assert prompts.active_tasks('cascade', 2, 9, 10) == (1,)


def test_prompt_batches_are_balanced_groups():
  sets = [conditioning.PromptSet(t, [f'{t}{i}' for i in range(5)],
                                 {'pooled': np.arange(5, dtype=np.float32)[:, None] + 10 * k})
          for k, t in enumerate(('a', 'b', 'c'))]
  src = prompts.RLPrompts(sets, prompts_per_step=6, group_size=4, seed=0)
  rb = src.next((0, 1, 2))
  assert len(rb.prompts) == 24 and rb.cond['pooled'].shape == (24, 1)
  assert rb.prompt_cond['pooled'].shape == (6, 1)   # held once per prompt on the host
  np.testing.assert_array_equal(rb.cond_rows(5, 13)['pooled'], rb.cond['pooled'][5:13])
  np.testing.assert_array_equal(np.bincount(rb.task), [8, 8, 8])
  for g in range(6):
    sel = rb.group == g
    assert sel.sum() == 4 and len({rb.prompts[i] for i in np.flatnonzero(sel)}) == 1
    assert len(set(rb.task[sel])) == 1
  # Prompt i's conditioning row travels with it.
  for p, t, c in zip(rb.prompts, rb.task, rb.cond['pooled'][:, 0]):
    assert c == int(p[1:]) + 10 * t
  # An epoch visits every prompt of a task before repeating.
  one = prompts.RLPrompts(sets, prompts_per_step=1, group_size=2, seed=0)
  assert len({one.next((0,)).prompts[0] for _ in range(5)}) == 5


def _tiny_grpo(**kv):
  defaults = {'train.num_steps': 2, 'data.batch_size': 2, 'data.group_size': 4,
              'grpo.kl_beta': 0.04}
  defaults.update(kv)
  return mini_testing.tiny_rl_config(grpo_config, 'text', **defaults)


def test_ratio_is_exactly_one_on_the_first_inner_step():
  """Recomputed log-probs at the rollout's states equal the recorded ones (θ = θ_old)."""
  config = _tiny_grpo()
  config, setup, rl_prompts, _ = mini_testing.rl_setup(config)
  state = setup.init_state()
  # A non-zero adapter, so the student differs from the reference.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape),
                        state.params)
  rb = rl_prompts.next((0,))
  cond = jax.tree.map(jnp.asarray, rb.cond)
  # Both programs with XLA's default CPU kernels (the suite's flag swaps them, xla_testing.py):
  # the 1e-5 below is the rounding gap between recording and recomputing with those kernels.
  traj, images = jax.jit(sampler.make_sample_fn(setup, config.rollout),
                         compiler_options=FUSION_EMITTERS)(
      params, setup.frozen, cond, state.rng, jnp.int32(0), jnp.int32(0))
  assert images.shape == (8, 16, 16, 3)
  spec = grpo.grpo_spec(config, setup.sigmas)
  batch = {'latents': traj.latents, 'log_probs': traj.log_probs,
           'advantages': jnp.linspace(-1, 1, 8), 'cond': cond}
  terms_fn = jax.jit(lambda p: grpo.grpo_terms(spec, setup.policy, p, setup.frozen,
                                               setup.zero_adapter, batch,
                                               jnp.arange(spec.num_train_steps)),
                     compiler_options=FUSION_EMITTERS)
  terms = terms_fn(params)
  np.testing.assert_allclose(terms['ratio'], 1.0, atol=1e-5)
  assert np.all(np.asarray(terms['kl']) > 0)      # the adapter moved away from the base
  # The reference itself has zero KL.
  ref_terms = terms_fn(setup.zero_adapter)
  np.testing.assert_allclose(ref_terms['kl'], 0.0, atol=1e-10)


def test_multitask_grpo_guard_smoke_run_saves_a_teacher_usable_by_opd(tmp_path):
  """configs/mini/multitask_rl.py:grpo_guard (joint over all tasks; the paper's multi-task
  baseline) via run_rl, on a 2-device mesh; the saved adapter then serves as frozen OPD teachers.

  GRPO-Guard runs Flow-GRPO's code plus the recorded means (split over the mesh like the
  latents): the first minibatch's ratio is 1, the later ones carry a positive bias. Flow-GRPO
  itself runs through the trainer in test_rl_pretrain_resume and test_recipe.
  """
  config = mini_testing.tiny_rl_config(multitask_rl_config, 'grpo_guard',
                                       **{'train.inner_epochs': 2, 'grpo.kl_beta': 0.04})
  assert config.data.batch_size == 3 and config.advantage.std_scope == 'task'
  out = run_rl(config, str(tmp_path), mini_testing.tiny_base_dir(),
               mesh=mini_testing.mesh_of(2))
  m = out['metrics']
  assert np.isfinite(m['loss']) and m['first_ratio_max_dev'] < 1e-5 and m['kl'] > 0
  assert np.isfinite(m['policy_loss']) and m['guard_bias'] > 0
  assert len(out['reward_history']) == 2 and out['wall_s'] > 0
  assert all(np.isfinite(v) for v in out['reward_history'][0].values())
  teacher = load_adapter(out['teacher_dir'])
  assert teacher.meta['tasks'] == list(common.TASKS) and teacher.meta['stage'] == 'grpo_guard'
  assert teacher.cfg_scale == config.rollout.cfg_scale
  assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(teacher.params))

  # OPD takes the base and the saved teachers as frozen pytrees.
  base = mini_testing.tiny_base()
  c = opd_config.get_config('smoke')
  c.model.update(base.meta['model'])
  c.lora.rank, c.lora.alpha = config.lora.rank, config.lora.alpha
  c.rollout.num_steps = 2
  for t in c.teachers.tasks.values():
    t.cfg_scale = teacher.cfg_scale
  text_encoder = mini_testing.rl_setup(config)[3].text_encoder
  negative = conditioning.negative_conditioning(*text_encoder)
  mesh = mini_testing.mesh_of(1)
  setup = build_opd(c, mesh, negative, base_params=base.dit, teachers=[teacher.params] * 3)
  cond = conditioning.encode_prompts(*text_encoder,
                                     ['a red circle', 'the text "AC"', 'a calm ice glow'])
  cond = jax.tree.map(lambda x: np.stack([x[k:k + 1] for k in range(3)]), cond)
  state, metrics = setup.round_fn(setup.init_state(), setup.frozen,
                                  device_batch(mesh, cond, np.arange(3, dtype=np.int32)))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['loss']) > 0


@pytest.mark.slow
def test_grpo_raises_a_reward_in_two_dozen_iterations(tmp_path, monkeypatch):
  """On a small fixed prompt set the policy gradient climbs a reward it can reach quickly.

  The tiny test base draws near-noise, where the task rewards are almost flat, so this uses
  image brightness, scored through the trainer's own reward hook; the real task rewards are
  exercised by the measured runs (see configs/mini/grpo.py).
  """
  mini_testing.brightness_reward(monkeypatch, 'text')
  config = _tiny_grpo(**{'train.num_steps': 24, 'data.batch_size': 2,
                         'data.group_size': 8, 'data.max_prompts': 2, 'grpo.kl_beta': 0.0,
                         'optimizer.lr': 3e-3, 'grpo.clip_range': 0.05})
  out = run_rl(config, str(tmp_path), mini_testing.tiny_base_dir(),
               mesh=mini_testing.mesh_of(1))
  curve = np.array([h['text'] for h in out['reward_history']])
  assert curve[-4:].mean() > curve[:4].mean() + 0.05, curve
