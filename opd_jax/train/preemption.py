"""Stop requests: SIGTERM / SIGINT end a run at a step boundary, after a checkpoint.

Preemptible TPU VMs and SLURM send SIGTERM some seconds before they kill a job; a user presses
Ctrl-C. `StopRequest` turns the first such signal into a flag the training loop reads after each
step: it finishes that step, saves, and stops with one line (exit status 0). A second signal means
"now": it raises KeyboardInterrupt, which the command reports as one line (exit status 130).

On several processes the flag is agreed on at every step (a tiny all-gather), so all processes
stop after the same step and save together even when only some of them were signalled.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager that records the first SIGTERM/SIGINT (main thread only)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:      # the second signal: stop at once
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for s in _SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def requested(self) -> bool:
    """Whether to stop after this step (agreed across processes)."""
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    if np.any(flags) and self.signal_name is None:
      self.signal_name = 'SIGTERM (on another process)'
    return bool(np.any(flags))
