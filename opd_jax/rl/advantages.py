"""Group-normalised advantages of the RL trainers (Flow-GRPO, spec §7).

Every sample's reward (its own task's: `rl.scoring`) is normalised within its prompt group; the
std comes from the group or from every sample of its task in the batch (Flow-GRPO's global std,
taken per task so a multi-task batch never mixes reward scales).
"""

from __future__ import annotations

import numpy as np

from opd_jax.errors import ConfigError

STD_SCOPES = ('group', 'task')


def group_advantages(rewards: np.ndarray, group: np.ndarray, task: np.ndarray,
                     std_scope: str = 'group', eps: float = 1e-4) -> np.ndarray:
  """Per-prompt group-normalised advantages (Flow-GRPO), float32 [B].

  A_i = (r_i − mean of i's group) / (std + eps), with std over i's group ('group') or over
  every sample of i's task in the batch ('task': Flow-GRPO's global std, taken per task so a
  multi-task batch never mixes reward scales).
  """
  rewards = np.asarray(rewards, np.float64)
  adv = np.zeros_like(rewards)
  for g in np.unique(group):
    sel = group == g
    adv[sel] = rewards[sel] - rewards[sel].mean()
  if std_scope == 'group':
    for g in np.unique(group):
      sel = group == g
      adv[sel] /= rewards[sel].std() + eps
  elif std_scope == 'task':
    for k in np.unique(task):
      sel = task == k
      adv[sel] /= rewards[sel].std() + eps
  else:
    raise ConfigError(f'config.advantage.std_scope: {std_scope!r} is not one of {STD_SCOPES}')
  return adv.astype(np.float32)
