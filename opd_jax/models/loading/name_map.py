"""NNX parameter paths ↔ diffusers state-dict keys, and the layout change between them.

Our modules carry diffusers' names, so a key is the NNX path joined with dots, with
  * the leaf `kernel` called `weight` (other leaves — bias, norm `weight`, `pos_embed` — keep
    their names), and
  * a model's regex renames applied to the module part (e.g. MMDiT's `ff.fc_in` → `ff.net.0.proj`).
Layouts: a linear kernel is [in, out] here and [out, in] in torch; a conv kernel is HWIO here
(NHWC convolutions) and OIHW in torch. Everything else is stored identically.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

Renames = Sequence[tuple[str, str]]


def module_name(path: Sequence[object], renames: Renames = ()) -> str:
  """diffusers module name of the module at NNX `path` (a tuple of attribute names/indices)."""
  name = '.'.join(str(p) for p in path)
  for pattern, repl in renames:
    name = re.sub(pattern, repl, name)
  return name


def torch_key(path: Sequence[object], renames: Renames = ()) -> str:
  """diffusers state-dict key of the parameter at NNX `path` (module path + leaf name)."""
  leaf = str(path[-1])
  leaf = 'weight' if leaf == 'kernel' else leaf
  module = module_name(path[:-1], renames)
  return f'{module}.{leaf}' if module else leaf


def _is_kernel(path: Sequence[object]) -> bool:
  return str(path[-1]) == 'kernel'


def torch_shape(path: Sequence[object], shape: Sequence[int]) -> tuple[int, ...]:
  """Shape the parameter at `path` with our `shape` has in a diffusers checkpoint."""
  shape = tuple(shape)
  if _is_kernel(path) and len(shape) == 2:
    return shape[::-1]
  if _is_kernel(path) and len(shape) == 4:
    h, w, i, o = shape
    return (o, i, h, w)
  return shape


def from_torch(path: Sequence[object], array: np.ndarray) -> np.ndarray:
  """A checkpoint tensor in our layout (inverse of `to_torch`)."""
  if _is_kernel(path) and array.ndim == 2:
    return array.T
  if _is_kernel(path) and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW → HWIO
  return array


def to_torch(path: Sequence[object], array: np.ndarray) -> np.ndarray:
  """One of our parameters in diffusers' layout."""
  if _is_kernel(path) and array.ndim == 2:
    return array.T
  if _is_kernel(path) and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)  # HWIO → OIHW
  return array
