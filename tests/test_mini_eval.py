"""Held-out evaluation of mini-world models (base alone and base + LoRA adapter)."""

import jax
import ml_collections
import numpy as np

from configs.mini import common
from opd_jax.eval.mini_world import Evaluator
from opd_jax.models.lora import zeros_like_adapter
from opd_jax.mini_world.networks import build_networks
from opd_jax.mini_world.artifacts import Adapter
from flax import nnx
import mini_testing


def _evaluator(**kv):
  e = common.evaluation()
  e.max_prompts, e.batch_size, e.num_steps = 3, 4, 4
  for k, v in kv.items():
    e[k] = v
  return Evaluator(mini_testing.tiny_base(), e, mini_testing.data_dir(), 'small',
                   mesh=mini_testing.mesh_of(2))


def test_evaluator_reports_every_task_deterministically():
  ev = _evaluator(samples_per_prompt=2)
  a, b = ev(None, 4.5), ev(None, 4.5)
  per_sample = ev.scores(None, 4.5)
  for task in common.TASKS:
    assert 0.0 <= a[task] <= 1.0 and 0.0 <= a[f'reward/{task}'] <= 1.0
    assert a[task] == b[task]
    s = per_sample[task]   # the per-sample scores behind the means, prompts in order
    np.testing.assert_array_equal(s['prompt'], [0, 0, 1, 1, 2, 2])
    assert np.mean(s['headline']) == a[task] and np.mean(s['dense']) == a[f'reward/{task}']
  assert a['composition'] == a['composition_strict']
  assert a['composition_strict'] <= a['reward/composition']
  images, prompts = ev.generate('text', None, 4.5)
  assert images.shape == (6, 16, 16, 3) and len(prompts) == 6 and prompts[0] == prompts[1]
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  assert not np.allclose(images[0], images[1])   # two samples of one prompt differ


def test_a_task_can_have_its_own_number_of_samples():
  ev = _evaluator(samples_per_prompt=2,
                  task_samples_per_prompt=ml_collections.ConfigDict({'text': 3}))
  assert [ev.samples_per_prompt(t) for t in common.TASKS] == [2, 3, 2]
  per_sample = ev.scores(None, 2.0)
  np.testing.assert_array_equal(per_sample['text']['prompt'], np.repeat([0, 1, 2], 3))
  np.testing.assert_array_equal(per_sample['aesthetics']['prompt'], np.repeat([0, 1, 2], 2))
  # The first two of a prompt's three samples are the ones a 2-sample evaluation draws.
  two = _evaluator(samples_per_prompt=2)
  np.testing.assert_allclose(ev.generate('text', None, 2.0)[0][:2],
                             two.generate('text', None, 2.0)[0][:2], atol=1e-6)


def test_zero_adapter_reproduces_the_base_and_cfg_changes_samples():
  ev = _evaluator()
  m = ev.base.model_config
  nets = build_networks(m, ev.base.text_encoder_config, seed=0, lora_rank=4, lora_alpha=8.0)
  zero = Adapter(zeros_like_adapter(nnx.to_pure_dict(nets.dit_lora)),
                 {'lora_rank': 4, 'lora_alpha': 8.0, 'cfg_scale': 1.0, 'tasks': []})
  base_images, _ = ev.generate('aesthetics', None, 2.0)
  lora_images, _ = ev.generate('aesthetics', zero, 2.0)
  np.testing.assert_allclose(lora_images, base_images, atol=1e-5)
  no_cfg, _ = ev.generate('aesthetics', None, 1.0)
  assert not np.allclose(no_cfg, base_images)
  # A non-zero adapter changes the samples.
  moved = Adapter(jax.tree.map(lambda x: x + 0.3, zero.params), zero.meta)
  assert not np.allclose(ev.generate('aesthetics', moved, 2.0)[0], base_images)
