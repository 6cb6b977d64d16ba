"""The jitted rollout: determinism, per-sample noise, and the "ratio == 1" check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.models.dit import DiT
from opd_jax.models.lora import split_model
from opd_jax.sampling.step import KernelSpec, transition_mean as kernel_mean
from opd_jax.sampling.rollout import rollout
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.sampling.transitions import gaussian_log_prob

SIGMAS = flow_match_sigmas(6, 3.0)


def _make_model():
  m = DiT(latent_size=4, latent_channels=2, patch_size=2, dim=16, depth=1, num_heads=2,
          mlp_ratio=2, context_dim=8, pooled_dim=4, rngs=nnx.Rngs(0))
  # adaLN-Zero starts as the zero map; perturb every weight so the velocity is non-trivial.
  g, base, lora = split_model(m)
  base = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                      nnx.to_pure_dict(base))
  return g, base


_MODEL = _make_model()


def _velocity(x, timestep, cond):
  g, base = _MODEL
  return nnx.merge(g, base)(x, timestep, **cond)


def _cond(batch, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return ({'context': jax.random.normal(k1, (batch, 3, 8)),
           'pooled': jax.random.normal(k2, (batch, 4))},
          {'context': jnp.zeros((batch, 3, 8)), 'pooled': jnp.zeros((batch, 4))})


def _run(keys, cond, uncond, kernel='flow_grpo', a=0.7):
  fn = jax.jit(lambda k, c, u: rollout(_velocity, c, u, k, sigmas=SIGMAS, latent_shape=(4, 4, 2),
                                       kernel=kernel, noise_level=a, cfg_scale=4.5))
  return fn(keys, cond, uncond)


def _keys(n, seed=0):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))


def test_shapes_and_determinism():
  cond, uncond = _cond(3)
  a = _run(_keys(3), cond, uncond)
  b = _run(_keys(3), cond, uncond)
  assert a.latents.shape == (7, 3, 4, 4, 2) and a.means.shape == (6, 3, 4, 4, 2)
  assert a.stds.shape == (6,) and a.log_probs.shape == (6, 3) and a.sigmas.shape == (7,)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = _run(_keys(3, seed=1), cond, uncond)
  assert not np.allclose(a.latents[-1], c.latents[-1])


def test_samples_do_not_depend_on_batch_composition():
  cond, uncond = _cond(4)
  full = _run(_keys(4), cond, uncond)
  sub = _run(_keys(4)[2:], jax.tree.map(lambda x: x[2:], cond), jax.tree.map(lambda x: x[2:],
                                                                               uncond))
  np.testing.assert_allclose(full.latents[:, 2:], sub.latents, atol=1e-5)


@pytest.mark.parametrize('kernel,a', [('ode', 0.0), ('flow_grpo', 0.7), ('cps', 0.5)])
def test_recomputed_means_equal_recorded_means(kernel, a):
  """The ratio == 1 check: train-time means at the visited states equal the rollout's."""
  cond, uncond = _cond(2)
  traj = _run(_keys(2), cond, uncond, kernel, a)
  spec = KernelSpec(kernel, a)
  sig = jnp.asarray(SIGMAS)
  for j in range(len(SIGMAS) - 1):
    mean, std = kernel_mean(_velocity, traj.latents[j], sig[j], sig[j + 1], sig[1], cond, uncond,
                            4.5, spec)
    # Eager vs scanned-under-jit float32: XLA fuses differently per CPU, so means agree to a few
    # ulps of their size (|μ| ≈ 10 → ~1e-5); log p amplifies a mean difference δ by ε·δ/σ̄, so
    # it gets 1e-3. A wrong state, step or kernel differs by O(1) in both.
    np.testing.assert_allclose(mean, traj.means[j], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, traj.stds[j], rtol=1e-6)
    logp = gaussian_log_prob(traj.latents[j + 1], mean, std)
    np.testing.assert_allclose(logp, traj.log_probs[j], atol=1e-3)
    np.testing.assert_allclose(traj.latents[j + 1], traj.means[j] + traj.stds[j] *
                               traj.noise[j], atol=1e-5)


def test_ode_rollout_is_deterministic_given_initial_noise():
  cond, uncond = _cond(2)
  a = _run(_keys(2), cond, uncond, 'ode', 0.0)
  b = _run(_keys(2, seed=5), cond, uncond, 'ode', 0.0)
  x0 = a.latents[0]
  c = jax.jit(lambda: rollout(_velocity, cond, uncond, _keys(2, seed=5), sigmas=SIGMAS,
                              latent_shape=(4, 4, 2), cfg_scale=4.5, x_init=x0))()
  np.testing.assert_allclose(a.latents, c.latents, atol=2e-5)
  assert not np.allclose(a.latents[-1], b.latents[-1])
