"""`python -m opd_jax.tools.tiny_sd3`: a tiny random SD3.5 pipeline and PEFT teachers, offline."""

import json
import subprocess
import sys

from cli_testing import ROOT, child_env


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'opd_jax.tools.tiny_sd3', *args], cwd=ROOT,
                        env=child_env(), capture_output=True, text=True, timeout=300)


def test_writes_a_pipeline_and_teachers_the_loaders_read(tmp_path):
  from opd_jax.models.loading.pretrained import mmdit_config
  from opd_jax.models.peft_io import read_peft_adapter
  proc = _run(f'--out_dir={tmp_path / "tiny"}', '--tasks=text,aesthetics')
  assert proc.returncode == 0, proc.stderr[-2000:]
  base = tmp_path / 'tiny' / 'sd35'
  assert json.loads((base / 'model_index.json').read_text())['_class_name'] == (
      'StableDiffusion3Pipeline')
  config = mmdit_config(base)
  assert config.dual_attention_layers == (0,) and config.qk_norm == 'rms_norm'
  assert sorted(p.name for p in (tmp_path / 'tiny').iterdir()) == [
      'sd35', 'teacher_aesthetics', 'teacher_text']
  adapter = read_peft_adapter(str(tmp_path / 'tiny' / 'teacher_text'))
  assert adapter.a and set(adapter.a) == set(adapter.b)
  assert {a.shape[0] for a in adapter.a.values()} == {4}
  assert set(adapter.scale.values()) == {2.0}            # alpha 8 / rank 4
  assert min(float(abs(b).max()) for b in adapter.b.values()) > 0   # moves the base


def test_user_errors_are_one_line(tmp_path):
  proc = _run()
  assert proc.returncode == 1 and proc.stderr.strip() == (
      'error: --out_dir: missing (the folder to create)')
  proc = _run(f'--out_dir={tmp_path}')
  assert proc.returncode == 1 and proc.stderr.strip() == (
      f'error: --out_dir: {tmp_path} already exists')
  proc = _run(f'--out_dir={tmp_path / "x"}', '--tasks=text,text')
  assert proc.returncode == 1 and 'error: --tasks: distinct task names' in proc.stderr
