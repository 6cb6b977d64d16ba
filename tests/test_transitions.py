"""Transition kernels (Eq. 5–7) and their Gaussian log-probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.sampling.transitions import (KERNELS, euler_ode, flow_grpo_sde,
                                          gaussian_log_prob)

SIGMAS = flow_match_sigmas(10, 3.0)


def _xv(seed=0, shape=(3, 4, 4, 2)):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, shape), jax.random.normal(k2, shape),
          jax.random.normal(k3, shape))


@pytest.mark.parametrize('kernel', sorted(KERNELS))
@pytest.mark.parametrize('j', [0, 4, 9])
def test_zero_noise_is_euler(kernel, j):
  x, v, eps = _xv()
  t, t_next = SIGMAS[j], SIGMAS[j + 1]
  got = KERNELS[kernel](x, v, t, t_next, eps, noise_level=0.0, sigma_1=SIGMAS[1])
  ref = euler_ode(x, v, t, t_next, eps)
  np.testing.assert_allclose(got.mean, x + (t_next - t) * v, atol=1e-6)
  np.testing.assert_allclose(got.next, ref.next, atol=1e-6)
  assert float(got.std) == 0.0


@pytest.mark.parametrize('j', [0, 1, 5, 9])
@pytest.mark.parametrize('a', [0.3, 0.7, 1.0])
def test_flow_grpo_matches_eq7_written_out(j, a):
  x, v, eps = _xv(1)
  t, t_next = np.float64(SIGMAS[j]), np.float64(SIGMAS[j + 1])
  dt = t_next - t
  denom = 1 - (SIGMAS[1] if t == 1.0 else t)       # the reference's t = 1 substitute
  sigma_t = a * np.sqrt(t / denom)
  xn, vn, en = (np.asarray(z, np.float64) for z in (x, v, eps))
  mean = ((1 + sigma_t**2 * dt / (2 * t)) * xn
          + (1 + sigma_t**2 * (1 - t) / (2 * t)) * vn * dt)
  std = sigma_t * np.sqrt(-dt)
  got = flow_grpo_sde(x, v, SIGMAS[j], SIGMAS[j + 1], eps, noise_level=a, sigma_1=SIGMAS[1])
  np.testing.assert_allclose(got.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(got.std), std, rtol=1e-5)
  np.testing.assert_allclose(got.next, mean + std * en, rtol=1e-5, atol=1e-5)
  assert np.isfinite(float(got.std))


@pytest.mark.parametrize('reduction', ['sum', 'mean'])
def test_log_prob_is_gaussian_density(reduction):
  x, mean, _ = _xv(2)
  std = jnp.float32(0.37)
  got = gaussian_log_prob(x, mean, std, reduction)
  xn, mn = np.asarray(x, np.float64), np.asarray(mean, np.float64)
  dens = np.exp(-(xn - mn)**2 / (2 * 0.37**2)) / (np.sqrt(2 * np.pi) * 0.37)
  per = np.log(dens).reshape(x.shape[0], -1)
  ref = per.sum(1) if reduction == 'sum' else per.mean(1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_log_prob_of_deterministic_step_is_zero():
  x, mean, _ = _xv(3)
  got = gaussian_log_prob(x, mean, jnp.float32(0.0))
  assert np.all(np.asarray(got) == 0.0)


def test_float32_math_with_bfloat16_inputs():
  x, v, eps = _xv(4)
  got = flow_grpo_sde(x.astype(jnp.bfloat16), v.astype(jnp.bfloat16), SIGMAS[3], SIGMAS[4],
                      eps, noise_level=0.7, sigma_1=SIGMAS[1])
  assert got.mean.dtype == jnp.float32 and got.next.dtype == jnp.float32


def test_unknown_kernel():
  from opd_jax.sampling.transitions import get_kernel
  with pytest.raises(ValueError, match='unknown sampler kernel'):
    get_kernel('heun')
