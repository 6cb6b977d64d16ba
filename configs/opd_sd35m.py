"""The paper's stage 2 on SD3.5-Medium at 512 px: the released DiffusionOPD recipe (spec §5).

    python -m opd_jax.main --config=configs/opd_sd35m.py --workdir=runs/opd_sd35m \
        --config.base.path=/models/stable-diffusion-3.5-medium \
        --config.teachers.paths="('/adapters/GenEvalTeacher','/adapters/OCRTeacher','/adapters/AesTeacher')" \
        --config.data.embeddings_dir=/data/opd_prompt_cache

`base.path` is a diffusers SD3.5-M folder (its transformer/ is loaded torch-free), the teachers
are PEFT LoRA folders in data.tasks order, and the prompt cache comes from
`python -m opd_jax.tools.encode_prompts` (task names as in data.tasks, T5 length 128). Missing
paths stop the run with one line naming the field. The trained EMA student is exported in PEFT
format to WORKDIR/student_peft (diffusers + peft load it).

Variants: `sde` (the SDE ablation: Flow-GRPO kernel, a = 0.7), `single:<task>` (single-teacher
OPD on one task, e.g. single:text). Batch sizes follow the device count: 3 prompts per task per
device, 8 devices → 72 trajectories a round, as released.
"""

import ml_collections

from configs.optimizer import adamw

TASKS = ('composition', 'text', 'aesthetics')     # GenEval, OCR, PickScore prompt sets
TEACHER_CFG = {'composition': 1.0, 'text': 4.5, 'aesthetics': 4.5}   # GenEval teacher: CFG-free


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.base = ml_collections.ConfigDict()
  c.base.source = 'diffusers'
  c.base.path = ''                   # diffusers SD3.5-M pipeline folder (or its transformer/)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'sd3'
  c.model.transformer = ml_collections.ConfigDict()   # filled from the checkpoint's config.json
  c.model.latent_size = 64           # 512 px / VAE factor 8
  c.model.latent_channels = 16
  c.model.dtype = 'bfloat16'         # network compute; sampler and KL math stay float32
  c.model.param_dtype = 'bfloat16'   # frozen base storage; LoRA master weights are float32
  c.model.remat = True               # one block's activations live in the backward pass
  c.model.remat_policy = ''          # '' : recompute everything; or a jax.checkpoint_policies name
  c.model.scan_layers = False        # True: lax.scan over runs of identical blocks (faster compile)
  c.model.lora_rank = 32             # student (and teachers') LoRA on the 8 attention projections
  c.model.lora_alpha = 64.0
  c.model.lora_init = 'gaussian'

  c.student = ml_collections.ConfigDict()
  c.student.kind = 'lora'

  c.teachers = ml_collections.ConfigDict()
  c.teachers.kind = 'lora'
  c.teachers.source = 'peft'
  c.teachers.paths = ('', '', '')    # PEFT folders, in data.tasks order
  c.teachers.random_scale = 0.0      # unused ('random' stand-ins only)
  c.teachers.cfg_scales = tuple(TEACHER_CFG[t] for t in TASKS)

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sd3_embeddings'
  c.data.embeddings_dir = ''         # python -m opd_jax.tools.encode_prompts --out_dir=...
  c.data.tasks = TASKS
  c.data.max_prompts = 0             # 0: every train prompt of each task
  c.data.prompts_per_device = 3      # per task per device

  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 3.0
  c.rollout.kernel = 'ode'
  c.rollout.noise_level = 0.0
  c.rollout.cfg_scale = 4.5
  c.rollout.logprob_reduction = 'mean'

  c.objective = ml_collections.ConfigDict()
  c.objective.name = 'analytic'
  c.objective.clip_range = 1e-4
  c.objective.discount = 0.0
  c.objective.reduction = 'mean'
  c.objective.sde_normaliser = 'recipe'
  c.objective.timestep_fraction = 0.99   # int(10 · 0.99) = 9 of 10 steps trained
  c.objective.time_reduction = 'mean'
  c.objective.num_microbatches = 1
  c.objective.timestep_chunks = 1

  c.optimizer = adamw(3e-4)

  c.ema = ml_collections.ConfigDict()
  c.ema.max_decay = 0.9              # min((1+s)/(10+s), 0.9), every 8 steps
  c.ema.every = 8

  # Evaluation settings of the recipe (40-step Euler ODE at CFG 4.5 on EMA weights), recorded
  # with the run for opd_jax.sample and benchmark scripts.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_steps = 40
  c.eval.cfg_scale = 4.5
  c.eval.use_ema = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})

  c.train = ml_collections.ConfigDict()
  c.train.num_rounds = 2000
  c.train.log_every = 1
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True
  c.train.export_peft = True         # EMA student → WORKDIR/student_peft at the end

  variant = arg or ''
  if variant == 'sde':
    c.rollout.kernel = 'flow_grpo'
    c.rollout.noise_level = 0.7
  elif variant.startswith('single:'):
    task = variant.split(':', 1)[1]
    if task not in TASKS:
      raise ValueError(f'configs/opd_sd35m.py: single:<task> with a task from {TASKS}, got '
                       f'{task!r}')
    c.data.tasks = (task,)
    c.teachers.paths = ('',)
    c.teachers.cfg_scales = (TEACHER_CFG[task],)
  elif variant:
    raise ValueError(f'configs/opd_sd35m.py: unknown variant {variant!r}; expected sde or '
                     'single:<task>')
  return c
