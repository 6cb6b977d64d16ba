"""The whole DiffusionOPD recipe on the embedded mini world, on a CPU in minutes.

    python -m opd_jax.main --config=configs/opd.py                     # workdir runs/opd
    python -m opd_jax.main --config=configs/opd.py --config.stages=opd,report
    python -m opd_jax.main --config=configs/opd.py --config.seed=1 --workdir=runs/opd_seed1

Stages (opd_jax.recipe.mini_world), each cached in WORKDIR/<stage>/ and skipped when its
settings have not changed: `pretrain` (base DiT + text encoder), `teachers` (one RL teacher per
task: DiffusionNFT for composition as in the paper, Flow-GRPO for text and aesthetics), `opd`
(the student, distilled from all three), `multitask_rl` and `cascade_rl` (the baselines) and
`report` (report.json / report.md, reward_vs_wallclock.png, samples_<task>.png). Every section
is the config of that stage run alone (configs/mini/*.py), so --config.opd.train.num_steps=..,
--config.teachers.text.train.num_steps=.. etc. work as they would there. `:smoke` is a tiny
version for tests.
"""

import ml_collections

from configs.mini import cascade_rl
from configs.mini import common
from configs.mini import grpo
from configs.mini import multitask_rl
from configs.mini import nft
from configs.mini import opd
from configs.mini import pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words, flags = common.parse_arg(arg)
  if words:
    raise ValueError(f'configs/opd.py: unknown variant(s) {words}; expected smoke or nothing')
  smoke = ',smoke' if 'smoke' in flags else ''
  c = ml_collections.ConfigDict()
  c.trainer = 'recipe'
  c.seed = 0                        # applied to every stage (different seed → new stage keys)
  c.tasks = common.TASKS
  c.stages = 'pretrain,teachers,opd,multitask_rl,cascade_rl,report'

  c.pretrain = pretrain.get_config(smoke.lstrip(','))
  # The shipped base, unless the pretraining settings are changed (then it is trained here).
  c.pretrain.reuse_shipped = not smoke
  # One teacher per task, the paper's algorithm for each (both are available for every task).
  c.teachers = ml_collections.ConfigDict({
      'composition': nft.get_config('composition' + smoke),
      'text': grpo.get_config('text' + smoke),
      'aesthetics': grpo.get_config('aesthetics' + smoke),
  })
  c.opd = opd.get_config(smoke.lstrip(','))
  c.multitask_rl = multitask_rl.get_config('grpo' + smoke)
  c.cascade_rl = cascade_rl.get_config('nft' + smoke)
  if not smoke:
    # Matched student-stage compute: iterations chosen so that each baseline trains at least as
    # many seconds as the OPD stage (measured on the 2-core CPU: 60 OPD rounds 15 s, 15
    # multi-task iterations 24 s, 90 cascade iterations 16 s; the report lists every stage's).
    c.multitask_rl.train.num_steps = 15
    c.cascade_rl.train.num_steps = 90

  c.report = ml_collections.ConfigDict()
  c.report.eval = common.evaluation()       # the table: every held-out prompt, 40 Euler steps
  c.report.curve_eval = common.evaluation() # probes during training (cheaper, same noise)
  c.report.curve_eval.max_prompts = 64
  c.report.curve_eval.num_steps = 20
  c.report.curve_eval.batch_size = 32
  c.report.curve_every = 5                  # probe every this many steps / rounds
  # The base's own CFG: the highest mean reward over the three tasks on train-split prompts
  # among CFG 1-4 (benchmarks/results/mini_world_cfg.md; text and composition alone peak at
  # 4, aesthetics at 2).
  c.report.base_cfg_scale = 2.0
  c.report.grid_prompts = 8                 # columns of samples_<task>.png

  if smoke:
    for e in (c.report.eval, c.report.curve_eval):
      e.max_prompts = 4
      e.num_steps = 4
      e.batch_size = 8
    c.report.curve_every = 1
    c.report.grid_prompts = 2
    c.opd.data.dataset_config = 'small'
    c.opd.data.max_prompts = 4
  return c
