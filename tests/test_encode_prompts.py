"""Tests for the SD3 text-conditioning cache: encoder parity with diffusers, writer, reader, grain.

Everything is built offline: tiny random CLIP-L-like / CLIP-G-like / T5 encoders with in-memory
tokenizers (a byte-level BPE vocabulary for CLIP, a character Unigram vocabulary for T5), put
into a real `StableDiffusion3Pipeline` (tiny transformer and VAE) and saved as a diffusers folder.
Parity is against `StableDiffusion3Pipeline.encode_prompt`, tolerance 1e-5 (same float32 torch
ops, so differences are only batch-size-dependent kernel rounding).
"""

import json
import os
import shutil
import subprocess
import sys

from absl import flags
import diffusers
import numpy as np
import pytest
import torch

from opd_jax.data import prompt_embeddings
from opd_jax.tools import encode_prompts as ep

from sd3_testing import CLIP_LEN, T5_WIDTH
from sd3_testing import tiny_pipeline as _pipeline

MAX_SEQ = 16  # T5 tokens; small to keep the tiny models fast.
ATOL = 1e-5

PROMPTS = [
    'a cat',
    '',
    'A photo of 2 cats and a dog',
    # Longer than both CLIPs' 77 tokens and T5's MAX_SEQ: exercises truncation.
    ' '.join(['a cat on a mat near 3 dogs'] * 12),
]


@pytest.fixture(scope='module')
def pipe():
  return _pipeline()


@pytest.fixture(scope='module')
def model_dir(pipe, tmp_path_factory):
  path = tmp_path_factory.mktemp('sd3') / 'tiny-sd3'
  pipe.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def prompt_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('prompts')
  geneval = [{'prompt': 'a photo of a cat', 'tag': 'single_object', 'include': [
      {'class': 'cat', 'count': 1}]}, {'prompt': 'a photo of 2 dogs', 'tag': 'counting'}]
  (root / 'geneval.jsonl').write_text(
      '\n'.join(json.dumps(r) for r in geneval) + '\n\n', encoding='utf-8')
  (root / 'ocr.txt').write_text(
      'A sign that says "OPEN"\n\n  a cat  \nno 7 dogs\n\na b c\nd e\nf\ng h\n', encoding='utf-8')
  (root / 'empty.txt').write_text('\n  \n\n', encoding='utf-8')
  return root


def _reference(pipe, prompts):
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, device='cpu', do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQ)
  return embeds.numpy(), pooled.numpy()


@pytest.mark.parametrize('source', ['pipeline', 'components', 'model_dir'])
def test_encode_prompts_matches_diffusers(pipe, model_dir, source):
  encoders = {'pipeline': pipe, 'components': pipe.components, 'model_dir': model_dir}[source]
  embeds, pooled = ep.encode_prompts(encoders, PROMPTS, MAX_SEQ, batch_size=3)
  ref_embeds, ref_pooled = _reference(pipe, PROMPTS)
  assert embeds.dtype == pooled.dtype == np.float32
  assert embeds.shape == (len(PROMPTS), CLIP_LEN + MAX_SEQ, T5_WIDTH)
  assert pooled.shape == (len(PROMPTS), 32 + 48)
  np.testing.assert_allclose(embeds, ref_embeds, atol=ATOL, rtol=0)
  np.testing.assert_allclose(pooled, ref_pooled, atol=ATOL, rtol=0)
  # The CLIP block is zero-padded from 80 to T5's 96 features.
  assert not embeds[:, :CLIP_LEN, 80:].any()


def test_encode_prompts_without_t5_matches_diffusers(pipe, model_dir, tmp_path):
  no_t5 = diffusers.StableDiffusion3Pipeline(**{
      **pipe.components, 'text_encoder_3': None, 'tokenizer_3': None})
  embeds, pooled = ep.encode_prompts(no_t5, PROMPTS, MAX_SEQ)
  ref_embeds, ref_pooled = _reference(no_t5, PROMPTS)
  np.testing.assert_allclose(embeds, ref_embeds, atol=ATOL, rtol=0)
  np.testing.assert_allclose(pooled, ref_pooled, atol=ATOL, rtol=0)
  assert not embeds[:, CLIP_LEN:].any()  # The T5 block is zeros of joint_attention_dim width.
  # A folder without text_encoder_3/ sizes the zero block from transformer/config.json.
  folder = tmp_path / 'no-t5'
  shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns('*_3'))
  from_dir, _ = ep.encode_prompts(folder, PROMPTS[:2], MAX_SEQ)
  np.testing.assert_allclose(from_dir, ref_embeds[:2], atol=ATOL, rtol=0)


def test_read_prompt_file(prompt_files, tmp_path):
  ocr = ep.read_prompt_file(prompt_files / 'ocr.txt')
  assert [r.prompt for r in ocr][:3] == ['A sign that says "OPEN"', 'a cat', 'no 7 dogs']
  geneval = ep.read_prompt_file(prompt_files / 'geneval.jsonl')
  assert [r.prompt for r in geneval] == ['a photo of a cat', 'a photo of 2 dogs']
  assert json.loads(geneval[0].metadata_json)['include'] == [{'class': 'cat', 'count': 1}]
  with pytest.raises(ep.PromptSetError, match='no prompts'):
    ep.read_prompt_file(prompt_files / 'empty.txt')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
  with pytest.raises(ep.PromptSetError, match=r'bad.jsonl:2: .*"prompt"'):
    ep.read_prompt_file(bad)
  with pytest.raises(ep.PromptSetError, match='unknown prompt file type'):
    ep.read_prompt_file(tmp_path / 'prompts.csv')
  assert ep.parse_prompt_specs(['geneval=a.jsonl', 'geneval:test=b.jsonl', 'ocr=c.txt']) == {
      'geneval': {'train': 'a.jsonl', 'test': 'b.jsonl'}, 'ocr': {'train': 'c.txt'}}
  with pytest.raises(ep.PromptSetError, match='twice'):
    ep.parse_prompt_specs(['ocr=a.txt', 'ocr:train=b.txt'])


@pytest.fixture(scope='module')
def cache_dir(model_dir, prompt_files, tmp_path_factory):
  """Runs the command's main() in-process (absl flags parsed from a real argv)."""
  out = tmp_path_factory.mktemp('cache') / 'prompt_cache'
  argv = ['encode_prompts', f'--model_dir={model_dir}', f'--out_dir={out}',
          f'--prompts=geneval={prompt_files / "geneval.jsonl"},'
          f'geneval:test={prompt_files / "geneval.jsonl"},ocr={prompt_files / "ocr.txt"}',
          f'--max_sequence_length={MAX_SEQ}', '--batch_size=3']
  flags.FLAGS(argv)
  try:
    ep.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  return out


def test_cli_writes_readable_cache(cache_dir, pipe, prompt_files):
  assert sorted(os.listdir(cache_dir)) == ['geneval', 'metadata.json', 'negative.npz', 'ocr']
  meta = prompt_embeddings.load_metadata(cache_dir)
  assert meta['max_sequence_length'] == MAX_SEQ and meta['t5']
  assert meta['shapes'] == {'prompt_embeds': [CLIP_LEN + MAX_SEQ, T5_WIDTH],
                            'pooled_prompt_embeds': [80]}
  assert {t: {s: v['count'] for s, v in d['splits'].items()} for t, d in meta['tasks'].items()
          } == {'geneval': {'train': 2, 'test': 2}, 'ocr': {'train': 7}}

  ocr = prompt_embeddings.load_prompt_embeddings(cache_dir, 'ocr')
  assert len(ocr) == 7
  prompts = [r.prompt for r in ep.read_prompt_file(prompt_files / 'ocr.txt')]
  ref_embeds, ref_pooled = _reference(pipe, prompts)
  for i in range(len(ocr)):
    example = ocr[i]
    assert example['index'] == i
    assert prompt_embeddings.decode_text(example['prompt']) == prompts[i]
    assert example['prompt_embeds'].dtype == np.float32
    np.testing.assert_allclose(example['prompt_embeds'], ref_embeds[i], atol=ATOL, rtol=0)
    np.testing.assert_allclose(example['pooled_prompt_embeds'], ref_pooled[i], atol=ATOL, rtol=0)

  geneval = prompt_embeddings.load_prompt_embeddings(cache_dir, 'geneval', split='test')
  record = json.loads(prompt_embeddings.decode_text(geneval[0]['prompt_metadata']))
  assert record['tag'] == 'single_object'
  with pytest.raises(KeyError, match='available'):
    prompt_embeddings.load_prompt_embeddings(cache_dir, 'pickscore')


def test_negative_embedding_is_saved(cache_dir, pipe):
  negative = prompt_embeddings.load_negative(cache_dir)
  with torch.no_grad():
    _, neg_embeds, _, neg_pooled = pipe.encode_prompt(
        'a cat', None, None, device='cpu', max_sequence_length=MAX_SEQ)
  np.testing.assert_allclose(negative['prompt_embeds'], neg_embeds[0].numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(negative['pooled_prompt_embeds'], neg_pooled[0].numpy(), atol=ATOL,
                             rtol=0)


def test_empty_prompt_file_fails_cleanly(model_dir, prompt_files, tmp_path):
  out = tmp_path / 'cache'
  # The real command line: non-zero exit, a clear message, nothing left behind. The prompt files
  # are checked before any encoder is loaded, so this is quick.
  result = subprocess.run(
      [sys.executable, '-m', 'opd_jax.tools.encode_prompts', f'--model_dir={model_dir}',
       f'--prompts=ocr={prompt_files / "ocr.txt"},pickscore={prompt_files / "empty.txt"}',
       f'--out_dir={out}'], capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'empty.txt: no prompts' in result.stderr
  assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_nothing(model_dir, prompt_files, tmp_path, monkeypatch):
  # Call 1 encodes the negative, call 2 the first task (written to staging), call 3 crashes.
  real = ep._iter_encoded
  calls = []
  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) > 2:
      raise RuntimeError('encoder crashed')
    return real(*args, **kwargs)
  monkeypatch.setattr(ep, '_iter_encoded', flaky)
  with pytest.raises(RuntimeError, match='encoder crashed'):
    ep.write_prompt_embeddings(model_dir, {'geneval': {'train': prompt_files / 'geneval.jsonl'},
                                           'ocr': {'train': prompt_files / 'ocr.txt'}},
                               tmp_path / 'cache', max_sequence_length=MAX_SEQ)
  assert os.listdir(tmp_path) == []


def _indices(iterator, n):
  return [next(iterator)['index'].tolist() for _ in range(n)]


def test_batch_iterator_deterministic_and_resumable(cache_dir):
  make = lambda seed: prompt_embeddings.make_batch_iterator(
      cache_dir, 'ocr', batch_size=2, seed=seed, num_threads=1)
  a, b = make(7), make(7)
  first = _indices(a, 8)  # 16 prompts: more than two epochs of 7.
  assert first == _indices(b, 8)
  assert first != _indices(make(8), 8)
  flat = sum(first, [])
  assert sorted(flat[:7]) == list(range(7))  # Each epoch is a permutation ...
  assert flat[:7] != flat[7:14]  # ... reshuffled every epoch.

  batch = next(make(7))
  assert batch['prompt_embeds'].shape == (2, CLIP_LEN + MAX_SEQ, T5_WIDTH)
  assert batch['pooled_prompt_embeds'].shape == (2, 80)

  it = make(7)
  _indices(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # Survives a JSON checkpoint round trip.
  expected = _indices(it, 4)
  resumed = make(7)
  resumed.set_state(state)
  assert _indices(resumed, 4) == expected == first[3:7]


def test_batch_iterator_shards_are_disjoint(cache_dir):
  shards = []
  for index in range(3):
    it = prompt_embeddings.make_batch_iterator(
        cache_dir, 'ocr', batch_size=2, seed=0, shard_index=index, shard_count=3,
        num_epochs=1, drop_remainder=False, num_threads=1)
    shards.append(sorted(i for batch in it for i in batch['index'].tolist()))
  assert sorted(sum(shards, [])) == list(range(7))
  assert [len(s) for s in shards] == [3, 2, 2]
  with pytest.raises(ValueError, match='shard_index'):
    prompt_embeddings.make_batch_iterator(cache_dir, 'ocr', batch_size=2, seed=0, shard_index=3,
                                          shard_count=3)
