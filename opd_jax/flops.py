"""Matrix-multiply FLOPs of a JAX program, counted from its jaxpr (shapes only, no compile).

XLA's `cost_analysis()` counts a while-loop body once (a `lax.scan` over 10 sampler steps, 24
scanned blocks or 3 tasks is counted as one iteration), so it cannot size a round. This walks
the jaxpr instead: every `dot_general` costs 2·(batch)·(free lhs)·(free rhs)·(contracted) FLOPs
and every convolution 2·(output elements)·(kernel elements per output); a `scan` multiplies its
body by its length, a `cond` takes its most expensive branch, a Pallas kernel (`pallas_call`)
counts its body once per grid point (the padded blocks it computes), a `shard_map` body (one
device's share, with that device's shapes) once per device it runs on, and every other
higher-order primitive (jit, remat, custom_jvp/vjp) is entered once. What the program computes is
what is counted — a rematerialised forward inside a backward pass counts again. Element-wise
work (norms, softmax, activations) is not counted; for transformers it is a few per cent.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  batch = math.prod(lhs[d] for d in lb)
  contract = math.prod(lhs[d] for d in lc)
  lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
  rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
  return 2 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> int:
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params['dimension_numbers'].rhs_spec     # (out feature, in feature, spatial…)
  per_output = math.prod(rhs[d] for d in spec[1:])
  return 2 * math.prod(out) * per_output // max(eqn.params['feature_group_count'], 1)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, core.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> int:
  """Matmul + convolution FLOPs of a (closed) jaxpr, loops multiplied out."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'scan':
      total += eqn.params['length'] * jaxpr_flops(eqn.params['jaxpr'])
    elif name == 'cond':
      total += max(jaxpr_flops(b) for b in eqn.params['branches'])
    elif name == 'pallas_call':   # the kernel body runs once per grid point (e.g. splash)
      total += math.prod(eqn.params['grid_mapping'].grid) * jaxpr_flops(eqn.params['jaxpr'])
    elif name == 'shard_map':     # the body is one device's share: count it on every device
      mesh = eqn.params['mesh']
      axes = eqn.params.get('newly_manual_axes') or eqn.params.get('manual_axes') or mesh.axis_names
      total += math.prod(mesh.shape[a] for a in axes) * jaxpr_flops(eqn.params['jaxpr'])
    elif name == 'while':
      raise ValueError('a while loop has no static trip count; count its body and multiply')
    else:
      total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
  return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> int:
  """Matmul FLOPs of one call fn(*args) — arrays or ShapeDtypeStructs; nothing is computed."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
