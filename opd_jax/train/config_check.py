"""The config dialect shared by every trainer: validation of common sections, resume checks.

Every trainer's config is a `configs/*.py` ConfigDict with `trainer` naming the trainer
(`opd_jax.trainers`) and, where they apply, the same sections spelled the same way:

  seed                   the run seed
  base.source/.path      where the frozen base comes from
  lora.rank/.alpha/.init LoRA layout of the trained adapter (and of OPD teachers)
  data.batch_size        global batch per step (OPD: prompts per task; RL: prompts, each
                         `data.group_size` times; pretraining: image-prompt pairs), or
  data.batch_size_per_device  the same per batch device (exactly one of the two is > 0)
  rollout.*              the sampler (kernel, noise_level, cfg_scale, num_steps, shift)
  optimizer.*            AdamW (`opd_jax.train.state.make_optimizer`)
  ema.*                  the EMA rule (`opd_jax.train.state.EMARule`)
  mesh.shape             device mesh
  train.num_steps/.log_every/.checkpoint_every/.keep_checkpoints/.async_checkpoints

This module validates those sections (`validate_common`) with one `ConfigError` naming the
field, and decides whether a checkpoint may be resumed under the current config
(`resume_changes`): only run-length fields may change; paths may move (their content is compared
through input fingerprints instead); anything else stops the run with one line naming the
fields, unless `train.allow_changed_config` says the user means it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from opd_jax.errors import ConfigError

# Fields that only say how long / how often: a resumed run may change them.
RUN_LENGTH_FIELDS = ('train.num_steps', 'train.log_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.async_checkpoints',
                     'train.allow_changed_config', 'train.export_peft',
                     'train.memory_limit_gib')
# Where things are, not what they are: content is compared through input fingerprints.
LOCATION_FIELDS = ('base.path', 'data.data_dir', 'data.embeddings_dir')
LOCATION_SUFFIXES = ('.path', '.paths')
# How the work is laid out on devices: results do not depend on it beyond float tolerance.
LAYOUT_PREFIXES = ('mesh.',)
LAYOUT_FIELDS = ('data.batch_size_per_device', 'train.num_microbatches', 'train.timestep_chunks',
                 'train.fused_vjp')


def check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}: {message}')


def choice(value, field: str, choices: Iterable) -> None:
  choices = list(choices)
  check(value in choices, field, f'{value!r} is not one of {sorted(choices)}')


def positive(value, field: str) -> None:
  check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, field,
        f'must be > 0, got {value!r}')


def non_negative(value, field: str) -> None:
  check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, field,
        f'must be >= 0, got {value!r}')


def integer(value, field: str, minimum: int = 0) -> None:
  check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, field,
        f'must be an int >= {minimum}, got {value!r}')


def require_sections(c, names: Iterable[str]) -> None:
  """Each named section/field exists (a config written for another trainer fails here)."""
  for name in names:
    node = c
    for i, part in enumerate(name.split('.')):
      if part not in node:
        raise ConfigError(f'config.{".".join(name.split(".")[:i + 1])}: missing (trainer '
                          f'{c.get("trainer", "?")!r} needs it)')
      node = node[part]


def validate_optimizer(o, field: str = 'optimizer') -> None:
  positive(o.lr, f'{field}.lr')
  choice(o.schedule, f'{field}.schedule', ('constant', 'cosine'))
  integer(o.warmup_steps, f'{field}.warmup_steps')
  check(0 <= o.b1 < 1, f'{field}.b1', f'must be in [0, 1), got {o.b1}')
  check(0 <= o.b2 < 1, f'{field}.b2', f'must be in [0, 1), got {o.b2}')
  positive(o.eps, f'{field}.eps')
  non_negative(o.weight_decay, f'{field}.weight_decay')
  positive(o.grad_clip, f'{field}.grad_clip')


def validate_ema(e) -> None:
  check(0 <= e.max_decay < 1, 'ema.max_decay', f'must be in [0, 1), got {e.max_decay}')
  integer(e.every, 'ema.every', 1)
  integer(e.updates_per_step, 'ema.updates_per_step', 1)
  check(isinstance(e.use_ema, bool), 'ema.use_ema', f'must be True or False, got {e.use_ema!r}')


def validate_train(t) -> None:
  integer(t.num_steps, 'train.num_steps', 0)
  integer(t.log_every, 'train.log_every', 1)
  integer(t.checkpoint_every, 'train.checkpoint_every', 1)
  integer(t.keep_checkpoints, 'train.keep_checkpoints', 1)


def validate_mesh(m) -> None:
  from opd_jax.parallel.mesh import AXES
  shape = m.shape.to_dict() if hasattr(m.shape, 'to_dict') else dict(m.shape)
  unknown = [a for a in shape if a not in AXES]
  check(not unknown, 'mesh.shape', f'unknown axes {unknown}; allowed axes are {AXES}')
  for a, s in shape.items():
    check(isinstance(s, int) and (s == -1 or s >= 1), f'mesh.shape.{a}',
          f'must be a positive int or -1, got {s!r}')
  check(sum(s == -1 for s in shape.values()) <= 1, 'mesh.shape', 'at most one axis may be -1')


def validate_lora(l, required: bool = True) -> None:
  integer(l.rank, 'lora.rank', 1 if required else 0)
  positive(l.alpha, 'lora.alpha')
  choice(l.init, 'lora.init', ('gaussian', 'kaiming'))


def validate_batch(d) -> None:
  integer(d.batch_size, 'data.batch_size', 0)
  integer(d.batch_size_per_device, 'data.batch_size_per_device', 0)
  check((d.batch_size > 0) != (d.batch_size_per_device > 0), 'data.batch_size',
        f'set exactly one of data.batch_size (global, {d.batch_size}) and '
        f'data.batch_size_per_device ({d.batch_size_per_device}); the other 0')


def global_batch_size(d, batch_devices: int, must_split: bool = True) -> int:
  """data.batch_size, or data.batch_size_per_device × the batch devices of the mesh.

  `must_split`: the global batch itself is split over the devices (RL splits its images,
  batch × group size, instead, and checks that itself).
  """
  if d.batch_size > 0:
    check(d.batch_size % batch_devices == 0 or not must_split, 'data.batch_size',
          f'{d.batch_size} does not split over the {batch_devices} batch devices of the mesh '
          '(mesh.shape data × fsdp)')
    return int(d.batch_size)
  return int(d.batch_size_per_device) * batch_devices



def validate_model(c) -> None:
  """config.model: the network by name and its sizes; an SD3 network takes its sizes from the
  checkpoint (config.base.source 'diffusers'), a DiT's are checked here."""
  from opd_jax.models.registry import ATTENTION, DTYPES, MODELS
  m = c.model
  choice(m.name, 'model.name', MODELS)
  choice(m.dtype, 'model.dtype', DTYPES)
  positive(m.latent_size, 'model.latent_size')
  positive(m.latent_channels, 'model.latent_channels')
  if m.name == 'dit':
    for f in ('patch_size', 'dim', 'depth', 'num_heads', 'context_dim', 'pooled_dim'):
      positive(m[f], f'model.{f}')
    check(m.latent_size % m.patch_size == 0, 'model.patch_size',
             f'{m.patch_size} does not divide model.latent_size={m.latent_size}')
    check(m.dim % m.num_heads == 0, 'model.num_heads',
             f'{m.num_heads} does not divide model.dim={m.dim}')
  if m.name == 'sd3':   # sizes come from the checkpoint's config.json
    choice(m.param_dtype, 'model.param_dtype', DTYPES)
    choice(m.get('attention', ''), 'model.attention', ATTENTION)
    for flag in ('float32_matmul_output', 'float32_residual', 'float32_output'):
      check(isinstance(m.get(flag, False), bool), f'model.{flag}',
               f'True or False, got {m.get(flag)!r}')
    check(c.base.source == 'diffusers', 'base.source',
             f"model 'sd3' loads its weights from a diffusers folder ('diffusers'), got "
             f'{c.base.source!r}')


def validate_common(c) -> None:
  """The sections every trainer has: optimizer, ema, mesh, train (and seed)."""
  integer(c.seed, 'seed', 0)
  validate_optimizer(c.optimizer)
  validate_ema(c.ema)
  validate_mesh(c.mesh)
  validate_train(c.train)


# --- resume -----------------------------------------------------------------------------------
def _flatten(d: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def _ignored(field: str) -> bool:
  return (field in RUN_LENGTH_FIELDS or field in LOCATION_FIELDS or field in LAYOUT_FIELDS
          or field.endswith(LOCATION_SUFFIXES) or field.startswith(LAYOUT_PREFIXES))


def resume_changes(saved: Mapping, current: Mapping) -> list[str]:
  """'field: saved → current' for every field that differs and may not change on resume."""
  a, b = _flatten(saved), _flatten(current)
  out = []
  for field in sorted(set(a) | set(b)):
    if _ignored(field):
      continue
    old, new = a.get(field, '<absent>'), b.get(field, '<absent>')
    if old != new:
      out.append(f'config.{field}: {old!r} → {new!r}')
  return out


def input_changes(saved: Mapping, current: Mapping) -> list[str]:
  """Inputs (teachers, base, prompts) whose content differs from the checkpointed run's."""
  keys = sorted(set(saved) | set(current))
  return [f'{k} (content changed)' for k in keys if saved.get(k) != current.get(k)]
