"""The optimizer section shared by the OPD and RL configs (mini world and SD3.5-Medium)."""

import ml_collections


def adamw(lr: float) -> ml_collections.ConfigDict:
  """AdamW with global-norm clipping, constant LR (spec §5; opd_jax.train.state.make_optimizer)."""
  o = ml_collections.ConfigDict()
  o.lr = lr
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 1e-4
  o.grad_clip = 1.0
  return o
