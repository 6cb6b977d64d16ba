"""The frozen base a trainer starts from, chosen by name: `config.base.source` (BASE_SOURCES).

  random       the seeded random init of config.model (tests, benchmarks)
  mini_world   a mini-world pretraining artifact: DiT, its frozen text encoder, pixel latents
  diffusers    an SD3/SD3.5 pipeline folder: the transformer torch-free onto the mesh, the VAE
               read only when a trainer decodes (the RL trainers score images; OPD never does)

`load_base(config, mesh)` fills every config.model field the weights dictate (a mini-world base's
network sizes, a checkpoint's config.json, the scheduler's shift when rollout.shift = 0), so a
stage can never build a differently shaped network than the weights it loads. OPD
(`opd.sources`) and the RL trainers (`rl.trainer`) share it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import ml_collections
from flax import nnx

from opd_jax.errors import ConfigError

BASE_SOURCES = ('random', 'mini_world', 'diffusers')


@dataclasses.dataclass
class Base:
  """The base network's weights (None: the seeded random init) and what came with them."""
  params: Any = None
  text_encoder: tuple[Any, Any] | None = None    # (graphdef, params) when the base has one
  fingerprint: str = 'seeded'                     # content digest of the weights' source
  # () → Decoder: how this base's latents become images (read on demand: OPD never decodes).
  decoder: Callable[[], 'Decoder'] | None = None


@dataclasses.dataclass
class Decoder:
  """Latents → images as a pure function of explicit weights: `fn(params, latents)`.

  The mini world's latents are pixels (float32 [0, 1] out, params None); an SD3 base decodes
  with its VAE (uint8 out, params the VAE's pure-dict state), so the decode can live inside a
  jitted sampler with the weights passed in, not baked in as constants.
  """
  params: Any
  fn: Callable[[Any, Any], Any]


def require_dir(path: str, field: str, what: str) -> str:
  if not path:
    raise ConfigError(f'config.{field}: no path given; set it to {what}')
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'config.{field}: {path!r} is a file, not a directory (expected {what})')
  if not os.path.isdir(path):
    raise ConfigError(f'config.{field}: {path!r} does not exist (expected {what})')
  return path


def _random_base(config, mesh=None) -> Base:
  return Base()


def _mini_world_base(config, mesh=None) -> Base:
  """A mini-world pretraining artifact (`artifacts.save_base`): DiT + frozen text encoder."""
  from opd_jax.mini_world import artifacts
  path = require_dir(config.base.path, 'base.path', 'a mini-world base directory (the '
                     'pretrain stage writes WORKDIR/pretrain/base)')
  return mini_world_base(config, artifacts.load_base(path))


def mini_world_base(config, artifact) -> Base:
  """A loaded mini-world base artifact as a `Base`; config.model takes its network sizes."""
  from opd_jax.mini_world import latents as latent_codec
  from opd_jax.mini_world.networks import build_networks
  # The network is whatever the base was trained as; LoRA and dtype stay the run's choice.
  for key, value in artifact.meta['model'].items():
    if key not in ('dtype',):
      config.model[key] = value
  nets = build_networks(artifact.model_config, artifact.text_encoder_config, seed=0)
  unshuffle = artifact.latent_config.unshuffle
  decoder = lambda: Decoder(None, lambda _, latents: latent_codec.decode(latents, unshuffle))
  return Base(artifact.dit, (nets.text_graphdef, artifact.text_encoder), artifact.fingerprint,
              decoder)


def _diffusers_base(config, mesh=None) -> Base:
  """An SD3/SD3.5 transformer from a diffusers folder, loaded torch-free onto the mesh."""
  from opd_jax.models.loading.pretrained import (load_mmdit, mmdit_config, resolve_folder,
                                                 scheduler_shift)
  from opd_jax.models.loading.safetensors_io import read_config
  from opd_jax.models.lora import split_model
  from opd_jax.models.registry import DTYPES, build_model
  from opd_jax.parallel import sharding as shd
  path = require_dir(config.base.path, 'base.path',
                     'a diffusers SD3/SD3.5 pipeline folder or its transformer/ folder')
  if config.model.name != 'sd3':
    raise ConfigError(f"config.model.name: base.source 'diffusers' loads an SD3 transformer; "
                      f"set model.name to 'sd3' (got {config.model.name!r})")
  folder = resolve_folder(path, 'transformer')
  mmdit_config(folder)   # validates config.json: a bad one is an error naming the file
  transformer = read_config(folder)
  if config.rollout.shift == 0:   # the training schedule's shift, as the checkpoint ships it
    config.rollout.shift = scheduler_shift(_pipeline_root(path, folder))
  config.model.transformer = ml_collections.ConfigDict(
      {k: v for k, v in transformer.items() if not k.startswith('_')})
  if transformer.get('in_channels') != config.model.latent_channels:
    raise ConfigError(f'config.model.latent_channels: {config.model.latent_channels} differs '
                      f'from the checkpoint\'s in_channels {transformer.get("in_channels")}')
  m = config.model
  shardings = None
  if mesh is not None:
    _, base_state, _ = build_model(m, abstract=True, seed=0, lora_rank=0, lora_alpha=1.0)
    shardings = shd.state_shardings(base_state, mesh)
  module = load_mmdit(folder, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
                      remat=m.remat, remat_policy=m.remat_policy or None, shardings=shardings)
  root = _pipeline_root(path, folder)
  return Base(nnx.to_pure_dict(split_model(module)[1]), fingerprint=_weights_fingerprint(folder),
              decoder=lambda: _vae_decoder(root, mesh))


def _pipeline_root(path: str, transformer_folder: str) -> str:
  """The pipeline folder of a base.path that names the pipeline or its transformer/."""
  if os.path.normpath(transformer_folder) == os.path.normpath(path):
    return os.path.dirname(os.path.normpath(path))
  return path


def _vae_decoder(root: str, mesh=None) -> Decoder:
  """The pipeline's VAE (float32, replicated): model-space latents → uint8 images, as
  diffusers' pipeline decodes (latents / scaling_factor + shift_factor, clip, round)."""
  import jax
  from opd_jax.models.loading.pretrained import load_vae
  from opd_jax.models.loading.safetensors_io import CheckpointError
  from opd_jax.models.vae import images_to_uint8
  from opd_jax.parallel import sharding as shd
  try:
    vae = load_vae(root)
  except CheckpointError as e:   # missing or mismatched vae/: one line naming the field
    raise ConfigError(f'config.base.path: cannot read the VAE of {root} ({e}); the RL trainers '
                      'decode images with it, so give the pipeline folder') from None
  graphdef, state = nnx.split(vae)
  params = nnx.to_pure_dict(state)
  if mesh is not None:
    params = jax.device_put(params, shd.replicated(mesh))

  def decode(params, latents):
    module = nnx.merge(graphdef, params)
    return images_to_uint8(module.decode(module.from_model_latents(latents)))
  return Decoder(params, decode)


def _weights_fingerprint(folder: str) -> str:
  """config.json's content plus each weight file's name and size (weights are GBs: not hashed)."""
  import hashlib
  h = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      h.update(f'{name}:{os.path.getsize(path)}'.encode())
      if name.endswith('.json'):
        with open(path, 'rb') as f:
          h.update(f.read())
  return h.hexdigest()


BASE_LOADERS: dict[str, Callable[..., Base]] = {
    'random': _random_base,
    'mini_world': _mini_world_base,
    'diffusers': _diffusers_base,
}


def load_base(config, mesh=None) -> Base:
  """The base `config.base.source` names (config.model filled in place, see module docstring)."""
  if config.base.source not in BASE_LOADERS:
    raise ConfigError(f'config.base.source: {config.base.source!r} is not one of '
                      f'{sorted(BASE_LOADERS)}')
  return BASE_LOADERS[config.base.source](config, mesh)
