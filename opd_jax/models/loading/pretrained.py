"""Pretrained SD3 / SD3.5 transformers and VAEs from diffusers folders, without torch.

    config.json → Config → nnx.eval_shape(model) → split (base Params / LoRA slots)
      → validate every key and shape → read, transpose, cast, place each tensor
      → fresh LoRA slots (A gaussian, B = 0) → nnx.merge

`folder` may be the model folder itself (holding config.json) or a pipeline folder with the model
in its usual subfolder (`transformer/`, `vae/`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.models.loading.place import Shardings, load_state, sharding_for
from opd_jax.models.loading.safetensors_io import (CONFIG_NAME, CheckpointError,
                                                   CheckpointReader, read_config, read_json)
from opd_jax.models.lora import lora_init_a, split_model
from opd_jax.models.mmdit import MMDiT, MMDiTConfig
from opd_jax.models.peft_io import RECIPE_LORA_TARGETS
from opd_jax.models.vae import AutoencoderKL, VAEConfig


def resolve_folder(folder: str | os.PathLike, subfolder: str) -> str:
  """`folder` if it holds a config.json, else `folder/subfolder` if that does."""
  folder = os.fspath(folder)
  for candidate in (folder, os.path.join(folder, subfolder)):
    if os.path.exists(os.path.join(candidate, CONFIG_NAME)):
      return candidate
  raise CheckpointError(f'no {CONFIG_NAME} in {folder} or {os.path.join(folder, subfolder)}')


def scheduler_shift(model_dir: str | os.PathLike) -> float:
  """The schedule shift of a pipeline folder's FlowMatchEulerDiscreteScheduler config.

  `model_dir` is a diffusers pipeline folder (with scheduler/scheduler_config.json). Raises
  CheckpointError for a missing file or a resolution-dependent (dynamic) shift, which these
  samplers do not implement.
  """
  path = os.path.join(os.fspath(model_dir), 'scheduler', 'scheduler_config.json')
  config = read_json(path)
  if config.get('use_dynamic_shifting'):
    raise CheckpointError(f'{path}: use_dynamic_shifting schedulers are not supported; set the '
                          'shift explicitly')
  return float(config.get('shift', 1.0))


def _model_config(cls, folder: str):
  """`cls.from_dict` of `folder`'s config.json, validated; a config this code cannot build is a
  CheckpointError naming the file (not a ValueError from deep inside the model)."""
  try:
    config = cls.from_dict(read_config(folder))
    config.validate()
  except (TypeError, ValueError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'{os.path.join(folder, CONFIG_NAME)}: {e}') from None
  return config


def init_lora_state(abstract: nnx.State, *, seed: int = 0, init: str = 'gaussian',
                    shardings: Shardings = None) -> nnx.State:
  """Fresh adapter values for abstract LoRA slots: A as `lora_init_a`, B = 0 (a no-op delta)."""
  key = jax.random.key(seed)
  flat = []
  for i, (path, variable) in enumerate(nnx.to_flat_state(abstract)):
    shape = variable.get_value().shape
    if path[-1] == 'lora_a':
      value = lora_init_a(jax.random.fold_in(key, i), shape, shape[-1], init)
    else:
      value = jnp.zeros(shape, jnp.float32)
    sharding = sharding_for(shardings, path, variable)
    value = jax.device_put(value, sharding) if sharding is not None else value
    flat.append((path, variable.replace(value)))
  return nnx.from_flat_state(flat)


def _assemble(abstract_model: nnx.Module, reader: CheckpointReader, *, renames, shardings,
              seed: int, lora_init: str, what: str) -> nnx.Module:
  graphdef, base, lora = split_model(abstract_model)
  base = load_state(reader, base, renames=renames, shardings=shardings, what=what)
  lora = init_lora_state(lora, seed=seed, init=lora_init, shardings=shardings)
  return nnx.merge(graphdef, base, lora)


def mmdit_config(folder: str | os.PathLike) -> MMDiTConfig:
  """The MMDiTConfig of a diffusers transformer (or pipeline) folder."""
  return _model_config(MMDiTConfig, resolve_folder(folder, 'transformer'))


def vae_config(folder: str | os.PathLike) -> VAEConfig:
  """The VAEConfig of a diffusers VAE (or pipeline) folder."""
  return _model_config(VAEConfig, resolve_folder(folder, 'vae'))


def abstract_mmdit(config: MMDiTConfig, **kwargs) -> MMDiT:
  """The MMDiT with ShapeDtypeStructs instead of arrays (for shardings and size estimates)."""
  return nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0), **kwargs))


def load_mmdit(folder: str | os.PathLike, *, lora_rank: int = 0, lora_alpha: float = 1.0,
               lora_init: str = 'gaussian',
               lora_targets: Sequence[str] | str = RECIPE_LORA_TARGETS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False,
               remat_policy: str | None = None, attention_impl: str | None = None,
               seed: int = 0, shardings: Shardings = None) -> MMDiT:
  """Loads an `SD3Transformer2DModel` checkpoint into an `MMDiT`.

  Args:
    folder: diffusers transformer folder (config.json + safetensors), or a pipeline folder.
    lora_rank, lora_alpha, lora_init, lora_targets: fresh adapter slots (see `MMDiT`).
    dtype, param_dtype, remat, remat_policy, attention_impl: see `MMDiT`.
    seed: seed of the fresh adapters' A matrices.
    shardings: placement of every parameter, base and adapter (see `place.Shardings`); compute
      a dict with `opd_jax.parallel.sharding.state_shardings(nnx.state(abstract_mmdit(...)),
      mesh)`.

  Raises:
    CheckpointError: unreadable/corrupt files; WeightMismatchError: keys or shapes that differ
      from the architecture in config.json.
  """
  folder = resolve_folder(folder, 'transformer')
  config = _model_config(MMDiTConfig, folder)
  abstract = abstract_mmdit(config, lora_rank=lora_rank, lora_alpha=lora_alpha,
                            lora_init=lora_init, lora_targets=lora_targets, dtype=dtype,
                            param_dtype=param_dtype, remat=remat, remat_policy=remat_policy,
                            attention_impl=attention_impl)
  with CheckpointReader.from_folder(folder) as reader:
    return _assemble(abstract, reader, renames=MMDiT.TORCH_KEY_RENAMES, shardings=shardings,
                     seed=seed, lora_init=lora_init, what=f'MMDiT of {folder}')


def load_vae(folder: str | os.PathLike, *, dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32, shardings: Shardings = None) -> AutoencoderKL:
  """Loads an `AutoencoderKL` checkpoint (the SD3 VAE) into our NHWC `AutoencoderKL`."""
  folder = resolve_folder(folder, 'vae')
  config = vae_config(folder)
  abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                  param_dtype=param_dtype))
  with CheckpointReader.from_folder(folder) as reader:
    return _assemble(abstract, reader, renames=(), shardings=shardings, seed=0,
                     lora_init='gaussian', what=f'AutoencoderKL of {folder}')


