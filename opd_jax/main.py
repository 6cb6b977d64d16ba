"""Entry point: python -m opd_jax.main --config=configs/opd.py [--workdir=DIR] [--config.x.y=v].

`config.trainer` names what runs (`opd_jax.trainers`): 'recipe' (configs/opd.py: the mini world
end to end), 'opd' (configs/mini/opd.py, configs/opd_sd35m.py), 'grpo' / 'nft' (one RL stage)
or 'pretrain'. The config is validated before any work.

Bad input — a config field, a missing or corrupt file, a config saved under other settings in
the workdir, a run that diverges to NaN — ends with one line on stderr naming the field or path
and exit status 1 (2 for bad flags); `--traceback` shows the traceback instead. SIGTERM/SIGINT
end the current step, save a checkpoint and exit 0.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from opd_jax.errors import parse_config_flags, report_errors

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
  app.run(main, flags_parser=lambda argv: parse_config_flags(argv, _CONFIG))
