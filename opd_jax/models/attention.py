"""Scaled dot-product attention by name (`config.model.attention`).

Every implementation takes q, k, v [B, T, N, H] and an optional additive bias broadcastable to
[B, N, T, S], computes the logits and the softmax in float32, and returns [B, T, N, H]:

  ''        `jax.nn.dot_product_attention`, implementation chosen by JAX
  'xla'     `jax.nn.dot_product_attention(implementation='xla')`
  'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')` (GPU: cuDNN flash attention)
  'einsum'  heads moved in front of the tokens ([B, N, T, H]) before the two batched matmuls
            — on XLA:CPU faster than the token-major form (benchmarks/results/attention_cpu.md)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('', 'xla', 'cudnn', 'einsum')


def heads_major(q: jax.Array, k: jax.Array, v: jax.Array,
                bias: jax.Array | None = None) -> jax.Array:
  """softmax(q·kᵀ/√H + bias)·v with [B, N, T, H] operands; logits and softmax in float32."""
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum('bnth,bnsh->bnts', qh, kh, preferred_element_type=jnp.float32)
  logits = logits * np.float32(1.0 / np.sqrt(q.shape[-1]))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bnsh->bnth', probs, vh).transpose(0, 2, 1, 3)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          bias: jax.Array | None = None, implementation: str = '') -> jax.Array:
  if implementation == 'einsum':
    return heads_major(q, k, v, bias)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention: {implementation!r} is not one of '
                     f'{list(IMPLEMENTATIONS)}')
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=implementation or None)
