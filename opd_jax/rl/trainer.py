"""The RL trainer that makes the teachers and the baselines: Flow-GRPO or DiffusionNFT iterations
inside the shared training loop.

An iteration (one loop step) draws the active tasks' prompts (`prompts`), samples with the
algorithm's sampling weights (`sampler`) in `data.sample_batches` chunks, scores each chunk with
its tasks' rewards in a worker thread while the device samples the next chunk (`scoring`),
normalises advantages per group (`advantages`), then hands them to the algorithm's jitted update
(`grpo.GRPO`, `nft.NFT`: `config.trainer` picks one). The same trainer runs on the mini world
and on SD3/SD3.5 (`config.base.source`, `config.data.source`, `config.rewards.tasks`).
Single-task teachers, the joint multi-task baseline and the cascade baseline all run through
`run_rl`; at the end the adapter is saved as a teacher artifact in WORKDIR/teacher and, with
`train.export_peft`, as a PEFT folder in WORKDIR/teacher_peft. Resume, checkpoints, NaN and
preemption handling are the loop's (`opd_jax.train.loop`).
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

from opd_jax.mini_world import artifacts
from opd_jax.rl import advantages, grpo, nft, sampler, scoring
from opd_jax.rl import config as rl_config
from opd_jax.rl.prompts import RLPrompts, active_tasks, load_rl_prompts
from opd_jax.rl.setup import RLSetup, build_rl, export_teacher_peft, put_batch, save_teacher
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.train import bases, loop
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
  concat_fn: Any
  scorer: scoring.AsyncScorer
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
    size = len(rb.prompts)
    chunk = size // c.data.sample_batches
    params = self.algorithm.sampler_params(state)
    trajs, conds = [], []
    for start in range(0, size, chunk):
      cond = put_batch(self.setup.mesh, rb.cond_rows(start, start + chunk))
      traj, images = self.sample_fn(params, self.setup.frozen, cond, state.rng,
                                    jnp.int32(step), jnp.int32(start))
      self.scorer.submit(images, start, rb.prompts, rb.metadata, rb.task)  # overlaps sampling
      trajs.append(traj)
      conds.append(cond)
    # The chunks joined on device: the conditioning is uploaded once (SD3: ~5.5 MB a row).
    traj, cond = (trajs[0], conds[0]) if len(trajs) == 1 else self.concat_fn(trajs, conds)
    rewards = self.scorer.collect(size)
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


def _load_base(config, base, mesh) -> bases.Base:
  """The base `config.base` names, or the one given (a mini-world artifact or its directory,
  as the recipe passes it); fills config.model from it."""
  if isinstance(base, artifacts.BaseModel):
    return bases.mini_world_base(config, base)
  if base is not None:
    config.base.path = base
  return bases.load_base(config, mesh)


def prepare(config: ml_collections.ConfigDict, base=None, mesh=None) -> RLTrainer:
  """Validates the config, loads base, prompts and rewards, builds the jitted sampler and
  update (nothing compiled yet)."""
  rl_config.validate(config)
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  batch = rl_config.check_global_batch(config, batch_axis_size(mesh))
  config = ml_collections.ConfigDict(config.to_dict())   # a copy with the resolved batch
  config.data.batch_size, config.data.batch_size_per_device = batch, 0
  base = _load_base(config, base, mesh)
  rl_config.validate(config)    # again: the base has set the network's sizes
  prompts, negative = load_rl_prompts(config, base, batch)
  rewards = scoring.load_task_rewards(config, mesh)
  algorithm_module = ALGORITHMS[config.trainer]
  setup = build_rl(config, mesh, base, negative, extra_init=algorithm_module.extra_init)
  cond_example = prompts.example_cond()
  algorithm = algorithm_module.build(config, setup, cond_example)
  sample_fn = sampler.jit_sampler(setup, config.rollout, cond_example)
  fingerprint = {'base': base.fingerprint, 'prompts': [len(s) for s in prompts.sets]}
  return RLTrainer(config, setup, prompts, algorithm, sample_fn, sampler.jit_concat(setup, cond_example),
                   scoring.AsyncScorer(rewards), fingerprint, config.trainer)


def reward_history(workdir: str, tasks) -> list[dict]:
  """Per logged iteration, the mean reward of each task (NaN where the task was inactive)."""
  return [{t: row.get(f'reward/{t}', math.nan) for t in tasks} for row in read_metrics(workdir)]


def run_rl(config: ml_collections.ConfigDict, workdir: str, base=None, *, mesh=None,
           probe: Probe | None = None) -> dict:
  """Trains (or resumes) the RL teacher `config.trainer` and saves it under workdir/teacher.

  Args:
    config: a configs/mini/{grpo,grpo_guard,nft,multitask_rl,cascade_rl}.py or
      configs/teachers_sd35m.py config.
    workdir: output directory (metrics.jsonl, tensorboard/, checkpoints/, teacher/, and
      teacher_peft/ with train.export_peft).
    base: the pretrained base artifact or its directory (default: config.base.path).
    mesh: optional device mesh (default: from config.mesh.shape).
    probe: optional evaluation during training, off the clock (`opd_jax.train.probe`).

  Returns:
    {'teacher_dir', 'wall_s' (training seconds, cumulative over resumes), 'steps', 'metrics'
     (last logged), 'reward_history' (per logged iteration, per task; NaN where inactive)}.
  """
  started = time.time()
  trainer = prepare(config, base, mesh)
  try:
    result = loop.run(trainer, trainer.config, workdir, probe, started=started)
  finally:
    trainer.scorer.close()
  c = trainer.config
  teacher_dir = os.path.join(workdir, 'teacher')
  if jax.process_index() == 0:
    save_teacher(teacher_dir, result.state, c, c.train.num_steps)
    if c.train.get('export_peft', False):
      export_teacher_peft(c, result.state, os.path.join(workdir, 'teacher_peft'))
  return {'teacher_dir': teacher_dir, 'wall_s': result.train_seconds,
          'steps': trainer.config.train.num_steps, 'metrics': result.metrics,
          'reward_history': reward_history(workdir, trainer.config.data.tasks)}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The `grpo` and `nft` entries of `opd_jax.trainers`."""
  run_rl(config, workdir)
