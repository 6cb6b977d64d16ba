"""The mini world's two networks built from config: the DiT (via the registry) and its text encoder.

Every mini-world stage builds them the same way — pretraining from its own config, later stages
from the sections recorded in the base artifact's meta — so parameter trees always line up with
the saved weights. `Networks` keeps the nnx States (with logical-axis metadata, for shardings)
next to their graphdefs; parameters themselves travel as pure dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from opd_jax.mini_world import latents
from opd_jax.models.registry import build_model
from opd_jax.mini_world.text_encoder import build_text_encoder


@dataclasses.dataclass
class Networks:
  dit_graphdef: Any
  dit_base: nnx.State        # base weights (nnx.Param)
  dit_lora: nnx.State        # adapter slots (LoRAParam); empty when lora_rank = 0
  text_graphdef: Any
  text_params: nnx.State


def check_latent_matches_model(model_cfg, latent_cfg) -> None:
  """The DiT's latent size/channels must be what the latent codec produces."""
  shape = latents.latent_shape(latent_cfg.unshuffle)
  if (model_cfg.latent_size, model_cfg.latent_size, model_cfg.latent_channels) != shape:
    raise ValueError(f'config.model latent {model_cfg.latent_size}x{model_cfg.latent_size}x'
                     f'{model_cfg.latent_channels} does not match the mini-world latent {shape} '
                     f'of config.latent.unshuffle={latent_cfg.unshuffle}')


def build_networks(model_cfg, text_cfg, *, seed: int, lora_rank: int = 0,
                   lora_alpha: float = 1.0, lora_init: str = 'gaussian') -> Networks:
  """Builds the DiT (with LoRA slots of `lora_rank`) and the text encoder, seeded."""
  dit_graphdef, dit_base, dit_lora = build_model(model_cfg, seed=seed, lora_rank=lora_rank,
                                                 lora_alpha=lora_alpha, lora_init=lora_init)
  text_graphdef, text_params = build_text_encoder(text_cfg, context_dim=model_cfg.context_dim,
                                                  pooled_dim=model_cfg.pooled_dim,
                                                  seed=seed + 1)
  return Networks(dit_graphdef, dit_base, dit_lora, text_graphdef, text_params)
