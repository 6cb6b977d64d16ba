"""The closed-form per-step KL (Eq. 10–12) and its pathwise gradient (Eq. 15)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.objectives.per_step_kl import gaussian_kl, per_step_kl
from opd_jax.sampling.step import KernelSpec
from opd_jax.sampling.schedule import flow_match_sigmas

SIGMAS = jnp.asarray(flow_match_sigmas(10, 3.0))


def test_closed_form_matches_monte_carlo():
  """KL(N(μS, σ²I) ‖ N(μT, σ²I)) = E_S[log p_S − log p_T], estimated with 200k samples."""
  rng = np.random.default_rng(0)
  d, std = 6, 0.3
  mu_s, mu_t = rng.standard_normal(d), rng.standard_normal(d) * 0.5
  closed = float(gaussian_kl(jnp.asarray(mu_s[None]), jnp.asarray(mu_t[None]),
                             jnp.float32(std), jnp.float32(-0.1), deterministic=False,
                             reduction='sum', normaliser='sigma2_dt')[0])
  x = mu_s + std * rng.standard_normal((200_000, d))
  log_ratio = (-(x - mu_s)**2 + (x - mu_t)**2).sum(1) / (2 * std**2)
  est, err = log_ratio.mean(), log_ratio.std() / np.sqrt(len(log_ratio))
  assert abs(closed - est) < 4 * err, (closed, est, err)
  np.testing.assert_allclose(closed, ((mu_s - mu_t)**2).sum() / (2 * std**2), rtol=1e-5)


def test_normalisers_and_reductions():
  mu_s, mu_t = jnp.ones((2, 4)), jnp.zeros((2, 4))
  std, dt = jnp.float32(0.5), jnp.float32(-0.2)
  paper = gaussian_kl(mu_s, mu_t, std, dt, deterministic=False, reduction='sum')
  recipe = gaussian_kl(mu_s, mu_t, std, dt, deterministic=False, reduction='sum',
                       normaliser='sigma2')
  np.testing.assert_allclose(paper, 4 / (2 * 0.25), rtol=1e-6)
  np.testing.assert_allclose(recipe, 4 / (2 * 0.25 / 0.2), rtol=1e-6)
  mean = gaussian_kl(mu_s, mu_t, std, dt, deterministic=False, reduction='mean')
  np.testing.assert_allclose(mean, paper / 4, rtol=1e-6)
  ode = gaussian_kl(mu_s, mu_t, std, dt, deterministic=True, reduction='sum')
  np.testing.assert_allclose(ode, 0.5 * 4, rtol=1e-6)


def _linear_velocity(w):
  """A toy velocity field v = x·w + timestep-dependent bias, conditioning through 'pooled'."""
  def fn(x, timestep, cond):
    return (x * w[0] + jnp.tanh(w[1] * timestep[:, None, None, None] / 1000)
            + cond['pooled'][:, :, None, None] * w[2])
  return fn


def _setup(seed=0, batch=3):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  latents = jax.random.normal(k[0], (11, batch, 2, 2, 3))
  cond = {'pooled': jax.random.normal(k[1], (batch, 2))}
  uncond = {'pooled': jnp.zeros((batch, 2))}
  ws = jax.random.normal(k[2], (3,))
  wt = jax.random.normal(k[3], (3,))
  return latents, cond, uncond, ws, wt


SPECS = [KernelSpec('ode', 0.0), KernelSpec('flow_grpo', 0.7), KernelSpec('cps', 0.5),
         KernelSpec('dance_grpo', 0.3)]


@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.kernel)
def test_zero_loss_and_gradient_when_teacher_equals_student(spec):
  """Identical teacher: the KL is exactly 0 op by op; compiled, only rounding noise remains.

  Under jit/grad XLA fuses the differentiated student branch and the detached teacher branch
  differently, so their means can differ in the last float32 bits (observed ~1e-13 loss,
  ~1e-9 gradient). The reference scale is the gradient against a different teacher.
  """
  latents, cond, uncond, ws, wt = _setup()
  def loss(w, teacher_w):
    kl = per_step_kl(_linear_velocity(w), _linear_velocity(teacher_w), latents, SIGMAS,
                     jnp.arange(9), cond, uncond, student_cfg=4.5, teacher_cfg=4.5, spec=spec)
    return kl.sum()
  assert float(loss(ws, ws)) == 0.0
  value, grad = jax.jit(jax.value_and_grad(loss))(ws, ws)
  scale = float(jnp.abs(jax.grad(loss)(ws, wt)).max())
  assert abs(float(value)) < 1e-10
  assert float(jnp.abs(grad).max()) < 1e-7 * max(scale, 1.0)


def _independent_kl(w, wt, latents, cond, uncond, j, spec, cfg_s, cfg_t, normaliser):
  """Un-vmapped per-step KL written from Eq. 5–7/11 directly (no shared helpers)."""
  x = latents[j]
  t, t_next = SIGMAS[j], SIGMAS[j + 1]
  ts = jnp.full((x.shape[0],), t * 1000)
  def v(wv, cfg):
    f = _linear_velocity(wv)
    return f(x, ts, uncond) + cfg * (f(x, ts, cond) - f(x, ts, uncond))
  vs, vt = v(w, cfg_s), jax.lax.stop_gradient(v(wt, cfg_t))
  dt = t_next - t
  if spec.kernel == 'ode':
    return 0.5 * jnp.mean((dt * (vs - vt))**2, axis=(1, 2, 3))
  a = spec.noise_level
  sig = a * jnp.sqrt(t / (1 - jnp.where(t == 1, SIGMAS[1], t)))
  coef = (1 + sig**2 * (1 - t) / (2 * t)) * dt
  var = sig**2 * -dt if normaliser == 'sigma2_dt' else sig**2
  return jnp.mean((coef * (vs - vt))**2, axis=(1, 2, 3)) / (2 * var)


@pytest.mark.parametrize('spec', SPECS[:2], ids=lambda s: s.kernel)
@pytest.mark.parametrize('normaliser', ['sigma2_dt', 'sigma2'])
def test_pathwise_gradient_matches_independent_autodiff(spec, normaliser):
  latents, cond, uncond, ws, wt = _setup(1)
  steps = jnp.arange(9)
  def ours(w):
    return per_step_kl(_linear_velocity(w), _linear_velocity(wt), latents, SIGMAS, steps, cond,
                       uncond, student_cfg=4.5, teacher_cfg=1.0, spec=spec,
                       normaliser=normaliser).sum()
  def ref(w):
    return sum(_independent_kl(w, wt, latents, cond, uncond, j, spec, 4.5, 1.0,
                               normaliser).sum() for j in range(9))
  np.testing.assert_allclose(ours(ws), ref(ws), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(ours)(ws), jax.grad(ref)(ws), rtol=1e-4, atol=1e-6)


def test_pathwise_gradient_formula_eq15():
  """∇ KL = ((μS − μT)/σ̄²)·∇μS, checked for a single step with reduction='sum'."""
  latents, cond, uncond, ws, wt = _setup(2, batch=1)
  spec = KernelSpec('flow_grpo', 0.7)
  j = 3
  def kl(w):
    return per_step_kl(_linear_velocity(w), _linear_velocity(wt), latents, SIGMAS,
                       jnp.array([j]), cond, uncond, student_cfg=4.5, teacher_cfg=4.5,
                       spec=spec, reduction='sum', normaliser='sigma2_dt').sum()
  from opd_jax.sampling.step import transition_mean as kernel_mean
  def mu(w, wv):
    return kernel_mean(_linear_velocity(wv), latents[j], SIGMAS[j], SIGMAS[j + 1], SIGMAS[1],
                       cond, uncond, 4.5, spec)
  mu_s, std = mu(ws, ws)
  mu_t, _ = mu(ws, wt)
  jac = jax.jacobian(lambda w: mu(w, w)[0])(ws)        # [*mu.shape, 3]
  expected = jnp.tensordot((mu_s - mu_t) / std**2, jac, axes=mu_s.ndim)
  np.testing.assert_allclose(jax.grad(kl)(ws), expected, rtol=1e-4)
