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

ENV_ENABLE = 'OPD_DISTRIBUTED'


def requested(flag: bool) -> bool:
  return flag or os.environ.get(ENV_ENABLE, '') not in ('', '0', 'false', 'False')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts multi-process JAX (arguments default to the JAX_* environment, then auto-detect)."""
  env = os.environ
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS') or None
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  # CPU devices exchange data across processes with gloo (the default CPU client has none);
  # the setting only concerns the CPU client, GPU/TPU backends bring their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
