"""Every user error of the command-line tools ends with one `error:` line and a non-zero exit.

Issue #13: a bad config value, an unknown field, a config file that does not load, a missing,
corrupt or mismatched file, a bad prompt file, a mesh that does not fit the devices, a workdir
that cannot be used, a run that diverges to NaN (in tests/test_loop.py) — in `python -m opd_jax.main`, `opd_jax.sample`
and `opd_jax.tools.encode_prompts` — must end with ONE stderr line that starts with `error:` and
names the field, file or path to fix, a non-zero exit status, and no traceback (tracebacks are
for bugs; `--traceback` shows them).

Each case is a process of its own running the command line as `python -m` does, on inputs
written to its own directory: a child forked from a server that imported jax, flax and the other
libraries once (`cli_testing.ForkServer`; the command's own module is run afresh as __main__ in
the child), so a case costs its own work rather than an interpreter start and a jax import.
`test_a_fresh_interpreter_prints_the_same_line` checks one case against a real `python -m`
subprocess. The cases fail before any compile wherever the error allows (validation, file
checks); the selected cases run two at a time in a module-scoped fixture and each case is still
reported on its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import queue
import shutil
import subprocess
import sys
import threading
from typing import Callable

import numpy as np
import pytest

from cli_testing import ROOT, ForkServer, child_env, main_command

SMOKE = 'configs/mini/opd.py:standin,smoke'    # random base/teachers/prompts: no files needed
# The cheapest OPD round to compile: a 2-step rollout with one trained step.
CHEAP_ROUND = ('--config.rollout.num_steps=2', '--config.objective.timestep_fraction=0.5')
MINI = 'configs/mini/opd.py:smoke'             # a mini-world base and artifact teachers
SD3 = 'configs/opd_sd35m.py'                   # a diffusers base and PEFT teachers
TIMEOUT = 300


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input.

  Attributes:
    tool: 'main' (opd_jax.main), 'sample' (opd_jax.sample), 'encode'
      (opd_jax.tools.encode_prompts) or 'evaluate' (opd_jax.evaluate).
    args: command-line arguments; '{d}' stands for the case's own directory.
    names: what the error line must contain (the field, file or path), '{d}' likewise.
    config: main only: the --config value (None: no --config flag).
    workdir: main only: the --workdir value.
    setup: writes the case's inputs into its directory before the command runs.
    devices: forced host devices of the child process.
    env: extra environment variables of the child process.
    compiles: the case runs a training step (tens of seconds): started first, so that it
      overlaps the quick cases.
  """
  tool: str
  args: tuple[str, ...]
  names: str
  config: str | None = SMOKE
  workdir: str = '{d}/work'
  setup: Callable[[pathlib.Path], None] | None = None
  devices: int = 1
  env: dict = dataclasses.field(default_factory=dict)
  compiles: bool = False


def main_case(args, names, config=SMOKE, **kw) -> Case:
  return Case('main', tuple(args), names, config=config, **kw)


def sample_case(args, names, **kw) -> Case:
  return Case('sample', tuple(args), names, config=None, **kw)


def encode_case(args, names, **kw) -> Case:
  return Case('encode', tuple(args), names, config=None, **kw)


def evaluate_case(args, names, **kw) -> Case:
  return Case('evaluate', ('--config=configs/eval_sd35m.py',) + tuple(args), names, config=None,
              **kw)


# --- inputs -------------------------------------------------------------------------------------
_LOCK = threading.Lock()


def _tiny_base() -> str:
  """The tiny mini-world base artifact (built once per process; cases run in threads)."""
  with _LOCK:
    from mini_testing import tiny_base_dir
    return tiny_base_dir()


def _write(path: pathlib.Path, text: str = '') -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def _json(path: pathlib.Path, obj) -> pathlib.Path:
  return _write(path, json.dumps(obj))


def _config_file(body: str) -> Callable[[pathlib.Path], None]:
  return lambda d: _write(d / 'config.py', body)


def _copy_base(d: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(_tiny_base(), d / 'base'))


def _corrupt_base(d: pathlib.Path) -> None:
  """A copy of a saved base with one parameter file cut in half (its manifest no longer fits)."""
  base = _copy_base(d)
  files = sorted((p for p in (base / 'params').rglob('*') if p.is_file()),
                 key=lambda p: p.stat().st_size)
  data = files[-1].read_bytes()
  files[-1].write_bytes(data[:len(data) // 2])


def _teacher_of(task: str) -> Callable[[pathlib.Path], None]:
  """A valid base, and a teacher artifact in the smoke layout that was trained on `task`."""
  def setup(d):
    from opd_jax.mini_world import artifacts
    _copy_base(d)
    with _LOCK:   # Orbax saves from several threads at once gain nothing
      artifacts.save_adapter(str(d / 'teacher'), {'lora_b': np.zeros((2, 2), np.float32)},
                             {'lora_rank': 8, 'lora_alpha': 16.0, 'cfg_scale': 1.0,
                              'tasks': [task], 'stage': 'test'})
  return setup


# A tiny SD3 transformer / VAE / scheduler, as diffusers writes their config.json files.
SD3_TRANSFORMER = dict(sample_size=8, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                       attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                       joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=8)
SD3_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[4, 4], latent_channels=16,
               down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
               norm_num_groups=1, layers_per_block=1, sample_size=8, scaling_factor=1.5,
               shift_factor=0.1)


def _sd3_configs(d: pathlib.Path) -> pathlib.Path:
  """A pipeline folder with the config files only (enough for checks made before weights)."""
  model = d / 'sd3'
  _json(model / 'transformer' / 'config.json', SD3_TRANSFORMER)
  _json(model / 'vae' / 'config.json', SD3_VAE)
  _json(model / 'scheduler' / 'scheduler_config.json', {'shift': 3.0})
  return model


def _sd3_pipeline(d: pathlib.Path) -> pathlib.Path:
  """A pipeline folder whose transformer has (zero) weights of the right keys and shapes."""
  from flax import nnx
  from safetensors.numpy import save_file
  from opd_jax.models.loading import name_map
  from opd_jax.models.loading.pretrained import abstract_mmdit
  from opd_jax.models.mmdit import MMDiT, MMDiTConfig
  model = _sd3_configs(d)
  abstract = abstract_mmdit(MMDiTConfig.from_dict(SD3_TRANSFORMER))
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract)):
    key = name_map.torch_key(path, MMDiT.TORCH_KEY_RENAMES)
    tensors[key] = np.zeros(name_map.torch_shape(path, variable.get_value().shape), np.float32)
  save_file(tensors, str(model / 'transformer' / 'diffusion_pytorch_model.safetensors'))
  return model


def _broken_peft_teacher(d: pathlib.Path) -> None:
  _sd3_pipeline(d)
  _write(d / 'teacher' / 'adapter_config.json', '{"r": 4, "lora_alpha": ')
  _write(d / 'teacher' / 'adapter_model.safetensors', 'not read: the config fails first')


def _embeddings(d: pathlib.Path, n: int = 2, negative: bool = True, drop: tuple = ()) -> None:
  """emb.npz as opd_jax.sample reads it (L = 4 tokens of width 32, pooled width 16), without
  the arrays named in `drop`."""
  arrays = {'prompt_embeds': np.zeros((n, 4, 32), np.float32),
            'pooled_prompt_embeds': np.zeros((n, 16), np.float32)}
  if negative:
    arrays.update(negative_prompt_embeds=np.zeros((4, 32), np.float32),
                  negative_pooled_prompt_embeds=np.zeros((16,), np.float32))
  d.mkdir(parents=True, exist_ok=True)
  np.savez(d / 'emb.npz', **{k: v for k, v in arrays.items() if k not in drop})


def _sample_inputs(negative: bool = True, model: bool = True):
  def setup(d):
    _embeddings(d, negative=negative)
    if model:
      _sd3_configs(d)
  return setup


def _broken_adapter(d: pathlib.Path) -> None:
  _sample_inputs()(d)
  _write(d / 'adapter' / 'adapter_config.json', '{"r": 4,')
  _write(d / 'adapter' / 'adapter_model.safetensors', 'not read: the config fails first')


def _cache_of_ocr(d: pathlib.Path) -> None:
  """A prompt cache (metadata.json only) that holds the task 'ocr'."""
  _sample_inputs()(d)
  _json(d / 'cache' / 'metadata.json', {'tasks': {'ocr': {'splits': {'train': {'count': 1}}}}})


def _prompt_files(d: pathlib.Path) -> None:
  _write(d / 'ok.txt', 'a cat\na dog\n')
  _write(d / 'empty.txt', '\n\n')
  _write(d / 'bad.jsonl', '{"prompt": "a cat"}\n{"tag": "no prompt"}\n')
  _write(d / 'prompts.csv', 'a cat\n')
  (d / 'model').mkdir()
  (d / 'exists').mkdir()


def _resume_setup(d: pathlib.Path) -> None:
  """A finished one-step smoke run in d/work (resuming it under another seed must stop)."""
  command = main_command(SMOKE, d / 'work', '--config.train.num_steps=1', *CHEAP_ROUND)
  first = subprocess.run(command, cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                         timeout=TIMEOUT)
  assert first.returncode == 0, first.stderr[-2000:]


SAMPLE = ('--model_dir={d}/sd3', '--embeddings={d}/emb.npz', '--out_dir={d}/out', '--cfg=1',
          '--resolution=8')
ENCODE = ('--model_dir={d}/model', '--out_dir={d}/cache')
EVALUATE = ('--config.model_dir={d}/sd3', '--config.benchmarks.ocr.prompts={d}/ocr.txt',
            '--config.benchmarks.ocr.embeddings={d}/emb.npz', '--config.out_dir={d}/out')


def _eval_inputs(d: pathlib.Path) -> None:
  _sample_inputs()(d)
  _write(d / 'ocr.txt', 'a sign that says "open"\nanother sign "shut"')
  _write(d / 'bad.txt', 'a sign without a quoted text')


# --- the cases ----------------------------------------------------------------------------------
CASES = [
    # opd_jax.main: config values and the config file
    pytest.param(main_case(['--config.rollout.kernel=bad'], 'config.rollout.kernel'),
                 id='main-bad-enum'),
    pytest.param(main_case(['--config.rollout.cfg_scale=-1'], 'config.rollout.cfg_scale'),
                 id='main-negative-cfg'),
    pytest.param(main_case(['--config.teachers.tasks.text.cfg_scale=0.5'],
                           'config.teachers.tasks.text.cfg_scale'), id='main-teacher-cfg'),
    pytest.param(main_case(['--config.lora.rank=0'], 'config.lora.rank'), id='main-lora-rank'),
    pytest.param(main_case(['--config.optimizer.lr=0'], 'config.optimizer.lr'),
                 id='main-zero-lr'),
    pytest.param(main_case(['--config.rollout.foo=1'], 'rollout.foo'), id='main-unknown-field'),
    pytest.param(main_case(['--config.seed=abc'], 'config.seed'), id='main-wrong-type'),
    pytest.param(main_case([], '{d}/nope.py', config='{d}/nope.py'), id='main-missing-config'),
    pytest.param(main_case([], 'config.py', config='{d}/config.py',
                           setup=_config_file('raise RuntimeError("boom")\n')),
                 id='main-config-raises'),
    pytest.param(main_case([], 'config.py', config='{d}/config.py', setup=_config_file('x = 1\n')),
                 id='main-config-without-get-config'),
    pytest.param(main_case([], "unknown variant(s) ['nope']", config='configs/mini/opd.py:nope'),
                 id='main-unknown-variant'),
    pytest.param(main_case([], 'config.trainer', config='{d}/config.py', setup=_config_file(
        'import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict('
        '{"seed": 0})\n')), id='main-no-trainer'),
    pytest.param(main_case([], '--config', config=None), id='main-no-config-flag'),
    # devices, mesh and batch
    pytest.param(main_case(['--config.mesh.shape.data=3'], 'config.mesh.shape'),
                 id='main-mesh-too-big'),
    pytest.param(main_case(['--config.mesh.shape.data=0'], 'config.mesh.shape.data'),
                 id='main-mesh-zero'),
    pytest.param(main_case(['--config.data.batch_size=3', '--config.data.batch_size_per_device=0'],
                           'config.data.batch_size', devices=2),
                 id='main-batch-does-not-split'),
    pytest.param(main_case(['--config.data.batch_size=4'], 'config.data.batch_size'),
                 id='main-both-batch-sizes'),
    pytest.param(main_case(['--config.train.num_microbatches=2'], 'config.train.num_microbatches'),
                 id='main-microbatches'),
    # the round is compiled before the first step; one that needs more than a device has stops
    pytest.param(main_case(['--config.train.memory_limit_gib=0.0001', *CHEAP_ROUND],
                           'config.train.memory_limit_gib: the compiled OPD round needs', compiles=True),
                 id='main-round-exceeds-memory'),
    pytest.param(main_case(['--config.train.fused_vjp=True',
                            '--config.objective.name=ppo_sampled_logratio',
                            '--config.rollout.kernel=flow_grpo', '--config.rollout.noise_level=0.7'],
                           'config.train.fused_vjp'), id='main-fused-needs-analytic'),
    # the distributed start-up reads JAX_* variables
    pytest.param(main_case(['--distributed'], 'JAX_NUM_PROCESSES',
                           env={'JAX_NUM_PROCESSES': 'two'}), id='main-bad-num-processes'),
    pytest.param(main_case(['--distributed'], 'coordinator_address'),
                 id='main-distributed-without-coordinator'),
    # base, teachers and prompts
    pytest.param(main_case([], 'config.base.path', config=MINI), id='main-no-base-path'),
    pytest.param(main_case(['--config.base.path={d}/nope'], '{d}/nope', config=MINI),
                 id='main-missing-base'),
    pytest.param(main_case(['--config.base.path={d}/file'], '{d}/file', config=MINI,
                           setup=lambda d: _write(d / 'file', 'x')), id='main-base-is-file'),
    pytest.param(main_case(['--config.base.path={d}'], 'manifest.json', config=MINI),
                 id='main-base-not-artifact'),
    pytest.param(main_case(['--config.base.path={d}/base'], '{d}/base', config=MINI,
                           setup=_corrupt_base), id='main-corrupt-base'),
    pytest.param(main_case(['--config.base.path={d}/base'],
                           'config.teachers.tasks.composition.path', config=MINI,
                           setup=_copy_base), id='main-no-teacher-path'),
    pytest.param(main_case(['--config.base.path={d}/base'] +
                           [f'--config.teachers.tasks.{t}.path={{d}}/teacher'
                            for t in ('composition', 'text', 'aesthetics')],
                           'config.teachers.tasks.composition.path', config=MINI,
                           setup=_teacher_of('text')), id='main-teacher-of-other-task'),
    pytest.param(main_case(['--config.base.path={d}/base', '--config.teachers.source=random',
                            '--config.data.dataset_config=nope'], 'dataset_config', config=MINI,
                           setup=_copy_base), id='main-unknown-dataset-config'),
    pytest.param(main_case(['--config.data.data_dir={d}/file'], '{d}/file',
                           config='configs/mini/pretrain.py:smoke',
                           setup=lambda d: _write(d / 'file', 'x')), id='main-data-dir-is-file'),
    pytest.param(main_case(['--config.base.path={d}/nope'], '{d}/nope', config=SD3),
                 id='main-sd3-missing-base'),
    pytest.param(main_case(['--config.base.path={d}'], 'config.json', config=SD3),
                 id='main-sd3-base-without-config-json'),
    pytest.param(main_case(['--config.base.path={d}/sd3', '--config.teachers.source=peft'] +
                           [f'--config.teachers.tasks.{t}.path={{d}}/teacher'
                            for t in ('composition', 'text', 'aesthetics')],
                           'adapter_config.json', config=SD3, setup=_broken_peft_teacher),
                 id='main-peft-broken-adapter-config'),
    pytest.param(main_case(['--config.base.path={d}/sd3', '--config.teachers.source=random',
                            '--config.data.embeddings_dir={d}/nope'], 'config.data.embeddings_dir',
                           config=SD3, setup=_sd3_pipeline), id='main-missing-embeddings-dir'),
    pytest.param(main_case(['--config.base.path={d}/sd3', '--config.teachers.source=random',
                            '--config.data.embeddings_dir={d}/sd3'], 'metadata.json',
                           config=SD3, setup=_sd3_pipeline), id='main-embeddings-dir-not-cache'),
    # the workdir and resuming
    pytest.param(main_case([], '{d}/file', workdir='{d}/file',
                           setup=lambda d: _write(d / 'file', 'x')), id='main-workdir-is-file'),
    pytest.param(main_case(['--config.seed=1', *CHEAP_ROUND], 'config.seed', setup=_resume_setup,
                           compiles=True), id='main-resume-changed-seed'),
    # other trainers
    pytest.param(main_case(['--config.stages=foo'], 'config.stages', config='configs/opd.py'),
                 id='main-recipe-unknown-stage'),
    pytest.param(main_case([], 'config.base.path', config='configs/mini/grpo.py:text,smoke'),
                 id='main-rl-without-base'),
    pytest.param(main_case(["--config.data.tasks=('nope',)"], 'config.data.tasks',
                           config='configs/mini/grpo.py:text,smoke'), id='main-rl-bad-task'),
    pytest.param(main_case(['--config.rollout.sde_steps=99'], 'config.rollout.sde_steps',
                           config='configs/mini/nft.py:text,smoke'), id='main-nft-sde-steps'),
    pytest.param(main_case(['--config.nft.weighting=x0'], 'config.nft.weighting',
                           config='configs/mini/nft.py:text,smoke'), id='main-nft-weighting'),
    pytest.param(main_case(['--config.grpo.guard_bias=global'], 'config.grpo.guard_bias',
                           config='configs/mini/grpo_guard.py:text,smoke'),
                 id='main-grpo-guard-bias'),
    pytest.param(main_case(['--config.pretrain.prompt_dropout=1'], 'config.pretrain.prompt_dropout',
                           config='configs/mini/pretrain.py:smoke'), id='main-pretrain-dropout'),
    # a run that diverges to NaN: tests/test_loop.py (also checks that nothing is saved)

    # opd_jax.sample
    pytest.param(sample_case(('--model_dir={d}/nope',) + SAMPLE[1:], '{d}/nope',
                             setup=_sample_inputs(model=False)), id='sample-missing-model-dir'),
    pytest.param(sample_case(('--model_dir={d}',) + SAMPLE[1:], 'config.json',
                             setup=_sample_inputs(model=False)),
                 id='sample-model-dir-without-transformer'),
    pytest.param(sample_case(SAMPLE, '{d}/emb.npz', setup=lambda d: _sd3_configs(d)),
                 id='sample-missing-embeddings'),
    pytest.param(sample_case(SAMPLE, 'pooled_prompt_embeds', setup=lambda d: (
        _sd3_configs(d), _embeddings(d, drop=('pooled_prompt_embeds',)))), id='sample-npz-lacks-key'),
    pytest.param(sample_case(SAMPLE, '{d}/emb.npz', setup=lambda d: (
        _sd3_configs(d), _write(d / 'emb.npz', 'not a zip'))), id='sample-npz-corrupt'),
    pytest.param(sample_case(SAMPLE, 'joint_attention_dim', setup=lambda d: (
        _sd3_configs(d), _json(d / 'sd3' / 'transformer' / 'config.json',
                               dict(SD3_TRANSFORMER, joint_attention_dim=64)),
        _embeddings(d))), id='sample-embeddings-width-mismatch'),
    pytest.param(sample_case(SAMPLE + ('--cfg=4.5',), 'negative_prompt_embeds',
                             setup=_sample_inputs(negative=False)),
                 id='sample-cfg-without-negative'),
    pytest.param(sample_case(SAMPLE + ('--resolution=13',), '--resolution',
                             setup=_sample_inputs()), id='sample-resolution-not-multiple'),
    pytest.param(sample_case(SAMPLE + ('--resolution=64',), 'pos_embed_max_size',
                             setup=_sample_inputs()), id='sample-resolution-too-large'),
    pytest.param(sample_case(SAMPLE + ('--resolution=0',), '--resolution',
                             setup=_sample_inputs()), id='sample-resolution-zero'),
    pytest.param(sample_case(SAMPLE + ('--steps=0',), '--steps', setup=_sample_inputs()),
                 id='sample-zero-steps'),
    pytest.param(sample_case(SAMPLE + ('--adapter={d}/nope',), '{d}/nope',
                             setup=_sample_inputs()), id='sample-missing-adapter'),
    pytest.param(sample_case(SAMPLE + ('--embeddings={d}/sd3',), '--task',
                             setup=_sample_inputs()), id='sample-cache-without-task'),
    pytest.param(sample_case(SAMPLE + ('--adapter={d}/adapter',), 'adapter_config.json',
                             setup=_broken_adapter), id='sample-adapter-broken-config'),
    pytest.param(sample_case(SAMPLE + ('--embeddings={d}/cache', '--task=nope'), "'nope'",
                             setup=_cache_of_ocr), id='sample-cache-unknown-task'),
    pytest.param(sample_case(SAMPLE + ('--out_dir={d}/emb.npz',), '{d}/emb.npz',
                             setup=_sample_inputs()), id='sample-out-dir-is-file'),
    pytest.param(sample_case(SAMPLE[1:], '--model_dir', setup=_sample_inputs()),
                 id='sample-model-dir-flag-missing'),

    # opd_jax.tools.encode_prompts
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/nope.txt',), '{d}/nope.txt',
                             setup=_prompt_files), id='encode-missing-prompt-file'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/empty.txt',), '{d}/empty.txt',
                             setup=_prompt_files), id='encode-empty-prompt-file'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/bad.jsonl',), '{d}/bad.jsonl:2',
                             setup=_prompt_files), id='encode-jsonl-without-prompt'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/prompts.csv',), '{d}/prompts.csv',
                             setup=_prompt_files), id='encode-unknown-extension'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr',), '--prompts', setup=_prompt_files),
                 id='encode-malformed-spec'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/ok.txt,ocr:train={d}/ok.txt',),
                             '--prompts', setup=_prompt_files), id='encode-task-twice'),
    pytest.param(encode_case(('--model_dir={d}/nope', '--out_dir={d}/cache',
                              '--prompts=ocr={d}/ok.txt'), '{d}/nope', setup=_prompt_files),
                 id='encode-missing-model-dir'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/ok.txt',), '{d}/model',
                             setup=_prompt_files), id='encode-model-dir-not-sd3'),
    pytest.param(encode_case(('--model_dir={d}/model', '--out_dir={d}/exists',
                              '--prompts=ocr={d}/ok.txt'), '{d}/exists', setup=_prompt_files),
                 id='encode-out-dir-exists'),
    pytest.param(encode_case(ENCODE + ('--prompts=ocr={d}/ok.txt', '--batch_size=0'),
                             '--batch_size', setup=_prompt_files), id='encode-zero-batch'),
    pytest.param(encode_case(ENCODE, '--prompts', setup=_prompt_files),
                 id='encode-prompts-flag-missing'),

    # opd_jax.evaluate
    pytest.param(evaluate_case([], 'config.model_dir'), id='evaluate-no-model-dir'),
    pytest.param(evaluate_case(EVALUATE + ('--config.benchmarks.ocr.prompts={d}/bad.txt',),
                               '{d}/bad.txt:1', setup=_eval_inputs),
                 id='evaluate-ocr-prompt-without-quotes'),
    pytest.param(evaluate_case(EVALUATE + ('--config.sampling.steps=0',), 'config.sampling.steps',
                               setup=_eval_inputs), id='evaluate-zero-steps'),
    pytest.param(evaluate_case(('--config.nope=1',), '--config.nope'), id='evaluate-unknown-field'),
]


def _command(case: Case, d: pathlib.Path) -> list[str]:
  fill = lambda s: s.replace('{d}', str(d))
  args = [fill(a) for a in case.args]
  if case.tool == 'main':
    command = main_command(fill(case.config or ''), fill(case.workdir), *args)
    # main_command always passes --config; the case without one drops it.
    return command if case.config else [a for a in command if a != '--config=']
  module = {'sample': 'opd_jax.sample', 'encode': 'opd_jax.tools.encode_prompts',
            'evaluate': 'opd_jax.evaluate'}[case.tool]
  return [sys.executable, '-m', module, *args]


def _run(case: Case, d: pathlib.Path, servers: queue.Queue) -> subprocess.CompletedProcess:
  d.mkdir(parents=True)
  if case.setup is not None:
    case.setup(d)
  command = _command(case, d)
  assert command[1] == '-m', command
  server = servers.get()
  try:
    return server.run(command[2], command[3:], dict(child_env(case.devices), **case.env), d,
                      timeout=TIMEOUT)
  finally:
    servers.put(server)


def _case_id(item) -> str | None:
  callspec = getattr(item, 'callspec', None)
  return callspec.id if callspec is not None and 'case' in callspec.params else None


@pytest.fixture(scope='module')
def results(request, tmp_path_factory):
  """case id → (its directory, future of its CompletedProcess), for the selected cases."""
  params = {p.id: p.values[0] for p in CASES}
  selected = {_case_id(item) for item in request.session.items
              if item.module is sys.modules[__name__]} & set(params) | {'main-bad-enum'}
  root = tmp_path_factory.mktemp('cli_errors')
  servers = queue.Queue()
  for _ in range(2):
    servers.put(ForkServer(child_env(1)))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  order = sorted(sorted(selected), key=lambda i: not params[i].compiles)   # slow ones first
  out = {i: (root / i, pool.submit(_run, params[i], root / i, servers)) for i in order}
  yield out
  pool.shutdown(wait=True, cancel_futures=True)
  while not servers.empty():
    servers.get().close()


@pytest.mark.parametrize('case', CASES)
def test_user_error_is_one_line(case, results, request):
  d, future = results[_case_id(request.node)]
  result = future.result()
  lines = result.stderr.rstrip('\n').splitlines() or ['']
  where = f'exit {result.returncode}; stderr tail:\n{result.stderr[-3000:]}'
  assert result.returncode != 0, where
  assert not any('Traceback' in line for line in lines), where
  assert lines[-1].startswith('error:'), where
  assert case.names.replace('{d}', str(d)) in lines[-1], where


def test_a_fresh_interpreter_prints_the_same_line(results, tmp_path):
  """The fork server's children behave as a fresh `python -m` process does (one case)."""
  case = next(p.values[0] for p in CASES if p.id == 'main-bad-enum')
  d = tmp_path / 'fresh'
  d.mkdir()
  fresh = subprocess.run(_command(case, d), cwd=ROOT, env=child_env(case.devices),
                         capture_output=True, text=True, timeout=TIMEOUT)
  _, future = results['main-bad-enum']
  forked = future.result()
  assert (fresh.returncode, fresh.stderr.splitlines()[-1:]) == (
      forked.returncode, forked.stderr.splitlines()[-1:])
