"""Config sections spelled the same way by every trainer (opd_jax/train/config_check.py).

OPD, the RL trainers and pretraining, in the mini world and on SD3.5-Medium, build these sections
here, so one concept has one spelling and one set of defaults; each config then overrides what
it measures differently (documented where it does).
"""

import ml_collections


def adamw(lr: float) -> ml_collections.ConfigDict:
  """AdamW with global-norm clipping (spec §5; opd_jax.train.state.make_optimizer)."""
  o = ml_collections.ConfigDict()
  o.lr = lr
  o.schedule = 'constant'         # 'constant' | 'cosine' (to 0 at train.num_steps)
  o.warmup_steps = 0              # linear warmup from 0 over this many steps
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 1e-4
  o.grad_clip = 1.0
  return o


def ema(max_decay: float = 0.9, every: int = 1, updates_per_step: int = 1,
        use_ema: bool = True) -> ml_collections.ConfigDict:
  """The EMA rule (opd_jax.train.state.EMARule): after optimizer step k, when
  (k + 1) % every == 0, `updates_per_step` updates with decay min((1+k)/(10+k), max_decay)."""
  e = ml_collections.ConfigDict()
  e.max_decay = max_decay
  e.every = every
  e.updates_per_step = updates_per_step   # the released OPD code: once per task micro-batch (3)
  e.use_ema = use_ema                     # the saved / evaluated weights are the EMA
  return e


def lora(rank: int, alpha: float) -> ml_collections.ConfigDict:
  """LoRA layout of the trained adapter (PEFT init_lora_weights='gaussian': B = 0 at start)."""
  l = ml_collections.ConfigDict()
  l.rank = rank
  l.alpha = alpha
  l.init = 'gaussian'             # 'gaussian' | 'kaiming'
  return l


def sd35_base() -> ml_collections.ConfigDict:
  """A diffusers SD3.5-Medium pipeline folder (or its transformer/), read torch-free."""
  return ml_collections.ConfigDict({'source': 'diffusers', 'path': ''})


def sd35_model() -> ml_collections.ConfigDict:
  """The SD3.5-Medium MMDiT at 512 px in the mixed precision every SD3.5 recipe trains with.

  bfloat16 network compute and frozen-base storage (LoRA master weights stay float32; sampler,
  KL and loss math float32), with float32 matmul products, residual streams and output layer:
  the setting that keeps the small teacher − student gap (benchmarks/precision_gap.py).
  """
  m = ml_collections.ConfigDict()
  m.name = 'sd3'
  m.transformer = ml_collections.ConfigDict()   # filled from the checkpoint's config.json
  m.latent_size = 64           # 512 px / VAE factor 8
  m.latent_channels = 16
  m.dtype = 'bfloat16'
  m.param_dtype = 'bfloat16'
  m.float32_matmul_output = True
  m.float32_residual = True
  m.float32_output = True
  m.remat = True               # one block's activations live in the backward pass
  m.remat_policy = ''          # '' : recompute everything; or a jax.checkpoint_policies name
  m.attention = ''             # '' (JAX picks), 'xla', 'cudnn' (GPU), 'einsum', 'splash' (TPU)
  m.scan_layers = False        # True: lax.scan over runs of identical blocks (faster compile)
  return m


def mesh() -> ml_collections.ConfigDict:
  """Batch over data × fsdp, parameters over fsdp (embed) and tensor (heads, mlp)."""
  m = ml_collections.ConfigDict()
  m.shape = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  return m


def train(num_steps: int, checkpoint_every: int, log_every: int = 1) -> ml_collections.ConfigDict:
  """The loop (opd_jax.train.loop): length, logging, checkpoints, resume policy."""
  t = ml_collections.ConfigDict()
  t.num_steps = num_steps           # optimizer rounds (OPD), iterations (RL) or steps
  t.log_every = log_every
  t.checkpoint_every = checkpoint_every
  t.keep_checkpoints = 3
  t.async_checkpoints = True
  t.allow_changed_config = False    # resume a checkpoint saved under other settings anyway
  return t
