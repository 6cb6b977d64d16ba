"""Mini world, stage 2: DiffusionOPD of a LoRA student from the three RL teachers (spec §2, §5).

    python -m opd_jax.main --config=configs/mini/opd.py --workdir=runs/opd_stage \
        --config.base.path=runs/opd/pretrain/base \
        --config.teachers.tasks.composition.path=runs/opd/teacher_composition/teacher \
        --config.teachers.tasks.text.path=... --config.teachers.tasks.aesthetics.path=...
    python -m opd_jax.main --config=configs/mini/opd.py:standin,smoke --workdir=/tmp/opd_smoke

`configs/opd.py` runs this stage inside the whole mini-world recipe and fills the paths itself.
Variants (comma-separated): `standin` replaces base, teachers and prompts by seeded random
stand-ins (no data or earlier stage needed: tests, benchmarks of the round); `smoke` makes it
tiny. The recipe's settings are the defaults; any field can be overridden on the command line.
"""

import ml_collections

from configs import sections
from configs.mini import common

# Each teacher's own CFG: the recipe's GRPO-Guard teachers use the base's CFG 3 (the recipe reads
# them from the saved teachers; a CFG-free NFT teacher would be 1).
TEACHER_CFG = {'composition': 3.0, 'text': 3.0, 'aesthetics': 3.0}


def teachers(source: str, cfg: dict) -> ml_collections.ConfigDict:
  """One teacher per task, declared by name: its saved directory and its own CFG scale."""
  t = ml_collections.ConfigDict()
  t.kind = 'lora'                  # 'lora': an adapter on the frozen base; 'full': all weights
  t.source = source                # 'artifacts' (saved RL teachers) | 'random' (stand-ins)
  t.random_scale = 0.05            # std of the stand-in adapters' B matrices
  t.tasks = ml_collections.ConfigDict({
      task: ml_collections.ConfigDict({'path': '', 'cfg_scale': float(scale)})
      for task, scale in cfg.items()})
  return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  words, flags = common.parse_arg(arg, known_flags=('smoke', 'standin'))
  if words:
    raise ValueError(f'configs/mini/opd.py: unknown variant(s) {words}; expected standin, smoke')
  c = ml_collections.ConfigDict()
  c.trainer = 'opd'
  c.seed = 0

  # Where the frozen base comes from (opd_jax.opd.sources): a mini-world pretraining artifact,
  # whose meta sets every network size below, or 'random' (seeded init).
  c.base = common.base()

  # The velocity network (opd_jax.models.registry): the mini world's DiT. With a mini-world base
  # its sizes are overwritten by the base's meta; dtype stays this run's.
  c.model = common.model()
  c.lora = sections.lora(8, 16.0)    # the student's adapter; teachers share the layout

  # The student: 'lora' trains an adapter on the frozen base; 'full' trains all base weights.
  c.student = ml_collections.ConfigDict()
  c.student.kind = 'lora'

  c.teachers = teachers('artifacts', TEACHER_CFG)

  # Prompt sets: one per task, each routed to the teacher declared for it. 'mini_world': the
  # train prompts of each task encoded by the base's text encoder; 'random_embeddings':
  # stand-ins.
  c.data = common.data()
  c.data.source = 'mini_world'
  c.data.tasks = common.TASKS
  c.data.max_prompts = 0             # 0: the whole train split of each task
  c.data.batch_size = 0              # prompts per task per round, global (0: per device)
  c.data.batch_size_per_device = 3   # per task per device (spec §5: 3)
  c.data.num_prompts = 64            # random_embeddings: prompts per task
  c.data.context_length = 8          # random_embeddings: tokens per prompt

  # Student rollouts (spec §2, §5): 10-step Euler ODE with CFG.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 1.0              # the mini world's schedule (SD3.5: the checkpoint's 3.0)
  c.rollout.kernel = 'ode'           # ode | flow_grpo | cps | dance_grpo
  c.rollout.noise_level = 0.0        # the SDE noise level a
  c.rollout.cfg_scale = 3.0          # the base's best CFG (mini_world_cfg.md; SD3.5: 4.5)
  c.rollout.logprob_reduction = 'mean'

  # The objective (spec §3).
  c.objective = ml_collections.ConfigDict()
  c.objective.name = 'analytic'      # analytic | ppo_analytic_advantage | ppo_sampled_logratio
  c.objective.clip_range = 1e-4      # PPO-style objectives: ratio clip ε
  c.objective.discount = 0.0         # ppo_sampled_logratio: γ of the future log-ratio sum
  c.objective.kl_reduction = 'mean'  # over latent elements: 'sum' (paper) or 'mean' (recipe)
  c.objective.kl_normaliser = 'sigma2'  # SDE KL: 'sigma2_dt' (paper σ_t²|Δt|), 'sigma2' (recipe)
  c.objective.timestep_fraction = 0.99  # first int(N·fraction) steps are trained (9 of 10)
  c.objective.time_reduction = 'mean'   # over trained steps: 'sum' (Eq. 4) or 'mean'

  # AdamW, constant LR (spec §5).
  c.optimizer = sections.adamw(3e-3)   # mini world; the recipe's 3e-4 learns ~5x slower here

  # The released EMA: decay min((1+k)/(10+k), 0.9), active on (k + 1) % 8 == 0, applied once
  # per task micro-batch (3 per round).
  c.ema = sections.ema(0.9, every=8, updates_per_step=len(common.TASKS))
  c.mesh = sections.mesh()

  # 180 rounds: chosen on the train split (benchmarks/results/opd_settings.md, seeds 0 and 2):
  # the student keeps 0.81 / 0.71 of the text teacher's gain after 60 rounds, 0.99 / 0.93 after
  # 120, 1.06 / 0.98 after 180 (aesthetics 1.03-1.10 throughout); 47-48 s on the 2-core CPU.
  c.train = sections.train(num_steps=180, checkpoint_every=30)
  c.train.num_microbatches = 1       # per task; gradients accumulate in one buffer
  c.train.memory_limit_gib = 0.0     # > 0: stop before the first step if a device needs more
  c.train.timestep_chunks = 1        # trained steps are vmapped in this many chunks
  c.train.fused_vjp = False          # True: the student's VJP taken during the rollout (one pass)
  c.train.export_peft = False        # PEFT export needs an SD3 model

  if 'standin' in flags:
    c.base.source = 'random'
    c.teachers = teachers('random', {'composition': 1.0, 'text': 4.5, 'aesthetics': 4.5})
    c.data.source = 'random_embeddings'
    c.model.update(latent_size=8, latent_channels=4, patch_size=2, dim=64, depth=2,
                   num_heads=4, context_dim=32, pooled_dim=32)
    c.rollout.shift = 3.0
    c.rollout.cfg_scale = 4.5
    c.optimizer.lr = 3e-4
    c.train.num_steps = 20
  if 'smoke' in flags:
    c.model.dim = 32
    c.model.depth = 1
    c.data.batch_size_per_device = 1
    c.train.num_steps = 3
    c.train.checkpoint_every = 2
  return c
