"""Analytic per-step KL gradient vs PPO-style gradients: bias, variance, training efficiency.

    python benchmarks/gradient_variance.py --quick          # < 2 min: toy + small mini-world study
    python benchmarks/gradient_variance.py --workdir=runs/opd_seed0   # full: writes results

Estimators (opd_jax/objectives, selectable by config.objective.name), all differentiated at the
student's own sampled trajectory with π_old = π_θ:
  analytic                closed-form per-step KL (Eq. 11; Eq. 12 for the ODE), pathwise gradient
  ppo_analytic_advantage  clipped surrogate with advantage −KL_j kept differentiable (Eq. 16–18)
  ppo_sampled_logratio    clipped surrogate with the detached sampled log-ratio as advantage
  detached_advantage      (here only) advantage −KL_j detached: its expected gradient is zero,
                          since KL_j depends on x_j only and E[∇log π(x_{j+1}|x_j) | x_j] = 0
All three real estimators target g = Σ_j E_{x_j}[∇_θ KL_j(x_j)] (states held fixed; Eq. 21),
compared with the paper's conventions reduction='sum', normaliser='sigma2_dt' (σ̄² = σ_t²|Δt|), for
which E[log p_S − log p_T | x_j] is exactly the Gaussian KL_j.

Settings: (a) a toy where student and teacher velocities are elementwise linear, v = α ⊙ x + β,
so every state x_j is Gaussian and g is exact (states propagated in closed form through the
repo's own kernel means); (b) the mini-world student (fresh LoRA on the recipe's base) with the
recipe's aesthetics teacher, reference = mean of many analytic estimates. For each noise level a
(flow_grpo kernel) and the ODE (analytic only) we draw independent single-trajectory gradients
and report the covariance trace, the ratio to the analytic one, the mean's relative error and
cosine to the reference with a z-test, seconds per estimate and the samples needed for an
expected cosine of 0.9 to the reference (n = tr Σ / (‖g‖² (1/0.9² − 1)) for an n-sample mean).
The full mode also trains the mini-world student with each estimator at equal rollout budget
(the Fig. 6 analogue) and plots held-out reward and KL against trajectories and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opd_jax.objectives import OBJECTIVES                      # noqa: E402
from opd_jax.sampling.step import KernelSpec  # noqa: E402
from opd_jax.sampling.step import transition_mean as kernel_mean  # noqa: E402
from opd_jax.objectives.ppo import _step_quantities, clipped_surrogate  # noqa: E402
from opd_jax.sampling.rollout import rollout                   # noqa: E402
from opd_jax.sampling.schedule import flow_match_sigmas         # noqa: E402

ESTIMATORS = ('analytic', 'ppo_analytic_advantage', 'ppo_sampled_logratio', 'detached_advantage')
TARGET_COSINE = 0.9


def detached_advantage(student_velocity, teacher_velocity, traj, step_idx, cond, uncond, *,
                       student_cfg, teacher_cfg, spec, reduction, normaliser, clip_range=1e-4,
                       discount=0.0):
  """The clipped surrogate with advantage −KL_j detached (a biased estimator, for contrast)."""
  del discount
  kl, logp, _ = _step_quantities(student_velocity, teacher_velocity, traj, step_idx, cond,
                                 uncond, student_cfg=student_cfg, teacher_cfg=teacher_cfg,
                                 spec=spec, reduction=reduction, normaliser=normaliser)
  kl = jax.lax.stop_gradient(kl)
  return clipped_surrogate(logp, -kl, clip_range), kl


def objective(name):
  return detached_advantage if name == 'detached_advantage' else OBJECTIVES[name]


# --- statistics ---------------------------------------------------------------------------------
def summarise(grads: np.ndarray, reference: np.ndarray, seconds: float) -> dict:
  """Statistics of n single-sample gradient estimates [n, P] against a reference [P]."""
  n = len(grads)
  mean = grads.mean(0)
  var = grads.var(0, ddof=1)
  trace = float(var.sum())
  ref_sq = float(np.dot(reference, reference))
  se = np.sqrt(var / n)
  ok = se > 0
  z = np.abs(mean - reference)[ok] / se[ok]
  cosine = float(np.dot(mean, reference) / (np.linalg.norm(mean) * np.sqrt(ref_sq) + 1e-30))
  # ‖mean − g‖² has expectation tr Σ / n under unbiasedness: a scale-free test on all coordinates.
  excess = float(np.sum((mean - reference) ** 2) / (trace / n)) if trace > 0 else float('nan')
  return {
      'samples': n,
      'cov_trace_per_sample': trace,
      'relative_error_of_mean': float(np.linalg.norm(mean - reference) / np.sqrt(ref_sq)),
      'cosine_of_mean': cosine,
      'max_abs_z': float(z.max()) if z.size else 0.0,
      'bias_test_ratio': excess,   # ≈ 1 if unbiased (‖mean − g‖² / (trΣ/n))
      'samples_to_cosine_0.9': float(trace / (ref_sq * (1 / TARGET_COSINE ** 2 - 1)))
                               if ref_sq > 0 else float('inf'),
      'seconds_per_estimate': seconds,
  }


def add_ratios(rows: dict) -> None:
  for key, per_est in rows.items():
    base = per_est.get('analytic', {}).get('cov_trace_per_sample')
    for r in per_est.values():
      r['variance_ratio_to_analytic'] = (r['cov_trace_per_sample'] / base) if base else None


# --- (a) the linear-Gaussian toy ----------------------------------------------------------------
TOY_SHAPE = (2, 2, 2)


def toy_velocity(w):
  def fn(x, timestep, cond):
    del timestep, cond
    return w['alpha'] * x + w['beta']
  return fn


def toy_params(seed: int = 0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  student = {'alpha': -1.0 + 0.3 * jax.random.normal(k[0], TOY_SHAPE),
             'beta': 0.5 * jax.random.normal(k[1], TOY_SHAPE)}
  teacher = {'alpha': -1.0 + 0.3 * jax.random.normal(k[2], TOY_SHAPE),
             'beta': 0.5 * jax.random.normal(k[3], TOY_SHAPE)}
  return student, teacher


def toy_exact_gradient(ws, wt, sigmas, spec: KernelSpec, num_train: int) -> np.ndarray:
  """g = Σ_j E[∇_θ KL_j(x_j)] with x_j ~ N(m_j, s_j) per element, propagated in closed form.

  Each kernel mean is elementwise affine in x, μ = A ⊙ x + c (A, c read off the repo's own
  kernel_mean at x = 0 and x = 1), so E[(ΔA x + Δc)²] = ΔA²(s + m²) + 2ΔA Δc m + Δc².
  """
  sig = jnp.asarray(sigmas, jnp.float32)
  cond = {'pooled': jnp.zeros((1, 1))}
  deterministic = spec.kernel == 'ode' or spec.noise_level == 0

  def affine(w, j):
    zero, one = jnp.zeros((1,) + TOY_SHAPE), jnp.ones((1,) + TOY_SHAPE)
    mu0, std = kernel_mean(toy_velocity(w), zero, sig[j], sig[j + 1], sig[1], cond, None, 1.0,
                           spec)
    mu1, _ = kernel_mean(toy_velocity(w), one, sig[j], sig[j + 1], sig[1], cond, None, 1.0, spec)
    return mu1[0] - mu0[0], mu0[0], std

  def expected_kl(w):
    m, s = jnp.zeros(TOY_SHAPE), jnp.ones(TOY_SHAPE)
    total = 0.0
    for j in range(len(sigmas) - 1):
      a_s, c_s, std = affine(w, j)
      a_t, c_t, _ = affine(wt, j)
      ms, ss = jax.lax.stop_gradient(m), jax.lax.stop_gradient(s)   # states held fixed
      da, dc = a_s - a_t, c_s - c_t
      sq = jnp.sum(da ** 2 * (ss + ms ** 2) + 2 * da * dc * ms + dc ** 2)
      if j < num_train:
        total = total + (0.5 * sq if deterministic else
                         sq / (2 * jnp.square(std) * 1.0))
      # the student's own transition moves the state distribution
      a_own, c_own = jax.lax.stop_gradient(a_s), jax.lax.stop_gradient(c_s)
      var_step = 0.0 if deterministic else jnp.square(jax.lax.stop_gradient(std))
      m, s = a_own * m + c_own, a_own ** 2 * s + var_step
    return total

  g = jax.grad(expected_kl)(ws)
  return np.concatenate([np.ravel(g['alpha']), np.ravel(g['beta'])])


def toy_gradients(name, ws, wt, sigmas, spec: KernelSpec, num_train: int, keys) -> np.ndarray:
  """Single-trajectory gradients [n, P] of estimator `name`, one per key."""
  cond = {'pooled': jnp.zeros((1, 1))}
  steps = jnp.arange(num_train)

  def one(key):
    traj = rollout(toy_velocity(jax.lax.stop_gradient(ws)), cond, None, key[None],
                   sigmas=sigmas, latent_shape=TOY_SHAPE, kernel=spec.kernel,
                   noise_level=spec.noise_level, logprob_reduction='sum')

    def loss(w):
      terms, _ = objective(name)(toy_velocity(w), toy_velocity(wt), traj, steps, cond, None,
                                 student_cfg=1.0, teacher_cfg=1.0, spec=spec, reduction='sum',
                                 normaliser='sigma2_dt', clip_range=1e-4, discount=0.0)
      return terms.sum()
    g = jax.grad(loss)(ws)
    return jnp.concatenate([jnp.ravel(g['alpha']), jnp.ravel(g['beta'])])

  return jax.jit(jax.vmap(one))(keys)


def _timed(fn, *args):
  out = fn(*args)
  jax.block_until_ready(out)          # compile + first run
  began = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return np.asarray(out), time.perf_counter() - began


def toy_study(noise_levels, num_samples: int, num_steps: int = 10, seed: int = 0) -> dict:
  """Setting (a): per kernel ('ode' or 'a=<level>'), per estimator, `summarise` statistics."""
  ws, wt = toy_params(seed)
  sigmas = flow_match_sigmas(num_steps, 3.0)
  num_train = num_steps - 1
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_samples)
  rows = {}
  for level in ['ode'] + list(noise_levels):
    spec = KernelSpec('ode', 0.0) if level == 'ode' else KernelSpec('flow_grpo', float(level))
    exact = toy_exact_gradient(ws, wt, sigmas, spec, num_train)
    names = ('analytic',) if level == 'ode' else ESTIMATORS
    per = {}
    for name in names:
      grads, secs = _timed(lambda k, n=name: toy_gradients(n, ws, wt, sigmas, spec, num_train, k),
                           keys)
      per[name] = summarise(grads, exact, secs / num_samples)
    rows['ode' if level == 'ode' else f'a={level}'] = per
  add_ratios(rows)
  return {'setting': 'toy linear-Gaussian (8 latent elements, 16 parameters, 10 steps, '
                     'shift 3; exact reference)', 'rows': rows}


# --- (b) the mini-world student ---------------------------------------------------------------
def mini_world_study(workdir: str | None, noise_levels, num_samples: int, num_reference: int,
                     seed: int = 0, task: str = 'aesthetics',
                     estimators: tuple[str, ...] = ESTIMATORS) -> dict:
  """Setting (b): the recipe's base + fresh student LoRA, the recipe's `task` teacher.

  workdir: a recipe workdir with pretrain/ and teacher_<task>/ stages done; None uses the
  stand-in OPD config (random base, teacher and prompts) so --quick needs no trained stages.
  """
  from opd_jax.parallel.mesh import make_mesh
  from opd_jax.opd.setup import build_opd
  from opd_jax.opd.sources import load_inputs
  from opd_jax.opd.round import task_loss_and_grad
  config, label = _mini_config(workdir, task)
  mesh = make_mesh({'data': 1}, jax.devices()[:1])
  inputs = load_inputs(config, 1, mesh)
  config = inputs.config
  setup = build_opd(config, mesh, inputs.prompts.negative(), base_params=inputs.base.params,
                    teachers=inputs.teachers)
  params = setup.init_state().params
  prompts = [inputs.prompts.next_batch() for _ in range(num_samples + num_reference)]
  conds = jax.tree.map(lambda *xs: np.concatenate([x[0] for x in xs]), *prompts)  # [n, ...]
  teacher = jnp.int32(int(setup.teacher_index[0]))
  # task_loss_and_grad looks objectives up by name: register the contrast estimator too.
  OBJECTIVES.setdefault('detached_advantage', detached_advantage)
  rows = {}
  for level in ['ode'] + list(noise_levels):
    kernel = KernelSpec('ode', 0.0) if level == 'ode' else KernelSpec('flow_grpo', float(level))
    names = ('analytic',) if level == 'ode' else estimators
    grads_by = {}
    for name in names:
      spec = dataclasses.replace(setup.spec, kernel=kernel, objective=name, reduction='sum',
                                 normaliser='sigma2_dt', time_reduction='sum')
      def one(cond, key, spec=spec):
        cond = jax.tree.map(lambda x: x[None], cond)
        g, _ = task_loss_and_grad(spec, params, setup.frozen, cond, teacher, key[None])
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])

      fn = jax.jit(jax.vmap(one))
      n = num_samples + num_reference if name == 'analytic' else num_samples
      keys = jax.random.split(jax.random.PRNGKey(seed + 7), n)
      cond_n = jax.tree.map(lambda x: x[:n], conds)
      chunks, secs = [], 0.0
      for start in range(0, n, 64):
        part = (jax.tree.map(lambda x: x[start:start + 64], cond_n), keys[start:start + 64])
        if start == 0:
          jax.block_until_ready(fn(*part))   # compile
        began = time.perf_counter()
        chunks.append(np.asarray(jax.block_until_ready(fn(*part))))
        secs += time.perf_counter() - began
      grads_by[name] = (np.concatenate(chunks), secs / n)
    # Reference: analytic estimates on draws disjoint from the scored ones (the first
    # num_samples draws, shared by every estimator).
    reference = grads_by['analytic'][0][num_samples:].mean(0)
    per = {name: summarise(grads[:num_samples], reference, secs)
           for name, (grads, secs) in grads_by.items()}
    rows['ode' if level == 'ode' else f'a={level}'] = per
  add_ratios(rows)
  return {'setting': label, 'reference': f'mean of {num_reference} further analytic estimates',
          'parameters': int(sum(x.size for x in jax.tree.leaves(params))), 'rows': rows}


def _mini_config(workdir: str | None, task: str):
  from configs.mini.opd import get_config
  if workdir is None:
    c = get_config('standin')
    c.data.tasks = (task,)
    with c.unlocked():
      c.teachers.tasks = {task: {'path': '', 'cfg_scale': 4.5}}
    c.teachers.random_scale = 0.3
    return c, 'mini-world stand-in (random base, teacher, prompts: configs/mini/opd.py:standin)'
  c = get_config()
  c.base.path = os.path.join(workdir, 'pretrain', 'base')
  path = os.path.join(workdir, f'teacher_{task}', 'teacher')
  c.data.tasks = (task,)
  from opd_jax.mini_world import artifacts
  teacher = artifacts.load_adapter(path)
  with c.unlocked():
    c.teachers.tasks = {task: {'path': path, 'cfg_scale': teacher.cfg_scale}}
  c.lora.rank = int(teacher.meta['lora_rank'])
  c.lora.alpha = float(teacher.meta['lora_alpha'])
  return c, f'mini-world student (base of {workdir}) with its {task} teacher'


# --- training efficiency (Fig. 6 analogue) ------------------------------------------------------
TRAINING_RUNS = {
    'analytic ODE': ('analytic', 'ode', 0.0),
    'analytic SDE a=0.7': ('analytic', 'flow_grpo', 0.7),
    'ppo_analytic_advantage a=0.7': ('ppo_analytic_advantage', 'flow_grpo', 0.7),
    'ppo_sampled_logratio a=0.7': ('ppo_sampled_logratio', 'flow_grpo', 0.7),
}


def training_study(workdir: str, rounds: int, out_dir: str, probe_every: int) -> dict:
  """Trains the recipe's OPD student once per estimator, same rounds and batch; curves."""
  from configs.opd import get_config as recipe_config
  from opd_jax.recipe.evaluation import curve_probe
  from opd_jax.recipe.mini_world import mini_world_stages, opd_config
  from opd_jax.recipe.stages import Recipe
  from opd_jax.opd.trainer import train_opd
  recipe = Recipe(recipe_config(), workdir, mini_world_stages(('composition', 'text',
                                                               'aesthetics')))
  runs = {}
  for label, (name, kernel, level) in TRAINING_RUNS.items():
    c = opd_config(recipe)
    c.objective.name = name
    c.objective.kl_reduction = 'sum'
    c.objective.kl_normaliser = 'sigma2_dt'
    c.rollout.kernel = kernel
    c.rollout.noise_level = level
    c.train.num_steps = rounds
    c.train.checkpoint_every = rounds
    meta = {'lora_rank': c.lora.rank, 'lora_alpha': c.lora.alpha,
            'cfg_scale': c.rollout.cfg_scale}
    probe = curve_probe(recipe, meta, rounds, every=probe_every)
    run_dir = os.path.join(out_dir, label.replace(' ', '_').replace('=', ''))
    train_opd(c, run_dir, probe=probe)
    metrics = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    per_round = len(c.data.tasks) * c.data.batch_size_per_device * jax.device_count()
    runs[label] = {'curve': probe.history, 'trajectories_per_round': per_round,
                   'kl': [{'step': m['step'], 'kl': m['loss'],
                           'train_seconds': m['train_seconds']} for m in metrics]}
  return {'rounds': rounds, 'runs': runs,
          'settings': 'recipe OPD stage (configs/mini/opd.py) with reduction=sum, '
                      'kl_normaliser=sigma2_dt for every estimator; same optimizer (AdamW 3e-3)'}


# --- output -------------------------------------------------------------------------------------
def _table(study: dict) -> list[str]:
  lines = [f'Setting: {study["setting"]}' + (f'; reference: {study["reference"]}'
                                              if 'reference' in study else ''), '',
           '| kernel | estimator | tr Σ (1 sample) | ratio to analytic | rel. error of mean | '
           'cosine | bias test | max z | samples to cos 0.9 | s / estimate |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for kernel, per in study['rows'].items():
    for name, r in per.items():
      ratio = r['variance_ratio_to_analytic']
      lines.append(
          f'| {kernel} | {name} | {r["cov_trace_per_sample"]:.3g} | '
          f'{"—" if ratio is None else f"{ratio:.3g}"} | {r["relative_error_of_mean"]:.3g} | '
          f'{r["cosine_of_mean"]:.3f} | {r["bias_test_ratio"]:.2f} | {r["max_abs_z"]:.1f} | '
          f'{r["samples_to_cosine_0.9"]:.3g} | {r["seconds_per_estimate"]:.2e} |')
  return lines


def markdown(result: dict) -> str:
  m = result['meta']
  out = ['# Gradient estimators: analytic per-step KL vs PPO-style', '',
         f'Command: `{m["command"]}`  ', f'Commit: `{m["commit"]}`  ',
         f'Machine: {m["machine"]}', '',
         'Single-trajectory gradient estimates at fixed parameters; reduction = sum, normaliser '
         '= paper. "bias test" = ‖mean − g‖² / (tr Σ / n), ≈ 1 for an unbiased estimator, ≫ 1 '
         'for a biased one; "samples to cos 0.9" = tr Σ / (‖g‖² (1/0.81 − 1)), the batch size '
         'whose mean has expected cosine 0.9 to the reference. The detached-advantage variant '
         'has zero expected gradient: KL_j is a function of x_j, and E[∇log π(x_{j+1}|x_j) | x_j] '
         '= 0.', '', '## (a) Toy with exact gradient', '']
  out += _table(result['toy'])
  if 'mini_world' in result:
    out += ['', '## (b) Mini-world student', ''] + _table(result['mini_world'])
  if 'training' in result:
    t = result['training']
    out += ['', '## Training efficiency (equal rollout budget)', '',
            f'{t["rounds"]} rounds each; {t["settings"]}. Plot: gradient_variance_training.png.',
            '', '| run | final KL | final mean held-out reward | train s |', '|---|---|---|---|']
    for label, r in t['runs'].items():
      last = r['curve'][-1]
      mean_reward = np.mean([last[k] for k in ('composition', 'text', 'aesthetics')])
      out.append(f'| {label} | {r["kl"][-1]["kl"]:.4g} | {mean_reward:.3f} | '
                 f'{r["kl"][-1]["train_seconds"]:.0f} |')
  return '\n'.join(out) + '\n'


def plot(result: dict, out_dir: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  studies = [(k, result[k]) for k in ('toy', 'mini_world') if k in result]
  fig, axes = plt.subplots(1, len(studies), figsize=(5 * len(studies), 3.5), squeeze=False)
  for ax, (key, study) in zip(axes[0], studies):
    levels = [k for k in study['rows'] if k != 'ode']
    xs = [float(k.split('=')[1]) for k in levels]
    for name in ESTIMATORS[:3]:
      ax.plot(xs, [study['rows'][k][name]['cov_trace_per_sample'] for k in levels], marker='o',
              label=name)
    if 'ode' in study['rows']:
      ax.axhline(study['rows']['ode']['analytic']['cov_trace_per_sample'], ls='--', c='gray',
                 label='analytic, ODE')
    ax.set_yscale('log')
    ax.set_xlabel('noise level a')
    ax.set_ylabel('trace of gradient covariance (1 sample)')
    ax.set_title(key)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'gradient_variance.png'), dpi=100)
  plt.close(fig)
  if 'training' in result:
    runs = result['training']['runs']
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for label, r in runs.items():
      traj = [p['step'] * r['trajectories_per_round'] for p in r['curve']]
      mean = [np.mean([p[k] for k in ('composition', 'text', 'aesthetics')]) for p in r['curve']]
      axes[0].plot(traj, mean, marker='o', ms=3, label=label)
      axes[1].plot([p['train_seconds'] for p in r['curve']], mean, marker='o', ms=3, label=label)
      axes[2].plot([k['step'] * r['trajectories_per_round'] for k in r['kl']],
                   [k['kl'] for k in r['kl']], label=label)
    axes[0].set_xlabel('student trajectories')
    axes[1].set_xlabel('training seconds')
    axes[2].set_xlabel('student trajectories')
    axes[0].set_ylabel('mean held-out reward (3 tasks)')
    axes[2].set_ylabel('per-step KL to the teachers (sum over steps)')
    axes[2].set_yscale('log')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'gradient_variance_training.png'), dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='small sample counts, ODE and a=0.7 only; mini world on stand-in '
                      'networks with analytic and ppo_sampled_logratio (< 2 min)')
  p.add_argument('--workdir', default=None, help='recipe workdir with trained stages')
  p.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'results'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--noise_levels', type=float, nargs='+', default=[0.1, 0.3, 0.7, 1.0])
  p.add_argument('--toy_samples', type=int, default=None)
  p.add_argument('--mini_samples', type=int, default=None)
  p.add_argument('--training_rounds', type=int, default=60)
  args = p.parse_args(argv)
  toy_n = args.toy_samples or (4000 if args.quick else 40000)
  mini_n = args.mini_samples or (32 if args.quick else 256)
  levels = [0.7] if args.quick else args.noise_levels
  result = {'toy': toy_study(levels, toy_n, seed=args.seed)}
  # --quick: each (kernel, estimator) pair of the DiT is one compile; keep three of them.
  mini_levels = levels
  mini_estimators = ('analytic', 'ppo_sampled_logratio') if args.quick else ESTIMATORS
  result['mini_world'] = mini_world_study(args.workdir, mini_levels, mini_n,
                                          2 * mini_n if args.quick else 4 * mini_n,
                                          seed=args.seed, estimators=mini_estimators)
  os.makedirs(args.out_dir, exist_ok=True)
  if not args.quick and args.workdir:
    # run directories (checkpoints, metrics) go under runs/, only the summary to results/
    result['training'] = training_study(args.workdir, args.training_rounds,
                                        os.path.join(ROOT, 'runs', 'gradient_variance'),
                                        probe_every=10)
  commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  result['meta'] = {'command': 'python benchmarks/gradient_variance.py ' +
                               ' '.join(argv if argv is not None else sys.argv[1:]),
                    'commit': commit, 'quick': args.quick,
                    'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, no GPU'}
  name = 'gradient_variance_quick' if args.quick else 'gradient_variance'
  with open(os.path.join(args.out_dir, f'{name}.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(args.out_dir, f'{name}.md'), 'w') as f:
    f.write(markdown(result))
  if not args.quick:
    plot(result, args.out_dir)
  print(markdown(result))
  return result


if __name__ == '__main__':
  main()
