"""DiffusionNFT on the mini world: reward weights, the loss at θ = θ_old, a smoke run, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mini import cascade_rl as cascade_rl_config
from configs.mini import nft as nft_config
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from opd_jax.rl import advantages, nft
from opd_jax.rl import setup as rl_setup
from opd_jax.rl.prompts import load_rl_prompts
from opd_jax.mini_world.artifacts import load_adapter
from opd_jax.rl.trainer import run_rl
import mini_testing


def test_optimality_maps_advantages_to_unit_interval():
  r = nft.optimality(np.array([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0]), adv_clip=5.0)
  np.testing.assert_allclose(r, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def _setup(**kv):
  config = mini_testing.tiny_rl_config(nft_config, 'aesthetics', **kv)
  base = mini_testing.tiny_base()
  setup = rl_setup.build_rl(config, mini_testing.mesh_of(1), base)
  prompts = load_rl_prompts(config, (setup.nets.text_graphdef, base.text_encoder),
                            config.data.batch_size)
  return config, setup, prompts


def test_loss_at_the_old_policy_is_reward_weighted_flow_matching():
  """At θ = θ_old, ∇L = (2r − 1)-weighted flow-matching gradient: r = 1 pulls v_θ toward the
  sample, r = 0 pushes it away by exactly as much, r = ½ gives no gradient."""
  config, setup, prompts = _setup(**{'nft.timesteps_per_sample': 1})
  spec = nft.nft_spec(config)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(0), x.shape),
                        setup.init_state().params)
  rb = prompts.next((0,))
  cond = jax.tree.map(jnp.asarray, rb.cond)
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (8, 16, 16, 3), minval=-1, maxval=1)
  key = jax.random.PRNGKey(2)

  @jax.jit
  def grad(r):
    batch = {'x0': x0, 'r': jnp.full((8,), r), 'cond': cond}
    return jax.grad(lambda p: nft.nft_loss(spec, setup.policy, p, params, setup.frozen,
                                           setup.zero_adapter, batch, key)[0])(params)

  @jax.jit
  def fm_grad():
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (1, 8))[0]
    eps = jax.random.normal(k_eps, (1,) + x0.shape)[0]
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    def fm(p):
      v = setup.policy.student_velocity(p, setup.frozen)(x_t, t * NUM_TRAIN_TIMESTEPS, cond)
      return jnp.mean(jnp.mean(jnp.square(v - (eps - x0)), axis=(1, 2, 3)))
    return jax.grad(fm)(params)

  g1, g0, gh, ref = grad(1.0), grad(0.0), grad(0.5), fm_grad()
  for a, b, c, d in zip(*map(jax.tree.leaves, (g1, g0, gh, ref))):
    tol = 1e-3 * float(np.abs(d).max()) + 1e-7   # two compiled programs: rounding differs
    np.testing.assert_allclose(a, d, atol=tol)
    np.testing.assert_allclose(b, -d, atol=tol)
    np.testing.assert_allclose(c, 0.0, atol=tol)


def test_nft_rejects_cfg():
  config = mini_testing.tiny_rl_config(nft_config, 'composition', **{'rollout.cfg_scale': 4.5})
  with pytest.raises(ValueError, match='CFG-free'):
    nft.nft_spec(config)


def test_cascade_nft_smoke_run_saves_a_cfg_free_teacher(tmp_path):
  """configs/mini/cascade_rl.py:nft — one task per iteration, in order — via run_rl."""
  config = mini_testing.tiny_rl_config(cascade_rl_config, 'nft',
                                       **{'nft.kl_beta': 0.1, 'nft.old_decay': 0.5})
  out = run_rl(config, str(tmp_path), mini_testing.tiny_base_dir(),
               mesh=mini_testing.mesh_of(2))
  assert np.isfinite(out['metrics']['loss'])
  active = [[t for t, v in h.items() if np.isfinite(v)] for h in out['reward_history']]
  assert active == [['composition'], ['text'], ['aesthetics']]
  teacher = load_adapter(out['teacher_dir'])
  assert teacher.cfg_scale == 1.0 and teacher.meta['stage'] == 'nft'
  assert teacher.meta['tasks'] == ['composition', 'text', 'aesthetics']
  assert teacher.meta['schedule'] == 'cascade'


@pytest.mark.slow
def test_nft_raises_a_reward_in_two_dozen_iterations(tmp_path, monkeypatch):
  """As for GRPO: image brightness through the trainer's reward hook (the tiny test base draws
  near-noise, where the task rewards are almost flat)."""
  monkeypatch.setattr(advantages, 'compute_rewards',
                      lambda images, prompts, task, names: images.mean(axis=(1, 2, 3)))
  config = mini_testing.tiny_rl_config(
      nft_config, 'aesthetics',
      **{'train.num_steps': 24, 'data.batch_size': 2, 'data.group_size': 8,
         'data.max_prompts': 2, 'optimizer.lr': 3e-3})
  out = run_rl(config, str(tmp_path), mini_testing.tiny_base_dir(),
               mesh=mini_testing.mesh_of(1))
  curve = np.array([h['aesthetics'] for h in out['reward_history']])
  # The rise must stand out of the iteration-to-iteration noise: 3 standard errors of the
  # difference of the first and last four iterations' means.
  first, last = curve[:4], curve[-4:]
  se = np.sqrt(first.var(ddof=1) / 4 + last.var(ddof=1) / 4)
  assert last.mean() - first.mean() > 3 * se, curve
