"""Metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only).

Array metrics are flattened to scalars with an index suffix (kl_per_task/composition, …) so
both sinks hold the same named numbers. One row per logged step: a run that starts at step s
(0 for a fresh run, the checkpoint's step on resume) first drops every row after s — rows of
steps that will be run again, or of an earlier run in a reused workdir — and TensorBoard purges
its events after s the same way, so neither sink ever holds a step twice.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'


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


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (an empty list when there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:   # a line cut short by a crash
        continue
  return rows


def _summary_writer_class():
  """tensorboardX's SummaryWriter (imported on first use: only process 0 writes events), without
  torch: tensorboardX imports torch when it is installed, only to accept torch tensors, and that
  import alone costs seconds of every run's start-up. A None entry in sys.modules makes that
  optional import fail at once (tensorboardX then takes numpy arrays and floats, all we log);
  the entry is removed again, so torch still imports normally afterwards."""
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      kept = [r for r in read_metrics(workdir) if int(r.get('step', 0)) <= start_step]
      path = os.path.join(workdir, METRICS_FILE)
      with open(path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(path + '.tmp', path)
      self._jsonl = open(path, 'a')
      self._tb = _summary_writer_class()(os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1)

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
