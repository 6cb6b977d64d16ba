r"""Table 1 evaluation: sample every model on every benchmark, score, write eval.json / eval.md.

    python -m opd_jax.evaluate --config=configs/eval_sd35m.py \
        --config.model_dir=/models/sd3.5-medium --config.models.student=runs/opd/student_peft ...

Protocol (spec §4; `configs/eval_sd35m.py` holds the fields): each model is the pipeline's
transformer plus an optional LoRA (a PEFT folder such as a run's `student_peft`, or a diffusers
LoRA file), sampled with the Euler ODE (40 steps, 512 px) at its CFG; image i of a benchmark is
drawn from key fold_in(seed, i) — the same image whatever the batch size, device count or
resumption. Sampling is data-parallel over the mesh's batch axes (weights replicated, the batch
split). Then each benchmark's scorer (`eval.benchmarks`) scores every image once, and
`eval.table1` writes a Table 1 row per model.

Layout of `out_dir`: `<model>/<benchmark>/` per cell (`eval.store`: settings.json, images/,
scores.jsonl), `grids/<model>_<benchmark>.png`, `eval.json`, `eval.md`. A killed evaluation
continues where it stopped: finished images are not sampled again, scored images are not scored
again; a cell started under other settings is refused.

Bad input — a config value, a missing model folder, adapter, prompt file or embedding cache, an
embedding cache that does not hold the prompt file's prompts, a detector that does not answer —
ends with one `error: …` line naming the field or path and exit status 1 (2 for a bad flag). Every
check that needs no weights runs before any weight is read.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Callable, Mapping

import numpy as np

from opd_jax.errors import ConfigError, InputError
from opd_jax.eval import benchmarks as bm
from opd_jax.eval import table1
from opd_jax.eval.store import CellStore
from opd_jax.train import config_check as cc

DTYPES = ('float32', 'bfloat16')
_NAME = re.compile(r'^[A-Za-z0-9_.-]+$')


def validate(c) -> dict[str, bm.Benchmark]:
  """Checks every field and file that needs no weights; returns the benchmarks to run."""
  cc.check(bool(c.model_dir) and os.path.isdir(c.model_dir), 'model_dir',
           f'{c.model_dir!r} is not a folder (a diffusers SD3/SD3.5 pipeline)')
  cc.check(len(c.models) > 0, 'models', 'name at least one model (name: adapter path)')
  for name, adapter in c.models.items():
    cc.check(bool(_NAME.match(name)), f'models.{name}', 'model names are letters, '
             'digits, "_", "-", "."')
    if adapter and not os.path.exists(adapter):
      raise InputError(f'config.models.{name}: {adapter} not found (a PEFT folder or a '
                       'diffusers LoRA file)')
  for name in c.model_cfg:
    cc.check(name in c.models, f'model_cfg.{name}', 'not a model of config.models')
  cc.positive(c.cfg, 'cfg')
  s = c.sampling
  cc.integer(s.steps, 'sampling.steps', 1)
  cc.integer(s.resolution, 'sampling.resolution', 8)
  cc.integer(s.batch_size, 'sampling.batch_size', 1)
  cc.non_negative(s.shift, 'sampling.shift')
  cc.choice(s.dtype, 'sampling.dtype', DTYPES)
  cc.integer(c.grid_images, 'grid_images', 0)
  cc.integer(c.rewards.batch_size, 'rewards.batch_size', 1)
  benches = {}
  for name, b in c.benchmarks.items():
    field = f'config.benchmarks.{name}'
    cc.choice(name, 'benchmarks', bm.NAMES)
    if not b.prompts:
      continue
    cc.integer(b.limit, f'benchmarks.{name}.limit', 0)
    if not b.embeddings or not os.path.exists(b.embeddings):
      raise InputError(f'{field}.embeddings: {b.embeddings!r} not found (an encode_prompts '
                       f'cache made from {b.prompts}, or an .npz)')
    try:
      benches[name] = bm.read_benchmark(name, b.prompts, b.limit)
    except InputError as e:
      raise InputError(f'{field}.prompts: {e}') from None
  cc.check(bool(benches), 'benchmarks', 'no benchmark has a prompts file')
  return benches


def _cell_settings(c, model: str, bench: str) -> dict:
  return {'model_dir': os.path.abspath(c.model_dir), 'adapter': c.models[model] and
          os.path.abspath(c.models[model]), 'cfg': float(c.model_cfg.get(model, c.cfg)),
          'steps': c.sampling.steps, 'resolution': c.sampling.resolution,
          'shift': c.sampling.shift, 'seed': c.sampling.seed, 'dtype': c.sampling.dtype,
          'prompts': os.path.abspath(c.benchmarks[bench].prompts),
          'limit': c.benchmarks[bench].limit}


class Embeddings:
  """A benchmark's prompt embeddings, read batch by batch (a GenEval cache is ~7 GB in float32)."""

  def __init__(self, path: str, task: str, split: str, field: str):
    self.field = field
    self.path = path
    if os.path.isdir(path):
      from opd_jax.data import prompt_embeddings as pe
      try:
        self._source = pe.load_prompt_embeddings(path, task, split)
        neg = pe.load_negative(path)
      except InputError as e:
        raise InputError(f'{field}: {e}') from None
      self.negative = {'context': neg['prompt_embeds'][None],
                       'pooled': neg['pooled_prompt_embeds'][None]}
      self._decode = pe.decode_text
      self.size = len(self._source)
    else:
      from opd_jax.sample import load_embeddings
      try:
        cond, negative, prompts = load_embeddings(path)
      except InputError as e:
        raise InputError(f'{field}: {e}') from None
      self._arrays, self.negative, self._prompts = cond, negative, prompts
      self._source = None
      self.size = cond['context'].shape[0]

  def get(self, indices, prompts) -> dict[str, np.ndarray]:
    """Embeddings of `indices`, checked to be those of `prompts` (the prompt file's lines)."""
    if self._source is not None:
      items = [self._source[int(i)] for i in indices]
      stored = [self._decode(it['prompt']) for it in items]
      cond = {'context': np.stack([it['prompt_embeds'] for it in items]).astype(np.float32),
              'pooled': np.stack([it['pooled_prompt_embeds'] for it in items]).astype(np.float32)}
    else:
      idx = np.asarray(indices)
      cond = {k: v[idx] for k, v in self._arrays.items()}
      stored = None if self._prompts is None else [self._prompts[int(i)] for i in idx]
    if stored is not None:
      for i, want, got in zip(indices, prompts, stored):
        if want != got:
          raise InputError(f'{self.field}: {self.path} entry {i} holds {got!r}, but line '
                           f'{i + 1} of the prompt file is {want!r}: encode the same file')
    return cond


def _sharded_sampler(c, model_name: str, mesh):
  """(sample(cond, uncond, keys) → uint8 images, VAE decode included), weights replicated."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P
  from opd_jax.models.loading.pretrained import load_vae, scheduler_shift
  from opd_jax.sample import decode_latents, latent_size, load_transformer, make_sampler
  from opd_jax.sampling.schedule import flow_match_sigmas
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[c.sampling.dtype]
  replicated = NamedSharding(mesh, P())
  try:
    transformer = load_transformer(c.model_dir, c.models[model_name] or None, dtype=dtype)
    vae = load_vae(c.model_dir)
    shift = c.sampling.shift or scheduler_shift(c.model_dir)
  except InputError as e:
    raise InputError(f'config.models.{model_name}: {e}') from None
  for module in (transformer, vae):
    nnx.update(module, jax.device_put(nnx.state(module), replicated))
  vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
  size = latent_size(c.sampling.resolution, transformer.config, vae_factor)
  cfg = float(c.model_cfg.get(model_name, c.cfg))
  sampler = make_sampler(transformer, sigmas=flow_match_sigmas(c.sampling.steps, shift),
                         cfg_scale=cfg, latent_shape=(size, size, transformer.config.in_channels))
  decode = jax.jit(lambda latents: decode_latents(vae, latents))
  return lambda cond, uncond, keys: decode(sampler(cond, uncond, keys)), cfg


def _batch_sharding(mesh):
  import jax
  from opd_jax.parallel.sharding import batch_sharding
  return lambda tree: jax.tree.map(
      lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), tree)


def sample_cell(store: CellStore, bench: bm.Benchmark, embeddings: Embeddings, sample, cfg: float,
                c, mesh, progress: Callable) -> int:
  """Samples the cell's missing images (padded to whole batches); returns how many it made."""
  import jax
  import jax.numpy as jnp
  missing = store.missing_images(len(bench.items))
  if not missing:
    return 0
  put = _batch_sharding(mesh)
  batch = c.sampling.batch_size
  root = jax.random.key(c.sampling.seed)
  bar = progress(total=len(missing), desc=f'sample {store.root}')
  for start in range(0, len(missing), batch):
    idx = missing[start:start + batch]
    padded = idx + [idx[-1]] * (batch - len(idx))          # static shapes: one compile
    cond = embeddings.get(padded, [bench.prompts[i] for i in padded])
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(padded))
    uncond = (None if cfg <= 1 else
              {k: np.broadcast_to(v, (batch,) + v.shape[1:]) for k, v in
               embeddings.negative.items()})
    images = sample(put(cond), None if uncond is None else put(uncond), put(keys))
    store.save_images(idx, np.asarray(images)[:len(idx)])
    bar.update(len(idx))
  bar.close()
  return len(missing)


def score_cell(store: CellStore, bench: bm.Benchmark, scorer: bm.Scorer, batch: int,
               progress: Callable) -> dict[int, dict]:
  """Scores every image of the cell without a score yet; returns all its records."""
  records = store.scores()
  todo = [i for i in range(len(bench.items)) if i not in records]
  bar = progress(total=len(todo), desc=f'score {store.root}')
  for start in range(0, len(todo), batch):
    idx = todo[start:start + batch]
    scored = scorer(store.load_images(idx), [bench.items[i] for i in idx])
    new = [{'index': i, **r} for i, r in zip(idx, scored)]
    store.append_scores(new)
    records.update({r['index']: r for r in new})
    bar.update(len(idx))
  bar.close()
  return records


def evaluate(c, scorers: Mapping[str, bm.Scorer] | None = None, *, devices=None,
             progress: Callable | None = None) -> tuple[str, str]:
  """The whole evaluation (module docstring); returns the paths of eval.json and eval.md.

  `scorers` (benchmark → scorer) replaces the ones the config describes (`eval.scorers`).
  """
  from opd_jax.parallel.mesh import batch_axis_size, make_mesh
  if progress is None:
    from tqdm import tqdm as progress
  benches = validate(c)
  import jax
  try:
    mesh = make_mesh(dict(c.mesh.shape), devices if devices is not None else jax.devices())
  except ValueError as e:
    raise ConfigError(f'config.mesh.shape: {e}') from None
  cc.check(c.sampling.batch_size % batch_axis_size(mesh) == 0, 'sampling.batch_size',
           f'{c.sampling.batch_size} does not split over the {batch_axis_size(mesh)} devices of '
           'the mesh batch axes')
  embeddings = {name: Embeddings(c.benchmarks[name].embeddings, c.benchmarks[name].task,
                                 c.benchmarks[name].split, f'config.benchmarks.{name}.embeddings')
                for name in benches}
  for name, e in embeddings.items():
    if e.size < len(benches[name].items):
      raise InputError(f'config.benchmarks.{name}.embeddings: {e.path} holds {e.size} prompts, '
                       f'the prompt file {len(benches[name].items)}')
  if scorers is None:
    from opd_jax.eval.scorers import build_scorers
    scorers = build_scorers(c, list(benches))
  os.makedirs(c.out_dir, exist_ok=True)
  stores = {(m, b): CellStore(os.path.join(c.out_dir, m, b), _cell_settings(c, m, b))
            for m in c.models for b in benches}
  for model in c.models:
    if not any(stores[model, b].missing_images(len(benches[b].items)) for b in benches):
      continue
    sample, cfg = _sharded_sampler(c, model, mesh)
    for b in benches:
      sample_cell(stores[model, b], benches[b], embeddings[b], sample, cfg, c, mesh, progress)
    del sample
  table, details, counts = {}, {}, {}
  for model in c.models:
    table[model], details[model], counts[model] = {}, {}, {}
    for b, bench in benches.items():
      records = score_cell(stores[model, b], bench, scorers[b], c.rewards.batch_size, progress)
      ordered = [records[i] for i in range(len(bench.items))]
      metrics = bm.cell_metrics(b, ordered, _reward_names(c, b))
      table[model].update({k: v for k, v in metrics.items() if not k.endswith('_summary')})
      details[model][b] = metrics
      counts[model][b] = len(ordered)
      if c.grid_images:
        _write_grid(c.out_dir, model, b, stores[model, b], min(c.grid_images, len(ordered)))
  meta = {'command': 'python -m opd_jax.evaluate ' + ' '.join(sys.argv[1:]),
          'settings': f'{c.sampling.steps}-step Euler ODE, {c.sampling.resolution} px, '
                      f'CFG {c.cfg} (per model: {dict(c.model_cfg) or "same"}), seed '
                      f'{c.sampling.seed}, {c.sampling.dtype}',
          'machine': f'{platform.machine()} {os.cpu_count()}-core host, '
                     f'{len(mesh.devices.flat)} {jax.devices()[0].platform} device(s)',
          'images': counts, 'models': dict(c.models)}
  return table1.write_report(c.out_dir, table, details, meta)


def _reward_names(c, bench: str) -> list[str]:
  return [r for r in c.benchmarks[bench].rewards.split(',') if r]


def _write_grid(out_dir: str, model: str, bench: str, store: CellStore, n: int) -> None:
  from PIL import Image
  os.makedirs(os.path.join(out_dir, 'grids'), exist_ok=True)
  grid = table1.image_grid(store.load_images(list(range(n))))
  Image.fromarray(grid).save(os.path.join(out_dir, 'grids', f'{model}_{bench}.png'))


def main(argv) -> None:
  from opd_jax.errors import report_errors
  with report_errors(_TRACEBACK.value):
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {argv[1:]}; every input is a --flag')
    if _CONFIG.value is None:
      raise ConfigError('--config: required, e.g. --config=configs/eval_sd35m.py')
    json_path, md_path = evaluate(_CONFIG.value)
  print(f'wrote {json_path} and {md_path}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  from opd_jax.errors import parse_config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/eval_sd35m.py or a copy.',
                                            lock_config=True)
  _TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.')
  app.run(main, flags_parser=lambda argv: parse_config_flags(argv, _CONFIG))
