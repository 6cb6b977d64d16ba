"""Mini world, stage 1: a GRPO-Guard LoRA teacher (the paper's OCR and aesthetics teachers).

    python -m opd_jax.main --config=configs/mini/grpo_guard.py:aesthetics \
        --workdir=runs/guard_aesthetics --config.base.path=runs/opd/pretrain/base

The argument is as for configs/mini/grpo.py: a task (composition | text | aesthetics), or
several joined by '+' for joint multi-task RL; append ',smoke' for the test variant.

GRPO-Guard is Flow-GRPO with a normalised ratio and per-step reweighting
(teachers_rewards_eval.md §1, `opd_jax.rl.grpo.guard_ratio`): everything not set below is
configs/mini/grpo.py's, so the two differ only in the algorithm.
  - upstream's values kept: the bias averaged over the batch (`grpo.guard_bias='batch'`, the
    released code; 'sample' is the paper's per-sample form), β = 0, per-group advantage std,
    advantage clip 5, noise level a = 0.7, 2 optimizer steps (minibatches) per pass;
  - the mini world's (as configs/mini/grpo.py, and why there): lr 1e-3 (upstream 1e-4 for a
    rank-32 LoRA on SD3.5), CFG 3 (the mini teachers' own scale, upstream 4.5), SDE on the first
    6 of 10 transitions with all 6 trained (upstream 9 of 10: pixel-space last-step noise),
    2 passes over each rollout batch (upstream 1), groups of 8 × 8 (upstream 48 × 24);
  - the clip range ε (measured, CLIP_RANGE below): upstream's 2e-6 (OCR, GenEval) / 4e-6
    (PickScore) is sized for SD3's 65 536 latent elements, over which the mean-reduced
    normalised log-ratio mean(ε⊙δ) shrinks as 1/√D; the mini latent has 768 and other δ.
"""

import ml_collections

from configs.mini import common
from configs.mini import grpo

# PPO clip ε on the normalised ratio. Measured on the mini world (seed-0 recipe base, aesthetics,
# 10 iterations, one seed): the share of clipped samples among the minibatches that reuse a
# rollout (3 of the 4 per iteration; the first has ρ = 1) is 96 % at upstream's 2e-6 — nearly
# every update after the first blocked — 66 % at 2e-5, 11 % at 2e-4 and 0 % unclipped, where
# |ρ − 1| peaks at ~1e-3 per iteration. 2e-4 keeps the trust region active without blocking
# the gradient. (configs/mini/grpo.py's ε = 0.05 on the plain ratio never clips: max |ρ − 1|
# ≈ 3e-3.)
CLIP_RANGE = 2e-4


def get_config(arg: str | None = 'text') -> ml_collections.ConfigDict:
  words, _ = common.parse_arg(arg)
  tasks = tuple(words[0].split('+')) if words else ('text',)
  if set(tasks) - set(common.TASKS) or len(words) > 1:
    raise ValueError(f'configs/mini/grpo_guard.py: bad argument {arg!r}; expected '
                     f'TASK[+TASK...][,smoke] with tasks from {common.TASKS}')
  c = grpo.get_config(arg)
  c.trainer = 'grpo_guard'
  c.grpo.clip_range = CLIP_RANGE
  c.grpo.guard_bias = 'batch'       # 'batch' (upstream's code: one scalar) | 'sample' (paper)
  return c
