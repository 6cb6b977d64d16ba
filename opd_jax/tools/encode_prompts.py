"""Encodes prompt sets with SD3's three text encoders into an on-disk cache for training.

SD3/SD3.5 condition the transformer on CLIP-L, CLIP-G and T5-XXL. Those encoders are frozen and
large (T5-XXL alone is 4.7 B parameters), so DiffusionOPD's rollouts read cached embeddings
instead: this tool runs the encoders once, in torch float32 on CPU, and writes one TFDS
(array_record) dataset per task plus the empty-prompt embedding that CFG needs. The format and its
reader live in `opd_jax.data.prompt_embeddings`.

The conditioning reproduces diffusers' `StableDiffusion3Pipeline.encode_prompt` (clip_skip None,
the pipeline default) exactly:
  * each CLIP tokenises to `tokenizer.model_max_length` (77) tokens, padded and truncated;
    its penultimate hidden state is the token sequence and its projected EOS state the pooled
    vector;
  * the two CLIP sequences are concatenated on the feature axis (768 + 1280), zero-padded to T5's
    width (4096), then concatenated on the sequence axis with T5's `max_sequence_length` tokens
    → prompt_embeds [77 + max_sequence_length, 4096];
  * pooled_prompt_embeds = CLIP-L pooled ‖ CLIP-G pooled → [2048];
  * without T5 (a model folder with no text_encoder_3) the T5 block is zeros of width
    `transformer.config.joint_attention_dim`.
diffusers defaults `max_sequence_length` to 256; the DiffusionOPD / Flow-GRPO recipe uses 128,
which is this command's default.

Usage:
  python -m opd_jax.tools.encode_prompts --model_dir=/models/sd3.5-medium \
      --prompts=geneval=geneval/train_metadata.jsonl,geneval:test=geneval/test_metadata.jsonl,\
ocr=ocr/train.txt,pickscore=pickscore/train.txt \
      --out_dir=/data/prompt_cache --max_sequence_length=128

`--prompts` entries are `task=path` (split `train`) or `task:split=path`. Files ending in `.txt`
hold one prompt per line (blank lines skipped); files ending in `.jsonl` hold one JSON object per
line with a `prompt` field (GenEval's metadata format; the whole record is kept). Output is
written to a temporary sibling of `--out_dir` and renamed into place only when everything
succeeded, so a failed run leaves no partial cache.

Bad input — a missing, empty or malformed prompt file, a malformed `--prompts` entry, a model
folder that is not an SD3 pipeline, an existing `--out_dir` — ends with one `error: …` line naming
the flag or path and exit status 1 (2 for a bad or missing flag); `--traceback` shows the
traceback. Prompt files and flags are checked before torch and the encoders are loaded, so such
mistakes cost a second, not a model load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from opd_jax.data import prompt_embeddings as pe_format
from opd_jax.errors import ConfigError, InputError, parse_absl_flags, report_errors

# torch and transformers (seconds to import) are imported where the encoders are loaded or run,
# so a bad prompt file or flag is reported without waiting for them.
if TYPE_CHECKING:
  import torch

NEGATIVE_PROMPT = ''  # SD3's CFG unconditional branch (spec §2: negative prompt "").
DEFAULT_SPLIT = 'train'


class PromptSetError(InputError):
  """A prompt file or `--prompts` entry that cannot be used (missing, empty, malformed)."""


class OutDirExistsError(InputError, FileExistsError):
  """`--out_dir` exists and `--overwrite` was not given."""


class ModelFolderError(InputError, FileNotFoundError):
  """`--model_dir` is not a loadable diffusers SD3 folder (a FileNotFoundError too, as before)."""


# --------------------------------------------------------------------------- prompt files


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt and the record it came from (JSON text; '{}' for plain-text files)."""
  prompt: str
  metadata_json: str


def read_prompt_file(path: str | os.PathLike) -> list[PromptRecord]:
  """Reads a `.txt` (one prompt per line) or `.jsonl` (`prompt` field per line) prompt file.

  Text lines are stripped of surrounding whitespace, as Flow-GRPO's prompt datasets do; blank
  lines are skipped in both formats. A JSONL record without a non-empty string `prompt` is an
  error rather than skipped: silently dropping it would misalign GenEval's per-prompt metadata.

  Raises:
    PromptSetError: unknown extension, missing file, malformed line, or no prompt at all.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in ('.txt', '.jsonl'):
    raise PromptSetError(f'{path}: unknown prompt file type {ext!r} (expected .txt or .jsonl)')
  if not os.path.isfile(path):
    raise PromptSetError(f'{path}: prompt file not found')
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise PromptSetError(f'{path}: unreadable ({e})') from None
  records = []
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    if ext == '.txt':
      records.append(PromptRecord(line.strip(), '{}'))
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptSetError(f'{path}:{line_no}: invalid JSON ({e.msg})') from None
    prompt = record.get('prompt') if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
      raise PromptSetError(f'{path}:{line_no}: record has no non-empty string "prompt" field')
    records.append(PromptRecord(prompt, json.dumps(record, ensure_ascii=False)))
  if not records:
    raise PromptSetError(f'{path}: no prompts (the file is empty or has only blank lines)')
  return records


def parse_prompt_specs(specs: Sequence[str]) -> dict[str, dict[str, str]]:
  """Parses `task=path` / `task:split=path` entries into {task: {split: path}}.

  Raises:
    PromptSetError: malformed entry, invalid name, or a (task, split) given twice.
  """
  if not specs:
    raise PromptSetError('no prompt files given (--prompts=task=path[,task=path...])')
  tasks: dict[str, dict[str, str]] = {}
  for spec in specs:
    name, sep, path = spec.partition('=')
    task, _, split = name.partition(':')
    split = split or DEFAULT_SPLIT
    if not sep or not path:
      raise PromptSetError(f'--prompts entry {spec!r} is not task=path or task:split=path')
    for kind, value in (('task', task), ('split', split)):
      if not pe_format.NAME_PATTERN.match(value):
        raise PromptSetError(f'--prompts entry {spec!r}: {kind} name {value!r} must match '
                             f'{pe_format.NAME_PATTERN.pattern}')
    if split in tasks.setdefault(task, {}):
      raise PromptSetError(f'--prompts gives {task}:{split} twice')
    tasks[task][split] = path
  return tasks


# --------------------------------------------------------------------------- encoders


@dataclasses.dataclass
class SD3TextEncoders:
  """The text-side components of an SD3 pipeline (T5 optional, as in diffusers).

  Attributes:
    tokenizer: CLIP-L tokenizer; its `model_max_length` (77) sets both CLIPs' length.
    text_encoder: CLIP-L `CLIPTextModelWithProjection`.
    tokenizer_2: CLIP-G tokenizer.
    text_encoder_2: CLIP-G `CLIPTextModelWithProjection`.
    tokenizer_3: T5 tokenizer, or None.
    text_encoder_3: `T5EncoderModel`, or None.
    joint_attention_dim: width of the zero T5 block when T5 is absent (the transformer's
      `joint_attention_dim`); unused when T5 is present. None if unknown.
  """
  tokenizer: Any
  text_encoder: Any
  tokenizer_2: Any
  text_encoder_2: Any
  tokenizer_3: Any = None
  text_encoder_3: Any = None
  joint_attention_dim: int | None = None

  @classmethod
  def from_components(cls, components: Any) -> 'SD3TextEncoders':
    """Builds from a `StableDiffusion3Pipeline` or its `.components` dict."""
    get = (components.get if isinstance(components, Mapping) else
           lambda name: getattr(components, name, None))
    transformer = get('transformer')
    return cls(tokenizer=get('tokenizer'), text_encoder=get('text_encoder'),
               tokenizer_2=get('tokenizer_2'), text_encoder_2=get('text_encoder_2'),
               tokenizer_3=get('tokenizer_3'), text_encoder_3=get('text_encoder_3'),
               joint_attention_dim=(transformer.config.joint_attention_dim
                                    if transformer is not None else None))


def load_text_encoders(model_dir: str | os.PathLike) -> SD3TextEncoders:
  """Loads the tokenizers and text encoders of a local diffusers-format SD3 folder in float32.

  Never touches the network (`local_files_only`). T5 is optional: a folder without
  `text_encoder_3/` gets the zero T5 block, sized from `transformer/config.json`.

  Raises:
    ModelFolderError (a FileNotFoundError): the folder or a required subfolder is missing, or a
      component does not load.
  """
  model_dir = os.fspath(model_dir)
  sub = lambda name: os.path.join(model_dir, name)
  if not os.path.isdir(model_dir):
    raise ModelFolderError(f'{model_dir}: not found (expected a diffusers SD3/SD3.5 folder)')
  for name in ('tokenizer', 'text_encoder', 'tokenizer_2', 'text_encoder_2'):
    if not os.path.isdir(sub(name)):
      raise ModelFolderError(f'{model_dir} is not an SD3 model folder: no {name}/')
  has_t5 = os.path.isdir(sub('text_encoder_3'))
  if has_t5 != os.path.isdir(sub('tokenizer_3')):
    raise ModelFolderError(f'{model_dir}: text_encoder_3/ and tokenizer_3/ must come together')
  import torch
  import transformers

  def load(cls, name: str, model: bool = False):
    """`cls.from_pretrained(model_dir/name)`; a model in float32 eval mode."""
    kwargs = dict(dtype=torch.float32) if model else {}
    try:
      component = cls.from_pretrained(sub(name), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:   # what transformers raises for missing/corrupt files
      raise ModelFolderError(f'{sub(name)}: cannot load {cls.__name__} '
                             f'({type(e).__name__}: {e})') from None
    return component.eval() if model else component

  clip = lambda name: load(transformers.CLIPTextModelWithProjection, name, model=True)
  encoders = SD3TextEncoders(
      tokenizer=load(transformers.CLIPTokenizer, 'tokenizer'),
      text_encoder=clip('text_encoder'),
      tokenizer_2=load(transformers.CLIPTokenizer, 'tokenizer_2'),
      text_encoder_2=clip('text_encoder_2'))
  if has_t5:
    encoders.tokenizer_3 = load(transformers.T5TokenizerFast, 'tokenizer_3')
    encoders.text_encoder_3 = load(transformers.T5EncoderModel, 'text_encoder_3', model=True)
  else:
    transformer_config = sub(os.path.join('transformer', 'config.json'))
    if os.path.exists(transformer_config):
      try:
        with open(transformer_config) as f:
          encoders.joint_attention_dim = int(json.load(f)['joint_attention_dim'])
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f'{transformer_config}: no usable joint_attention_dim '
                               f'({type(e).__name__}: {e})') from None
  return encoders


def _as_encoders(encoders: Any) -> SD3TextEncoders:
  if isinstance(encoders, SD3TextEncoders):
    return encoders
  if isinstance(encoders, (str, os.PathLike)):
    return load_text_encoders(encoders)
  return SD3TextEncoders.from_components(encoders)


# --------------------------------------------------------------------------- encoding


def _token_ids(tokenizer, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
  """Tokenises as diffusers does (pad/truncate to max_length) and warns about truncation."""
  ids = tokenizer(prompts, padding='max_length', max_length=max_length, truncation=True,
                  add_special_tokens=True, return_tensors='pt').input_ids
  lengths = [len(x) for x in tokenizer(prompts, add_special_tokens=True).input_ids]
  truncated = sum(n > max_length for n in lengths)
  if truncated:
    # Rate-limited: a long prompt set would otherwise warn once per batch.
    logging.log_every_n_seconds(
        logging.WARNING, '%d of %d prompts in a batch truncated to %d %s tokens (longest: %d)',
        30, truncated, len(prompts), max_length, what, max(lengths))
  return ids


def _encode_batch(enc: SD3TextEncoders, prompts: list[str],
                  max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
  import torch
  with torch.inference_mode():
    clip_length = enc.tokenizer.model_max_length  # diffusers uses CLIP-L's length for both CLIPs.
    clip_embeds, pooled = [], []
    for tokenizer, encoder, what in ((enc.tokenizer, enc.text_encoder, 'CLIP-L'),
                                     (enc.tokenizer_2, enc.text_encoder_2, 'CLIP-G')):
      ids = _token_ids(tokenizer, prompts, clip_length, what)
      out = encoder(ids.to(encoder.device), output_hidden_states=True)
      clip_embeds.append(out.hidden_states[-2])  # penultimate layer: SD3's clip_skip=None.
      pooled.append(out.text_embeds)
    clip_embeds = torch.cat(clip_embeds, dim=-1)
    if enc.text_encoder_3 is not None:
      ids = _token_ids(enc.tokenizer_3, prompts, max_sequence_length, 'T5')
      t5_embeds = enc.text_encoder_3(ids.to(enc.text_encoder_3.device))[0]
    else:
      if enc.joint_attention_dim is None:
        raise ModelFolderError('the model has no T5 encoder (text_encoder_3/) and no '
                               'transformer/config.json joint_attention_dim to size its zero block')
      t5_embeds = clip_embeds.new_zeros(
          (len(prompts), max_sequence_length, enc.joint_attention_dim))
    width = t5_embeds.shape[-1]
    if clip_embeds.shape[-1] > width:
      # diffusers' F.pad with a negative pad would silently crop CLIP features; refuse instead.
      raise ModelFolderError(f'CLIP width {clip_embeds.shape[-1]} exceeds T5 width {width}: the '
                             'text encoders do not belong to one SD3 model')
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, width - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds, t5_embeds.to(clip_embeds.dtype)], dim=-2)
    pooled = torch.cat(pooled, dim=-1)
    return (prompt_embeds.to(torch.float32).cpu().numpy(),
            pooled.to(torch.float32).cpu().numpy())


def _iter_encoded(enc: SD3TextEncoders, prompts: Sequence[str], max_sequence_length: int,
                  batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for start in range(0, len(prompts), batch_size):
    yield _encode_batch(enc, list(prompts[start:start + batch_size]), max_sequence_length)


def encode_prompts(encoders: Any, prompts: Sequence[str], max_sequence_length: int, *,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Encodes prompts exactly as `StableDiffusion3Pipeline.encode_prompt` (clip_skip None).

  Args:
    encoders: an `SD3TextEncoders`, a local diffusers SD3 folder (path), a
      `StableDiffusion3Pipeline`, or its `.components` dict.
    prompts: the prompts ("" is the CFG negative).
    max_sequence_length: T5 tokens (diffusers' default is 256, the DiffusionOPD recipe's 128).
    batch_size: prompts per encoder call; results do not depend on it (inputs are padded to a
      fixed length either way).

  Returns:
    `(prompt_embeds, pooled_prompt_embeds)`, float32 numpy arrays of shapes
    [N, 77 + max_sequence_length, D] and [N, P] (SD3.5: D = 4096, P = 2048).
  """
  if isinstance(prompts, str):
    raise TypeError('prompts must be a sequence of strings, not a single string')
  if not prompts:
    raise ValueError('no prompts to encode')
  enc = _as_encoders(encoders)
  batches = list(_iter_encoded(enc, prompts, max_sequence_length, batch_size))
  return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))


# --------------------------------------------------------------------------- writing


class _PromptEmbeddingsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One task's splits as a TFDS dataset; examples are encoded lazily, batch by batch.

  Encoding inside `_generate_examples` streams the embeddings into TFDS's writer, so memory stays
  at one batch even for tens of thousands of prompts (3.4 MB each at SD3.5's shapes).
  """
  name = pe_format.DATASET_NAME
  VERSION = tfds.core.Version(pe_format.DATASET_VERSION)
  # The base class locates its checksums file through importlib_resources, which TFDS does not
  # install; this builder downloads nothing, so there is no checksums file to locate.
  code_path = None

  def __init__(self, *, task: str, splits: Mapping[str, list[PromptRecord]],
               encoders: SD3TextEncoders, max_sequence_length: int, batch_size: int,
               shapes: Mapping[str, tuple[int, ...]], info_metadata: Mapping[str, Any],
               data_dir: str):
    self._task = task
    self._splits = splits
    self._encoders = encoders
    self._max_sequence_length = max_sequence_length
    self._batch_size = batch_size
    self._shapes = shapes
    self._info_metadata = dict(info_metadata)
    super().__init__(data_dir=data_dir, file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        'prompt_embeds': tfds.features.Tensor(shape=self._shapes['prompt_embeds'],
                                              dtype=np.float32),
        'pooled_prompt_embeds': tfds.features.Tensor(
            shape=self._shapes['pooled_prompt_embeds'], dtype=np.float32),
        'prompt': tfds.features.Text(),
        'prompt_metadata': tfds.features.Text(),
        'index': tfds.features.Scalar(dtype=np.int64),
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'SD3 text conditioning for the {self._task!r} prompt set.',
        features=features,
        # Records stay in prompt-file order (record i is prompt i); shuffling is the reader's job.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._info_metadata))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split: str):
    records = self._splits[split]
    prompts = [r.prompt for r in records]
    with tqdm.tqdm(total=len(records), desc=f'{self._task}/{split}', unit='prompt') as bar:
      batches = _iter_encoded(self._encoders, prompts, self._max_sequence_length,
                              self._batch_size)
      for start, (embeds, pooled) in zip(range(0, len(records), self._batch_size), batches):
        for i in range(embeds.shape[0]):
          record = records[start + i]
          yield start + i, {'prompt_embeds': embeds[i], 'pooled_prompt_embeds': pooled[i],
                            'prompt': record.prompt, 'prompt_metadata': record.metadata_json,
                            'index': start + i}
        bar.update(embeds.shape[0])


def write_prompt_embeddings(encoders: Any,
                            prompt_files: Mapping[str, Mapping[str, str]],
                            out_dir: str | os.PathLike,
                            *,
                            max_sequence_length: int = 128,
                            batch_size: int = 8,
                            overwrite: bool = False) -> dict[str, Any]:
  """Encodes every prompt file and writes the cache atomically.

  All prompt files are read and validated before the (slow) encoders are loaded, and everything
  is written to a temporary sibling directory that is renamed to `out_dir` only on success.

  Args:
    encoders: anything `encode_prompts` accepts; a path is recorded in the metadata.
    prompt_files: {task: {split: prompt file path}}, e.g. from `parse_prompt_specs`.
    out_dir: destination directory (must not exist unless `overwrite`).
    max_sequence_length: T5 tokens.
    batch_size: prompts per encoder call.
    overwrite: replace an existing `out_dir` (only after the new cache is complete).

  Returns:
    The metadata written to `out_dir/metadata.json`.

  Raises:
    PromptSetError: a prompt file is unusable.
    OutDirExistsError (a FileExistsError): `out_dir` exists and `overwrite` is False.
    ModelFolderError: `encoders` is a path that is not a loadable SD3 folder.
    InputError: `out_dir` cannot be written.
    ConfigError: `max_sequence_length` or `batch_size` below 1.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not overwrite:
    raise OutDirExistsError(f'{out_dir} already exists (pass --overwrite to replace it)')
  for name, value in (('max_sequence_length', max_sequence_length), ('batch_size', batch_size)):
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'--{name}: must be an int >= 1, got {value!r}')
  if not prompt_files:
    raise PromptSetError('no prompt files given')
  records = {task: {split: read_prompt_file(path) for split, path in splits.items()}
             for task, splits in prompt_files.items()}
  model_dir = (os.path.abspath(os.fspath(encoders))
               if isinstance(encoders, (str, os.PathLike)) else None)
  enc = _as_encoders(encoders)

  negative_embeds, negative_pooled = encode_prompts(enc, [NEGATIVE_PROMPT], max_sequence_length)
  shapes = {'prompt_embeds': negative_embeds.shape[1:],
            'pooled_prompt_embeds': negative_pooled.shape[1:]}
  metadata = {
      'format_version': pe_format.FORMAT_VERSION,
      'model_dir': model_dir,
      'max_sequence_length': max_sequence_length,
      'clip_sequence_length': enc.tokenizer.model_max_length,
      't5': enc.text_encoder_3 is not None,
      'dtype': 'float32',
      'shapes': {k: list(v) for k, v in shapes.items()},
      'negative_prompt': NEGATIVE_PROMPT,
      'tasks': {task: {'splits': {split: {'count': len(recs),
                                          'prompt_file': os.path.abspath(prompt_files[task][split])}
                                  for split, recs in splits.items()}}
                for task, splits in records.items()},
  }

  parent = os.path.dirname(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    # Same parent directory, so the final rename is atomic on one filesystem.
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  except OSError as e:
    raise InputError(f'{out_dir}: cannot write the cache there ({e})') from None
  try:
    np.savez(os.path.join(staging, pe_format.NEGATIVE_FILENAME),
             prompt_embeds=negative_embeds[0], pooled_prompt_embeds=negative_pooled[0])
    downloads = os.path.join(staging, '.tfds_downloads')
    for task, splits in records.items():
      builder = _PromptEmbeddingsBuilder(
          task=task, splits=splits, encoders=enc, max_sequence_length=max_sequence_length,
          batch_size=batch_size, shapes=shapes,
          info_metadata={k: metadata[k] for k in ('model_dir', 'max_sequence_length', 't5')},
          data_dir=os.path.join(staging, task))
      builder.download_and_prepare(download_dir=downloads)
    shutil.rmtree(downloads, ignore_errors=True)
    # metadata.json last: its presence marks a complete cache.
    with open(os.path.join(staging, pe_format.METADATA_FILENAME), 'w') as f:
      json.dump(metadata, f, indent=2)
    _replace_dir(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return metadata


def _replace_dir(src: str, dst: str) -> None:
  """Renames `src` to `dst`, replacing an existing `dst` only once `src` is in hand."""
  if not os.path.exists(dst):
    os.rename(src, dst)
    return
  trash = tempfile.mkdtemp(prefix=f'.{os.path.basename(dst)}.old-', dir=os.path.dirname(dst))
  os.rename(dst, os.path.join(trash, 'old'))
  os.rename(src, dst)
  shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- command line

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Local diffusers-format SD3/SD3.5 folder.')
_PROMPTS = flags.DEFINE_list('prompts', None,
                             'Prompt files as task=path or task:split=path (.txt or .jsonl).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Cache directory to create.')
_MAX_SEQUENCE_LENGTH = flags.DEFINE_integer('max_sequence_length', 128,
                                            'T5 tokens (the DiffusionOPD recipe uses 128).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Prompts per encoder call.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out_dir.')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.')


def main(argv: Sequence[str]) -> None:
  with report_errors(_TRACEBACK.value):
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {argv[1:]}; every input is a --flag')
    # The encoding loop has its own per-split tqdm bar; TFDS's bars would just repeat it.
    tfds.disable_progress_bar()
    prompt_files = parse_prompt_specs(_PROMPTS.value)
    metadata = write_prompt_embeddings(
        _MODEL_DIR.value, prompt_files, _OUT_DIR.value,
        max_sequence_length=_MAX_SEQUENCE_LENGTH.value, batch_size=_BATCH_SIZE.value,
        overwrite=_OVERWRITE.value)
  counts = {f'{t}/{s}': v['count'] for t, d in metadata['tasks'].items()
            for s, v in d['splits'].items()}
  logging.info('wrote %s to %s (prompt_embeds %s)', counts, _OUT_DIR.value,
               metadata['shapes']['prompt_embeds'])


if __name__ == '__main__':
  flags.mark_flags_as_required(['model_dir', 'prompts', 'out_dir'])
  app.run(main, flags_parser=parse_absl_flags)
