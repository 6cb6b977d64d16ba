"""Shared pieces of the RL trainers that make the teachers (Flow-GRPO, DiffusionNFT).

Both trainers fine-tune a LoRA adapter on the frozen pretrained base (spec §1, §5) and share:

  * `build_rl`: networks rebuilt from the base artifact's meta, the `Policy`, the frozen pytree
    {'base', 'negative'} and the sharded `TrainState` of the adapter (+ EMA);
  * the task schedule: `config.data.tasks` with `config.schedule.mode` 'joint' (every batch draws
    prompts from every task: multi-task RL over the union of prompt sets) or 'cascade' (tasks one
    after another, an equal share of the iterations each). One task is 'joint' over one set;
  * `RLPrompts`: per-task prompt sets from TFDS, encoded once, drawn in reshuffled epochs, each
    prompt repeated `group_size` times (a GRPO group);
  * a jitted sampler (`make_sample_fn`) over the shared `rollout`;
  * host-side rewards (`compute_rewards`, every sample scored by its own task's reward) and
    group-normalised advantages (`group_advantages`);
  * the iteration loop itself (`run_iterations`: sample → reward → advantage → update → log);
  * saving the trained adapter as a teacher artifact (`save_teacher`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from opd_jax.mini_world import conditioning
from opd_jax.mini_world import latents as latent_codec
from opd_jax.models.lora import zeros_like_adapter
from opd_jax.mini_world.networks import Networks, build_networks
from opd_jax.models.policy import Policy
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import batch_axis_size
from opd_jax.rewards import get_reward
from opd_jax.sampling.guidance import broadcast_uncond
from opd_jax.sampling.rollout import Trajectory, rollout
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.mini_world import artifacts
from opd_jax.train.metric_writer import MetricWriter, flatten_metrics
from opd_jax.opd.round import sample_keys
from opd_jax.train.probe import Probe, StageClock, maybe_probe
from opd_jax.train.state import TrainState, make_optimizer, sharded_train_state

SCHEDULE_MODES = ('joint', 'cascade')
STD_SCOPES = ('group', 'task')


# --- task schedule -----------------------------------------------------------------------------
def active_tasks(mode: str, num_tasks: int, step: int, num_steps: int) -> tuple[int, ...]:
  """Indices of the tasks whose prompts iteration `step` draws.

  Args:
    mode: 'joint' (all tasks every iteration) or 'cascade' (task k for iterations
      [k·S/M, (k+1)·S/M), in config order).
    num_tasks: M.
    step: iteration index.
    num_steps: total iterations S.
  """
  if mode == 'joint':
    return tuple(range(num_tasks))
  if mode == 'cascade':
    return (min(step * num_tasks // max(num_steps, 1), num_tasks - 1),)
  raise ValueError(f'config.schedule.mode: {mode!r} is not one of {SCHEDULE_MODES}')


# --- prompts -----------------------------------------------------------------------------------
@dataclasses.dataclass
class RLBatch:
  """One iteration's prompts, each repeated group_size times (B = prompts × group_size)."""
  prompts: list[str]          # [B]
  task: np.ndarray            # int32 [B], index into config.data.tasks
  group: np.ndarray           # int32 [B], the prompt's group id within the batch
  cond: dict[str, np.ndarray]  # conditioning with leading axis B


class RLPrompts:
  """Per-task prompt sets drawn in deterministic reshuffled epochs (position = iteration)."""

  def __init__(self, prompt_sets: Sequence[conditioning.PromptSet], prompts_per_step: int,
               group_size: int, seed: int):
    self.sets = list(prompt_sets)
    self.prompts_per_step, self.group_size, self.seed = prompts_per_step, group_size, seed
    self._drawn = [0] * len(self.sets)   # prompts drawn so far per task

  def _indices(self, task: int, n: int) -> np.ndarray:
    size = len(self.sets[task])
    flat = self._drawn[task] + np.arange(n)
    self._drawn[task] += n
    epochs, offsets = np.divmod(flat, size)
    orders = {e: np.random.default_rng([self.seed, task, int(e)]).permutation(size)
              for e in np.unique(epochs)}
    return np.array([orders[e][o] for e, o in zip(epochs, offsets)])

  def next(self, tasks: Sequence[int]) -> RLBatch:
    """Draws prompts_per_step prompts split evenly over `tasks` and repeats each G times."""
    if self.prompts_per_step % len(tasks):
      raise ValueError(f'prompts_per_step {self.prompts_per_step} is not divisible by the '
                       f'{len(tasks)} active tasks')
    per_task = self.prompts_per_step // len(tasks)
    prompts, task_ids, conds = [], [], []
    for k in tasks:
      p, c = self.sets[k].take(self._indices(k, per_task))
      prompts += p
      task_ids += [k] * per_task
      conds.append(c)
    cond = jax.tree.map(lambda *xs: np.repeat(np.concatenate(xs), self.group_size, axis=0),
                        *conds)
    g = self.group_size
    return RLBatch([p for p in prompts for _ in range(g)],
                   np.repeat(np.asarray(task_ids, np.int32), g),
                   np.repeat(np.arange(len(prompts), dtype=np.int32), g), cond)

  def get_position(self) -> dict:
    return {'drawn': list(self._drawn)}

  def set_position(self, position: dict) -> None:
    self._drawn = [int(x) for x in position['drawn']]


# --- rewards and advantages --------------------------------------------------------------------
def compute_rewards(images: np.ndarray, prompts: Sequence[str], task: np.ndarray,
                    task_names: Sequence[str]) -> np.ndarray:
  """float32 [B]: every sample scored by its own task's reward (`get_reward(task name)`)."""
  out = np.zeros(len(prompts), np.float32)
  for k in np.unique(task):
    sel = np.flatnonzero(task == k)
    out[sel] = get_reward(task_names[k])(images[sel], [prompts[i] for i in sel])
  return out


def group_advantages(rewards: np.ndarray, group: np.ndarray, task: np.ndarray,
                     std_scope: str = 'group', eps: float = 1e-4) -> np.ndarray:
  """Per-prompt group-normalised advantages (Flow-GRPO), float32 [B].

  A_i = (r_i − mean of i's group) / (std + eps), with std over i's group ('group') or over
  every sample of i's task in the batch ('task': Flow-GRPO's global std, taken per task so a
  multi-task batch never mixes reward scales).
  """
  rewards = np.asarray(rewards, np.float64)
  adv = np.zeros_like(rewards)
  for g in np.unique(group):
    sel = group == g
    adv[sel] = rewards[sel] - rewards[sel].mean()
  if std_scope == 'group':
    for g in np.unique(group):
      sel = group == g
      adv[sel] /= rewards[sel].std() + eps
  elif std_scope == 'task':
    for k in np.unique(task):
      sel = task == k
      adv[sel] /= rewards[sel].std() + eps
  else:
    raise ValueError(f'config.advantage.std_scope: {std_scope!r} is not one of {STD_SCOPES}')
  return adv.astype(np.float32)


# --- model, state, sampler ---------------------------------------------------------------------
@dataclasses.dataclass
class RLSetup:
  nets: Networks
  policy: Policy
  frozen: dict                 # {'base', 'negative'}: never in the optimizer or the checkpoint
  frozen_shardings: dict
  tx: optax.GradientTransformation
  state_shardings: TrainState
  init_state: Any              # () → TrainState of the fresh adapter, already sharded
  zero_adapter: Any            # the adapter with B = 0: the reference (LoRA disabled)
  sigmas: np.ndarray
  latent_shape: tuple[int, int, int]
  unshuffle: int
  mesh: Mesh


def build_rl(config, mesh: Mesh, base: artifacts.BaseModel) -> RLSetup:
  """Networks from the base meta with LoRA slots, frozen pytree and adapter train state."""
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
  tx = make_optimizer(config.optimizer)
  init_state, state_sh, _ = sharded_train_state(adapter, adapter_sh, tx, config.seed, rep)
  m = base.model_config
  r = config.rollout
  return RLSetup(nets, policy, frozen, frozen_sh, tx, state_sh, init_state,
                 jax.device_put(zeros_like_adapter(adapter), adapter_sh),
                 flow_match_sigmas(r.num_steps, r.shift),
                 (m.latent_size, m.latent_size, m.latent_channels),
                 base.latent_config.unshuffle, mesh)


def uncond_for(frozen: dict, batch: int, cfg_scale: float):
  """The CFG negative broadcast to the batch, or None for the CFG-free w = 1."""
  return None if cfg_scale == 1.0 else broadcast_uncond(frozen['negative'], batch)


def sde_steps(rollout_cfg) -> int:
  """How many leading transitions use rollout.kernel (the rest are Euler ODE steps)."""
  n = rollout_cfg.num_steps
  k = rollout_cfg.sde_steps or n
  if not 1 <= k <= n:
    raise ValueError(f'config.rollout.sde_steps {rollout_cfg.sde_steps} not in [0, {n}]')
  return k


def mixed_rollout(velocity_fn, cond, uncond, keys, *, sigmas: np.ndarray, num_sde: int,
                  latent_shape, kernel: str, noise_level: float, cfg_scale: float,
                  logprob_reduction: str) -> Trajectory:
  """`rollout` with `kernel` on transitions [0, num_sde) and the Euler ODE after them.

  An SDE window at the start of the chain (as in Flow-GRPO-Fast / MixGRPO) keeps exploration
  where the image's layout is decided while the last steps land deterministically: in pixel
  space the SDE's last-step noise would otherwise stay visible in the image (there is no VAE
  decoder to smooth it) and dominate smoothness-sensitive rewards. Both parts are the shared
  `rollout`; the ODE part starts from the SDE part's last state.
  """
  n = len(sigmas) - 1
  common_args = dict(latent_shape=latent_shape, cfg_scale=cfg_scale,
                     logprob_reduction=logprob_reduction)
  head = rollout(velocity_fn, cond, uncond, keys, sigmas=sigmas[:num_sde + 1], kernel=kernel,
                 noise_level=noise_level, **common_args)
  if num_sde == n:
    return head._replace(sigmas=jnp.asarray(sigmas, jnp.float32))
  tail = rollout(velocity_fn, cond, uncond, keys, sigmas=sigmas[num_sde:], kernel='ode',
                 x_init=head.latents[-1], **common_args)
  cat = lambda a, b: jnp.concatenate([a, b], axis=0)
  return Trajectory(latents=cat(head.latents, tail.latents[1:]),
                    sigmas=jnp.asarray(sigmas, jnp.float32), means=cat(head.means, tail.means),
                    stds=cat(head.stds, tail.stds), noise=cat(head.noise, tail.noise),
                    log_probs=cat(head.log_probs, tail.log_probs))


def make_sample_fn(setup: RLSetup, rollout_cfg):
  """Un-jitted (adapter, frozen, cond, rng, iteration) → (Trajectory, images [B, S, S, 3]).

  The sampler is config.rollout's kernel / noise level / CFG on its first `sde_steps`
  transitions and the Euler ODE after them; per-sample keys come from (rng, iteration, sample
  index), so a sample does not depend on the device count.
  """
  policy, r = setup.policy, rollout_cfg
  cfg = float(r.cfg_scale)
  num_sde = sde_steps(r)

  def sample(adapter, frozen, cond, rng, iteration):
    batch = jax.tree.leaves(cond)[0].shape[0]
    keys = sample_keys(rng, iteration, jnp.int32(0), batch)
    with jax.named_scope('rollout'):
      traj = mixed_rollout(policy.student_velocity(adapter, frozen), cond,
                           uncond_for(frozen, batch, cfg), keys, sigmas=setup.sigmas,
                           num_sde=num_sde, latent_shape=setup.latent_shape, kernel=r.kernel,
                           noise_level=r.noise_level, cfg_scale=cfg,
                           logprob_reduction=r.logprob_reduction)
    return traj, latent_codec.decode(traj.latents[-1], setup.unshuffle)

  return sample


def put_batch(mesh: Mesh, tree: Any, batch_axis: int = 0) -> Any:
  """Host arrays → global device arrays split over the mesh's batch axes."""
  def put(x):
    x = np.asarray(x)
    return jax.device_put(x, shd.batch_sharding(mesh, x.ndim, batch_axis))
  return jax.tree.map(put, tree)


def check_batch(config, mesh: Mesh) -> int:
  """B = prompts_per_step × group_size; it and its minibatches must split over the mesh."""
  d = config.data
  b = d.prompts_per_step * d.group_size
  n = batch_axis_size(mesh)
  if b % config.train.num_minibatches:
    raise ValueError(f'batch {b} (data.prompts_per_step × data.group_size) is not divisible by '
                     f'train.num_minibatches={config.train.num_minibatches}')
  if (b // config.train.num_minibatches) % n:
    raise ValueError(f'minibatch {b // config.train.num_minibatches} is not divisible by the '
                     f'{n}-way batch split of the mesh')
  if config.schedule.mode not in SCHEDULE_MODES:
    raise ValueError(f'config.schedule.mode: {config.schedule.mode!r} is not one of '
                     f'{SCHEDULE_MODES}')
  if config.schedule.mode == 'joint' and d.prompts_per_step % len(d.tasks):
    raise ValueError(f'data.prompts_per_step {d.prompts_per_step} is not divisible by the '
                     f'{len(d.tasks)} tasks of a joint batch')
  return b


def load_rl_prompts(config, base: artifacts.BaseModel, nets: Networks) -> RLPrompts:
  d = config.data
  sets = [conditioning.load_prompt_set(d.data_dir, task, 'train', nets.text_graphdef,
                                       base.text_encoder, d.dataset_config,
                                       d.max_prompts or None) for task in d.tasks]
  return RLPrompts(sets, d.prompts_per_step, d.group_size, config.seed)


def saved_params(state: TrainState, config) -> Any:
  """The weights a stage saves and evaluates: the EMA if config.ema.use_ema."""
  return state.ema_params if config.ema.use_ema else state.params


def save_teacher(directory: str, state: TrainState, config, stage: str,
                 cfg_scale: float) -> str:
  """Saves the adapter (EMA weights if config.ema.use_ema) as a teacher artifact."""
  params = saved_params(state, config)
  meta = {'stage': stage, 'tasks': list(config.data.tasks), 'lora_rank': config.lora.rank,
          'lora_alpha': config.lora.alpha, 'cfg_scale': float(cfg_scale),
          'schedule': config.schedule.mode, 'weights': 'ema' if config.ema.use_ema else 'raw',
          'steps': int(jax.device_get(state.step))}
  return artifacts.save_adapter(directory, params, meta)


def jit_sampler(setup: RLSetup, rollout_cfg, cond_example: dict):
  """`make_sample_fn` jitted with explicit shardings (batch split over the mesh)."""
  mesh = setup.mesh
  rep = shd.replicated(mesh)
  nd = len(setup.latent_shape)
  on_b = lambda n: shd.batch_sharding(mesh, n, 1)
  traj_sh = Trajectory(latents=on_b(nd + 2), sigmas=rep, means=on_b(nd + 2), stds=rep,
                       noise=on_b(nd + 2), log_probs=on_b(2))
  cond_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)), cond_example)
  return jax.jit(make_sample_fn(setup, rollout_cfg),
                 in_shardings=(setup.state_shardings.params, setup.frozen_shardings, cond_sh,
                               rep, rep),
                 out_shardings=(traj_sh, shd.batch_sharding(mesh, 4)))


# (carry, traj, cond, advantages [B] host, iteration) → (carry, device metrics)
UpdateFn = Callable[[Any, Trajectory, dict, np.ndarray, int], tuple[Any, dict]]


def run_iterations(config, workdir: str, setup: RLSetup, prompts: RLPrompts, *, name: str,
                   carry: Any, sampler_params: Callable[[Any], Any], rng: jax.Array,
                   update: UpdateFn, start: float, eval_params: Callable[[Any], Any] | None = None,
                   probe: Probe | None = None) -> tuple[Any, list[dict], dict]:
  """The RL loop shared by Flow-GRPO and DiffusionNFT.

  Each iteration draws the active tasks' prompts, samples with `sampler_params(carry)`, scores
  every image with its task's reward on the host, normalises advantages per group and hands
  them to the algorithm's `update`. Metrics are read back only on log iterations.

  `probe` (optional) evaluates `eval_params(carry)` off the clock (see `opd_jax.train.probe`).

  Returns:
    (final carry, per-iteration mean reward per task (NaN where inactive), last metrics).
  """
  tasks = list(config.data.tasks)
  sample_fn = jit_sampler(setup, config.rollout, prompts.sets[0].cond)
  writer = MetricWriter(workdir)
  history, metrics = [], {}
  num_steps = config.train.num_steps
  clock = StageClock(start)
  try:
    maybe_probe(probe, 0, num_steps, clock, lambda: eval_params(carry))
    for it in tqdm(range(num_steps), desc=name, disable=jax.process_index() != 0):
      active = active_tasks(config.schedule.mode, len(tasks), it, num_steps)
      rb = prompts.next(active)
      cond = put_batch(setup.mesh, rb.cond)
      traj, images = sample_fn(sampler_params(carry), setup.frozen, cond, rng, jnp.int32(it))
      rewards = compute_rewards(np.asarray(images), rb.prompts, rb.task, tasks)
      adv = group_advantages(rewards, rb.group, rb.task, config.advantage.std_scope)
      carry, step_metrics = update(carry, traj, cond, adv, it)
      per_task = {t: float(rewards[rb.task == k].mean()) if np.any(rb.task == k) else math.nan
                  for k, t in enumerate(tasks)}
      history.append(per_task)
      done = it + 1
      if done % config.train.log_every == 0 or done == num_steps:
        metrics = flatten_metrics(jax.device_get(step_metrics))
        if not math.isfinite(metrics['loss']):
          raise FloatingPointError(f'{name} loss is {metrics["loss"]} at iteration {done}')
        metrics.update({f'reward/{t}': v for t, v in per_task.items() if math.isfinite(v)})
        metrics['reward_std'] = float(rewards.std())
        metrics['wall_s'] = time.time() - start
        metrics['train_seconds'] = clock.train_seconds()
        writer.write(done, metrics)
      maybe_probe(probe, done, num_steps, clock, lambda: eval_params(carry))
  finally:
    writer.close()
  return carry, history, metrics
