"""Entry point: python -m opd_jax.main --config=configs/opd.py [--workdir=DIR] [--config.x.y=v].

A config with `stages` runs a recipe of cached stages (configs/opd.py: the mini world end to
end); configs/mini/pretrain.py and the RL configs run that one stage; any other config is one
OPD stage (configs/mini/opd.py, configs/opd_sd35m.py).

Bad input (an invalid config field, a missing or corrupt checkpoint, a NaN loss) ends the run
with one line on stderr and exit status 1, never with a half-written checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/opd', 'Where checkpoints and metrics go.')
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
  from opd_jax.parallel import distributed  # after flag parsing, so --help is fast
  if distributed.requested(_DISTRIBUTED.value):
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from opd_jax.opd.config import ConfigError
  from opd_jax.train.checkpoint import CheckpointError
  from opd_jax.opd.trainer import train_opd
  config = _CONFIG.value
  try:
    if 'stages' in config:       # a recipe of several stages (configs/opd.py)
      from opd_jax.recipe.mini_world import run_mini_world
      run_mini_world(config, _WORKDIR.value)
    elif 'pretrain' in config:   # mini-world base pretraining (configs/mini/pretrain.py)
      from opd_jax.pretrain.trainer import run_pretrain
      run_pretrain(config, _WORKDIR.value)
    elif 'algorithm' in config:  # one RL stage (configs/mini/{grpo,nft,multitask_rl,...}.py)
      from opd_jax.rl.trainer import run_rl
      if not config.base_path or not os.path.isdir(config.base_path):
        raise ConfigError(f'config.base_path: {config.base_path!r} is not a directory; set it '
                          'to a pretrained base (WORKDIR/pretrain/base of the recipe)')
      run_rl(config, _WORKDIR.value, config.base_path)
    else:                        # one OPD stage (configs/mini/opd.py, configs/opd_sd35m.py)
      train_opd(config, _WORKDIR.value)
  except (ConfigError, CheckpointError, FloatingPointError) as e:   # incl. NonFiniteLossError
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
