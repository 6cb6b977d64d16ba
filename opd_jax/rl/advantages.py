"""Host-side rewards and group-normalised advantages of the RL trainers (Flow-GRPO, spec §7).

Every sample is scored by its own task's reward (`opd_jax.rewards.get_reward`) and normalised
within its prompt group; the std comes from the group or from every sample of its task in the
batch (Flow-GRPO's global std, taken per task so a multi-task batch never mixes reward scales).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opd_jax.errors import ConfigError
from opd_jax.rewards import get_reward

STD_SCOPES = ('group', 'task')


def compute_rewards(images: np.ndarray, prompts: Sequence[str], task: np.ndarray,
                    task_names: Sequence[str]) -> np.ndarray:
  """float32 [B]: every sample scored by its own task's reward (`get_reward(task name)`)."""
  out = np.zeros(len(prompts), np.float32)
  for k in np.unique(task):
    sel = np.flatnonzero(task == k)
    out[sel] = get_reward(task_names[k])(images[sel], [prompts[i] for i in sel])
  return out


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
