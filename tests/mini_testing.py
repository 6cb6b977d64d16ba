"""Shared builders for the mini-world stage tests: a tiny base artifact, cached per process.

The base is a 1-block, 32-wide DiT on 4×4 patches (16 image tokens) with the text encoder of
configs/mini/pretrain.py:smoke, saved as a real base artifact. Its weights are the seeded init
perturbed by noise (so the velocity is not the adaLN-Zero zero map and samples differ) rather
than pretrained: the RL and eval tests need a valid base, not a good one, and skipping the
pretraining compile keeps each test file well under a minute. test_mini_pretrain covers
`run_pretrain` itself.
"""

import functools
import tempfile

import jax
from flax import nnx

from configs.mini import pretrain as pretrain_config
from opd_jax.mini_world.networks import build_networks
from opd_jax.parallel.mesh import make_mesh
from opd_jax.mini_world import artifacts
from opd_jax.pretrain.trainer import base_meta


@functools.lru_cache(maxsize=None)
def data_dir() -> str:
  return tempfile.mkdtemp(prefix='mini_world_tfds_')


def mesh_of(n: int = 1):
  return make_mesh({'data': n}, jax.devices()[:n])


def override(config, **kv):
  """config with dotted-key overrides, e.g. override(c, **{'train.num_steps': 3})."""
  for key, value in kv.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_pretrain_config(**kv):
  c = pretrain_config.get_config('smoke')
  c.data.data_dir = data_dir()
  c.model.patch_size = 4
  return override(c, **kv)


@functools.lru_cache(maxsize=None)
def tiny_base_dir() -> str:
  """Saves the tiny base once per process; returns its artifact directory."""
  c = tiny_pretrain_config()
  nets = build_networks(c.model, c.text_encoder, seed=0)
  dit = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                     nnx.to_pure_dict(nets.dit_base))
  return artifacts.save_base(tempfile.mkdtemp(prefix='mini_base_'), dit,
                             nnx.to_pure_dict(nets.text_params), base_meta(c))


def tiny_base():
  return artifacts.load_base(tiny_base_dir())


def tiny_rl_config(module, arg: str, **kv):
  """A stage config (configs/mini/grpo.py or nft.py module) on the tiny data, smoke-sized."""
  c = module.get_config(arg + ',smoke')
  c.data.data_dir = data_dir()
  c.eval.max_prompts = 4
  c.eval.batch_size = 4
  c.eval.num_steps = 4
  return override(c, **kv)


def rl_setup(config, mesh=None, extra_init=None):
  """(config with the base's sizes, RLSetup, RLPrompts, train.bases.Base) on the tiny base."""
  from opd_jax.rl.prompts import load_rl_prompts
  from opd_jax.rl.setup import build_rl
  from opd_jax.train.bases import mini_world_base
  base = mini_world_base(config, tiny_base())
  prompts, negative = load_rl_prompts(config, base, config.data.batch_size)
  setup = build_rl(config, mesh or mesh_of(1), base, negative, extra_init=extra_init)
  return config, setup, prompts, base


def brightness_reward(monkeypatch, task: str) -> None:
  """Task `task` scored by mean image brightness (the tiny base draws near-noise, where the
  task rewards are almost flat), through the trainer's own reward loading."""
  from opd_jax.rl import scoring
  monkeypatch.setitem(scoring.LOADERS, task, lambda name, config, mesh: (
      lambda images, prompts, metadata: images.mean(axis=(1, 2, 3))))
