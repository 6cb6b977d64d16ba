"""The OPD round compiled ahead of time from shapes alone: its memory per device before any
weights exist, on any mesh — including the devices of a TPU topology that this host only
describes (`jax.experimental.topologies`, with libtpu installed).

`abstract_round(config, mesh, negative)` builds the same jitted round as `setup.build_opd`
(the same frozen-pytree and train-state shardings, `setup.frozen_shardings` / `setup.jit_round`)
but from ShapeDtypeStructs: the network is traced with `nnx.eval_shape`, teachers are the
student's adapter shapes stacked per task, and the batch is `negative`'s shapes with the
global prompts per task in front. `compile_round` lowers and compiles it; the compiled
program's `memory_analysis()` gives the bytes each device needs.

The config must be complete: `model.transformer` holds the network's sizes (for SD3.5-M the
checkpoint's config.json) and `rollout.shift` is explicit (no checkpoint is read).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opd_jax.errors import ConfigError
from opd_jax.flops import count_flops
from opd_jax.models.policy import Policy
from opd_jax.models.registry import build_model
from opd_jax.opd.config import check_global_batch
from opd_jax.opd.setup import batch_shardings, frozen_shardings, jit_round, round_spec
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import batch_axis_size


@dataclasses.dataclass
class AbstractRound:
  round_fn: Any     # the jitted round, as build_opd makes it
  state: Any        # ShapeDtypeStructs with shardings: TrainState
  frozen: dict      # … the frozen pytree
  batch: dict       # … one round's batch {'cond': [M, B, ...], 'teacher': [M]}

  def lower(self):
    return self.round_fn.lower(self.state, self.frozen, self.batch)


def _shaped(tree: Any, shardings: Any, leading: tuple[int, ...] = ()) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype,
                                                        sharding=s), tree, shardings)


def abstract_round(config, mesh: Mesh, negative: dict) -> AbstractRound:
  """The round of `config` on `mesh` from shapes; `negative`: the empty-prompt conditioning,
  arrays or ShapeDtypeStructs with a leading axis of 1 (e.g. SD3: context [1, 333, 4096],
  pooled [1, 2048])."""
  m, l = config.model, config.lora
  graphdef, base_state, lora_state = build_model(
      m, abstract=True, seed=config.seed, lora_rank=l.rank, lora_alpha=l.alpha,
      lora_init=l.init)
  policy = Policy(graphdef, config.student.kind, config.teachers.kind,
                  batch_sharding=shd.batch_sharding(mesh, 1))
  negative = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), negative)
  num_tasks = len(config.data.tasks)
  frozen_sh = frozen_shardings(config, mesh, base_state, lora_state, negative)
  base = nnx.to_pure_dict(base_state)
  teacher = nnx.to_pure_dict(lora_state if config.teachers.kind == 'lora' else base_state)
  frozen = {
      'base': _shaped(base, frozen_sh['base']),
      'teachers': _shaped(teacher, frozen_sh['teachers'], (num_tasks,)),
      'teacher_cfg': jax.ShapeDtypeStruct((num_tasks,), jnp.float32,
                                          sharding=frozen_sh['teacher_cfg']),
      'negative': _shaped(negative, frozen_sh['negative']),
  }
  if config.student.kind == 'lora':   # LoRA slots are float32 whatever the network's dtype
    student_sh = shd.state_shardings(lora_state, mesh)
    student = _shaped(nnx.to_pure_dict(lora_state), student_sh)
  else:
    student, student_sh = frozen['base'], frozen_sh['base']
  _, _, _, state, round_fn = jit_round(config, round_spec(config, policy), mesh, student,
                                       student_sh, frozen_sh, negative)
  batch = abstract_batch(mesh, negative, num_tasks, check_global_batch(config,
                                                                      batch_axis_size(mesh)))
  return AbstractRound(round_fn, state, frozen, batch)


def abstract_batch(mesh: Mesh, negative: dict, num_tasks: int, prompts: int) -> dict:
  """ShapeDtypeStructs of one round's batch (`setup.device_batch`'s shapes and shardings):
  `negative`'s conditioning with [num_tasks, prompts] in front, teacher slots [num_tasks]."""
  batch_sh = batch_shardings(mesh, negative)
  return {'cond': jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((num_tasks, prompts) + tuple(np.shape(x)[1:]), x.dtype,
                                        sharding=s), negative, batch_sh['cond']),
      'teacher': jax.ShapeDtypeStruct((num_tasks,), jnp.int32, sharding=batch_sh['teacher'])}


def compile_round(config, mesh: Mesh, negative: dict):
  """The compiled round (`.memory_analysis()`, `.cost_analysis()`, callable on real inputs)."""
  return abstract_round(config, mesh, negative).lower().compile()


def round_flops(abstract: AbstractRound) -> int:
  """Matmul FLOPs of one round over the global batch, counted from its jaxpr with every loop
  (tasks, micro-batches, sampler steps, scanned blocks) multiplied out (`opd_jax.flops`)."""
  return count_flops(abstract.round_fn, abstract.state, abstract.frozen, abstract.batch)


def memory_per_device(compiled) -> dict:
  """Bytes a device holds while the round runs, from the compiled program's memory analysis:
  arguments (state, frozen weights, batch) + outputs + temporaries − donated (aliased) bytes."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'alias',
                                                                 'temp', 'generated_code')}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


GIB = 2 ** 30
MEMORY_ADVICE = ('train.fused_vjp=True, more train.num_microbatches or train.timestep_chunks, '
                 'model.remat=True, or more devices on mesh fsdp')


def device_memory_limit(devices: Sequence[Any]) -> int | None:
  """Bytes a device can hold (the runtime's `bytes_limit`; the smallest over `devices`), or
  None where the runtime does not say (CPU)."""
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:   # the CPU client has no allocator statistics
      stats = None
    if stats and stats.get('bytes_limit'):
      limits.append(int(stats['bytes_limit']))
  return min(limits) if limits else None


def compile_within_memory(lowered, devices: Sequence[Any], limit_gib: float = 0.0):
  """Compiles a lowered round and checks, before any step runs, that a device can hold it.

  The limit is `limit_gib` when > 0 (config.train.memory_limit_gib), else the devices' own.
  A program that needs more — or that the compiler itself refuses for lack of memory (TPU) —
  raises a ConfigError with one line: the bytes needed, the bytes there, and what to change.
  Returns the compiled executable (call it instead of the jitted function: no second compile).
  """
  try:
    compiled = lowered.compile()
  except Exception as e:   # XlaRuntimeError: the TPU compiler refuses what cannot fit
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'out of memory' not in message.lower():
      raise
    first = message.strip().splitlines()[0][:200]
    raise ConfigError(f'config.train.num_microbatches: the OPD round does not fit a device '
                      f'({first}); lower the memory per device: {MEMORY_ADVICE}') from None
  limit = int(limit_gib * GIB) if limit_gib > 0 else device_memory_limit(devices)
  need = memory_per_device(compiled)['total']
  if limit is not None and need > limit:
    field, there = (('config.train.memory_limit_gib', 'allowed') if limit_gib > 0 else
                    ('config.train.num_microbatches', f'a {devices[0].device_kind} device has'))
    raise ConfigError(f'{field}: the compiled OPD round needs {_size(need)} per device, more '
                      f'than the {_size(limit)} {there}; lower the memory per device: '
                      f'{MEMORY_ADVICE}')
  return compiled


def _size(n: int) -> str:
  return f'{n / GIB:.2f} GiB' if n >= GIB // 10 else f'{n / 2 ** 20:.1f} MiB'
