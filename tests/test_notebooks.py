"""The notebooks (notebooks/*.ipynb): paired with their jupytext sources and run top to bottom.

Each notebook's reviewable source is notebooks/<name>.py (jupytext percent format); the .ipynb
committed next to it carries the same cells and no outputs. Every notebook executes in quick
mode (OPD_NOTEBOOK_QUICK=1) in a fresh kernel; its last cells assert what it claims. The
SD3.5-Medium notebook runs on tiny random models it writes (OPD_NOTEBOOK_TINY=1), and once
without any weights, where each cell that needs them must say it is skipped.
"""

import glob
import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
# Per-notebook time bound in quick mode (CI budget; measured 16-180 s on the 2-core VM).
TIMEOUT_S = 300
# Extra environment per notebook in CI.
ENV = {'sd35_medium.ipynb': {'OPD_NOTEBOOK_TINY': '1'}}
SD35_SETTINGS = ('OPD_SD35_MODEL', 'OPD_SD35_RELEASED', 'OPD_SD35_TEACHER_COMPOSITION',
                 'OPD_SD35_TEACHER_TEXT', 'OPD_SD35_TEACHER_AESTHETICS', 'OPD_SD35_PICKSCORE',
                 'OPD_SD35_CLIP', 'OPD_SD35_HPSV2')


def _execute(path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  return nb


def _cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_a_source():
  assert NOTEBOOKS
  sources = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.py')))
  assert [p[:-3] for p in sources] == [p[:-6] for p in NOTEBOOKS]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_matches_its_source_and_has_no_outputs(path):
  nb = nbformat.read(path, as_version=4)
  source = jupytext.read(path[:-6] + '.py')
  assert _cells(nb) == _cells(source), 'run: jupytext --sync ' + path
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, 'outputs are not committed'


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_quick_mode(path, monkeypatch, tmp_path):
  monkeypatch.setenv('OPD_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('OPD_NOTEBOOK_WORKDIR', str(tmp_path / 'workdir'))
  for name in SD35_SETTINGS:
    monkeypatch.delenv(name, raising=False)
  for name, value in ENV.get(os.path.basename(path), {}).items():
    monkeypatch.setenv(name, value)
  nb = _execute(path)
  figures = sum(1 for c in nb.cells if c.cell_type == 'code'
                for o in c.outputs if 'image/png' in o.get('data', {}))
  assert figures >= 1


@pytest.mark.slow
def test_sd35_notebook_without_weights_runs_and_says_what_it_skips(monkeypatch):
  for name in SD35_SETTINGS + ('OPD_NOTEBOOK_TINY',):
    monkeypatch.delenv(name, raising=False)
  nb = _execute(os.path.join(ROOT, 'notebooks', 'sd35_medium.ipynb'))
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs)
  for step in ('weights', 'prompt cache', 'OPD', 'samples', 'rewards', 'checks'):
    assert f"{step}: skipped — set MODEL, TEACHERS['composition']" in text, step
  assert 'checks passed' not in text


def _install_cell(name):
  source = jupytext.read(os.path.join(ROOT, 'notebooks', name + '.py'))
  return next(c.source for c in source.cells
              if c.cell_type == 'code' and 'REPO_URL' in c.source)


@pytest.mark.parametrize('name', ['quickstart', 'why_analytic_gradient', 'sd35_medium'])
def test_the_install_cell_clones_the_repository_when_opened_alone(name, tmp_path):
  """Opened outside a clone (Colab from GitHub), the install cell clones REPO_URL and works from
  the clone; without REPO_URL it stops with one line saying what to set."""
  import subprocess
  import sys
  if not os.path.exists(os.path.join(ROOT, '.git')):
    pytest.skip('this checkout is not a git repository, so it cannot be cloned')
  code = _install_cell(name) + '\nprint("ROOT", ROOT, os.getcwd())\n'
  env = dict(os.environ, OPD_REPO_URL='')
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip() == (
      "not inside a clone of opd_jax: set REPO_URL in this cell to the repository's git "
      'address, or open the notebook from a clone')
  env['OPD_REPO_URL'] = 'file://' + ROOT
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  clone = str(tmp_path / 'opd_jax_repo')
  assert f'ROOT {clone}' in proc.stdout
  assert os.path.exists(os.path.join(clone, 'requirements.txt'))
  assert os.path.exists(os.path.join(clone, 'notebooks', name + '.py'))
