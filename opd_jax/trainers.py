"""Trainers by name: `config.trainer` → its validator and its entry point.

    opd        DiffusionOPD (stage 2)                      opd_jax.opd.trainer
    grpo       Flow-GRPO teachers and baselines (stage 1)  opd_jax.rl.trainer
    grpo_guard GRPO-Guard (Flow-GRPO, normalised ratio)    opd_jax.rl.trainer
    nft        DiffusionNFT teachers and baselines         opd_jax.rl.trainer
    pretrain   the mini world's base                       opd_jax.pretrain.trainer
    recipe     a chain of cached stages (configs/opd.py)   opd_jax.recipe.mini_world

Every entry shares the config dialect of `opd_jax.train.config_check` and, except the recipe
(which runs the others), the training loop of `opd_jax.train.loop`. Modules are imported on use,
so `--help` and config errors stay fast.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from opd_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Entry:
  validator: str     # 'module:function' (config) → None, raising ConfigError
  runner: str        # 'module:function' (config, workdir) → None


TRAINERS: dict[str, Entry] = {
    'opd': Entry('opd_jax.opd.config:validate', 'opd_jax.opd.trainer:run'),
    'grpo': Entry('opd_jax.rl.config:validate', 'opd_jax.rl.trainer:run'),
    'grpo_guard': Entry('opd_jax.rl.config:validate', 'opd_jax.rl.trainer:run'),
    'nft': Entry('opd_jax.rl.config:validate', 'opd_jax.rl.trainer:run'),
    'pretrain': Entry('opd_jax.pretrain.trainer:validate', 'opd_jax.pretrain.trainer:run'),
    'recipe': Entry('opd_jax.recipe.mini_world:validate', 'opd_jax.recipe.mini_world:run'),
}


def _resolve(path: str) -> Callable:
  module, name = path.split(':')
  return getattr(importlib.import_module(module), name)


def entry(config) -> Entry:
  name = config.get('trainer') if hasattr(config, 'get') else None
  if name not in TRAINERS:
    raise ConfigError(f'config.trainer: {name!r} is not one of {sorted(TRAINERS)} (every config '
                      'names its trainer)')
  return TRAINERS[name]


def validate(config) -> None:
  """Raises ConfigError for the first invalid field of a config of any trainer."""
  _resolve(entry(config).validator)(config)


def run(config, workdir: str) -> None:
  """Validates `config`, then runs its trainer in `workdir`."""
  validate(config)
  _resolve(entry(config).runner)(config, workdir)
