"""A small NNX text encoder for the mini world's tokenizer (the embedded default's "CLIP").

    tokens [B, L] (PAD = 0) → token + learned position embeddings
      → depth × pre-LN bidirectional transformer layers (padding never attended to)
      → LayerNorm → {'context': Linear → [B, L, Dc],
                     'pooled':  Linear(masked mean over real tokens) → [B, P],
                     'context_mask': tokens != PAD [B, L]}

The output is exactly the conditioning dict that `opd_jax.models.dit.DiT.__call__` takes
(`context`, `pooled`, `context_mask`), so the samplers, objectives and trainers see the same
conditioning they see with SD3's cached text embeddings. The encoder is trained jointly with the
base DiT during pretraining and then frozen: the RL and OPD stages encode every prompt once
(`opd_jax.mini_world.conditioning`) and never run it again.

Linears are `LoRALinear` with rank 0 (plain linears with logical-axis metadata), so the encoder's
parameters shard by the same rules as the DiT's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.mini_world import tokenizer
from opd_jax.models.lora import LoRALinear, split_model


class EncoderLayer(nnx.Module):
  """Pre-LN transformer layer: self-attention over the prompt tokens, then a GELU MLP."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'text encoder dim {dim} is not divisible by num_heads {num_heads}')
    self.num_heads = num_heads
    hidden = int(dim * mlp_ratio)
    lin = lambda i, o, axes: LoRALinear(i, o, rngs=rngs, logical_axes=axes)
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.qkv = lin(dim, 3 * dim, ('embed', 'heads'))
    self.out = lin(dim, dim, ('heads', 'embed'))
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.fc1 = lin(dim, hidden, ('embed', 'mlp'))
    self.fc2 = lin(hidden, dim, ('mlp', 'embed'))

  def __call__(self, x: jax.Array, attn_bias: jax.Array) -> jax.Array:
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    heads = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)
    att = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), bias=attn_bias)
    x = x + self.out(att.reshape(b, n, d))
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x)), approximate=True))


class TextEncoder(nnx.Module):
  """Token ids → the DiT's conditioning dict {'context', 'pooled', 'context_mask'}."""

  def __init__(self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float,
               context_dim: int, pooled_dim: int, rngs: nnx.Rngs,
               vocab_size: int = tokenizer.VOCAB_SIZE, max_len: int = tokenizer.MAX_LEN):
    init = nnx.initializers.normal(0.02)
    self.max_len = max_len
    self.token_embed = nnx.Param(init(rngs.params(), (vocab_size, dim), jnp.float32),
                                 logical_axes=(None, 'embed'))
    self.pos_embed = nnx.Param(init(rngs.params(), (max_len, dim), jnp.float32),
                               logical_axes=(None, 'embed'))
    self.layers = nnx.List([EncoderLayer(dim, num_heads, mlp_ratio, rngs=rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.context_proj = LoRALinear(dim, context_dim, rngs=rngs, logical_axes=('embed', None))
    self.pooled_proj = LoRALinear(dim, pooled_dim, rngs=rngs, logical_axes=('embed', None))

  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """Args: tokens int [B, L] from `tokenizer.encode` (PAD = 0, L <= max_len).

    Returns: {'context': float32 [B, L, Dc], 'pooled': float32 [B, P], 'context_mask': bool
    [B, L]}.
    """
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f'{length} tokens exceed the text encoder max_len {self.max_len}')
    mask = tokens != tokenizer.PAD_ID
    x = self.token_embed[...][tokens] + self.pos_embed[...][None, :length]
    # Padding is never a key; every prompt (even "") has BOS and EOS, so no row is empty.
    bias = jnp.where(mask, 0.0, -1e9)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, bias)
    x = self.norm(x)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return {'context': self.context_proj(x).astype(jnp.float32),
            'pooled': self.pooled_proj(pooled).astype(jnp.float32),
            'context_mask': mask}


def make_text_encoder(cfg, *, context_dim: int, pooled_dim: int, seed: int) -> TextEncoder:
  """Builds the encoder from a config section (dim, depth, num_heads, mlp_ratio).

  Args:
    cfg: the `text_encoder` config section.
    context_dim, pooled_dim: the DiT's conditioning widths (config.model.context_dim/pooled_dim).
    seed: parameter init seed.
  """
  return TextEncoder(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads,
                     mlp_ratio=cfg.mlp_ratio, context_dim=context_dim, pooled_dim=pooled_dim,
                     rngs=nnx.Rngs(seed))


def build_text_encoder(cfg, *, context_dim: int, pooled_dim: int,
                       seed: int) -> tuple[Any, nnx.State]:
  """(graphdef, parameter State with logical-axis metadata); the encoder has no LoRA slots."""
  graphdef, params, _ = split_model(make_text_encoder(cfg, context_dim=context_dim,
                                                      pooled_dim=pooled_dim, seed=seed))
  return graphdef, params


def encode_tokens(graphdef: Any, params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
  """Runs the encoder given as (graphdef, pure-dict params) on token ids [B, L]."""
  return nnx.merge(graphdef, params)(tokens)
