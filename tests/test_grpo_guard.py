"""GRPO-Guard (teachers_rewards_eval.md §1): the normalised ratio and the ÷|Δt| surrogate against
the formula written out here, its zero-mean log-ratio where Flow-GRPO's is biased, and its
configs. No networks: the smoke run through the RL trainer is in test_grpo.py (shared fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mini import cascade_rl as cascade_rl_config
from configs.mini import grpo as grpo_config
from configs.mini import grpo_guard as guard_config
from configs.mini import multitask_rl as multitask_rl_config
from opd_jax.errors import ConfigError
from opd_jax.rl import config as rl_config
from opd_jax.rl import grpo
from opd_jax.sampling.step import KernelSpec
from opd_jax.sampling.transitions import gaussian_log_prob
from opd_jax.train.state import EMARule
import mini_testing


def _spec(ratio='guard', bias='batch', clip=5e-3, reduction='mean'):
  return grpo.GRPOSpec(sigmas=(1.0, 0.5, 0.0), kernel=KernelSpec('flow_grpo', 0.7),
                       cfg_scale=1.0, num_train_steps=2, train_timesteps=2, clip_range=clip,
                       adv_clip=5.0, kl_beta=0.0, logprob_reduction=reduction,
                       kl_reduction='mean', kl_normaliser='sigma2', num_minibatches=1,
                       inner_epochs=1, ema=EMARule(0.9), ratio=ratio, guard_bias=bias)


def _reference_pg(x_next, mean, old_mean, s, dt, adv, clip, guard, bias_scope, reduction):
  """§1 written out: log N with a latent reduction, the bias, the scaled ratio, PPO-clip, ÷|Δt|."""
  axes = tuple(range(1, x_next.ndim))
  red = (lambda a: jnp.mean(a, axis=axes)) if reduction == 'mean' else (
      lambda a: jnp.sum(a, axis=axes))
  log_n = lambda mu: red(-(x_next - mu) ** 2 / (2 * s ** 2) - jnp.log(s)
                         - 0.5 * jnp.log(2 * jnp.pi))
  log_ratio = log_n(mean) - log_n(old_mean)
  if guard:
    per_sample = red((mean - old_mean) ** 2) / (2 * s ** 2)
    bias = jnp.mean(per_sample) if bias_scope == 'batch' else per_sample
    ratio = jnp.exp((log_ratio + bias) * s)
  else:
    ratio = jnp.exp(log_ratio)
  pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - clip, 1 + clip))
  return pg / jnp.abs(dt) if guard else pg


@pytest.mark.parametrize('ratio,bias,reduction', [('guard', 'batch', 'mean'),
                                                  ('guard', 'sample', 'mean'),
                                                  ('guard', 'batch', 'sum'),
                                                  ('flow_grpo', 'batch', 'mean')])
def test_step_surrogate_matches_the_formula(ratio, bias, reduction):
  """Value and gradient (through μ_θ, in the log-prob and in the bias) of the per-step loss."""
  rng = np.random.default_rng(0)
  b, shape, s, dt = 16, (4, 4, 3), 0.2, -0.3
  old_mean = jnp.asarray(rng.normal(size=(b,) + shape), jnp.float32)
  x_next = old_mean + s * jnp.asarray(rng.normal(size=old_mean.shape), jnp.float32)
  delta_scale = 0.05 if reduction == 'mean' else 0.005   # keeps the ratios near the clip range
  mean = old_mean + delta_scale * jnp.asarray(rng.normal(size=old_mean.shape) *
                                              rng.uniform(0.2, 2, size=(b, 1, 1, 1)),
                                              jnp.float32)
  adv = jnp.asarray(rng.normal(size=b), jnp.float32)
  spec = _spec(ratio, bias, clip=5e-3 if ratio == 'guard' else 0.08, reduction=reduction)
  old_lp = gaussian_log_prob(x_next, old_mean, jnp.float32(s), reduction)
  terms_of = lambda m: grpo.step_surrogate(spec, x_next, m, jnp.float32(s), old_lp, old_mean,
                                           jnp.float32(dt), adv)
  ours = lambda m: jnp.mean(terms_of(m)['pg'])
  ref = lambda m: jnp.mean(_reference_pg(x_next, m, old_mean, s, dt, adv, spec.clip_range,
                                         ratio == 'guard', bias, reduction))
  (value, g), ratio_values = jax.jit(lambda m: (jax.value_and_grad(ours)(m),
                                                terms_of(m)['ratio']))(mean)
  value_ref, g_ref = jax.jit(jax.value_and_grad(ref))(mean)
  dev = np.abs(np.asarray(ratio_values) - 1)
  assert (dev > spec.clip_range).any() and (dev < spec.clip_range).any()   # both PPO branches
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6 * float(np.abs(g_ref).max()))
  assert float(np.abs(g_ref).max()) > 0


def test_guard_log_ratio_is_zero_mean_where_flow_grpo_is_biased():
  """x_{j+1} ~ N(μ_old, s²), μ_θ = μ_old + δ: E[log ρ_Flow-GRPO] = −mean(δ²)/(2s²) < 0, while
  GRPO-Guard's normalised log-ratio averages to 0 (both bias scopes)."""
  rng = np.random.default_rng(1)
  b, d, s = 4096, 64, 0.1
  old_mean = rng.normal(size=(b, d))
  delta = 0.05 * rng.normal(size=(b, d)) * rng.uniform(0.3, 1.7, size=(b, 1))
  x_next = old_mean + s * rng.normal(size=(b, d))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  std = jnp.float32(s)
  logp = gaussian_log_prob(f32(x_next), f32(old_mean + delta), std, 'mean')
  old_logp = gaussian_log_prob(f32(x_next), f32(old_mean), std, 'mean')
  se = lambda a: a.std(ddof=1) / np.sqrt(len(a))

  plain = np.asarray(logp - old_logp, np.float64)
  expected = -np.mean(delta ** 2) / (2 * s ** 2)
  assert abs(plain.mean() - expected) < 4 * se(plain)
  assert plain.mean() < -50 * se(plain)          # clearly negative

  for scope in ('batch', 'sample'):
    _, log_ratio, bias = grpo.guard_ratio(logp, old_logp, f32(old_mean + delta), f32(old_mean),
                                          std, 'mean', scope)
    guarded = np.asarray(log_ratio, np.float64)
    assert abs(guarded.mean()) < 4 * se(guarded), (scope, guarded.mean(), se(guarded))
    # The un-normalised ratio scaled the same way would sit far from 0.
    assert abs(s * plain.mean()) > 50 * se(guarded)
    np.testing.assert_allclose(np.asarray(bias).mean(), -expected, rtol=1e-4)
  # Per sample, the normalised log-ratio is exactly mean(ε ⊙ δ).
  eps = (x_next - old_mean) / s
  _, per_sample, _ = grpo.guard_ratio(logp, old_logp, f32(old_mean + delta), f32(old_mean), std,
                                      'mean', 'sample')
  np.testing.assert_allclose(per_sample, np.mean(eps * delta, axis=1), atol=2e-6)


def test_guard_configs():
  c = mini_testing.tiny_rl_config(guard_config, 'text')
  rl_config.validate(c)
  assert c.trainer == 'grpo_guard' and c.grpo.guard_bias == 'batch'
  spec = grpo.grpo_spec(c, ())
  assert spec.ratio == 'guard' and spec.guard_bias == 'batch'
  c.grpo.guard_bias = 'global'
  with pytest.raises(ConfigError, match=r'config\.grpo\.guard_bias'):
    rl_config.validate(c)
  # Flow-GRPO's configs neither need nor read the field.
  plain = grpo.grpo_spec(mini_testing.tiny_rl_config(grpo_config, 'text'), ())
  assert plain.ratio == 'flow_grpo'
  with pytest.raises(ValueError, match='grpo_guard.py'):
    guard_config.get_config('nope')
  # The baselines take GRPO-Guard as their algorithm.
  for module, mode in ((multitask_rl_config, 'joint'), (cascade_rl_config, 'cascade')):
    c = mini_testing.tiny_rl_config(module, 'grpo_guard')
    rl_config.validate(c)
    assert c.trainer == 'grpo_guard' and c.schedule.mode == mode
    assert c.data.tasks == guard_config.common.TASKS

