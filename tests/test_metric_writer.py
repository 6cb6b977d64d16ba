"""metrics.jsonl and TensorBoard events from `opd_jax.train.metric_writer`, and a start-up that
does not pay for importing torch (tensorboardX would import it, seconds per run)."""

import os
import subprocess
import sys
import textwrap

from cli_testing import ROOT

SCRIPT = textwrap.dedent('''
    import sys
    from opd_jax.train.metric_writer import MetricWriter, read_metrics
    writer = MetricWriter(sys.argv[1], enabled=True)
    writer.write(1, {'loss': 0.5})
    writer.write(2, {'loss': 0.25})
    writer.close()
    assert 'torch' not in sys.modules, 'the metric writer imported torch'
    assert [r['loss'] for r in read_metrics(sys.argv[1])] == [0.5, 0.25]
    import torch                     # still importable afterwards
    print(torch.tensor([1.0]).sum().item())
''')


def test_writes_both_sinks_without_importing_torch(tmp_path):
  done = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == '1.0'
  events = os.listdir(tmp_path / 'tensorboard')
  assert events and all(os.path.getsize(tmp_path / 'tensorboard' / e) > 0 for e in events)


def test_a_resumed_writer_drops_the_rows_after_its_start(tmp_path):
  from opd_jax.train.metric_writer import MetricWriter, read_metrics
  writer = MetricWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3):
    writer.write(step, {'loss': float(step)})
  writer.close()
  writer = MetricWriter(str(tmp_path), start_step=2, enabled=True)
  writer.write(3, {'loss': 30.0})
  writer.close()
  assert [(r['step'], r['loss']) for r in read_metrics(str(tmp_path))] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]
