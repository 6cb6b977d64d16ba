"""Networks chosen by name from `config.model` (a small registry, big_vision style).

Each entry builds an NNX module from the config section plus the LoRA settings, and
`build_model` splits it into (graphdef, base params, adapter params) as pure dicts.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from opd_jax.models.attention import IMPLEMENTATIONS as ATTENTION
from opd_jax.models.dit import DiT
from opd_jax.models.lora import split_model

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _dit(cfg, rngs, lora) -> nnx.Module:
  return DiT(latent_size=cfg.latent_size, latent_channels=cfg.latent_channels,
             patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads,
             mlp_ratio=cfg.mlp_ratio, context_dim=cfg.context_dim, pooled_dim=cfg.pooled_dim,
             rngs=rngs, dtype=DTYPES[cfg.dtype], **lora)


def _sd3(cfg, rngs, lora) -> nnx.Module:
  """SD3/SD3.5 MMDiT; `cfg.transformer` holds the checkpoint's config.json (set by the base
  source 'diffusers'), so the network always matches the weights it loads."""
  from opd_jax.models.mmdit import MMDiT, MMDiTConfig
  if 'transformer' not in cfg or not cfg.transformer:
    raise ValueError("config.model.transformer: empty; model 'sd3' takes its sizes from the "
                     "checkpoint's config.json (config.base.source = 'diffusers')")
  return MMDiT(MMDiTConfig.from_dict(cfg.transformer.to_dict()), rngs=rngs,
               dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], remat=cfg.remat,
               remat_policy=cfg.remat_policy or None, scan_layers=cfg.get('scan_layers', False),
               attention_impl=cfg.get('attention', '') or None,
               float32_residual=cfg.get('float32_residual', False),
               float32_output=cfg.get('float32_output', False),
               float32_matmul_output=cfg.get('float32_matmul_output', False), **lora)


MODELS: dict[str, Callable[..., nnx.Module]] = {'dit': _dit, 'sd3': _sd3}


def make_module(model_cfg, *, seed: int, lora_rank: int, lora_alpha: float,
                lora_init: str = 'gaussian') -> nnx.Module:
  if model_cfg.name not in MODELS:
    raise ValueError(f'config.model.name: unknown model {model_cfg.name!r}; '
                     f'choose one of {sorted(MODELS)}')
  lora = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_init=lora_init)
  return MODELS[model_cfg.name](model_cfg, nnx.Rngs(seed), lora)


def build_model(model_cfg, *, abstract: bool = False, **kwargs
                ) -> tuple[Any, nnx.State, nnx.State]:
  """(graphdef, base State, adapter State); States keep logical-axis metadata for sharding.

  abstract: build with `nnx.eval_shape` (ShapeDtypeStructs, no memory) — for networks whose
  weights are loaded rather than initialised (an SD3.5-M init alone is ~10 GB of float32).
  """
  if abstract:
    return split_model(nnx.eval_shape(lambda: make_module(model_cfg, **kwargs)))
  return split_model(make_module(model_cfg, **kwargs))


def abstract_module(model_cfg, lora_cfg) -> nnx.Module:
  """The network with LoRA slots as shapes only (`nnx.eval_shape`): the structure that PEFT
  adapters are read into and written from, without initialising any weight."""
  return nnx.eval_shape(lambda: make_module(model_cfg, seed=0, lora_rank=lora_cfg.rank,
                                            lora_alpha=lora_cfg.alpha))
