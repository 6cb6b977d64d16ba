"""CLIP (transformers' `CLIPModel` and its two towers with projection) in Flax NNX.

    text:   ids [B, T] → token + position embeddings → L × pre-LN block (causal; padding keys
            masked when an attention mask is given) → final LayerNorm → the EOS token's state
            → text_projection                                           (no bias)
    vision: image [B, H, W, C] (NHWC, already normalised) → patch conv (no bias)
            → [CLS ; patches] + position embeddings → pre_layrnorm → L × pre-LN block → post_layernorm(CLS)
            → visual_projection                                         (no bias)
    logits_per_image = exp(logit_scale) · normalise(image) · normalise(text)ᵀ

A pre-LN block is x + attn(LN₁(x)), then x + fc2(act(fc1(LN₂(x)))), act being exact (erf) GELU
or QuickGELU x·σ(1.702x) as `hidden_act` says. The EOS token is found as transformers does it
(`CLIPTextTransformer.forward`): configs with the legacy `eos_token_id == 2` take the position of
the largest id (the end-of-text token has the largest id in CLIP's vocabulary), every other
config the first position holding `eos_token_id`.

Modules and attributes carry transformers' names (`text_model.encoder.layers[i].self_attn.q_proj`,
`vision_model.pre_layrnorm`, LayerNorm `weight`/`bias`, embedding tables `weight`), so a
parameter's checkpoint key is its NNX path joined with dots (`opd_jax.models.loading.name_map`,
no renames). A model may hold both towers (`CLIPModel`, with `logit_scale`) or one
(`CLIPTextModelWithProjection`, `CLIPVisionModelWithProjection`); `CLIPConfig` says which.

Precision: `dtype` is the compute dtype of every matmul and the patch convolution; parameters are
stored in `param_dtype`. LayerNorm statistics, the attention logits and softmax, the residual
stream, the pooled states and every returned array stay float32, so a bfloat16 model differs from
the float32 one only by the rounding of its matmul inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from opd_jax.models.attention import dot_product_attention
from opd_jax.models.lora import LoRALinear

ACTIVATIONS = ('gelu', 'quick_gelu')
PARTS = ('text', 'vision')
# transformers' `eos_token_id` before huggingface/transformers#24773: pool at argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2


def _fields(cls, config: Mapping[str, Any], what: str) -> dict[str, Any]:
  """The entries of a transformers config dict that `cls` knows.

  transformers' config.json files also carry generic `PreTrainedConfig` keys (`id2label`,
  `dtype`, `initializer_range`, dropout rates, …) that do not change inference; those are
  ignored. Missing keys take transformers' defaults (the dataclass defaults), as
  `from_pretrained` does for configs saved with only their non-default values.
  """
  if not isinstance(config, Mapping):
    raise ValueError(f'{what} must be a JSON object, got {type(config).__name__}')
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in config.items() if k in names}


def _square(value: Any, name: str) -> int:
  """An image or patch size given as n or [n, n] (transformers accepts both)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'{name} {list(value)} is not square; only square sizes are supported')
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
  return value


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Sizes of transformers' `CLIPTextConfig` (defaults are transformers')."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> 'CLIPTextConfig':
    """From a `text_config` dict or a `CLIPTextModelWithProjection` config.json."""
    out = cls(**_fields(cls, config, 'text_config'))
    out.validate()
    return out

  def validate(self) -> None:
    _validate_tower(self, 'text_config')
    if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int):
      raise ValueError(f'text_config.eos_token_id must be one integer, got {self.eos_token_id!r}')


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Sizes of transformers' `CLIPVisionConfig` (defaults are transformers')."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> 'CLIPVisionConfig':
    """From a `vision_config` dict or a `CLIPVisionModelWithProjection` config.json."""
    kwargs = _fields(cls, config, 'vision_config')
    for name in ('image_size', 'patch_size'):
      if name in kwargs:
        kwargs[name] = _square(kwargs[name], f'vision_config.{name}')
    out = cls(**kwargs)
    out.validate()
    return out

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  def validate(self) -> None:
    _validate_tower(self, 'vision_config')
    if self.image_size % self.patch_size:
      raise ValueError(f'vision_config.image_size {self.image_size} is not a multiple of '
                       f'patch_size {self.patch_size}')


def _validate_tower(config, what: str) -> None:
  if config.hidden_act not in ACTIVATIONS:
    raise ValueError(f'{what}.hidden_act {config.hidden_act!r} is not supported; expected one '
                     f'of {list(ACTIVATIONS)}')
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f'{what}.hidden_size {config.hidden_size} is not a multiple of '
                     f'num_attention_heads {config.num_attention_heads}')


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP model: both towers (`CLIPModel`) or one tower with its projection.

  Attributes:
    text, vision: the towers' configs; None for a tower the model does not have.
    projection_dim: width of the shared embedding space.
    logit_scale_init_value: initial log temperature of a fresh two-tower model (checkpoints
      store the trained `logit_scale`).
  """
  text: CLIPTextConfig | None = None
  vision: CLIPVisionConfig | None = None
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> 'CLIPConfig':
    """From a transformers config.json dict: `CLIPModel` (model_type 'clip'),
    `CLIPTextModelWithProjection` ('clip_text_model') or `CLIPVisionModelWithProjection`
    ('clip_vision_model').

    Raises:
      ValueError: another model type, a tower without projection (`CLIPTextModel`,
        `CLIPVisionModel`), or sizes this implementation cannot run.
    """
    model_type = config.get('model_type')
    if model_type is None and ('text_config' in config or 'vision_config' in config):
      model_type = 'clip'
    architectures = config.get('architectures') or []
    plain = sorted(set(architectures) & {'CLIPTextModel', 'CLIPVisionModel'})
    if plain:
      raise ValueError(f'architectures {plain}: towers without projection are not supported '
                       '(expected CLIPModel, CLIPTextModelWithProjection or '
                       'CLIPVisionModelWithProjection)')
    projection_dim = config.get('projection_dim', 512)
    if model_type == 'clip':
      out = cls(text=CLIPTextConfig.from_hf_dict(config.get('text_config') or {}),
                vision=CLIPVisionConfig.from_hf_dict(config.get('vision_config') or {}),
                projection_dim=projection_dim,
                logit_scale_init_value=float(config.get('logit_scale_init_value', 2.6592)))
    elif model_type == 'clip_text_model':
      out = cls(text=CLIPTextConfig.from_hf_dict(config), projection_dim=projection_dim)
    elif model_type == 'clip_vision_model':
      out = cls(vision=CLIPVisionConfig.from_hf_dict(config), projection_dim=projection_dim)
    else:
      raise ValueError(f'model_type {model_type!r} is not a CLIP model (expected clip, '
                       'clip_text_model or clip_vision_model)')
    out.validate()
    return out

  @property
  def parts(self) -> tuple[str, ...]:
    return tuple(p for p in PARTS if getattr(self, p) is not None)

  def select(self, part: str | None) -> 'CLIPConfig':
    """This config with only tower `part` ('text' or 'vision'); None: unchanged."""
    if part is None:
      return self
    if part not in PARTS:
      raise ValueError(f'part {part!r} is not one of {list(PARTS)}')
    if getattr(self, part) is None:
      raise ValueError(f'the model has no {part} tower (it has {list(self.parts)})')
    return dataclasses.replace(self, **{p: None for p in PARTS if p != part})

  def validate(self) -> None:
    if not self.parts:
      raise ValueError('a CLIP model needs a text or a vision tower')
    if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or (
        self.projection_dim <= 0):
      raise ValueError(f'projection_dim must be a positive integer, got {self.projection_dim!r}')
    for part in self.parts:
      getattr(self, part).validate()


def activation(name: str, x: jax.Array) -> jax.Array:
  """transformers' ACT2FN[name] for the two CLIP activations."""
  if name == 'gelu':
    return jax.nn.gelu(x, approximate=False)
  if name == 'quick_gelu':
    return x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f'unknown hidden_act {name!r}')


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm(dim, eps) over the last axis; statistics and output in float32."""

  def __init__(self, dim: int, eps: float, param_dtype: Any = jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=('embed',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Embedding(nnx.Module):
  """torch.nn.Embedding: a [num, dim] table (`weight`) looked up by index, read in float32."""

  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, axes: tuple,
               param_dtype: Any = jnp.float32, std: float = 0.02):
    self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (num, dim), param_dtype),
                            logical_axes=axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0).astype(jnp.float32)


class _Linears:
  """Builds the towers' linear layers (plain `LoRALinear`s: rank 0, no adapter)."""

  def __init__(self, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.rngs, self.dtype, self.param_dtype = rngs, dtype, param_dtype

  def __call__(self, din: int, dout: int, axes: tuple, use_bias: bool = True) -> LoRALinear:
    return LoRALinear(din, dout, rngs=self.rngs, use_bias=use_bias, logical_axes=axes,
                      dtype=self.dtype, param_dtype=self.param_dtype, out_dtype=jnp.float32)


class CLIPAttention(nnx.Module):
  """transformers' CLIPAttention: multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, dim: int, heads: int, lin: _Linears, attention_impl: str | None):
    self.heads, self.head_dim = heads, dim // heads
    self.attention_impl = attention_impl
    self.dtype = lin.dtype
    self.q_proj = lin(dim, dim, ('embed', 'heads'))
    self.k_proj = lin(dim, dim, ('embed', 'heads'))
    self.v_proj = lin(dim, dim, ('embed', 'heads'))
    self.out_proj = lin(dim, dim, ('heads', 'embed'))

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """x [B, T, D]; bias in the compute dtype, broadcastable to [B, heads, T, T] (added to the
    logits)."""
    b, t, _ = x.shape
    split = lambda y: y.astype(self.dtype).reshape(b, t, self.heads, self.head_dim)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    out = dot_product_attention(q, k, v, bias, self.attention_impl or '')
    return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
  """fc1 → hidden_act → fc2."""

  def __init__(self, dim: int, hidden: int, act: str, lin: _Linears):
    self.act = act
    self.fc1 = lin(dim, hidden, ('embed', 'mlp'))
    self.fc2 = lin(hidden, dim, ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation(self.act, self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(LN₁(x)), then x + MLP(LN₂(x)), residual in float32."""

  def __init__(self, cfg, lin: _Linears, attention_impl: str | None, param_dtype: Any):
    dim = cfg.hidden_size
    self.layer_norm1 = LayerNorm(dim, cfg.layer_norm_eps, param_dtype)
    self.self_attn = CLIPAttention(dim, cfg.num_attention_heads, lin, attention_impl)
    self.layer_norm2 = LayerNorm(dim, cfg.layer_norm_eps, param_dtype)
    self.mlp = CLIPMLP(dim, cfg.intermediate_size, cfg.hidden_act, lin)

  def __call__(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), bias).astype(jnp.float32)
    return x + self.mlp(self.layer_norm2(x)).astype(jnp.float32)


class CLIPEncoder(nnx.Module):
  """`num_hidden_layers` encoder layers (`layers[i]`)."""

  def __init__(self, cfg, lin: _Linears, attention_impl: str | None, param_dtype: Any):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, lin, attention_impl, param_dtype)
                            for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x: jax.Array, bias: jax.Array | None,
               output_hidden_states: bool = False):
    """The last layer's output and, if asked, (input, every layer's output) as transformers'
    `hidden_states` (before any final LayerNorm)."""
    states = [x]
    for layer in self.layers:
      x = layer(x, bias)
      states.append(x)
    return x, (tuple(states) if output_hidden_states else None)


@struct.dataclass
class TowerOutput:
  """A tower's states (all float32).

  Attributes:
    last_hidden_state: [B, T, D] (text: after final_layer_norm; vision: before post_layernorm,
      as transformers returns them).
    pooler_output: [B, D] the EOS token's state (text) or post_layernorm(CLS) (vision).
    hidden_states: None, or the encoder input and every layer's output, [B, T, D] each.
  """
  last_hidden_state: jax.Array
  pooler_output: jax.Array
  hidden_states: tuple[jax.Array, ...] | None = None


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Index of the pooled (end-of-text) token of each sequence, as transformers picks it.

  `eos_token_id == 2` (configs from before transformers#24773): the position of the largest id.
  Otherwise: the first position equal to `eos_token_id` (0 if there is none).
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


def text_attention_bias(attention_mask: jax.Array | None, length: int,
                        dtype: Any = jnp.float32) -> jax.Array:
  """Additive bias [B or 1, 1, T, T] in `dtype`: causal, plus the padding keys of
  `attention_mask` [B, T] (1/True = real token) masked out.

  A masked key gets a large finite negative value (not −inf), so the row of a padding query that
  sees no real key (left padding) stays finite instead of turning every later state into NaN.
  """
  allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
  masked = max(-1e9, float(jnp.finfo(dtype).min) / 2)
  return jnp.where(allowed, 0.0, masked).astype(dtype)


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, param_dtype: Any):
    dim = cfg.hidden_size
    self.token_embedding = Embedding(cfg.vocab_size, dim, rngs=rngs, axes=('vocab', 'embed'),
                                     param_dtype=param_dtype)
    self.position_embedding = Embedding(cfg.max_position_embeddings, dim, rngs=rngs,
                                        axes=(None, 'embed'), param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[-1])
    return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
  """transformers' text tower (`CLIPTextModel` without its wrapper): `text_model.*`."""

  def __init__(self, cfg: CLIPTextConfig, lin: _Linears, *, rngs: nnx.Rngs,
               attention_impl: str | None, param_dtype: Any):
    self.config = cfg
    self.dtype = lin.dtype
    self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs, param_dtype=param_dtype)
    self.encoder = CLIPEncoder(cfg, lin, attention_impl, param_dtype)
    self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               output_hidden_states: bool = False) -> TowerOutput:
    """input_ids [B, T] (T ≤ max_position_embeddings); attention_mask [B, T] or None."""
    length = input_ids.shape[-1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f'{length} tokens exceed max_position_embeddings '
                       f'{self.config.max_position_embeddings}')
    x = self.embeddings(input_ids)
    bias = text_attention_bias(attention_mask, length, self.dtype)
    x, states = self.encoder(x, bias, output_hidden_states)
    x = self.final_layer_norm(x)
    pos = eos_positions(input_ids, self.config.eos_token_id)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return TowerOutput(x, pooled, states)


class CLIPVisionEmbeddings(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    dim, p = cfg.hidden_size, cfg.patch_size
    self.image_size = cfg.image_size
    self.class_embedding = nnx.Param(
        dim ** -0.5 * jax.random.normal(rngs.params(), (dim,), param_dtype),
        logical_axes=('embed',))
    self.patch_embedding = nnx.Conv(
        cfg.num_channels, dim, (p, p), strides=p, padding='VALID', use_bias=False, rngs=rngs,
        dtype=dtype, param_dtype=param_dtype,
        kernel_metadata={'logical_axes': (None, None, None, 'embed')})
    self.position_embedding = Embedding(cfg.grid ** 2 + 1, dim, rngs=rngs, axes=(None, 'embed'),
                                        param_dtype=param_dtype)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    b, h, w, _ = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f'image size {h}x{w} does not match the model\'s '
                       f'{self.image_size}x{self.image_size}')
    patches = self.patch_embedding(pixel_values.astype(self.patch_embedding.dtype))
    patches = patches.reshape(b, -1, patches.shape[-1]).astype(jnp.float32)   # row-major grid
    cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32),
                           (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
  """transformers' vision tower (`CLIPVisionModel` without its wrapper): `vision_model.*`."""

  def __init__(self, cfg: CLIPVisionConfig, lin: _Linears, *, rngs: nnx.Rngs,
               attention_impl: str | None, dtype: Any, param_dtype: Any):
    dim = cfg.hidden_size
    self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.pre_layrnorm = LayerNorm(dim, cfg.layer_norm_eps, param_dtype)   # sic, transformers' name
    self.encoder = CLIPEncoder(cfg, lin, attention_impl, param_dtype)
    self.post_layernorm = LayerNorm(dim, cfg.layer_norm_eps, param_dtype)

  def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> TowerOutput:
    """pixel_values [B, H, W, C]: NHWC, already resized and normalised."""
    x = self.pre_layrnorm(self.embeddings(pixel_values))
    x, states = self.encoder(x, None, output_hidden_states)
    return TowerOutput(x, self.post_layernorm(x[:, 0]), states)


@struct.dataclass
class CLIPOutput:
  """transformers' CLIPOutput without the loss (all float32).

  Attributes:
    logits_per_image: [images, texts] exp(logit_scale)·cosine similarity.
    logits_per_text: its transpose.
    text_embeds, image_embeds: the projected features, L2-normalised.
  """
  logits_per_image: jax.Array
  logits_per_text: jax.Array
  text_embeds: jax.Array
  image_embeds: jax.Array


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ‖x‖₂ over the last axis, in float32 (transformers' `_get_vector_norm` division)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nnx.Module):
  """CLIP with transformers' parameter names: both towers and `logit_scale`, or one tower.

  A one-tower model (`config.parts == ('text',)` or `('vision',)`) is transformers'
  `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`: the same names, the other
  tower's modules and `logit_scale` absent.
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, attention_impl: str | None = None):
    """Builds the model (random init; use `opd_jax.models.loading.clip_weights.load_clip`).

    Args:
      config: sizes (`CLIPConfig.from_hf_dict` of a config.json).
      rngs: parameter RNGs.
      dtype: compute dtype of the matmuls and the patch convolution (e.g. bfloat16);
        LayerNorm, softmax, residuals and outputs stay float32.
      param_dtype: storage dtype of the parameters.
      attention_impl: a name in `opd_jax.models.attention.IMPLEMENTATIONS` (None: JAX chooses).
    """
    config.validate()
    self.config = config
    lin = _Linears(rngs, dtype, param_dtype)
    p, text, vision = config.projection_dim, config.text, config.vision
    self.text_model = (CLIPTextTransformer(text, lin, rngs=rngs, attention_impl=attention_impl,
                                           param_dtype=param_dtype) if text else None)
    self.text_projection = (lin(text.hidden_size, p, ('embed', None), use_bias=False)
                            if text else None)
    self.vision_model = (CLIPVisionTransformer(vision, lin, rngs=rngs,
                                               attention_impl=attention_impl, dtype=dtype,
                                               param_dtype=param_dtype) if vision else None)
    self.visual_projection = (lin(vision.hidden_size, p, ('embed', None), use_bias=False)
                              if vision else None)
    self.logit_scale = (nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype),
                                  logical_axes=()) if text and vision else None)

  def _tower(self, part: str):
    tower = self.text_model if part == 'text' else self.vision_model
    if tower is None:
      raise ValueError(f'this CLIP model has no {part} tower (it has {list(self.config.parts)})')
    return tower

  def get_text_features(self, input_ids: jax.Array,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """Projected EOS states [B, projection_dim], float32, not normalised (transformers'
    `get_text_features(...).pooler_output`, `CLIPTextModelWithProjection(...).text_embeds`)."""
    pooled = self._tower('text')(input_ids, attention_mask).pooler_output
    return self.text_projection(pooled)

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Projected CLS states [B, projection_dim], float32, not normalised, of NHWC normalised
    images (transformers' `get_image_features(...).pooler_output`)."""
    pooled = self._tower('vision')(pixel_values).pooler_output
    return self.visual_projection(pooled)

  def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """logits_per_image [images, texts] from unnormalised projected features."""
    if self.logit_scale is None:
      raise ValueError('a one-tower CLIP model has no logit_scale')
    scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))
    return scale * (l2_normalize(image_embeds) @ l2_normalize(text_embeds).T)

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
               attention_mask: jax.Array | None = None) -> CLIPOutput:
    """transformers' `CLIPModel.forward` (without the loss): every image against every text."""
    image = self.get_image_features(pixel_values)
    text = self.get_text_features(input_ids, attention_mask)
    per_image = self.logits(image, text)
    return CLIPOutput(logits_per_image=per_image, logits_per_text=per_image.T,
                      text_embeds=l2_normalize(text), image_embeds=l2_normalize(image))

