"""Tests of the OCR reward: Flow-GRPO's formula, the real rapidocr engine, the HTTP service."""

import os
import select
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from opd_jax.errors import InputError
from opd_jax.rewards import ocr
from opd_jax.rewards import ocr_service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 512


def _sign(text: str) -> np.ndarray:
  """uint8 [512, 512, 3]: large black `text` on white."""
  image = Image.new('RGB', (SIZE, SIZE), 'white')
  ImageDraw.Draw(image).text((40, 200), text, fill='black', font=ImageFont.load_default(size=72))
  return np.asarray(image)


@pytest.fixture(scope='module')
def rapid():
  backend = ocr.RapidOCRBackend()
  backend.load()
  return backend


@pytest.fixture(scope='module')
def hello():
  return _sign('HELLO 42')


# --------------------------------------------------------------------------- formula


@pytest.mark.parametrize('reading, target, expected', [
    ('WELCOMEHOMEfriends', 'Welcome Home', 1.0),    # target inside the reading: distance 0
    ('h e l l o', 'HELLO', 1.0),                    # spaces removed, lower-cased
    ('helo', 'hello', 0.8),                         # one deletion out of 5 characters
    ('hello', 'he llo!', 1 - 1 / 6),                # normalised target 'hello!' has 6 characters
    ('', 'hello', 0.0),                             # nothing read
    ('zzzzzzzzzzzzzzzzzzzz', 'ab', 0.0),            # distance 20 > len 2: clamped, not negative
])
def test_score_formula(reading, target, expected):
  assert ocr.ocr_score(reading, target) == pytest.approx(expected)


def test_normalisation_removes_only_plain_spaces():
  assert ocr.normalize_text('A\tB C\nD') == 'a\tbc\nd'
  assert ocr.ocr_score('a\tb', 'ab') == pytest.approx(0.5)


def test_levenshtein():
  assert ocr.levenshtein('kitten', 'sitting') == 3
  assert ocr.levenshtein('sitting', 'kitten') == 3
  assert ocr.levenshtein('', 'abc') == 3
  assert ocr.levenshtein('abc', 'abc') == 0
  assert ocr.levenshtein('flaw', 'lawn') == 2


def test_target_is_first_quoted_span():
  assert ocr.ocr_target('a sign "first" and "second"') == 'first'
  assert ocr.ocr_target('a sign that says "open end') == 'open end'   # upstream split('"')[1]
  with pytest.raises(ValueError, match='no double-quoted target'):
    ocr.ocr_target("a sign that says 'single quotes'")
  for empty in ('a sign ""', 'a sign "  " here'):
    with pytest.raises(ValueError, match='empty'):
      ocr.ocr_target(empty)


def test_boxes_joined_in_order_without_zero_confidence():
  assert ocr.join_boxes([('Hello', 0.9), ('??', 0.0), ('World', 0.6)]) == 'HelloWorld'
  assert ocr.join_boxes([]) == ''


def test_to_uint8_rounds_like_upstream():
  images = np.array([0.0, 1.0, 127.5 / 255, 1.2, -0.1, 0.3], np.float32).reshape(1, 1, 2, 3)
  np.testing.assert_array_equal(ocr.to_uint8(images).ravel(), [0, 255, 128, 255, 0, 76])
  assert ocr.to_uint8(np.zeros((1, 2, 2, 3), np.uint8)).dtype == np.uint8
  with pytest.raises(InputError, match=r'\[B, H, W, 3\]'):
    ocr.to_uint8(np.zeros((2, 2, 3), np.float32))
  with pytest.raises(InputError, match='NaN'):
    ocr.to_uint8(np.full((1, 2, 2, 3), np.nan, np.float32))


def test_scorer_with_a_given_backend():
  calls = []

  def backend(images):
    calls.append(images)
    return ['Hello 42', 'hallo']

  images = np.full((2, 8, 8, 3), 0.5, np.float32)
  scorer = ocr.OCRScorer(backend)
  rewards = scorer(images, ['a sign "hello42"', b'a sign "hello"'])
  assert rewards.dtype == np.float32 and rewards.shape == (2,)
  np.testing.assert_allclose(rewards, [1.0, 1 - 1 / 5], rtol=1e-6)
  assert calls[0].dtype == np.uint8 and calls[0].shape == (2, 8, 8, 3)
  with pytest.raises(InputError, match=r'^OCR reward: prompts\[1\] .*no double-quoted'):
    scorer(images, ['a "b"', 'no quotes'])
  assert len(calls) == 1  # prompts are checked before the OCR runs
  with pytest.raises(InputError, match='2 images but 1 prompts'):
    scorer(images, ['a "b"'])
  with pytest.raises(ocr.OCRBackendError, match='instead of 2 strings'):
    ocr.OCRScorer(lambda images: ['only one'])(images, ['a "b"', 'a "c"'])


def test_paddleocr_backend_reads_paddleocr_2x_results(monkeypatch):
  """Upstream's call and result layout, with a stand-in module for paddleocr."""
  made = {}

  class FakePaddleOCR:
    def __init__(self, **kwargs):
      made.update(kwargs)

    def ocr(self, image, cls):
      assert cls is False and image.dtype == np.uint8
      if image.mean() > 250:
        return [None]  # PaddleOCR 2.x: a page without text
      return [[[[[0, 0], [1, 0], [1, 1], [0, 1]], ('Hello', 0.93)],
               [[[0, 2], [1, 2], [1, 3], [0, 3]], ('World', 0.71)]]]

  monkeypatch.setitem(sys.modules, 'paddleocr', types.SimpleNamespace(PaddleOCR=FakePaddleOCR))
  images = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
  assert ocr.PaddleOCRBackend()(images) == ['HelloWorld', '']
  assert made == {'use_angle_cls': False, 'lang': 'en', 'use_gpu': False, 'show_log': False}


def test_missing_engine_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'rapidocr_onnxruntime', None)
  with pytest.raises(ocr.OCRBackendError, match='rapidocr-onnxruntime cannot be imported.*libgl1'):
    ocr.RapidOCRBackend()(np.zeros((1, 4, 4, 3), np.uint8))


# --------------------------------------------------------------------------- the real engine


def test_rapidocr_reads_a_rendered_sign(rapid, hello):
  blank = np.full_like(hello, 255)
  images = np.stack([hello, hello, blank]).astype(np.float32) / 255.0
  prompts = ['a sign that says "hello 42"', 'a sign that says "Hello 43"', 'a sign "hello"']
  rewards = ocr.OCRScorer(rapid)(images, prompts)
  np.testing.assert_allclose(rewards, [1.0, 1 - 1 / 7, 0.0], rtol=1e-6)


# --------------------------------------------------------------------------- HTTP service


class _Service:
  """`ocr_service.make_server` on a free loopback port, served from a thread."""

  def __init__(self, backend):
    self.server = ocr_service.make_server(backend, '127.0.0.1', 0)
    self.url = 'http://127.0.0.1:%d/ocr' % self.server.server_address[1]
    self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


def test_service_round_trip_is_lossless_and_chunked():
  seen = []

  def backend(images):
    seen.append(images)
    return [f'image {int(image[0, 0, 0])}' for image in images]

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
  with _Service(backend) as service:
    client = ocr.HttpOCRBackend(service.url, timeout_s=5, max_images_per_request=2)
    assert client(images) == [f'image {v}' for v in images[:, 0, 0, 0]]
    health = urllib.request.urlopen(service.url.replace('/ocr', '/health'), timeout=5).read()
  assert b'"ok": true' in health
  assert [len(batch) for batch in seen] == [2, 1]
  np.testing.assert_array_equal(np.concatenate(seen), images)


def test_service_with_rapidocr(rapid, hello):
  with _Service(rapid) as service:
    scorer = ocr.OCRScorer(ocr.HttpOCRBackend(service.url, timeout_s=10))
    np.testing.assert_allclose(scorer(hello[None], ['a sign that says "hello 42"']), [1.0])


def test_service_error_is_retried_then_reported():
  calls = []

  def broken(images):
    calls.append(1)
    raise RuntimeError('engine exploded')

  with _Service(broken) as service:
    client = ocr.HttpOCRBackend(service.url, timeout_s=5, max_attempts=3, backoff_s=0.01)
    with pytest.raises(ocr.OCRBackendError,
                       match=r'failed after 3 attempt\(s\), last: HTTP 500: RuntimeError: engine'):
      client(np.zeros((1, 4, 4, 3), np.uint8))
    assert len(calls) == 3
    client = ocr.HttpOCRBackend(service.url.replace('/ocr', '/nope'), timeout_s=5)
    with pytest.raises(ocr.OCRBackendError, match=r'after 1 attempt\(s\), last: HTTP 404'):
      client(np.zeros((1, 4, 4, 3), np.uint8))   # a client error is not retried


def test_hanging_service_times_out():
  release = threading.Event()

  def hanging(images):
    release.wait(10)
    return ['late'] * len(images)

  with _Service(hanging) as service:
    try:
      client = ocr.HttpOCRBackend(service.url, timeout_s=0.3, max_attempts=2, backoff_s=0)
      start = time.monotonic()
      with pytest.raises(ocr.OCRBackendError, match=r'failed after 2 attempt\(s\).*timed out'):
        client(np.zeros((1, 4, 4, 3), np.uint8))
      assert time.monotonic() - start < 3
    finally:
      release.set()


def test_no_service_is_reported_not_scored_zero():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  client = ocr.HttpOCRBackend(f'http://127.0.0.1:{port}/ocr', timeout_s=1, max_attempts=2,
                              backoff_s=0)
  with pytest.raises(ocr.OCRBackendError, match=rf'^http://127.0.0.1:{port}/ocr: .*refused'):
    ocr.OCRScorer(client)(np.zeros((1, 4, 4, 3), np.uint8), ['a "b"'])


def test_request_decoding_rejects_bad_payloads():
  with pytest.raises(ValueError, match='not JSON'):
    ocr.decode_request(b'\x80\x04pickle')
  with pytest.raises(ValueError, match='non-empty "images"'):
    ocr.decode_request(b'{"images": []}')
  with pytest.raises(ValueError, match=r'images\[0\]: not a base64 PNG'):
    ocr.decode_request(b'{"images": ["bm90IGFuIGltYWdl"]}')
  with pytest.raises(ValueError, match='list of 2 strings'):
    ocr.decode_response(b'{"texts": ["a"]}', 2)


def test_service_command(tmp_path):
  """`python -m opd_jax.rewards.ocr_service` serves rapidocr; a busy port is one error line."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, '-m', 'opd_jax.rewards.ocr_service', '--port=0'],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    ready, _, _ = select.select([proc.stdout], [], [], 60)   # never hang the suite on a stuck start
    line = proc.stdout.readline() if ready else ''
    assert line.startswith('OCR service (rapidocr) on http://127.0.0.1:'), proc.stderr.read()
    url = line.split()[-1]
    readings = ocr.HttpOCRBackend(url, timeout_s=10)(np.full((1, 64, 64, 3), 255, np.uint8))
    assert readings == ['']
    port = url.split(':')[-1].split('/')[0]
    busy = subprocess.run([sys.executable, '-m', 'opd_jax.rewards.ocr_service', f'--port={port}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f'error: --host/--port 127.0.0.1:{port}: cannot listen (Address already in use)']
  finally:
    proc.terminate()
    proc.wait(10)
