"""What every RL trainer builds from its config: networks, frozen pytree, sharded adapter state.

The teachers' trainers fine-tune a LoRA adapter on the frozen pretrained base (spec §1, §5):
`build_rl` rebuilds the networks from the base artifact's meta with LoRA slots, puts the frozen
pytree {'base', 'negative'} and the adapter's `TrainState` (+ EMA, + the algorithm's `extra`) on
the mesh, and keeps the zero adapter (the reference: LoRA disabled). `save_teacher` writes the
trained adapter (EMA weights if `ema.use_ema`) as a teacher artifact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from opd_jax.mini_world import artifacts
from opd_jax.mini_world import conditioning
from opd_jax.mini_world.networks import Networks, build_networks
from opd_jax.models.lora import zeros_like_adapter
from opd_jax.models.policy import Policy
from opd_jax.parallel import sharding as shd
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.train.state import TrainState, make_optimizer, sharded_train_state


@dataclasses.dataclass
class RLSetup:
  nets: Networks
  policy: Policy
  frozen: dict                 # {'base', 'negative'}: never in the optimizer or the checkpoint
  frozen_shardings: dict
  tx: optax.GradientTransformation
  state_shardings: TrainState
  init_state: Any              # () → TrainState of the fresh adapter, already sharded
  abstract_state: Any          # restore target (ShapeDtypeStructs with shardings)
  zero_adapter: Any            # the adapter with B = 0: the reference (LoRA disabled)
  sigmas: np.ndarray
  latent_shape: tuple[int, int, int]
  unshuffle: int
  mesh: Mesh


def build_rl(config, mesh: Mesh, base: artifacts.BaseModel, *, extra_init=None) -> RLSetup:
  """Networks from the base meta with LoRA slots, frozen pytree and adapter train state.

  `extra_init` (optional): adapter → the algorithm's extra state (e.g. NFT's old policy, a copy
  of the adapter); it is sharded like the adapter.
  """
  l = config.lora
  nets = build_networks(base.model_config, base.text_encoder_config, seed=config.seed,
                        lora_rank=l.rank, lora_alpha=l.alpha, lora_init=l.init)
  policy = Policy(nets.dit_graphdef, 'lora', 'lora')
  rep = shd.replicated(mesh)
  negative = conditioning.negative_conditioning(nets.text_graphdef, base.text_encoder)
  frozen_sh = {'base': shd.state_shardings(nets.dit_base, mesh),
               'negative': jax.tree.map(lambda _: rep, negative)}
  frozen = jax.device_put({'base': base.dit, 'negative': negative}, frozen_sh)
  adapter = nnx.to_pure_dict(nets.dit_lora)
  adapter_sh = shd.state_shardings(nets.dit_lora, mesh)
  tx = make_optimizer(config.optimizer, config.train.num_steps)
  extra = extra_sh = None
  if extra_init is not None:
    extra, extra_sh = extra_init(adapter), extra_init(adapter_sh)
  init_state, state_sh, abstract = sharded_train_state(adapter, adapter_sh, tx, config.seed, rep,
                                                       extra, extra_sh)
  m = base.model_config
  r = config.rollout
  return RLSetup(nets, policy, frozen, frozen_sh, tx, state_sh, init_state, abstract,
                 jax.device_put(zeros_like_adapter(adapter), adapter_sh),
                 flow_match_sigmas(r.num_steps, r.shift),
                 (m.latent_size, m.latent_size, m.latent_channels),
                 base.latent_config.unshuffle, mesh)


def jit_update(setup: RLSetup, update, batch_shardings: Any):
  """`update(state, frozen, ref_adapter, batch, iteration)` jitted on the setup's mesh: the state
  keeps its shardings and is donated; the batch is split over the data axis as given."""
  rep = shd.replicated(setup.mesh)
  return jax.jit(update, in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                       setup.state_shardings.params, batch_shardings, rep),
                 out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))


def put_batch(mesh: Mesh, tree: Any, batch_axis: int = 0) -> Any:
  """Host arrays → global device arrays split over the mesh's batch axes."""
  def put(x):
    x = np.asarray(x)
    return jax.device_put(x, shd.batch_sharding(mesh, x.ndim, batch_axis))
  return jax.tree.map(put, tree)


def saved_params(state: TrainState, config) -> Any:
  """The weights a stage saves and evaluates: the EMA if config.ema.use_ema."""
  return state.ema_params if config.ema.use_ema else state.params


def save_teacher(directory: str, state: TrainState, config, iterations: int) -> str:
  """Saves the adapter (EMA weights if config.ema.use_ema) as a teacher artifact."""
  params = jax.device_get(saved_params(state, config))
  meta = {'stage': config.trainer, 'tasks': list(config.data.tasks),
          'lora_rank': config.lora.rank, 'lora_alpha': config.lora.alpha,
          'cfg_scale': float(config.rollout.cfg_scale), 'schedule': config.schedule.mode,
          'weights': 'ema' if config.ema.use_ema else 'raw', 'iterations': int(iterations),
          'steps': int(jax.device_get(state.step))}
  return artifacts.save_adapter(directory, params, meta)
