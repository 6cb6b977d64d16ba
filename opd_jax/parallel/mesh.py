"""Device mesh built once from config (axes data / fsdp / tensor).

`config.mesh.shape` maps axis names to sizes; one size may be -1 (take the remaining devices).
The batch is split over data × fsdp, parameters over fsdp (their embed dimension) and tensor
(heads / mlp), as set by the logical-axis rules in `opd_jax.parallel.sharding`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from opd_jax.errors import ConfigError

AXES = ('data', 'fsdp', 'tensor')


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills a single -1 entry and checks the product equals the device count."""
  unknown = [a for a in shape if a not in AXES]
  if unknown:
    raise ConfigError(f'config.mesh.shape: unknown axes {unknown}; allowed axes are {AXES}')
  try:
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
  except (TypeError, ValueError):
    raise ConfigError(f'config.mesh.shape: sizes must be integers, got {dict(shape)}') from None
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f'config.mesh.shape: at most one axis may be -1, got {free}')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ConfigError(f'config.mesh.shape: sizes must be positive or -1, got {sizes}')
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % known:
      raise ConfigError(f'config.mesh.shape: {sizes}: {num_devices} devices are not divisible '
                       f'by the fixed axes (product {known})')
    sizes[free[0]] = num_devices // known
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ConfigError(f'config.mesh.shape: {sizes} needs {int(np.prod(list(sizes.values())))} '
                     f'devices but {num_devices} are available')
  return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes AXES in that order."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  grid = np.asarray(devices).reshape([sizes[a] for a in AXES])
  return Mesh(grid, AXES)


def batch_axis_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data × fsdp)."""
  return mesh.shape['data'] * mesh.shape['fsdp']
