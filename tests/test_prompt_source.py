"""Prompt sources: per-task tables of different sizes, deterministic epochs, exact resume."""

import numpy as np
import pytest

from opd_jax.data.prompt_source import TablePrompts


def _tables(sizes):
  return [{'context': np.full((n, 2, 3), m, np.float32) + np.arange(n)[:, None, None],
           'pooled': np.arange(n, dtype=np.float32)[:, None] + 100 * m,
           'context_mask': np.ones((n, 2), bool)} for m, n in enumerate(sizes)]


def _negative():
  return {'context': np.zeros((1, 2, 3), np.float32), 'pooled': np.zeros((1, 1), np.float32),
          'context_mask': np.ones((1, 2), bool)}


def test_batches_stack_tasks_and_cover_each_epoch():
  source = TablePrompts(_tables([4, 6]), _negative(), batch_per_task=2, seed=3)
  batches = [source.next_batch() for _ in range(6)]
  assert batches[0]['context'].shape == (2, 2, 2, 3)
  seen_0 = np.concatenate([b['pooled'][0, :, 0] for b in batches[:2]])
  seen_1 = np.concatenate([b['pooled'][1, :, 0] for b in batches[:3]])
  assert sorted(seen_0) == [0, 1, 2, 3]            # one epoch of task 0: every prompt once
  assert sorted(seen_1) == [100, 101, 102, 103, 104, 105]


def test_resume_replays_the_same_prompts():
  a = TablePrompts(_tables([5, 3]), _negative(), batch_per_task=2, seed=0)
  for _ in range(3):
    a.next_batch()
  b = TablePrompts(_tables([5, 3]), _negative(), batch_per_task=2, seed=0)
  b.set_position(a.get_position())
  for _ in range(4):
    x, y = a.next_batch(), b.next_batch()
    np.testing.assert_array_equal(x['pooled'], y['pooled'])


def test_empty_table_is_an_error():
  with pytest.raises(ValueError, match='task 1 is empty'):
    TablePrompts(_tables([3, 0]), _negative(), batch_per_task=2)
