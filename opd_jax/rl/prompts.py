"""Prompts of the RL trainers: which tasks an iteration draws from, and the draws themselves.

  * `active_tasks`: `config.schedule.mode` 'joint' (every batch draws prompts from every task:
    multi-task RL over the union of prompt sets) or 'cascade' (tasks one after another, an equal
    share of the iterations each). One task is 'joint' over one set;
  * `RLPrompts`: per-task prompt sets, drawn in deterministic reshuffled epochs, each prompt
    repeated `group_size` times (a GRPO group); its position (prompts drawn per task) is saved
    with checkpoints so a resumed run draws what an uninterrupted one would;
  * `load_rl_prompts`: the sets of config.data.source — 'mini_world' (the TFDS train splits
    encoded by the base's text encoder) or 'sd3_embeddings' (the SD3 cache of
    `python -m opd_jax.tools.encode_prompts`, rows read on demand: a Pick-a-Pic train set is
    25 432 prompts × 5.5 MB of float32 embeddings, too large to hold).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from opd_jax.errors import ConfigError
from opd_jax.mini_world import conditioning

SCHEDULE_MODES = ('joint', 'cascade')
PROMPT_SOURCES = ('mini_world', 'sd3_embeddings')


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
  """One iteration's prompts, each repeated group_size times (B = prompts × group_size).

  The conditioning is held once per prompt (`prompt_cond`, leading axis P) and repeated per
  row only for the rows asked for (`cond_rows`): an SD3 row is ~5.5 MB, and an iteration of
  48 prompts × 24 images would otherwise hold 6 GB on the host instead of 264 MB.
  """
  prompts: list[str]          # [B]
  task: np.ndarray            # int32 [B], index into config.data.tasks
  group: np.ndarray           # int32 [B], the prompt's group id within the batch (row of
                              # prompt_cond)
  prompt_cond: Any            # conditioning pytree, leading axis P (one row per prompt)
  metadata: list[dict]        # [B] the prompt file's record (GenEval's tag/objects), or {}

  def cond_rows(self, start: int, stop: int) -> Any:
    """The conditioning of rows start..stop−1 of the batch (leading axis stop − start)."""
    rows = self.group[start:stop]
    return jax.tree.map(lambda v: np.take(v, rows, axis=0), self.prompt_cond)

  @property
  def cond(self) -> Any:
    """The conditioning of every row (leading axis B)."""
    return self.cond_rows(0, len(self.prompts))


@dataclasses.dataclass
class CachePromptSet:
  """One task's prompts in an SD3 prompt-embedding cache, rows read when drawn."""
  task: str
  source: Any                 # random-access source of `prompt_embeddings.load_prompt_embeddings`
  size: int

  def __len__(self) -> int:
    return self.size

  def _rows(self, idx) -> list[dict]:
    return [self.source[int(i)] for i in idx]

  def take(self, idx: np.ndarray) -> tuple[list[str], dict[str, np.ndarray]]:
    """(prompts, {'context' [n, L, D], 'pooled' [n, P]}) of the rows `idx`."""
    from opd_jax.data import prompt_embeddings as pe
    rows = self._rows(idx)
    cond = {'context': np.stack([r['prompt_embeds'] for r in rows]).astype(np.float32),
            'pooled': np.stack([r['pooled_prompt_embeds'] for r in rows]).astype(np.float32)}
    return [pe.decode_text(r['prompt']) for r in rows], cond

  def metadata(self, idx: np.ndarray) -> list[dict]:
    import json
    from opd_jax.data import prompt_embeddings as pe
    return [json.loads(pe.decode_text(r['prompt_metadata']) or '{}') for r in self._rows(idx)]


def _metadata(prompt_set, idx: np.ndarray) -> list[dict]:
  if isinstance(prompt_set, CachePromptSet):
    return prompt_set.metadata(idx)
  return [{} for _ in idx]        # the mini world's prompts carry everything in their text


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
    prompts, task_ids, conds, metadata = [], [], [], []
    for k in tasks:
      idx = self._indices(k, per_task)
      p, c = self.sets[k].take(idx)
      prompts += p
      metadata += _metadata(self.sets[k], idx)
      task_ids += [k] * per_task
      conds.append(c)
    g = self.group_size
    return RLBatch([p for p in prompts for _ in range(g)],
                   np.repeat(np.asarray(task_ids, np.int32), g),
                   np.repeat(np.arange(len(prompts), dtype=np.int32), g),
                   jax.tree.map(lambda *xs: np.concatenate(xs), *conds),
                   [m for m in metadata for _ in range(g)])

  def example_cond(self) -> dict[str, np.ndarray]:
    """The conditioning of one prompt (its structure and ranks give the shardings)."""
    return self.sets[0].take(np.zeros(1, np.int64))[1]

  def get_position(self) -> dict:
    return {'drawn': list(self._drawn)}

  def set_position(self, position: dict) -> None:
    self._drawn = [int(x) for x in position['drawn']]


def load_rl_prompts(config, base, batch_size: int) -> tuple[RLPrompts, dict]:
  """(train prompts of config.data.tasks, the empty prompt's conditioning) from
  config.data.source; `base` (`train.bases.Base`) brings the mini world's text encoder."""
  d = config.data
  if d.source == 'mini_world':
    if base.text_encoder is None:
      raise ConfigError("config.data.source: 'mini_world' prompts need the mini-world base's "
                        "text encoder (config.base.source = 'mini_world')")
    sets = [conditioning.load_prompt_set(d.data_dir, task, 'train', *base.text_encoder,
                                         d.dataset_config, d.max_prompts or None)
            for task in d.tasks]
    negative = conditioning.negative_conditioning(*base.text_encoder)
  elif d.source == 'sd3_embeddings':
    sets, negative = _cache_sets(config)
  else:
    raise ConfigError(f'config.data.source: {d.source!r} is not one of {PROMPT_SOURCES}')
  return RLPrompts(sets, batch_size, d.group_size, config.seed), negative


def _cache_sets(config) -> tuple[list[CachePromptSet], dict]:
  from opd_jax.data import prompt_embeddings as pe
  sources, negative = pe.open_train_sources(config.data)
  return ([CachePromptSet(task, source, n) for task, (source, n) in zip(config.data.tasks,
                                                                        sources)], negative)
