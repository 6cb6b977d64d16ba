"""Mini world, stage 2: DiffusionOPD of a LoRA student from the three RL teachers (spec §2, §5).

    python -m opd_jax.main --config=configs/mini/opd.py --workdir=runs/opd_stage \
        --config.base.path=runs/opd/pretrain/base \
        --config.teachers.paths=runs/opd/teacher_composition/teacher,...
    python -m opd_jax.main --config=configs/mini/opd.py:standin,smoke --workdir=/tmp/opd_smoke

`configs/opd.py` runs this stage inside the whole mini-world recipe and fills the paths itself.
Variants (comma-separated): `standin` replaces base, teachers and prompts by seeded random
stand-ins (no data or earlier stage needed: tests, benchmarks of the round); `smoke` makes it
tiny. The recipe's settings are the defaults; any field can be overridden on the command line.
"""

import ml_collections

from configs.mini import common
from configs.optimizer import adamw


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Where the frozen base comes from (opd_jax.opd.sources): a mini-world pretraining
  # artifact, whose meta sets every network size below, or 'random' (seeded init).
  c.base = ml_collections.ConfigDict()
  c.base.source = 'mini_world'
  c.base.path = ''

  # The velocity network (opd_jax.models.registry): the mini world's DiT. With a mini-world base
  # its sizes are overwritten by the base's meta; LoRA settings and dtype stay this run's.
  c.model = common.model()
  c.model.lora_rank = 8              # LoRA slots shared by student and teachers (0: none)
  c.model.lora_alpha = 16.0
  c.model.lora_init = 'gaussian'     # PEFT init_lora_weights='gaussian'

  # The student: 'lora' trains an adapter on the frozen base; 'full' trains all base weights.
  c.student = ml_collections.ConfigDict()
  c.student.kind = 'lora'

  # Teachers, one per task, in task order: saved RL teachers ('artifacts', one directory per
  # task in teachers.paths) or seeded stand-in adapters ('random').
  c.teachers = ml_collections.ConfigDict()
  c.teachers.kind = 'lora'
  c.teachers.source = 'artifacts'
  c.teachers.paths = ('', '', '')
  c.teachers.random_scale = 0.05     # std of the stand-in adapters' B matrices
  c.teachers.cfg_scales = (1.0, 2.0, 2.0)   # each teacher's own CFG (NFT composition: free)

  # Prompt sets: one per task, routed to the teacher of the same index. 'mini_world': the train
  # prompts of each task encoded by the base's text encoder; 'random_embeddings': stand-ins.
  c.data = common.data()
  c.data.source = 'mini_world'
  c.data.tasks = common.TASKS
  c.data.max_prompts = 0             # 0: the whole train split of each task
  c.data.prompts_per_device = 3      # per task per device (spec §5: 3)
  c.data.num_prompts = 64            # random_embeddings: prompts per task
  c.data.context_length = 8          # random_embeddings: tokens per prompt

  # Student rollouts (spec §2, §5): 10-step Euler ODE with CFG 4.5 and shift 3.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 1.0            # the mini world's schedule (SD3.5: 3.0)
  c.rollout.kernel = 'ode'           # ode | flow_grpo | cps | dance_grpo
  c.rollout.noise_level = 0.0        # the SDE noise level a
  c.rollout.cfg_scale = 2.0         # the base's best CFG here (SD3.5: 4.5)
  c.rollout.logprob_reduction = 'mean'

  # The objective (spec §3).
  c.objective = ml_collections.ConfigDict()
  c.objective.name = 'analytic'     # analytic | ppo_analytic_advantage | ppo_sampled_logratio
  c.objective.clip_range = 1e-4      # PPO-style objectives: ratio clip ε
  c.objective.discount = 0.0         # ppo_sampled_logratio: γ of the future log-ratio sum
  c.objective.reduction = 'mean'     # over latent elements: 'sum' (paper) or 'mean' (recipe)
  c.objective.sde_normaliser = 'recipe'  # 'paper': σ_t²|Δt|; 'recipe': σ_t²
  c.objective.timestep_fraction = 0.99   # first int(N·fraction) steps are trained (9 of 10)
  c.objective.time_reduction = 'mean'    # over trained steps: 'sum' (Eq. 4) or 'mean'
  c.objective.num_microbatches = 1       # per task; gradients accumulate in one buffer
  c.objective.timestep_chunks = 1        # trained steps are vmapped in this many chunks

  # AdamW, constant LR (spec §5).
  c.optimizer = adamw(3e-3)   # mini world; the recipe's 3e-4 (standin) learns ~5x slower here

  # EMA decay min((1+s)/(10+s), max_decay), applied every `every` steps.
  c.ema = ml_collections.ConfigDict()
  c.ema.max_decay = 0.9
  c.ema.every = 8

  # Device mesh: batch over data × fsdp, parameters over fsdp (embed) and tensor (heads, mlp).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})

  c.train = ml_collections.ConfigDict()
  c.train.num_rounds = 60
  c.train.log_every = 1
  c.train.checkpoint_every = 10
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True

  words, flags = common.parse_arg(arg, known_flags=('smoke', 'standin'))
  if words:
    raise ValueError(f'configs/mini/opd.py: unknown variant(s) {words}; expected standin, smoke')
  if 'standin' in flags:
    c.base.source = 'random'
    c.teachers.source = 'random'
    c.teachers.cfg_scales = (1.0, 4.5, 4.5)
    c.data.source = 'random_embeddings'
    c.model.update(latent_size=8, latent_channels=4, patch_size=2, dim=64, depth=2,
                   num_heads=4, context_dim=32, pooled_dim=32)
    c.rollout.shift = 3.0
    c.rollout.cfg_scale = 4.5
    c.optimizer.lr = 3e-4
    c.train.num_rounds = 20
  if 'smoke' in flags:
    c.model.dim = 32
    c.model.depth = 1
    c.data.prompts_per_device = 1
    c.train.num_rounds = 3
    c.train.checkpoint_every = 2
  return c
