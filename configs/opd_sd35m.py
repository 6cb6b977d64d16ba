"""The paper's stage 2 on SD3.5-Medium at 512 px: the released DiffusionOPD recipe (spec §5).

    python -m opd_jax.main --config=configs/opd_sd35m.py --workdir=runs/opd_sd35m \
        --config.base.path=/models/stable-diffusion-3.5-medium \
        --config.teachers.tasks.composition.path=/adapters/GenEvalTeacher \
        --config.teachers.tasks.text.path=/adapters/OCRTeacher \
        --config.teachers.tasks.aesthetics.path=/adapters/AesTeacher \
        --config.data.embeddings_dir=/data/opd_prompt_cache

`base.path` is a diffusers SD3.5-M folder (its transformer/ is loaded torch-free; the rollout's
schedule shift is read from its scheduler config), the teachers are PEFT LoRA folders declared
per task with their own CFG scale, and the prompt cache comes from
`python -m opd_jax.tools.encode_prompts` (task names as in data.tasks, T5 length 128). Missing
paths stop the run with one line naming the field. The trained EMA student is exported in PEFT
format to WORKDIR/student_peft (diffusers + peft load it).

Variants (comma-separated): `sde` (the SDE ablation: Flow-GRPO kernel, a = 0.7),
`single:<task>` (single-teacher OPD on one task, e.g. single:text), and a TPU generation
`v4`, `v5e` (the default), `v6e`, `v5p` setting the micro-batches that fit its HBM. The batch is 3 prompts per task per device (8 devices → 72
trajectories a round, as released) or, with --config.data.batch_size=24
--config.data.batch_size_per_device=0, 24 per task whatever the device count.
"""

import ml_collections

from configs import sections

TASKS = ('composition', 'text', 'aesthetics')     # GenEval, OCR, PickScore prompt sets
TEACHER_CFG = {'composition': 1.0, 'text': 4.5, 'aesthetics': 4.5}   # GenEval teacher: CFG-free
# Micro-batches per task that fit each TPU generation at 3 prompts per task per device
# (benchmarks/results/tpu_compile.md): 16 GiB chips need 3, v6e (32 GiB) and v5p (95 GiB) fit 1.
MICROBATCHES = {'v4': 3, 'v5e': 3, 'v6e': 1, 'v5p': 1}


def teachers(tasks) -> ml_collections.ConfigDict:
  """PEFT teachers declared by task: folder and the teacher's own CFG scale."""
  t = ml_collections.ConfigDict()
  t.kind = 'lora'
  t.source = 'peft'
  t.random_scale = 0.0               # unused ('random' stand-ins only)
  t.tasks = ml_collections.ConfigDict({
      task: ml_collections.ConfigDict({'path': '', 'cfg_scale': TEACHER_CFG[task]})
      for task in tasks})
  return t


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'opd'
  c.seed = 0

  c.base = sections.sd35_base()
  c.model = sections.sd35_model()
  c.lora = sections.lora(32, 64.0)   # student LoRA on the 8 attention projections (spec §5)

  c.student = ml_collections.ConfigDict()
  c.student.kind = 'lora'

  c.teachers = teachers(TASKS)

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sd3_embeddings'
  c.data.embeddings_dir = ''         # python -m opd_jax.tools.encode_prompts --out_dir=...
  c.data.tasks = TASKS
  c.data.max_prompts = 0             # 0: every train prompt of each task
  c.data.batch_size = 0              # prompts per task per round, global (0: per device)
  c.data.batch_size_per_device = 3   # per task per device

  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 0.0              # 0: the checkpoint's scheduler shift (SD3.5-M: 3.0)
  c.rollout.kernel = 'ode'
  c.rollout.noise_level = 0.0
  c.rollout.cfg_scale = 4.5
  c.rollout.logprob_reduction = 'mean'

  c.objective = ml_collections.ConfigDict()
  c.objective.name = 'analytic'
  c.objective.clip_range = 1e-4
  c.objective.discount = 0.0
  c.objective.kl_reduction = 'mean'
  c.objective.kl_normaliser = 'sigma2'
  c.objective.timestep_fraction = 0.99   # int(10 · 0.99) = 9 of 10 steps trained
  c.objective.time_reduction = 'mean'

  c.optimizer = sections.adamw(3e-4)

  # As released: min((1+k)/(10+k), 0.9) once per task micro-batch (3 per round), active on
  # (k + 1) % 8 == 0 (teachers_rewards_eval.md §1).
  c.ema = sections.ema(0.9, every=8, updates_per_step=len(TASKS))

  # Evaluation settings of the recipe (40-step Euler ODE at CFG 4.5 on EMA weights), recorded
  # with the run for opd_jax.sample and benchmark scripts.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_steps = 40
  c.eval.cfg_scale = 4.5

  c.mesh = sections.mesh()

  c.train = sections.train(num_steps=2000, checkpoint_every=100)
  # Fits a v5e-8 (16 GiB per chip; benchmarks/tpu_compile.py): the VJP is taken during the
  # rollout (one trained step's activations at a time) and each task's 3 prompts per device
  # run as 3 micro-batches. Other topologies: README "Does the round fit a TPU?".
  c.train.fused_vjp = True
  c.train.num_microbatches = 3       # per task; gradients accumulate in one buffer
  c.train.memory_limit_gib = 0.0     # > 0: stop before the first step if a device needs more
  c.train.timestep_chunks = 1        # two-pass round only: trained steps vmapped in chunks
  c.train.export_peft = True         # EMA student → WORKDIR/student_peft at the end

  for variant in filter(None, (arg or '').split(',')):
    if variant == 'sde':
      c.rollout.kernel = 'flow_grpo'
      c.rollout.noise_level = 0.7
    elif variant.startswith('single:'):
      task = variant.split(':', 1)[1]
      if task not in TASKS:
        raise ValueError(f'configs/opd_sd35m.py: single:<task> with a task from {TASKS}, got '
                         f'{task!r}')
      c.data.tasks = (task,)
      c.teachers = teachers((task,))
      c.ema.updates_per_step = 1
    elif variant in MICROBATCHES:
      c.train.num_microbatches = MICROBATCHES[variant]
    else:
      raise ValueError(f'configs/opd_sd35m.py: unknown variant {variant!r}; expected sde, '
                       f'single:<task> or a TPU generation {sorted(MICROBATCHES)}')
  return c
