"""Test setup: 8 fake CPU devices, and one persistent compilation cache for the whole session.

XLA reads XLA_FLAGS once, when jax first initialises its backend, so this must run before any
test module imports jax.

Compiled programs persist on disk for the session (JAX_COMPILATION_CACHE_DIR, a fresh temporary
directory unless set): a test that reruns a trainer — a resume, which builds its jitted functions
anew as a restarted process does — loads what the first run compiled, and so do the command-line
children (tests/cli_testing.child_env copies this environment) and the pytest-xdist workers, which
inherit it from the controller that imported this file first. The cache holds XLA executables
keyed by the program, the devices and the compile options, so a hit is the same program.
"""

import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='opd_jax_test_xla_cache_')
# Programs compiling in under a fifth of a second are cheaper to compile than to cache.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')


def pytest_unconfigure(config):
  """The controller (not an xdist worker) removes the cache directory it made."""
  if _OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
