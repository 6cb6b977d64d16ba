"""A small DiT-style flow-matching velocity network in Flax NNX (the embedded default's model).

It takes the same conditioning the SD3 MMDiT gets — a text token sequence plus a pooled text
vector — so samplers, objectives and trainers are shared with the real setting:

    latents [B, H, W, C] → patchify → tokens (+ fixed 2-D sin-cos positions)
    c = MLP(sinusoid(1000·t)) + Linear(pooled)
    [context tokens ; image tokens] → depth × adaLN-Zero transformer blocks (joint attention)
    image tokens → adaLN final layer → unpatchify → velocity [B, H, W, C]

All linears are `LoRALinear`, so the same network serves as frozen base, LoRA student and LoRA
teachers. Attention projections are named after diffusers' (to_q, to_k, to_v, to_out).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.lora import LoRALinear


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (network) timesteps t [B] → [B, dim], in float32."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position table [grid_h·grid_w, dim] (no parameters)."""
  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                       indexing='ij')
  emb = np.concatenate([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], axis=1)
  return emb.astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nnx.Module):
  """Pre-LN transformer block with adaLN-Zero modulation (gates start at zero)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs,
               lora: dict[str, Any], dtype: Any):
    self.num_heads = num_heads
    self.dtype = dtype
    hidden = int(dim * mlp_ratio)
    lin = lambda i, o, axes, **kw: LoRALinear(i, o, rngs=rngs, logical_axes=axes, dtype=dtype,
                                              **lora, **kw)
    self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.to_q = lin(dim, dim, ('embed', 'heads'))
    self.to_k = lin(dim, dim, ('embed', 'heads'))
    self.to_v = lin(dim, dim, ('embed', 'heads'))
    self.to_out = lin(dim, dim, ('heads', 'embed'))
    self.norm2 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.fc1 = lin(dim, hidden, ('embed', 'mlp'))
    self.fc2 = lin(hidden, dim, ('mlp', 'embed'))
    self.ada = lin(dim, 6 * dim, ('embed', 'mlp'), kernel_init=nnx.initializers.zeros_init())

  def __call__(self, x: jax.Array, c: jax.Array, attn_bias: jax.Array | None) -> jax.Array:
    b, n, d = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
    h = modulate(self.norm1(x), shift1, scale1)
    heads = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)
    q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
    att = jax.nn.dot_product_attention(q, k, v, bias=attn_bias)
    x = x + gate1[:, None] * self.to_out(att.reshape(b, n, d))
    h = modulate(self.norm2(x), shift2, scale2)
    x = x + gate2[:, None] * self.fc2(nnx.gelu(self.fc1(h), approximate=True))
    return x


class DiT(nnx.Module):
  """Velocity network v(x_t, 1000·t, text) for rectified flow (spec §2)."""

  def __init__(self, *, latent_size: int, latent_channels: int, patch_size: int, dim: int,
               depth: int, num_heads: int, mlp_ratio: float, context_dim: int, pooled_dim: int,
               rngs: nnx.Rngs, lora_rank: int = 0, lora_alpha: float = 1.0,
               lora_init: str = 'gaussian', dtype: Any = jnp.float32):
    if latent_size % patch_size:
      raise ValueError(f'latent_size {latent_size} is not divisible by patch_size {patch_size}')
    if dim % num_heads:
      raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
    self.patch_size, self.latent_channels, self.dim = patch_size, latent_channels, dim
    self.grid = latent_size // patch_size
    self.dtype = dtype
    lora = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_init=lora_init)
    lin = lambda i, o, axes, **kw: LoRALinear(i, o, rngs=rngs, logical_axes=axes, dtype=dtype,
                                              **lora, **kw)
    patch_dim = patch_size * patch_size * latent_channels
    self.x_embedder = lin(patch_dim, dim, (None, 'embed'))
    self.t_fc1 = lin(256, dim, (None, 'embed'))
    self.t_fc2 = lin(dim, dim, ('embed', 'mlp'))
    self.pooled_embedder = lin(pooled_dim, dim, (None, 'embed'))
    self.context_embedder = lin(context_dim, dim, (None, 'embed'))
    self.blocks = nnx.List([DiTBlock(dim, num_heads, mlp_ratio, rngs=rngs, lora=lora,
                                     dtype=dtype) for _ in range(depth)])
    self.norm_out = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, rngs=rngs)
    self.ada_out = lin(dim, 2 * dim, ('embed', 'mlp'), kernel_init=nnx.initializers.zeros_init())
    self.proj_out = lin(dim, patch_dim, ('embed', None), kernel_init=nnx.initializers.zeros_init())

  def patchify(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def unpatchify(self, x: jax.Array) -> jax.Array:
    b, p, g, c = x.shape[0], self.patch_size, self.grid, self.latent_channels
    x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, c)

  def __call__(self, x: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Args: x [B,H,W,C] latents; timestep [B] = 1000·t; context [B,L,Dc]; pooled [B,P];
    context_mask [B,L] (True = real token) or None. Returns the velocity [B,H,W,C] (float32)."""
    b = x.shape[0]
    pos = jnp.asarray(sincos_pos_embed(self.dim, self.grid, self.grid), self.dtype)  # trace-time constant
    img = self.x_embedder(self.patchify(x)) + pos[None]
    ctx = self.context_embedder(context)
    c = self.t_fc2(nnx.silu(self.t_fc1(timestep_embedding(timestep, 256))))
    c = c + self.pooled_embedder(pooled)
    tokens = jnp.concatenate([ctx, img], axis=1)
    attn_bias = None
    if context_mask is not None:
      keep = jnp.concatenate([context_mask.astype(bool),
                              jnp.ones((b, img.shape[1]), bool)], axis=1)
      # Padding tokens are never attended to; a large negative bias keeps masked rows finite.
      attn_bias = jnp.where(keep, 0.0, -1e9).astype(self.dtype)[:, None, None, :]
    for block in self.blocks:
      tokens = block(tokens, c, attn_bias)
    img = tokens[:, ctx.shape[1]:]
    shift, scale = jnp.split(self.ada_out(nnx.silu(c)), 2, axis=-1)
    img = self.proj_out(modulate(self.norm_out(img), shift, scale))
    return self.unpatchify(img).astype(jnp.float32)
