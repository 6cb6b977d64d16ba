"""Which teacher scores which task, and the round-robin over tasks within a round (spec §1).

Teachers are declared by task name (`config.teachers.tasks.<task>`: path and CFG scale); their
adapters are stacked on a leading slot axis and selected inside the jitted round with a traced
index, so switching teachers never recompiles. `teacher_index` resolves, by name, the slot of
the teacher of every task in `data.tasks`; `round_robin` is the one place where task m's
prompts meet teacher m.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax.errors import ConfigError


def teacher_index(tasks: Sequence[str], teacher_tasks: Sequence[str]) -> np.ndarray:
  """int32 [M]: the slot in `teacher_tasks` (the stacking order) of each task's own teacher."""
  slots = {t: k for k, t in enumerate(teacher_tasks)}
  missing = [t for t in tasks if t not in slots]
  if missing:
    raise ConfigError(f'config.teachers.tasks: no teacher for task(s) {missing}')
  return np.asarray([slots[t] for t in tasks], np.int32)


def round_robin(per_task: Callable[[Any, jax.Array, Any, jax.Array], tuple[Any, Any]],
                init: Any, task_batches: Any, teachers: jax.Array) -> tuple[Any, Any]:
  """Tasks take turns within a round, each scored by its own teacher (DiffusionOPD §1).

  A `lax.scan` over the M tasks: step m calls `per_task(carry, m, task_batches[m], teachers[m])`
  — task m's prompts with teacher slot `teachers[m]` — and threads `carry` (the round's
  gradient accumulator) through. Returns (final carry, stacked per-task outputs).

  Args:
    per_task: (carry, task index, that task's batch, its teacher slot) → (carry, output).
    init: the initial carry.
    task_batches: pytree with leading task axis [M, ...].
    teachers: int32 [M] teacher slot per task (`teacher_index`).
  """
  def body(carry, xs):
    m, batch, teacher = xs
    return per_task(carry, m, batch, teacher)
  num_tasks = teachers.shape[0]
  return jax.lax.scan(body, init, (jnp.arange(num_tasks), task_batches, teachers))
