"""The stages of the mini-world recipe (configs/opd.py), each a call into the shared trainers.

  pretrain          opd_jax.pretrain.trainer.run_pretrain          → pretrain/base
  teacher_<task>    opd_jax.rl.trainer.run_rl (Flow-GRPO or NFT)   → teacher_<task>/teacher
  opd               opd_jax.opd.trainer.train_opd                  → opd/student
  multitask_rl      run_rl, joint schedule over all tasks          → multitask_rl/teacher
  cascade_rl        run_rl, tasks one after another                → cascade_rl/teacher
  report            held-out evaluation of every model             → report.json, report.md, PNGs

Nothing here trains anything itself: this module only wires artifacts from one stage into the
config of the next, attaches the evaluation probes, and validates every stage's config before
the first stage runs (`validate`).
"""

from __future__ import annotations

import os

import ml_collections

from opd_jax.errors import ConfigError
from opd_jax.mini_world import artifacts
from opd_jax.mini_world import lexicon
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.recipe import report as report_lib
from opd_jax.recipe.evaluation import adapter_meta, curve_probe
from opd_jax.recipe.stages import Recipe, Stage, expand_stages


# --- stage runners ------------------------------------------------------------------------------
def run_pretrain_stage(recipe: Recipe, directory: str) -> dict:
  from opd_jax.pretrain.trainer import run_pretrain
  out = run_pretrain(recipe.stage_config('pretrain'), directory, mesh=recipe.mesh)
  return {'artifact': out['base_dir'], 'train_seconds': out['wall_s'],
          'final_loss': out['metrics'].get('loss'), 'shipped': out.get('shipped', False)}


def rl_config(recipe: Recipe, name: str) -> ml_collections.ConfigDict:
  """An RL stage's config with the recipe's base filled in."""
  c = recipe.stage_config(name)
  c.base.path = recipe.artifact('pretrain')
  return c


def _run_rl_stage(recipe: Recipe, name: str, directory: str, with_probe: bool) -> dict:
  from opd_jax.rl.trainer import run_rl
  c = rl_config(recipe, name)
  probe = None
  if with_probe:
    probe = curve_probe(recipe, adapter_meta(c.lora.rank, c.lora.alpha, c.rollout.cfg_scale),
                        c.train.num_steps)
  out = run_rl(c, directory, mesh=recipe.mesh, probe=probe)
  prompts = c.data.batch_size or c.data.batch_size_per_device   # resolved in run_rl
  result = {'artifact': out['teacher_dir'], 'train_seconds': out['wall_s'],
            'iterations': out['steps'],
            'trajectories': out['steps'] * prompts * c.data.group_size}
  if probe is not None:
    result['curve'] = probe.history
  return result


def run_teacher_stage(task: str):
  def run(recipe: Recipe, directory: str) -> dict:
    return _run_rl_stage(recipe, f'teacher_{task}', directory, with_probe=False)
  return run


def run_baseline_stage(name: str):
  def run(recipe: Recipe, directory: str) -> dict:
    return _run_rl_stage(recipe, name, directory, with_probe=True)
  return run


def opd_config(recipe: Recipe, tasks: tuple[str, ...] | None = None
               ) -> ml_collections.ConfigDict:
  """The OPD stage config with the base and the teachers (path, CFG, LoRA layout) filled in.

  `tasks` (default: all) selects the teachers: one task gives single-teacher OPD.
  """
  tasks = recipe.tasks if tasks is None else tuple(tasks)
  c = recipe.stage_config('opd')
  c.base.source = 'mini_world'
  c.base.path = recipe.artifact('pretrain')
  c.teachers.source = 'artifacts'
  c.data.tasks = tasks
  teachers = {t: artifacts.load_adapter(recipe.artifact(f'teacher_{t}')) for t in tasks}
  with c.unlocked():
    c.teachers.tasks = ml_collections.ConfigDict({
        t: ml_collections.ConfigDict({'path': recipe.artifact(f'teacher_{t}'),
                                      'cfg_scale': a.cfg_scale})
        for t, a in teachers.items()})
  first = next(iter(teachers.values()))
  c.lora.rank = int(first.meta['lora_rank'])
  c.lora.alpha = float(first.meta['lora_alpha'])
  return c


def run_opd_stage(recipe: Recipe, directory: str, tasks: tuple[str, ...] | None = None,
                  with_probe: bool = True) -> dict:
  """The OPD student from the teachers of `tasks` (default: all); `with_probe` records its
  reward-vs-wall-clock curve (the report draws it for the all-teacher student only)."""
  from opd_jax.opd.trainer import train_opd
  c = opd_config(recipe, tasks)
  meta = adapter_meta(c.lora.rank, c.lora.alpha, c.rollout.cfg_scale,
                      tasks=list(c.data.tasks), stage='opd',
                      weights='ema' if c.ema.use_ema else 'raw')
  probe = curve_probe(recipe, meta, c.train.num_steps) if with_probe else None
  mesh = recipe.mesh or make_mesh(c.mesh.shape.to_dict())
  state, metrics = train_opd(c, directory, mesh=mesh, probe=probe)
  student = artifacts.save_adapter(
      os.path.join(directory, 'student'),
      state.ema_params if c.ema.use_ema else state.params,
      {**meta, 'steps': int(state.step)})
  per_task = c.data.batch_size or c.data.batch_size_per_device * batch_axis_size(mesh)
  rounds = int(c.train.num_steps)
  return {'artifact': student, 'train_seconds': metrics['train_seconds'],
          'curve': probe.history if probe is not None else [],
          'iterations': rounds, 'trajectories': rounds * len(c.data.tasks) * per_task}


def run_single_teacher_opd_stage(task: str):
  def run(recipe: Recipe, directory: str) -> dict:
    return run_opd_stage(recipe, directory, (task,), with_probe=False)   # no curve drawn
  return run


def run_report_stage(recipe: Recipe, directory: str) -> dict:
  return report_lib.write_report(recipe, directory)


def _curve_keyed(name: str) -> tuple[str, ...]:
  """The report's probe settings for a stage that records a curve (report_lib.CURVE_STAGES)."""
  return report_lib.CURVE_SETTINGS if name in report_lib.CURVE_STAGES else ()


def mini_world_stages(tasks: tuple[str, ...]) -> dict[str, Stage]:
  """Stages in dependency order."""
  stages = {'pretrain': Stage('pretrain', (), run_pretrain_stage)}
  for t in tasks:
    stages[f'teacher_{t}'] = Stage(f'teacher_{t}', ('pretrain',), run_teacher_stage(t))
  stages['opd'] = Stage('opd', ('pretrain',) + tuple(f'teacher_{t}' for t in tasks),
                        run_opd_stage, _curve_keyed('opd'))
  for name in ('multitask_rl', 'cascade_rl'):
    stages[name] = Stage(name, ('pretrain',), run_baseline_stage(name), _curve_keyed(name))
  for t in tasks:   # not in the default config.stages: add 'opd_single' to run them
    stages[f'opd_single_{t}'] = Stage(f'opd_single_{t}', ('pretrain', f'teacher_{t}'),
                                      run_single_teacher_opd_stage(t))
  stages['report'] = Stage('report', (), run_report_stage)
  return stages


def validate(config: ml_collections.ConfigDict) -> None:
  """Every stage's config, before the first stage runs (paths are filled in later)."""
  from opd_jax.opd import config as opd_validation
  from opd_jax.pretrain.trainer import validate as validate_pretrain
  from opd_jax.rl import config as rl_validation
  from opd_jax.train import config_check as cc
  cc.require_sections(config, ('trainer', 'seed', 'tasks', 'stages', 'pretrain', 'teachers',
                               'opd', 'multitask_rl', 'cascade_rl', 'report'))
  cc.integer(config.seed, 'seed', 0)
  tasks = tuple(config.tasks)
  if set(config.teachers.keys()) != set(tasks):
    raise ConfigError(f'config.teachers: sections {sorted(config.teachers.keys())} do not match '
                      f'config.tasks {tasks}')
  stages = mini_world_stages(tasks)
  unknown = [s for s in expand_stages(config.stages, tasks) if s not in stages]
  if unknown:
    raise ConfigError(f'config.stages: unknown stage(s) {unknown}; choose from '
                      f'{["teachers", "opd_single"] + list(stages)}')
  for name, section, check in (
      [('pretrain', config.pretrain, validate_pretrain)] +
      [(f'teachers.{t}', config.teachers[t], rl_validation.validate) for t in tasks] +
      [('opd', config.opd, opd_validation.validate),
       ('multitask_rl', config.multitask_rl, rl_validation.validate),
       ('cascade_rl', config.cascade_rl, rl_validation.validate)]):
    try:
      check(section)
    except ConfigError as e:   # name the field from the recipe's root
      raise ConfigError(str(e).replace('config.', f'config.{name}.', 1)) from None
  r = config.report
  cc.integer(r.curve_points, 'report.curve_points', 1)
  cc.integer(r.eval.samples_per_prompt, 'report.eval.samples_per_prompt', 1)
  per_task = r.eval.get('task_samples_per_prompt', None)
  if per_task is not None:
    # Any of the world's tasks: a count for a task this run leaves out is unused, not wrong.
    unknown = sorted(set(per_task.keys()) - set(lexicon.TASKS))
    cc.check(not unknown, 'report.eval.task_samples_per_prompt', f'unknown task(s) {unknown}')
    for t in per_task.keys():
      cc.integer(per_task[t], f'report.eval.task_samples_per_prompt.{t}', 0)
  cc.check(r.base_cfg_scale >= 1, 'report.base_cfg_scale', f'must be >= 1, got {r.base_cfg_scale}')


def run_mini_world(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """Runs the stages named in config.stages (configs/opd.py), skipping cached ones."""
  validate(config)
  tasks = tuple(config.tasks)
  recipe = Recipe(config, workdir, mini_world_stages(tasks), mesh=mesh)
  return recipe.run(expand_stages(config.stages, tasks))


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The `recipe` entry of `opd_jax.trainers`."""
  run_mini_world(config, workdir)
