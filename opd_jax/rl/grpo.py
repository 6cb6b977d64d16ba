"""Flow-GRPO and GRPO-Guard (spec §2, §7; teachers_rewards_eval.md §1): RL of a LoRA adapter on
SDE rollouts, one or several tasks.

Each iteration:
  1. draw prompts of the active task(s) (`prompts.active_tasks`: joint multi-task or cascade),
     each repeated G times (a group), and roll the current policy out with the Flow-GRPO SDE
     kernel at noise level a and CFG w, recording every step's log-prob — on the first
     rollout.sde_steps transitions, with Euler ODE steps after them (`sampler.mixed_rollout`;
     in pixel space last-step SDE noise would stay in the image);
  2. score the final images on the host with each prompt's own task reward and normalise
     advantages per prompt group (std per group, or per task: `advantages.group_advantages`);
  3. `inner_epochs` passes over the batch in `num_minibatches` shuffled minibatches, one AdamW
     step each, on the PPO clipped surrogate over the trained transitions j:

        ρ_j = exp(log π_θ(x_{j+1}|x_j) − log π_old(x_{j+1}|x_j))
        L   = mean_{j,b} max(−A_b·ρ_j, −A_b·clip(ρ_j, 1 − ε, 1 + ε)) + β·mean_{j,b} KL_j

     with KL_j the closed-form Gaussian KL to the reference (the base: LoRA disabled), the same
     mean-matching form as the OPD objective (`sampling.step.transition_mean`, `gaussian_kl`).
     log π_θ is recomputed at the recorded states with the same kernel and CFG, so on the first
     minibatch (θ = θ_old) the ratio is exactly 1 up to float rounding.

GRPO-Guard (`config.trainer = 'grpo_guard'`, `spec.ratio = 'guard'`) is the same loop with the
ratio normalised by the rollout's recorded transition means and the step's noise scale, and each
step's surrogate divided by |Δt_j| (`guard_ratio`, `step_surrogate`).

The whole inner loop (epochs × minibatches) is one jitted call with donated state; the steps
(iterations), checkpoints and resume are the shared RL trainer's (`opd_jax.rl.trainer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from opd_jax.errors import ConfigError
from opd_jax.models.policy import Policy
from opd_jax.objectives.per_step_kl import gaussian_kl
from opd_jax.parallel import sharding as shd
from opd_jax.rl import sampler
from opd_jax.rl.setup import RLSetup, jit_update, microbatched_value_and_grad, put_batch
from opd_jax.sampling.step import KernelSpec, transition_mean
from opd_jax.sampling.transitions import gaussian_log_prob, reduce_latent
from opd_jax.train.state import EMARule, TrainState


@dataclasses.dataclass(frozen=True)
class GRPOSpec:
  """Static settings of the update (closed over by jit; hashable)."""
  sigmas: tuple[float, ...]
  kernel: KernelSpec
  cfg_scale: float
  num_train_steps: int          # T: transitions 0..T−1 may be trained
  train_timesteps: int          # k <= T transitions drawn per minibatch (T: all)
  clip_range: float
  adv_clip: float
  kl_beta: float
  logprob_reduction: str
  kl_reduction: str
  kl_normaliser: str
  num_minibatches: int
  inner_epochs: int
  ema: EMARule
  ratio: str = 'flow_grpo'      # 'flow_grpo' | 'guard' (GRPO-Guard: config.trainer 'grpo_guard')
  guard_bias: str = 'batch'     # GRPO-Guard's bias: one scalar per step ('batch') or per sample
  num_microbatches: int = 1     # gradient accumulation inside a minibatch (its rows split n ways)


RATIOS = ('flow_grpo', 'guard')
GUARD_BIAS_SCOPES = ('batch', 'sample')


def grpo_spec(config, sigmas: np.ndarray) -> GRPOSpec:
  r, g, t = config.rollout, config.grpo, config.train
  # Transitions 0..T−1 of the stochastic window are trainable (Flow-GRPO: 9 of 10).
  num_train = int(sampler.sde_steps(r) * g.timestep_fraction)
  if num_train < 1:
    raise ConfigError('config.grpo.timestep_fraction: trains no transition')
  k = g.train_timesteps or num_train
  if not 1 <= k <= num_train:
    raise ConfigError(f'config.grpo.train_timesteps: {g.train_timesteps} not in '
                      f'[0, {num_train}]')
  if r.kernel == 'ode' or r.noise_level <= 0:
    raise ConfigError('config.rollout.kernel: Flow-GRPO needs a stochastic sampler (an SDE '
                      'kernel and rollout.noise_level > 0)')
  guard = config.trainer == 'grpo_guard'
  guard_bias = g.guard_bias if guard else 'batch'
  if guard_bias not in GUARD_BIAS_SCOPES:
    raise ConfigError(f'config.grpo.guard_bias: {guard_bias!r} is not one of '
                      f'{list(GUARD_BIAS_SCOPES)}')
  return GRPOSpec(tuple(float(s) for s in sigmas), KernelSpec(r.kernel, float(r.noise_level)),
                  float(r.cfg_scale), num_train, k, float(g.clip_range), float(g.adv_clip),
                  float(g.kl_beta), r.logprob_reduction, g.kl_reduction, g.kl_normaliser,
                  t.num_minibatches, t.inner_epochs, EMARule.from_config(config.ema),
                  'guard' if guard else 'flow_grpo', guard_bias, t.num_microbatches)


def guard_ratio(log_prob: jax.Array, old_log_prob: jax.Array, mean: jax.Array,
                old_mean: jax.Array, std: jax.Array, reduction: str,
                bias_scope: str = 'batch') -> tuple[jax.Array, jax.Array, jax.Array]:
  """GRPO-Guard's normalised importance ratio at one step (teachers_rewards_eval.md §1;
  yifan123/flow_grpo PR #175, scripts/train_sd3_GRPO_Guard.py, `config.rationorm`).

  With s the step's noise scale — upstream mean(√|Δt|)·mean(σ_t) of the Flow-GRPO kernel, i.e.
  its transition std σ̄_j, one value per step here since the batch shares t (for another SDE
  kernel, its own transition std, for which the identity below holds alike) —

      bias  = reduce((μ_θ − μ_old)²) / (2 s²)          reduce: the log-prob's latent reduction
      log ρ = (log π_θ − log π_old + bias) · s

  For x_{j+1} ~ N(μ_old, s²) the plain log-ratio is reduce(ε·δ)/s − reduce(δ²)/(2s²) (δ = μ_θ −
  μ_old): biased negative, exploding at low-noise steps. Adding the bias back and scaling by s
  leaves reduce(ε·δ), zero-mean with a spread independent of the schedule.

  bias_scope 'batch' averages the per-sample bias over the batch (one scalar: upstream's
  code as released, whose latent mean takes its axes from the [B] log-prob, an empty tuple,
  and so reduces everything); 'sample' keeps it per sample (the paper's form: the authors call
  the batch mean unintended in flow_grpo issue #244). Either way the batch mean of the
  normalised log-ratio is the same. The recorded μ_old are constants; the gradient flows through
  μ_θ in both terms.

  Args:
    log_prob, old_log_prob: [B] log π_θ(x_{j+1}|x_j) and the rollout's recorded value.
    mean, old_mean: [B, ...] μ_θ(x_j) and the rollout's recorded μ_old(x_j).
    std: scalar s.
    reduction: 'mean' | 'sum' over latent elements (rollout.logprob_reduction).

  Returns:
    (ratio [B], log ratio [B], bias [B]).
  """
  delta = mean.astype(jnp.float32) - jax.lax.stop_gradient(old_mean).astype(jnp.float32)
  bias = reduce_latent(jnp.square(delta), reduction) / (2 * jnp.square(std))
  if bias_scope == 'batch':
    bias = jnp.broadcast_to(jnp.mean(bias), bias.shape)
  elif bias_scope != 'sample':
    raise ValueError(f'unknown GRPO-Guard bias scope {bias_scope!r}')
  log_ratio = (log_prob - old_log_prob + bias) * std
  return jnp.exp(log_ratio), log_ratio, bias


def clipped_surrogate(ratio: jax.Array, adv: jax.Array, clip_range: float) -> jax.Array:
  """PPO's per-sample loss max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) (Flow-GRPO, spec §2)."""
  clipped = jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  return jnp.maximum(-adv * ratio, -adv * clipped)


def step_surrogate(spec: GRPOSpec, x_next: jax.Array, mean: jax.Array, std: jax.Array,
                   old_log_prob: jax.Array, old_mean: jax.Array | None, dt: jax.Array,
                   adv: jax.Array) -> dict[str, jax.Array]:
  """The policy-gradient term of one trained step j, per sample [B].

  Flow-GRPO: ρ = exp(log π_θ − log π_old), pg = PPO-clip(ρ, ε).
  GRPO-Guard: ρ = `guard_ratio`, pg = PPO-clip(ρ, ε) / |Δt_j| — the per-step gradient
  reweighting (upstream divides the step's loss by mean(√|Δt|)²).

  Args:
    x_next: [B, ...] the recorded x_{j+1}; mean, std: π_θ's transition at the recorded x_j.
    old_log_prob: [B] recorded log π_old(x_{j+1}|x_j); old_mean: [B, ...] recorded μ_old (guard).
    dt: t_{j+1} − t_j (negative); adv: [B] clipped advantages.

  Returns:
    {'pg', 'ratio', 'log_ratio', 'bias'} each [B] ('bias' is 0 for Flow-GRPO).
  """
  logp = gaussian_log_prob(x_next, mean, std, spec.logprob_reduction)
  if spec.ratio == 'guard':
    ratio, log_ratio, bias = guard_ratio(logp, old_log_prob, mean, old_mean, std,
                                         spec.logprob_reduction, spec.guard_bias)
    pg = clipped_surrogate(ratio, adv, spec.clip_range) / jnp.abs(dt)
  else:
    log_ratio = logp - old_log_prob
    ratio = jnp.exp(log_ratio)
    bias = jnp.zeros_like(log_ratio)
    pg = clipped_surrogate(ratio, adv, spec.clip_range)
  return {'pg': pg, 'ratio': ratio, 'log_ratio': log_ratio, 'bias': bias}


def grpo_terms(spec: GRPOSpec, policy: Policy, params: Any, frozen: dict, ref_adapter: Any,
               batch: dict, step_idx: jax.Array) -> dict[str, jax.Array]:
  """Per-transition surrogate terms at the recorded states, each [k, B].

  Args:
    params: the adapter being trained.
    frozen: {'base', 'negative'}.
    ref_adapter: the zero adapter (reference = base, LoRA disabled).
    batch: {'latents' [N+1, B, ...], 'log_probs' [N, B] (the rollout's), 'advantages' [B],
      'cond' (batch B); GRPO-Guard also 'means' [N, B, ...] (the rollout's transition means)}.
    step_idx: int [k] indices of the trained transitions.

  Returns:
    {'pg': clipped surrogate (÷|Δt_j| for GRPO-Guard), 'kl': KL to the reference (0 when
     kl_beta = 0), 'ratio', 'log_ratio', 'bias' (GRPO-Guard's; 0 for Flow-GRPO)}.
  """
  sig = jnp.asarray(spec.sigmas, jnp.float32)
  latents = jax.lax.stop_gradient(batch['latents'])
  cond = batch['cond']
  b = latents.shape[1]
  uncond = sampler.uncond_for(frozen, b, spec.cfg_scale)
  student = policy.student_velocity(params, frozen)
  reference = policy.velocity(frozen['base'], ref_adapter)
  adv = jnp.clip(batch['advantages'], -spec.adv_clip, spec.adv_clip)

  def one(j):
    x, t, t_next = latents[j], sig[j], sig[j + 1]
    mean, std = transition_mean(student, x, t, t_next, sig[1], cond, uncond, spec.cfg_scale,
                                spec.kernel)
    old_mean = batch['means'][j] if spec.ratio == 'guard' else None
    terms = step_surrogate(spec, latents[j + 1], mean, std, batch['log_probs'][j], old_mean,
                           t_next - t, adv)
    if spec.kl_beta > 0:
      mean_ref, _ = transition_mean(reference, x, t, t_next, sig[1], cond, uncond,
                                    spec.cfg_scale, spec.kernel)
      kl = gaussian_kl(mean, jax.lax.stop_gradient(mean_ref), std, t_next - t,
                       deterministic=False, reduction=spec.kl_reduction,
                       normaliser=spec.kl_normaliser)
    else:
      kl = jnp.zeros_like(terms['pg'])
    return {**terms, 'kl': kl}

  return jax.vmap(one)(step_idx)


def grpo_loss(spec: GRPOSpec, policy: Policy, params: Any, frozen: dict, ref_adapter: Any,
              batch: dict, step_idx: jax.Array) -> tuple[jax.Array, dict]:
  """mean(pg) + β·mean(KL) over the trained transitions and the minibatch."""
  terms = grpo_terms(spec, policy, params, frozen, ref_adapter, batch, step_idx)
  loss = jnp.mean(terms['pg']) + spec.kl_beta * jnp.mean(terms['kl'])
  return loss, terms


def _take(batch: dict, idx: jax.Array) -> dict:
  """Minibatch rows `idx` of a batch whose latents / log-probs (/ means) are time-major."""
  out = {'latents': jnp.take(batch['latents'], idx, axis=1),
         'log_probs': jnp.take(batch['log_probs'], idx, axis=1),
         'advantages': jnp.take(batch['advantages'], idx, axis=0),
         'cond': jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch['cond'])}
  if 'means' in batch:
    out['means'] = jnp.take(batch['means'], idx, axis=1)
  return out


def make_grpo_update(spec: GRPOSpec, policy: Policy, tx: optax.GradientTransformation):
  """(state, frozen, ref_adapter, batch, iteration) → (state, metrics): all inner updates."""

  def update(state: TrainState, frozen: dict, ref_adapter: Any, batch: dict,
             iteration: jax.Array):
    b = batch['advantages'].shape[0]
    mb = b // spec.num_minibatches
    key = jax.random.fold_in(jax.random.fold_in(state.rng, iteration), 1)
    k_perm, k_time = jax.random.split(key)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(k_perm, e), b))(
        jnp.arange(spec.inner_epochs))
    # The first minibatch of the first epoch keeps the rollout's order (its ratio is 1).
    perms = perms.at[0].set(jnp.arange(b))
    idx = perms.reshape(spec.inner_epochs * spec.num_minibatches, mb)

    def inner(state, xs):
      i, rows = xs
      times = jax.random.permutation(jax.random.fold_in(k_time, i), spec.num_train_steps)
      step_idx = jnp.sort(times[:spec.train_timesteps])
      with jax.named_scope('grpo_loss'):
        loss, terms, grads = microbatched_value_and_grad(
            lambda p, rows_j, j: grpo_loss(spec, policy, p, frozen, ref_adapter,
                                           _take(batch, rows_j), step_idx),
            state.params, rows, spec.num_microbatches)
      with jax.named_scope('update'):
        state, update_metrics = state.apply_gradients(grads, tx, spec.ema)
      ratio = terms['ratio']
      out = {'loss': loss, 'policy_loss': jnp.mean(terms['pg']), 'kl': jnp.mean(terms['kl']),
             'clipfrac': jnp.mean((jnp.abs(ratio - 1.0) > spec.clip_range).astype(jnp.float32)),
             'approx_kl': 0.5 * jnp.mean(jnp.square(terms['log_ratio'])),
             'ratio_max_dev': jnp.max(jnp.abs(ratio - 1.0)), **update_metrics}
      if spec.ratio == 'guard':
        out['guard_bias'] = jnp.mean(terms['bias'])
      return state, out

    num = spec.inner_epochs * spec.num_minibatches
    state, per = jax.lax.scan(inner, state, (jnp.arange(num), idx))
    metrics = {k: jnp.mean(v) for k, v in per.items()
               if k not in ('ratio_max_dev', 'finite', 'param_norm', 'ema_decay')}
    metrics['ratio_max_dev'] = jnp.max(per['ratio_max_dev'])
    metrics['param_norm'] = per['param_norm'][-1]
    metrics['finite'] = jnp.all(per['finite']) & jnp.all(jnp.isfinite(per['loss']))
    # θ = θ_old on the first minibatch: this measures how exactly log-probs are recomputed.
    metrics['first_ratio_max_dev'] = per['ratio_max_dev'][0]
    return state, metrics

  return update


extra_init = None   # Flow-GRPO keeps no state beyond the TrainState


@dataclasses.dataclass
class GRPO:
  """Flow-GRPO / GRPO-Guard as an algorithm of the RL trainer: samples with θ, updates with the
  surrogate."""
  spec: GRPOSpec
  setup: RLSetup
  update_fn: Any

  def sampler_params(self, state: TrainState) -> Any:
    return state.params           # rollouts use the current policy (θ_old = θ at sampling time)

  def update(self, state: TrainState, traj, cond, adv: np.ndarray, iteration: int):
    batch = {'latents': traj.latents, 'log_probs': traj.log_probs,
             'advantages': put_batch(self.setup.mesh, adv), 'cond': cond}
    if self.spec.ratio == 'guard':
      batch['means'] = traj.means     # μ_old, recorded at sampling time as upstream does
    return self.update_fn(state, self.setup.frozen, self.setup.zero_adapter, batch,
                          jnp.int32(iteration))


def build(config, setup: RLSetup, cond_example: dict) -> GRPO:
  """The jitted, sharded Flow-GRPO (or GRPO-Guard) update for `setup` (state donated)."""
  spec = grpo_spec(config, setup.sigmas)
  mesh = setup.mesh
  nd = len(setup.latent_shape)
  batch_sh = {'latents': shd.batch_sharding(mesh, nd + 2, 1),
              'log_probs': shd.batch_sharding(mesh, 2, 1),
              'advantages': shd.batch_sharding(mesh, 1),
              'cond': jax.tree.map(lambda x: shd.batch_sharding(mesh, np.ndim(x)), cond_example)}
  if spec.ratio == 'guard':
    batch_sh['means'] = shd.batch_sharding(mesh, nd + 2, 1)
  return GRPO(spec, setup, jit_update(setup, make_grpo_update(spec, setup.policy, setup.tx),
                                      batch_sh))
