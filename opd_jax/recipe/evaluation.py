"""Evaluation inside the recipe: the held-out evaluator on the recipe's base, and the probes
that draw the reward-vs-wall-clock curves (used by the stages and by the report)."""

from __future__ import annotations

from opd_jax.eval.mini_world import Evaluator
from opd_jax.mini_world import artifacts
from opd_jax.recipe.stages import Recipe
from opd_jax.train.probe import Probe


def evaluator(recipe: Recipe, eval_cfg) -> Evaluator:
  """The held-out evaluator on the recipe's base. Prompts come from the student's dataset (the
  one the RL and OPD stages build), not the base's pretraining data: every dataset config holds
  the same prompt splits, and the pretraining one is 3 × 32768 pairs a reused base never needs."""
  data = recipe.config.opd.data
  return Evaluator(artifacts.load_base(recipe.artifact('pretrain')), eval_cfg, data.data_dir,
                   data.dataset_config, mesh=recipe.mesh)


def adapter_meta(lora_rank: int, lora_alpha: float, cfg_scale: float, **more) -> dict:
  return {'lora_rank': lora_rank, 'lora_alpha': lora_alpha, 'cfg_scale': cfg_scale, **more}


def probe_every(steps: int, points: int) -> int:
  """The probe period that gives a curve of `steps` about `points` points: ⌈steps / points⌉."""
  return max(1, -(-int(steps) // int(points)))


def curve_probe(recipe: Recipe, meta: dict, steps: int, every: int | None = None) -> Probe:
  """Held-out rewards of the model being trained, for the reward-vs-wall-clock plot: at step 0,
  every ⌈steps / report.curve_points⌉ steps and at the last, so every curve has about the same
  number of points whatever the stage's length (and its probes cost about the same). `every`
  fixes the period instead (a benchmark that compares runs probe for probe)."""
  c = recipe.config.report
  ev = evaluator(recipe, c.curve_eval)

  def fn(params):
    return ev(artifacts.Adapter(params, meta), cfg_scale=float(meta['cfg_scale']))
  return Probe(every or probe_every(steps, c.curve_points), fn)
