"""PPO-style estimators agree in expectation with the analytic per-step KL gradient (Eq. 21)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.objectives import OBJECTIVES
from opd_jax.sampling.step import KernelSpec, transition_mean as kernel_mean
from opd_jax.sampling.rollout import Trajectory
from opd_jax.sampling.schedule import flow_match_sigmas

SIGMAS = jnp.asarray(flow_match_sigmas(4, 3.0))
SPEC = KernelSpec('flow_grpo', 0.7)
J = 1


def _velocity(w):
  def fn(x, timestep, cond):
    return x * w[0] + w[1] + cond['pooled'][:, :, None, None] * w[2]
  return fn


def _gradients(name, ws, wt, x_j, cond, eps):
  """Per-sample gradient of `name`'s terms for one step, x_{j+1} drawn with noise eps."""
  mu, std = kernel_mean(_velocity(ws), x_j, SIGMAS[J], SIGMAS[J + 1], SIGMAS[1], cond, None,
                        1.0, SPEC)
  x_next = mu + std * eps
  latents = jnp.zeros((5,) + x_j.shape).at[J].set(x_j).at[J + 1].set(x_next)
  traj = Trajectory(latents, SIGMAS, None, None, None, None)
  def loss(w):
    terms, _ = OBJECTIVES[name](_velocity(w), _velocity(wt), traj, jnp.array([J]), cond, None,
                                student_cfg=1.0, teacher_cfg=1.0, spec=SPEC, reduction='sum',
                                normaliser='sigma2_dt', clip_range=0.2, discount=0.0)
    return terms.sum()
  return jax.grad(loss)(ws)


@pytest.mark.parametrize('name', ['ppo_analytic_advantage', 'ppo_sampled_logratio'])
def test_estimator_mean_matches_analytic_gradient(name):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  x_j = jax.random.normal(k[0], (1, 2, 2, 2))
  cond = {'pooled': jax.random.normal(k[1], (1, 2))}
  ws, wt = jnp.array([0.3, -0.2, 0.5]), jnp.array([0.1, 0.2, 0.4])
  exact = _gradients('analytic', ws, wt, x_j, cond, jnp.zeros_like(x_j))
  eps = jax.random.normal(k[2], (20000,) + x_j.shape)
  grads = np.asarray(jax.jit(jax.vmap(lambda e: _gradients(name, ws, wt, x_j, cond, e)))(eps))
  mean, se = grads.mean(0), grads.std(0) / np.sqrt(len(grads))
  assert np.all(np.abs(mean - np.asarray(exact)) < 5 * se + 1e-6), (mean, exact, se)
  # The score-function noise makes every PPO estimate differ from the exact gradient.
  assert grads.std(0).max() > 1e-3


def test_ratio_is_one_and_ode_is_rejected():
  from opd_jax.objectives.ppo import clipped_surrogate
  logp = jnp.array([-3.0, 2.0])
  np.testing.assert_allclose(clipped_surrogate(logp, jnp.array([1.0, -2.0]), 0.1), [-1.0, 2.0])
  traj = Trajectory(jnp.zeros((5, 1, 2, 2, 2)), SIGMAS, None, None, None, None)
  with pytest.raises(ValueError, match='stochastic sampler'):
    OBJECTIVES['ppo_sampled_logratio'](_velocity(jnp.ones(3)), _velocity(jnp.ones(3)), traj,
                                       jnp.array([0]), {'pooled': jnp.zeros((1, 2))}, None,
                                       student_cfg=1.0, teacher_cfg=1.0,
                                       spec=KernelSpec('ode', 0.0), reduction='sum',
                                       normaliser='sigma2_dt')


def test_discounted_reverse_sum():
  from opd_jax.objectives.ppo import discounted_reverse_sum
  x = jnp.array([[1.0], [2.0], [4.0]])
  np.testing.assert_allclose(discounted_reverse_sum(x, 0.5)[:, 0], [1 + 1 + 1, 2 + 2, 4])
