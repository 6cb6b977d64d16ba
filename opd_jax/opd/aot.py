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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

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
  policy = Policy(graphdef, config.student.kind, config.teachers.kind)
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
  prompts = check_global_batch(config, batch_axis_size(mesh))
  batch_sh = batch_shardings(mesh, negative)
  batch = {'cond': jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((num_tasks, prompts) + tuple(x.shape[1:]), x.dtype,
                                        sharding=s), negative, batch_sh['cond']),
      'teacher': jax.ShapeDtypeStruct((num_tasks,), jnp.int32, sharding=batch_sh['teacher'])}
  return AbstractRound(round_fn, state, frozen, batch)


def compile_round(config, mesh: Mesh, negative: dict):
  """The compiled round (`.memory_analysis()`, `.cost_analysis()`, callable on real inputs)."""
  return abstract_round(config, mesh, negative).lower().compile()


def memory_per_device(compiled) -> dict:
  """Bytes a device holds while the round runs, from the compiled program's memory analysis:
  arguments (state, frozen weights, batch) + outputs + temporaries − donated (aliased) bytes."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'alias',
                                                                 'temp', 'generated_code')}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out
