"""Entry point: python -m opd_jax.main --config=configs/opd.py [--workdir=DIR] [--config.x.y=v].

`config.trainer` names what runs (`opd_jax.trainers`): 'recipe' (configs/opd.py: the mini world
end to end), 'opd' (configs/mini/opd.py, configs/opd_sd35m.py), 'grpo' / 'nft' (one RL stage)
or 'pretrain'. The config is validated before any work.

Bad input — a config field, a missing or corrupt file, a config saved under other settings in
the workdir, a run that diverges to NaN — ends with one line on stderr naming the field or path
and exit status 1 (2 for bad flags); `--traceback` shows the traceback instead. SIGTERM/SIGINT
end the current step, save a checkpoint and exit 0.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from opd_jax.errors import one_line, report_errors, show_tracebacks

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/opd', 'Where checkpoints and metrics go.')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Multi-host run: call jax.distributed.initialize() first (also '
                                 'with OPD_DISTRIBUTED=1); see opd_jax/parallel/distributed.py.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (default: JAX_COORDINATOR_ADDRESS or '
                                   'auto-detected on TPU pods / SLURM).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')


def _flag_error(e: Exception, argv: list[str]) -> str:
  """One line naming the --config file or override that failed."""
  config = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')
  text = str(e).strip()
  if isinstance(e, (AttributeError, KeyError)):   # an override of a field the config lacks
    key = text.strip('"\'')
    for arg in argv:
      name = arg.split('=', 1)[0]
      if name.startswith('--config.') and key in name.split('.'):
        return f'{name}: no field {key!r} in {config}'
  embedded = 'Error whilst parsing config file' in text   # ml_collections appends a traceback
  if isinstance(e, flags.Error) and not embedded:
    return one_line(text)                                 # absl's message names the flag
  if embedded or isinstance(e, OSError):
    text = text.splitlines()[-1].strip()                  # the exception line itself
  else:
    text = f'{type(e).__name__}: {text}'
  return one_line(f'--config={config}: {text}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (a bad flag, override or config file: exit 2)."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.get   # ml_collections defers a config file's IOError to the first access
    return rest
  except Exception as e:   # flags.Error, or whatever a config file raised while loading
    if show_tracebacks('--traceback' in argv):
      raise
    print(f'error: {_flag_error(e, argv)}', file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
  del argv
  # Orbax logs every file it renames at INFO; progress bars and metrics.jsonl say what matters.
  logging.set_verbosity(logging.WARNING)
  with report_errors(_TRACEBACK.value):
    if _CONFIG.value is None:
      from opd_jax.errors import ConfigError
      raise ConfigError('--config: required, e.g. --config=configs/opd.py')
    from opd_jax import trainers
    from opd_jax.parallel import distributed  # after flag parsing, so --help is fast
    trainers.validate(_CONFIG.value)
    if distributed.requested(_DISTRIBUTED.value):
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    trainers.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
