"""Validation of an OPD config (configs/mini/opd.py, configs/opd_sd35m.py): one ConfigError
naming the first bad field, before any model is built — a typo costs seconds, not a compile.
"""

from __future__ import annotations

from opd_jax.errors import ConfigError
from opd_jax.models.policy import KINDS
from opd_jax.objectives import OBJECTIVES
from opd_jax.objectives.per_step_kl import KL_NORMALISERS, KL_REDUCTIONS
from opd_jax.sampling.transitions import KERNELS
from opd_jax.train import config_check as cc
from opd_jax.train.bases import BASE_SOURCES

SECTIONS = ('seed', 'trainer', 'base.source', 'base.path', 'model.name', 'lora', 'student.kind',
            'teachers.kind', 'teachers.source', 'teachers.tasks', 'data.source', 'data.tasks',
            'data.batch_size', 'data.batch_size_per_device', 'rollout', 'objective', 'optimizer',
            'ema', 'mesh.shape', 'train')
TEACHER_SOURCES = ('random', 'artifacts', 'peft')
PROMPT_SOURCES = ('random_embeddings', 'mini_world', 'sd3_embeddings')


def num_train_steps(c) -> int:
  """How many of the N transitions are trained: int(N · timestep_fraction) (9 of 10)."""
  return int(c.rollout.num_steps * c.objective.timestep_fraction)


def validate(c) -> None:
  """Raises ConfigError for the first invalid field of an OPD config."""
  cc.require_sections(c, SECTIONS)
  cc.check(c.trainer == 'opd', 'trainer', f"an OPD config has trainer 'opd', got {c.trainer!r}")
  cc.validate_common(c)
  cc.choice(c.base.source, 'base.source', BASE_SOURCES)
  cc.choice(c.teachers.source, 'teachers.source', TEACHER_SOURCES)
  cc.choice(c.data.source, 'data.source', PROMPT_SOURCES)

  cc.validate_model(c)
  cc.choice(c.student.kind, 'student.kind', KINDS)
  cc.choice(c.teachers.kind, 'teachers.kind', KINDS)
  lora_used = 'lora' in (c.student.kind, c.teachers.kind)
  cc.validate_lora(c.lora, required=lora_used)
  cc.non_negative(c.teachers.random_scale, 'teachers.random_scale')

  tasks = tuple(c.data.tasks)
  cc.check(len(tasks) > 0, 'data.tasks', 'needs at least one task')
  cc.check(len(set(tasks)) == len(tasks), 'data.tasks', f'lists a task twice: {tasks}')
  declared = tuple(c.teachers.tasks.keys())
  missing = [t for t in tasks if t not in declared]
  extra = [t for t in declared if t not in tasks]
  cc.check(not missing, 'teachers.tasks',
           f'no teacher declared for task(s) {missing} of data.tasks {tasks}')
  cc.check(not extra, 'teachers.tasks', f'teacher(s) {extra} are not in data.tasks {tasks}')
  for t in tasks:
    teacher = c.teachers.tasks[t]
    cc.check(float(teacher.cfg_scale) >= 1.0, f'teachers.tasks.{t}.cfg_scale',
             f'must be >= 1 (1: no guidance), got {teacher.cfg_scale}')
  cc.validate_batch(c.data)

  r = c.rollout
  cc.integer(r.num_steps, 'rollout.num_steps', 1)
  cc.non_negative(r.shift, 'rollout.shift')   # 0: the checkpoint's scheduler shift
  cc.check(r.shift > 0 or c.base.source == 'diffusers', 'rollout.shift',
           "0 (read from the checkpoint's scheduler config) needs base.source 'diffusers'")
  cc.choice(r.kernel, 'rollout.kernel', KERNELS)
  cc.non_negative(r.noise_level, 'rollout.noise_level')
  cc.check(r.cfg_scale >= 1.0, 'rollout.cfg_scale', f'must be >= 1, got {r.cfg_scale}')
  cc.choice(r.logprob_reduction, 'rollout.logprob_reduction', KL_REDUCTIONS)

  o = c.objective
  cc.choice(o.name, 'objective.name', OBJECTIVES)
  cc.choice(o.kl_reduction, 'objective.kl_reduction', KL_REDUCTIONS)
  cc.choice(o.kl_normaliser, 'objective.kl_normaliser', KL_NORMALISERS)
  cc.choice(o.time_reduction, 'objective.time_reduction', ('sum', 'mean'))
  cc.check(0 < o.timestep_fraction <= 1, 'objective.timestep_fraction',
           f'must be in (0, 1], got {o.timestep_fraction}')
  trained = num_train_steps(c)
  cc.check(trained >= 1, 'objective.timestep_fraction',
           f'trains no step: int({r.num_steps} × {o.timestep_fraction}) = 0')
  if o.name.startswith('ppo'):
    cc.check(r.kernel != 'ode' and r.noise_level > 0, 'objective.name',
             f'{o.name} needs a stochastic sampler (rollout.kernel an SDE, noise_level > 0)')
  cc.positive(o.clip_range, 'objective.clip_range')
  cc.check(0 <= o.discount <= 1, 'objective.discount', f'must be in [0, 1], got {o.discount}')

  t = c.train
  cc.integer(t.num_microbatches, 'train.num_microbatches', 1)
  cc.integer(t.timestep_chunks, 'train.timestep_chunks', 1)
  cc.check(trained % t.timestep_chunks == 0, 'train.timestep_chunks',
           f'{t.timestep_chunks} does not divide the {trained} trained steps')
  cc.check(o.discount == 0 or t.timestep_chunks == 1, 'objective.discount',
           'discounted advantages need all trained steps in one chunk (train.timestep_chunks = 1)')
  cc.non_negative(t.memory_limit_gib, 'train.memory_limit_gib')
  cc.check(isinstance(t.fused_vjp, bool), 'train.fused_vjp', f'True or False, got {t.fused_vjp!r}')
  if t.fused_vjp:
    cc.check(o.name == 'analytic', 'train.fused_vjp',
             f"the one-pass gradient is the analytic objective's; objective.name is {o.name!r}")
    cc.check(t.timestep_chunks == 1, 'train.timestep_chunks',
             'the fused round takes one trained step at a time; set 1 with train.fused_vjp')
  per = c.data.batch_size or c.data.batch_size_per_device
  cc.check(per % t.num_microbatches == 0, 'train.num_microbatches',
           f'{t.num_microbatches} does not divide the batch ({per} prompts per task'
           f'{"" if c.data.batch_size else " per device"})')
  cc.check(not t.export_peft or c.student.kind == 'lora', 'train.export_peft',
           'only a LoRA student exports to PEFT')


def check_global_batch(c, batch_devices: int) -> int:
  """The global prompts per task per round; micro-batches must split it over the devices."""
  b = cc.global_batch_size(c.data, batch_devices)
  n = c.train.num_microbatches
  if b % (n * batch_devices):
    raise ConfigError(f'config.train.num_microbatches: {n} micro-batches of the {b} prompts per '
                      f'task do not split over the {batch_devices} batch devices')
  return b
