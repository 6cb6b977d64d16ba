"""Evaluation during training, kept off the training clock (for reward-vs-wall-clock curves).

A `Probe` is handed to a trainer (`train_opd`, `run_rl`); every `every` steps, and once at
step 0 and at the last step, the training loop calls `probe.fn(params)` on the weights the
trainer would save (EMA weights where the stage saves EMA) and appends
`{'step', 'train_seconds', **metrics}` to `probe.history`. `train_seconds` is wall-clock since
the stage started minus the time spent in probes, so curves of different stages share one honest
x-axis; a resumed run continues both the clock and the history from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable


@dataclasses.dataclass
class Probe:
  every: int
  fn: Callable[[Any], dict]            # eval params → {metric: float}
  history: list = dataclasses.field(default_factory=list)
  seconds: float = 0.0                 # total time spent in fn

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f'probe every must be >= 1, got {self.every}')


class StageClock:
  """Seconds of training: `offset` (earlier sessions) + time since `start` − time in probes."""

  def __init__(self, start: float | None = None, offset: float = 0.0):
    self.start = time.time() if start is None else start
    self.offset = offset
    self.paused = 0.0

  def train_seconds(self) -> float:
    return self.offset + time.time() - self.start - self.paused


def maybe_probe(probe: Probe | None, step: int, last_step: int, clock: StageClock,
                params: Callable[[], Any]) -> None:
  """Runs the probe at step 0, every `probe.every` steps and at `last_step`."""
  if probe is None or not (step == 0 or step % probe.every == 0 or step == last_step):
    return
  if probe.history and probe.history[-1]['step'] == step:
    return
  seconds = clock.train_seconds()
  began = time.time()
  metrics = probe.fn(params())
  clock.paused += time.time() - began
  probe.seconds += time.time() - began
  probe.history.append({'step': step, 'train_seconds': seconds, **metrics})
