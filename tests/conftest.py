"""Test setup: 8 fake CPU devices so sharding tests run on one host.

XLA reads XLA_FLAGS once, when jax first initialises its backend, so this must run before any
test module imports jax.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402  (after XLA_FLAGS)


@pytest.fixture(scope='module')
def persistent_compilation_cache(tmp_path_factory):
  """Caches compiled programs on disk for one test module, then restores jax's settings.

  Tests that rerun a trainer in the same process (a resume) build their jitted functions anew,
  as a restarted process does; with the cache they load what the first run compiled.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  compilation_cache.reset_cache()   # a cache opened earlier would ignore the new directory
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', saved[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', saved[1])
