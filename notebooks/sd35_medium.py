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
# # DiffusionOPD on SD3.5-Medium, on a TPU or GPU runtime
#
# The paper's real setting through the same library as the mini world: Stable Diffusion 3.5
# Medium at 512 px, the three task teachers as LoRA adapters (GenEval composition, OCR text,
# PickScore-style aesthetics), the student LoRA distilled from all three on its own rollouts
# (`configs/opd_sd35m.py`, the released recipe), then samples of the base, each teacher and the
# student, scored by the real rewards.
#
# Steps: **weights** (a local folder, or a hub id downloaded when the runtime is online — the
# released teachers are `quanhaol/DiffusionOPD/{GenEval,OCR,Aes}Teacher`) → **a device mesh**
# from the runtime's devices → **the prompt-embedding cache** (CLIP-L + CLIP-G + T5, as
# diffusers' `StableDiffusion3Pipeline.encode_prompt`) → **a few OPD rounds** with the loss and
# the per-step KL → **samples** → **real rewards** (OCR in-process; PickScore, CLIPScore, HPSv2.1
# when their weights are given; GenEval needs its detector service: `opd_jax.evaluate`).
#
# **Hardware.** A TPU slice (v5e-8 fits the recipe round: README "Does the round fit a TPU?",
# measured by compiling it) or a large-memory GPU (not measured: no GPU was available to this
# repository); the prompt encoder loads T5-XXL in float32 (~20 GB of host memory).
# SD3.5-Medium is gated on the hub: accept its licence and log in (`hf auth login` or `HF_TOKEN`)
# before a hub id can download it.
#
# **Without weights** every cell that needs them prints why it is skipped, so the notebook runs
# top to bottom anyway. `OPD_NOTEBOOK_TINY=1` instead writes a tiny random SD3.5-architecture
# pipeline and random teachers (`opd_jax.tools.tiny_sd3`) and runs every cell on them in about a
# minute on a CPU — the code path of the real run, images that mean nothing (CI does this).

# %% [markdown]
# ## Install
# The cell below installs the pinned requirements when `opd_jax` is not importable yet. Opened
# from a clone it uses that clone; opened alone (Colab from GitHub), it clones the repository from
# `REPO_URL` first. On a TPU runtime install
# JAX's TPU build afterwards (`pip install "jax[tpu]==0.10.2"`), on a GPU runtime its CUDA build
# (`pip install "jax[cuda12]==0.10.2"`), and restart the kernel.

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
# `MODEL`: a diffusers SD3.5-Medium folder or the hub id
# `stabilityai/stable-diffusion-3.5-medium`. `TEACHERS`: one PEFT LoRA folder (or hub id) per
# task; `OPD_SD35_RELEASED=1` picks the released ones. `REWARD_FOLDERS`: the aesthetics reward's
# weights as transformers CLIP folders (PickScore_v1, openai CLIP-L/14, HPSv2.1 converted by
# `python -m opd_jax.tools.convert_clip`); '' skips that reward. `TRAIN_PROMPTS`: one prompt file
# per task (the formats of `opd_jax.tools.encode_prompts`); '' uses the few example prompts
# below. The environment variables let a job set them without editing the notebook.

# %%
QUICK = os.environ.get('OPD_NOTEBOOK_QUICK', '0') == '1'
TINY = os.environ.get('OPD_NOTEBOOK_TINY', '0') == '1'
TASKS = ('composition', 'text', 'aesthetics')
RELEASED = {'composition': 'quanhaol/DiffusionOPD/GenEvalTeacher',
            'text': 'quanhaol/DiffusionOPD/OCRTeacher',
            'aesthetics': 'quanhaol/DiffusionOPD/AesTeacher'}
RELEASED_STUDENT = 'quanhaol/DiffusionOPD/Student'
USE_RELEASED = os.environ.get('OPD_SD35_RELEASED', '0') == '1'

MODEL = os.environ.get('OPD_SD35_MODEL', '')
TEACHERS = {t: os.environ.get(f'OPD_SD35_TEACHER_{t.upper()}',
                              RELEASED[t] if USE_RELEASED else '') for t in TASKS}
REWARD_FOLDERS = {k: os.environ.get(f'OPD_SD35_{k.upper()}', '')
                  for k in ('pickscore', 'clip', 'hpsv2')}
TRAIN_PROMPTS = {t: '' for t in TASKS}
ROUNDS = 6 if TINY else 2 if QUICK else 20     # OPD rounds (the recipe trains 2000)
SAMPLES_PER_TASK = 2 if QUICK or TINY else 4
SEED = 0
WORKDIR = os.environ.get('OPD_NOTEBOOK_WORKDIR',
                         os.path.join('runs', 'notebook_sd35' + ('_tiny' if TINY else '')))

# Example prompts (not from any evaluation set). The sample prompts are a separate 'test' split.
EXAMPLE_PROMPTS = {
    'composition': ['a photo of two cups', 'a photo of a red bench and a blue bicycle',
                    'a photo of a dog left of a chair', 'a photo of three apples',
                    'a photo of a green vase', 'a photo of a cat above a laptop'],
    'text': ['a shop sign that says "FRESH BREAD"', 'a poster with the word "SUMMER"',
             'a coffee mug printed with "GOOD MORNING"', 'a street sign reading "OAK AVE"',
             'a birthday cake with "HAPPY 30" written in icing', 'a neon sign saying "OPEN"'],
    'aesthetics': ['a lighthouse on a cliff at sunset, oil painting',
                   'a cozy reading nook with warm light and plants',
                   'a fox in a snowy forest, soft morning light',
                   'a futuristic city skyline at night with reflections',
                   'a bowl of ramen, studio food photography',
                   'an astronaut floating above a coral reef, digital art'],
}
SAMPLE_PROMPTS = {
    'composition': ['a photo of two bananas', 'a photo of an orange clock and a white sink',
                    'a photo of a horse right of a bus', 'a photo of four donuts'],
    'text': ['a wooden sign that says "WELCOME HOME"', 'a t-shirt printed with "NO BUGS"',
             'a book cover titled "THE LAST ROUND"', 'a chalkboard with "LUNCH 12PM"'],
    'aesthetics': ['a quiet harbour at dawn, watercolor', 'a hummingbird near red flowers',
                   'a mountain cabin under the northern lights', 'a still life of pears'],
}

# %%
import json

import jax
import matplotlib.pyplot as plt
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from configs import opd_sd35m
from opd_jax.models.loading.hub import PIPELINE_FILES, resolve_pretrained
from opd_jax.models.loading.pretrained import vae_config
from opd_jax.opd.trainer import train_opd
from opd_jax.parallel.mesh import make_mesh
from opd_jax.sample import generate
from opd_jax.tools import tiny_sd3
from opd_jax.tools.encode_prompts import write_prompt_embeddings

tfds.disable_progress_bar()   # the prompt cache is a TFDS dataset: one line per split otherwise
print('devices:', jax.devices())

# %% [markdown]
# ## Weights
# Local folders are used as they are; hub ids are downloaded once into the hub cache (only the
# pipeline's folders, not the single-file checkpoint next to them). With `OPD_NOTEBOOK_TINY=1`
# a tiny random pipeline and random teachers are written instead.

# %%
if TINY:
  tiny_dir = os.path.join(WORKDIR, 'tiny_models')
  if not os.path.exists(tiny_dir):
    tiny_sd3.write_all(tiny_dir, TASKS)
  MODEL = os.path.join(tiny_dir, 'sd35')
  TEACHERS = {t: os.path.join(tiny_dir, f'teacher_{t}') for t in TASKS}

MISSING = [name for name, value in [('MODEL', MODEL)] + [(f'TEACHERS[{t!r}]', p)
                                                         for t, p in TEACHERS.items()]
           if not value]
READY = not MISSING


def ready(step: str) -> bool:
  """Whether the weights are there; otherwise one line saying why `step` is skipped."""
  if not READY:
    print(f'{step}: skipped — set {", ".join(MISSING)} (Parameters cell), or '
          'OPD_NOTEBOOK_TINY=1 to run on tiny random models')
  return READY


if ready('weights'):
  model_dir = resolve_pretrained(MODEL, 'MODEL', allow_patterns=PIPELINE_FILES)
  teacher_dirs = {t: resolve_pretrained(p, f'TEACHERS[{t!r}]') for t, p in TEACHERS.items()}
  print('base:', model_dir)
  for t, d in teacher_dirs.items():
    print(f'teacher {t}:', d)

# %% [markdown]
# ## A device mesh from the runtime's devices
# One `Mesh` over every device: the batch is split over `data` × `fsdp` and the frozen base, the
# LoRA and the optimizer state are sharded over `fsdp` (README "Sharding"). On a TPU the
# generation picks the micro-batches that fit its HBM (`configs/opd_sd35m.py: MICROBATCHES`).

# %%
devices = jax.devices()
kind = devices[0].device_kind
TPU_GENERATIONS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5': 'v5p',
                   'TPU v5p': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e'}
variant = TPU_GENERATIONS.get(kind, '')
mesh = make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1}, devices)
print(f'{len(devices)} × {kind} → mesh {dict(mesh.shape)}; config variant {variant or "default"}')

# %% [markdown]
# ## The prompt-embedding cache
# The student, teachers and sampler read prompt embeddings, not text: the three text encoders
# run once here (torch, float32, on the host) and their outputs are written as a TFDS cache, one
# `train` split per task for OPD and a `test` split of the sample prompts.

# %%
if ready('prompt cache'):
  prompt_dir = os.path.join(WORKDIR, 'prompts')
  os.makedirs(prompt_dir, exist_ok=True)
  files = {}
  for task in TASKS:
    train = TRAIN_PROMPTS[task]
    if not train:
      train = os.path.join(prompt_dir, f'{task}_train.txt')
      with open(train, 'w') as f:
        f.write('\n'.join(EXAMPLE_PROMPTS[task]) + '\n')
    test = os.path.join(prompt_dir, f'{task}_test.txt')
    with open(test, 'w') as f:
      f.write('\n'.join(SAMPLE_PROMPTS[task][:SAMPLES_PER_TASK]) + '\n')
    files[task] = {'train': train, 'test': test}
  cache_dir = os.path.join(WORKDIR, 'prompt_cache')
  meta = write_prompt_embeddings(model_dir, files, cache_dir,
                                 max_sequence_length=8 if TINY else 128, overwrite=True)
  print(json.dumps({t: meta['tasks'][t]['splits'] for t in TASKS}, indent=1)[:600])

# %% [markdown]
# ## A few OPD rounds
# `configs/opd_sd35m.py` is the released recipe: 10-step Euler ODE rollouts at CFG 4.5, each
# teacher at its own CFG (GenEval 1.0, OCR and aesthetics 4.5), the per-step mean-matching KL
# (Eq. 12) on 9 of the 10 steps, one AdamW step per round over the three tasks, the released
# EMA rule, bfloat16 network with float32 sampler and KL math. Only the run length is changed
# here. The progress bar shows the loss live; `metrics.jsonl` keeps every round, and the EMA
# student is exported in PEFT format to `student_peft/`.

# %%
if ready('OPD'):
  c = opd_sd35m.get_config(variant or None)
  c.seed = SEED
  c.base.path = model_dir
  for task in TASKS:
    c.teachers.tasks[task].path = teacher_dirs[task]
  c.data.embeddings_dir = cache_dir
  c.mesh.shape = {'data': 1, 'fsdp': -1, 'tensor': 1}
  c.train.update(num_steps=ROUNDS, checkpoint_every=ROUNDS)
  if TINY:   # the tiny pipeline's sizes, float32, and a visible change in a few rounds
    c.model.update(latent_size=8, latent_channels=4, dtype='float32', param_dtype='float32')
    c.lora.update(rank=4, alpha=8.0)
    c.data.batch_size_per_device = 2
    c.train.num_microbatches = 2
    c.optimizer.lr = 2e-2
    c.ema.update(every=1, updates_per_step=1)
  run_dir = os.path.join(WORKDIR, 'opd')
  state, last_metrics = train_opd(c, run_dir, mesh=mesh)
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  kl_keys = sorted((k for k in rows[0] if k.startswith('kl_per_step/')),
                   key=lambda k: int(k.split('/')[1]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
  axes[0].plot([r['step'] for r in rows], [r['loss'] for r in rows], 'o-')
  axes[0].set_xlabel('round')
  axes[0].set_ylabel('OPD loss')
  for r in (rows[0], rows[-1]):
    axes[1].plot(range(len(kl_keys)), [r[k] for k in kl_keys], 'o-', label=f'round {r["step"]}')
  axes[1].set_xlabel('sampler step j')
  axes[1].set_ylabel('KL_j (batch mean)')
  axes[1].legend()
  plt.tight_layout()
  plt.show()

# %% [markdown]
# ## Samples: base, teacher and student
# `opd_jax.sample.generate` runs what diffusers' pipeline runs (the scheduler's shifted schedule,
# Euler ODE steps, CFG with the empty prompt, the VAE decode) with the JAX models and an optional
# PEFT adapter; image i comes from key fold_in(seed, i). Evaluation settings: 40 steps, CFG 4.5
# (each teacher at its own CFG), 512 px, bfloat16 weights. With the released weights,
# `OPD_SD35_RELEASED=1` also samples the released student.

# %%
if ready('samples'):
  vae_factor = 2 ** (len(vae_config(model_dir).block_out_channels) - 1)   # as sample.generate
  resolution = c.model.latent_size * vae_factor if TINY else 512
  steps = 4 if TINY else 40
  models = {'base': (None, None), 'student': (os.path.join(run_dir, 'student_peft'), None)}
  if USE_RELEASED:
    models['released student'] = (resolve_pretrained(RELEASED_STUDENT, 'RELEASED_STUDENT'), None)
  samples = {}
  for task in TASKS:
    rows_for_task = dict(models)
    rows_for_task[f'{task} teacher'] = (teacher_dirs[task], c.teachers.tasks[task].cfg_scale)
    for name, (adapter, cfg) in rows_for_task.items():
      out = os.path.join(WORKDIR, 'samples', name.replace(' ', '_'), task)
      paths = generate(model_dir, cache_dir, out, adapter=adapter, task=task, split='test',
                       steps=steps, cfg=cfg or c.eval.cfg_scale, seed=SEED,
                       resolution=resolution, batch_size=SAMPLES_PER_TASK,
                       dtype='float32' if TINY else 'bfloat16')
      samples[name, task] = paths
  names = list(models) + ['teacher']
  for task in TASKS:
    fig, axes = plt.subplots(len(names), SAMPLES_PER_TASK, squeeze=False,
                             figsize=(2.4 * SAMPLES_PER_TASK, 2.4 * len(names)))
    for i, name in enumerate(names):
      key = (f'{task} teacher' if name == 'teacher' else name, task)
      for j, path in enumerate(samples[key]):
        axes[i, j].imshow(Image.open(path))
        axes[i, j].set_xticks([])
        axes[i, j].set_yticks([])
        if j == 0:
          axes[i, j].set_ylabel(key[0])
        if i == 0:
          axes[i, j].set_title(SAMPLE_PROMPTS[task][j][:28], fontsize=8)
    fig.suptitle(task)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## Real rewards
# The text samples are scored by the OCR reward (PP-OCRv4 through `rapidocr-onnxruntime`, whose
# models ship in its wheel: no download); the aesthetics samples by PickScore, CLIPScore and
# HPSv2.1 when their folders are set. GenEval's composition score needs its object detector,
# which runs as a service where mmdetection installs (`opd_jax.eval.detector_service`); the full
# Table 1 protocol is `python -m opd_jax.evaluate --config=configs/eval_sd35m.py`.

# %%
if ready('rewards'):
  from opd_jax.rewards.clip_rewards import load_reward
  from opd_jax.rewards.ocr import OCRScorer

  def load_images(paths):
    return np.stack([np.asarray(Image.open(p).convert('RGB')) for p in paths])

  scorers = {'text': {'ocr': OCRScorer()}, 'aesthetics': {}}
  folder_of = {'pickscore': 'pickscore', 'clipscore': 'clip', 'hpsv2': 'hpsv2'}
  for reward, key in folder_of.items():
    if REWARD_FOLDERS[key]:
      scorers['aesthetics'][reward] = load_reward(reward, {key: REWARD_FOLDERS[key]})
    else:
      print(f'{reward}: skipped — REWARD_FOLDERS[{key!r}] is not set')
  scores = {}
  for task, rewards in scorers.items():
    prompts = SAMPLE_PROMPTS[task][:SAMPLES_PER_TASK]
    for name in names:
      key = (f'{task} teacher' if name == 'teacher' else name, task)
      images = load_images(samples[key])
      for reward, fn in rewards.items():
        scores[key[0], reward] = float(np.mean(fn(images, prompts)))
  for (model, reward), value in scores.items():
    print(f'{model:22s} {reward:10s} {value:8.3f}')

# %% [markdown]
# ## Checks
# What this run must show whatever the weights: the OPD rounds ran with a finite loss and the
# student was exported; every sample exists; every reward lies in its range. On the tiny models
# (lr 2e-2) the loss must also have fallen: the student moved towards its teachers.

# %%
if ready('checks'):
  assert [r['step'] for r in rows] == list(range(1, ROUNDS + 1))
  assert all(np.isfinite(r['loss']) for r in rows)
  assert os.path.exists(os.path.join(run_dir, 'student_peft', 'adapter_config.json'))
  assert all(os.path.exists(p) for paths in samples.values() for p in paths)
  assert all(0.0 <= v <= 1.0 for (m, r), v in scores.items() if r == 'ocr')
  print(f'loss: round 1 {rows[0]["loss"]:.4g} → round {ROUNDS} {rows[-1]["loss"]:.4g}')
  if TINY:
    assert rows[-1]['loss'] < 0.7 * rows[0]['loss']
  print('checks passed')
