"""Velocity functions of student and teachers built from separate parameter pytrees.

The network is one NNX graphdef; parameters travel as pure dicts (`nnx.to_pure_dict`):
  base      frozen base weights (nnx.Param)
  adapter   one LoRA adapter (LoRAParam), or {} for a network without LoRA slots
Students and teachers are either 'lora' (base + their adapter) or 'full' (their own full base
weights + a zero adapter). Teachers are stacked on a leading slot axis and picked with a traced
index, so a jitted round can route every task to its own teacher without recompiling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from opd_jax.models.lora import select_adapter, zeros_like_adapter
from opd_jax.parallel.sharding import batch_sharded_activations, constrain_batch
from opd_jax.sampling.guidance import VelocityFn

KINDS = ('lora', 'full')


@dataclasses.dataclass(frozen=True)
class Policy:
  """Binds a graphdef to parameter pytrees. Static (hashable) so it can close over jit.

  `batch_sharding` (a NamedSharding splitting the leading axis over the mesh's batch axes, or
  None) pins the network's inputs, output and — inside the network, where it calls
  `parallel.sharding.constrain_batch` — its residual streams to batch sharding. Without it XLA
  may keep the activations of an fsdp-sharded network replicated over the fsdp axis, so a
  device's temporaries grow with the device count at a fixed batch per device (measured on CPU
  devices: 3.1× from 2 to 8 devices, `tests/test_opd_aot.py`; the SD3.5-M round on v5e-64:
  refused at 55 G, `benchmarks/results/tpu_activation_sharding/`).
  """
  graphdef: Any
  student_kind: str = 'lora'
  teacher_kind: str = 'lora'
  batch_sharding: Any = None

  def velocity(self, base: Any, adapter: Any) -> VelocityFn:
    graphdef, sharding = self.graphdef, self.batch_sharding

    def fn(x, timestep, cond):
      model = nnx.merge(graphdef, base, adapter)
      with batch_sharded_activations(sharding):
        x, timestep, cond = constrain_batch((x, timestep, cond))
        return constrain_batch(model(x, timestep, **cond))
    return fn

  def zero_adapter(self, student_params: Any, frozen: dict) -> Any:
    """A no-op adapter of the network's adapter structure ({} when it has no LoRA slots)."""
    if self.student_kind == 'lora':
      return zeros_like_adapter(student_params)
    if self.teacher_kind == 'lora':
      return zeros_like_adapter(select_adapter(frozen['teachers'], 0))
    return {}

  def student_velocity(self, params: Any, frozen: dict) -> VelocityFn:
    if self.student_kind == 'lora':
      return self.velocity(frozen['base'], params)
    return self.velocity(params, self.zero_adapter(params, frozen))

  def teacher_velocity(self, index: jax.Array, frozen: dict, student_params: Any) -> VelocityFn:
    teacher = select_adapter(frozen['teachers'], index)
    if self.teacher_kind == 'lora':
      return self.velocity(frozen['base'], teacher)
    return self.velocity(teacher, self.zero_adapter(student_params, frozen))
