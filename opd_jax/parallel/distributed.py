"""Multi-process (multi-host) start-up: one `jax.distributed.initialize` before any JAX work.

Every process then sees the global device list; `make_mesh` builds one mesh over all of them,
`device_batch` hands each process the slice of the global batch its devices own, Orbax writes
checkpoints cooperatively and only process 0 writes metrics and progress bars. Nothing else in
the code knows how many hosts there are.

When to initialise:
  * `--distributed` (opd_jax.main) or OPD_DISTRIBUTED=1: always;
  * explicit coordinates (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID): those are used;
  * otherwise jax.distributed.initialize() detects the cluster itself (TPU pod slices, SLURM,
    Open MPI, …).
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

from opd_jax.errors import ConfigError

ENV_ENABLE = 'OPD_DISTRIBUTED'


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'{name}: expected an integer, got {value!r}') from None


def requested(flag: bool) -> bool:
  return flag or os.environ.get(ENV_ENABLE, '') not in ('', '0', 'false', 'False')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts multi-process JAX (arguments default to the JAX_* environment, then auto-detect).

  Raises:
    ConfigError: a malformed JAX_* variable, or coordinates JAX cannot start from (e.g. none
      given on a machine it cannot auto-detect).
  """
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None:
    num_processes = _env_int('JAX_NUM_PROCESSES')
  if process_id is None:
    process_id = _env_int('JAX_PROCESS_ID')
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f'--num_processes / JAX_NUM_PROCESSES: must be >= 1, got {num_processes}')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f'--process_id / JAX_PROCESS_ID: must be in [0, {num_processes}), got '
                      f'{process_id}')
  # CPU devices exchange data across processes with gloo (the default CPU client has none);
  # the setting only concerns the CPU client, GPU/TPU backends bring their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except ValueError as e:   # JAX's checks of the coordinates (nothing given, nothing detected)
    raise ConfigError(f'--distributed: {e} (set --coordinator_address, --num_processes and '
                      '--process_id, or the JAX_* variables)') from None
