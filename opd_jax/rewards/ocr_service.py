"""A local HTTP service that reads text in images, for `opd_jax.rewards.ocr.HttpOCRBackend`.

The paper scores OCR with PaddleOCR 2.9.1 (PaddlePaddle 2.6.2), which does not install beside this
project's pinned packages; this service runs it in its own virtual environment and answers the
reward over loopback. It serves any backend of `opd_jax.rewards.ocr` (`--backend=rapidocr` needs
nothing beyond requirements.txt), needs only numpy, Pillow and absl-py, and imports no jax.

Protocol (JSON both ways; images are lossless PNG, never pickle):
  POST /ocr     {"images": [base64 PNG, ...]}  (RGB, all one size)
           200  {"texts": [reading, ...]}         one reading per image, in order
           400  {"error": "..."}                   malformed request (not retried by the client)
           500  {"error": "..."}                   the engine failed (retried by the client)
  GET /health   {"ok": true, "backend": name}
Requests are handled one at a time (one engine, no locking), bodies above 512 MiB are refused.

Paper-exact PaddleOCR in a separate venv (PaddleOCR fetches its lang="en" models into
~/.paddleocr on first use, so run it once where the network reaches PaddlePaddle's servers or
copy that folder over; the GPU build is paddlepaddle-gpu==2.6.2):
  python3.11 -m venv ~/venvs/paddleocr
  ~/venvs/paddleocr/bin/pip install paddlepaddle==2.6.2 paddleocr==2.9.1 absl-py pillow
  PYTHONPATH=/path/to/this/repo ~/venvs/paddleocr/bin/python -m opd_jax.rewards.ocr_service \
      --backend=paddleocr --port=18090 [--use_gpu]
then score with `OCRScorer(HttpOCRBackend('http://127.0.0.1:18090/ocr'))`.
With the in-wheel models instead: `python -m opd_jax.rewards.ocr_service --backend=rapidocr`.
"""

from __future__ import annotations

import http.server
import json
from typing import Sequence

from opd_jax.errors import UserError, one_line
from opd_jax.rewards import ocr

DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 18090
MAX_BODY_BYTES = 512 << 20


class OCRServer(http.server.HTTPServer):
  """An HTTPServer holding the backend its handler calls."""

  def __init__(self, address: tuple[str, int], backend: ocr.OCRBackend):
    self.backend = backend
    super().__init__(address, _Handler)

  def handle_error(self, request, client_address) -> None:
    """A client that went away (e.g. after its timeout) is not worth a traceback."""


class _Handler(http.server.BaseHTTPRequestHandler):
  server: OCRServer
  timeout = 300  # seconds a client may stall mid-request before its connection is dropped

  def do_GET(self) -> None:  # noqa: N802 — http.server's naming
    if self.path != '/health':
      return self._send(404, {'error': f'no such path {self.path}; use POST /ocr, GET /health'})
    self._send(200, {'ok': True, 'backend': getattr(self.server.backend, 'name', 'custom')})

  def do_POST(self) -> None:  # noqa: N802
    if self.path != '/ocr':
      return self._send(404, {'error': f'no such path {self.path}; use POST /ocr'})
    try:
      length = int(self.headers.get('Content-Length', ''))
    except ValueError:
      return self._send(411, {'error': 'Content-Length required'})
    if not 0 < length <= MAX_BODY_BYTES:
      return self._send(413, {'error': f'body of {length} bytes (limit {MAX_BODY_BYTES})'})
    try:
      images = ocr.decode_request(self.rfile.read(length))
    except ValueError as e:
      return self._send(400, {'error': one_line(str(e))})
    try:
      texts = self.server.backend(images)
    except Exception as e:  # noqa: BLE001 — any engine failure is reported to the client
      return self._send(500, {'error': one_line(f'{type(e).__name__}: {e}')})
    self._send(200, {'texts': list(texts)})

  def _send(self, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format: str, *args) -> None:  # noqa: A002 — http.server's signature
    """Quiet: a reward service answers thousands of requests."""


def make_server(backend: ocr.OCRBackend, host: str = DEFAULT_HOST,
                port: int = DEFAULT_PORT) -> OCRServer:
  """A bound server (port 0: any free port, see `server.server_address`); call serve_forever.

  Raises:
    UserError: the address cannot be bound.
  """
  try:
    return OCRServer((host, port), backend)
  except OSError as e:
    raise ocr.OCRBackendError(f'--host/--port {host}:{port}: cannot listen ({e.strerror or e})'
                              ) from None


def build_backend(name: str, use_gpu: bool = False) -> ocr.OCRBackend:
  """The named in-process backend, its engine already built."""
  if name == 'rapidocr':
    backend = ocr.RapidOCRBackend()
  elif name == 'paddleocr':
    backend = ocr.PaddleOCRBackend(use_gpu=use_gpu)
  else:
    raise UserError(f'--backend={name}: expected rapidocr or paddleocr')
  backend.load()
  return backend


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from opd_jax.errors import report_errors
  del argv
  with report_errors(flags.FLAGS.traceback):
    backend = build_backend(flags.FLAGS.backend, flags.FLAGS.use_gpu)
    server = make_server(backend, flags.FLAGS.host, flags.FLAGS.port)
    host, port = server.server_address[:2]
    print(f'OCR service ({backend.name}) on http://{host}:{port}/ocr', flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()


if __name__ == '__main__':
  from absl import app, flags
  from opd_jax.errors import parse_absl_flags
  flags.DEFINE_enum('backend', 'rapidocr', ['rapidocr', 'paddleocr'], 'OCR engine.')
  flags.DEFINE_string('host', DEFAULT_HOST, 'Address to listen on (keep it loopback).')
  flags.DEFINE_integer('port', DEFAULT_PORT, 'Port to listen on (0: any free port).')
  flags.DEFINE_bool('use_gpu', False, 'PaddleOCR on the GPU (paddleocr backend only).')
  flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.')
  app.run(main, flags_parser=parse_absl_flags)
