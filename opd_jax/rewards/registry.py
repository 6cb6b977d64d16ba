"""Name -> reward function registry for the mini-world tasks.

Contract of every entry: `fn(images, prompts) -> np.ndarray float32 [B]`, where images are
numpy float NHWC in [0, 1] of size render.IMAGE_SIZE and prompts are B strings of that task's
grammar (aesthetics accepts prompts of any task). Higher is better; all rewards lie in [0, 1].
Keys are the task names of `lexicon.TASKS`, so a prompt set is always scored by its own reward.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from opd_jax.rewards import aesthetics
from opd_jax.rewards import composition
from opd_jax.rewards import text

RewardFn = Callable[[np.ndarray, Sequence[str]], np.ndarray]

REWARDS: dict[str, RewardFn] = {
    'composition': composition.composition_reward,
    'text': text.text_reward,
    'aesthetics': aesthetics.aesthetics_reward,
}


def get_reward(name: str) -> RewardFn:
  """Returns the reward function registered under `name` (a task name)."""
  if name not in REWARDS:
    raise KeyError(f'unknown reward {name!r}; known: {sorted(REWARDS)}')
  return REWARDS[name]
