"""Reliability of the shared training loop (opd_jax.train.loop), driven by the OPD trainer.

What a user relies on when a job dies, diverges or is restarted with other flags:
  * a run killed after a checkpoint and rerun ends bit for bit where an uninterrupted run ends,
    and metrics.jsonl holds every step once (a fresh run in a reused workdir starts it anew);
  * NaN/Inf — in the loss, or only in the updated parameters — stops the run with
    NonFiniteError before that state is saved; a rerun resumes from the last finite checkpoint;
  * resuming under a changed meaningful config field fails naming the field; run-length fields
    may change; `train.allow_changed_config` overrides, except for a state that cannot fit;
  * a latest checkpoint whose bytes changed (a silent bit flip in array data: caught by the
    saved fingerprint, opd_jax/fingerprint.py), was cut short or lost its metadata is reported,
    deleted and the previous one restored; when every one is damaged, one CheckpointError;
  * through the command line: SIGTERM and SIGINT finish the step, save and exit 0 with one line,
    and the resumed run equals an uninterrupted one; errors are one `error:` line, exit 1.

In-process tests use tests/opd_testing.tiny_config on one device and share one uninterrupted
4-step run (checkpoints at 2 and 4). A run "killed after step 2" is a copy of its workdir without
step 4: exactly what a crash after saving step 2 leaves, stale metrics rows included. Compiled
programs persist on disk for the session (conftest.py; the CLI children share the cache), so
reruns — which build their jitted functions anew, as a restarted process does — load them
instead of compiling again.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_testing import ROOT, child_env, main_command
from opd_testing import mesh_of, tiny_config
from opd_jax.errors import ConfigError, NonFiniteError
from opd_jax.opd.trainer import prepare, train_opd
from opd_jax.train import loop
from opd_jax.train.checkpoint import CheckpointError, Checkpointer
from opd_jax.train.metric_writer import read_metrics

STEPS, CUT = 4, 2     # the shared run: 4 steps, checkpoints at 2 and 4


# --- helpers ---------------------------------------------------------------------------------
def _config(**overrides):
  return tiny_config(**{'train.num_steps': STEPS, 'train.checkpoint_every': CUT, **overrides})


def _train(config, workdir):
  return train_opd(config, str(workdir), mesh=mesh_of(1))


def _flat(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def _assert_bit_identical(expected, actual, what: str = 'state') -> None:
  expected, actual = _flat(expected), _flat(actual)
  assert sorted(actual) == sorted(expected), what
  differ = [k for k in expected if not np.array_equal(expected[k], actual[k])]
  assert not differ, f'{what}: {len(differ)} arrays differ, e.g. {differ[:3]}'


def _steps(workdir) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _saved_state(workdir, step: int) -> dict:
  """The checkpointed state as Orbax reads it without a target and without verification."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def _logged_steps(workdir) -> list[int]:
  return [r['step'] for r in read_metrics(workdir)]


def _cut_back(src, dst, step: int = CUT):
  """A copy of workdir `src` as a run killed right after saving `step` would have left it."""
  shutil.copytree(src, dst)
  for s in _steps(dst):
    if s > step:
      shutil.rmtree(os.path.join(dst, 'checkpoints', str(s)))
  return dst


def _data_files(workdir, step: int) -> list[str]:
  """Files of OCDBT data directories (`d/`) of a checkpointed state, largest first."""
  found = []
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', str(step), 'state')):
    if os.path.basename(root) == 'd':
      found += [os.path.join(root, f) for f in files]
  return sorted(found, key=lambda p: (-os.path.getsize(p), p))


def _flip_bit(data: bytes, fraction: float) -> bytes:
  out = bytearray(data)
  out[int(len(out) * fraction)] ^= 0x10
  return bytes(out)


def _damage(workdir, step: int, silent: bool) -> str:
  """Damages the array data of checkpoint `step`; returns the damaged file.

  `silent`: flips one bit at a time until Orbax, reading without verification, returns other
  values and no error — the change only the saved fingerprint can catch. Otherwise cuts a file
  in half until Orbax fails to read the step or reads other values. Bytes Orbax never reads
  (e.g. per-process B-tree nodes superseded by the merged tree) are put back and the next
  candidate is tried.
  """
  before = _flat(_saved_state(workdir, step))
  mutations = ([lambda d, at=at: _flip_bit(d, at) for at in (0.3, 0.5, 0.7, 0.2, 0.8)] if silent
               else [lambda d: d[:len(d) // 2]])
  for path in _data_files(workdir, step):
    with open(path, 'rb') as f:
      original = f.read()
    for mutate in mutations:
      with open(path, 'wb') as f:
        f.write(mutate(original))
      try:
        after = _flat(_saved_state(workdir, step))
      except Exception:   # Orbax/TensorStore noticed: only good enough for `not silent`
        if not silent:
          return path
      else:
        if sorted(after) == sorted(before) and any(
            not np.array_equal(before[k], after[k]) for k in before):
          return path     # read back without complaint, with changed values
      with open(path, 'wb') as f:
        f.write(original)
  raise AssertionError(f'no change to the data files of step {step} altered what Orbax reads')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The shared 4-step run. Its workdir is reused: a metrics.jsonl of an earlier run (with no
  checkpoints) is there first, marked by loss -1."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps({'step': s, 'loss': -1.0}) + '\n' for s in range(1, 7))
  state, _ = _train(_config(), workdir)
  return {'workdir': workdir, 'state': state, 'rows': read_metrics(workdir)}


# --- resume and metrics ----------------------------------------------------------------------
def test_fresh_run_in_a_reused_workdir_starts_the_metrics_anew(uninterrupted):
  rows = uninterrupted['rows']
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  assert all(r['loss'] >= 0 for r in rows)    # none of the earlier run's rows survived
  assert _steps(uninterrupted['workdir']) == [CUT, STEPS]


def test_rerun_after_a_kill_equals_the_uninterrupted_run(uninterrupted, tmp_path, capsys):
  workdir = _cut_back(uninterrupted['workdir'], tmp_path / 'run')
  # It had logged steps 3 and 4 (marked stale here) and was writing a row when killed.
  rows = [dict(r, loss=-1.0) if r['step'] > CUT else r for r in read_metrics(workdir)]
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
    f.write('{"step": 5, "lo')
  state, _ = _train(_config(), workdir)
  assert f'resumed from step {CUT}' in capsys.readouterr().out
  _assert_bit_identical(uninterrupted['state'], state)  # params, moments, EMA, step, rng
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  strip = lambda r: {k: v for k, v in r.items() if k != 'train_seconds'}
  assert [strip(r) for r in rows] == [strip(r) for r in uninterrupted['rows']]
  seconds = [r['train_seconds'] for r in rows]
  assert seconds == sorted(seconds)     # training time carries over the resume
  with open(workdir / 'metrics.jsonl') as f:
    assert len(f.read().splitlines()) == STEPS   # the cut-short line is gone too


# --- NaN / Inf -------------------------------------------------------------------------------
class _PoisonedAt:
  """The OPD trainer, except that right before step `at` the state's `field` turns NaN, as a
  bad update just before would leave it. Poisoned params make that step's loss NaN; a poisoned
  optimizer state leaves the loss finite but makes the updated parameters NaN."""

  def __init__(self, trainer, at: int, field: str):
    self.trainer, self.at, self.field = trainer, at, field

  def __getattr__(self, name):
    return getattr(self.trainer, name)

  def step(self, state, step: int):
    if step + 1 == self.at:
      nan = lambda x: (jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating)
                       else x)
      state = state.replace(**{self.field: jax.tree.map(nan, getattr(state, self.field))})
    return self.trainer.step(state, step)


@pytest.fixture(scope='module')
def trainer_logging_every_2():
  """The OPD trainer of the shared run, but logging (and checking finiteness) every 2 steps.

  Built once, its round traced and compiled once, for the reruns of the NaN and the
  damaged-checkpoint tests (`loop.run` on it is `train_opd` after `prepare`); the rerun after a
  kill and the changed-config runs build theirs anew, as a restarted process does."""
  return prepare(_config(**{'train.log_every': 2}), mesh_of(1))


@pytest.mark.parametrize('field, at, message', [
    ('params', 4, 'loss is nan at step 4'),
    ('opt_state', 4, 'the updated parameters are not finite at step 4'),
    ('params', 3, 'loss is nan at step 4'),   # step 3 is not logged: caught at step 4
])
def test_non_finite_step_is_never_saved_and_a_rerun_resumes_before_it(
    uninterrupted, trainer_logging_every_2, tmp_path, field, at, message):
  trainer = trainer_logging_every_2
  workdir = _cut_back(uninterrupted['workdir'], tmp_path / 'run')
  with pytest.raises(NonFiniteError, match=message) as e:
    loop.run(_PoisonedAt(trainer, at, field), trainer.config, str(workdir))
  assert f'last checkpoint: {CUT}' in str(e.value)
  assert _steps(workdir) == [CUT]
  assert _logged_steps(workdir) == [1, 2]     # the stopped steps logged nothing either
  saved = _flat(_saved_state(workdir, CUT))
  assert all(np.all(np.isfinite(x)) for x in saved.values())
  rerun = loop.run(trainer, trainer.config, str(workdir))
  assert rerun.start_step == CUT
  _assert_bit_identical(uninterrupted['state'], jax.device_get(rerun.state))


class _CountingCompiles:
  """A trainer that counts the loop's calls of its `compile`."""

  def __init__(self, trainer):
    self.trainer, self.compiles = trainer, 0

  def __getattr__(self, name):
    return getattr(self.trainer, name)

  def compile(self):
    self.compiles += 1
    return self.trainer.compile()


def test_rerun_of_a_finished_run_compiles_nothing_and_returns_its_state(
    uninterrupted, trainer_logging_every_2, tmp_path, capsys):
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  trainer = _CountingCompiles(trainer_logging_every_2)
  result = loop.run(trainer, trainer.config, str(workdir))
  assert trainer.compiles == 0 and result.start_step == STEPS
  assert f'resumed from step {STEPS}' in capsys.readouterr().out
  _assert_bit_identical(uninterrupted['state'], jax.device_get(result.state))
  assert _steps(workdir) == [CUT, STEPS] and _logged_steps(workdir) == [1, 2, 3, 4]
  # One step left: the loop compiles it before running it.
  counted = _CountingCompiles(trainer_logging_every_2)
  more = trainer.config.copy_and_resolve_references()
  more.train.num_steps = STEPS + 1
  assert loop.run(counted, more, str(workdir)).start_step == STEPS and counted.compiles == 1
  assert _steps(workdir) == [CUT, STEPS, STEPS + 1]


# --- config changes on resume ----------------------------------------------------------------
@pytest.mark.parametrize('field, change', [
    ('seed', {'seed': 1}),
    ('teachers.random_scale', {'teachers.random_scale': 0.5}),
    ('rollout.kernel', {'rollout.kernel': 'flow_grpo'}),
    ('objective.name', {'objective.name': 'ppo_analytic_advantage',
                        'rollout.kernel': 'flow_grpo', 'rollout.noise_level': 0.7}),
    ('lora.rank', {'lora.rank': 8}),
])
def test_resume_with_a_changed_field_fails_naming_it(uninterrupted, tmp_path, field, change):
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  trainer = prepare(_config(**change), mesh_of(1))
  with pytest.raises(ConfigError, match=rf'config\.{re.escape(field)}: .*allow_changed_config'):
    loop.run(trainer, trainer.config, str(workdir))
  assert trainer.round is None      # refused before the round was compiled
  assert _steps(workdir) == [CUT, STEPS]


def test_run_length_fields_may_change_on_resume(uninterrupted, tmp_path, capsys):
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  state, _ = _train(_config(**{'train.num_steps': 5, 'train.log_every': 2,
                               'train.checkpoint_every': 5, 'train.keep_checkpoints': 2}),
                    workdir)
  assert f'resumed from step {STEPS}' in capsys.readouterr().out
  assert int(state.step) == 5
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5] and _steps(workdir) == [4, 5]


def test_allow_changed_config_continues_a_compatible_change(uninterrupted, tmp_path, capsys):
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  state, _ = _train(_config(**{'teachers.random_scale': 0.5, 'train.num_steps': 5,
                               'train.allow_changed_config': True}), workdir)
  assert f'resumed from step {STEPS}' in capsys.readouterr().out
  assert int(state.step) == 5 and _steps(workdir) == [CUT, STEPS, 5]
  saved = Checkpointer(str(workdir / 'checkpoints')).saved_config()
  assert saved['teachers']['random_scale'] == 0.5


def test_a_state_that_cannot_fit_fails_even_when_changes_are_allowed(uninterrupted, tmp_path):
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  with pytest.raises(CheckpointError) as e:
    _train(_config(**{'lora.rank': 8, 'train.allow_changed_config': True}), workdir)
  message = str(e.value)
  assert str(workdir / 'checkpoints') in message and 'does not fit' in message
  assert '\n' not in message
  assert _steps(workdir) == [CUT, STEPS]    # a mismatch is not corruption: nothing deleted


# --- damaged checkpoints ---------------------------------------------------------------------
def _flip_array_bits(workdir, step):
  _damage(workdir, step, silent=True)


def _truncate_a_file(workdir, step):
  _damage(workdir, step, silent=False)


def _delete_metadata(workdir, step):
  os.remove(os.path.join(workdir, 'checkpoints', str(step), 'state', '_METADATA'))


@pytest.mark.parametrize('damage, reason', [
    (_flip_array_bits, 'differ from what was saved'),   # only the fingerprint can tell
    (_truncate_a_file, None),                           # Orbax's own read error
    (_delete_metadata, 'no array metadata'),            # not mistaken for another model
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    uninterrupted, trainer_logging_every_2, tmp_path, capsys, damage, reason):
  trainer = trainer_logging_every_2
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  damage(workdir, STEPS)
  state = jax.device_get(loop.run(trainer, trainer.config, str(workdir)).state)
  out, err = capsys.readouterr()
  warning = [l for l in err.splitlines() if l.startswith('warning: checkpoint')]
  assert len(warning) == 1 and f'{workdir}/checkpoints/{STEPS} is corrupt' in warning[0]
  if reason:
    assert reason in warning[0]
  assert f'resumed from step {CUT}' in out
  _assert_bit_identical(uninterrupted['state'], state)
  # The damaged step was deleted and saved anew by the rerun.
  assert _steps(workdir) == [CUT, STEPS]
  _assert_bit_identical(_saved_state(uninterrupted['workdir'], STEPS),
                        _saved_state(workdir, STEPS), 'the new checkpoint')


def test_every_checkpoint_damaged_is_one_checkpoint_error(uninterrupted, trainer_logging_every_2,
                                                          tmp_path):
  trainer = trainer_logging_every_2
  workdir = shutil.copytree(uninterrupted['workdir'], tmp_path / 'run')
  for step in (CUT, STEPS):
    _flip_array_bits(workdir, step)
  with pytest.raises(CheckpointError, match=r'every checkpoint \(\[2, 4\]\) is corrupt') as e:
    loop.run(trainer, trainer.config, str(workdir))
  assert str(workdir / 'checkpoints') in str(e.value) and '\n' not in str(e.value)


# --- the command line ------------------------------------------------------------------------
CLI_CONFIG = 'configs/mini/opd.py:standin,smoke'
CLI_STEPS = 300        # ~16 ms a step: seconds of margin to signal a run mid-way
CLI_ARGS = (f'--config.train.num_steps={CLI_STEPS}',
            '--config.train.checkpoint_every=100000',   # only the stop and the end save
            # the cheapest round to compile and run: a 2-step rollout, one trained step
            '--config.rollout.num_steps=2', '--config.objective.timestep_fraction=0.5')


@pytest.fixture(scope='module')
def cli_env():
  """One device, like a user's run (the children share the session's compilation cache)."""
  return child_env(1)


def _cli(env, workdir, *args):
  return subprocess.run(main_command(CLI_CONFIG, workdir, *CLI_ARGS, *args), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith('error:')]


@pytest.fixture(scope='module')
def cli_uninterrupted(cli_env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cli_uninterrupted')
  done = _cli(cli_env, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _stop_midway(env, workdir, sig, after_step: int, logs):
  """Starts the command, sends `sig` once `after_step` is logged; returns (status, out, err)."""
  name = signal.Signals(sig).name
  with open(logs / f'{name}.out', 'w') as out, open(logs / f'{name}.err', 'w') as err:
    proc = subprocess.Popen(main_command(CLI_CONFIG, workdir, *CLI_ARGS), cwd=ROOT, env=env,
                            stdout=out, stderr=err, text=True)
    try:
      deadline = time.time() + 600
      while (_logged_steps(workdir) or [0])[-1] < after_step:
        assert proc.poll() is None, 'the run ended before it was signalled'
        assert time.time() < deadline, f'step {after_step} not logged within 10 minutes'
        time.sleep(0.05)
      proc.send_signal(sig)
      status = proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return status, (logs / f'{name}.out').read_text(), (logs / f'{name}.err').read_text()


def _stopped_at(stdout: str, sig_name: str) -> int:
  lines = [l for l in stdout.splitlines() if f'stopped by {sig_name}' in l]
  assert len(lines) == 1, stdout
  return int(re.search(r'after step (\d+)', lines[0]).group(1))


@pytest.mark.slow
def test_sigterm_and_sigint_save_and_exit_and_the_rerun_equals_an_uninterrupted_run(
    cli_env, cli_uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  status, out, err = _stop_midway(cli_env, workdir, signal.SIGTERM, 3, tmp_path)
  assert status == 0 and 'Traceback' not in err, err[-3000:]
  first = _stopped_at(out, 'SIGTERM')
  assert first < CLI_STEPS and _steps(workdir) == [first]
  assert _logged_steps(workdir) == list(range(1, first + 1))

  status, out, err = _stop_midway(cli_env, workdir, signal.SIGINT, first + 3, tmp_path)
  assert status == 0 and 'Traceback' not in err, err[-3000:]
  assert f'resumed from step {first}' in out
  second = _stopped_at(out, 'SIGINT')
  assert first < second < CLI_STEPS and _steps(workdir) == [first, second]

  done = _cli(cli_env, workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'resumed from step {second}' in done.stdout
  assert _steps(workdir) == [first, second, CLI_STEPS]
  _assert_bit_identical(_saved_state(cli_uninterrupted, CLI_STEPS),
                        _saved_state(workdir, CLI_STEPS))
  rows, full = read_metrics(workdir), read_metrics(cli_uninterrupted)
  assert [r['step'] for r in rows] == list(range(1, CLI_STEPS + 1))
  assert all(r['loss'] >= 0 for r in full) and 'kl_per_task/text' in full[0]
  assert os.listdir(cli_uninterrupted / 'tensorboard') and os.listdir(workdir / 'tensorboard')
  strip = lambda r: {k: v for k, v in r.items() if k != 'train_seconds'}
  assert [strip(r) for r in rows] == [strip(r) for r in full]
  seconds = [r['train_seconds'] for r in rows]
  assert seconds == sorted(seconds)


@pytest.mark.slow
def test_cli_reports_a_diverged_run_in_one_line_and_saves_nothing(cli_env, tmp_path):
  done = _cli(cli_env, tmp_path, '--config.teachers.random_scale=inf')
  assert done.returncode == 1, done.stderr[-3000:]
  errors = _error_lines(done.stderr)
  assert len(errors) == 1 and 'loss is nan at step 1' in errors[0], done.stderr[-3000:]
  assert 'last checkpoint: none' in errors[0] and 'Traceback' not in done.stderr
  assert _steps(tmp_path) == [] and _logged_steps(tmp_path) == []


@pytest.mark.slow
def test_cli_reports_a_state_that_cannot_fit_in_one_line(cli_env, cli_uninterrupted, tmp_path):
  workdir = shutil.copytree(cli_uninterrupted, tmp_path / 'run')
  done = _cli(cli_env, workdir, '--config.lora.rank=16', '--config.train.allow_changed_config=True')
  assert done.returncode == 1, done.stderr[-3000:]
  errors = _error_lines(done.stderr)
  assert len(errors) == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert f'{workdir}/checkpoints' in errors[0] and 'does not fit' in errors[0]
  assert _steps(workdir) == [CLI_STEPS]
