"""Prompt sources: per-task batches of text conditioning with a resumable position.

Every source yields, per round, conditioning for all tasks stacked as [M, B, ...] (the task
axis first, the global batch second) and reports a JSON-able `position` that checkpoints save.
Order is a deterministic function of (seed, task, epoch), so restoring the position replays
exactly the prompts an uninterrupted run would have seen.

`RandomEmbeddingPrompts` is the stand-in used until trained text encoders exist: each task owns a
fixed table of random "prompt embeddings" (a token sequence with a padding mask plus a pooled
vector), and the empty prompt is one more fixed entry.
"""

from __future__ import annotations

import numpy as np


def epoch_order(seed: int, task: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, task, epoch]).permutation(n)


def take_indices(seed: int, task: int, position: int, batch: int, n: int) -> np.ndarray:
  """Prompt indices of round `position` for one task (epochs reshuffled deterministically)."""
  flat = position * batch + np.arange(batch)
  epochs, offsets = flat // n, flat % n
  return np.array([epoch_order(seed, task, int(e), n)[o] for e, o in zip(epochs, offsets)])


class RandomEmbeddingPrompts:

  def __init__(self, num_tasks: int, num_prompts: int, context_length: int, context_dim: int,
               pooled_dim: int, batch_per_task: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.num_tasks, self.num_prompts, self.batch = num_tasks, num_prompts, batch_per_task
    self.seed = seed
    shape = (num_tasks, num_prompts)
    self._context = rng.standard_normal(shape + (context_length, context_dim), np.float32)
    self._pooled = rng.standard_normal(shape + (pooled_dim,), np.float32)
    lengths = rng.integers(1, context_length + 1, size=shape)
    self._mask = np.arange(context_length)[None, None] < lengths[..., None]
    self._negative = {
        'context': rng.standard_normal((1, context_length, context_dim), np.float32),
        'pooled': rng.standard_normal((1, pooled_dim), np.float32),
        'context_mask': np.arange(context_length)[None] < 1,
    }
    self.position = 0

  def negative(self) -> dict:
    return self._negative

  def next_batch(self) -> dict:
    idx = np.stack([take_indices(self.seed, m, self.position, self.batch, self.num_prompts)
                    for m in range(self.num_tasks)])
    tasks = np.arange(self.num_tasks)[:, None]
    self.position += 1
    return {'context': self._context[tasks, idx], 'pooled': self._pooled[tasks, idx],
            'context_mask': self._mask[tasks, idx]}

  def get_position(self) -> dict:
    return {'position': self.position}

  def set_position(self, position: dict) -> None:
    self.position = int(position['position'])
