# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Why the analytic gradient
#
# DiffusionOPD trains the student on its own rollouts with the **closed-form per-step KL**
# between the student's and the teacher's Gaussian transition kernels (Eq. 11; Eq. 12 for the
# ODE sampler), differentiated pathwise. The alternatives are PPO-style surrogates whose
# advantage is that KL (kept differentiable, Eq. 16–18) or the sampled log-ratio. All three aim
# at the same gradient; this notebook measures how noisy each single-trajectory estimate is.
#
# The setting is a toy where that gradient is known **exactly**: student and teacher velocities
# are elementwise linear, v = α ⊙ x + β, so every state of a rollout is Gaussian and the
# expected gradient propagates in closed form through the repository's own kernel means. The
# functions are those of `benchmarks/gradient_variance.py` (its results for the toy and the
# mini world are in `benchmarks/results/gradient_variance.md`).
#
# **Hardware:** any; the toy runs on a CPU in about a minute (quick mode: seconds).

# %% [markdown]
# ## Install
# The cell below installs the pinned requirements when `opd_jax` is not importable yet (no other
# downloads). Opened from a clone it uses that clone; opened alone (Colab from GitHub), it clones
# the repository from `REPO_URL` first.

# %%
import importlib.util
import os
import subprocess
import sys

# This repository's git address, for a runtime that opened the notebook alone (Colab from GitHub):
# the cell then clones it next to the notebook. Inside a clone it is not needed.
REPO_URL = os.environ.get('OPD_REPO_URL', '')
ROOT = os.path.abspath('.')
while not os.path.exists(os.path.join(ROOT, 'opd_jax')) and os.path.dirname(ROOT) != ROOT:
  ROOT = os.path.dirname(ROOT)
if not os.path.exists(os.path.join(ROOT, 'opd_jax')):
  ROOT = os.path.abspath('opd_jax_repo')
  if not os.path.exists(ROOT):
    if not REPO_URL:
      raise SystemExit('not inside a clone of opd_jax: set REPO_URL in this cell to the '
                       "repository's git address, or open the notebook from a clone")
    subprocess.run(['git', 'clone', '--depth', '1', REPO_URL, ROOT], check=True)
if importlib.util.find_spec('opd_jax') is None:
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-r',
                  os.path.join(ROOT, 'requirements.txt')], check=True, cwd=ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

# %% [markdown]
# ## Parameters
# `QUICK` (set by the `OPD_NOTEBOOK_QUICK=1` environment variable, as CI does) draws fewer
# gradients at two noise levels (each level and estimator compiles its own program); the
# conclusions are the same, the error bars wider.

# %%
QUICK = os.environ.get('OPD_NOTEBOOK_QUICK', '0') == '1'
NUM_SAMPLES = 256 if QUICK else 4096      # single-trajectory gradients per estimator and level
# The SDE noise level a of the flow_grpo kernel.
NOISE_LEVELS = (0.3, 0.7) if QUICK else (0.1, 0.3, 0.7, 1.0)
SEED = 0

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

import gradient_variance as gv

print('devices:', jax.devices())

# %% [markdown]
# ## The estimators at every noise level
# For the ODE sampler only the analytic objective exists (there is no likelihood ratio). For each
# SDE level a, every estimator draws `NUM_SAMPLES` independent single-trajectory gradients; each
# is compared with the exact gradient g.

# %%
study = gv.toy_study(NOISE_LEVELS, NUM_SAMPLES, seed=SEED)
rows = study['rows']
levels = [f'a={a}' for a in NOISE_LEVELS]
names = ('analytic', 'ppo_analytic_advantage', 'ppo_sampled_logratio')
labels = {'analytic': 'analytic per-step KL (Eq. 11)',
          'ppo_analytic_advantage': 'PPO, advantage = −KL (Eq. 16–18)',
          'ppo_sampled_logratio': 'PPO, sampled log-ratio advantage'}
print(study['setting'])
print(f"{'level':8s} {'estimator':26s} {'var ratio':>10s} {'cos(mean, g)':>13s}"
      f" {'samples to cos 0.9':>19s}")
for level in ['ode'] + levels:
  for name, r in rows[level].items():
    if name in names:
      print(f"{level:8s} {name:26s} {r['variance_ratio_to_analytic']:10.1f} "
            f"{r['cosine_of_mean']:13.3f} {r['samples_to_cosine_0.9']:19.1f}")

# %% [markdown]
# ## Variance and samples needed, against the noise level
# Left: the trace of each estimator's covariance relative to the analytic one (log scale).
# Right: how many trajectories a batch mean needs to point within cos 0.9 of the true gradient.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name in names:
  ratio = [rows[lv][name]['variance_ratio_to_analytic'] for lv in levels]
  need = [rows[lv][name]['samples_to_cosine_0.9'] for lv in levels]
  axes[0].plot(NOISE_LEVELS, ratio, 'o-', label=labels[name])
  axes[1].plot(NOISE_LEVELS, need, 'o-', label=labels[name])
axes[1].axhline(rows['ode']['analytic']['samples_to_cosine_0.9'], color='k', ls=':',
                label='analytic, ODE sampler')
for ax, title in zip(axes, ('covariance trace / analytic', 'trajectories for cos 0.9')):
  ax.set_xlabel('noise level a')
  ax.set_yscale('log')
  ax.set_title(title)
  ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## One gradient coordinate, up close
# The mean of the drawn gradients ± two standard errors against the exact value, per estimator,
# at a = 0.7 (the paper's noise level): every estimator is centred on the truth; the PPO-style
# ones need far more samples to say so.

# %%
ws, wt = gv.toy_params(SEED)
sigmas = gv.flow_match_sigmas(10, 3.0)
spec = gv.KernelSpec('flow_grpo', 0.7)
exact = gv.toy_exact_gradient(ws, wt, sigmas, spec, 9)
keys = jax.random.split(jax.random.PRNGKey(SEED + 1), NUM_SAMPLES)
coord = int(np.argmax(np.abs(exact)))
fig, ax = plt.subplots(figsize=(6, 3.5))
means = {}
for i, name in enumerate(names):
  grads = np.asarray(gv.toy_gradients(name, ws, wt, sigmas, spec, 9, keys))[:, coord]
  means[name] = (grads.mean(), grads.std(ddof=1) / np.sqrt(len(grads)))
  ax.errorbar([i], [means[name][0]], yerr=[2 * means[name][1]], fmt='o', capsize=4)
ax.axhline(exact[coord], color='k', ls='--', label='exact gradient')
ax.set_xticks(range(len(names)), [labels[n].split(' (')[0] for n in names], fontsize=8)
ax.set_title(f'gradient coordinate {coord} at a = 0.7 (mean ± 2 SE, {NUM_SAMPLES} draws)')
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the numbers say
# The checks below hold for the drawn samples (CI runs this notebook in quick mode and fails if
# they do not): the PPO-style estimators' covariance is many times the analytic one at every
# noise level, and the analytic mean points at the exact gradient.

# %%
for lv in levels:
  for name in names[1:]:
    assert rows[lv][name]['variance_ratio_to_analytic'] > 5, (lv, name)
  assert rows[lv]['analytic']['cosine_of_mean'] > 0.95, lv
analytic_mean, analytic_se = means['analytic']
assert abs(analytic_mean - exact[coord]) < 4 * analytic_se + 1e-6
print('ratios at a = 0.7:', {n: round(rows['a=0.7'][n]['variance_ratio_to_analytic'], 1)
                             for n in names})
