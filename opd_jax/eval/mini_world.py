"""Held-out evaluation of mini-world models: per-task mean reward on the `{task}_test` prompts.

Every model — the base, an RL teacher, the OPD student, a multi-task baseline — is the base DiT
plus an optional LoRA adapter, sampled with the evaluation sampler of the recipe (spec §5): a
40-step Euler ODE with CFG at the model's own scale (1.0 for the CFG-free NFT teacher). Images
are scored on the host by the task's reward; composition is reported as GenEval-style strict
accuracy (`composition_strict`), the others as their mean reward. The dense composition reward
is returned too.

Initial noise depends only on (eval seed, task, prompt, sample), so all models are compared on
the same noise. `Evaluator` encodes the held-out prompts once per base and compiles one sampler
per adapter layout, so evaluating several models costs one compile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.mini_world import conditioning
from opd_jax.mini_world import latents as latent_codec
from opd_jax.models.lora import zeros_like_adapter
from opd_jax.mini_world.networks import build_networks
from opd_jax.models.policy import Policy
from opd_jax.parallel import sharding as shd
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.rewards import composition_strict, get_reward
from opd_jax.sampling.guidance import broadcast_uncond
from opd_jax.sampling.rollout import rollout
from opd_jax.sampling.schedule import flow_match_sigmas
from opd_jax.mini_world.artifacts import Adapter, BaseModel


def headline_metric(task: str) -> str:
  """Name of the number reported for a task (GenEval accuracy for composition)."""
  return 'composition_strict' if task == 'composition' else task


def summary(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
  """`Evaluator.scores` → the flat means `Evaluator.__call__` returns (without 'eval_s')."""
  out: dict[str, float] = {}
  for task, s in scores.items():
    out[f'reward/{task}'] = float(np.mean(s['dense']))
    out[task] = float(np.mean(s['headline']))
    if task == 'composition':
      out['composition_strict'] = out[task]
  out['mean_score'] = float(np.mean([out[t] for t in scores]))
  return out


@dataclasses.dataclass
class _Sampler:
  policy: Policy
  base: Any
  zero_adapter: Any
  fn: Any          # jitted (base, adapter, cond, uncond, keys, cfg) → images


class Evaluator:
  """Evaluates base + adapter models on held-out prompts of several tasks."""

  def __init__(self, base: BaseModel, eval_cfg, data_dir: str, dataset_config: str = 'default',
               mesh=None):
    """Encodes the held-out prompts with the base's frozen text encoder.

    Args:
      base: the pretrained base (DiT + text encoder + meta).
      eval_cfg: the `eval` config section (tasks, split, num_steps, shift, samples_per_prompt,
        optionally task_samples_per_prompt, max_prompts, batch_size, seed).
      data_dir, dataset_config: the mini_world TFDS dataset.
      mesh: device mesh (default: all devices on the data axis).
    """
    self.base, self.cfg = base, eval_cfg
    self.mesh = mesh or make_mesh({'data': -1})
    if eval_cfg.batch_size % batch_axis_size(self.mesh):
      raise ValueError(f'eval.batch_size {eval_cfg.batch_size} is not divisible by the '
                       f'{batch_axis_size(self.mesh)}-way batch split')
    nets = build_networks(base.model_config, base.text_encoder_config, seed=0)
    self._text = (nets.text_graphdef, base.text_encoder)
    limit = eval_cfg.max_prompts or None
    self.prompt_sets = {task: conditioning.load_prompt_set(data_dir, task, eval_cfg.split,
                                                           *self._text, dataset_config, limit)
                        for task in eval_cfg.tasks}
    self.negative = conditioning.negative_conditioning(*self._text)
    self.sigmas = flow_match_sigmas(eval_cfg.num_steps, eval_cfg.shift)
    self.unshuffle = base.latent_config.unshuffle
    m = base.model_config
    self.latent_shape = (m.latent_size, m.latent_size, m.latent_channels)
    self._samplers: dict[tuple, _Sampler] = {}

  def samples_per_prompt(self, task: str) -> int:
    """Samples per held-out prompt of `task`: eval.task_samples_per_prompt.<task> if set (> 0),
    else eval.samples_per_prompt."""
    per_task = self.cfg.get('task_samples_per_prompt', None)
    n = int(per_task.get(task, 0)) if per_task is not None else 0
    return n or int(self.cfg.samples_per_prompt)

  def _sampler(self, lora_rank: int, lora_alpha: float) -> _Sampler:
    key = (lora_rank, float(lora_alpha))
    if key in self._samplers:
      return self._samplers[key]
    m = self.base.model_config
    nets = build_networks(m, self.base.text_encoder_config, seed=0, lora_rank=lora_rank,
                          lora_alpha=lora_alpha)
    policy = Policy(nets.dit_graphdef)
    base_sh = shd.state_shardings(nets.dit_base, self.mesh)
    base = jax.device_put(self.base.dit, base_sh)
    zero = zeros_like_adapter(nnx.to_pure_dict(nets.dit_lora))
    sigmas, shape, unshuffle = self.sigmas, self.latent_shape, self.unshuffle

    def sample(base, adapter, cond, uncond, keys, cfg):
      traj = rollout(policy.velocity(base, adapter), cond, uncond, keys, sigmas=sigmas,
                     latent_shape=shape, kernel='ode', cfg_scale=cfg)
      return latent_codec.decode(traj.latents[-1], unshuffle)

    self._samplers[key] = _Sampler(policy, base, zero, jax.jit(sample))
    return self._samplers[key]

  def generate(self, task: str, adapter: Adapter | None = None, cfg_scale: float = 1.0
               ) -> tuple[np.ndarray, list[str]]:
    """Images float32 [N·S, H, W, 3] in [0, 1] for the task's held-out prompts (S samples each)."""
    rank = int(adapter.meta['lora_rank']) if adapter is not None else 0
    alpha = float(adapter.meta['lora_alpha']) if adapter is not None else 1.0
    s = self._sampler(rank, alpha)
    params = adapter.params if adapter is not None else s.zero_adapter
    ps = self.prompt_sets[task]
    reps = self.samples_per_prompt(task)
    idx = np.repeat(np.arange(len(ps)), reps)
    sample_id = np.tile(np.arange(reps), len(ps))
    prompts, cond = ps.take(idx)
    task_key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), sum(map(ord, task)))
    keys = jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(task_key, i), r))(
        jnp.asarray(idx), jnp.asarray(sample_id))
    bs = self.cfg.batch_size
    images = []
    for start in range(0, len(idx), bs):
      n = min(bs, len(idx) - start)
      pad = lambda x: np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)]) if n < bs else x
      c = jax.tree.map(lambda x: pad(x[start:start + n]), cond)
      k = pad(np.asarray(keys[start:start + n]))
      sh = lambda x: shd.batch_sharding(self.mesh, np.ndim(x))
      c = jax.tree.map(lambda x: jax.device_put(x, sh(x)), c)
      k = jax.device_put(k, sh(k))
      uncond = None
      if cfg_scale != 1.0:
        uncond = jax.tree.map(lambda x: jax.device_put(x, sh(x)),
                              jax.tree.map(np.asarray, broadcast_uncond(self.negative, bs)))
      out = s.fn(s.base, params, c, uncond, k, jnp.float32(cfg_scale))
      images.append(np.asarray(out)[:n])
    return np.concatenate(images), prompts

  def scores(self, adapter: Adapter | None = None, cfg_scale: float = 1.0,
             images_out: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample scores of base (+ adapter) on every task, for paired comparisons.

    Returns {task: {'headline': float [N·S], 'dense': float [N·S], 'prompt': int [N·S]}}: the
    task's headline metric (composition: strict accuracy) and dense reward of every sample, and
    the index of its held-out prompt (the same order for every model: samples are paired).
    """
    out = {}
    for task in self.cfg.tasks:
      images, prompts = self.generate(task, adapter, cfg_scale)
      if images_out is not None:
        images_out[task] = (images, prompts)
      dense = np.asarray(get_reward(task)(images, prompts), np.float64)
      headline = (np.asarray(composition_strict(images, prompts), np.float64)
                  if task == 'composition' else dense)
      prompt = np.repeat(np.arange(len(self.prompt_sets[task])), self.samples_per_prompt(task))
      out[task] = {'headline': headline, 'dense': dense, 'prompt': prompt}
    return out

  def __call__(self, adapter: Adapter | None = None, cfg_scale: float = 1.0,
               images_out: dict | None = None) -> dict[str, float]:
    """Evaluates base (+ adapter) on every task.

    Args:
      adapter: a LoRA adapter artifact (None: the base alone).
      cfg_scale: CFG weight w (1.0: no guidance, the unconditional branch is skipped).
      images_out: if given, receives {task: (images, prompts)} of the evaluated samples.

    Returns:
      Flat dict: '<task>' = headline score per task (composition: 'composition_strict' too),
      'reward/<task>' = mean dense reward, 'mean_score' = mean of the headline scores,
      'eval_s' = wall-clock seconds.
    """
    start = time.time()
    out = summary(self.scores(adapter, cfg_scale, images_out))
    out['eval_s'] = time.time() - start
    return out
