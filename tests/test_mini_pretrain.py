"""Mini-world pretraining: text encoder, latent codec, flow-matching step and the saved base."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opd_jax.mini_world import latents
from opd_jax.mini_world import tokenizer
from opd_jax.mini_world.networks import build_networks
from opd_jax.mini_world.text_encoder import encode_tokens
from opd_jax.pretrain import trainer as pretrain
from opd_jax.train.state import create_train_state, make_optimizer
from opd_jax.mini_world.artifacts import load_base
import mini_testing


def test_text_encoder_gives_the_dit_conditioning():
  c = mini_testing.tiny_pretrain_config()
  nets = build_networks(c.model, c.text_encoder, seed=0)
  tokens, mask = tokenizer.encode(['a red circle', 'the text "AC4"', ''])
  cond = encode_tokens(nets.text_graphdef, nnx.to_pure_dict(nets.text_params),
                       jnp.asarray(tokens))
  assert cond['context'].shape == (3, tokenizer.MAX_LEN, c.model.context_dim)
  assert cond['pooled'].shape == (3, c.model.pooled_dim)
  np.testing.assert_array_equal(cond['context_mask'], mask)
  assert int(cond['context_mask'][2].sum()) == 2  # "" keeps BOS and EOS
  assert not np.allclose(cond['pooled'][0], cond['pooled'][1])
  # The DiT takes the dict as is.
  dit = nnx.merge(nets.dit_graphdef, nets.dit_base, nets.dit_lora)
  v = dit(jnp.zeros((3, 16, 16, 3)), jnp.full((3,), 500.0), **cond)
  assert v.shape == (3, 16, 16, 3) and np.all(np.isfinite(v))


@pytest.mark.parametrize('r', [1, 2, 4])
def test_latent_codec_round_trip(r):
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  z = latents.encode(images, r)
  assert z.shape == (2,) + latents.latent_shape(r)
  assert float(z.min()) >= -1.0 and float(z.max()) <= 1.0
  np.testing.assert_allclose(latents.decode(z, r), images / 255.0, atol=1e-6)
  # Unshuffling is a pure relayout: pixel (y, x) of an r×r cell lands in channel (dy, dx, c).
  np.testing.assert_array_equal(z[0, 0, 0, :3], latents.encode(images, 1)[0, 0, 0])


def test_flow_matching_step_reduces_the_loss_on_a_fixed_batch():
  c = mini_testing.tiny_pretrain_config(**{'optimizer.warmup_steps': 1, 'optimizer.lr': 3e-3,
                                           'pretrain.prompt_dropout': 0.0})
  nets = build_networks(c.model, c.text_encoder, seed=0)
  params = {'dit': nnx.to_pure_dict(nets.dit_base),
            'text_encoder': nnx.to_pure_dict(nets.text_params)}
  tx = make_optimizer(c.optimizer, 100)
  state = create_train_state(params, tx, 0)
  step = jax.jit(pretrain.make_pretrain_step(c, nets.dit_graphdef, nets.text_graphdef, tx))
  data = pretrain.PretrainData(c.data.data_dir, 'small', 1, 8, seed=0)
  batch = data.batch(0)
  # Same t and ε every step (the rng is fixed by resetting the step), so losses compare.
  losses = []
  for _ in range(15):
    state, m = step(state.replace(step=jnp.zeros((), jnp.int32)), batch)
    losses.append(float(m['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses


def test_pretrain_data_epochs_cover_the_split_without_repeats():
  c = mini_testing.tiny_pretrain_config()
  data = pretrain.PretrainData(c.data.data_dir, 'small', 1, 8, seed=0)
  per_epoch = len(data) // 8
  tokens = np.concatenate([data.batch(s)['tokens'] for s in range(per_epoch)])
  rows = {tuple(t) for t in tokens}
  assert len(tokens) == per_epoch * 8 and data.batch(0)['latents'].shape == (8, 16, 16, 3)
  assert len(rows) > len(tokens) // 2  # a permutation (prompts repeat in the split itself)


def test_run_pretrain_saves_a_loadable_base(tmp_path):
  out = pretrain.run_pretrain(mini_testing.tiny_pretrain_config(), str(tmp_path),
                              mesh=mini_testing.mesh_of(2))
  assert np.isfinite(out['metrics']['loss']) and out['wall_s'] > 0 and out['steps'] == 4
  base_dir = out['base_dir']
  base = load_base(base_dir)
  c = mini_testing.tiny_pretrain_config()
  assert base.meta['model'] == c.model.to_dict()
  assert base.meta['text_encoder'] == c.text_encoder.to_dict()
  nets = build_networks(base.model_config, base.text_encoder_config, seed=0)
  ref = nnx.to_pure_dict(nets.dit_base)
  assert jax.tree.structure(ref) == jax.tree.structure(base.dit)
  assert jax.tree.structure(nnx.to_pure_dict(nets.text_params)) == jax.tree.structure(
      base.text_encoder)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(base.dit)):
    assert a.shape == b.shape and np.all(np.isfinite(b))
  with open(os.path.join(os.path.dirname(base_dir), 'metrics.jsonl')) as f:
    lines = f.read().strip().splitlines()
  assert lines and all(np.isfinite(json.loads(l)['loss']) for l in lines)


def test_pretrain_config_rejects_a_latent_mismatch():
  c = mini_testing.tiny_pretrain_config(**{'latent.unshuffle': 2})
  with pytest.raises(ValueError, match='latent'):
    pretrain.run_pretrain(c, tempfile.mkdtemp())
