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
