"""Fidelity of the OPD round to the method: an independent rebuild of one round from primitives.

The round (`opd_jax.opd.round.opd_round`, jitted by `build_opd`) is compared with a reference
written here from the formulas of spec §1–§3, sharing with the library only the network
(`Policy` velocities), the student rollout (`rollout`, `sample_keys`) and the one-step kernels of
`opd_jax.sampling.transitions` — never `per_step_kl` or `transition_mean`:

  * for task m, the student rolls out with its own CFG from the keys of stream m;
  * at each of the FIRST T = int(N·timestep_fraction) states x_j, teacher m (its adapter, its
    own CFG) gives μ_T, the student gives μ_S, and the per-step KL is ½·R‖μ_S − μ_T‖² for the
    ODE (Eq. 12) or R‖μ_S − μ_T‖²/(2σ²) for an SDE (Eq. 11), R the latent reduction and σ² the
    configured normaliser.

This catches a round that scores every task with one teacher, gives the teacher the student's
CFG or trains the last T steps. Further tests pin the routing of tasks to teachers, show that
the first optimizer step is a descent step of the round's objective, and check the gradient
contract of `per_step_kl` (pathwise, teacher mean detached) where student and teacher share
their weights — the one case in which a missing stop-gradient changes the gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.data.prompt_source import RandomEmbeddingPrompts
from opd_jax.errors import ConfigError
from opd_jax.models.registry import build_model
from opd_jax.objectives.per_step_kl import per_step_kl
from opd_jax.opd.setup import build_opd, device_batch
from opd_jax.opd.teachers import round_robin, teacher_index
from opd_jax.sampling import transitions
from opd_jax.sampling.rollout import rollout, sample_keys
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.sampling.step import KernelSpec

from opd_testing import mesh_of, tiny_config

BATCH = 4                       # prompts per task
TEACHER_CFG = (1.0, 2.5, 4.0)   # distinct per teacher, all different from the student's 4.5
STUDENT_CFG = 4.5
TEACHER_SCALE = 0.1             # teachers' means differ clearly, KLs stay O(0.01)


def _config(**overrides):
  tasks = ('composition', 'text', 'aesthetics')
  kv = {'data.tasks': tasks, 'rollout.cfg_scale': STUDENT_CFG,
        # A tiny step with no decoupled weight decay: the descent test's first-order argument.
        'optimizer.lr': 3e-4, 'optimizer.weight_decay': 0.0}
  kv.update({f'teachers.tasks.{t}.cfg_scale': s for t, s in zip(tasks, TEACHER_CFG)})
  kv.update(overrides)
  return tiny_config(**kv)


def _base_and_teachers(config):
  """A perturbed seeded base and seeded stand-in teacher adapters (host pytrees).

  The seeded base has adaLN-Zero output layers (velocity ≡ 0): it is perturbed so the student's
  velocity, and hence its rollout and its CFG, depend on x, t and the prompt. Teachers are
  Gaussian adapters (A and B, std TEACHER_SCALE) like build_opd's stand-ins, drawn here so the
  three are distinct by construction. The init runs under one jit and the noise on the host:
  an eager init compiles once per op and leaf shape (~10 s here).
  """
  def init():
    _, base, lora = build_model(config.model, seed=config.seed, lora_rank=config.lora.rank,
                                lora_alpha=config.lora.alpha, lora_init=config.lora.init)
    return nnx.to_pure_dict(base), nnx.to_pure_dict(lora)
  base, lora = jax.device_get(jax.jit(init)())
  rng = np.random.default_rng(7)
  noise = lambda x, scale: scale * rng.standard_normal(x.shape, np.float32)
  base = jax.tree.map(lambda x: x + noise(x, 0.05), base)
  teachers = [jax.tree.map(lambda x: noise(x, TEACHER_SCALE), lora) for _ in config.data.tasks]
  return base, teachers


class Built:
  """One jitted round plus the inputs it was run on (a fresh state per call: it is donated)."""

  def __init__(self, config, base, teachers):
    self.config, self.base, self.teachers = config, base, teachers
    self.source = RandomEmbeddingPrompts(
        len(config.data.tasks), config.data.num_prompts, config.data.context_length,
        config.model.context_dim, config.model.pooled_dim, BATCH, seed=config.seed)
    self.mesh = mesh_of(1)
    self.setup = build_opd(config, self.mesh, self.source.negative(), base_params=base,
                           teachers=teachers)
    self.frozen = self.setup.frozen
    self.cond = self.source.next_batch()          # host [M, B, ...]
    state = jax.device_get(self.setup.init_state())
    self.params0, self.rng0, self.step0 = state.params, state.rng, state.step

  def run(self, cond=None, teacher=None, frozen=None):
    """One jitted round from the initial state; returns (new state, metrics) on the host."""
    cond = self.cond if cond is None else cond
    teacher = self.setup.teacher_index if teacher is None else teacher
    frozen = self.frozen if frozen is None else frozen
    state, metrics = self.setup.round_fn(self.setup.init_state(), frozen,
                                         device_batch(self.mesh, cond, teacher))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope='module')
def ode():
  config = _config()
  return Built(config, *_base_and_teachers(config))


@pytest.fixture(scope='module')
def sde(ode):
  """The Flow-GRPO SDE (a = 0.7) with the paper's conventions, on the same base and teachers."""
  config = _config(**{'rollout.kernel': 'flow_grpo', 'rollout.noise_level': 0.7,
                      'objective.kl_normaliser': 'sigma2_dt', 'objective.kl_reduction': 'sum'})
  return Built(config, base=ode.base, teachers=ode.teachers)


# ----------------------------------------------------------------------------------------------
# The reference, written from the formulas.


def _cfg_velocity(velocity, x, t, cond, uncond, scale):
  """v_u + w·(v_c − v_u) at timestep 1000·t, conditional and unconditional as separate calls."""
  timestep = jnp.full((x.shape[0],), 1000.0 * t, jnp.float32)
  v_c = velocity(x, timestep, cond).astype(jnp.float32)
  v_u = velocity(x, timestep, uncond).astype(jnp.float32)
  return v_u + scale * (v_c - v_u)


def _num_trained(config):
  return int(config.rollout.num_steps * config.objective.timestep_fraction)


def _reference_task_kl(built, rollout_params, params, m, cond, adapter, teacher_cfg, steps):
  """KL_j [len(steps), B] of task m, the student (`params`) against one teacher (`adapter`,
  `teacher_cfg`), for the transitions j in `steps` of the rollout made with `rollout_params`."""
  c, policy, frozen = built.config, built.setup.spec.policy, built.frozen
  sig = flow_match_sigmas(c.rollout.num_steps, c.rollout.shift)     # host float32 [N+1]
  uncond = jax.tree.map(lambda x: jnp.broadcast_to(x, (BATCH,) + x.shape[1:]),
                        built.source.negative())
  # Task m's student trajectory: keys of (state rng, step 0, stream m), the student's own CFG.
  keys = sample_keys(built.rng0, built.step0, m, BATCH)
  traj = rollout(policy.student_velocity(rollout_params, frozen), cond, uncond, keys,
                 sigmas=sig, latent_shape=(c.model.latent_size, c.model.latent_size,
                                           c.model.latent_channels),
                 kernel=c.rollout.kernel, noise_level=c.rollout.noise_level,
                 cfg_scale=c.rollout.cfg_scale)
  kernel = transitions.get_kernel(c.rollout.kernel)
  student = policy.student_velocity(params, frozen)
  teacher = policy.velocity(frozen['base'], adapter)
  reduce = jnp.mean if c.objective.kl_reduction == 'mean' else jnp.sum
  sig = jnp.asarray(sig)

  def one(j):
    x, t, t_next = traj.latents[j], sig[j], sig[j + 1]
    def transition(velocity, scale):
      return kernel(x, _cfg_velocity(velocity, x, t, cond, uncond, scale), t, t_next,
                    jnp.zeros_like(x), noise_level=c.rollout.noise_level, sigma_1=sig[1])
    tr_s = transition(student, c.rollout.cfg_scale)
    tr_t = transition(teacher, teacher_cfg)
    sq = reduce(jnp.square(tr_s.mean - tr_t.mean), axis=(1, 2, 3))
    if c.rollout.kernel == 'ode':
      return 0.5 * sq                                            # Eq. 12
    var = tr_s.std**2                                            # σ̄² = σ_t²|Δt| (paper)
    if c.objective.kl_normaliser == 'sigma2':
      var = var / jnp.abs(t_next - t)                            # σ_t² (released recipe)
    return sq / (2 * var)                                        # Eq. 11

  return jax.lax.map(one, steps)


@functools.lru_cache(maxsize=None)
def _jitted_reference(built):
  return jax.jit(functools.partial(_reference_task_kl, built))


def _reference(built, cond, m, slot, *, params=None, steps=None, teacher_cfg=None):
  """KL [T, B] of task m's rollout scored by the teacher in `slot` (default: its own CFG) at
  the first T transitions (default) or at `steps`."""
  params = built.params0 if params is None else params
  steps = np.arange(_num_trained(built.config)) if steps is None else np.asarray(steps)
  if teacher_cfg is None:
    # Slot k holds the teacher declared for data.tasks[k] (the order they were passed in).
    teacher_cfg = built.config.teachers.tasks[built.config.data.tasks[slot]].cfg_scale
  task_cond = jax.tree.map(lambda x: jnp.asarray(x[m]), cond)
  return np.asarray(_jitted_reference(built)(built.params0, params, m, task_cond,
                                             built.teachers[slot], jnp.float32(teacher_cfg),
                                             jnp.asarray(steps, jnp.int32)))


def _per_task(config, kl):
  """[T, B] → the task loss: the configured reduction over steps, then the batch mean."""
  per_sample = kl.sum(0) if config.objective.time_reduction == 'sum' else kl.mean(0)
  return float(per_sample.mean())


# ----------------------------------------------------------------------------------------------
# 1a. One round rebuilt by hand.


@pytest.mark.parametrize('which', ['ode', 'sde'])
def test_round_metrics_equal_the_reference_rebuild(which, request):
  """kl_per_task, kl_per_step and loss of the jitted round equal the hand-built round."""
  built = request.getfixturevalue(which)
  c = built.config
  num_tasks = len(c.data.tasks)
  np.testing.assert_array_equal(built.setup.teacher_index, np.arange(num_tasks))
  kl = np.stack([_reference(built, built.cond, m, m) for m in range(num_tasks)])   # [M, T, B]
  _, metrics = built.run()
  assert metrics['kl_per_step'].shape == (_num_trained(c),)
  per_task = [_per_task(c, kl[m]) for m in range(num_tasks)]
  np.testing.assert_allclose(metrics['kl_per_task'], per_task, rtol=1e-5)
  np.testing.assert_allclose(metrics['kl_per_step'], kl.mean(axis=(0, 2)), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], np.mean(per_task), rtol=1e-5)


def test_reference_tells_the_audited_mistakes_apart(ode):
  """The rebuild above notices each audited bug: the alternative KLs are >10% away.

  Scoring task m with teacher 0, with the student's CFG instead of teacher m's, or over the
  last T of the N transitions instead of the first T.
  """
  c = ode.config
  n, trained = c.rollout.num_steps, _num_trained(c)
  for m in range(len(c.data.tasks)):
    right = _reference(ode, ode.cond, m, m)
    wrong = {'student cfg': _reference(ode, ode.cond, m, m, teacher_cfg=STUDENT_CFG),
             'last T steps': _reference(ode, ode.cond, m, m, steps=range(n - trained, n))}
    if m:
      wrong['teacher 0'] = _reference(ode, ode.cond, m, 0)
    for what, kl in wrong.items():
      per_step = np.abs(kl.mean(1) / right.mean(1) - 1)
      assert per_step.max() > 0.1, (m, what, per_step)


# ----------------------------------------------------------------------------------------------
# 1b. Task m's prompts meet teacher m.


def test_teacher_index_resolves_each_task_to_its_teachers_slot():
  tasks = ('composition', 'text', 'aesthetics')
  np.testing.assert_array_equal(teacher_index(tasks, tasks), [0, 1, 2])
  np.testing.assert_array_equal(teacher_index(tasks, ('aesthetics', 'composition', 'text')),
                                [1, 2, 0])
  np.testing.assert_array_equal(teacher_index(('text',), tasks), [1])
  with pytest.raises(ConfigError, match='ocr'):
    teacher_index(('text', 'ocr'), tasks)


def test_round_robin_gives_step_m_task_m_batch_and_teacher():
  """Step m sees (m, task_batches[m], teachers[m]); the carry threads through in task order."""
  batches = {'x': jnp.arange(6.0).reshape(3, 2)}
  teachers = jnp.asarray([2, 0, 1], jnp.int32)

  def per_task(carry, m, batch, teacher):
    return carry * 10 + m + 1, (m, batch['x'], teacher)

  carry, (ms, xs, ts) = round_robin(per_task, jnp.int32(0), batches, teachers)
  assert int(carry) == 123
  np.testing.assert_array_equal(ms, [0, 1, 2])
  np.testing.assert_array_equal(xs, batches['x'])
  np.testing.assert_array_equal(ts, [2, 0, 1])


def test_per_task_losses_follow_the_teachers(ode):
  """Every task gets the SAME prompts, so only its teacher (and its rollout noise) sets its KL.

  R[m, k] is the reference KL of task m's rollout scored by teacher k with k's own CFG. The round
  gives task m exactly R[m, m], clearly apart from every R[m, k≠m]; with the teacher stack
  permuted and `teacher_index` resolving the new slots the losses are unchanged, and with the
  stack permuted but the old index they become R[m, perm[m]]: the losses follow the teachers.
  """
  c = ode.config
  tasks, num_tasks = tuple(c.data.tasks), len(c.data.tasks)
  same = {k: np.repeat(v[:1], num_tasks, axis=0) for k, v in ode.cond.items()}
  ref = np.asarray([[_per_task(c, _reference(ode, same, m, k)) for k in range(num_tasks)]
                    for m in range(num_tasks)])
  off_diagonal = ~np.eye(num_tasks, dtype=bool)
  gap = np.abs(ref / np.diag(ref)[:, None] - 1)
  assert gap[off_diagonal].min() > 0.02, ref     # 2000× the tolerance below

  _, own = ode.run(cond=same)
  np.testing.assert_allclose(own['kl_per_task'], np.diag(ref), rtol=1e-5)

  perm = np.asarray([2, 0, 1])          # new slot s holds the teacher of task perm[s]
  stacked = dict(ode.frozen, teachers=jax.tree.map(lambda x: x[perm], ode.frozen['teachers']),
                 teacher_cfg=ode.frozen['teacher_cfg'][perm])
  stacked = jax.device_put(stacked, ode.setup.frozen_shardings)
  index = teacher_index(tasks, tuple(tasks[k] for k in perm))
  _, resolved = ode.run(cond=same, teacher=index, frozen=stacked)
  np.testing.assert_allclose(resolved['kl_per_task'], own['kl_per_task'], rtol=1e-6)
  _, stale = ode.run(cond=same, teacher=np.arange(num_tasks), frozen=stacked)
  np.testing.assert_allclose(stale['kl_per_task'], ref[np.arange(num_tasks), perm], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 1c. The first optimizer step descends the round's objective.


def test_first_update_is_a_descent_step(ode):
  """L(θ₁) < L(θ₀) on the same prompts, keys and student states, deterministically.

  L(θ) = (1/M) Σ_m mean_b mean_j KL_j(θ) at the states x_j of the θ₀ rollout (constants: the
  round's gradient is pathwise, Eq. 15) — the reference objective above. The round's first
  step is AdamW's with zero moments, weight decay 0 and a clip factor c ∈ (0, 1]:
      Δθ_i = −lr · c·g_i / (c|g_i| + ε),
  so the directional derivative ⟨∇L, Δθ⟩ = −lr Σ_i c·g_i²/(c|g_i| + ε) is < 0 whenever g ≠ 0,
  and L(θ₀ + Δθ) = L(θ₀) + ⟨∇L, Δθ⟩ + O(lr²). The O(lr²) term is shown negligible rather than
  assumed: the half step decreases L by half as much (to 5%), so L is linear along Δθ over
  the step and the decrease is the (negative) first-order term. The decrease is also far
  above float32 rounding of L, so its sign is not noise.
  """
  c = ode.config
  state, metrics = ode.run()
  delta = jax.tree.map(lambda a, b: a - b, state.params, ode.params0)

  def loss(scale):
    params = jax.tree.map(lambda p, d: p + scale * d, ode.params0, delta)
    return np.mean([_per_task(c, _reference(ode, ode.cond, m, m, params=params))
                    for m in range(len(c.data.tasks))])

  l0, l_half, l1 = loss(0.0), loss(0.5), loss(1.0)
  np.testing.assert_allclose(l0, metrics['loss'], rtol=1e-5)
  assert l1 < l0
  assert l0 - l1 > 1e-4 * l0, (l0, l1)      # ~1000 float32 ulps of L
  np.testing.assert_allclose(l_half - l0, 0.5 * (l1 - l0), rtol=0.05)


# ----------------------------------------------------------------------------------------------
# 3. The gradient contract of per_step_kl: pathwise, teacher mean detached.


def _toy_velocity(params):
  """A small nonlinear velocity field; conditioning enters through 'pooled' (so CFG matters)."""
  def fn(x, timestep, cond):
    h = (x @ params['w'] + (cond['pooled'] @ params['u'])[:, None, None, :]
         + (timestep / 1000)[:, None, None, None] * params['b'])
    return jnp.tanh(h)
  return fn


def _toy_problem(seed=0, batch=3, size=2, channels=3, pooled=2, num_steps=5):
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  params = {'w': jax.random.normal(k[0], (channels, channels)) * 0.7,
            'u': jax.random.normal(k[1], (pooled, channels)),
            'b': jax.random.normal(k[2], (channels,))}
  latents = jax.random.normal(k[3], (num_steps + 1, batch, size, size, channels))
  cond = {'pooled': jax.random.normal(k[4], (batch, pooled))}
  uncond = {'pooled': jax.random.normal(k[5], (batch, pooled)) * 0.1}
  sigmas = jnp.asarray(flow_match_sigmas(num_steps, 3.0))
  return params, latents, cond, uncond, sigmas


@pytest.mark.parametrize('spec,normaliser,reduction', [
    (KernelSpec('ode', 0.0), 'sigma2_dt', 'mean'),
    (KernelSpec('ode', 0.0), 'sigma2_dt', 'sum'),
    (KernelSpec('flow_grpo', 0.7), 'sigma2_dt', 'mean'),
    (KernelSpec('flow_grpo', 0.7), 'sigma2', 'mean'),
    (KernelSpec('flow_grpo', 0.7), 'sigma2', 'sum'),
], ids=['ode-mean', 'ode-sum', 'sde-sigma2_dt', 'sde-sigma2', 'sde-sigma2-sum'])
def test_per_step_kl_gradient_is_pathwise_with_a_shared_network(spec, normaliser, reduction):
  """Student and teacher are the SAME network and weights θ, only their CFG differs.

  Eq. 15: ∇θ Σ_j KL_j = Σ_j ((μ_S − μ_T)/σ̄_j²)·∇θ μ_S with μ_T held fixed (σ̄_j² the configured
  normaliser; 1 for the ODE's ½‖·‖², Eq. 12; a 1/numel factor for the 'mean' reduction). The
  reference is a vjp of μ_S alone. The gradient of the same loss with the teacher mean NOT
  detached, Σ_j ((μ_S − μ_T)/σ̄_j²)·∇θ(μ_S − μ_T), is checked to be far from it, so a missing
  stop-gradient cannot pass.
  """
  params, latents, cond, uncond, sigmas = _toy_problem()
  student_cfg, teacher_cfg = 4.5, 1.5
  kernel = transitions.get_kernel(spec.kernel)
  scale = 1.0 / np.prod(latents.shape[2:]) if reduction == 'mean' else 1.0

  def loss(p):
    return per_step_kl(_toy_velocity(p), _toy_velocity(p), latents, sigmas, jnp.arange(4), cond,
                       uncond, student_cfg=student_cfg, teacher_cfg=teacher_cfg, spec=spec,
                       reduction=reduction, normaliser=normaliser).sum()

  def reference(p):
    """(Σ KL, pathwise gradient, gradient through the teacher too), one step at a time."""
    value, pathwise, through_teacher = 0.0, [], []
    for j in range(4):              # the first 4 of 5 transitions, from t = 1 (σ_1 case) on
      x, t, t_next = latents[j], sigmas[j], sigmas[j + 1]

      def transition(q, cfg):
        v = _cfg_velocity(_toy_velocity(q), x, t, cond, uncond, cfg)
        return kernel(x, v, t, t_next, jnp.zeros_like(x), noise_level=spec.noise_level,
                      sigma_1=sigmas[1])

      tr_s, mu_t = transition(p, student_cfg), transition(p, teacher_cfg).mean
      if spec.kernel == 'ode':
        var = 1.0
      elif normaliser == 'sigma2_dt':
        var = tr_s.std**2
      else:
        var = tr_s.std**2 / jnp.abs(t_next - t)
      diff = tr_s.mean - mu_t
      value += jnp.sum(diff**2) * scale / (2 * var)
      cotangent = diff * scale / var
      _, vjp_s = jax.vjp(lambda q: transition(q, student_cfg).mean, p)
      _, vjp_both = jax.vjp(
          lambda q: transition(q, student_cfg).mean - transition(q, teacher_cfg).mean, p)
      pathwise.append(vjp_s(cotangent)[0])
      through_teacher.append(vjp_both(cotangent)[0])
    add = lambda gs: jax.tree.map(lambda *xs: sum(xs), *gs)
    return value, add(pathwise), add(through_teacher)

  ours_value, ours = jax.value_and_grad(loss)(params)
  value, pathwise, through_teacher = reference(params)
  np.testing.assert_allclose(ours_value, value, rtol=1e-5)
  for name in params:
    np.testing.assert_allclose(ours[name], pathwise[name], rtol=1e-4, atol=1e-6 *
                               float(jnp.abs(pathwise[name]).max()), err_msg=name)
  flat = lambda tree: np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])
  gap = np.linalg.norm(flat(through_teacher) - flat(pathwise)) / np.linalg.norm(flat(pathwise))
  assert gap > 0.1, gap
