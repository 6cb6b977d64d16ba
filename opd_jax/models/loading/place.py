"""Checking a checkpoint against a model's abstract state, then placing it on devices.

The model is built abstractly (`nnx.eval_shape`: shapes, dtypes and logical-axis metadata, no
memory). Every expected key is looked up in the checkpoint before a single tensor is read, and all
problems — missing keys, unexpected keys, shape mismatches — are reported in one error. Tensors are
then read one at a time, converted to our layout and dtype, and placed with their target sharding
(`jax.make_array_from_callback`, so each device receives only its own shard).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import numpy as np
from flax import nnx

from opd_jax.models.loading import name_map
from opd_jax.models.loading.safetensors_io import CheckpointError, CheckpointReader

# None (default device), one Sharding for everything, a nested dict of Shardings with the
# structure of `nnx.to_pure_dict(state)` (e.g. `opd_jax.parallel.sharding.state_shardings`), or
# a function (path, variable) → Sharding.
Shardings = Union[None, jax.sharding.Sharding, Mapping, Callable[[tuple, nnx.Variable], Any]]

_MAX_LISTED = 20


class WeightMismatchError(CheckpointError):
  """The checkpoint's keys or shapes do not match the model built from its config."""


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f'\n    … and {len(items) - len(shown)} more' if len(items) > len(shown) else ''
  return f'  {title} ({len(items)}):\n' + '\n'.join(f'    {s}' for s in shown) + more


def sharding_for(shardings: Shardings, path: tuple, variable: nnx.Variable):
  """The target sharding of the parameter at `path` (None: the default device)."""
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if callable(shardings) and not isinstance(shardings, Mapping):
    return shardings(path, variable)
  node = shardings
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f'no sharding given for parameter {"/".join(map(str, path))}')
    node = node[key]
  return node


def place(array: np.ndarray, sharding) -> jax.Array:
  """Puts a host array on devices; with a sharding each device gets only its slice."""
  if sharding is None:
    return jax.device_put(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def check_checkpoint(reader: CheckpointReader, abstract: nnx.State, renames=(),
                     what: str = 'model') -> dict[str, tuple]:
  """Validates keys and shapes; returns {torch key: NNX path}.

  Raises:
    WeightMismatchError: listing every missing, unexpected and mis-shaped tensor.
  """
  expected: dict[str, tuple] = {}
  shapes: dict[str, tuple] = {}
  for path, variable in nnx.to_flat_state(abstract):
    key = name_map.torch_key(path, renames)
    if key in expected:
      raise ValueError(f'two parameters map to {key}: {expected[key]} and {path}')
    expected[key] = path
    shapes[key] = name_map.torch_shape(path, variable.get_value().shape)
  present = set(reader.keys())
  missing = sorted(f'{k} {list(shapes[k])}' for k in expected if k not in present)
  unexpected = sorted(f'{k} {list(reader.shape(k))}' for k in present - set(expected))
  mismatched = sorted(f'{k}: checkpoint {list(reader.shape(k))}, model expects {list(shapes[k])}'
                      for k in expected if k in present and reader.shape(k) != shapes[k])
  if missing or unexpected or mismatched:
    parts = [f'checkpoint does not match the {what} built from its config:']
    for title, items in (('missing', missing), ('unexpected', unexpected),
                         ('shape mismatch', mismatched)):
      if items:
        parts.append(_listing(title, items))
    raise WeightMismatchError('\n'.join(parts))
  return expected


def load_state(reader: CheckpointReader, abstract: nnx.State, *, renames=(),
               shardings: Shardings = None, what: str = 'model') -> nnx.State:
  """Fills an abstract State (from `nnx.eval_shape`) with checkpoint tensors.

  Args:
    reader: the open checkpoint.
    abstract: State whose Variables hold ShapeDtypeStructs; its metadata is kept.
    renames: the model's module renames (`name_map.module_name`).
    shardings: target placement (see `Shardings`).
    what: model name used in error messages.

  Returns:
    A State of the same structure holding device arrays in the abstract dtypes.
  """
  keys = check_checkpoint(reader, abstract, renames, what)
  by_path = {path: key for key, path in keys.items()}
  flat = []
  for path, variable in nnx.to_flat_state(abstract):
    spec = variable.get_value()
    array = name_map.from_torch(path, reader.read(by_path[path]))
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != 'bfloat16':
      raise WeightMismatchError(f'{by_path[path]} has dtype {array.dtype}, expected floating point')
    array = np.asarray(array.astype(spec.dtype), order='C')   # keeps 0-d tensors 0-d
    flat.append((path, variable.replace(place(array, sharding_for(shardings, path, variable)))))
  return nnx.from_flat_state(flat)
