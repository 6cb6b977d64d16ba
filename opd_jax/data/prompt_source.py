"""Prompt sources: per-task batches of text conditioning with a resumable position.

Every source yields, per round, conditioning for all tasks stacked as [M, B, ...] (the task
axis first, the global batch second) and reports a JSON-able `position` that checkpoints save.
Order is a deterministic function of (seed, task, epoch), so restoring the position replays
exactly the prompts an uninterrupted run would have seen.

Both sources here hold one conditioning table per task in host memory and gather rows:
  `TablePrompts`          tables given by the caller (e.g. the mini world's frozen text encoder
                          applied once to each task's train prompts);
  `RandomEmbeddingPrompts` seeded random "prompt embeddings" (a token sequence with a padding
                          mask plus a pooled vector): a stand-in that needs no text encoder.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opd_jax.fingerprint import numpy_digest


def epoch_order(seed: int, task: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, task, epoch]).permutation(n)


def take_indices(seed: int, task: int, position: int, batch: int, n: int) -> np.ndarray:
  """Prompt indices of round `position` for one task (epochs reshuffled deterministically)."""
  flat = position * batch + np.arange(batch)
  epochs, offsets = flat // n, flat % n
  return np.array([epoch_order(seed, task, int(e), n)[o] for e, o in zip(epochs, offsets)])


class TablePrompts:
  """Per-task conditioning tables ({'context', 'pooled', 'context_mask'} with leading axis N_m)."""

  def __init__(self, tables: Sequence[dict], negative: dict, batch_per_task: int, seed: int = 0):
    """
    Args:
      tables: one conditioning dict per task (tasks may hold different numbers of prompts).
      negative: the empty prompt's conditioning, leading axis 1 (CFG's unconditional branch).
      batch_per_task: prompts per task per round (the global batch).
      seed: seed of the per-task epoch shuffles.
    """
    if not tables:
      raise ValueError('no prompt tables: OPD needs at least one task')
    for m, t in enumerate(tables):
      if len(t['pooled']) == 0:
        raise ValueError(f'the prompt table of task {m} is empty')
    self.tables, self._negative = list(tables), negative
    self.batch, self.seed = batch_per_task, seed
    self.position = 0

  def negative(self) -> dict:
    return self._negative

  def next_batch(self) -> dict:
    """Conditioning of the next round, [M, B, ...] (task axis first)."""
    rows = []
    for m, table in enumerate(self.tables):
      idx = take_indices(self.seed, m, self.position, self.batch, len(table['pooled']))
      rows.append({k: np.asarray(v)[idx] for k, v in table.items()})
    self.position += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def fingerprint(self) -> str:
    """Digest of every table's shapes and its first and last rows (cheap at any size)."""
    ends = [[(np.asarray(v)[:1], np.asarray(v)[-1:], np.asarray(np.shape(v)))
             for _, v in sorted(t.items())] for t in self.tables]
    return numpy_digest(ends)

  def get_position(self) -> dict:
    return {'position': self.position}

  def set_position(self, position: dict) -> None:
    self.position = int(position['position'])


class RandomEmbeddingPrompts(TablePrompts):

  def __init__(self, num_tasks: int, num_prompts: int, context_length: int, context_dim: int,
               pooled_dim: int, batch_per_task: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (num_tasks, num_prompts)
    context = rng.standard_normal(shape + (context_length, context_dim), np.float32)
    pooled = rng.standard_normal(shape + (pooled_dim,), np.float32)
    lengths = rng.integers(1, context_length + 1, size=shape)
    mask = np.arange(context_length)[None, None] < lengths[..., None]
    negative = {
        'context': rng.standard_normal((1, context_length, context_dim), np.float32),
        'pooled': rng.standard_normal((1, pooled_dim), np.float32),
        'context_mask': np.arange(context_length)[None] < 1,
    }
    super().__init__([{'context': context[m], 'pooled': pooled[m], 'context_mask': mask[m]}
                      for m in range(num_tasks)], negative, batch_per_task, seed)
