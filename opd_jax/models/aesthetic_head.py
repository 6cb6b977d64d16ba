"""The LAION aesthetic predictor's head in Flax NNX: a stack of Linear layers, no activations.

LAION's "improved aesthetic predictor" (`sac+logos+ava1-l14-linearMSE.pth`) scores an image from
its CLIP ViT-L/14 image embedding, L2-normalised:

    score = L₅(L₄(L₃(L₂(L₁(e)))))      Linear layers of widths 768 → 1024 → 128 → 64 → 16 → 1

Its torch module is an `nn.Sequential` with Dropouts between the first four Linears (and the
ReLUs commented out), so the checkpoint keys are `layers.{0,2,4,6,7}.{weight,bias}`; our
`layers[i]` are the Linears alone and `TORCH_KEY_RENAMES` maps index i to the Sequential's.
Dropout is the identity at inference. Spec §2 (Aesthetic).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.models.clip import l2_normalize
from opd_jax.models.lora import LoRALinear

# The upstream widths (CLIP ViT-L/14 embedding → score).
LAION_LAYER_DIMS = (768, 1024, 128, 64, 16, 1)
# Index in the upstream nn.Sequential of our i-th Linear (Dropouts at 1, 3 and 5).
SEQUENTIAL_INDEX = (0, 2, 4, 6, 7)

# config.json of a converted head folder: {"model_type": MODEL_TYPE, "layer_dims": [...]}.
MODEL_TYPE = 'laion_aesthetic_mlp'

TORCH_KEY_RENAMES = (
    (r'^layers\.(\d+)$', lambda m: f'layers.{SEQUENTIAL_INDEX[int(m.group(1))]}'),
)


def config_dict(layer_dims: Sequence[int]) -> dict[str, Any]:
  """The config.json content of a head with these widths."""
  return {'model_type': MODEL_TYPE, 'layer_dims': [int(d) for d in layer_dims]}


def layer_dims_from_config(config: Mapping[str, Any]) -> tuple[int, ...]:
  """The widths in a head folder's config.json (ValueError if it is not one)."""
  if config.get('model_type') != MODEL_TYPE:
    raise ValueError(f'model_type {config.get("model_type")!r} is not {MODEL_TYPE!r}')
  dims = config.get('layer_dims')
  if (not isinstance(dims, list) or len(dims) != len(SEQUENTIAL_INDEX) + 1 or
      not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
    raise ValueError(f'layer_dims must be {len(SEQUENTIAL_INDEX) + 1} positive integers, '
                     f'got {dims!r}')
  return tuple(dims)


def sequential_keys() -> list[str]:
  """Every checkpoint key of the upstream head."""
  return [f'layers.{i}.{leaf}' for i in SEQUENTIAL_INDEX for leaf in ('weight', 'bias')]


class AestheticHead(nnx.Module):
  """len(layer_dims) − 1 Linear layers applied in sequence, nothing in between."""

  TORCH_KEY_RENAMES = TORCH_KEY_RENAMES

  def __init__(self, layer_dims: Sequence[int] = LAION_LAYER_DIMS, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    layer_dims = tuple(int(d) for d in layer_dims)
    if len(layer_dims) != len(SEQUENTIAL_INDEX) + 1 or min(layer_dims) <= 0:
      raise ValueError(f'layer_dims {list(layer_dims)}: expected {len(SEQUENTIAL_INDEX) + 1} '
                       'positive widths (input, four hidden, output)')
    self.layer_dims = layer_dims
    axes = [('embed', 'mlp')] + [('mlp', None)] * (len(layer_dims) - 2)
    self.layers = nnx.List([
        LoRALinear(din, dout, rngs=rngs, logical_axes=ax, dtype=dtype, param_dtype=param_dtype,
                   out_dtype=jnp.float32)
        for din, dout, ax in zip(layer_dims[:-1], layer_dims[1:], axes)])

  def __call__(self, x: jax.Array) -> jax.Array:
    """The MLP on [B, layer_dims[0]] → [B, layer_dims[-1]] float32 (no normalisation)."""
    for layer in self.layers:
      x = layer(x)
    return x

  def score(self, image_embeds: jax.Array) -> jax.Array:
    """The aesthetic score [B] of unnormalised CLIP image embeddings (L2-normalised first, as
    upstream)."""
    return self(l2_normalize(image_embeds))[..., 0]

