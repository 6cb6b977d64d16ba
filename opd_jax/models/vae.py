"""The SD3 VAE (diffusers' `AutoencoderKL`) in Flax NNX, NHWC throughout.

    encode: image [-1, 1] → conv_in → down blocks (ResNets, stride-2 convs) → mid block
            (ResNet, single-head self-attention, ResNet) → GroupNorm·SiLU·conv → (mean, logvar)
    decode: latent → conv_in → mid block → up blocks (ResNets, nearest ×2 + conv)
            → GroupNorm·SiLU·conv → image

SD3's VAE has 16 latent channels and no quant_conv / post_quant_conv (`use_quant_conv=False`);
both are supported when a config turns them on. The transformer sees latents in "model space",
(z − shift_factor)·scaling_factor (`to_model_latents`), and diffusers' pipeline decodes
z = latents/scaling_factor + shift_factor (`from_model_latents`). Module and parameter names mirror
diffusers' (`decoder.up_blocks[0].resnets[1].conv2`, GroupNorm `weight`/`bias`) so checkpoint keys
are NNX paths joined with dots. GroupNorm statistics and attention softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Sizes of an `AutoencoderKL`, field for field as in its config.json."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ('DownEncoderBlock2D',)
  up_block_types: tuple[str, ...] = ('UpDecoderBlock2D',)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: Any = None
  latents_std: Any = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> 'VAEConfig':
    """From a diffusers config.json dict (keys starting with `_` ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in config if not k.startswith('_') and k not in fields)
    if unknown:
      raise ValueError(f'unsupported AutoencoderKL config keys {unknown}')
    kwargs = {k: v for k, v in config.items() if k in fields}
    for k in ('down_block_types', 'up_block_types', 'block_out_channels'):
      if k in kwargs:
        kwargs[k] = tuple(kwargs[k])
    return cls(**kwargs)

  def validate(self) -> None:
    if set(self.down_block_types) != {'DownEncoderBlock2D'}:
      raise ValueError(f'unsupported down_block_types {self.down_block_types}')
    if set(self.up_block_types) != {'UpDecoderBlock2D'}:
      raise ValueError(f'unsupported up_block_types {self.up_block_types}')
    if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
      raise ValueError('down/up block types and block_out_channels differ in length')
    if self.act_fn != 'silu':
      raise ValueError(f'unsupported act_fn {self.act_fn!r}')
    if self.latents_mean is not None or self.latents_std is not None:
      raise ValueError('latents_mean/latents_std normalisation is not supported (SD3 uses '
                       'scaling_factor/shift_factor)')


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on NHWC inputs, statistics in float32."""

  def __init__(self, channels: int, groups: int, eps: float = _EPS,
               param_dtype: Any = jnp.float32):
    if channels % groups:
      raise ValueError(f'{channels} channels are not divisible into {groups} groups')
    self.groups, self.eps = groups, eps
    self.weight = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, dtype, param_dtype, *, stride: int = 1,
          padding: Any = 'SAME') -> nnx.Conv:
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)


class ResnetBlock(nnx.Module):
  """diffusers' ResnetBlock2D without time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

  def __init__(self, cin: int, cout: int, groups: int, *, rngs, dtype, param_dtype):
    self.norm1 = GroupNorm(cin, groups, param_dtype=param_dtype)
    self.conv1 = _conv(cin, cout, 3, rngs, dtype, param_dtype)
    self.norm2 = GroupNorm(cout, groups, param_dtype=param_dtype)
    self.conv2 = _conv(cout, cout, 3, rngs, dtype, param_dtype)
    self.conv_shortcut = _conv(cin, cout, 1, rngs, dtype, param_dtype) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nnx.Module):
  """The mid block's Attention (group-normed, residual) over the H·W positions."""

  def __init__(self, channels: int, groups: int, head_dim: int, *, rngs, dtype, param_dtype):
    self.heads, self.head_dim = channels // head_dim, head_dim
    self.group_norm = GroupNorm(channels, groups, param_dtype=param_dtype)
    lin = lambda: nnx.Linear(channels, channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
    self.to_out = nnx.List([lin()])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)
    split = lambda y: y.reshape(b, h * w, self.heads, self.head_dim)
    out = jax.nn.dot_product_attention(split(self.to_q(tokens)), split(self.to_k(tokens)),
                                       split(self.to_v(tokens)))
    return x + self.to_out[0](out.reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """UNetMidBlock2D: ResNet, [attention, ResNet]."""

  def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs, dtype,
               param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
    self.attentions = nnx.List(
        [SpatialAttention(channels, groups, channels, **kw)] if add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Downsample2D(padding=0): zero-pad bottom/right by one, then a stride-2 3×3 conv."""

  def __init__(self, channels: int, *, rngs, dtype, param_dtype):
    self.conv = _conv(channels, channels, 3, rngs, dtype, param_dtype, stride=2,
                      padding='VALID')

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Upsample2D: nearest-neighbour ×2, then a 3×3 conv."""

  def __init__(self, channels: int, *, rngs, dtype, param_dtype):
    self.conv = _conv(channels, channels, 3, rngs, dtype, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class EncoderBlock(nnx.Module):
  """DownEncoderBlock2D: ResNets, then an optional downsampler."""

  def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool, **kw):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                             for i in range(layers)])
    self.downsamplers = nnx.List([Downsample(cout, **kw)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for down in self.downsamplers:
      x = down(x)
    return x


class DecoderBlock(nnx.Module):
  """UpDecoderBlock2D: ResNets, then an optional upsampler."""

  def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool, **kw):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                             for i in range(layers)])
    self.upsamplers = nnx.List([Upsample(cout, **kw)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    for up in self.upsamplers:
      x = up(x)
    return x


class Encoder(nnx.Module):
  """diffusers' vae.Encoder with double_z: image → 2·latent_channels moments."""

  def __init__(self, cfg: VAEConfig, **kw):
    chans, groups = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = _conv(cfg.in_channels, chans[0], 3, kw['rngs'], kw['dtype'],
                         kw['param_dtype'])
    self.down_blocks = nnx.List([
        EncoderBlock(chans[max(i - 1, 0)], c, cfg.layers_per_block, groups,
                     i < len(chans) - 1, **kw) for i, c in enumerate(chans)])
    self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(chans[-1], groups, param_dtype=kw['param_dtype'])
    self.conv_out = _conv(chans[-1], 2 * cfg.latent_channels, 3, kw['rngs'], kw['dtype'],
                          kw['param_dtype'])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """diffusers' vae.Decoder (group norm): latent → image."""

  def __init__(self, cfg: VAEConfig, **kw):
    chans, groups = cfg.block_out_channels, cfg.norm_num_groups
    rev = list(reversed(chans))
    self.conv_in = _conv(cfg.latent_channels, chans[-1], 3, kw['rngs'], kw['dtype'],
                         kw['param_dtype'])
    self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, **kw)
    self.up_blocks = nnx.List([
        DecoderBlock(rev[max(i - 1, 0)], c, cfg.layers_per_block + 1, groups,
                     i < len(rev) - 1, **kw) for i, c in enumerate(rev)])
    self.conv_norm_out = GroupNorm(chans[0], groups, param_dtype=kw['param_dtype'])
    self.conv_out = _conv(chans[0], cfg.out_channels, 3, kw['rngs'], kw['dtype'],
                          kw['param_dtype'])

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The VAE: `encode` images to latent means, `decode` latents to images (NHWC, float32 out)."""

  def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    config.validate()
    self.config = config
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    z2 = 2 * config.latent_channels
    self.quant_conv = (_conv(z2, z2, 1, rngs, dtype, param_dtype)
                       if config.use_quant_conv else None)
    z = config.latent_channels
    self.post_quant_conv = (_conv(z, z, 1, rngs, dtype, param_dtype)
                            if config.use_post_quant_conv else None)

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, logvar) of the posterior for images [B, H, W, 3] in [-1, 1] (logvar clipped to
    [-30, 20] as in DiagonalGaussianDistribution)."""
    h = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """Posterior mean [B, H/f, W/f, latent_channels] (VAE space, not scaled)."""
    return self.encode_moments(images)[0]

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images [B, H·f, W·f, 3] (≈[-1, 1], float32) from VAE-space latents."""
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  @property
  def shift(self) -> float:
    return float(self.config.shift_factor or 0.0)

  def to_model_latents(self, z: jax.Array) -> jax.Array:
    """VAE space → the transformer's latent space: (z − shift)·scale."""
    return (z - self.shift) * self.config.scaling_factor

  def from_model_latents(self, latents: jax.Array) -> jax.Array:
    """The transformer's latent space → VAE space: latents/scale + shift."""
    return latents / self.config.scaling_factor + self.shift


def images_to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] float images → uint8 [0, 255], as diffusers' postprocess (clip, round)."""
  x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
  return jnp.round(x * 255.0).astype(jnp.uint8)

