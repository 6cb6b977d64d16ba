"""The OPD training loop: rounds, logging, checkpoints and resume.

`train_opd(config, workdir)` is what `opd_jax.main` calls; tests and notebooks call it directly.
The host reads metrics only on log and checkpoint steps, so rounds are dispatched back to back.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from opd_jax.opd.config import validate_opd_config
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.train.checkpoint import Checkpointer
from opd_jax.train.metric_writer import MetricWriter, flatten_metrics
from opd_jax.opd.setup import build_opd, device_batch
from opd_jax.opd.sources import load_inputs
from opd_jax.train.probe import Probe, StageClock, maybe_probe


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; training stops before anything is checkpointed."""


def train_opd(config: ml_collections.ConfigDict, workdir: str, mesh=None,
              probe: Probe | None = None):
  """Runs (or resumes) OPD rounds until config.train.num_rounds.

  `probe` (optional) evaluates the EMA student off the clock (`opd_jax.train.probe`).

  Returns:
    (final TrainState, last logged metrics), both on the host.
  """
  clock = StageClock()   # setup and compilation count as training time, as in the RL stages
  validate_opd_config(config)
  mesh = mesh or make_mesh(config.mesh.shape.to_dict())
  batch_per_task = config.data.prompts_per_device * batch_axis_size(mesh)
  inputs = load_inputs(config, batch_per_task, mesh)
  config = inputs.config
  validate_opd_config(config)   # again: the base may have set the network's sizes
  source = inputs.prompts
  setup = build_opd(config, mesh, source.negative(), base_params=inputs.base.params,
                    teachers=inputs.teachers)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.train.keep_checkpoints,
                      async_save=config.train.async_checkpoints)
  if ckpt.latest_step() is not None:
    state, _, position = ckpt.restore(setup.abstract_state)
    source.set_position(position)
    if jax.process_index() == 0:
      print(f'resumed from round {int(state.step)} in {ckpt.directory}', flush=True)
  else:
    state = setup.init_state()
  start = int(jax.device_get(state.step))
  teacher_index = np.arange(len(config.data.tasks), dtype=np.int32)
  names = {'kl_per_task': list(config.data.tasks),
           'kl_per_step': [str(j) for j in range(setup.spec.num_train_steps)]}
  writer = MetricWriter(workdir)
  metrics = {}
  last = config.train.num_rounds
  try:
    maybe_probe(probe, start, last, clock, lambda: state.ema_params)
    for step in tqdm(range(start, config.train.num_rounds), initial=start,
                     total=config.train.num_rounds, desc='opd', disable=jax.process_index() != 0):
      batch = device_batch(mesh, source.next_batch(), teacher_index)
      state, metrics = setup.round_fn(state, setup.frozen, batch)
      done = step + 1
      is_ckpt = done % config.train.checkpoint_every == 0 or done == config.train.num_rounds
      if done % config.train.log_every == 0 or is_ckpt:
        scalars = flatten_metrics(jax.device_get(metrics), names)
        if not math.isfinite(scalars['loss']):
          raise NonFiniteLossError(f'loss is {scalars["loss"]} at round {done}; stopping without '
                                   'saving (check optimizer.lr and the teachers)')
        scalars['train_seconds'] = clock.train_seconds()
        writer.write(done, scalars)
      if is_ckpt:
        ckpt.save(done, state, config.to_dict(), source.get_position())
      maybe_probe(probe, done, last, clock, lambda: state.ema_params)
  finally:
    ckpt.close()
    writer.close()
  if config.train.get('export_peft', False) and jax.process_index() == 0:
    export_student_peft(config, state.ema_params, os.path.join(workdir, 'student_peft'))
  return jax.device_get(state), jax.device_get(metrics)


def export_student_peft(config, adapter, out_dir: str) -> str:
  """Writes the (EMA) student adapter in PEFT format, loadable by diffusers + peft."""
  from flax import nnx
  from opd_jax.models.peft_io import save_lora_adapter
  from opd_jax.models.registry import make_module
  if config.student.kind != 'lora':
    raise ValueError('config.train.export_peft: only a LoRA student exports to PEFT')
  m = config.model
  model = nnx.eval_shape(lambda: make_module(m, seed=0, lora_rank=m.lora_rank,
                                             lora_alpha=m.lora_alpha))
  save_lora_adapter(jax.device_get(adapter), model, out_dir)
  return out_dir
