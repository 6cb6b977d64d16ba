"""The paper's stage 1 on SD3.5-Medium at 512 px: one RL teacher per task, and the baselines.

    python -m opd_jax.main --config=configs/teachers_sd35m.py:ocr --workdir=runs/teacher_ocr \
        --config.base.path=/models/stable-diffusion-3.5-medium \
        --config.data.embeddings_dir=/data/opd_prompt_cache

Variants (spec §1, teachers_rewards_eval.md):
  geneval      DiffusionNFT on the GenEval prompts (task 'composition'), reward: GenEval's
               partial score (detector service + CLIP-L colours: config.rewards.detector_url,
               config.rewards.clip), CFG-free
  ocr          GRPO-Guard on the OCR prompts (task 'text'), reward: OCR edit distance
  aesthetics   GRPO-Guard on Pick-a-Pic prompts (task 'aesthetics'), reward: PickScore/26 +
               CLIPScore + HPSv2.1 (config.rewards.pickscore / .clip / .hpsv2)
  multitask    the multi-task baseline: GRPO-Guard over the union of the three prompt sets,
               each image scored by its own task's reward, advantages normalised per task
  cascade      the cascade baseline: DiffusionNFT on aesthetics → GenEval → OCR, an equal
               share of the iterations each (DiffusionNFT's multi-reward order)

`base.path` is a diffusers SD3.5-M folder (its transformer/ and vae/ are read torch-free; the
schedule shift comes from its scheduler config); the prompt cache is
`python -m opd_jax.tools.encode_prompts` with task names composition / text / aesthetics (train
splits from the GenEval, OCR and Pick-a-Pic train prompt files). Each teacher ends as
WORKDIR/teacher (our artifact) and WORKDIR/teacher_peft (PEFT, EMA weights), which
configs/opd_sd35m.py takes as `teachers.tasks.<task>.path` and `opd_jax.evaluate` as a model.

Batch: `data.batch_size` prompts × `data.group_size` images an iteration (upstream: 48 groups of
24), sampled in `data.sample_batches` calls so that one call holds what a device can sample at
once; the rewards of a call are scored on the host while the next call samples.
"""

import ml_collections

from configs import sections

TASK_OF = {'geneval': 'composition', 'ocr': 'text', 'aesthetics': 'aesthetics'}
REWARD_OF = {'composition': 'geneval', 'text': 'ocr', 'aesthetics': 'aesthetics_mix'}
CASCADE_ORDER = ('aesthetics', 'composition', 'text')
# GRPO-Guard's clip range per task (spec §1): 2e-6 for OCR and GenEval, 4e-6 for PickScore.
GUARD_CLIP = {'composition': 2e-6, 'text': 2e-6, 'aesthetics': 4e-6}


def rewards(tasks) -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.tasks = ml_collections.ConfigDict({t: REWARD_OF[t] for t in tasks})
  # Weight folders (HF format; opd_jax.tools.convert_clip makes HPSv2.1's).
  r.pickscore = ''                  # yuvalkirstain/PickScore_v1 + its processor's tokenizer
  r.clip = ''                       # openai/clip-vit-large-patch14 (CLIPScore, GenEval colours)
  r.hpsv2 = ''                      # HPSv2.1 converted
  r.aesthetic_head = ''
  r.batch_size = 8                  # images per reward-network call
  r.ocr_backend = 'rapidocr'        # 'rapidocr' (in-process) | 'http' (opd_jax.rewards.ocr_service)
  r.ocr_url = 'http://127.0.0.1:18090/ocr'
  r.detector_url = 'http://127.0.0.1:8085'   # opd_jax.eval.detector_service
  r.detector_timeout_s = 300.0
  r.retries = 2                     # further attempts of a remote reward, then the run stops
  return r


def _common(tasks) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.base = sections.sd35_base()
  c.model = sections.sd35_model()
  c.lora = sections.lora(32, 64.0)   # Flow-GRPO / DiffusionNFT: r 32, alpha 64, attention

  c.data = ml_collections.ConfigDict()
  c.data.source = 'sd3_embeddings'
  c.data.embeddings_dir = ''
  c.data.tasks = tuple(tasks)
  c.data.max_prompts = 0
  c.data.batch_size = 48             # prompt groups an iteration (global)
  c.data.batch_size_per_device = 0
  c.data.group_size = 24             # images per prompt
  c.data.sample_batches = 12         # 96 images a sampler call (12 per device on 8 devices)
  c.rewards = rewards(tasks)

  c.schedule = ml_collections.ConfigDict({'mode': 'joint'})
  c.advantage = ml_collections.ConfigDict({'std_scope': 'group'})   # per-group std

  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_steps = 10
  c.rollout.shift = 0.0              # 0: the checkpoint's scheduler shift (SD3.5-M: 3.0)
  c.rollout.logprob_reduction = 'mean'

  c.ema = sections.ema(0.9, every=8)
  c.mesh = sections.mesh()
  c.train = sections.train(num_steps=1000, checkpoint_every=20)
  c.train.export_peft = True         # EMA teacher → WORKDIR/teacher_peft
  # A minibatch (576 images) in 18 accumulated micro-batches: 4 images per device on 8 devices,
  # each with its trained steps' activations (rematerialised blocks). Not yet compiled for a TPU:
  # size it with benchmarks/tpu_compile.py-style compiles before a long run.
  c.train.num_microbatches = 18
  c.eval = ml_collections.ConfigDict({'num_steps': 40, 'cfg_scale': 4.5})
  return c


def grpo_guard(tasks) -> ml_collections.ConfigDict:
  """GRPO-Guard (spec §1): SDE rollouts a = 0.7, CFG 4.5, 9 of 10 steps trained, lr 1e-4."""
  c = _common(tasks)
  c.trainer = 'grpo_guard'
  c.rollout.kernel = 'flow_grpo'
  c.rollout.noise_level = 0.7
  c.rollout.cfg_scale = 4.5
  c.rollout.sde_steps = 0            # every transition stochastic
  c.grpo = ml_collections.ConfigDict()
  c.grpo.timestep_fraction = 0.99    # int(10 · 0.99) = 9 of 10 transitions trained
  c.grpo.train_timesteps = 0         # all of them each minibatch
  c.grpo.clip_range = min(GUARD_CLIP[t] for t in tasks)
  c.grpo.adv_clip = 5.0
  c.grpo.kl_beta = 0.0
  c.grpo.kl_reduction = 'mean'
  c.grpo.kl_normaliser = 'sigma2'
  c.grpo.guard_bias = 'batch'        # upstream's code: one scalar per step (spec §1)
  c.optimizer = sections.adamw(1e-4)
  c.train.num_minibatches = 2        # 2 optimizer steps per iteration
  c.train.inner_epochs = 1
  return c


def nft(tasks) -> ml_collections.ConfigDict:
  """DiffusionNFT (spec §1): CFG-free Euler ODE samples, the faithful loss (nft_defaults)."""
  c = _common(tasks)
  c.trainer = 'nft'
  c.rollout.kernel = 'ode'
  c.rollout.noise_level = 0.0
  c.rollout.cfg_scale = 1.0
  c.rollout.sde_steps = 0
  c.nft = ml_collections.ConfigDict()
  c.nft.beta = 1.0
  c.nft.adv_clip = 5.0
  c.nft.kl_beta = 1e-4
  c.nft.timesteps_per_sample = 9      # int(10 · 0.99) of the sampler's timesteps per sample
  c.nft.t_min = 0.0
  c.nft.t_max = 1.0
  c.nft.old_decay = 0.0              # unused: the linear schedule below
  # Upstream DiffusionNFT (spec §1): x0-space loss with the adaptive weight, the sampler's own
  # timesteps shuffled per sample (9 of 10), θ_old decay min(0.001·step, 0.5), loss ×A_max.
  c.nft.weighting = 'adaptive_x0'
  c.nft.timesteps = 'sampler_schedule'
  c.nft.old_decay_schedule = 'linear'
  c.nft.old_decay_flat = 0
  c.nft.old_decay_rate = 0.001
  c.nft.old_decay_max = 0.5
  c.nft.scale_by_adv_clip = True
  c.optimizer = sections.adamw(3e-4)
  c.train.num_minibatches = 2
  c.train.inner_epochs = 1
  return c


def get_config(arg: str | None = 'ocr') -> ml_collections.ConfigDict:
  variant = arg or 'ocr'
  if variant == 'geneval':
    return nft(('composition',))
  if variant in ('ocr', 'aesthetics'):
    c = grpo_guard((TASK_OF[variant],))
    return c
  if variant == 'multitask':
    c = grpo_guard(tuple(REWARD_OF))
    c.advantage.std_scope = 'task'   # per-task normalisation: rewards of different scales
    c.data.batch_size = 48           # 16 prompt groups per task
    return c
  if variant == 'cascade':
    c = nft(CASCADE_ORDER)
    c.schedule.mode = 'cascade'
    return c
  raise ValueError(f'configs/teachers_sd35m.py: unknown variant {variant!r}; expected one of '
                   f'geneval, ocr, aesthetics, multitask, cascade')
