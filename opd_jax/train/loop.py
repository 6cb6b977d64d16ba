"""The training loop every trainer runs: steps, progress, metrics, checkpoints, resume, stops.

A trainer (OPD, the RL trainers, pretraining) supplies what is specific to it through the
`Trainer` protocol — its initial state and restore target, one `step`, its data position and the
fingerprints of its inputs — and `run` does the rest the same way for all of them:

  * resume from the newest intact checkpoint in WORKDIR/checkpoints, after checking that the
    saved config differs only in run-length fields and that the inputs (base, teachers) hold
    the same content (`train.allow_changed_config` overrides both); the data position, the
    cumulative training seconds and the probe history come back with the state;
  * the trainer's step compiled before the first one (`Trainer.compile`), after those checks:
    a refused resume costs no compile, a program too big for a device stops before any step,
    and a run restored at (or past) train.num_steps, with no step left, compiles nothing;
  * a progress bar; metrics.jsonl + TensorBoard, one row per logged step, none duplicated after
    a resume (`MetricWriter`);
  * the host reads metrics only on log and checkpoint steps, and stops with `NonFiniteError`
    before saving when the loss or the updated parameters are NaN/Inf;
  * asynchronous Orbax checkpoints every `train.checkpoint_every` steps and at the end;
  * SIGTERM / SIGINT: finish the current step, save, raise `Preempted` (exit status 0);
  * optional probes (evaluation off the clock) for reward-vs-time curves.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Protocol, Sequence

import jax
from tqdm import tqdm

from opd_jax.errors import ConfigError, NonFiniteError, Preempted
from opd_jax.train import config_check
from opd_jax.train.checkpoint import Checkpointer
from opd_jax.train.metric_writer import MetricWriter, flatten_metrics
from opd_jax.train.preemption import StopRequest
from opd_jax.train.probe import Probe, StageClock, maybe_probe

CHECKPOINT_DIR = 'checkpoints'


class Trainer(Protocol):
  """What a trainer gives the loop (see opd_jax.opd.trainer, opd_jax.rl.trainer, …)."""
  name: str                                       # progress-bar label
  abstract_state: Any                             # restore target: ShapeDtypeStructs + shardings
  metric_names: Mapping[str, Sequence[str]]       # labels of array metrics (flatten_metrics)

  def init_state(self) -> Any: ...
  def compile(self) -> None:
    """Compiles the step before the first one runs (or does nothing where the first step
    compiles it); may raise ConfigError (e.g. a program that cannot fit a device). The loop calls
    it after the resume checks, so a refused resume costs no compile."""
  def step(self, state: Any, step: int) -> tuple[Any, dict]:
    """One training step; metrics must hold 'loss' and 'finite' (device or host values)."""
  def get_position(self) -> dict: ...
  def set_position(self, position: dict) -> None: ...
  def inputs_fingerprint(self) -> dict: ...
  def eval_params(self, state: Any) -> Any: ...


@dataclasses.dataclass
class LoopResult:
  state: Any              # the final state, on device
  metrics: dict           # the last logged scalars
  train_seconds: float    # cumulative over resumes, probes excluded
  start_step: int         # 0, or the step this session resumed from


def _check_resume(ckpt: Checkpointer, config, fingerprint: dict, saved_loop: dict | None,
                  saved_config: dict | None) -> None:
  if config.train.allow_changed_config:
    return
  problems = []
  if saved_config is not None:
    problems += config_check.resume_changes(saved_config, config.to_dict())
  if saved_loop is not None:
    problems += config_check.input_changes(saved_loop.get('inputs', {}), fingerprint)
  if problems:
    shown = ', '.join(problems[:4]) + (f' and {len(problems) - 4} more' if len(problems) > 4
                                       else '')
    raise ConfigError(f'{ckpt.directory} holds a run with other settings ({shown}); use a new '
                      '--workdir, or --config.train.allow_changed_config=True to continue it')


def _lead() -> bool:
  return jax.process_index() == 0


def run(trainer: Trainer, config, workdir: str, probe: Probe | None = None,
        started: float | None = None) -> LoopResult:
  """Runs (or resumes) `trainer` until config.train.num_steps; see the module docstring.

  `started`: when this session's training clock starts (default now); trainers pass the time
  they began building, so setup and compilation count as training time.
  """
  t = config.train
  clock = StageClock(started)
  fingerprint = trainer.inputs_fingerprint()
  ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=t.keep_checkpoints,
                      async_save=t.async_checkpoints)
  try:
    saved_config = ckpt.saved_config()
    if saved_config is not None:
      _check_resume(ckpt, config, fingerprint, None, saved_config)
    restored = ckpt.restore(trainer.abstract_state)
    if restored is not None:
      _check_resume(ckpt, config, fingerprint, restored.loop, None)
    if restored is None or restored.step < t.num_steps:
      trainer.compile()
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state, start = restored.state, restored.step
    trainer.set_position(restored.loop['position'])
    clock.offset = float(restored.loop.get('train_seconds', 0.0))
    if probe is not None:
      probe.history = list(restored.loop.get('probe_history', []))
      probe.seconds = float(restored.loop.get('probe_seconds', 0.0))
    if _lead():
      print(f'[{trainer.name}] resumed from step {start} in {ckpt.directory}', flush=True)
  else:
    state, start = trainer.init_state(), 0

  def loop_record() -> dict:
    return {'position': trainer.get_position(), 'train_seconds': clock.train_seconds(),
            'inputs': fingerprint,
            'probe_history': probe.history if probe is not None else [],
            'probe_seconds': probe.seconds if probe is not None else 0.0}

  last = t.num_steps
  writer = MetricWriter(workdir, start_step=start)
  scalars: dict = {}
  try:
    with StopRequest() as stop:
      maybe_probe(probe, start, last, clock, lambda: trainer.eval_params(state))
      bar = tqdm(range(start, last), initial=start, total=last, desc=trainer.name,
                 disable=not _lead(), mininterval=1.0)
      for step in bar:
        state, metrics = trainer.step(state, step)
        done = step + 1
        stopping = stop.requested()
        is_ckpt = done % t.checkpoint_every == 0 or done == last or stopping
        if done % t.log_every == 0 or is_ckpt:
          scalars = flatten_metrics(jax.device_get(metrics), trainer.metric_names)
          finite = scalars.pop('finite', 1.0)
          if not (math.isfinite(scalars['loss']) and finite):
            what = (f'loss is {scalars["loss"]}' if not math.isfinite(scalars['loss'])
                    else 'the updated parameters are not finite')
            kept = ckpt.steps()
            raise NonFiniteError(
                f'{trainer.name}: {what} at step {done}; stopped without saving it (last '
                f'checkpoint: {kept[-1] if kept else "none"}); lower optimizer.lr or check the '
                'inputs')
          scalars['train_seconds'] = clock.train_seconds()
          writer.write(done, scalars)
        if is_ckpt:
          ckpt.save(done, state, config.to_dict(), loop_record())
        maybe_probe(probe, done, last, clock, lambda: trainer.eval_params(state))
        if stopping and done < last:
          bar.close()
          ckpt.wait()
          raise Preempted(f'[{trainer.name}] stopped by {stop.signal_name} after step {done}; '
                          f'state saved in {ckpt.directory}: run the same command to resume',
                          done)
  finally:
    ckpt.close()
    writer.close()
  scalars['train_seconds'] = clock.train_seconds()   # also when no step was left to run
  return LoopResult(state, scalars, scalars['train_seconds'], start)
