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
# # DiffusionOPD in ten minutes: the mini world end to end
#
# On-policy distillation of several RL-trained task teachers into one diffusion student, on the
# repository's embedded **mini world**: 16×16 images, three tasks with rule-based rewards
# (composition: GenEval-style objects, counts and relations; text: OCR-style edit distance;
# aesthetics: a preference-style score), a small DiT base that ships with the repository.
#
# The notebook runs the recipe of `python -m opd_jax.main --config=configs/opd.py` through its
# Python API: the shipped base, one RL teacher per task, the OPD student distilled from all
# three, then the held-out report. Every step is the library's public API.
#
# **Hardware:** CPU by default (the full settings train for a few minutes on 2 cores: the main
# command, which also trains the baselines, took 8 min 37 s; quick mode 100-180 s); JAX uses a
# GPU or TPU when the runtime has one. No downloads beyond pip.

# %% [markdown]
# ## Install
# The cell below installs the pinned requirements when `opd_jax` is not importable yet and works
# from the repository root (the recipe writes under `runs/`). Opened from a clone it uses that
# clone; opened alone (Colab from GitHub), it clones the repository from `REPO_URL` first.

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
os.chdir(ROOT)
sys.path.insert(0, ROOT)

# %% [markdown]
# ## Parameters
# `QUICK` (the `OPD_NOTEBOOK_QUICK=1` environment variable, as CI sets it) trains each stage for
# a few steps and evaluates on a few prompts: it shows every step, not the method's effect.
# `KERNEL` is the student's sampler: `'ode'` (deterministic Euler, mean matching, Eq. 12) or
# `'flow_grpo'` (the SDE with noise level `NOISE_LEVEL`, the per-step Gaussian KL, Eq. 11).

# %%
QUICK = os.environ.get('OPD_NOTEBOOK_QUICK', '0') == '1'
KERNEL = 'ode'
NOISE_LEVEL = 0.7
SEED = 0
WORKDIR = os.environ.get('OPD_NOTEBOOK_WORKDIR',
                         os.path.join('runs', 'notebook_quickstart' + ('_quick' if QUICK else '')))

# %%
import json

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from configs import opd as recipe_config
from opd_jax.mini_world import grammar, render
from opd_jax.recipe.mini_world import run_mini_world
from opd_jax.rewards import composition_strict, get_reward

print('devices:', jax.devices())

# %% [markdown]
# ## The three tasks and their rewards
# Each prompt denotes a distribution of images. Top row: a correct rendering; bottom row: a
# deliberately imperfect one of the kind the base was pretrained on (half its data is like
# this, so the base starts below the ceiling). Titles give each image's reward.

# %%
rng = np.random.default_rng(SEED)
fig, axes = plt.subplots(2, 6, figsize=(13, 5))
for col, task in enumerate(('composition', 'composition', 'text', 'text', 'aesthetics',
                            'aesthetics')):
  prompt = grammar.prompt_set(task, 'test')[col % 2]
  good = render.render(prompt, rng)[None].astype(np.float32) / 255
  bad = render.render_imperfect(prompt, rng, corrupt_prob=1.0)[0][None].astype(np.float32) / 255
  reward = composition_strict if task == 'composition' else get_reward(task)
  for row, image in enumerate((good, bad)):
    ax = axes[row, col]
    ax.imshow(image[0], interpolation='nearest')
    ax.set_title(f'{reward(image, [prompt])[0]:.2f}', fontsize=9)
    ax.axis('off')
  axes[0, col].text(0, -5, prompt, fontsize=7, wrap=True)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The recipe's configuration
# `configs/opd.py` is the main command's config: a config-as-code `ConfigDict` whose sections
# are each stage's own config. Here: the shipped base, the three GRPO-Guard teachers (the paper
# trains its composition teacher with DiffusionNFT; configs/opd.py says why the mini world does
# not), the OPD student and the report.

# %%
c = recipe_config.get_config()
c.seed = SEED
c.stages = 'pretrain,teachers,opd,report'
c.opd.rollout.kernel = KERNEL
c.opd.rollout.noise_level = 0.0 if KERNEL == 'ode' else NOISE_LEVEL
c.opd.train.log_every = 1
if QUICK:
  for teacher in c.teachers.values():
    teacher.train.num_steps = 2
    teacher.train.checkpoint_every = 2
  c.opd.train.num_steps = 8
  c.opd.train.checkpoint_every = 8
  for e in (c.report.eval, c.report.curve_eval):
    e.max_prompts = 8
    e.num_steps = 10
    e.batch_size = 8
  c.report.eval.samples_per_prompt = 1
  c.report.curve_points = 2
  c.report.grid_prompts = 4
print('teachers:', {t: s.trainer for t, s in c.teachers.items()})
print('student sampler:', c.opd.rollout.kernel, 'a =', c.opd.rollout.noise_level,
      '| rounds:', c.opd.train.num_steps, '| teachers in turn:', c.opd.data.tasks)

# %% [markdown]
# ## Run the stages
# Each stage is cached under `WORKDIR/<stage>/` by its settings: running the cell again skips
# what is done, and changing a setting re-runs only what depends on it. Progress bars show each
# stage's training.

# %%
run_mini_world(c, WORKDIR)

# %% [markdown]
# ## The student's training: loss and the per-step KL
# The OPD loss is the per-step KL between the student's and each task's teacher's transition
# kernels at the states of the student's own rollouts, summed over the steps of the trajectory.
# Right: that KL step by step along the student's trajectories (batch mean), at the first and the
# last round: the method's central object.

# %%
with open(os.path.join(WORKDIR, 'opd', 'metrics.jsonl')) as f:
  rows = [json.loads(line) for line in f]
steps = sorted({r['step'] for r in rows})
first, last = rows[0], rows[-1]
kl_keys = sorted((k for k in first if k.startswith('kl_per_step/')),
                 key=lambda k: int(k.split('/')[1]))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].plot([r['step'] for r in rows], [r['loss'] for r in rows], 'o-')
axes[0].set_xlabel('round')
axes[0].set_ylabel('OPD loss')
for r, label in ((first, f'round {first["step"]}'), (last, f'round {last["step"]}')):
  axes[1].plot(range(len(kl_keys)), [r[k] for k in kl_keys], 'o-', label=label)
axes[1].set_xlabel('sampler step j')
axes[1].set_ylabel('KL_j (batch mean)')
axes[1].set_yscale('log')
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Before and after: the held-out report
# `report.md` leads with the verdict (each teacher's gain over the base ± its paired standard
# error, the fraction the student keeps); here the scores of every model and the sample grids
# (rows: base, teachers, student; columns: held-out prompts).

# %%
with open(os.path.join(WORKDIR, 'report.json')) as f:
  report = json.load(f)
tasks = report['tasks']
print(f"{'model':22s}" + ''.join(f'{t:>13s}' for t in tasks) + f"{'Average':>10s}")
for name, row in report['rows'].items():
  print(f'{name:22s}' + ''.join(f"{row['rewards'][t]:13.3f}" for t in tasks)
        + f"{row['average']:10.2f}")
for task in tasks:
  print(task)
  display(Image(os.path.join(WORKDIR, f'samples_{task}.png')))

# %% [markdown]
# ## Checks
# The student's per-step KL to its teachers fell during training (CI runs this notebook in quick
# mode and fails otherwise), and every model has a finite score on every task.

# %%
kl_first = sum(first[k] for k in kl_keys)
kl_last = sum(last[k] for k in kl_keys)
print(f'trajectory KL: round {first["step"]} {kl_first:.4g} → round {last["step"]} {kl_last:.4g}')
assert kl_last < kl_first
assert all(np.isfinite(row['rewards'][t]) for row in report['rows'].values() for t in tasks)
