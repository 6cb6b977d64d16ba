"""Entry point: python -m opd_jax.main --config=configs/opd.py --workdir=DIR [--config.x.y=v]."""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/opd', 'Where checkpoints and metrics go.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() (multi-host runs).')


def main(argv):
  del argv
  import jax  # after flag parsing, so --help is fast
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from opd_jax.train.opd_loop import train_opd
  train_opd(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
