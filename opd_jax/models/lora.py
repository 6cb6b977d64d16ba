"""LoRA for Flax NNX with the adapter kept apart from the frozen base.

Base weights are `nnx.Param`; adapter weights are `LoRAParam`, a distinct Variable type, so one
`nnx.split(model, nnx.Param, LoRAParam)` yields two independent pytrees: the frozen base and one
adapter. The student adapter (trainable) and K teacher adapters (frozen, stacked on a leading
axis) are all pytrees of the adapter's structure; `select_adapter` picks teacher k with a traced
index, so switching teachers inside a jitted function never recompiles.

The LoRA scale alpha/r is a static module attribute, not a parameter: an adapter trained with a
different alpha/rank is folded into this layout on import (B scaled by its own alpha/r over ours,
rank zero-padded), so no scale ever reaches the optimizer.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LogicalAxes = tuple[str | None, ...]


class LoRAParam(nnx.Variable):
  """Low-rank adapter weights (A: [in, r], B: [r, out])."""


def lora_init_a(key: jax.Array, shape: Sequence[int], rank: int,
                init: str = 'gaussian') -> jax.Array:
  """PEFT-compatible init of A ('gaussian': N(0, 1/r²); 'kaiming': kaiming-uniform a=√5)."""
  if init == 'gaussian':
    return jax.random.normal(key, shape, jnp.float32) / rank
  if init == 'kaiming':
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  raise ValueError(f'unknown LoRA init {init!r}; expected gaussian or kaiming')


class LoRALinear(nnx.Module):
  """y = x W + b + (alpha/r) · (x A) B, with W, b frozen base and A, B a LoRA adapter.

  rank 0 gives a plain linear layer with no adapter variables (full-weight training).
  `out_dtype` (default: `dtype`) is the dtype of the products and the result: float32 with a
  bfloat16 `dtype` multiplies in bfloat16 and accumulates, adds the adapter and the bias in
  float32, so a small adapter delta is not rounded away against a large base output.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               use_bias: bool = True, lora_rank: int = 0, lora_alpha: float = 1.0,
               lora_init: str = 'gaussian', logical_axes: LogicalAxes = ('embed', 'mlp'),
               kernel_init=nnx.initializers.lecun_normal(), dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, out_dtype: Any = None):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    self.out_dtype = out_dtype
    self.lora_rank = lora_rank
    self.lora_scale = float(lora_alpha) / lora_rank if lora_rank else 0.0
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                            logical_axes=tuple(logical_axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype),
                           logical_axes=(logical_axes[1],)) if use_bias else None)
    if lora_rank:
      self.lora_a = LoRAParam(
          lora_init_a(rngs.params(), (in_features, lora_rank), lora_rank, lora_init),
          logical_axes=(logical_axes[0], None))
      self.lora_b = LoRAParam(jnp.zeros((lora_rank, out_features), jnp.float32),
                              logical_axes=(None, logical_axes[1]))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    out = self.out_dtype or self.dtype
    y = jnp.matmul(x, self.kernel[...].astype(self.dtype), preferred_element_type=out)
    if self.lora_rank:
      xa = jnp.matmul(x, self.lora_a[...].astype(self.dtype), preferred_element_type=out)
      y = y + self.lora_scale * (xa @ self.lora_b[...].astype(out))
    if self.bias is not None:
      y = y + self.bias[...].astype(out)
    return y


def split_model(model: nnx.Module):
  """Splits a model into (graphdef, base Param state, LoRA adapter state)."""
  return nnx.split(model, nnx.Param, LoRAParam)


def stack_adapters(adapters: Sequence[Any]) -> Any:
  """Stacks K adapter pytrees of one structure on a new leading axis (teacher slots)."""
  if not adapters:
    raise ValueError('stack_adapters needs at least one adapter')
  return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def select_adapter(stacked: Any, index: jax.Array) -> Any:
  """Adapter `index` of a stacked pytree; `index` may be traced (no recompilation)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False),
                      stacked)


def zeros_like_adapter(adapter: Any) -> Any:
  """An adapter whose delta is exactly zero (B = 0): the base model's behaviour."""
  return jax.tree.map(jnp.zeros_like, adapter)


def fold_adapter(a: jax.Array, b: jax.Array, alpha: float, rank: int,
                 target_rank: int, target_scale: float) -> tuple[jax.Array, jax.Array]:
  """Re-expresses an adapter (A [in, r], B [r, out], scale alpha/r) in a layer's layout.

  The product (alpha/r)·A·B is preserved exactly: B absorbs the ratio of scales and the rank is
  zero-padded up to `target_rank` (extra rows of B are zero, so extra columns of A are inert).
  """
  if rank > target_rank:
    raise ValueError(f'adapter rank {rank} exceeds the model LoRA rank {target_rank}; '
                     'raise config.lora.rank')
  b = b * ((alpha / rank) / target_scale)
  pad = target_rank - rank
  a = jnp.pad(a, ((0, 0), (0, pad)))
  b = jnp.pad(b, ((0, pad), (0, 0)))
  return a, b
