"""Test setup: 8 fake CPU devices, fast CPU compiles, one persistent compilation cache.

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

from xla_testing import FAST_COMPILE_FLAG

# The device count, then two flags for the CPU code XLA emits — the suite is dominated by
# compiling small programs: LLVM optimisation level 0 (about twice as fast to compile), and the
# older kernel emitters (FAST_COMPILE_FLAG: 2–3 times as fast again, xla_testing.py). XLA's own
# (HLO-level) optimisations — fusion, layouts, buffer assignment — are unchanged; only the code
# of each fused kernel differs, and with it the last bits of some float results: the few tests
# calibrated to the default kernels' rounding compile those programs with
# xla_testing.FUSION_EMITTERS.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0 ' + FAST_COMPILE_FLAG).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='opd_jax_test_xla_cache_')
# Every program is cached, however quick its compile: a model's eager initialisation alone is
# dozens of small programs that each process (xdist worker, CLI child) would compile again —
# measured on a CLI child's warm start: 11.8 s when every program is cached, 15.6 s at 0.2 s.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def pytest_unconfigure(config):
  """The controller (not an xdist worker) removes the cache directory it made."""
  if _OWN_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Modules holding `slow` tests run first, so under pytest-xdist (`-n 2 --dist loadfile`,
  pyproject.toml) the long end-to-end modules overlap the many short ones instead of ending
  the run alone."""
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
