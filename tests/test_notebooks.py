"""The notebooks (notebooks/*.ipynb): paired with their jupytext sources and run top to bottom.

Each notebook's reviewable source is notebooks/<name>.py (jupytext percent format); the .ipynb
committed next to it carries the same cells and no outputs. Every notebook executes in quick
mode (OPD_NOTEBOOK_QUICK=1) in a fresh kernel; its last cells assert what it claims.
"""

import glob
import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
# Per-notebook time bound in quick mode (CI budget; measured ~1 min on the 2-core VM).
TIMEOUT_S = 300


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
def test_notebook_runs_in_quick_mode(path, monkeypatch):
  monkeypatch.setenv('OPD_NOTEBOOK_QUICK', '1')
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  figures = sum(1 for c in nb.cells if c.cell_type == 'code'
                for o in c.outputs if 'image/png' in o.get('data', {}))
  assert figures >= 1
