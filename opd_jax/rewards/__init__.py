"""Reward functions of the mini world, one per task, plus a small registry.

`REWARDS` / `get_reward(name)` map each task name to `fn(images, prompts) -> float32 [B]`.
`composition_strict` is GenEval's all-or-nothing accuracy, for reporting next to the dense
composition reward.
"""

from opd_jax.rewards.composition import composition_strict
from opd_jax.rewards.registry import REWARDS
from opd_jax.rewards.registry import get_reward

__all__ = ['REWARDS', 'get_reward', 'composition_strict']
