"""Runs `python -m opd_jax.main` in a subprocess for the CLI tests.

The child sees `devices` forced host devices (the parent's conftest sets 8 for in-process
tests; the other XLA flags and the compilation cache carry over) and, like a user, the
repository root as its working directory.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(config: str, workdir, *args: str) -> list[str]:
  return [sys.executable, '-m', 'opd_jax.main', f'--config={config}', f'--workdir={workdir}',
          *args]


def child_env(devices: int = 1) -> dict:
  """This environment (conftest.py's XLA flags and compilation cache) with `devices` devices."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={devices}')
  return dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu')


def run_main(config: str, workdir, *args: str, devices: int = 1,
             timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(config, workdir, *args), cwd=ROOT, env=child_env(devices),
                        capture_output=True, text=True, timeout=timeout)
