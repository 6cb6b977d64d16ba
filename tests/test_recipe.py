"""The mini-world recipe (configs/opd.py): stage keys, caching/resume, report schema and figures."""

import json
import os
import shutil

import numpy as np
import pytest

from configs.opd import get_config
from opd_jax.errors import ConfigError
from opd_jax.recipe import report
from opd_jax.recipe.mini_world import mini_world_stages
from opd_jax.recipe.stages import Recipe, expand_stages

from cli_testing import run_main

TASKS = ('composition', 'text', 'aesthetics')


def _recipe(config, tmp_path):
  return Recipe(config, str(tmp_path), mini_world_stages(tuple(config.tasks)))


def test_expand_stages():
  assert expand_stages('pretrain,teachers,report', TASKS) == [
      'pretrain', 'teacher_composition', 'teacher_text', 'teacher_aesthetics', 'report']
  assert expand_stages('opd_single', TASKS) == [
      'opd_single_composition', 'opd_single_text', 'opd_single_aesthetics']


def test_stage_keys_follow_settings_and_dependencies(tmp_path):
  c = get_config('smoke')
  before = {s: _recipe(c, tmp_path).key(s) for s in mini_world_stages(TASKS)}
  c.teachers.text.train.num_steps += 1
  after = {s: _recipe(c, tmp_path).key(s) for s in mini_world_stages(TASKS)}
  changed = {s for s in before if before[s] != after[s]}
  assert changed == {'teacher_text', 'opd', 'opd_single_text'}
  # The probe settings shape the curves of the stages that record one (and the report), only.
  c.report.curve_points += 1
  probed = {s: _recipe(c, tmp_path).key(s) for s in mini_world_stages(TASKS)}
  assert {s for s in after if after[s] != probed[s]} == {'opd', 'multitask_rl', 'cascade_rl',
                                                         'report'}
  c.report.curve_eval.max_prompts += 1
  assert _recipe(c, tmp_path).key('opd') != probed['opd']
  c.seed = 1
  reseeded = {s: _recipe(c, tmp_path).key(s) for s in mini_world_stages(TASKS)}
  assert all(reseeded[s] != after[s] for s in reseeded)


def test_curves_get_about_curve_points_probes_whatever_the_stage_length():
  from opd_jax.recipe.evaluation import probe_every
  assert [probe_every(n, 12) for n in (180, 20, 12, 5, 1)] == [15, 2, 1, 1, 1]
  assert probe_every(181, 12) == 16            # never more than 12 probes after step 0
  assert probe_every(3, 100) == 1              # the smoke recipe: every step


def test_missing_dependency_is_a_config_error(tmp_path):
  c = get_config('smoke')
  with pytest.raises(ConfigError, match="stage 'opd' needs 'pretrain'"):
    _recipe(c, tmp_path).run(expand_stages('opd', TASKS))
  with pytest.raises(ConfigError, match='unknown stage'):
    _recipe(c, tmp_path).run(['distill'])


@pytest.mark.parametrize('field,value', [
    ('cascade_rl.rollout.kernel', 'heun'),
    ('teachers.text.data.group_size', 0),
    ('opd.teachers.tasks.text.cfg_scale', -1.0),
    ('pretrain.optimizer.lr', 0.0),
    ('report.curve_points', 0),
    ('report.eval.samples_per_prompt', 0),
    ('report.eval.task_samples_per_prompt.text', -1),
])
def test_every_stage_is_validated_before_the_first_runs(tmp_path, field, value):
  """A bad field of a late stage stops the recipe at once, named from the recipe's root."""
  from opd_jax.recipe.mini_world import run_mini_world
  c = get_config('smoke')
  *parents, leaf = field.split('.')
  node = c
  for name in parents:
    node = node[name]
  node[leaf] = value
  with pytest.raises(ConfigError, match='config\\.' + field.replace('.', '\\.')):
    run_mini_world(c, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_per_task_samples_may_name_tasks_the_run_leaves_out(tmp_path):
  """configs/opd.py with fewer tasks (as benchmarks/teacher_settings.py runs it) still validates;
  a name that is no task of the world does not."""
  from opd_jax.recipe.mini_world import validate
  c = get_config('smoke')
  c.tasks = ('text',)
  for other in ('composition', 'aesthetics'):
    del c.teachers[other]
  validate(c)
  c.report.eval.task_samples_per_prompt.ocr = 2
  with pytest.raises(ConfigError, match=r"task_samples_per_prompt: unknown task\(s\) \['ocr'\]"):
    validate(c)


def _evals(scores):
  return {name: {**{t: v for t, v in zip(TASKS, s)}, **{f'reward/{t}': v for t, v in
                                                        zip(TASKS, s)}}
          for name, s in scores.items()}


def test_table_normalisation_and_figures():
  evals = _evals({'base': (0.2, 0.1, 0.4), 'teacher/composition': (0.6, 0.05, 0.4),
                  'teacher/text': (0.2, 0.5, 0.3), 'teacher/aesthetics': (0.1, 0.1, 0.8),
                  'opd': (0.5, 0.4, 0.7)})
  table = report.build_table(evals, {'base': 10.0, 'opd': 5.0}, TASKS)
  assert set(table) == {'rows', 'tasks', 'normalisation'}
  assert table['tasks'] == list(TASKS)
  for row in table['rows'].values():
    assert set(row) >= {'rewards', 'average', 'train_seconds'}
    assert 0.0 <= row['average'] <= 1.0
  assert table['normalisation']['composition'] == {'min': 0.1, 'max': 0.6}
  # opd: (0.5-0.1)/0.5, (0.4-0.05)/0.45, (0.7-0.3)/0.5
  np.testing.assert_allclose(table['rows']['opd']['average'],
                             np.mean([0.8, 0.35 / 0.45, 0.8]), rtol=1e-6)
  curve = [{'step': 0, 'train_seconds': 0.0, 'composition': 0.2, 'text': 0.1, 'aesthetics': 0.4},
           {'step': 10, 'train_seconds': 4.0, 'composition': 0.42, 'text': 0.35,
            'aesthetics': 0.65},
           {'step': 15, 'train_seconds': 6.0, 'composition': 0.48, 'text': 0.38,
            'aesthetics': 0.68},
           {'step': 20, 'train_seconds': 8.0, 'composition': 0.5, 'text': 0.4,
            'aesthetics': 0.7}]
  # Starts near its final Average, dips, then ends at the bounds' top.
  late = [{'step': 0, 'train_seconds': 0.0, 'composition': 0.48, 'text': 0.38,
           'aesthetics': 0.68},
          {'step': 10, 'train_seconds': 5.0, 'composition': 0.3, 'text': 0.2, 'aesthetics': 0.5},
          {'step': 20, 'train_seconds': 9.0, 'composition': 0.5, 'text': 0.4,
           'aesthetics': 0.7}]
  figures = report.derived_figures(table, {'opd': curve, 'multitask_rl': late})
  gains = figures['teacher_gain_over_base']
  assert gains['composition']['composition'] == pytest.approx(0.4)
  assert gains['aesthetics']['composition'] == pytest.approx(-0.1)
  assert figures['opd_recovered_fraction']['text'] == pytest.approx(0.3 / 0.4)
  # Curve bounds are min–max over all probe points: composition [0.2, 0.5], text [0.1, 0.4],
  # aesthetics [0.4, 0.7]. opd's Averages are 0, 0.8, 0.933, 1: both 90 % marks at 6 s.
  assert figures['curve_normalisation']['text'] == pytest.approx({'min': 0.1, 'max': 0.4})
  assert figures['seconds_to_90pct_of_final_average']['opd'] == 6.0
  assert figures['seconds_to_90pct_of_gain']['opd'] == 6.0
  # late: 0.933, 0.333, 1 — its first probe is already at 90 % of the final Average, but 90 %
  # of the gain over that first probe (0.993) comes only at 9 s.
  assert figures['seconds_to_90pct_of_final_average']['multitask_rl'] == 0.0
  assert figures['seconds_to_90pct_of_gain']['multitask_rl'] == 9.0
  assert figures['curve_final_average']['multitask_rl'] == pytest.approx(1.0)
  md = report.markdown(table, figures, {'eval': 'test', 'seed': 0, 'machine': 'm'})
  assert '| opd | 0.500 | 0.400 | 0.700 |' in md


def test_paired_figures_and_the_verdict_table():
  """Per-sample scores → the verdict: gains ± SE on the teacher's own task, the students'
  recovered fractions with intervals, Average intervals (by hand on 4 prompts × 2 samples)."""
  prompt = np.repeat(np.arange(4), 2)
  def row(comp, text, aes):
    return {t: {'headline': np.asarray(v, float), 'dense': np.asarray(v, float), 'prompt': prompt}
            for t, v in zip(TASKS, (comp, text, aes))}
  zeros = [0] * 8
  base = row(zeros, [.1, .1, .2, .2, .3, .3, .4, .4], [.5] * 8)
  scores = {'base': base,
            'teacher/composition': row([1, 1, 1, 1, 1, 0, 0, 0], base['text']['headline'],
                                       [.5] * 8),
            'teacher/text': row(zeros, [.3, .3, .4, .4, .5, .5, .8, .8], [.5] * 8),
            'teacher/aesthetics': row(zeros, base['text']['headline'], [.9] * 8),
            'opd': row([1, 1, 0, 0, 1, 0, 0, 0], [.2, .2, .3, .3, .4, .4, .6, .6], [.9] * 8),
            'opd_single/text': row(zeros, [.3, .3, .4, .4, .5, .5, .8, .8], [.5] * 8)}
  rows = [r for r in scores if not r.startswith('opd_single')]
  paired = report.paired_figures(scores, TASKS, rows)
  g = paired['teacher_gain']['composition']['composition']
  d = np.array([1, 1, .5, 0])   # per-prompt teacher − base
  assert g['mean'] == pytest.approx(d.mean()) and g['n'] == 4
  assert g['se'] == pytest.approx(d.std(ddof=1) / 2)
  assert paired['teacher_gain']['text']['text']['mean'] == pytest.approx(0.25)
  assert paired['teacher_gain']['aesthetics']['aesthetics']['se'] == 0.0
  assert paired['teacher_gain']['aesthetics']['aesthetics']['z'] is None
  rec = paired['recovered']
  assert rec['opd']['composition']['value'] == pytest.approx(0.375 / 0.625)
  assert rec['opd']['text']['value'] == pytest.approx(0.125 / 0.25)
  assert rec['opd']['aesthetics']['value'] == pytest.approx(1.0)
  assert set(rec) == {'opd', 'opd_single/text'} and set(rec['opd_single/text']) == {'text'}
  assert rec['opd_single/text']['text']['value'] == pytest.approx(1.0)
  assert set(paired['average_interval']) == set(scores)
  evals = {r: {**{t: float(np.mean(s[t]['headline'])) for t in TASKS},
               **{f'reward/{t}': float(np.mean(s[t]['dense'])) for t in TASKS}}
           for r, s in scores.items() if r in rows}
  table = report.build_table(evals, {}, TASKS)
  md = report.markdown(table, {'paired': paired}, {'eval': 'test', 'seed': 0, 'machine': 'm'})
  assert md.index('## Verdict') < md.index('| model |')
  assert '| text | +0.250 ± 0.050 | +5.0 | 0.50 [' in md
  assert '| aesthetics | +0.400 ± 0.000 | — | 1.00 [1.00, 1.00] |' in md


# The GRPO-Guard teachers sample 3 prompts an iteration, as multitask_rl does (one per task): that
# stage's sampler and update are then the teachers' programs, read from the session's compilation
# cache instead of compiled again (measured: the stage 20 → 7 s).
SHARED_PROGRAMS = ('--config.teachers.text.data.batch_size=3',
                   '--config.teachers.aesthetics.data.batch_size=3')


def _main(workdir, *overrides):
  return run_main('configs/opd.py:smoke', workdir, *SHARED_PROGRAMS, *overrides, timeout=900)


@pytest.mark.slow
def test_recipe_runs_end_to_end_then_caches_and_resumes(tmp_path):
  first = _main(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  for stage in ('pretrain', 'teacher_composition', 'teacher_text', 'teacher_aesthetics', 'opd',
                'multitask_rl', 'cascade_rl'):
    assert f'[{stage}] running' in first.stdout
    assert os.path.exists(tmp_path / stage / 'stage.json')
  rep = json.load(open(tmp_path / 'report.json'))
  assert set(rep['rows']) == {'base', 'teacher/composition', 'teacher/text',
                              'teacher/aesthetics', 'multitask_rl', 'cascade_rl', 'opd'}
  assert rep['tasks'] == list(TASKS)
  for row in rep['rows'].values():
    assert set(row['rewards']) == set(TASKS)
    assert np.isfinite(row['average']) and row['train_seconds'] > 0
  assert set(rep['normalisation']) >= set(TASKS)
  for name in ('reward_vs_wallclock.png', 'samples_composition.png', 'samples_text.png',
               'samples_aesthetics.png', 'report.md'):
    assert os.path.getsize(tmp_path / name) > 0
  assert [p['step'] for p in rep['curves']['opd']] == [0, 1, 2, 3]
  assert ('samples per prompt: composition 2, text 3, aesthetics 2'
          in (tmp_path / 'report.md').read_text())
  assert os.path.exists(tmp_path / 'opd' / 'metrics.jsonl')

  # A second run covers four promises (which stage a changed setting re-runs is checked on the
  # stage keys, test_stage_keys_follow_settings_and_dependencies). Unchanged settings: a stage
  # is cached. Stage records name their artifacts relative to the workdir: a copy runs on its
  # own files with the original gone. A missing or corrupt artifact re-runs its stage (here from
  # the stage's final checkpoint); the re-made teacher is the same, so its dependents' keys
  # stay. An OPD stage interrupted after its last checkpoint (no stage.json) resumes instead of
  # starting afresh.
  records = {s: json.load(open(tmp_path / s / 'stage.json')) for s in ('pretrain', 'opd')}
  assert all(not os.path.isabs(r['artifact']) for r in records.values())
  copy = tmp_path.parent / (tmp_path.name + '_copy')
  shutil.copytree(tmp_path, copy)
  shutil.rmtree(tmp_path)
  os.remove(copy / 'opd' / 'stage.json')
  shutil.rmtree(copy / 'teacher_text' / 'teacher')
  params = copy / 'teacher_composition' / 'teacher' / 'params'
  victim = max((p for p in params.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:-7])
  again = _main(copy, '--config.stages=pretrain,teachers,opd')
  assert again.returncode == 0, again.stderr[-3000:]
  for stage in ('teacher_text', 'teacher_composition'):
    assert f'[{stage}] its saved artifact is unusable' in again.stdout
    assert f'[{stage}] running' in again.stdout
  for stage in ('pretrain', 'teacher_aesthetics'):
    assert f'[{stage}] cached' in again.stdout
  assert '[opd] resumed from step 3' in again.stdout
  assert os.path.exists(copy / 'opd' / 'stage.json')
