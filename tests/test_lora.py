"""LoRA layers: separate adapter pytrees, traced teacher selection, adapter folding."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.lora import (LoRALinear, LoRAParam, fold_adapter, select_adapter,
                                 split_model, stack_adapters, zeros_like_adapter)


def _layer(rank=4, alpha=8.0):
  return LoRALinear(6, 5, rngs=nnx.Rngs(0), lora_rank=rank, lora_alpha=alpha)


def test_adapter_is_a_separate_pytree_and_starts_as_identity():
  layer = _layer()
  g, base, lora = split_model(layer)
  assert set(nnx.to_pure_dict(base)) == {'kernel', 'bias'}
  assert set(nnx.to_pure_dict(lora)) == {'lora_a', 'lora_b'}
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 6))
  np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + layer.bias[...], atol=1e-6)


def test_forward_matches_formula_and_rank_zero_has_no_adapter():
  layer = _layer()
  layer.lora_b[...] = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 6))
  ref = x @ layer.kernel[...] + layer.bias[...] + 2.0 * (x @ layer.lora_a[...]) @ layer.lora_b[...]
  np.testing.assert_allclose(layer(x), ref, atol=1e-5)
  plain = LoRALinear(6, 5, rngs=nnx.Rngs(0))
  assert not nnx.state(plain, LoRAParam)


def test_traced_teacher_selection_does_not_recompile():
  layer = _layer()
  g, base, lora = split_model(layer)
  base, lora = nnx.to_pure_dict(base), nnx.to_pure_dict(lora)
  teachers = [jax.tree.map(lambda x, k=k: x + k, lora) for k in range(3)]
  stacked = stack_adapters(teachers)
  traces = []

  @jax.jit
  def apply(k, x):
    traces.append(1)
    return nnx.merge(g, base, select_adapter(stacked, k))(x)

  x = jnp.ones((2, 6))
  outs = [apply(jnp.int32(k), x) for k in range(3)]
  assert len(traces) == 1
  for k in range(3):
    np.testing.assert_allclose(outs[k], nnx.merge(g, base, teachers[k])(x), atol=1e-5)
  zero = nnx.merge(g, base, zeros_like_adapter(lora))(x)
  np.testing.assert_allclose(zero, x @ base['kernel'] + base['bias'], atol=1e-6)


def test_fold_adapter_preserves_the_update():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((6, 2)), rng.standard_normal((2, 5))
  fa, fb = fold_adapter(jnp.asarray(a), jnp.asarray(b), alpha=16.0, rank=2, target_rank=4,
                        target_scale=8.0 / 4)
  assert fa.shape == (6, 4) and fb.shape == (4, 5)
  np.testing.assert_allclose((8.0 / 4) * fa @ fb, (16.0 / 2) * a @ b, rtol=1e-5)


def test_float32_products_keep_a_small_adapter_delta_that_bfloat16_rounds_away():
  def layer(dtype, out_dtype=None):
    l = LoRALinear(256, 64, rngs=nnx.Rngs(0), lora_rank=4, lora_alpha=4.0, dtype=dtype,
                   param_dtype=jnp.bfloat16, out_dtype=out_dtype)
    l.lora_b[...] = 1e-3 * jax.random.normal(jax.random.PRNGKey(2), (4, 64))
    return l
  x = jax.random.normal(jax.random.PRNGKey(3), (32, 256))
  reference = layer(jnp.float32)
  delta = reference(x) - (x @ reference.kernel[...].astype(jnp.float32) +
                          reference.bias[...].astype(jnp.float32))
  err = {}
  for name, l in (('bf16', layer(jnp.bfloat16)), ('bf16→f32', layer(jnp.bfloat16, jnp.float32))):
    y = l(x)
    assert y.dtype == (jnp.bfloat16 if name == 'bf16' else jnp.float32)
    base = jnp.matmul(x.astype(jnp.bfloat16), l.kernel[...], preferred_element_type=jnp.float32)
    got = y.astype(jnp.float32) - base - l.bias[...].astype(jnp.float32)
    err[name] = float(jnp.linalg.norm(got - delta) / jnp.linalg.norm(delta))
  assert err['bf16→f32'] < 0.05 < err['bf16'], err
