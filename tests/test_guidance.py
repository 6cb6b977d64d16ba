"""Classifier-free guidance: w = 1 runs only the conditional branch (as diffusers does), also
when w is a traced per-teacher scale selected inside jit."""

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.sampling.guidance import guided_velocity


def _network(calls):
  def velocity(x, timestep, cond):
    jax.debug.callback(lambda b: calls.append(int(b)), x.shape[0])   # runs only when executed
    return x * cond['context'][:, :1, None, None] + timestep[:, None, None, None] * 1e-3
  return velocity


def test_traced_scale_of_one_skips_the_unconditional_batch():
  x = jnp.ones((3, 2, 2, 1))
  cond, uncond = {'context': jnp.full((3, 4), 2.0)}, {'context': jnp.full((3, 4), 0.5)}
  t = jnp.full((3,), 500.0)
  calls = []
  fn = jax.jit(lambda w: guided_velocity(_network(calls), x, t, cond, uncond, w))
  v1 = fn(jnp.float32(1.0))
  jax.effects_barrier()
  assert calls == [3]                               # one B-batch call
  np.testing.assert_array_equal(v1, _network([])(x, t, cond))
  calls.clear()
  v = fn(jnp.float32(4.5))
  jax.effects_barrier()
  assert calls == [6]                               # one 2B call: cond and uncond together
  v_c, v_u = _network([])(x, t, cond), _network([])(x, t, uncond)
  np.testing.assert_allclose(v, v_u + 4.5 * (v_c - v_u), rtol=1e-6)
  calls.clear()
  guided_velocity(_network(calls), x, t, cond, uncond, 1.0)   # a Python scale decides at trace
  jax.effects_barrier()
  assert calls == [3]
