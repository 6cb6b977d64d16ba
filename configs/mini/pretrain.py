"""Mini world, stage 0: rectified-flow pretraining of the base DiT + text encoder.

    python -m opd_jax.main --config=configs/mini/pretrain.py --workdir=runs/pretrain

Measured on the 2-core CPU (opd_jax/assets/mini_world_base.json, mini world v3): 685 s for 30000
steps of 32 on 3 × 32768 pairs (11 min 30 s with the dataset build), final loss 0.040; at its
CFG 3 the base scores composition_strict 0.375 / text 0.967 / aesthetics 0.748 on 128 train
prompts per task (benchmarks/results/mini_world_cfg.md).
Its data and length are what the text task needs: on 3 × 4096 pairs for 10000 steps (the first
shipped base, 294 s) it scored 0.23 text on held-out prompts (about a fifth of its glyphs right,
an exploratory measurement) and no RL teacher could improve its text.
The recipe (configs/opd.py) reuses that shipped base; `:ship` remakes it:

    python -m opd_jax.main --config=configs/mini/pretrain.py:ship --workdir=runs/mini_base

Variant `:smoke` trains a few steps on the 'small' dataset (tests).
"""

import ml_collections

from configs import sections
from configs.mini import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'pretrain'
  c.seed = 0
  c.data = common.data()
  c.data.dataset_config = 'large'    # 3 × 32768 pairs: with 3 × 4096 the base underfit the glyphs
  c.data.batch_size = 32             # more, smaller steps beat fewer large ones per CPU-second
  c.data.batch_size_per_device = 0
  c.latent = common.latent()
  c.model = common.model()
  c.text_encoder = common.text_encoder()

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.timestep_sampling = 'uniform'   # uniform | logit_normal (SD3; worse here)
  c.pretrain.logit_mean = 0.0
  c.pretrain.logit_std = 1.0
  c.pretrain.prompt_dropout = 0.1   # prompt → "" (learns the unconditional branch for CFG)

  c.optimizer = sections.adamw(5e-3) # tiny nets like it high: 5e-4 / 2e-3 were clearly worse
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 50
  c.optimizer.b2 = 0.99

  c.ema = sections.ema(0.99, every=1)   # the saved base is the EMA of the weights
  c.mesh = sections.mesh()

  c.train = sections.train(num_steps=30000, checkpoint_every=1000, log_every=50)

  # The repo ships the output of this config (opd_jax/mini_world/shipped_base.py): `reuse_shipped`
  # returns it instead of training when the settings match; `ship` (variant `:ship`) remakes it.
  c.reuse_shipped = False
  c.ship = False

  if arg == 'ship':
    c.ship = True
  elif arg == 'smoke':
    c.data.dataset_config = 'small'
    c.model.dim = 32
    c.model.depth = 1
    c.model.num_heads = 2
    c.model.context_dim = 32
    c.model.pooled_dim = 32
    c.text_encoder.dim = 32
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    c.data.batch_size = 8
    c.train.log_every = 2
    c.optimizer.warmup_steps = 1
  elif arg not in (None, ''):
    raise ValueError(f'configs/mini/pretrain.py: unknown variant {arg!r}; expected ship, smoke '
                     'or none')
  return c
