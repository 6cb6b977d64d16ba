"""Attention implementations by name compute the same attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models.attention import dot_product_attention


@pytest.mark.parametrize('with_bias', [False, True])
def test_einsum_attention_equals_jax_attention(with_bias):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(kk, (2, 7, 3, 8)) for kk in keys[:3])
  q = q * 3.0   # peaked softmax
  bias = (jnp.where(jax.random.uniform(keys[3], (2, 1, 1, 7)) < 0.3, -1e9, 0.0)
          if with_bias else None)
  ref = jax.nn.dot_product_attention(q, k, v, bias=bias)
  for impl in ('', 'xla', 'einsum'):
    np.testing.assert_allclose(dot_product_attention(q, k, v, bias, impl), ref, atol=2e-6)
  with pytest.raises(ValueError, match='config.model.attention'):
    dot_product_attention(q, k, v, bias, 'flash')


def _qkv_bias(batch=2, length=20, heads=2, dim=8):
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  q, k, v = (jax.random.normal(kk, (batch, length, heads, dim)) for kk in keys[:3])
  bias = jnp.where(jax.random.uniform(keys[3], (batch, 1, 1, length)) < 0.3, -1e9, 0.0)
  return q * 3.0, k, v, bias


def test_splash_attention_equals_einsum_forward_and_gradient():
  """The Pallas splash kernel (Pallas' interpreter on CPU): 20 tokens padded to one 128 block,
  a key-padding bias as segment ids; values and the kernel's own backward pass."""
  q, k, v, bias = _qkv_bias()
  for b in (None, bias):
    np.testing.assert_allclose(dot_product_attention(q, k, v, b, 'splash'),
                               dot_product_attention(q, k, v, b, 'einsum'), atol=5e-6)

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, bias, impl)))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  for got, want in zip(grads('splash'), grads('einsum')):
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_splash_attention_under_batch_sharding_runs_per_device():
  """With an active batch sharding the kernel runs in a shard_map over the batch axes (XLA
  cannot partition a Pallas call); the result equals the unsharded one."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from opd_jax.parallel.mesh import make_mesh
  from opd_jax.parallel.sharding import batch_sharded_activations, batch_sharding
  mesh = make_mesh({'data': 1, 'fsdp': 4, 'tensor': 1}, jax.devices()[:4])
  q, k, v, bias = _qkv_bias(batch=4)
  sharding = batch_sharding(mesh, 1)

  @jax.jit
  def sharded(q, k, v, bias):
    with batch_sharded_activations(sharding):
      return dot_product_attention(q, k, v, bias, 'splash')

  placed = [jax.device_put(x, NamedSharding(mesh, P('fsdp'))) for x in (q, k, v, bias)]
  hlo = sharded.lower(*placed).as_text()
  assert 'shard_map' in hlo or 'manual' in hlo.lower()
  out = sharded(*placed)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, bias, 'einsum'), atol=5e-6)
