"""How far the on-device (JAX) reward preprocessing is from the host (upstream) one, and what each
costs per image.

    python benchmarks/preprocess_gap.py [--n 32] [--height 512] [--width 512] [--reps 3]

Images: `--n` random-but-structured pictures (fixed seed): a smooth two-colour gradient with
random shapes drawn by PIL (filled and outlined ellipses, rectangles, polygons, 1–6 px lines),
then a smooth low-amplitude float perturbation and a little pixel noise, so that values lie off
the uint8 grid as a generator's float output does.

For each reward of `opd_jax.rewards.preprocess.PREPROCESS` it reports, in normalised pixel units
(after (x − mean)/std; one uint8 step is 1/255/std ≈ 0.015), the max and mean |JAX − host| and
the fraction of values that differ, plus two reference variants that the JAX path does not use:

  jax.image.resize   `jax.image.resize` (antialiased Keys bicubic / linear) on the float image,
                     same crop/pad and normalisation, no uint8 step;
  float32 matrices   (PIL rewards only) Pillow's coefficients as one float32 matrix per pass, on
                     the uint8 image, rounding and clipping between passes (no fixed point).

Times are wall-clock per image on this machine: the JAX path jitted over the whole batch (compile
excluded, best of `--reps`), the host path image by image as upstream runs it.

The gap in score units needs the real reward towers: `preprocess.score_gap(score_fn, images,
name)` measures it once a score function exists.

Writes benchmarks/results/preprocess_gap.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from opd_jax.rewards import preprocess as pp   # noqa: E402

UINT8_STEP = 1 / 255 / min(pp.OPENAI_STD)


def structured_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """float32 [n, height, width, 3] in [0, 1]: gradients, PIL shapes and lines, float texture."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
  out = []
  for _ in range(n):
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = (1 - t[..., None]) * c0 + t[..., None] * c1
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(6, 16)):
      colour = tuple(int(v) for v in rng.integers(0, 256, 3))
      x0, x1 = sorted(rng.uniform(-0.1, 1.1, 2) * width)
      y0, y1 = sorted(rng.uniform(-0.1, 1.1, 2) * height)
      kind = rng.integers(0, 4)
      if kind == 0:
        draw.ellipse((x0, y0, x1, y1), fill=colour if rng.random() < 0.7 else None,
                     outline=colour, width=int(rng.integers(1, 5)))
      elif kind == 1:
        draw.rectangle((x0, y0, x1, y1), fill=colour if rng.random() < 0.7 else None,
                       outline=colour, width=int(rng.integers(1, 5)))
      elif kind == 2:
        points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height)))
                  for _ in range(int(rng.integers(3, 7)))]
        draw.polygon(points, fill=colour)
      else:
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 7)))
    pixels = np.asarray(image, np.float32) / 255
    phase = rng.uniform(0, 2 * np.pi, 3)
    pixels += 0.02 * np.sin(9 * xx[..., None] + 7 * yy[..., None] + phase)
    pixels += rng.normal(0, 0.004, pixels.shape)
    out.append(np.clip(pixels, 0, 1))
  return np.stack(out).astype(np.float32)


def resize_reference(name: str, images: jax.Array) -> jax.Array:
  """`jax.image.resize` variant: the same geometry, antialiased resize of the float image."""
  b, height, width, _ = images.shape
  mean, std = jnp.asarray(pp.OPENAI_MEAN), jnp.asarray(pp.OPENAI_STD)
  if name == 'hpsv2':
    new_h, new_w = pp.longest_edge_size(height, width)
    x = jax.image.resize(images, (b, new_h, new_w, 3), 'bicubic', antialias=True)
    top, left = (pp.SIZE - new_h) // 2, (pp.SIZE - new_w) // 2
    x = jnp.pad(x, ((0, 0), (top, pp.SIZE - new_h - top), (left, pp.SIZE - new_w - left),
                    (0, 0)))
    return (x - mean) / std
  new_h, new_w = pp.shortest_edge_size(height, width)
  method = 'linear' if name == 'clipscore' else 'bicubic'
  x = jax.image.resize(images, (b, new_h, new_w, 3), method, antialias=True)
  crop = pp.crop_start_round if name == 'clipscore' else pp.crop_start_floor
  top, left = crop(new_h, pp.SIZE), crop(new_w, pp.SIZE)
  return (x[:, top:top + pp.SIZE, left:left + pp.SIZE] - mean) / std


def float_matrix_reference(name: str, images: jax.Array) -> jax.Array:
  """Pillow's coefficients as float32 matrices, uint8 rounding between passes, no fixed point."""
  p = pp.plan(name, images.shape[1], images.shape[2])
  u = jnp.clip(jnp.round(images * 255), 0, 255)
  u = jnp.einsum('bhwc,ow->bhoc', u, p.cols.astype(np.float32))
  u = jnp.clip(jnp.round(u), 0, 255)
  u = jnp.einsum('bhwc,oh->bowc', u, p.rows.astype(np.float32))
  u = jnp.clip(jnp.round(u), 0, 255)
  return (u / 255 - jnp.asarray(pp.OPENAI_MEAN)) / jnp.asarray(pp.OPENAI_STD)


def gap(a: np.ndarray, b: np.ndarray) -> dict:
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return {'max': float(d.max()), 'mean': float(d.mean()),
          'frac_diff_over_1e-4': float((d > 1e-4).mean())}


def best_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--n', type=int, default=32)
  p.add_argument('--height', type=int, default=512)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--out_dir', default=os.path.join(ROOT, 'benchmarks', 'results'))
  args = p.parse_args(argv)
  images = structured_images(args.n, args.height, args.width)
  on_device = jnp.asarray(images)

  rows = []
  for name, fns in pp.PREPROCESS.items():
    jitted = jax.jit(fns.jax)
    jax_out = np.asarray(jitted(on_device))
    host_out = fns.host(images)
    row = {'reward': name, 'jax_vs_host': gap(jax_out, host_out),
           'resize_vs_host': gap(jax.jit(lambda x, n=name: resize_reference(n, x))(on_device),
                                 host_out)}
    if name in ('pickscore', 'aesthetic'):
      row['float_matrices_vs_host'] = gap(
          jax.jit(lambda x, n=name: float_matrix_reference(n, x))(on_device), host_out)
    row['jax_ms_per_image'] = 1e3 * best_time(lambda: jitted(on_device), args.reps) / args.n
    row['host_ms_per_image'] = 1e3 * best_time(lambda: fns.host(images), args.reps) / args.n
    rows.append(row)
    print(json.dumps(row), flush=True)

  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  meta = {'command': ' '.join(['python benchmarks/preprocess_gap.py'] + (argv or sys.argv[1:])),
          'images': f'{args.n} × {args.height}×{args.width} structured, seed 0',
          'commit': commit, 'uint8_step_normalised': UINT8_STEP,
          'machine': f'{platform.machine()} {os.cpu_count()}-core {platform.system()} host, '
                     f'jax {jax.__version__} on {jax.default_backend()}',
          'date': datetime.date.today().isoformat()}
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'preprocess_gap.json'), 'w') as f:
    json.dump({'rows': rows, 'meta': meta}, f, indent=2)

  def cell(g):
    return f'{g["max"]:.2g} / {g["mean"]:.2g} / {100 * g["frac_diff_over_1e-4"]:.3g} %'

  lines = ['# Reward preprocessing: JAX path vs host (upstream) path', '',
           f'`{meta["command"]}` on {meta["machine"]} ({meta["date"]}, commit {commit}). '
           f'{meta["images"]}. Gaps in normalised pixel units, max / mean / share of values '
           f'differing by > 1e-4 (one uint8 step ≈ {UINT8_STEP:.3f}). The rewards use the JAX '
           'path; the two reference columns are what simpler on-device resizes would give.', '',
           '| reward | JAX path vs host | jax.image.resize vs host | float32 PIL matrices vs host '
           '| JAX ms/image | host ms/image |', '|---|---|---|---|---|---|']
  for r in rows:
    fm = cell(r['float_matrices_vs_host']) if 'float_matrices_vs_host' in r else '—'
    lines.append(f'| {r["reward"]} | {cell(r["jax_vs_host"])} | {cell(r["resize_vs_host"])} | '
                 f'{fm} | {r["jax_ms_per_image"]:.2f} | {r["host_ms_per_image"]:.2f} |')
  lines += ['', 'Upstream = the scorers of NVlabs/DiffusionNFT (24af555, `flow_grpo/*_scorer.py`, '
            'run by its `scripts/evaluation.py`; torchvision 0.21, transformers 4.40, Pillow 10.4). '
            'Host path: pickscore / aesthetic = PIL bicubic on the uint8 image as the CLIP '
            'processor does (tested equal to `CLIPImageProcessorPil`); clipscore / hpsv2 = '
            "torchvision's antialiased float tensor resize, in numpy (tested against "
            '`torch.nn.functional.interpolate`). Score-unit gaps need the reward towers: '
            '`opd_jax.rewards.preprocess.score_gap(score_fn, images, name)`.']
  with open(os.path.join(args.out_dir, 'preprocess_gap.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return {'rows': rows, 'meta': meta}


if __name__ == '__main__':
  main()
