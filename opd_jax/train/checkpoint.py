"""Orbax checkpoints of a run: the train state, its config and the loop's bookkeeping, verified.

Each step directory holds three items:
  state   the TrainState (Orbax StandardSave; arrays written by the processes that own them);
  config  the run's config as JSON (compared on resume: `config_check.resume_changes`);
  loop    JSON: the data position, cumulative training seconds, probe history, the inputs'
          fingerprints and the state's fingerprint (`fingerprint.tree_fingerprint`).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), so an
interrupted save never leaves a step that `restore` would pick up. `restore` verifies what it
read against the saved fingerprint; a step that is truncated, unreadable or whose bytes changed
is reported in one line, deleted, and the previous step is tried — a run never silently
continues from changed values. Restore targets carry the *current* shardings, so a run can
resume on another mesh.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from opd_jax.errors import InputError
from opd_jax.fingerprint import compare_fingerprints, tree_fingerprint


class CheckpointError(InputError):
  """No usable checkpoint, or one that does not match the model being restored."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  config: dict
  loop: dict


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f'warning: {message}', file=sys.stderr, flush=True)


class Checkpointer:
  """Keeps the newest `keep` checkpoints under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={'state': ocp.StandardCheckpointHandler(),
                         'config': ocp.JsonCheckpointHandler(),
                         'loop': ocp.JsonCheckpointHandler()})
    except (OSError, ValueError) as e:
      raise CheckpointError(f'{self.directory}: cannot use it for checkpoints ({e})') from None

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def saved_config(self) -> dict | None:
    """The config of the newest step whose config item reads (None: no checkpoint)."""
    for step in reversed(self.steps()):
      try:
        return self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config
      except Exception:   # unreadable: `restore` reports it and falls back
        continue
    return None

  def save(self, step: int, state: Any, config: dict, loop: dict) -> None:
    """Saves (asynchronously); the state's fingerprint goes into the loop item."""
    loop = dict(loop, state_fingerprint=tree_fingerprint(state))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
        loop=ocp.args.JsonSave(loop)))

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointError when the saved arrays' shapes are not the ones this run needs."""
    metadata = self._manager.item_metadata(step)['state']
    tree = getattr(metadata, 'tree', metadata)
    if not jax.tree.leaves(tree):   # _METADATA missing or unreadable: corruption, not a model
      raise ValueError('the state has no array metadata (state/_METADATA missing?)')
    saved = Counter((tuple(m.shape), str(m.dtype)) for m in jax.tree.leaves(tree))
    wanted = Counter((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(abstract_state))
    if saved != wanted:
      extra = sorted((saved - wanted).elements())[:3]
      missing = sorted((wanted - saved).elements())[:3]
      raise CheckpointError(
          f'{self.directory}/{step}: the saved state does not fit this run\'s model (saved '
          f'arrays {extra} where this run has {missing}); a different lora.rank, model or '
          'trainer? Use a new --workdir')

  def _restore_step(self, step: int, abstract_state: Any) -> Restored:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
        loop=ocp.args.JsonRestore()))
    saved = restored.loop.get('state_fingerprint')
    if saved is None:
      raise ValueError('no state fingerprint saved with it')
    changed = compare_fingerprints(saved, tree_fingerprint(restored.state))
    if changed:
      raise ValueError(f'{len(changed)} arrays differ from what was saved (first: {changed[0]})')
    return Restored(step, restored.state, restored.config, restored.loop)

  def restore(self, abstract_state: Any) -> Restored | None:
    """The newest intact checkpoint (None when there is none).

    A step that fails to read or verify is reported, deleted and skipped. Arrays whose shapes
    differ from `abstract_state`'s are not corruption: they raise CheckpointError at once.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        self._check_fits(step, abstract_state)
        return self._restore_step(step, abstract_state)
      except CheckpointError:
        raise
      except Exception as e:   # Orbax raises many types for unreadable data
        first = str(e).splitlines()[0] if str(e) else ''
        message = f'{type(e).__name__}: {first[:200]}{"…" if len(first) > 200 else ""}'
        _warn(f'checkpoint {self.directory}/{step} is corrupt or incomplete ({message}); '
              'deleting it and trying the previous one')
        self._manager.delete(step)
    if steps:
      raise CheckpointError(f'{self.directory}: every checkpoint ({steps}) is corrupt; delete '
                            'the directory to start afresh')
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

