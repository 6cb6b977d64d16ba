"""The OPD trainer: one jitted round per step inside the shared training loop.

`train_opd(config, workdir)` is what `opd_jax.main` runs for `trainer: 'opd'`; tests, benchmarks
and notebooks call it directly. Inputs come from `opd.sources`, the sharded state and the jitted
round from `opd.setup`; the loop (`opd_jax.train.loop`) does progress, metrics, checkpoints,
resume, NaN and preemption handling. A LoRA student can be exported in PEFT format at the end.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections

from opd_jax.opd import aot
from opd_jax.opd import config as opd_config
from opd_jax.opd.setup import OPDSetup, build_opd, device_batch
from opd_jax.opd.sources import load_inputs
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.train import loop
from opd_jax.train.probe import Probe


@dataclasses.dataclass
class OPDTrainer:
  """The `loop.Trainer` of OPD: a step is one round over every task."""
  setup: OPDSetup
  source: Any                      # the prompt source
  fingerprint: dict
  config: ml_collections.ConfigDict
  round: Any = None                # the compiled round (`compile`; None: setup's jit)
  name: str = 'opd'

  @property
  def abstract_state(self):
    return self.setup.abstract_state

  @property
  def metric_names(self) -> dict:
    return {'kl_per_task': list(self.config.data.tasks),
            'kl_per_step': [str(j) for j in range(self.setup.spec.num_train_steps)]}

  def init_state(self):
    return self.setup.init_state()

  def compile(self) -> None:
    """Compiles the round from shapes (`opd.aot`): a round that cannot fit a device stops here,
    in one line, before any step; the loop then calls this executable (no second compile)."""
    if self.round is not None:
      return
    s = self.setup
    negative = self.source.negative()
    lowered = s.round_fn.lower(s.abstract_state, s.frozen, aot.abstract_batch(
        s.mesh, negative, len(self.config.data.tasks), self.config.data.batch_size))
    self.round = aot.compile_within_memory(lowered, list(s.mesh.devices.flat),
                                           self.config.train.memory_limit_gib)

  def step(self, state, step: int):
    batch = device_batch(self.setup.mesh, self.source.next_batch(), self.setup.teacher_index)
    round_fn = self.setup.round_fn if self.round is None else self.round
    return round_fn(state, self.setup.frozen, batch)

  def get_position(self) -> dict:
    return self.source.get_position()

  def set_position(self, position: dict) -> None:
    self.source.set_position(position)

  def inputs_fingerprint(self) -> dict:
    return self.fingerprint

  def eval_params(self, state):
    return state.ema_params if self.config.ema.use_ema else state.params


def prepare(config: ml_collections.ConfigDict, mesh=None) -> OPDTrainer:
  """Validates the config, loads the inputs and builds the sharded round (nothing compiled or
  run yet: `OPDTrainer.compile`, which the loop calls after its resume checks)."""
  opd_config.validate(config)
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  batch = opd_config.check_global_batch(config, batch_axis_size(mesh))
  inputs = load_inputs(config, batch, mesh)
  config = inputs.config
  config.data.batch_size, config.data.batch_size_per_device = batch, 0   # resolved, saved
  opd_config.validate(config)   # again: the base may have set the network's sizes
  negative = inputs.prompts.negative()
  setup = build_opd(config, mesh, negative, base_params=inputs.base.params,
                    teachers=inputs.teachers)
  return OPDTrainer(setup, inputs.prompts, inputs.fingerprint, config)


def train_opd(config: ml_collections.ConfigDict, workdir: str, mesh=None,
              probe: Probe | None = None):
  """Runs (or resumes) OPD rounds until config.train.num_steps.

  `probe` (optional) evaluates the saved weights off the clock (`opd_jax.train.probe`).

  Returns:
    (final TrainState, last logged metrics), both on the host.
  """
  started = time.time()
  trainer = prepare(config, mesh)
  result = loop.run(trainer, trainer.config, workdir, probe, started=started)
  if trainer.config.train.export_peft and jax.process_index() == 0:
    export_student_peft(trainer.config, trainer.eval_params(result.state),
                        os.path.join(workdir, 'student_peft'))
  return jax.device_get(result.state), result.metrics


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The `opd` entry of `opd_jax.trainers`."""
  train_opd(config, workdir)


def export_student_peft(config, adapter, out_dir: str) -> str:
  """Writes the student adapter in PEFT format, loadable by diffusers + peft."""
  from opd_jax.models.peft_io import save_lora_adapter
  from opd_jax.models.registry import abstract_module
  save_lora_adapter(jax.device_get(adapter), abstract_module(config.model, config.lora), out_dir)
  return out_dir
