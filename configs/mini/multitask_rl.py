"""Mini world baseline: joint multi-task RL over the union of the three prompt sets (spec §6).

    python -m opd_jax.main --config=configs/mini/multitask_rl.py:grpo --workdir=runs/mt_grpo \
        --config.base.path=runs/opd/pretrain/base

Argument: the algorithm, 'grpo' (multi-task Flow-GRPO), 'grpo_guard' (multi-task GRPO-Guard,
the paper's multi-task baseline) or 'nft' (multi-task DiffusionNFT); append ',smoke' for the
test variant. Every batch draws data.batch_size / 3 prompts of each task, each scored by its own
reward and normalised within its own group (advantage.std_scope 'task' normalises by each task's
spread). Same trainer as the single-task teachers.
"""

import ml_collections

from configs.mini import common
from configs.mini import grpo
from configs.mini import grpo_guard
from configs.mini import nft


def get_config(arg: str | None = 'grpo') -> ml_collections.ConfigDict:
  words, flags = common.parse_arg(arg)
  algorithm = words[0] if words else 'grpo'
  if algorithm not in ('grpo', 'grpo_guard', 'nft') or len(words) > 1:
    raise ValueError(f'configs/mini/multitask_rl.py: bad argument {arg!r}; expected grpo, '
                     'grpo_guard or nft[,smoke]')
  module = {'grpo': grpo, 'grpo_guard': grpo_guard, 'nft': nft}[algorithm]
  c = module.get_config('+'.join(common.TASKS) + (',smoke' if 'smoke' in flags else ''))
  c.schedule.mode = 'joint'
  c.data.batch_size = 3 * -(-c.data.batch_size // 3)   # divisible by the 3 tasks
  c.advantage.std_scope = 'task'
  c.train.num_steps = c.train.num_steps if 'smoke' in flags else 2 * c.train.num_steps
  return c
