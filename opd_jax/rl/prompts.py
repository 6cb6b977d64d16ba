"""Prompts of the RL trainers: which tasks an iteration draws from, and the draws themselves.

  * `active_tasks`: `config.schedule.mode` 'joint' (every batch draws prompts from every task:
    multi-task RL over the union of prompt sets) or 'cascade' (tasks one after another, an equal
    share of the iterations each). One task is 'joint' over one set;
  * `RLPrompts`: per-task prompt sets, drawn in deterministic reshuffled epochs, each prompt
    repeated `group_size` times (a GRPO group); its position (prompts drawn per task) is saved
    with checkpoints so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from opd_jax.errors import ConfigError
from opd_jax.mini_world import conditioning

SCHEDULE_MODES = ('joint', 'cascade')


def active_tasks(mode: str, num_tasks: int, step: int, num_steps: int) -> tuple[int, ...]:
  """Indices of the tasks whose prompts iteration `step` draws.

  Args:
    mode: 'joint' (all tasks every iteration) or 'cascade' (task k for iterations
      [k·S/M, (k+1)·S/M), in config order).
    num_tasks: M.
    step: iteration index.
    num_steps: total iterations S.
  """
  if mode == 'joint':
    return tuple(range(num_tasks))
  if mode == 'cascade':
    return (min(step * num_tasks // max(num_steps, 1), num_tasks - 1),)
  raise ConfigError(f'config.schedule.mode: {mode!r} is not one of {SCHEDULE_MODES}')


@dataclasses.dataclass
class RLBatch:
  """One iteration's prompts, each repeated group_size times (B = prompts × group_size)."""
  prompts: list[str]          # [B]
  task: np.ndarray            # int32 [B], index into config.data.tasks
  group: np.ndarray           # int32 [B], the prompt's group id within the batch
  cond: dict[str, np.ndarray]  # conditioning with leading axis B


class RLPrompts:
  """Per-task prompt sets drawn in deterministic reshuffled epochs (position = iteration)."""

  def __init__(self, prompt_sets: Sequence[conditioning.PromptSet], prompts_per_step: int,
               group_size: int, seed: int):
    self.sets = list(prompt_sets)
    self.prompts_per_step, self.group_size, self.seed = prompts_per_step, group_size, seed
    self._drawn = [0] * len(self.sets)   # prompts drawn so far per task

  def _indices(self, task: int, n: int) -> np.ndarray:
    size = len(self.sets[task])
    flat = self._drawn[task] + np.arange(n)
    self._drawn[task] += n
    epochs, offsets = np.divmod(flat, size)
    orders = {e: np.random.default_rng([self.seed, task, int(e)]).permutation(size)
              for e in np.unique(epochs)}
    return np.array([orders[e][o] for e, o in zip(epochs, offsets)])

  def next(self, tasks: Sequence[int]) -> RLBatch:
    """Draws prompts_per_step prompts split evenly over `tasks` and repeats each G times."""
    if self.prompts_per_step % len(tasks):
      raise ConfigError(f'config.data.batch_size: {self.prompts_per_step} prompts do not split '
                        f'evenly over the {len(tasks)} active tasks')
    per_task = self.prompts_per_step // len(tasks)
    prompts, task_ids, conds = [], [], []
    for k in tasks:
      p, c = self.sets[k].take(self._indices(k, per_task))
      prompts += p
      task_ids += [k] * per_task
      conds.append(c)
    cond = jax.tree.map(lambda *xs: np.repeat(np.concatenate(xs), self.group_size, axis=0),
                        *conds)
    g = self.group_size
    return RLBatch([p for p in prompts for _ in range(g)],
                   np.repeat(np.asarray(task_ids, np.int32), g),
                   np.repeat(np.arange(len(prompts), dtype=np.int32), g), cond)

  def get_position(self) -> dict:
    return {'drawn': list(self._drawn)}

  def set_position(self, position: dict) -> None:
    self._drawn = [int(x) for x in position['drawn']]


def load_rl_prompts(config, text_encoder: tuple, batch_size: int) -> RLPrompts:
  """The train prompts of config.data.tasks, encoded once by the base's text encoder."""
  d = config.data
  sets = [conditioning.load_prompt_set(d.data_dir, task, 'train', *text_encoder,
                                       d.dataset_config, d.max_prompts or None)
          for task in d.tasks]
  return RLPrompts(sets, batch_size, d.group_size, config.seed)
