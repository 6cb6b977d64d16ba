"""What every RL trainer builds from its config: networks, frozen pytree, sharded adapter state.

The teachers' trainers fine-tune a LoRA adapter on the frozen pretrained base (spec §1, §5):
`build_rl` builds config.model (the mini world's DiT, or the SD3/SD3.5 MMDiT whose weights the
base brings — `train.bases`) with LoRA slots, puts the frozen pytree {'base', 'negative',
'decoder'} and the adapter's `TrainState` (+ EMA, + the algorithm's `extra`) on the mesh, and
keeps the zero adapter (the reference: LoRA disabled). `save_teacher` writes the trained adapter
(EMA weights if `ema.use_ema`) as a teacher artifact; `export_teacher_peft` as a PEFT folder
(SD3 bases) that OPD, diffusers + peft and the evaluation load.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from opd_jax.mini_world import artifacts
from opd_jax.models.loading.pretrained import init_lora_state
from opd_jax.models.lora import zeros_like_adapter
from opd_jax.models.policy import Policy
from opd_jax.models.registry import build_model
from opd_jax.parallel import sharding as shd
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.train.bases import Base, Decoder
from opd_jax.train.state import TrainState, make_optimizer, sharded_train_state


@dataclasses.dataclass
class RLSetup:
  graphdef: Any                # the network (base + LoRA slots)
  policy: Policy
  frozen: dict                 # {'base', 'negative', 'decoder'}: never trained or checkpointed
  frozen_shardings: dict
  tx: optax.GradientTransformation
  state_shardings: TrainState
  init_state: Any              # () → TrainState of the fresh adapter, already sharded
  abstract_state: Any          # restore target (ShapeDtypeStructs with shardings)
  zero_adapter: Any            # the adapter with B = 0: the reference (LoRA disabled)
  sigmas: np.ndarray
  latent_shape: tuple[int, int, int]
  decode: Any                  # (decoder params, latents) → images: `train.bases.Decoder.fn`
  mesh: Mesh


def build_rl(config, mesh: Mesh, base: Base, negative: dict, *, extra_init=None) -> RLSetup:
  """Network with LoRA slots, frozen pytree and adapter train state, sharded over `mesh`.

  Args:
    config: an RL config whose config.model the base has filled in (`train.bases.load_base`).
    base: the loaded base (weights, decoder).
    negative: the empty prompt's conditioning (CFG's unconditional branch), leading axis 1.
    extra_init: adapter → the algorithm's extra state (e.g. NFT's old policy, a copy of the
      adapter); it is sharded like the adapter.
  """
  l = config.lora
  # An SD3 base's weights are loaded: its network is only traced for structure (an SD3.5-M
  # init alone is ~10 GB) and the adapter initialised on its own. The mini world's DiT is built
  # as the pretrain stage built it (same seeded LoRA init as every mini-world stage).
  loaded = config.base.source == 'diffusers'
  graphdef, base_state, lora_state = build_model(
      config.model, abstract=loaded, seed=config.seed, lora_rank=l.rank, lora_alpha=l.alpha,
      lora_init=l.init)
  if loaded:
    lora_state = init_lora_state(lora_state, seed=config.seed, init=l.init)
  policy = Policy(graphdef, 'lora', 'lora', batch_sharding=shd.batch_sharding(mesh, 1))
  rep = shd.replicated(mesh)
  decoder = base.decoder() if base.decoder is not None else Decoder(None, None)
  frozen_sh = {'base': shd.state_shardings(base_state, mesh),
               'negative': jax.tree.map(lambda _: rep, negative),
               'decoder': jax.tree.map(lambda _: rep, decoder.params)}
  frozen = jax.device_put({'base': base.params, 'negative': negative,
                           'decoder': decoder.params}, frozen_sh)
  adapter = nnx.to_pure_dict(lora_state)
  adapter_sh = shd.state_shardings(lora_state, mesh)
  tx = make_optimizer(config.optimizer, config.train.num_steps)
  extra = extra_sh = None
  if extra_init is not None:
    extra, extra_sh = extra_init(adapter), extra_init(adapter_sh)
  init_state, state_sh, abstract = sharded_train_state(adapter, adapter_sh, tx, config.seed, rep,
                                                       extra, extra_sh)
  m, r = config.model, config.rollout
  return RLSetup(graphdef, policy, frozen, frozen_sh, tx, state_sh, init_state, abstract,
                 jax.device_put(zeros_like_adapter(adapter), adapter_sh),
                 flow_match_sigmas(r.num_steps, r.shift),
                 (m.latent_size, m.latent_size, m.latent_channels), decoder.fn, mesh)


def jit_update(setup: RLSetup, update, batch_shardings: Any):
  """`update(state, frozen, ref_adapter, batch, iteration)` jitted on the setup's mesh: the state
  keeps its shardings and is donated; the batch is split over the data axis as given."""
  rep = shd.replicated(setup.mesh)
  return jax.jit(update, in_shardings=(setup.state_shardings, setup.frozen_shardings,
                                       setup.state_shardings.params, batch_shardings, rep),
                 out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))


def put_batch(mesh: Mesh, tree: Any, batch_axis: int = 0) -> Any:
  """Host arrays (whole on every process) → global device arrays split over the mesh's batch
  axes, each process placing the slice its devices own."""
  return jax.tree.map(lambda x: shd.global_batch_array(mesh, x, batch_axis), tree)


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


def export_teacher_peft(config, state: TrainState, out_dir: str) -> str:
  """Writes the teacher adapter (EMA weights if config.ema.use_ema) as a PEFT folder, which
  OPD (`teachers.source = 'peft'`), diffusers + peft and `opd_jax.evaluate` load."""
  from opd_jax.models.peft_io import save_lora_adapter
  from opd_jax.models.registry import abstract_module
  save_lora_adapter(jax.device_get(saved_params(state, config)),
                    abstract_module(config.model, config.lora), out_dir)
  return out_dir


def microbatched_value_and_grad(loss_fn, params: Any, rows: jax.Array, num_microbatches: int):
  """(mean loss, aux stacked over micro-batches [n, ...], mean grads) of
  `loss_fn(params, rows_i, i) -> (loss, aux)` over n = num_microbatches equal micro-batches.

  `rows` (int [R]) are the minibatch's batch rows; `loss_fn` gathers its own inputs from them
  (and folds the micro-batch index i into any key it draws).
  One micro-batch's activations live at a time (a `lax.scan` accumulating float32 gradients):
  what makes an SD3.5-M minibatch of hundreds of images fit, where the mean of the micro-batch
  means equals the minibatch mean since the micro-batches are equal.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (loss, aux), grads = grad_fn(params, rows, jnp.int32(0))
    return loss, jax.tree.map(lambda x: x[None], aux), grads
  micro = rows.reshape(num_microbatches, -1)

  def body(acc, xs):
    i, rows_i = xs
    (loss, aux), grads = grad_fn(params, rows_i, i)
    return jax.tree.map(jnp.add, acc, grads), (loss, aux)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, (losses, auxes) = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))
  return (jnp.mean(losses), auxes,
          jax.tree.map(lambda g, p: (g / num_microbatches).astype(p.dtype), total, params))
