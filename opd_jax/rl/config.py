"""Validation of an RL config (configs/mini/{grpo,nft,multitask_rl,cascade_rl}.py,
configs/teachers_sd35m.py): one ConfigError naming the first bad field, before any network is
built."""

from __future__ import annotations

from opd_jax.errors import ConfigError
from opd_jax.objectives.per_step_kl import KL_NORMALISERS, KL_REDUCTIONS
from opd_jax.rl.advantages import STD_SCOPES
from opd_jax.rl.prompts import PROMPT_SOURCES, SCHEDULE_MODES
from opd_jax.rl.scoring import REWARD_NAMES, RULE_REWARDS
from opd_jax.sampling.transitions import KERNELS
from opd_jax.train import config_check as cc

SECTIONS = ('seed', 'trainer', 'base.source', 'base.path', 'model.name', 'data.source',
            'data.tasks', 'data.batch_size', 'data.batch_size_per_device', 'data.group_size',
            'data.sample_batches', 'data.max_prompts', 'lora', 'rewards.tasks', 'schedule.mode',
            'rollout', 'advantage.std_scope', 'optimizer', 'ema', 'mesh.shape',
            'train.num_minibatches', 'train.num_microbatches', 'train.inner_epochs')
BASE_SOURCES = ('mini_world', 'diffusers')   # an RL teacher starts from a pretrained base


def validate(c) -> None:
  """Raises ConfigError for the first invalid field of a Flow-GRPO or DiffusionNFT config."""
  from opd_jax.mini_world import lexicon   # task names of the world the prompts come from
  cc.require_sections(c, SECTIONS + ('grpo' if c.trainer == 'grpo_guard' else c.trainer,))
  cc.validate_common(c)
  cc.choice(c.base.source, 'base.source', BASE_SOURCES)
  cc.validate_model(c)
  cc.validate_lora(c.lora)
  d = c.data
  cc.choice(d.source, 'data.source', PROMPT_SOURCES)
  tasks = tuple(d.tasks)
  cc.check(len(tasks) > 0 and len(set(tasks)) == len(tasks), 'data.tasks',
           f'needs distinct tasks, got {tasks}')
  if d.source == 'mini_world':
    for t in tasks:
      cc.choice(t, 'data.tasks', lexicon.TASKS)
  else:
    cc.check(bool(d.get('embeddings_dir', '')), 'data.embeddings_dir',
             'no path given; set it to a prompt cache of python -m opd_jax.tools.encode_prompts')
  declared = tuple(c.rewards.tasks.keys())
  cc.check(set(declared) == set(tasks), 'rewards.tasks',
           f'names a reward for {sorted(declared)}, the tasks are {sorted(tasks)}')
  for t in tasks:
    name = c.rewards.tasks[t]
    cc.choice(name, f'rewards.tasks.{t}', REWARD_NAMES)
    cc.check(name not in RULE_REWARDS or d.source == 'mini_world', f'rewards.tasks.{t}',
             f"{name!r} is a mini-world rule reward; its images come from data.source "
             "'mini_world' only")
  cc.validate_batch(d)
  cc.integer(d.group_size, 'data.group_size', 1)
  cc.integer(d.sample_batches, 'data.sample_batches', 1)
  cc.integer(d.max_prompts, 'data.max_prompts', 0)
  cc.choice(c.schedule.mode, 'schedule.mode', SCHEDULE_MODES)
  cc.choice(c.advantage.std_scope, 'advantage.std_scope', STD_SCOPES)
  if c.schedule.mode == 'joint' and d.batch_size:
    cc.check(d.batch_size % len(tasks) == 0, 'data.batch_size',
             f'{d.batch_size} prompts do not split evenly over the {len(tasks)} tasks of a '
             'joint batch')

  r = c.rollout
  cc.integer(r.num_steps, 'rollout.num_steps', 1)
  if c.base.source == 'diffusers':   # 0: the checkpoint's scheduler shift (read on load)
    cc.non_negative(r.shift, 'rollout.shift')
  else:
    cc.positive(r.shift, 'rollout.shift')
  cc.choice(r.kernel, 'rollout.kernel', KERNELS)
  cc.non_negative(r.noise_level, 'rollout.noise_level')
  cc.check(r.cfg_scale >= 1.0, 'rollout.cfg_scale', f'must be >= 1, got {r.cfg_scale}')
  cc.integer(r.sde_steps, 'rollout.sde_steps', 0)
  cc.check(r.sde_steps <= r.num_steps, 'rollout.sde_steps',
           f'{r.sde_steps} exceeds rollout.num_steps={r.num_steps}')
  cc.choice(r.logprob_reduction, 'rollout.logprob_reduction', KL_REDUCTIONS)

  t = c.train
  cc.integer(t.num_minibatches, 'train.num_minibatches', 1)
  cc.integer(t.num_microbatches, 'train.num_microbatches', 1)
  cc.integer(t.inner_epochs, 'train.inner_epochs', 1)

  if c.trainer in ('grpo', 'grpo_guard'):   # GRPO-Guard: Flow-GRPO's section + grpo.guard_bias
    from opd_jax.rl.grpo import grpo_spec
    g = c.grpo
    cc.positive(g.clip_range, 'grpo.clip_range')
    cc.positive(g.adv_clip, 'grpo.adv_clip')
    cc.non_negative(g.kl_beta, 'grpo.kl_beta')
    cc.choice(g.kl_reduction, 'grpo.kl_reduction', KL_REDUCTIONS)
    cc.choice(g.kl_normaliser, 'grpo.kl_normaliser', KL_NORMALISERS)
    cc.check(0 < g.timestep_fraction <= 1, 'grpo.timestep_fraction',
             f'must be in (0, 1], got {g.timestep_fraction}')
    grpo_spec(c, ())
  elif c.trainer == 'nft':
    from opd_jax.rl.nft import nft_spec
    n = c.nft
    cc.positive(n.adv_clip, 'nft.adv_clip')
    cc.non_negative(n.kl_beta, 'nft.kl_beta')
    cc.integer(n.timesteps_per_sample, 'nft.timesteps_per_sample', 1)
    cc.check(0 <= n.old_decay < 1, 'nft.old_decay', f'must be in [0, 1), got {n.old_decay}')
    nft_spec(c)
  else:
    raise ConfigError(f"config.trainer: {c.trainer!r} is not an RL trainer ('grpo', "
                      "'grpo_guard', 'nft')")


def check_global_batch(c, batch_devices: int) -> int:
  """Prompts per iteration; its images (× group_size) and minibatches must split over devices."""
  prompts = cc.global_batch_size(c.data, batch_devices, must_split=False)
  images = prompts * c.data.group_size
  k = c.data.sample_batches
  cc.check(images % k == 0 and (images // k) % batch_devices == 0, 'data.sample_batches',
           f'{k} chunks of the {images} images of an iteration do not each split over the '
           f'{batch_devices} batch devices of the mesh')
  n = c.train.num_minibatches
  cc.check(images % n == 0, 'train.num_minibatches',
           f'{n} does not divide the {images} images of an iteration (data.batch_size × '
           'data.group_size)')
  cc.check((images // n) % batch_devices == 0, 'train.num_minibatches',
           f'a minibatch of {images // n} images does not split over the {batch_devices} batch '
           'devices of the mesh')
  m = c.train.num_microbatches
  cc.check((images // n) % (m * batch_devices) == 0, 'train.num_microbatches',
           f'{m} micro-batches of a {images // n}-image minibatch do not each split over the '
           f'{batch_devices} batch devices of the mesh')
  if c.schedule.mode == 'joint':
    cc.check(prompts % len(c.data.tasks) == 0, 'data.batch_size',
             f'{prompts} prompts do not split evenly over the {len(c.data.tasks)} tasks')
  return prompts
