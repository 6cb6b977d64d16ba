"""Stage 0 of the mini world: rectified-flow pretraining of the base DiT and its text encoder.

On (image, prompt) pairs of the `pretrain` TFDS split — a fraction of them deliberately wrong
for their prompt (the builder's corrupt_prob), so the base is decent but imperfect, like
SD3.5-M — the DiT and the text encoder are trained jointly with the flow-matching loss (spec §2):

    x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   loss = ‖v_θ(x_t, 1000·t, enc(prompt)) − v‖²

with t logit-normal (SD3) or uniform, and each prompt replaced by "" with probability
`prompt_dropout` so the model also learns the unconditional velocity that CFG needs.

`run_pretrain(config, workdir)` saves the base (EMA or raw weights, per config) with its text
encoder and config sections as an `artifacts.save_base` artifact under workdir/base; every later
stage starts from it. `config.ship` also writes it as the repo's shipped base, and
`config.reuse_shipped` returns that shipped base instead of training when it was made with the
same settings (opd_jax.mini_world.shipped_base). The update is one jitted function with donated
state and explicit shardings, like the OPD round.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from opd_jax.mini_world import latents as latent_codec
from opd_jax.mini_world import tfds_builder
from opd_jax.mini_world import tokenizer
from opd_jax.mini_world.networks import build_networks, check_latent_matches_model
from opd_jax.mini_world.text_encoder import encode_tokens
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from opd_jax.mini_world import artifacts
from opd_jax.mini_world import shipped_base
from opd_jax.train.metric_writer import MetricWriter, flatten_metrics
from opd_jax.train.state import TrainState, create_train_state, ema_update

TIMESTEP_SAMPLING = ('logit_normal', 'uniform')


class PretrainData:
  """The `pretrain` split in host memory, served in reshuffled epochs (deterministic in seed)."""

  def __init__(self, data_dir: str, dataset_config: str, unshuffle: int, batch_size: int,
               seed: int):
    source = tfds_builder.load_split(data_dir, tfds_builder.PRETRAIN_SPLIT, dataset_config)
    examples = [source[i] for i in range(len(source))]
    self.images = np.stack([e['image'] for e in examples])            # uint8 [N, S, S, 3]
    self.tokens = np.stack([e['tokens'] for e in examples]).astype(np.int32)
    self.unshuffle, self.batch_size, self.seed = unshuffle, batch_size, seed
    if batch_size > len(examples):
      raise ValueError(f'batch size {batch_size} exceeds the {len(examples)} pretraining pairs')
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


def make_pretrain_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, linear warmup and an optional cosine decay to 0."""
  if opt_cfg.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps,
                                            max(num_steps, opt_cfg.warmup_steps + 1))
  elif opt_cfg.schedule == 'constant':
    lr = optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps),
                               optax.constant_schedule(opt_cfg.lr)], [opt_cfg.warmup_steps])
  else:
    raise ValueError(f'config.optimizer.schedule: {opt_cfg.schedule!r} is not cosine/constant')
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.grad_clip),
      optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay))


def sample_timesteps(key: jax.Array, batch: int, method: str, logit_mean: float,
                     logit_std: float) -> jax.Array:
  """t ∈ (0, 1) [B]: logit-normal σ(m + s·z) (SD3's default) or uniform."""
  if method == 'logit_normal':
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
  if method == 'uniform':
    return jax.random.uniform(key, (batch,), minval=1e-4, maxval=1.0)
  raise ValueError(f'unknown timestep sampling {method!r}; choose one of {TIMESTEP_SAMPLING}')


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
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      new_step = state.step + 1
      ema, decay = ema_update(state.ema_params, params, new_step, config.ema.max_decay,
                              config.ema.every)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'ema_decay': decay}
    return state.replace(step=new_step, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return step


def validate_pretrain_config(config) -> None:
  check_latent_matches_model(config.model, config.latent)
  if config.pretrain.timestep_sampling not in TIMESTEP_SAMPLING:
    raise ValueError(f'config.pretrain.timestep_sampling: {config.pretrain.timestep_sampling!r}'
                     f' is not one of {TIMESTEP_SAMPLING}')
  if not 0 <= config.pretrain.prompt_dropout < 1:
    raise ValueError('config.pretrain.prompt_dropout must be in [0, 1)')
  if config.train.num_steps < 1:
    raise ValueError('config.train.num_steps must be >= 1')


def base_meta(config) -> dict:
  """The sections a later stage needs to rebuild the base's networks."""
  return {'model': config.model.to_dict(), 'text_encoder': config.text_encoder.to_dict(),
          'latent': config.latent.to_dict(), 'seed': config.seed, 'stage': 'pretrain',
          'weights': 'ema' if config.pretrain.save_ema else 'raw'}


def run_pretrain(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict:
  """Pretrains the base DiT + text encoder and saves them under workdir/base.

  Args:
    config: a `configs/mini/pretrain.py` config.
    workdir: output directory (metrics.jsonl, tensorboard/, base/).
    mesh: optional device mesh (default: from config.mesh.shape over all devices).

  Returns:
    {'base_dir': path of the saved base artifact, 'wall_s': seconds from start to saved,
     'steps': steps run, 'metrics': the last logged metrics}.
  """
  start = time.time()
  validate_pretrain_config(config)
  if config.reuse_shipped:
    reasons = shipped_base.mismatch(config)
    if not reasons:
      return _reuse_shipped(config, workdir)
    if jax.process_index() == 0:
      print('[pretrain] the shipped base was made with other settings, training a new one: '
            + '; '.join(reasons[:3]), flush=True)
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  if config.train.batch_size % batch_axis_size(mesh):
    raise ValueError(f'config.train.batch_size {config.train.batch_size} is not divisible by '
                     f'the {batch_axis_size(mesh)}-way batch split of the mesh')
  data = PretrainData(config.data.data_dir, config.data.dataset_config, config.latent.unshuffle,
                      config.train.batch_size, config.seed)
  nets = build_networks(config.model, config.text_encoder, seed=config.seed)
  params = {'dit': nnx.to_pure_dict(nets.dit_base),
            'text_encoder': nnx.to_pure_dict(nets.text_params)}
  param_sh = {'dit': shd.state_shardings(nets.dit_base, mesh),
              'text_encoder': shd.state_shardings(nets.text_params, mesh)}
  rep = shd.replicated(mesh)
  tx = make_pretrain_optimizer(config.optimizer, config.train.num_steps)
  abstract = jax.eval_shape(lambda: create_train_state(params, tx, config.seed))
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, param_sh,
                                 transform_non_params=lambda _: rep)
  state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh, ema_params=param_sh,
                        rng=rep)
  state = jax.jit(lambda p: create_train_state(p, tx, config.seed), out_shardings=state_sh)(params)
  del params
  batch_sh = {'latents': shd.batch_sharding(mesh, 4), 'tokens': shd.batch_sharding(mesh, 2)}
  step_fn = jax.jit(make_pretrain_step(config, nets.dit_graphdef, nets.text_graphdef, tx),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep),
                    donate_argnums=(0,))

  writer = MetricWriter(workdir)
  metrics: dict = {}
  num_steps = config.train.num_steps
  try:
    for step in tqdm(range(num_steps), desc='pretrain', mininterval=2.0,
                     disable=jax.process_index() != 0):
      batch = jax.device_put(data.batch(step), batch_sh)
      state, step_metrics = step_fn(state, batch)
      done = step + 1
      if done % config.train.log_every == 0 or done == num_steps:
        metrics = flatten_metrics(jax.device_get(step_metrics))
        if not math.isfinite(metrics['loss']):
          raise FloatingPointError(f'pretraining loss is {metrics["loss"]} at step {done}')
        metrics['wall_s'] = time.time() - start
        writer.write(done, metrics)
  finally:
    writer.close()
  weights = state.ema_params if config.pretrain.save_ema else state.params
  base_dir = artifacts.save_base(os.path.join(workdir, 'base'), weights['dit'],
                                 weights['text_encoder'], base_meta(config))
  wall = time.time() - start
  if config.ship and jax.process_index() == 0:
    prefix = shipped_base.ship(base_dir, config, train_seconds=wall,
                               final_loss=metrics.get('loss'))
    print(f'[pretrain] shipped the base as {prefix}.safetensors / .json', flush=True)
  return {'base_dir': base_dir, 'wall_s': wall, 'steps': num_steps, 'metrics': metrics}


def _reuse_shipped(config, workdir: str) -> dict:
  """The shipped base as this run's output: saved under workdir/base like a trained one."""
  base, record = shipped_base.load()
  nets = build_networks(config.model, config.text_encoder, seed=config.seed)
  expected = {'dit': nnx.to_pure_dict(nets.dit_base),
              'text_encoder': nnx.to_pure_dict(nets.text_params)}
  got = {'dit': base.dit, 'text_encoder': base.text_encoder}
  shape = lambda tree: jax.tree.map(np.shape, tree)
  if shape(expected) != shape(got):
    raise ValueError(f'{shipped_base.ASSET_PREFIX}.safetensors does not hold the parameters '
                     f'of config.model / config.text_encoder; remake it with {record["command"]}')
  base_dir = artifacts.save_base(os.path.join(workdir, 'base'), base.dit, base.text_encoder,
                                 base.meta)
  loss = record.get('final_loss')
  return {'base_dir': base_dir, 'wall_s': record['train_seconds'],
          'steps': config.train.num_steps, 'metrics': {} if loss is None else {'loss': loss},
          'shipped': True}
