"""Logical-axis sharding rules: parameter and activation names → mesh axes.

Parameters are annotated where they are defined (`logical_axes=` metadata on nnx Variables); the
rules below turn those names into PartitionSpecs. A dimension whose size is not divisible by its
mesh axis stays replicated, so one set of rules serves tiny test models and SD3.5-M alike.
Parameters travel through train states as pure dicts (`nnx.to_pure_dict`); optimizer moments
mirror them, so their shardings follow via `optax.tree_map_params`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical name → mesh axis (or tuple of axes); None = replicated.
DEFAULT_RULES: dict[str, Any] = {
    'batch': ('data', 'fsdp'),
    'embed': 'fsdp',
    'heads': 'tensor',
    'mlp': 'tensor',
    'kv': None,
    'length': None,
}


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> P:
  """PartitionSpec for an array of `shape` whose dimensions carry `logical` names."""
  if len(logical) != len(shape):
    raise ValueError(f'logical axes {tuple(logical)} do not match shape {tuple(shape)}')
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes = rules.get(name) if name is not None else None
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    # A mesh axis may appear once per spec; size-1 axes are skipped to keep specs readable.
    flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
    if flat and dim % _axis_size(mesh, flat) == 0:
      used.update(flat)
      spec.append(flat[0] if len(flat) == 1 else flat)
    else:
      spec.append(None)
  return P(*spec)


def _leaf_sharding(leaf, mesh: Mesh, rules, leading: int):
  if isinstance(leaf, nnx.Variable):
    value = leaf.get_value() if hasattr(leaf, 'get_value') else leaf.value
    shape = getattr(value, 'shape', ())
    logical = leaf.get_metadata().get('logical_axes')
    if logical is not None and len(shape) == len(logical) + leading:
      return NamedSharding(mesh, logical_to_spec((None,) * leading + tuple(logical), shape,
                                                 mesh, rules))
  return NamedSharding(mesh, P())


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES,
                    leading: int = 0) -> dict:
  """NamedShardings, as a pure dict, for an nnx State (Variables sharded by logical axes).

  The result has the structure of `nnx.to_pure_dict(state)`, the form parameters take in every
  train-state pytree. `leading` extra unnamed leading axes are allowed (e.g. the teacher-slot
  axis of stacked adapters); they stay replicated.
  """
  flat = [(path, _leaf_sharding(v, mesh, rules, leading)) for path, v in nnx.to_flat_state(state)]
  out: dict = {}
  for path, sharding in flat:
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = sharding
  return out


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0,
                   rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
  """Sharding of an activation/data array whose `batch_axis` is split over the batch axes."""
  spec = [None] * ndim
  axes = tuple(a for a in rules['batch'] if mesh.shape[a] > 1)
  spec[batch_axis] = axes if axes else None
  return NamedSharding(mesh, P(*spec))


def global_batch_array(mesh: Mesh, x: Any, batch_axis: int = 0) -> jax.Array:
  """A host array that every process holds whole → a global array split over the batch axes;
  each process contributes the slice its own devices own (one host or many)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim, batch_axis),
                                      lambda idx: x[idx])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# The batch sharding of the network being traced (set by `batch_sharded_activations`).
_ACTIVATION_BATCH: contextvars.ContextVar = contextvars.ContextVar('opd_jax_activation_batch',
                                                                  default=None)


@contextlib.contextmanager
def batch_sharded_activations(sharding: NamedSharding | None) -> Iterator[None]:
  """While a network is traced inside it, `constrain_batch` pins activations to `sharding` (the
  leading axis over the batch axes, `batch_sharding(mesh, 1)`); None leaves them to XLA.

  The network stays mesh-agnostic: the caller that knows the mesh (`models.policy.Policy`) opens
  this around the call. Without such pins, XLA's propagation inside the blocks' loops may give
  the residual streams another sharding than the batch (measured: per-device temporaries that
  grow with the fsdp device count at a fixed batch per device).
  """
  token = _ACTIVATION_BATCH.set(sharding)
  try:
    yield
  finally:
    _ACTIVATION_BATCH.reset(token)


def active_batch_sharding() -> NamedSharding | None:
  """The batch sharding opened by `batch_sharded_activations` around this trace, or None."""
  return _ACTIVATION_BATCH.get()


def constrain_batch(tree: Any) -> Any:
  """`tree`'s arrays with their leading (batch) axis pinned to the active batch sharding (see
  `batch_sharded_activations`); unchanged outside it. None leaves stay None."""
  sharding = _ACTIVATION_BATCH.get()
  if sharding is None:
    return tree
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)
