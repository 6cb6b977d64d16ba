"""The stages of the mini-world recipe (configs/opd.py), each a call into the shared trainers.

  pretrain          opd_jax.pretrain.trainer.run_pretrain            → pretrain/base
  teacher_<task>    opd_jax.rl.trainer.run_rl (Flow-GRPO or NFT)     → teacher_<task>/teacher
  opd               opd_jax.opd.trainer.train_opd               → opd/student
  multitask_rl      run_rl, joint schedule over all tasks          → multitask_rl/teacher
  cascade_rl        run_rl, tasks one after another                → cascade_rl/teacher
  report            held-out evaluation of every model             → report.json, report.md, PNGs

Nothing here trains anything itself: this module only wires artifacts from one stage into the
config of the next and attaches the evaluation probe.
"""

from __future__ import annotations

import os
import time

import ml_collections

from opd_jax.opd.config import ConfigError

from opd_jax.eval.mini_world import Evaluator
from opd_jax.parallel.mesh import batch_axis_size, make_mesh
from opd_jax.recipe import report as report_lib
from opd_jax.recipe.stages import Recipe, Stage
from opd_jax.mini_world import artifacts
from opd_jax.train.probe import Probe


def base_dir(recipe: Recipe) -> str:
  return recipe.result('pretrain')['artifact']


def evaluator(recipe: Recipe, eval_cfg) -> Evaluator:
  data = recipe.config.pretrain.data
  return Evaluator(artifacts.load_base(base_dir(recipe)), eval_cfg, data.data_dir,
                   data.dataset_config, mesh=recipe.mesh)


def curve_probe(recipe: Recipe, meta: dict) -> Probe:
  """Held-out rewards of the model being trained, for the reward-vs-wall-clock plot."""
  c = recipe.config.report
  ev = evaluator(recipe, c.curve_eval)

  def fn(params):
    return ev(artifacts.Adapter(params, meta), cfg_scale=float(meta['cfg_scale']))
  return Probe(c.curve_every, fn)


def _probe_meta(lora_cfg_rank: int, lora_alpha: float, cfg_scale: float) -> dict:
  return {'lora_rank': lora_cfg_rank, 'lora_alpha': lora_alpha, 'cfg_scale': cfg_scale}


# --- stage runners ------------------------------------------------------------------------------
def run_pretrain_stage(recipe: Recipe, directory: str) -> dict:
  from opd_jax.pretrain.trainer import run_pretrain
  out = run_pretrain(recipe.stage_config('pretrain'), directory, mesh=recipe.mesh)
  return {'artifact': out['base_dir'], 'train_seconds': out['wall_s'],
          'final_loss': out['metrics'].get('loss'), 'shipped': out.get('shipped', False)}


def _run_rl_stage(recipe: Recipe, name: str, directory: str, with_probe: bool) -> dict:
  from opd_jax.rl.trainer import run_rl
  c = recipe.stage_config(name)
  probe = None
  if with_probe:
    probe = curve_probe(recipe, _probe_meta(c.lora.rank, c.lora.alpha, c.rollout.cfg_scale))
  out = run_rl(c, directory, base_dir(recipe), mesh=recipe.mesh, probe=probe)
  result = {'artifact': out['teacher_dir'], 'train_seconds': out['wall_s'],
            'iterations': out['steps'],
            'trajectories': out['steps'] * c.data.prompts_per_step * c.data.group_size}
  if probe is not None:
    result['train_seconds'] = out['wall_s'] - probe.seconds
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
  """The OPD stage config with the base, the teachers and their CFG scales filled in.

  `tasks` (default: all) selects the teachers: one task gives single-teacher OPD.
  """
  tasks = recipe.tasks if tasks is None else tuple(tasks)
  c = recipe.stage_config('opd')
  c.base.source = 'mini_world'
  c.base.path = base_dir(recipe)
  c.teachers.source = 'artifacts'
  c.data.tasks = tasks
  paths = [recipe.result(f'teacher_{t}')['artifact'] for t in tasks]
  teachers = [artifacts.load_adapter(p) for p in paths]
  c.teachers.paths = tuple(paths)
  c.teachers.cfg_scales = tuple(t.cfg_scale for t in teachers)
  c.model.lora_rank = int(teachers[0].meta['lora_rank'])
  c.model.lora_alpha = float(teachers[0].meta['lora_alpha'])
  return c


def run_opd_stage(recipe: Recipe, directory: str, tasks: tuple[str, ...] | None = None) -> dict:
  from opd_jax.opd.trainer import train_opd
  c = opd_config(recipe, tasks)
  meta = {**_probe_meta(c.model.lora_rank, c.model.lora_alpha, c.rollout.cfg_scale),
          'tasks': list(c.data.tasks), 'stage': 'opd', 'weights': 'ema'}
  probe = curve_probe(recipe, meta)
  mesh = recipe.mesh or make_mesh(c.mesh.shape.to_dict())
  began = time.time()
  state, _ = train_opd(c, directory, mesh=mesh, probe=probe)
  wall = time.time() - began
  student = artifacts.save_adapter(os.path.join(directory, 'student'), state.ema_params,
                                   {**meta, 'steps': int(state.step)})
  per_round = len(c.data.tasks) * c.data.prompts_per_device * batch_axis_size(mesh)
  return {'artifact': student, 'train_seconds': wall - probe.seconds, 'curve': probe.history,
          'iterations': int(c.train.num_rounds),
          'trajectories': int(c.train.num_rounds) * per_round}


def run_single_teacher_opd_stage(task: str):
  def run(recipe: Recipe, directory: str) -> dict:
    return run_opd_stage(recipe, directory, (task,))
  return run


def run_report_stage(recipe: Recipe, directory: str) -> dict:
  return report_lib.write_report(recipe, directory)


def mini_world_stages(tasks: tuple[str, ...]) -> dict[str, Stage]:
  """Stages in dependency order."""
  stages = {'pretrain': Stage('pretrain', (), run_pretrain_stage)}
  for t in tasks:
    stages[f'teacher_{t}'] = Stage(f'teacher_{t}', ('pretrain',), run_teacher_stage(t))
  stages['opd'] = Stage('opd', ('pretrain',) + tuple(f'teacher_{t}' for t in tasks),
                        run_opd_stage, resumable=True)
  stages['multitask_rl'] = Stage('multitask_rl', ('pretrain',), run_baseline_stage('multitask_rl'))
  stages['cascade_rl'] = Stage('cascade_rl', ('pretrain',), run_baseline_stage('cascade_rl'))
  for t in tasks:   # not in the default config.stages: add 'opd_single' to run them
    stages[f'opd_single_{t}'] = Stage(f'opd_single_{t}', ('pretrain', f'teacher_{t}'),
                                      run_single_teacher_opd_stage(t), resumable=True)
  stages['report'] = Stage('report', (), run_report_stage)
  return stages


def run_mini_world(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """Runs the stages named in config.stages (configs/opd.py), skipping cached ones."""
  from opd_jax.opd.config import validate_opd_config
  from opd_jax.recipe.stages import expand_stages
  tasks = tuple(config.tasks)
  if tuple(config.teachers.keys()) != tasks and set(config.teachers.keys()) != set(tasks):
    raise ConfigError(f'config.teachers: sections {sorted(config.teachers.keys())} do not match '
                      f'config.tasks {tasks}')
  validate_opd_config(config.opd)
  recipe = Recipe(config, workdir, mini_world_stages(tasks), mesh=mesh)
  return recipe.run(expand_stages(config.stages, tasks))
