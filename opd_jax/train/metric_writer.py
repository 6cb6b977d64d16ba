"""Metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only).

Array metrics are flattened to scalars with an index suffix (kl_per_task/composition, …) so
both sinks hold the same named numbers.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np


def flatten_metrics(metrics: Mapping, names: Mapping[str, Sequence[str]] | None = None) -> dict:
  """{'kl_per_task': [a, b]} → {'kl_per_task/<name or index>': a, ...}; scalars unchanged."""
  names = names or {}
  out = {}
  for key, value in metrics.items():
    arr = np.asarray(value)
    if arr.ndim == 0:
      out[key] = float(arr)
    else:
      labels = names.get(key) or [str(i) for i in range(arr.size)]
      for label, v in zip(labels, arr.reshape(-1)):
        out[f'{key}/{label}'] = float(v)
  return out


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes events
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
