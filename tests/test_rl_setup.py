"""Gradient accumulation of the RL updates (opd_jax/rl/setup.py: microbatched_value_and_grad)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.rl.setup import microbatched_value_and_grad


@pytest.mark.parametrize('n', [1, 2, 4])
def test_micro_batches_give_the_minibatch_mean_and_its_gradient(n):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  params = {'w': jnp.asarray(rng.standard_normal(3), jnp.float32), 'b': jnp.float32(0.3)}
  seen = []

  def loss_fn(p, rows, j):
    seen.append(rows.shape)
    err = jnp.take(x, rows, axis=0) @ p['w'] + p['b'] - 1.0
    return jnp.mean(err ** 2), {'err': err}

  rows = jnp.asarray(rng.permutation(8))
  loss, aux, grads = jax.jit(lambda p: microbatched_value_and_grad(loss_fn, p, rows, n))(params)
  want_loss, want_grads = jax.value_and_grad(
      lambda p: jnp.mean((jnp.take(x, rows, axis=0) @ p['w'] + p['b'] - 1.0) ** 2))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for k in params:
    np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-7)
  assert seen[-1] == (8 // n,) and aux['err'].shape == (n, 8 // n)
