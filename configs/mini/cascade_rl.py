"""Mini world baseline: cascade RL, the three tasks one after another (spec §6, "Cascade NFT").

    python -m opd_jax.main --config=configs/mini/cascade_rl.py:nft --workdir=runs/cascade \
        --config.base.path=runs/opd/pretrain/base

Argument: the algorithm, 'nft' (the paper's Cascade NFT), 'grpo' or 'grpo_guard'; append
',smoke' for the test variant. One adapter trains on composition, then text, then aesthetics, an
equal share of config.train.num_steps each (opd_jax.rl.prompts.active_tasks); same trainer as
the teachers.
"""

import ml_collections

from configs.mini import common
from configs.mini import grpo
from configs.mini import grpo_guard
from configs.mini import nft


def get_config(arg: str | None = 'nft') -> ml_collections.ConfigDict:
  words, flags = common.parse_arg(arg)
  algorithm = words[0] if words else 'nft'
  if algorithm not in ('grpo', 'grpo_guard', 'nft') or len(words) > 1:
    raise ValueError(f'configs/mini/cascade_rl.py: bad argument {arg!r}; expected nft, grpo '
                     'or grpo_guard[,smoke]')
  module = {'grpo': grpo, 'grpo_guard': grpo_guard, 'nft': nft}[algorithm]
  c = module.get_config('+'.join(common.TASKS) + (',smoke' if 'smoke' in flags else ''))
  c.schedule.mode = 'cascade'
  c.train.num_steps = 3 if 'smoke' in flags else 2 * c.train.num_steps
  return c
