"""Aesthetics reward (PickScore-like): a smooth preference score in [0, 1].

Three terms, each in [0, 1]:
- palette: how closely the image's coarse layout (4×4 block means) matches the ideal image of
  the prompt (`render.aesthetic_target`: its palette blended in its pattern, shaded by its mood);
  exp(−mean squared error / PALETTE_SCALE).
- smooth: exp(−mean squared Laplacian / SMOOTH_SCALE) over interior pixels. Linear blends have
  zero Laplacian, while sharp edges — glyph strokes, object outlines, noise — are penalised.
- vivid: mean chroma (max − min channel) / VIVID_SCALE, clipped: a generic liking for rich
  colour, like human-preference models' bias toward saturated images.

reward = 0.5·palette + 0.35·smooth + 0.15·vivid for aesthetics prompts. Prompts of other tasks
have no palette, so they get 0.65·smooth + 0.35·vivid: the reward is defined for any image.

The smoothness term is deliberately in tension with the other tasks: crisp 1-pixel glyph
strokes are exactly what it penalises most (text), and object edges cost a little
(composition). A teacher tuned only for this reward learns to blur and smooth, which is how
single-task teachers hurt other tasks in Table 1 (spec §6). The vivid term likewise pulls soft
or calm palettes past their target saturation, a mild reward-hacking direction.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from opd_jax.mini_world import grammar
from opd_jax.mini_world import render
from opd_jax.rewards import _inputs

PALETTE_SCALE = 0.01
SMOOTH_SCALE = 0.02
VIVID_SCALE = 0.6
WEIGHTS = {'palette': 0.5, 'smooth': 0.35, 'vivid': 0.15}
GENERIC_WEIGHTS = {'smooth': 0.65, 'vivid': 0.35}
_BLOCK = 4


def _block_means(images: np.ndarray) -> np.ndarray:
  b, h, w, c = images.shape
  return images.reshape(b, h // _BLOCK, _BLOCK, w // _BLOCK, _BLOCK, c).mean(axis=(2, 4))


@functools.lru_cache(maxsize=1024)
def _target_blocks(prompt: str) -> np.ndarray | None:
  spec = grammar.parse(prompt)
  if not isinstance(spec, grammar.AestheticsSpec):
    return None
  return _block_means(render.aesthetic_target(spec)[None])[0]


def aesthetics_terms(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """The three terms of the reward and a flag for prompts that have a palette.

  Args:
    images: float [B, H, W, 3] in [0, 1].
    prompts: B prompts of any task.

  Returns:
    dict of float32 [B]: 'palette' (0 where the prompt has none), 'smooth', 'vivid', and
    'has_palette' (1.0 for aesthetics prompts).
  """
  images, prompts = _inputs.check_images(images, prompts)
  targets = [_target_blocks(p) for p in prompts]
  has_palette = np.array([t is not None for t in targets])
  palette = np.zeros(len(prompts), np.float32)
  if has_palette.any():
    wanted = np.stack([t for t in targets if t is not None])
    err = ((_block_means(images[has_palette]) - wanted)**2).mean(axis=(1, 2, 3))
    palette[has_palette] = np.exp(-err / PALETTE_SCALE)
  lap = (4.0 * images[:, 1:-1, 1:-1] - images[:, :-2, 1:-1] - images[:, 2:, 1:-1]
         - images[:, 1:-1, :-2] - images[:, 1:-1, 2:])
  smooth = np.exp(-(lap**2).mean(axis=(1, 2, 3)) / SMOOTH_SCALE)
  chroma = images.max(-1) - images.min(-1)
  vivid = np.clip(chroma.mean(axis=(1, 2)) / VIVID_SCALE, 0.0, 1.0)
  return {'palette': palette, 'smooth': smooth.astype(np.float32),
          'vivid': vivid.astype(np.float32), 'has_palette': has_palette.astype(np.float32)}


def aesthetics_reward(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
  """Smooth preference score of images for their prompts (any task).

  Args:
    images: float [B, H, W, 3] in [0, 1].
    prompts: B prompts; aesthetics prompts are scored against their palette.

  Returns:
    float32 [B] in [0, 1].
  """
  t = aesthetics_terms(images, prompts)
  specific = sum(w * t[k] for k, w in WEIGHTS.items())
  generic = sum(w * t[k] for k, w in GENERIC_WEIGHTS.items())
  return np.where(t['has_palette'] > 0, specific, generic).astype(np.float32)
