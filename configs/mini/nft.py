"""Mini world, stage 1: a DiffusionNFT LoRA teacher (the paper's composition teacher; on mini world
v3 the recipe's is GRPO-Guard, configs/opd.py says why; cascade_rl.py runs NFT).

    python -m opd_jax.main --config=configs/mini/nft.py:composition --workdir=runs/nft \
        --config.base.path=runs/opd/pretrain/base

The argument is a task, or several joined by '+' (joint multi-task NFT); append ',smoke' for the
test variant, ',upstream' for upstream DiffusionNFT's loss options (below). CFG-free: samples and
training use CFG 1.0, and so does the teacher in OPD.
Expected on a 2-core CPU: ~25 s (40 iterations of 4 prompts × 8 images).

Upstream DiffusionNFT's own choices (NVlabs/DiffusionNFT config/nft.py, spec §1) are each one
field away: `nft.weighting='adaptive_x0'` (x0-space loss, adaptive per-sample weight),
`nft.timesteps='sampler_schedule'` with `nft.timesteps_per_sample=9` (9 of the 10 schedule
timesteps, shuffled per sample), `nft.old_decay_schedule='linear'` (min(0.001·step, 0.5)),
`nft.scale_by_adv_clip=True` (policy loss ×A_max) and `nft.kl_beta=1e-4`; ',upstream' sets all
five (`upstream_options`). The mini world keeps the values below: on mini world v1, over 3
seeds its composition teacher gained +0.078, +0.047, +0.109 strict accuracy and upstream's
options +0.109, +0.094, +0.062 (paired differences within 1 SE of 0), at twice the training time
(benchmarks/results/teacher_algorithms.md; the linear decay reaches only 0.08 in this run's 80
optimizer steps).
"""

import ml_collections

from configs.mini import common
from configs import sections


def upstream_options(c: ml_collections.ConfigDict) -> None:
  """Upstream DiffusionNFT's loss options (NVlabs/DiffusionNFT config/nft.py, spec §1)."""
  c.nft.weighting = 'adaptive_x0'
  c.nft.timesteps = 'sampler_schedule'
  c.nft.timesteps_per_sample = c.rollout.num_steps - 1   # every schedule step but the last (9)
  c.nft.old_decay_schedule = 'linear'
  c.nft.scale_by_adv_clip = True
  c.nft.kl_beta = 1e-4


def get_config(arg: str | None = 'composition') -> ml_collections.ConfigDict:
  words, flags = common.parse_arg(arg, known_flags=('smoke', 'upstream'))
  tasks = tuple(words[0].split('+')) if words else ('composition',)
  unknown = set(tasks) - set(common.TASKS)
  if unknown or len(words) > 1:
    raise ValueError(f'configs/mini/nft.py: bad argument {arg!r}; expected TASK[+TASK...]'
                     f'[,smoke] with tasks from {common.TASKS}')
  c = ml_collections.ConfigDict()
  c.trainer = 'nft'
  c.seed = 0
  c.base = common.base()            # the pretrained base artifact (the recipe fills the path)
  c.model = common.model()          # network sizes: the base artifact's (filled on load)
  c.data = common.rl_data(tasks)
  c.data.batch_size = 4             # NFT's regression signal needs fewer samples than GRPO
  c.rewards = common.rl_rewards(tasks)
  c.lora = sections.lora(8, 16.0)

  c.schedule = ml_collections.ConfigDict()
  c.schedule.mode = 'joint'         # 'joint' | 'cascade'

  # Any sampler works (NFT needs no likelihood); the Euler ODE, CFG-free.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 1.0
  c.rollout.kernel = 'ode'
  c.rollout.noise_level = 0.0
  c.rollout.cfg_scale = 1.0         # CFG-free (must be 1.0)
  c.rollout.sde_steps = 0            # 0: every transition uses rollout.kernel
  c.rollout.logprob_reduction = 'mean'

  c.nft = ml_collections.ConfigDict()
  c.nft.beta = 1.0                  # implicit-policy step β in v± (DiffusionNFT's default 1)
  c.nft.adv_clip = 5.0              # r = clip(½ + ½·A/adv_clip, 0, 1)
  c.nft.kl_beta = 0.0               # weight of ‖v_θ − v_base‖² (0: off)
  c.nft.timesteps_per_sample = 2    # re-noising draws of t per clean sample
  c.nft.t_min = 0.0
  c.nft.t_max = 1.0
  c.nft.old_decay = 0.0             # θ_old ← η·θ_old + (1 − η)·θ after each iteration
  c.nft.weighting = 'velocity'      # 'velocity' | 'adaptive_x0' (upstream: x̂0 error, adaptive)
  c.nft.timesteps = 'uniform'       # 'uniform' (t_min..t_max) | 'sampler_schedule' (upstream)
  # η's schedule: 'constant' (old_decay) | 'linear': min(rate·(step − flat), max) of the
  # optimizer-step count, 0 before `flat` steps (upstream decay_type 1: 0, 0.001, 0.5).
  c.nft.old_decay_schedule = 'constant'
  c.nft.old_decay_flat = 0
  c.nft.old_decay_rate = 0.001
  c.nft.old_decay_max = 0.5
  c.nft.scale_by_adv_clip = False   # policy loss ×adv_clip, as upstream (Adam: mostly a no-op)

  c.advantage = ml_collections.ConfigDict()
  c.advantage.std_scope = 'group'

  c.optimizer = sections.adamw(3e-3)
  c.ema = sections.ema(0.9, every=1)   # the saved teacher is the EMA
  c.mesh = sections.mesh()

  c.train = sections.train(num_steps=40, checkpoint_every=10)
  c.train.num_minibatches = 2       # optimizer steps per iteration
  c.train.num_microbatches = 1      # gradient accumulation inside a minibatch (memory)
  c.train.inner_epochs = 1

  c.eval = common.evaluation()

  if 'smoke' in flags:
    common.shrink_rl_for_smoke(c)
  if 'upstream' in flags:
    upstream_options(c)
  return c
