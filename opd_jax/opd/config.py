"""Early config validation: one clear error naming the offending field.

Checks run before any model is built, so a typo costs seconds, not a compile.
"""

from __future__ import annotations

from opd_jax.models.policy import KINDS
from opd_jax.models.registry import DTYPES, MODELS
from opd_jax.objectives import OBJECTIVES
from opd_jax.sampling.transitions import KERNELS


class ConfigError(ValueError):
  """A config field has a value the code cannot run with."""


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}: {message}')


def _choice(value, field: str, choices) -> None:
  _check(value in choices, field, f'{value!r} is not one of {sorted(choices)}')


def _positive(value, field: str) -> None:
  _check(isinstance(value, (int, float)) and value > 0, field, f'must be > 0, got {value!r}')


def validate_opd_config(c) -> None:
  """Raises ConfigError for the first invalid field of an OPD config."""
  m = c.model
  _choice(m.name, 'model.name', MODELS)
  _choice(m.dtype, 'model.dtype', DTYPES)
  _positive(m.latent_size, 'model.latent_size')
  _positive(m.latent_channels, 'model.latent_channels')
  if m.name == 'dit':
    for f in ('patch_size', 'dim', 'depth', 'num_heads', 'context_dim', 'pooled_dim'):
      _positive(m[f], f'model.{f}')
    _check(m.latent_size % m.patch_size == 0, 'model.patch_size',
           f'{m.patch_size} does not divide model.latent_size={m.latent_size}')
    _check(m.dim % m.num_heads == 0, 'model.num_heads',
           f'{m.num_heads} does not divide model.dim={m.dim}')
  if m.name == 'sd3':   # sizes come from the checkpoint's config.json
    _choice(m.param_dtype, 'model.param_dtype', DTYPES)
    _check(c.base.source == 'diffusers', 'base.source',
           f"model 'sd3' loads its weights from a diffusers folder ('diffusers'), got "
           f'{c.base.source!r}')
  _check(m.lora_rank >= 0, 'model.lora_rank', f'must be >= 0, got {m.lora_rank}')
  _choice(c.student.kind, 'student.kind', KINDS)
  _choice(c.teachers.kind, 'teachers.kind', KINDS)
  if 'lora' in (c.student.kind, c.teachers.kind):
    _check(m.lora_rank > 0, 'model.lora_rank', 'must be > 0 when a student or teacher is LoRA')

  num_tasks = len(c.data.tasks)
  _check(num_tasks > 0, 'data.tasks', 'needs at least one task')
  _check(len(c.teachers.cfg_scales) == num_tasks, 'teachers.cfg_scales',
         f'has {len(c.teachers.cfg_scales)} entries for {num_tasks} tasks')
  _positive(c.data.prompts_per_device, 'data.prompts_per_device')

  r = c.rollout
  _check(isinstance(r.num_steps, int) and r.num_steps >= 1, 'rollout.num_steps',
         f'must be an int >= 1, got {r.num_steps!r}')
  _positive(r.shift, 'rollout.shift')
  _choice(r.kernel, 'rollout.kernel', KERNELS)
  _check(r.noise_level >= 0, 'rollout.noise_level', f'must be >= 0, got {r.noise_level}')
  _choice(r.logprob_reduction, 'rollout.logprob_reduction', ('sum', 'mean'))

  o = c.objective
  _choice(o.name, 'objective.name', OBJECTIVES)
  _choice(o.reduction, 'objective.reduction', ('sum', 'mean'))
  _choice(o.sde_normaliser, 'objective.sde_normaliser', ('paper', 'recipe'))
  _choice(o.time_reduction, 'objective.time_reduction', ('sum', 'mean'))
  _check(0 < o.timestep_fraction <= 1, 'objective.timestep_fraction',
         f'must be in (0, 1], got {o.timestep_fraction}')
  trained = num_train_steps(c)
  _check(trained >= 1, 'objective.timestep_fraction',
         f'trains no step: int({r.num_steps} × {o.timestep_fraction}) = 0')
  _check(o.timestep_chunks >= 1 and trained % o.timestep_chunks == 0, 'objective.timestep_chunks',
         f'{o.timestep_chunks} does not divide the {trained} trained steps')
  if o.name.startswith('ppo'):
    _check(r.kernel != 'ode' and r.noise_level > 0, 'objective.name',
           f'{o.name} needs a stochastic sampler (rollout.kernel an SDE, noise_level > 0)')
  _check(o.clip_range > 0, 'objective.clip_range', f'must be > 0, got {o.clip_range}')
  _check(0 <= o.discount <= 1, 'objective.discount', f'must be in [0, 1], got {o.discount}')
  _check(o.discount == 0 or o.timestep_chunks == 1, 'objective.discount',
         'discounted advantages need all trained steps in one chunk (timestep_chunks = 1)')
  _check(o.num_microbatches >= 1, 'objective.num_microbatches', 'must be >= 1')
  _check(c.data.prompts_per_device % o.num_microbatches == 0, 'objective.num_microbatches',
         f'{o.num_microbatches} does not divide data.prompts_per_device='
         f'{c.data.prompts_per_device}')

  p = c.optimizer
  _positive(p.lr, 'optimizer.lr')
  _check(0 <= p.b1 < 1, 'optimizer.b1', f'must be in [0, 1), got {p.b1}')
  _check(0 <= p.b2 < 1, 'optimizer.b2', f'must be in [0, 1), got {p.b2}')
  _check(p.weight_decay >= 0, 'optimizer.weight_decay', f'must be >= 0, got {p.weight_decay}')
  _positive(p.grad_clip, 'optimizer.grad_clip')
  _check(0 <= c.ema.max_decay < 1, 'ema.max_decay', f'must be in [0, 1), got {c.ema.max_decay}')
  _check(c.ema.every >= 1, 'ema.every', f'must be >= 1, got {c.ema.every}')

  t = c.train
  _check(t.num_rounds >= 0, 'train.num_rounds', f'must be >= 0, got {t.num_rounds}')
  _check(t.log_every >= 1, 'train.log_every', f'must be >= 1, got {t.log_every}')
  _check(t.checkpoint_every >= 1, 'train.checkpoint_every',
         f'must be >= 1, got {t.checkpoint_every}')
  _check(t.keep_checkpoints >= 1, 'train.keep_checkpoints',
         f'must be >= 1, got {t.keep_checkpoints}')


def num_train_steps(c) -> int:
  """How many of the N transitions are trained: int(N · timestep_fraction) (9 of 10)."""
  return int(c.rollout.num_steps * c.objective.timestep_fraction)
