"""One DiffusionOPD round as a single jitted, pure function (spec §1–§3, §5).

For each task m, in turn (`teachers.round_robin`: task m's prompts always meet teacher m, and
the teacher index is traced, so nothing recompiles):
  1. roll the student out with its own CFG, no gradient (`rollout`);
  2. at every trained state x_j, the task's teacher gives its mean with its own CFG, detached;
  3. the objective's per-step terms are differentiated w.r.t. the student parameters and the
     gradient is accumulated into one float32 buffer.
Two equivalent ways to do 1–3 (`RoundSpec.fused_vjp`): the reference two-pass form (a no-grad
rollout, then the per-step KL as a vmap over the trained timesteps, differentiated —
`task_loss_and_grad`), and the fused form (`fused_task_loss_and_grad`), which takes the student's
VJP during the rollout itself: the parameters are the same in both passes (one optimizer step per
round), so the rollout's forward can keep its residuals and serve the gradient, and the steps
after the last trained one are never run.
Task losses are averaged; the round ends with one AdamW step and the EMA rule
(`TrainState.apply_gradients`).
Micro-batches (per task) and chunks of timesteps are further `lax.scan`s that add into the same
buffer — no second copy of the optimizer state, unlike optax.MultiSteps.

    total loss = (1/M) Σ_m (1/B) Σ_b R_j KL_j(b),   R_j = Σ_j or mean_j over trained steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from opd_jax.models.policy import Policy
from opd_jax.objectives import get_objective
from opd_jax.objectives.per_step_kl import gaussian_kl
from opd_jax.opd.teachers import round_robin
from opd_jax.sampling.guidance import broadcast_uncond
from opd_jax.sampling.rollout import rollout, sample_keys, sample_noise
from opd_jax.sampling.step import KernelSpec, is_deterministic, sampler_step, transition_mean
from opd_jax.train.state import EMARule, TrainState


@dataclasses.dataclass(frozen=True)
class RoundSpec:
  """Everything static about a round (closed over by jit; hashable)."""
  policy: Policy
  sigmas: tuple[float, ...]
  latent_shape: tuple[int, ...]
  kernel: KernelSpec
  student_cfg: float
  num_train_steps: int              # the first T transitions are trained
  objective: str = 'analytic'
  reduction: str = 'mean'
  normaliser: str = 'recipe'
  time_reduction: str = 'mean'
  num_microbatches: int = 1
  timestep_chunks: int = 1
  ema: EMARule = EMARule()
  logprob_reduction: str = 'mean'
  clip_range: float = 1e-4          # PPO-style objectives only
  discount: float = 0.0
  fused_vjp: bool = False           # analytic objective only; see fused_task_loss_and_grad


def _split_microbatches(tree: Any, n: int) -> Any:
  """[B, ...] → [n, B/n, ...] taking every n-th sample, so each shard keeps its share."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def _sample_weight(spec: RoundSpec, batch: int) -> float:
  """Each sample's share of the task loss: 1/B, and 1/T when steps are averaged."""
  return 1.0 / batch / (spec.num_train_steps if spec.time_reduction == 'mean' else 1)


def task_loss_and_grad(spec: RoundSpec, params: Any, frozen: dict, cond: dict,
                       teacher: jax.Array, keys: jax.Array):
  """Rollout + teacher scoring + gradient for one micro-batch of one task.

  Returns (grad, kl [T, B]) with grad already scaled by this micro-batch's share of the
  task loss (1/B_mb per sample before micro-batch/task averaging).
  """
  policy = spec.policy
  batch = keys.shape[0]
  uncond = broadcast_uncond(frozen['negative'], batch)
  with jax.named_scope('rollout'):
    traj = rollout(policy.student_velocity(jax.lax.stop_gradient(params), frozen), cond, uncond,
                   keys, sigmas=np.asarray(spec.sigmas, np.float32),
                   latent_shape=spec.latent_shape, kernel=spec.kernel.kernel,
                   noise_level=spec.kernel.noise_level, cfg_scale=spec.student_cfg,
                   logprob_reduction=spec.logprob_reduction)
  teacher_velocity = policy.teacher_velocity(teacher, frozen, params)
  teacher_cfg = frozen['teacher_cfg'][teacher]
  objective = get_objective(spec.objective)
  steps = jnp.arange(spec.num_train_steps).reshape(spec.timestep_chunks, -1)
  weight = _sample_weight(spec, batch)

  def chunk(grad_acc, step_idx):
    def loss_fn(p):
      with jax.named_scope('teacher_and_loss'):
        terms, kl = objective(policy.student_velocity(p, frozen), teacher_velocity, traj,
                              step_idx, cond, uncond, student_cfg=spec.student_cfg,
                              teacher_cfg=teacher_cfg, spec=spec.kernel,
                              reduction=spec.reduction, normaliser=spec.normaliser,
                              clip_range=spec.clip_range, discount=spec.discount)
      return jnp.sum(terms) * weight, kl
    (_, kl), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(jnp.add, grad_acc, g), kl

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
  grad, kl = jax.lax.scan(chunk, zeros, steps)
  return grad, kl.reshape((spec.num_train_steps, batch))


def fused_task_loss_and_grad(spec: RoundSpec, params: Any, frozen: dict, cond: dict,
                             teacher: jax.Array, keys: jax.Array):
  """`task_loss_and_grad` for the analytic objective in one pass: the VJP taken at rollout time.

  A `lax.scan` over the T trained steps; step j: the student's transition from x_j with
  residuals kept (`jax.vjp`) → μ_S(x_j) and x_{j+1}; the teacher's mean at x_j (detached); the
  cotangent ∂KL_j/∂μ_S of the closed-form per-step KL (Eq. 11, or ½‖μ_S − μ_T‖² for the ODE,
  Eq. 12) — so the pathwise gradient (Eq. 15) is (μ_S − μ_T)/σ̄_j² · ∂μ_S/∂θ —; the backward pass;
  the result added to the float32 buffer; the residuals dropped. The states x_j are the same
  sample as the reference rollout's (same per-sample keys and step noise) and, as there, constants
  of the gradient. Steps after the last trained one are never run: nothing uses them.
  Returns (grad, kl [T, B]) scaled as `task_loss_and_grad`'s.
  """
  policy = spec.policy
  batch = keys.shape[0]
  uncond = broadcast_uncond(frozen['negative'], batch)
  sig = jnp.asarray(spec.sigmas, jnp.float32)
  trained = spec.num_train_steps
  x0, eps = sample_noise(keys, spec.latent_shape, len(spec.sigmas) - 1)
  teacher_velocity = policy.teacher_velocity(teacher, frozen, params)
  teacher_cfg = frozen['teacher_cfg'][teacher]
  deterministic = is_deterministic(spec.kernel)
  weight = _sample_weight(spec, batch)

  def step(carry, inputs):
    x, grad_acc = carry
    t, t_next, noise = inputs

    def student_transition(p):
      tr = sampler_step(policy.student_velocity(p, frozen), x, t, t_next, sig[1], cond, uncond,
                        spec.student_cfg, spec.kernel, noise)
      return tr.mean, tr

    with jax.named_scope('student_forward'):
      mu_s, backward, tr = jax.vjp(student_transition, params, has_aux=True)
    with jax.named_scope('teacher'):
      mu_t, _ = transition_mean(teacher_velocity, x, t, t_next, sig[1], cond, uncond,
                                teacher_cfg, spec.kernel)
    mu_t = jax.lax.stop_gradient(mu_t)

    def loss(mu):
      kl = gaussian_kl(mu, mu_t, tr.std, t_next - t, deterministic=deterministic,
                       reduction=spec.reduction, normaliser=spec.normaliser)
      return jnp.sum(kl) * weight, kl

    (_, kl), cotangent = jax.value_and_grad(loss, has_aux=True)(mu_s)
    with jax.named_scope('student_backward'):
      (g,) = backward(cotangent)
    return (jax.lax.stop_gradient(tr.next), jax.tree.map(jnp.add, grad_acc, g)), kl

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
  (_, grad), kl = jax.lax.scan(step, (x0, zeros),
                               (sig[:trained], sig[1:trained + 1], eps[:trained]))
  return grad, kl


def opd_round(spec: RoundSpec, tx: optax.GradientTransformation, state: TrainState,
              frozen: dict, batch: dict) -> tuple[TrainState, dict]:
  """One round: every task's student rollout, teacher scoring and gradient, then one update.

  Args:
    state: the TrainState (donated by the jitted caller).
    frozen: {'base', 'teachers' (stacked [K, ...]), 'teacher_cfg' [K], 'negative' (cond, B=1)}.
    batch: {'cond': conditioning with leading [M, B], 'teacher': int32 [M] teacher per task}.
  Returns:
    (new state, metrics) with metrics a flat dict of arrays.
  """
  num_tasks = batch['teacher'].shape[0]
  nmb = spec.num_microbatches
  loss_and_grad = fused_task_loss_and_grad if spec.fused_vjp else task_loss_and_grad

  def task_body(grad_acc, m, cond, teacher):
    global_batch = jax.tree.leaves(cond)[0].shape[0]
    keys = sample_keys(state.rng, state.step, m, global_batch)
    mb = _split_microbatches((cond, keys), nmb)

    def micro(acc, xs):
      cond_mb, keys_mb = xs
      g, kl = loss_and_grad(spec, state.params, frozen, cond_mb, teacher, keys_mb)
      return jax.tree.map(lambda a, b: a + b / (nmb * num_tasks), acc, g), kl

    grad_acc, kl = jax.lax.scan(micro, grad_acc, mb)     # kl [nmb, T, B/nmb]
    return grad_acc, jnp.moveaxis(kl, 0, 1).reshape(spec.num_train_steps, -1)

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.params)
  grads, kl = round_robin(task_body, zeros, batch['cond'], batch['teacher'])   # kl [M, T, B]
  with jax.named_scope('update'):
    new_state, update_metrics = state.apply_gradients(grads, tx, spec.ema)
  per_sample = (jnp.sum(kl, axis=1) if spec.time_reduction == 'sum' else jnp.mean(kl, axis=1))
  loss = jnp.mean(per_sample)
  metrics = {
      'loss': loss,
      'kl_per_task': jnp.mean(per_sample, axis=1),
      'kl_per_step': jnp.mean(kl, axis=(0, 2)),
      **update_metrics,
  }
  metrics['finite'] = metrics['finite'] & jnp.isfinite(loss)
  return new_state, metrics


def make_round_fn(spec: RoundSpec, tx: optax.GradientTransformation) -> Callable:
  """The un-jitted pure round function (state, frozen, batch) → (state, metrics)."""
  return lambda state, frozen, batch: opd_round(spec, tx, state, frozen, batch)
