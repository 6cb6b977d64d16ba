"""The detector protocol end to end: HttpDetector against the real service on 127.0.0.1.

The service runs in a thread with its replay backend; stub servers stand in for a failing (500)
and a hanging service. Every network test finishes in well under 5 s.
"""

import contextlib
import http.client
import importlib.util
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from opd_jax.errors import ConfigError, InputError
from opd_jax.eval import detector
from opd_jax.eval import detector_service as service
from opd_jax.eval.detector import DetectorServiceError, HttpDetector
from opd_jax.eval.geneval import Detections

H, W = 23, 31  # H·W = 713: the packed masks end in a partial byte


def _dets(rng, n, with_masks=True):
  x0 = rng.uniform(0, W / 2, n)
  y0 = rng.uniform(0, H / 2, n)
  boxes = np.stack([x0, y0, x0 + rng.uniform(1, W / 2, n), y0 + rng.uniform(1, H / 2, n)], 1)
  masks = rng.random((n, H, W)) < 0.4 if with_masks else None
  return Detections(boxes, rng.random(n).astype(np.float32), masks)


@pytest.fixture(scope='module')
def recorded(tmp_path_factory):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
  dets = [{'dog': _dets(rng, 3), 'cat': _dets(rng, 0)},
          {'dog': _dets(rng, 1), 'tv remote': _dets(rng, 4)}]
  path = str(tmp_path_factory.mktemp('replay') / 'dets.npz')
  detector.write_replay(path, images, dets)
  return images, dets, path


@contextlib.contextmanager
def serving(server):
  thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05},
                            daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()
    thread.join(2)


@pytest.fixture(scope='module')
def replay_url(recorded):
  server = service.make_server(service.build_backend('replay', replay=recorded[2]))
  with serving(server):
    yield server.url


def _assert_same(got, want, masks=True):
  assert list(got) == list(want)
  for cls in want:
    np.testing.assert_array_equal(got[cls].boxes, want[cls].boxes.astype(np.float32))
    np.testing.assert_array_equal(got[cls].scores, want[cls].scores)
    if masks:
      np.testing.assert_array_equal(got[cls].masks, want[cls].masks)
    else:
      assert got[cls].masks is None


def test_replay_round_trip(recorded, replay_url):
  images, dets, _ = recorded
  client = HttpDetector(replay_url, timeout_s=5, retries=0)
  assert client.health() == {'status': 'ok', 'backend': 'replay', 'protocol': 1}
  got = client.detect(images, [['dog', 'cat'], ['dog', 'tv remote']])
  for g, want in zip(got, dets):
    _assert_same(g, want)
  # One image per request, no masks, and the service leaves out scores below min_score.
  client = HttpDetector(replay_url, timeout_s=5, retries=0, min_score=0.5, masks=False,
                        batch_size=1)
  got = client.detect(images[::-1], [['tv remote'], ['cat', 'dog']])
  keep = dets[1]['tv remote'].scores >= 0.5
  assert 0 < keep.sum() < 4
  np.testing.assert_array_equal(got[0]['tv remote'].scores, dets[1]['tv remote'].scores[keep])
  assert got[0]['tv remote'].masks is None and len(got[1]['cat']) == 0


def test_service_rejections_are_immediate_one_line_errors(recorded, replay_url):
  images = recorded[0]
  # A 4xx answer is not retried: with a 30 s backoff a retry would blow the time limit.
  client = HttpDetector(replay_url, timeout_s=5, retries=3, backoff_s=30)
  start = time.monotonic()
  with pytest.raises(DetectorServiceError) as e:
    client.detect(images[:1] // 2 + 1, [['dog']])
  assert time.monotonic() - start < 2
  message = str(e.value)
  assert message.startswith(replay_url) and 'HTTP 422' in message and 'replay file' in message
  assert '\n' not in message
  with pytest.raises(DetectorServiceError, match='unicorn'):
    client.detect(images[:1], [['unicorn']])
  with pytest.raises(DetectorServiceError, match='no .horse. detections'):
    client.detect(images[:1], [['horse']])
  # Garbage (and anything that is not an npz, pickle included) is a 400 answer.
  host, port = replay_url[len('http://'):].split(':')
  conn = http.client.HTTPConnection(host, int(port), timeout=5)
  conn.request('POST', '/detect', body=b'\x80\x04garbage')
  resp = conn.getresponse()
  assert resp.status == 400 and 'npz' in json.loads(resp.read())['error']
  conn.close()
  with pytest.raises(InputError, match='uint8'):
    client.detect(images.astype(np.float32))


class _Stub(BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass


@contextlib.contextmanager
def stub_server(handler):
  server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
  server.daemon_threads = True
  server.requests = 0
  with serving(server):
    yield f'http://127.0.0.1:{server.server_address[1]}', server


def test_failing_service_bounded_retries():
  class Failing(_Stub):
    def do_POST(self):
      self.server.requests += 1
      self.rfile.read(int(self.headers['Content-Length']))
      body = b'{"error": "CUDA out of memory"}'
      self.send_response(500)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

  images = np.zeros((1, 8, 8, 3), np.uint8)
  with stub_server(Failing) as (url, server):
    start = time.monotonic()
    with pytest.raises(DetectorServiceError) as e:
      HttpDetector(url, timeout_s=2, retries=2, backoff_s=0.05).detect(images)
    assert server.requests == 3 and time.monotonic() - start < 3
  message = str(e.value)
  assert message.startswith(url) and '3 attempt' in message
  assert 'HTTP 500: CUDA out of memory' in message and '\n' not in message


def test_hanging_and_absent_service_time_out():
  release = threading.Event()

  class Hanging(_Stub):
    def do_POST(self):
      self.server.requests += 1
      release.wait(10)

  images = np.zeros((1, 8, 8, 3), np.uint8)
  with stub_server(Hanging) as (url, server):
    start = time.monotonic()
    try:
      with pytest.raises(DetectorServiceError, match='timed out') as e:
        HttpDetector(url, timeout_s=0.5, retries=1, backoff_s=0.05).detect(images)
      assert time.monotonic() - start < 3 and server.requests == 2
    finally:
      release.set()
  assert str(e.value).startswith(url) and '\n' not in str(e.value)
  # Nothing listening: connection refused, retried, then the same one-line error.
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  with pytest.raises(DetectorServiceError, match='2 attempt'):
    HttpDetector(f'http://127.0.0.1:{port}', timeout_s=1, retries=1, backoff_s=0.01).health()


def test_configuration_errors(tmp_path):
  with pytest.raises(ConfigError, match='^ftp://x: detector URL'):
    HttpDetector('ftp://x')
  with pytest.raises(ConfigError, match='^--replay'):
    service.build_backend('replay')
  with pytest.raises(ConfigError, match='^--backend'):
    service.build_backend('yolo')
  with pytest.raises(InputError, match='^--checkpoint: /no/such.pth'):
    service.build_backend('mmdet', checkpoint='/no/such.pth')
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'not a zip')
  with pytest.raises(InputError, match=f'^{bad}: not a readable npz'):
    detector.read_replay(str(bad))
  if importlib.util.find_spec('mmdet') is None:
    ckpt = tmp_path / 'm.pth'
    ckpt.write_bytes(b'')
    with pytest.raises(ConfigError, match='^--backend=mmdet: mmdet 2.x is not importable'):
      service.build_backend('mmdet', checkpoint=str(ckpt))
