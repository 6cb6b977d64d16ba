"""Orbax checkpoints of the train state, the config (JSON) and the data position (JSON).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when
complete), so an interrupted save never leaves a checkpoint that `latest_step` would pick up.
Restores take an abstract target whose leaves carry the *current* shardings, so a run can resume
on a different mesh than the one it was saved from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete or does not match the model being restored."""


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'config', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, config: dict, data_position: dict,
           force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
        data=ocp.args.JsonSave(data_position)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
    """Restores (state, config, data position); `abstract_state` fixes shapes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint found in {self.directory}')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; one clear message names the path.
      raise CheckpointError(
          f'could not restore checkpoint step {step} from {self.directory}: '
          f'{type(e).__name__}: {e}') from e
    return restored.state, restored.config, restored.data

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
