"""Array digests (opd_jax/fingerprint.py): host and device agree, a flipped bit always shows."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from opd_jax import fingerprint

RNG = np.random.default_rng(0)
ARRAYS = {
    'float32': RNG.standard_normal((3, 5)).astype(np.float32),
    'bfloat16': RNG.standard_normal((7,)).astype(ml_dtypes.bfloat16),
    'int32 scalar': np.array(5, np.int32),
    'uint32 key': RNG.integers(0, 2**31, (4, 2)).astype(np.uint32),
    'bool': np.array([True, False, True]),
}


@pytest.mark.parametrize('name', sorted(ARRAYS))
def test_host_and_device_digests_agree(name):
  """A leaf held whole is digested in numpy, a multi-host one on device: same formula."""
  x = ARRAYS[name]
  assert fingerprint._host_digest(x) == int(fingerprint._device_digest(jnp.asarray(x)))


def test_sharded_device_digest_equals_the_host_one():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ('d',))
  x = RNG.standard_normal((8, 6)).astype(np.float32)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  assert int(fingerprint._device_digest(sharded)) == fingerprint._host_digest(x)


def test_every_single_bit_flip_and_a_swap_change_the_digest():
  x = RNG.standard_normal((4, 3)).astype(np.float32)
  reference = fingerprint._host_digest(x)
  words = x.view(np.uint32).reshape(-1)
  for i in range(words.size):
    for bit in range(32):
      flipped = words.copy()
      flipped[i] ^= np.uint32(1 << bit)
      assert fingerprint._host_digest(flipped.view(np.float32)) != reference, (i, bit)
  swapped = x.copy().reshape(-1)
  swapped[[0, 1]] = swapped[[1, 0]]
  assert fingerprint._host_digest(swapped) != reference


def test_tree_fingerprint_names_the_leaves_that_differ():
  tree = {'a': np.ones(3, np.float32), 'b': {'c': np.zeros((2, 2), np.float32)}}
  changed = {'a': np.ones(3, np.float32), 'b': {'c': np.eye(2, dtype=np.float32)}}
  diff = fingerprint.compare_fingerprints(fingerprint.tree_fingerprint(tree),
                                          fingerprint.tree_fingerprint(changed))
  assert diff == ["['b']['c']"]


def test_artifact_fingerprint_is_its_content_not_its_file_bytes(tmp_path):
  """The same adapter saved twice has other Orbax file bytes (random data-file names, time
  stamps) but one fingerprint; another value or meta gives another."""
  import json
  from opd_jax.mini_world import artifacts
  params = {'blocks': {0: {'lora_a': np.arange(6.0, dtype=np.float32).reshape(2, 3)}}}
  meta = {'lora_rank': 2, 'lora_alpha': 2.0, 'cfg_scale': 1.0, 'tasks': ['text']}
  a = artifacts.save_adapter(str(tmp_path / 'a'), params, meta)
  b = artifacts.save_adapter(str(tmp_path / 'b'), params, meta)
  assert json.load(open(f'{a}/manifest.json')) != json.load(open(f'{b}/manifest.json'))
  digest = lambda d: artifacts.load_adapter(d).fingerprint
  assert digest(a) == digest(b)
  other = {'blocks': {0: {'lora_a': params['blocks'][0]['lora_a'] + np.float32(1e-6)}}}
  c = artifacts.save_adapter(str(tmp_path / 'c'), other, meta)
  d = artifacts.save_adapter(str(tmp_path / 'd'), params, dict(meta, cfg_scale=2.0))
  assert len({digest(x) for x in (a, c, d)}) == 3
