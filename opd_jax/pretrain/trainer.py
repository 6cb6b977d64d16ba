"""Stage 0 of the mini world: rectified-flow pretraining of the base DiT and its text encoder.

On (image, prompt) pairs of the `pretrain` TFDS split — a fraction of them deliberately wrong
for their prompt (the builder's corrupt_prob), so the base is decent but imperfect, like
SD3.5-M — the DiT and the text encoder are trained jointly with the flow-matching loss (spec §2):

    x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   loss = ‖v_θ(x_t, 1000·t, enc(prompt)) − v‖²

with t logit-normal (SD3) or uniform, and each prompt replaced by "" with probability
`prompt_dropout` so the model also learns the unconditional velocity that CFG needs.

`run_pretrain(config, workdir)` trains through the shared loop (`opd_jax.train.loop`: resume,
checkpoints, NaN and preemption handling) and saves the base (EMA or raw weights, per
`ema.use_ema`) with its text encoder and config sections as an `artifacts.save_base` artifact
under workdir/base; every later stage starts from it. `config.ship` also writes it as the repo's
shipped base, and `config.reuse_shipped` returns that shipped base instead of training when it
was made with the same settings (opd_jax.mini_world.shipped_base).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from opd_jax.errors import ConfigError, InputError
from opd_jax.mini_world import artifacts
from opd_jax.mini_world import latents as latent_codec
from opd_jax.mini_world import shipped_base
from opd_jax.mini_world import tfds_builder
from opd_jax.mini_world import tokenizer
from opd_jax.mini_world.networks import build_networks, check_latent_matches_model
from opd_jax.mini_world.text_encoder import encode_tokens
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from opd_jax.train import config_check as cc
from opd_jax.train import loop
from opd_jax.train.state import EMARule, TrainState, make_optimizer, sharded_train_state

TIMESTEP_SAMPLING = ('logit_normal', 'uniform')
SECTIONS = ('seed', 'trainer', 'data.data_dir', 'data.dataset_config', 'data.batch_size',
            'data.batch_size_per_device', 'latent', 'model', 'text_encoder', 'pretrain',
            'optimizer', 'ema', 'mesh', 'train', 'reuse_shipped', 'ship')


class PretrainData:
  """The `pretrain` split in host memory, served in reshuffled epochs (deterministic in seed)."""

  def __init__(self, data_dir: str, dataset_config: str, unshuffle: int, batch_size: int,
               seed: int):
    try:
      source = tfds_builder.load_split(data_dir, tfds_builder.PRETRAIN_SPLIT, dataset_config)
    except ConfigError as e:
      raise ConfigError(f'config.data.dataset_config: {e}') from None
    except InputError as e:
      raise InputError(f'config.data.data_dir: {e}') from None
    except Exception as e:   # TFDS raises many types for a corrupt or half-written dataset
      raise InputError(f'config.data.data_dir: the mini_world dataset in {data_dir} is '
                       f'unreadable ({type(e).__name__}: {e}); delete it to rebuild') from None
    examples = [source[i] for i in range(len(source))]
    self.images = np.stack([e['image'] for e in examples])            # uint8 [N, S, S, 3]
    self.tokens = np.stack([e['tokens'] for e in examples]).astype(np.int32)
    self.unshuffle, self.batch_size, self.seed = unshuffle, batch_size, seed
    if batch_size > len(examples):
      raise ConfigError(f'config.data.batch_size: {batch_size} exceeds the {len(examples)} '
                        'pretraining pairs')
    self._epoch, self._order = -1, None

  def __len__(self) -> int:
    return len(self.images)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch `step` (no repeats within an epoch; a partial tail is dropped)."""
    per_epoch = len(self) // self.batch_size
    epoch, offset = divmod(step, per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
    idx = self._order[offset * self.batch_size:(offset + 1) * self.batch_size]
    return {'latents': np.asarray(latent_codec.encode(self.images[idx], self.unshuffle)),
            'tokens': self.tokens[idx]}


def sample_timesteps(key: jax.Array, batch: int, method: str, logit_mean: float,
                     logit_std: float) -> jax.Array:
  """t ∈ (0, 1) [B]: logit-normal σ(m + s·z) (SD3's default) or uniform."""
  if method == 'logit_normal':
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
  if method == 'uniform':
    return jax.random.uniform(key, (batch,), minval=1e-4, maxval=1.0)
  raise ConfigError(f'config.pretrain.timestep_sampling: {method!r} is not one of '
                    f'{TIMESTEP_SAMPLING}')


def flow_matching_loss(dit_graphdef: Any, text_graphdef: Any, params: dict, x0: jax.Array,
                       tokens: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Mean ‖v_θ(x_t) − (ε − x0)‖² over batch and latent elements (rectified flow, spec §2)."""
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * eps
  cond = encode_tokens(text_graphdef, params['text_encoder'], tokens)
  v = nnx.merge(dit_graphdef, params['dit'])(x_t, t * NUM_TRAIN_TIMESTEPS, **cond)
  return jnp.mean(jnp.square(v - (eps - x0)))


def make_pretrain_step(config, dit_graphdef: Any, text_graphdef: Any,
                       tx: optax.GradientTransformation):
  """The un-jitted step (state, batch) → (state, metrics)."""
  p = config.pretrain
  ema = EMARule.from_config(config.ema)
  empty_tokens = jnp.asarray(tokenizer.encode([''])[0][0])

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    x0, tokens = batch['latents'], batch['tokens']
    b = x0.shape[0]
    k_t, k_eps, k_drop = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
    drop = jax.random.bernoulli(k_drop, p.prompt_dropout, (b,))
    tokens = jnp.where(drop[:, None], empty_tokens[None], tokens)
    t = sample_timesteps(k_t, b, p.timestep_sampling, p.logit_mean, p.logit_std)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    with jax.named_scope('flow_matching_loss'):
      loss, grads = jax.value_and_grad(
          lambda prm: flow_matching_loss(dit_graphdef, text_graphdef, prm, x0, tokens, t, eps)
      )(state.params)
    with jax.named_scope('update'):
      state, metrics = state.apply_gradients(grads, tx, ema)
    metrics['loss'] = loss
    metrics['finite'] = metrics['finite'] & jnp.isfinite(loss)
    return state, metrics

  return step


def validate(config) -> None:
  """Raises ConfigError for the first invalid field of a pretraining config."""
  cc.require_sections(config, SECTIONS)
  cc.check(config.trainer == 'pretrain', 'trainer',
           f"a pretraining config has trainer 'pretrain', got {config.trainer!r}")
  cc.validate_common(config)
  cc.validate_batch(config.data)
  try:
    check_latent_matches_model(config.model, config.latent)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  p = config.pretrain
  cc.choice(p.timestep_sampling, 'pretrain.timestep_sampling', TIMESTEP_SAMPLING)
  cc.check(0 <= p.prompt_dropout < 1, 'pretrain.prompt_dropout',
           f'must be in [0, 1), got {p.prompt_dropout}')
  cc.integer(config.train.num_steps, 'train.num_steps', 1)


def base_meta(config) -> dict:
  """The sections a later stage needs to rebuild the base's networks."""
  return {'model': config.model.to_dict(), 'text_encoder': config.text_encoder.to_dict(),
          'latent': config.latent.to_dict(), 'seed': config.seed, 'stage': 'pretrain',
          'weights': 'ema' if config.ema.use_ema else 'raw'}


@dataclasses.dataclass
class PretrainTrainer:
  """The `loop.Trainer` of pretraining: step k trains on batch k of the epoch order."""
  data: PretrainData
  step_fn: Any
  batch_shardings: Any
  init_state: Any
  abstract_state: Any
  use_ema: bool
  name: str = 'pretrain'
  metric_names: dict = dataclasses.field(default_factory=dict)

  def compile(self) -> None:
    """Nothing ahead of time: the jitted functions compile at the first step."""

  def step(self, state, step: int):
    return self.step_fn(state, jax.device_put(self.data.batch(step), self.batch_shardings))

  def get_position(self) -> dict:
    return {}        # batch k is a function of (seed, k): the step is the position

  def set_position(self, position: dict) -> None:
    del position

  def inputs_fingerprint(self) -> dict:
    return {'pretrain_pairs': len(self.data)}

  def eval_params(self, state):
    return state.ema_params if self.use_ema else state.params


def prepare(config, mesh) -> tuple[PretrainTrainer, Any]:
  """(trainer, networks) for `config` on `mesh` (the data is read, nothing is trained)."""
  batch = cc.global_batch_size(config.data, batch_axis_size(mesh))
  data = PretrainData(config.data.data_dir, config.data.dataset_config, config.latent.unshuffle,
                      batch, config.seed)
  nets = build_networks(config.model, config.text_encoder, seed=config.seed)
  params = {'dit': nnx.to_pure_dict(nets.dit_base),
            'text_encoder': nnx.to_pure_dict(nets.text_params)}
  param_sh = {'dit': shd.state_shardings(nets.dit_base, mesh),
              'text_encoder': shd.state_shardings(nets.text_params, mesh)}
  rep = shd.replicated(mesh)
  tx = make_optimizer(config.optimizer, config.train.num_steps)
  init_state, state_sh, abstract = sharded_train_state(params, param_sh, tx, config.seed, rep)
  batch_sh = {'latents': shd.batch_sharding(mesh, 4), 'tokens': shd.batch_sharding(mesh, 2)}
  step_fn = jax.jit(make_pretrain_step(config, nets.dit_graphdef, nets.text_graphdef, tx),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                    donate_argnums=(0,))
  trainer = PretrainTrainer(data, step_fn, batch_sh, init_state, abstract, config.ema.use_ema)
  return trainer, nets


def run_pretrain(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict:
  """Pretrains (or resumes pretraining) the base DiT + text encoder; saves them in workdir/base.

  Args:
    config: a `configs/mini/pretrain.py` config.
    workdir: output directory (metrics.jsonl, tensorboard/, checkpoints/, base/).
    mesh: optional device mesh (default: from config.mesh.shape over all devices).

  Returns:
    {'base_dir': path of the saved base artifact, 'wall_s': training seconds (cumulative over
     resumes), 'steps': steps run, 'metrics': the last logged metrics}.
  """
  validate(config)
  if config.reuse_shipped:
    reasons = shipped_base.mismatch(config)
    if not reasons:
      return _reuse_shipped(config, workdir)
    if jax.process_index() == 0:
      print('[pretrain] the shipped base was made with other settings, training a new one: '
            + '; '.join(reasons[:3]), flush=True)
  started = time.time()
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  trainer, _ = prepare(config, mesh)
  result = loop.run(trainer, config, workdir, started=started)
  weights = jax.device_get(trainer.eval_params(result.state))
  base_dir = artifacts.save_base(os.path.join(workdir, 'base'), weights['dit'],
                                 weights['text_encoder'], base_meta(config))
  if config.ship and jax.process_index() == 0:
    prefix = shipped_base.ship(base_dir, config, train_seconds=result.train_seconds,
                               final_loss=result.metrics.get('loss'))
    print(f'[pretrain] shipped the base as {prefix}.safetensors / .json', flush=True)
  return {'base_dir': base_dir, 'wall_s': result.train_seconds,
          'steps': config.train.num_steps, 'metrics': result.metrics}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The `pretrain` entry of `opd_jax.trainers`."""
  run_pretrain(config, workdir)


def _reuse_shipped(config, workdir: str) -> dict:
  """The shipped base as this run's output: saved under workdir/base like a trained one."""
  base, record = shipped_base.load()
  nets = build_networks(config.model, config.text_encoder, seed=config.seed)
  expected = {'dit': nnx.to_pure_dict(nets.dit_base),
              'text_encoder': nnx.to_pure_dict(nets.text_params)}
  got = {'dit': base.dit, 'text_encoder': base.text_encoder}
  shape = lambda tree: jax.tree.map(np.shape, tree)
  if shape(expected) != shape(got):
    raise InputError(f'{shipped_base.ASSET_PREFIX}.safetensors does not hold the parameters '
                     f'of config.model / config.text_encoder; remake it with {record["command"]}')
  base_dir = artifacts.save_base(os.path.join(workdir, 'base'), base.dit, base.text_encoder,
                                 base.meta)
  loss = record.get('final_loss')
  return {'base_dir': base_dir, 'wall_s': record['train_seconds'],
          'steps': config.train.num_steps, 'metrics': {} if loss is None else {'loss': loss},
          'shipped': True}
