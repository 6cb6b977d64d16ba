"""The shipped mini-world base: it is what configs/mini/pretrain.py makes, and reuse is exact."""

import os

import jax
import numpy as np
import pytest

import mini_testing
from configs.mini import pretrain as pretrain_config
from opd_jax.mini_world import artifacts
from opd_jax.pretrain import trainer as pretrain
from opd_jax.mini_world import shipped_base


def test_the_repo_ships_the_base_of_the_pretrain_config():
  """Fails when configs/mini/pretrain.py or the dataset changes without remaking the asset."""
  assert shipped_base.mismatch(pretrain_config.get_config()) == []
  size = sum(os.path.getsize(shipped_base.ASSET_PREFIX + ext)
             for ext in ('.safetensors', '.json'))
  assert size < 5 * 2**20
  base, record = shipped_base.load()
  assert record['train_seconds'] > 0 and np.isfinite(record['final_loss'])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((base.dit, base.text_encoder)))


@pytest.fixture(scope='module')
def tiny_shipped(tmp_path_factory):
  """A smoke pretraining run shipped under a temporary prefix."""
  config = mini_testing.tiny_pretrain_config()
  out = pretrain.run_pretrain(config, str(tmp_path_factory.mktemp('pre')))
  prefix = str(tmp_path_factory.mktemp('asset') / 'base')
  shipped_base.ship(out['base_dir'], config, train_seconds=out['wall_s'],
                    final_loss=out['metrics']['loss'], prefix=prefix)
  return config, out, prefix


def test_ship_then_reuse_returns_the_same_weights(tiny_shipped, tmp_path, monkeypatch):
  config, out, prefix = tiny_shipped
  monkeypatch.setattr(shipped_base, 'ASSET_PREFIX', prefix)
  config = mini_testing.tiny_pretrain_config(reuse_shipped=True, seed=3)  # seed is ignored
  reused = pretrain.run_pretrain(config, str(tmp_path))
  assert reused['shipped'] and reused['wall_s'] == round(out['wall_s'], 1)
  trained, again = artifacts.load_base(out['base_dir']), artifacts.load_base(reused['base_dir'])
  assert trained.meta == again.meta
  for a, b in zip(jax.tree.leaves((trained.dit, trained.text_encoder)),
                  jax.tree.leaves((again.dit, again.text_encoder))):
    np.testing.assert_array_equal(a, b)


def test_changed_settings_train_a_new_base(tiny_shipped, tmp_path, monkeypatch, capsys):
  _, _, prefix = tiny_shipped
  changed = mini_testing.tiny_pretrain_config(**{'model.dim': 16, 'reuse_shipped': True})
  assert shipped_base.mismatch(changed, prefix) == ['model.dim: shipped 32, requested 16']
  monkeypatch.setattr(shipped_base, 'ASSET_PREFIX', prefix)
  out = pretrain.run_pretrain(changed, str(tmp_path))
  assert 'shipped' not in out and 'model.dim' in capsys.readouterr().out
  assert artifacts.load_base(out['base_dir']).meta['model']['dim'] == 16


def test_a_corrupt_shipped_file_is_a_clear_error(tiny_shipped, tmp_path):
  _, _, prefix = tiny_shipped
  bad = str(tmp_path / 'base')
  for ext in ('.json', '.safetensors'):
    with open(prefix + ext, 'rb') as src, open(bad + ext, 'wb') as dst:
      data = src.read()
      dst.write(data if ext == '.json' else data[:len(data) // 2])
  with pytest.raises(ValueError, match='corrupt'):
    shipped_base.load(bad)
