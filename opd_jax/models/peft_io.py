"""LoRA adapters in PEFT / diffusers files ↔ adapter pytrees of our `LoRALinear` layout, no torch.

Files read (whatever wrote them — peft `save_pretrained`, diffusers `save_lora_adapter`, or a
pipeline's `save_lora_weights`):

  PEFT folder       adapter_config.json + adapter_model.safetensors,
                    keys `base_model.model.<module>.lora_A.weight` ([r, in]) / `lora_B` ([out, r])
  diffusers file    pytorch_lora_weights.safetensors, keys `<module>.lora_A.weight` or
                    `transformer.<module>.…` (pipeline format), the LoraConfig as JSON in the
                    header metadata `lora_adapter_metadata` (keys `transformer.`-prefixed likewise)

`<module>` is a diffusers module name (`transformer_blocks.3.attn.to_q`). Rank comes from the
tensors, alpha from the config (`lora_alpha`, `alpha_pattern`; rsLoRA scales alpha/√r); files with
no alpha at all get diffusers' convention, alpha = rank (scale 1). On import each adapter is folded
into the model's own rank and scale (`fold_adapter`), so the product (alpha/r)·A·B is exact; model
slots the file does not cover get A = B = 0. Export writes the PEFT folder (default) or the
pipeline-style diffusers file, both loadable by diffusers + peft in PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from opd_jax.errors import InputError
from opd_jax.models.loading.name_map import module_name
from opd_jax.models.loading.safetensors_io import CheckpointError, CheckpointReader, read_json
from opd_jax.models.lora import LoRALinear, LoRAParam, fold_adapter

# The DiffusionOPD recipe's LoRA targets (spec §5), as PEFT target_modules.
RECIPE_LORA_TARGETS: tuple[str, ...] = (
    'attn.to_q', 'attn.to_k', 'attn.to_v', 'attn.to_out.0',
    'attn.add_q_proj', 'attn.add_k_proj', 'attn.add_v_proj', 'attn.to_add_out')

PEFT_CONFIG_NAME = 'adapter_config.json'
PEFT_WEIGHTS_NAME = 'adapter_model.safetensors'
DIFFUSERS_WEIGHTS_NAME = 'pytorch_lora_weights.safetensors'
DIFFUSERS_METADATA_KEY = 'lora_adapter_metadata'
PEFT_PREFIX = 'base_model.model.'
_KEY = re.compile(r'^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$')


class AdapterError(InputError):
  """An adapter that does not fit the model or uses unsupported PEFT features."""


def matches_target(module: str, targets: Sequence[str] | str) -> bool:
  """PEFT's target_modules rule: a regex string must match the whole module name; a list entry
  must equal it or be a dotted suffix of it ('attn.to_q' matches 'transformer_blocks.0.attn.to_q'
  but not '….attn2.to_q')."""
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  return any(module == t or module.endswith('.' + t) for t in targets)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """PEFT's rank_pattern / alpha_pattern lookup (`get_pattern_key`)."""
  for pattern, value in patterns.items():
    if re.match(rf'(.*\.)?({pattern})$', module):
      return value
  return default


@dataclasses.dataclass(frozen=True)
class LoRASlot:
  """One adapter slot of a model: a `LoRALinear` with rank > 0."""
  path: tuple          # NNX path of the LoRALinear
  module: str          # its diffusers module name
  in_features: int
  out_features: int
  rank: int
  scale: float         # alpha / rank


def lora_slots(model: nnx.Module) -> dict[str, LoRASlot]:
  """The adapter slots of a (concrete or `nnx.eval_shape`) model, by diffusers module name."""
  renames = getattr(model, 'TORCH_KEY_RENAMES', ())
  slots = {}
  for path, layer in nnx.iter_modules(model):
    if isinstance(layer, LoRALinear) and layer.lora_rank:
      name = module_name(path, renames)
      slots[name] = LoRASlot(tuple(path), name, layer.in_features, layer.out_features,
                             layer.lora_rank, layer.lora_scale)
  return slots


@dataclasses.dataclass
class PeftAdapter:
  """An adapter as stored: per module A [r, in] and B [out, r] (torch layout) and its scale."""
  a: dict[str, np.ndarray]
  b: dict[str, np.ndarray]
  scale: dict[str, float]
  config: dict[str, Any]


def _locate(path: str) -> tuple[str, dict[str, Any] | None]:
  """(safetensors file, adapter_config.json contents or None) for a folder or a file."""
  if os.path.isdir(path):
    for name in (PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME):
      if os.path.exists(os.path.join(path, name)):
        weights = os.path.join(path, name)
        break
    else:
      raise CheckpointError(f'no {PEFT_WEIGHTS_NAME} or {DIFFUSERS_WEIGHTS_NAME} in {path}')
    folder = path
  elif os.path.exists(path):
    weights, folder = path, os.path.dirname(path)
  else:
    raise CheckpointError(f'adapter {path} not found')
  config_path = os.path.join(folder, PEFT_CONFIG_NAME)
  config = read_json(config_path) if os.path.exists(config_path) else None
  return weights, config


def _strip(name: str, prefix: str) -> str:
  return name[len(prefix):] if name.startswith(prefix) else name


def read_peft_adapter(path: str | os.PathLike, *, prefix: str = 'transformer',
                      adapter_name: str | None = None) -> PeftAdapter:
  """Reads a PEFT folder, a diffusers LoRA file, or a folder holding one.

  Args:
    path: folder or .safetensors file.
    prefix: component prefix of pipeline-format keys (`transformer.`); when present, only that
      component's tensors are read.
    adapter_name: if keys carry an adapter name (`lora_A.<name>.weight`), the one to read.

  Raises:
    CheckpointError: unreadable files. AdapterError: DoRA, LoRA biases, other tensor kinds, or
      an adapter without a LoRA config where one is required.
  """
  weights, config = _locate(os.fspath(path))
  with CheckpointReader.from_file(weights) as reader:
    if config is None:
      raw = reader.metadata().get(DIFFUSERS_METADATA_KEY)
      if raw is not None:
        try:
          stored_config = json.loads(raw)
        except json.JSONDecodeError as e:
          raise AdapterError(f'{weights}: header metadata {DIFFUSERS_METADATA_KEY!r} is not '
                             f'valid JSON ({e})') from None
        if not isinstance(stored_config, dict):
          raise AdapterError(f'{weights}: header metadata {DIFFUSERS_METADATA_KEY!r} is not a '
                             'JSON object')
        config = {_strip(k, prefix + '.'): v for k, v in stored_config.items()}
    stored = {_strip(k, PEFT_PREFIX): k for k in reader.keys()}
    if any(k.startswith(prefix + '.') for k in stored):
      # Pipeline format: keep this component's tensors (e.g. skip text-encoder LoRAs).
      stored = {k: v for k, v in stored.items() if k.startswith(prefix + '.')}
    a, b, names = {}, {}, set()
    for short, key in stored.items():
      match = _KEY.match(_strip(short, prefix + '.'))
      if match is None:
        raise AdapterError(f'unsupported tensor {key!r} in {weights}: only LoRA A/B weights are '
                           'supported (no DoRA magnitudes, LoRA biases or modules_to_save)')
      if match['adapter'] is not None:
        names.add(match['adapter'])
        if adapter_name is not None and match['adapter'] != adapter_name:
          continue
      tensor = np.asarray(reader.read(key))
      if tensor.ndim != 2:
        raise AdapterError(f'{key!r} in {weights} has shape {list(tensor.shape)}; LoRA A/B '
                           'weights are matrices')
      (a if match['ab'] == 'A' else b)[match['module']] = tensor
  if len(names) > 1 and adapter_name is None:
    raise AdapterError(f'{weights} holds adapters {sorted(names)}; pass adapter_name')
  if set(a) != set(b):
    raise AdapterError(f'modules with only one of lora_A/lora_B: {sorted(set(a) ^ set(b))}')

  config = dict(config or {})
  if config.get('peft_type', 'LORA') != 'LORA':
    raise AdapterError(f'peft_type {config["peft_type"]!r} is not LoRA')
  for flag in ('use_dora', 'lora_bias'):
    if config.get(flag):
      raise AdapterError(f'{flag}=true adapters are not supported')
  if config.get('bias', 'none') != 'none':
    raise AdapterError(f'bias={config["bias"]!r} adapters are not supported')
  if 'lora_alpha' not in config:
    warnings.warn(f'{weights} has no LoRA config; using alpha = rank (scale 1), as diffusers does')
  scale = {}
  for module, a_m in a.items():
    rank = a_m.shape[0]
    try:
      alpha = _pattern_value(config.get('alpha_pattern') or {}, module,
                             config.get('lora_alpha', rank))
    except (re.error, AttributeError) as e:   # a bad regex, or alpha_pattern not an object
      raise AdapterError(f'{weights}: unusable alpha_pattern in the LoRA config ({e})') from None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
      raise AdapterError(f'{weights}: lora_alpha of {module} is {alpha!r}, not a number')
    scale[module] = alpha / math.sqrt(rank) if config.get('use_rslora') else alpha / rank
  return PeftAdapter(a, b, scale, config)


def adapter_from_peft(peft: PeftAdapter, model: nnx.Module, *, strict: bool = True) -> nnx.State:
  """Folds a read adapter into `model`'s LoRA slots; returns a LoRAParam State of the model.

  Args:
    peft: from `read_peft_adapter`.
    model: the target model (concrete or abstract); its slots fix ranks and scales.
    strict: error if the file adapts modules the model has no slot for (else they are dropped
      with a warning — the result would not reproduce the adapter).
  """
  slots = lora_slots(model)
  if not slots:
    raise AdapterError('the model has no LoRA slots; build it with lora_rank > 0')
  extra = sorted(set(peft.a) - set(slots))
  if extra:
    message = (f'the adapter targets {len(extra)} modules without a LoRA slot in the model, e.g. '
               f'{extra[:5]}; add them to lora_targets')
    if strict:
      raise AdapterError(message)
    warnings.warn(message)
  values: dict[tuple, jax.Array] = {}
  for name, slot in slots.items():
    if name not in peft.a:
      values[slot.path + ('lora_a',)] = jnp.zeros((slot.in_features, slot.rank), jnp.float32)
      values[slot.path + ('lora_b',)] = jnp.zeros((slot.rank, slot.out_features), jnp.float32)
      continue
    a = jnp.asarray(peft.a[name], jnp.float32).T   # [in, r]
    b = jnp.asarray(peft.b[name], jnp.float32).T   # [r, out]
    rank = a.shape[1]
    if a.shape[0] != slot.in_features or b.shape != (rank, slot.out_features):
      raise AdapterError(f'{name}: adapter A {list(peft.a[name].shape)} / B '
                         f'{list(peft.b[name].shape)} do not fit a {slot.in_features}→'
                         f'{slot.out_features} layer')
    if rank > slot.rank:
      raise AdapterError(f'{name}: adapter rank {rank} exceeds the model LoRA rank {slot.rank}; '
                         'raise config.lora.rank')
    # fold_adapter takes (alpha, rank) and uses alpha/rank: pass the file's scale that way.
    a, b = fold_adapter(a, b, peft.scale[name] * rank, rank, slot.rank, slot.scale)
    values[slot.path + ('lora_a',)], values[slot.path + ('lora_b',)] = a, b
  state = nnx.state(model, LoRAParam)
  return nnx.from_flat_state([(p, v.replace(values[tuple(p)]))
                              for p, v in nnx.to_flat_state(state)])


def load_lora_adapter(path: str | os.PathLike, model: nnx.Module, *,
                      prefix: str = 'transformer', adapter_name: str | None = None,
                      strict: bool = True) -> nnx.State:
  """Reads a PEFT/diffusers LoRA and returns it as an adapter State for `model`.

  The result has the structure of `split_model(model)[2]`, so `nnx.merge(graphdef, base, it)`
  or `nnx.update(model, it)` applies it, and `stack_adapters` stacks several as teachers.
  """
  return adapter_from_peft(read_peft_adapter(path, prefix=prefix, adapter_name=adapter_name),
                           model, strict=strict)


def _host(x: Any) -> np.ndarray:
  if isinstance(x, nnx.Variable):
    x = x.get_value()
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise ValueError('adapter arrays must be fully addressable on this host to export; gather '
                     'them first (jax.experimental.multihost_utils.process_allgather)')
  return np.asarray(jax.device_get(x), np.float32)


def _lookup(tree: Any, path: tuple) -> Any:
  node = tree
  for key in path:
    node = node[key]
  return node


def adapter_to_peft(adapter: Any, model: nnx.Module) -> tuple[dict[str, np.ndarray], dict]:
  """Torch-layout tensors {module.lora_A.weight: [r, in], ….lora_B.weight: [out, r]} and a
  LoraConfig dict for an adapter (a LoRAParam State or its pure dict) of `model`."""
  if isinstance(adapter, nnx.State):
    adapter = nnx.to_pure_dict(adapter)
  slots = lora_slots(model)
  if not slots:
    raise AdapterError('the model has no LoRA slots')
  tensors = {}
  for name, slot in slots.items():
    tensors[f'{name}.lora_A.weight'] = _host(_lookup(adapter, slot.path + ('lora_a',))).T
    tensors[f'{name}.lora_B.weight'] = _host(_lookup(adapter, slot.path + ('lora_b',))).T
  ranks = {s.rank for s in slots.values()}
  alphas = {s.scale * s.rank for s in slots.values()}
  if len(ranks) != 1 or len(alphas) != 1:
    raise AdapterError(f'slots with several ranks {ranks} / alphas {alphas} are not supported')
  rank, alpha = ranks.pop(), alphas.pop()
  targets = getattr(model, 'lora_targets', None)
  names = set(slots)
  # Name the targets as the model does when that selects exactly these modules in PEFT's rules;
  # otherwise list every module (exact-name entries match only themselves).
  if targets is None or {n for n in names if matches_target(n, targets)} != names:
    targets = sorted(names)
  config = {
      'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': None,
      'r': int(rank), 'lora_alpha': int(alpha) if float(alpha).is_integer() else float(alpha),
      'target_modules': targets if isinstance(targets, str) else list(targets),
      'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False,
      'init_lora_weights': 'gaussian', 'use_rslora': False, 'use_dora': False,
      'rank_pattern': {}, 'alpha_pattern': {}, 'modules_to_save': None,
      'inference_mode': True,
  }
  return tensors, config


def save_lora_adapter(adapter: Any, model: nnx.Module, out_dir: str | os.PathLike, *,
                      format: str = 'peft', dtype: Any = np.float32,
                      prefix: str = 'transformer') -> str:
  """Writes an adapter so diffusers + peft (PyTorch) can load it.

  Args:
    adapter: LoRAParam State of `model` or its `nnx.to_pure_dict` (e.g. the trained student).
    model: the model the adapter belongs to (fixes module names, rank and alpha).
    out_dir: created if needed.
    format: 'peft' → adapter_config.json + adapter_model.safetensors, what peft's
      `save_pretrained` writes (load with `PeftModel.from_pretrained(transformer, out_dir)`);
      'diffusers' → pytorch_lora_weights.safetensors in the pipeline format
      (`pipe.load_lora_weights(out_dir)`, or `transformer.load_lora_adapter(out_dir,
      prefix='transformer', use_safetensors=True)`).
    dtype: stored dtype of the tensors (float32 keeps the trained values exactly).
    prefix: pipeline component prefix used by the 'diffusers' format.

  Returns:
    The path of the written safetensors file.
  """
  tensors, config = adapter_to_peft(adapter, model)
  tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if format == 'peft':
    path = os.path.join(out_dir, PEFT_WEIGHTS_NAME)
    save_file({PEFT_PREFIX + k: v for k, v in tensors.items()}, path, metadata={'format': 'pt'})
    with open(os.path.join(out_dir, PEFT_CONFIG_NAME), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
  elif format == 'diffusers':
    path = os.path.join(out_dir, DIFFUSERS_WEIGHTS_NAME)
    metadata = json.dumps({f'{prefix}.{k}': v for k, v in config.items()}, sort_keys=True)
    save_file({f'{prefix}.{k}': v for k, v in tensors.items()}, path,
              metadata={'format': 'pt', DIFFUSERS_METADATA_KEY: metadata})
  else:
    raise ValueError(f"format must be 'peft' or 'diffusers', got {format!r}")
  return path
