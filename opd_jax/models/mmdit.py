"""The SD3 / SD3.5 MMDiT (diffusers' `SD3Transformer2DModel`) in Flax NNX, NHWC at the interface.

    latents [B, H, W, C] → patch conv + a crop of the fixed position table → image tokens
    temb = MLP(sinusoid(1000·t)) + MLP(pooled text)          text tokens = Linear(context)
    num_layers × joint block: adaLN-Zero on both streams, one attention over [image ; text]
      (SD3.5: RMS qk-norm; MMDiT-X layers add a second, image-only attention), GELU-tanh MLPs;
      the last block is `context_pre_only` (the text stream is read but no longer updated)
    image tokens → AdaLayerNormContinuous(temb) → Linear → unpatchify → velocity [B, H, W, C]

Modules and attributes are named after diffusers' (`transformer_blocks[i].attn.to_q`,
`norm1.linear`, …) so a parameter's checkpoint key is its NNX path joined with dots, up to the
few renames in `TORCH_KEY_RENAMES`; `opd_jax.models.loading` and `opd_jax.models.peft_io` rely
on that. Every linear is a `LoRALinear`; only modules matched by `lora_targets` (PEFT's
`target_modules` rules, on diffusers module names) get an adapter slot, the rest are rank 0.

The call signature is `opd_jax.models.dit.DiT`'s, so samplers, objectives and trainers are
shared between the mini world and SD3.5-M.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models.attention import dot_product_attention
from opd_jax.models.lora import LoRALinear
from opd_jax.models.peft_io import RECIPE_LORA_TARGETS, matches_target
from opd_jax.parallel.sharding import constrain_batch

# NNX module path → diffusers module path. diffusers' FeedForward keeps its layers in a
# ModuleList with a Dropout at index 1 (`net.0.proj`, `net.2`); we name them directly.
TORCH_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    (r'(^|\.)(ff|ff_context)\.fc_in$', r'\1\2.net.0.proj'),
    (r'(^|\.)(ff|ff_context)\.fc_out$', r'\1\2.net.2'),
)

_LAYER_NORM_EPS = 1e-6
_QK_NORMS = (None, 'rms_norm')


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Sizes of an `SD3Transformer2DModel`, field for field as in its `config.json`."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int | None = 16
  pos_embed_max_size: int | None = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> 'MMDiTConfig':
    """Builds a config from a diffusers `config.json` dict (keys starting with `_` ignored).

    Raises:
      ValueError: on keys this implementation does not know (a newer architecture variant).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith('_') and k not in fields)
    if unknown:
      raise ValueError(f'unsupported SD3Transformer2DModel config keys {unknown}')
    kwargs = {k: v for k, v in config.items() if k in fields}
    if 'dual_attention_layers' in kwargs:
      kwargs['dual_attention_layers'] = tuple(int(i) for i in kwargs['dual_attention_layers'])
    return cls(**kwargs)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  def validate(self) -> None:
    if self.qk_norm not in _QK_NORMS:
      raise ValueError(f'qk_norm {self.qk_norm!r} is not supported; expected one of {_QK_NORMS}')
    if self.pos_embed_max_size is None:
      raise ValueError('pos_embed_max_size must be set (every SD3/SD3.5 checkpoint sets it)')
    if self.caption_projection_dim != self.inner_dim:
      # The joint attention's add_*_proj read the projected captions at the model width.
      raise ValueError(f'caption_projection_dim {self.caption_projection_dim} must equal '
                       f'num_attention_heads·attention_head_dim = {self.inner_dim}')
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f'dual_attention_layers {bad} out of range for {self.num_layers} layers')


def layer_norm(x: jax.Array, eps: float = _LAYER_NORM_EPS) -> jax.Array:
  """LayerNorm without affine parameters, with statistics in float32 whatever x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_embedding(timestep: jax.Array, dim: int = 256,
                       max_period: float = 10000.0) -> jax.Array:
  """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin](t·f).

  The frequencies are a host constant rounded like torch's float32 ones: at t ≈ 1000 the
  arguments reach 10³ rad, so a one-ulp difference in f would already move the embedding by 1e-4.
  """
  half = dim // 2
  exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = timestep.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


def sd3_pos_embed_table(dim: int, grid: int, base_size: int) -> jax.Array:
  """diffusers' `get_2d_sincos_pos_embed(dim, grid, base_size)` as a [1, grid², dim] array.

  Only a fresh model's initial value: checkpoints store the table (a persistent buffer) and the
  loader overwrites it. Positions are rescaled to `base_size`; the first half of the channels
  encodes the column (w) and the second half the row (h), as in diffusers.
  """
  pos = jnp.arange(grid, dtype=jnp.float32) / (grid / base_size)
  omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim / 4.0))

  def one_axis(p):
    out = p.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)
  rows, cols = jnp.meshgrid(pos, pos, indexing='ij')
  table = jnp.concatenate([one_axis(cols), one_axis(rows)], axis=1)
  return table[None]


class RMSNorm(nnx.Module):
  """diffusers' RMSNorm with a learned scale (`weight`), statistics in float32."""

  def __init__(self, dim: int, eps: float = 1e-6, param_dtype: Any = jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class _Linears:
  """Builds `LoRALinear`s, giving an adapter slot only to modules matched by `targets`."""

  def __init__(self, rngs: nnx.Rngs, *, rank: int, alpha: float, init: str,
               targets: Sequence[str] | str, dtype: Any, param_dtype: Any,
               out_dtype: Any = None):
    self.rngs, self.rank, self.alpha, self.init = rngs, rank, alpha, init
    self.targets, self.dtype, self.param_dtype = targets, dtype, param_dtype
    self.out_dtype = out_dtype

  def in_float32(self) -> '_Linears':
    """The same builder computing in float32 (same parameters, same RNG stream)."""
    return _Linears(self.rngs, rank=self.rank, alpha=self.alpha, init=self.init,
                    targets=self.targets, dtype=jnp.float32, param_dtype=self.param_dtype)

  def __call__(self, path: str, din: int, dout: int, axes: tuple) -> LoRALinear:
    """`path` is the layer's diffusers module name (what PEFT's target_modules match)."""
    rank = self.rank if self.rank and matches_target(path, self.targets) else 0
    return LoRALinear(din, dout, rngs=self.rngs, lora_rank=rank, lora_alpha=self.alpha,
                      lora_init=self.init, logical_axes=axes, dtype=self.dtype,
                      param_dtype=self.param_dtype, out_dtype=self.out_dtype)


class AdaModulation(nnx.Module):
  """The `linear` of diffusers' AdaLayerNorm* modules: n chunks of Linear(SiLU(temb))."""

  def __init__(self, path: str, dim: int, chunks: int, lin: _Linears):
    self.chunks = chunks
    self.linear = lin(f'{path}.linear', dim, chunks * dim, ('embed', 'mlp'))

  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    return jnp.split(self.linear(nnx.silu(temb)), self.chunks, axis=-1)


class FeedForward(nnx.Module):
  """diffusers' FeedForward(activation_fn='gelu-approximate'): Linear → GELU(tanh) → Linear."""

  def __init__(self, path: str, dim: int, lin: _Linears, mult: int = 4):
    self.fc_in = lin(f'{path}.net.0.proj', dim, mult * dim, ('embed', 'mlp'))
    self.fc_out = lin(f'{path}.net.2', mult * dim, dim, ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc_out(jax.nn.gelu(self.fc_in(x), approximate=True))


class Attention(nnx.Module):
  """diffusers' Attention with JointAttnProcessor2_0.

  With `joint=True` (the MMDiT attention) text tokens get their own projections (add_*_proj),
  attention runs over [image ; text] and the text part leaves through `to_add_out` unless
  `context_pre_only`. With `joint=False` it is plain self-attention (MMDiT-X's `attn2`).
  """

  def __init__(self, path: str, dim: int, heads: int, head_dim: int, *, joint: bool,
               context_pre_only: bool, qk_norm: str | None, lin: _Linears,
               attention_impl: str | None, param_dtype: Any):
    self.heads, self.head_dim = heads, head_dim
    self.context_pre_only = context_pre_only
    self.attention_impl = attention_impl
    inner = heads * head_dim
    qkv = lambda name: lin(f'{path}.{name}', dim, inner, ('embed', 'heads'))
    norm = lambda: RMSNorm(head_dim, param_dtype=param_dtype) if qk_norm else None
    self.to_q, self.to_k, self.to_v = qkv('to_q'), qkv('to_k'), qkv('to_v')
    self.norm_q, self.norm_k = norm(), norm()
    self.to_out = nnx.List([lin(f'{path}.to_out.0', inner, dim, ('heads', 'embed'))])
    if joint:
      self.add_q_proj, self.add_k_proj = qkv('add_q_proj'), qkv('add_k_proj')
      self.add_v_proj = qkv('add_v_proj')
      self.norm_added_q, self.norm_added_k = norm(), norm()
      self.to_add_out = (None if context_pre_only else
                         lin(f'{path}.to_add_out', inner, dim, ('heads', 'embed')))
    self.joint = joint

  def _heads(self, y: jax.Array) -> jax.Array:
    return y.reshape(y.shape[0], y.shape[1], self.heads, self.head_dim)

  def _project(self, x, to_q, to_k, to_v, norm_q, norm_k):
    q, k, v = self._heads(to_q(x)), self._heads(to_k(x)), self._heads(to_v(x))
    if norm_q is not None:
      q, k = norm_q(q), norm_k(k)
    return q, k, v

  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_bias: jax.Array | None = None):
    """x [B, N, D] image tokens; context [B, L, D] text tokens (joint only).

    Returns the image output, or (image output, text output or None) for the joint attention.
    `context_bias` [B, 1, 1, L] is added to the logits of text keys (masking padded tokens).
    """
    q, k, v = self._project(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    bias = None
    if self.joint:
      cq, ck, cv = self._project(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                 self.norm_added_q, self.norm_added_k)
      q, k, v = (jnp.concatenate(p, axis=1) for p in ((q, cq), (k, ck), (v, cv)))
      if context_bias is not None:
        bias = jnp.concatenate([jnp.zeros(context_bias.shape[:-1] + (x.shape[1],),
                                          context_bias.dtype), context_bias], axis=-1)
    dtype = self.to_q.dtype   # attention inputs in the compute dtype (logits, softmax: float32)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    out = dot_product_attention(q, k, v, None if bias is None else bias.astype(dtype),
                                self.attention_impl or '')
    out = out.reshape(out.shape[0], out.shape[1], -1)
    n = x.shape[1]
    img = self.to_out[0](out[:, :n])
    if not self.joint:
      return img
    ctx = None if self.context_pre_only else self.to_add_out(out[:, n:])
    return img, ctx


class JointTransformerBlock(nnx.Module):
  """diffusers' JointTransformerBlock (adaLN-Zero MMDiT block, optionally MMDiT-X)."""

  def __init__(self, path: str, dim: int, heads: int, head_dim: int, *, context_pre_only: bool,
               qk_norm: str | None, use_dual_attention: bool, lin: _Linears,
               attention_impl: str | None, param_dtype: Any):
    self.context_pre_only = context_pre_only
    self.use_dual_attention = use_dual_attention
    self.norm1 = AdaModulation(f'{path}.norm1', dim, 9 if use_dual_attention else 6, lin)
    # The last block only reads the text stream: AdaLayerNormContinuous (scale, shift), no MLP.
    self.norm1_context = AdaModulation(f'{path}.norm1_context', dim,
                                       2 if context_pre_only else 6, lin)
    attn = dict(qk_norm=qk_norm, lin=lin, attention_impl=attention_impl,
                param_dtype=param_dtype)
    self.attn = Attention(f'{path}.attn', dim, heads, head_dim, joint=True,
                          context_pre_only=context_pre_only, **attn)
    self.attn2 = (Attention(f'{path}.attn2', dim, heads, head_dim, joint=False,
                            context_pre_only=False, **attn) if use_dual_attention else None)
    self.ff = FeedForward(f'{path}.ff', dim, lin)
    self.ff_context = None if context_pre_only else FeedForward(f'{path}.ff_context', dim, lin)

  def __call__(self, hidden: jax.Array, context: jax.Array, temb: jax.Array,
               context_bias: jax.Array | None = None):
    """Returns (context or None for the last block, hidden)."""
    mod = self.norm1(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    normed = layer_norm(hidden)
    norm_hidden = modulate(normed, shift_msa, scale_msa)
    if self.context_pre_only:
      c_scale, c_shift = self.norm1_context(temb)
      norm_context = modulate(layer_norm(context), c_shift, c_scale)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
          self.norm1_context(temb))
      norm_context = modulate(layer_norm(context), c_shift_msa, c_scale_msa)

    attn_out, context_attn_out = self.attn(norm_hidden, norm_context, context_bias)
    hidden = hidden + gate_msa[:, None] * attn_out
    if self.use_dual_attention:
      # SD35AdaLayerNormZeroX: the second attention reads the same normalised input, modulated
      # by its own (shift, scale), before the first attention's residual is added.
      shift_msa2, scale_msa2, gate_msa2 = mod[6:]
      hidden = hidden + gate_msa2[:, None] * self.attn2(modulate(normed, shift_msa2, scale_msa2))
    hidden = hidden + gate_mlp[:, None] * self.ff(modulate(layer_norm(hidden), shift_mlp,
                                                           scale_mlp))
    if self.context_pre_only:
      return None, hidden
    context = context + c_gate_msa[:, None] * context_attn_out
    context = context + c_gate_mlp[:, None] * self.ff_context(
        modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
    return context, hidden


class PatchEmbed(nnx.Module):
  """Patch conv plus the centre crop of a fixed [max², D] position table (SD3 cropping)."""

  def __init__(self, cfg: MMDiTConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    dim, p = cfg.inner_dim, cfg.patch_size
    self.patch_size, self.max_size = p, cfg.pos_embed_max_size
    self.proj = nnx.Conv(cfg.in_channels, dim, (p, p), strides=p, padding='VALID', rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype,
                         kernel_metadata={'logical_axes': (None, None, None, 'embed')},
                         bias_metadata={'logical_axes': ('embed',)})
    table = sd3_pos_embed_table(dim, cfg.pos_embed_max_size, cfg.sample_size // p)
    self.pos_embed = nnx.Param(table.astype(param_dtype), logical_axes=(None, None, 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    gh, gw = h // self.patch_size, w // self.patch_size
    if gh > self.max_size or gw > self.max_size:
      raise ValueError(f'latent grid {gh}x{gw} exceeds pos_embed_max_size {self.max_size}')
    tokens = self.proj(x).reshape(b, gh * gw, -1)
    top, left = (self.max_size - gh) // 2, (self.max_size - gw) // 2
    table = self.pos_embed[...].reshape(self.max_size, self.max_size, -1)
    pos = table[top:top + gh, left:left + gw].reshape(1, gh * gw, -1)
    return tokens + pos.astype(tokens.dtype)


class _TwoLayerMLP(nnx.Module):
  """linear_1 → SiLU → linear_2 (TimestepEmbedding and PixArtAlphaTextProjection(act='silu'))."""

  def __init__(self, path: str, din: int, dim: int, lin: _Linears):
    self.linear_1 = lin(f'{path}.linear_1', din, dim, (None, 'embed'))
    self.linear_2 = lin(f'{path}.linear_2', dim, dim, ('embed', 'mlp'))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(nnx.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
  """CombinedTimestepTextProjEmbeddings: MLP(sinusoid_256(timestep)) + MLP(pooled)."""

  def __init__(self, dim: int, pooled_dim: int, lin: _Linears):
    self.timestep_embedder = _TwoLayerMLP('time_text_embed.timestep_embedder', 256, dim, lin)
    self.text_embedder = _TwoLayerMLP('time_text_embed.text_embedder', pooled_dim, dim, lin)

  def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
    # Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) = [cos, sin] of t·10000^(-i/128).
    return self.timestep_embedder(timestep_embedding(timestep, 256)) + self.text_embedder(pooled)


class MMDiT(nnx.Module):
  """SD3/SD3.5 velocity network v(x_t, 1000·t, text), diffusers-compatible parameters."""

  TORCH_KEY_RENAMES = TORCH_KEY_RENAMES

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs, lora_rank: int = 0,
               lora_alpha: float = 1.0, lora_init: str = 'gaussian',
               lora_targets: Sequence[str] | str = RECIPE_LORA_TARGETS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False,
               remat_policy: str | None = None, attention_impl: str | None = None,
               scan_layers: bool = False, float32_residual: bool = False,
               float32_output: bool = False, float32_matmul_output: bool = False):
    """Builds the network (random init; use `opd_jax.models.loading.load_mmdit` for weights).

    Args:
      config: sizes from the checkpoint's config.json (`MMDiTConfig.from_dict`).
      rngs: parameter RNGs.
      lora_rank, lora_alpha, lora_init: adapter slots of the `lora_targets` modules
        (rank 0: no adapters anywhere).
      lora_targets: PEFT `target_modules` on diffusers module names: a list of names matched
        exactly or as a dotted suffix, or one regex matched in full. Default: the recipe's
        attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out}.
      dtype: compute dtype (e.g. bfloat16); norm statistics, the timestep sinusoid, the
        attention softmax and the returned velocity stay float32.
      param_dtype: storage dtype of the base weights (adapters are always float32).
      remat: rematerialise each block in the backward pass (activation memory ∝ 1 block).
      remat_policy: name of a `jax.checkpoint_policies` policy used with `remat`.
      attention_impl: a name in `attention.IMPLEMENTATIONS` (None: JAX chooses). Whatever the
        dtype, the logits and the softmax are float32.
      float32_residual: with a low-precision `dtype`, keep the two residual streams (image and
        text tokens) in float32; every matmul still runs in `dtype`.
      float32_output: run the output layer (norm_out modulation and proj_out) in float32.
      float32_matmul_output: every linear multiplies in `dtype` but returns float32 products
        (accumulation, adapter delta and bias in float32; `LoRALinear.out_dtype`).
      scan_layers: run each run of consecutive, identically built blocks (SD3.5-M: 13 MMDiT-X
        blocks, then 10 plain ones, then the context_pre_only block) as one `lax.scan` over
        their stacked weights, so XLA compiles one block per run instead of every block.
        Parameters keep the per-block diffusers layout (loading and PEFT are unchanged); the
        stack is built inside the traced call, a transient copy of the block weights.
    """
    config.validate()
    if remat_policy is not None and not hasattr(jax.checkpoint_policies, remat_policy):
      raise ValueError(f'unknown remat_policy {remat_policy!r} (not in jax.checkpoint_policies)')
    self.config = config
    self.dtype = dtype
    self.lora_targets = lora_targets if isinstance(lora_targets, str) else tuple(lora_targets)
    self.remat, self.remat_policy = remat, remat_policy
    self.scan_layers = scan_layers
    dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
    lin = _Linears(rngs, rank=lora_rank, alpha=lora_alpha, init=lora_init,
                   targets=self.lora_targets, dtype=dtype, param_dtype=param_dtype,
                   out_dtype=jnp.float32 if float32_matmul_output else None)
    self.pos_embed = PatchEmbed(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.time_text_embed = TimeTextEmbed(dim, config.pooled_projection_dim, lin)
    self.context_embedder = lin('context_embedder', config.joint_attention_dim,
                                config.caption_projection_dim, (None, 'embed'))
    self.transformer_blocks = nnx.List([
        JointTransformerBlock(f'transformer_blocks.{i}', dim, heads, head_dim,
                              context_pre_only=i == config.num_layers - 1,
                              qk_norm=config.qk_norm,
                              use_dual_attention=i in config.dual_attention_layers, lin=lin,
                              attention_impl=attention_impl, param_dtype=param_dtype)
        for i in range(config.num_layers)])
    self.float32_residual = float32_residual
    out_lin = lin.in_float32() if float32_output else lin
    self.norm_out = AdaModulation('norm_out', dim, 2, out_lin)
    p = config.patch_size
    self.proj_out = out_lin('proj_out', dim, p * p * config.output_channels, ('embed', None))

  def _rematerialised(self, block: JointTransformerBlock, *args):
    """block(*args) under jax.checkpoint, as a pure function of the block's state.

    Blocks carry no mutable state, so the block is split and re-merged inside the checkpoint;
    unlike nnx.remat this also works when the model itself was merged inside a jax transform
    (the trainers' pure-dict path), where nnx would try to write back across trace levels.
    """
    graphdef, state = nnx.split(block)
    policy = getattr(jax.checkpoint_policies, self.remat_policy) if self.remat_policy else None

    def run(state, *args):
      return nnx.merge(graphdef, state)(*args)
    return jax.checkpoint(run, policy=policy)(state, *args)

  def block_runs(self) -> list[tuple[Any, list]]:
    """Consecutive blocks grouped by identical graphdef: [(graphdef, [block states])]."""
    runs: list[tuple[Any, list]] = []
    for block in self.transformer_blocks:
      graphdef, state = nnx.split(block)
      if runs and runs[-1][0] == graphdef:
        runs[-1][1].append(state)
      else:
        runs.append((graphdef, [state]))
    return runs

  def _scanned_blocks(self, hidden, ctx, temb, bias):
    """The blocks as one lax.scan per run of identical graphdefs (see `scan_layers`)."""
    runs = self.block_runs()
    policy = getattr(jax.checkpoint_policies, self.remat_policy) if self.remat_policy else None
    for graphdef, states in runs:
      def body(carry, state, graphdef=graphdef):
        c, h = constrain_batch(carry)
        return constrain_batch(nnx.merge(graphdef, state)(h, c, temb, bias)), None
      if self.remat:
        body = jax.checkpoint(body, policy=policy)
      if len(states) == 1:   # e.g. the context_pre_only block, whose context output is None
        (ctx, hidden), _ = body((ctx, hidden), states[0])
        continue
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
      (ctx, hidden), _ = jax.lax.scan(body, (ctx, hidden), stacked)
    return ctx, hidden

  def __call__(self, x: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Velocity of rectified flow at x.

    Args:
      x: latents [B, H, W, C] (H, W multiples of patch_size).
      timestep: [B] network timesteps 1000·t (diffusers' `timestep` argument).
      context: text tokens [B, L, joint_attention_dim].
      pooled: pooled text embedding [B, pooled_projection_dim].
      context_mask: optional [B, L] (True = real token). SD3 was trained attending to every
        token, padding included, so leave it None to match diffusers; when given, masked text
        tokens are excluded as attention keys.

    Returns:
      The velocity [B, H, W, out_channels] in float32.
    """
    b, h, w, _ = x.shape
    p = self.config.patch_size
    if h % p or w % p:
      raise ValueError(f'latent size {h}x{w} is not divisible by patch_size {p}')
    hidden = self.pos_embed(x.astype(self.dtype))
    temb = self.time_text_embed(timestep, pooled)
    ctx = self.context_embedder(context)
    if self.float32_residual:
      hidden, ctx = hidden.astype(jnp.float32), ctx.astype(jnp.float32)
    hidden, ctx, temb = constrain_batch((hidden, ctx, temb))
    bias = None
    if context_mask is not None:
      bias = jnp.where(context_mask.astype(bool), 0.0, -1e9).astype(self.dtype)[:, None, None]

    if self.scan_layers:
      ctx, hidden = self._scanned_blocks(hidden, ctx, temb, bias)
    else:
      for block in self.transformer_blocks:
        if self.remat:
          ctx, hidden = self._rematerialised(block, hidden, ctx, temb, bias)
        else:
          ctx, hidden = block(hidden, ctx, temb, bias)
        ctx, hidden = constrain_batch((ctx, hidden))

    scale, shift = self.norm_out(temb)
    out = self.proj_out(modulate(layer_norm(hidden), shift, scale))
    c = self.config.output_channels
    out = out.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, c).astype(jnp.float32)
