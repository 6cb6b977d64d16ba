"""The RL trainer that makes the teachers and the baselines: Flow-GRPO or DiffusionNFT iterations
inside the shared training loop.

An iteration (one loop step) draws the active tasks' prompts (`prompts`), samples with the
algorithm's sampling weights (`sampler`), scores every image with its task's reward on the host
and normalises advantages per group (`advantages`), then hands them to the algorithm's jitted
update (`grpo.GRPO`, `nft.NFT`: `config.trainer` picks one). Single-task teachers, the joint
multi-task baseline and the cascade baseline all run through `run_rl`; at the end the adapter is
saved as a teacher artifact in WORKDIR/teacher. Resume, checkpoints, NaN and preemption handling
are the loop's (`opd_jax.train.loop`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opd_jax.errors import ConfigError
from opd_jax.mini_world import artifacts
from opd_jax.rl import advantages, grpo, nft, sampler
from opd_jax.rl import config as rl_config
from opd_jax.rl.prompts import RLPrompts, active_tasks, load_rl_prompts
from opd_jax.rl.setup import RLSetup, build_rl, put_batch, save_teacher
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.train import loop
from opd_jax.train.metric_writer import read_metrics
from opd_jax.train.probe import Probe

ALGORITHMS = {'grpo': grpo, 'grpo_guard': grpo, 'nft': nft}   # modules: `extra_init`, `build`


@dataclasses.dataclass
class RLTrainer:
  """The `loop.Trainer` of the RL algorithms: a step is one iteration."""
  config: ml_collections.ConfigDict
  setup: RLSetup
  prompts: RLPrompts
  algorithm: Any                   # grpo.GRPO | nft.NFT
  sample_fn: Any
  fingerprint: dict
  name: str = 'rl'
  metric_names: dict = dataclasses.field(default_factory=dict)

  @property
  def abstract_state(self):
    return self.setup.abstract_state

  def init_state(self):
    return self.setup.init_state()

  def compile(self) -> None:
    """Nothing ahead of time: the jitted functions compile at the first step."""

  def step(self, state, step: int):
    c = self.config
    tasks = list(c.data.tasks)
    rb = self.prompts.next(active_tasks(c.schedule.mode, len(tasks), step, c.train.num_steps))
    cond = put_batch(self.setup.mesh, rb.cond)
    traj, images = self.sample_fn(self.algorithm.sampler_params(state), self.setup.frozen, cond,
                                  state.rng, jnp.int32(step))
    rewards = advantages.compute_rewards(np.asarray(images), rb.prompts, rb.task, tasks)
    adv = advantages.group_advantages(rewards, rb.group, rb.task, c.advantage.std_scope)
    state, metrics = self.algorithm.update(state, traj, cond, adv, step)
    host = {f'reward/{t}': float(rewards[rb.task == k].mean())
            for k, t in enumerate(tasks) if np.any(rb.task == k)}
    host['reward_std'] = float(rewards.std())
    return state, {**metrics, **host}

  def get_position(self) -> dict:
    return self.prompts.get_position()

  def set_position(self, position: dict) -> None:
    self.prompts.set_position(position)

  def inputs_fingerprint(self) -> dict:
    return self.fingerprint

  def eval_params(self, state):
    return state.ema_params if self.config.ema.use_ema else state.params


def _load_base(config, base) -> tuple[artifacts.BaseModel, str]:
  if isinstance(base, artifacts.BaseModel):
    return base, 'given'
  path = base or config.base.path
  if not path:
    raise ConfigError('config.base.path: no path given; set it to a pretrained mini-world base '
                      '(WORKDIR/pretrain/base of the recipe)')
  if not os.path.isdir(path):
    raise ConfigError(f'config.base.path: {path!r} is not a directory (expected a pretrained '
                      'mini-world base, WORKDIR/pretrain/base of the recipe)')
  base = artifacts.load_base(path)
  return base, base.fingerprint


def prepare(config: ml_collections.ConfigDict, base=None, mesh=None) -> RLTrainer:
  """Validates the config, loads base and prompts and builds the jitted sampler and update."""
  rl_config.validate(config)
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  batch = rl_config.check_global_batch(config, batch_axis_size(mesh))
  base, base_fingerprint = _load_base(config, base)
  config = ml_collections.ConfigDict(config.to_dict())   # a copy with the resolved batch
  config.data.batch_size, config.data.batch_size_per_device = batch, 0
  algorithm_module = ALGORITHMS[config.trainer]
  setup = build_rl(config, mesh, base, extra_init=algorithm_module.extra_init)
  prompts = load_rl_prompts(config, (setup.nets.text_graphdef, base.text_encoder), batch)
  cond_example = prompts.sets[0].cond
  algorithm = algorithm_module.build(config, setup, cond_example)
  sample_fn = sampler.jit_sampler(setup, config.rollout, cond_example)
  fingerprint = {'base': base_fingerprint,
                 'prompts': [len(s) for s in prompts.sets]}
  return RLTrainer(config, setup, prompts, algorithm, sample_fn, fingerprint, config.trainer)


def reward_history(workdir: str, tasks) -> list[dict]:
  """Per logged iteration, the mean reward of each task (NaN where the task was inactive)."""
  return [{t: row.get(f'reward/{t}', math.nan) for t in tasks} for row in read_metrics(workdir)]


def run_rl(config: ml_collections.ConfigDict, workdir: str, base=None, *, mesh=None,
           probe: Probe | None = None) -> dict:
  """Trains (or resumes) the RL teacher `config.trainer` and saves it under workdir/teacher.

  Args:
    config: a configs/mini/{grpo,nft,multitask_rl,cascade_rl}.py config.
    workdir: output directory (metrics.jsonl, tensorboard/, checkpoints/, teacher/).
    base: the pretrained base artifact or its directory (default: config.base.path).
    mesh: optional device mesh (default: from config.mesh.shape).
    probe: optional evaluation during training, off the clock (`opd_jax.train.probe`).

  Returns:
    {'teacher_dir', 'wall_s' (training seconds, cumulative over resumes), 'steps', 'metrics'
     (last logged), 'reward_history' (per logged iteration, per task; NaN where inactive)}.
  """
  started = time.time()
  trainer = prepare(config, base, mesh)
  result = loop.run(trainer, trainer.config, workdir, probe, started=started)
  teacher_dir = save_teacher(os.path.join(workdir, 'teacher'), result.state, trainer.config,
                             trainer.config.train.num_steps)
  return {'teacher_dir': teacher_dir, 'wall_s': result.train_seconds,
          'steps': trainer.config.train.num_steps, 'metrics': result.metrics,
          'reward_history': reward_history(workdir, trainer.config.data.tasks)}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The `grpo` and `nft` entries of `opd_jax.trainers`."""
  run_rl(config, workdir)
