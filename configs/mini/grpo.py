"""Mini world, stage 1: a Flow-GRPO LoRA teacher for one task (or several: see multitask_rl.py).

    python -m opd_jax.main --config=configs/mini/grpo.py:text --workdir=runs/grpo_text \
        --config.base.path=runs/opd/pretrain/base

The argument is a task (composition | text | aesthetics), or several joined by '+' for joint
multi-task RL; append ',smoke' for the test variant. Expected on a 2-core CPU: ~40 s (20
iterations of 8 prompts × 8 images). On mini world v1 (recipe seed 0, eval CFG 2) the aesthetics
teacher lifted held-out aesthetics 0.57 → 0.75 and the text teacher gained only +0.02: that base
wrote the wrong glyphs and RL could not teach them (v2 changed the world; the recipe's text
teacher now runs 40 iterations, chosen on the train split: teacher_settings_text.md).
"""

import ml_collections

from configs.mini import common
from configs import sections


def get_config(arg: str | None = 'text') -> ml_collections.ConfigDict:
  words, flags = common.parse_arg(arg)
  tasks = tuple(words[0].split('+')) if words else ('text',)
  unknown = set(tasks) - set(common.TASKS)
  if unknown or len(words) > 1:
    raise ValueError(f'configs/mini/grpo.py: bad argument {arg!r}; expected TASK[+TASK...]'
                     f'[,smoke] with tasks from {common.TASKS}')
  c = ml_collections.ConfigDict()
  c.trainer = 'grpo'
  c.seed = 0
  c.base = common.base()            # the pretrained base artifact (the recipe fills the path)
  c.model = common.model()          # network sizes: the base artifact's (filled on load)
  c.data = common.rl_data(tasks)
  c.rewards = common.rl_rewards(tasks)
  c.lora = sections.lora(8, 16.0)

  # Task schedule: 'joint' (every batch mixes all tasks) | 'cascade' (one task after another).
  c.schedule = ml_collections.ConfigDict()
  c.schedule.mode = 'joint'

  # SDE rollouts (spec §2): Flow-GRPO kernel, noise level a, CFG w (the teacher's own scale).
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 1.0
  c.rollout.kernel = 'flow_grpo'
  c.rollout.noise_level = 0.7
  c.rollout.cfg_scale = 3.0          # the base's best CFG (mini_world_cfg.md): the teacher's own
                                     # (also its eval / OPD scale)
  c.rollout.sde_steps = 6            # SDE on the first 6 transitions, Euler ODE after (0: all)
  c.rollout.logprob_reduction = 'mean'   # over latent elements, as Flow-GRPO

  c.grpo = ml_collections.ConfigDict()
  c.grpo.timestep_fraction = 1.0    # transitions 0..int(sde_steps·f)−1 are trainable
  c.grpo.train_timesteps = 0        # per minibatch, draw this many of them (0: all)
  c.grpo.clip_range = 0.05          # PPO clip ε on the per-step ratio
  c.grpo.adv_clip = 5.0             # advantages clipped to ±adv_clip
  c.grpo.kl_beta = 0.0              # weight of the closed-form KL to the base (0: off)
  c.grpo.kl_reduction = 'mean'      # over latent elements
  c.grpo.kl_normaliser = 'sigma2'   # Flow-GRPO's KL: σ_t² ('sigma2_dt': σ_t²·|Δt_j|)

  c.advantage = ml_collections.ConfigDict()
  c.advantage.std_scope = 'group'   # 'group' (per prompt) | 'task' (per task, whole batch)

  c.optimizer = sections.adamw(1e-3)
  c.ema = sections.ema(0.9, every=1)   # the saved teacher is the EMA
  c.mesh = sections.mesh()

  c.train = sections.train(num_steps=20, checkpoint_every=10)   # iterations: batch + updates
  c.train.num_minibatches = 2       # optimizer steps per pass over a rollout batch
  c.train.num_microbatches = 1      # gradient accumulation inside a minibatch (memory)
  c.train.inner_epochs = 2          # passes over each rollout batch (PPO reuse)

  c.eval = common.evaluation()

  if 'smoke' in flags:
    common.shrink_rl_for_smoke(c)
    c.rollout.sde_steps = 3
  return c
