"""DiffusionOPD on the embedded default: a small DiT student distilled from three teachers.

    python -m opd_jax.main --config=configs/opd.py --workdir=runs/opd
    python -m opd_jax.main --config=configs/opd.py:smoke --workdir=/tmp/opd_smoke

Any field can be overridden, e.g. --config.train.num_rounds=50 --config.rollout.kernel=flow_grpo
--config.rollout.noise_level=0.7. The recipe settings (spec §5) are the defaults; the model is
small enough that a round takes well under a second on a 2-core CPU.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The velocity network (opd_jax.models.registry). Latents are [size, size, channels].
  c.model = ml_collections.ConfigDict()
  c.model.name = 'dit'
  c.model.latent_size = 8
  c.model.latent_channels = 4
  c.model.patch_size = 2
  c.model.dim = 64
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.mlp_ratio = 2.0
  c.model.context_dim = 32           # width of the text token sequence
  c.model.pooled_dim = 32            # width of the pooled text vector
  c.model.dtype = 'float32'          # network compute dtype; sampler/KL math is always float32
  c.model.lora_rank = 8              # LoRA slots shared by student and teachers (0: none)
  c.model.lora_alpha = 16.0
  c.model.lora_init = 'gaussian'     # PEFT init_lora_weights='gaussian'

  # The student: 'lora' trains an adapter on the frozen base; 'full' trains all base weights.
  c.student = ml_collections.ConfigDict()
  c.student.kind = 'lora'

  # Teachers, one per task, in task order. 'random' builds seeded stand-in adapters.
  c.teachers = ml_collections.ConfigDict()
  c.teachers.kind = 'lora'
  c.teachers.source = 'random'
  c.teachers.random_scale = 0.05     # std of the stand-in adapters' B matrices
  c.teachers.cfg_scales = (1.0, 4.5, 4.5)   # GenEval teacher is CFG-free (spec §2)

  # Prompt sets: one per task, routed to the teacher of the same index.
  c.data = ml_collections.ConfigDict()
  c.data.source = 'random_embeddings'
  c.data.tasks = ('composition', 'text', 'aesthetics')
  c.data.prompts_per_device = 3      # per task per device (spec §5: 3)
  c.data.num_prompts = 64            # prompts per task in the stand-in source
  c.data.context_length = 8

  # Student rollouts (spec §2, §5): 10-step Euler ODE with CFG 4.5 and shift 3.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 3.0
  c.rollout.kernel = 'ode'           # ode | flow_grpo | cps | dance_grpo
  c.rollout.noise_level = 0.0        # the SDE noise level a
  c.rollout.cfg_scale = 4.5
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
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip = 1.0

  # EMA decay min((1+s)/(10+s), max_decay), applied every `every` steps.
  c.ema = ml_collections.ConfigDict()
  c.ema.max_decay = 0.9
  c.ema.every = 8

  # Device mesh: batch over data × fsdp, parameters over fsdp (embed) and tensor (heads, mlp).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})

  c.train = ml_collections.ConfigDict()
  c.train.num_rounds = 20
  c.train.log_every = 1
  c.train.checkpoint_every = 10
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True

  if arg == 'smoke':
    c.model.dim = 32
    c.model.depth = 1
    c.data.prompts_per_device = 1
    c.train.num_rounds = 3
    c.train.checkpoint_every = 2
  elif arg not in (None, ''):
    raise ValueError(f'configs/opd.py: unknown variant {arg!r}; expected "smoke" or nothing')
  return c
