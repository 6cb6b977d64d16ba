"""The detector service: an HTTP server answering `opd_jax.eval.detector` requests.

    python -m opd_jax.eval.detector_service --backend=mmdet --checkpoint=PATH [--port=8085]
    python -m opd_jax.eval.detector_service --backend=replay --replay=detections.npz

A `ThreadingHTTPServer` on --host (default 127.0.0.1: loopback only, the service has no
authentication) decodes each request (protocol in `opd_jax.eval.detector`), runs the backend
(one request at a time: a GPU model is not thread-safe), and encodes the answer. No pickle in
either direction.

Backends:
  mmdet   GenEval's detector: Mask2Former Swin-S trained on COCO instance segmentation, run with
          mmdetection 2.x's `init_detector` / `inference_detector` (the API GenEval and
          Flow-GRPO's reward server use). mmcv-full has no wheels in this project's environment,
          so this backend runs only where the user installs it (below); the code follows the
          mmdet 2.x API but is not exercised by the tests here. Result per image: a tuple
          (bbox_results, mask_results), 80 arrays [n, 5] (x0, y0, x1, y1, score) and 80 lists
          of bool [H, W] masks, in COCO label order = geneval.COCO_CLASSES.
          Images go to the model as BGR arrays (--channel_order=bgr, default), as mmdet reads
          GenEval's PNG files; Flow-GRPO's reward server passes RGB arrays (and JPEG-q75
          images) — --channel_order=rgb reproduces its channel order.
  replay  Serves detections recorded in a replay file (`detector.write_replay`), looked up by
          each image's content digest: re-scoring without a detector, and tests. An image or
          class missing from the file is a 422 answer, never an empty detection.

Installing the mmdet backend (GenEval's environment, djghosh13/geneval environment.yml and
README: Python 3.9, torch 1.12.1 + CUDA 11.3, mmcv-full 1.7.1, mmdet 2.27.0):

    conda create -n geneval-det python=3.9 -y && conda activate geneval-det
    pip install torch==1.12.1+cu113 torchvision==0.13.1+cu113 \\
        --extra-index-url https://download.pytorch.org/whl/cu113
    pip install -U openmim==0.3.7
    mim install mmcv-full==1.7.1   # or: pip install mmcv-full==1.7.1 -f \\
    #   https://download.openmmlab.com/mmcv/dist/cu113/torch1.12/index.html
    mim install mmdet==2.27.0
    pip install "numpy<2" absl-py pillow
    M2F=mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco
    mkdir -p ~/geneval-det
    wget -O ~/geneval-det/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth \\
        https://download.openmmlab.com/mmdetection/v3.0/mask2former/$M2F/${M2F}_20220504_001756-c9d0c4f2.pth

That is the checkpoint GenEval's `evaluation/download_models.sh` fetches (saved under the v2
config's name); Flow-GRPO's reward server uses the mmdet v2.0 release of the same model,
`v2.0/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco/
mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth` on the same host.
The config is mmdet's `configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py`;
without --config it is looked up inside the installed mmdet (`mmdet/.mim/configs/…` for a mim or
pip install, `<checkout>/configs/…` for an editable one). Then start the service with this
repository on the path (its service side needs only numpy, Pillow and absl-py):

    PYTHONPATH=/path/to/opd_jax python -m opd_jax.eval.detector_service --backend=mmdet \\
        --checkpoint=~/geneval-det/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth \\
        --device=cuda:0 --port=8085

and point the client at it: `HttpDetector('http://127.0.0.1:8085')` (an SSH tunnel,
`ssh -L 8085:127.0.0.1:8085 gpu-host`, when the service runs on another machine).
This module must stay importable on Python 3.9 (GenEval's environment).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Protocol, Sequence, Tuple

import numpy as np

from opd_jax.errors import ConfigError, InputError, one_line
from opd_jax.eval import detector as proto
from opd_jax.eval.geneval import COCO_CLASSES, Detections

MMDET_CONFIG_NAME = 'mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py'
MAX_BODY_BYTES = 1 << 30

log = logging.getLogger(__name__)


class Backend(Protocol):
  name: str

  def detect(self, images: List[np.ndarray], class_names: List[List[str]],
             masks: bool) -> List[Dict[str, Detections]]:
    """Per image (uint8 [H, W, 3] RGB), class → detections for each of its class names."""


class RequestRejected(Exception):
  """A well-formed request this backend cannot serve (answered 422)."""


class ReplayBackend:
  """Serves the detections of a replay file, keyed by image content."""
  name = 'replay'

  def __init__(self, path: str):
    self.path = path
    self._table = proto.read_replay(path)

  def detect(self, images, class_names, masks):
    out = []
    for image, names in zip(images, class_names):
      key = proto.image_digest(image)
      if key not in self._table:
        raise RequestRejected(f'image {key[:16]}… ({image.shape[0]}x{image.shape[1]}) is not in '
                              f'the replay file {self.path}')
      dets = self._table[key][1]
      per_image = {}
      for name in names:
        if name not in dets:
          raise RequestRejected(f'the replay file {self.path} has no {name!r} detections for '
                                f'image {key[:16]}…')
        if masks and dets[name].masks is None:
          raise RequestRejected(f'the replay file {self.path} holds no masks; ask without masks')
        per_image[name] = dets[name]
      out.append(per_image)
    return out


def default_mmdet_config() -> str:
  """GenEval's Mask2Former config inside the installed mmdet package (mim or editable)."""
  import mmdet  # pylint: disable=import-outside-toplevel
  base = os.path.dirname(mmdet.__file__)
  candidates = [os.path.join(base, '.mim', 'configs', 'mask2former', MMDET_CONFIG_NAME),
                os.path.join(base, '..', 'configs', 'mask2former', MMDET_CONFIG_NAME)]
  for path in candidates:
    if os.path.isfile(path):
      return os.path.normpath(path)
  raise ConfigError(f'--config: {MMDET_CONFIG_NAME} is not in the installed mmdet '
                    f'({" or ".join(candidates)}); pass --config=PATH')


class MmdetBackend:
  """Mask2Former through mmdetection 2.x (see the module docstring for installing it)."""
  name = 'mmdet'

  def __init__(self, checkpoint: str, config: str = '', device: str = 'cuda:0',
               channel_order: str = 'bgr'):
    if not checkpoint or not os.path.isfile(checkpoint):
      raise InputError(f'--checkpoint: {checkpoint or "(empty)"}: no such file (the '
                       'Mask2Former .pth GenEval downloads; the opd_jax.eval.detector_service '
                       'docstring says where from)')
    if config and not os.path.isfile(config):
      raise InputError(f'--config: {config}: no such file')
    if channel_order not in ('bgr', 'rgb'):
      raise ConfigError(f'--channel_order: {channel_order!r} is not bgr or rgb')
    try:
      # pylint: disable-next=import-outside-toplevel
      from mmdet.apis import inference_detector, init_detector
    except ImportError as e:
      raise ConfigError(f'--backend=mmdet: mmdet 2.x is not importable here ({one_line(str(e))}); '
                        'install mmcv-full 1.7.1 and mmdet 2.27.0 as the '
                        'opd_jax.eval.detector_service docstring says') from None
    self._infer = inference_detector
    self._bgr = channel_order == 'bgr'
    config = config or default_mmdet_config()
    log.info('loading %s with %s on %s', config, checkpoint, device)
    self._model = init_detector(config, checkpoint, device=device)

  def detect(self, images, class_names, masks):
    inputs = [np.ascontiguousarray(im[..., ::-1]) if self._bgr else im for im in images]
    results = self._infer(self._model, inputs)  # a list in, a list of per-image results out
    out = []
    for result, image, names in zip(results, images, class_names):
      bbox = result[0] if isinstance(result, tuple) else result
      segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
      if len(bbox) != len(COCO_CLASSES):
        raise RuntimeError(f'the model gives {len(bbox)} classes, not the 80 COCO classes')
      if masks and segm is None:
        raise RuntimeError('the model gives no masks: use an instance segmentation config')
      h, w = image.shape[:2]
      per_image = {}
      for name in names:
        k = COCO_CLASSES.index(name)
        rows = np.asarray(bbox[k], np.float32).reshape(-1, 5)
        m = None
        if masks:
          m = (np.stack([np.asarray(x, bool) for x in segm[k]]) if len(segm[k])
               else np.zeros((0, h, w), bool))
        per_image[name] = Detections(rows[:, :4], rows[:, 4], m)
      out.append(per_image)
    return out


def build_backend(name: str, *, checkpoint: str = '', config: str = '', device: str = 'cuda:0',
                  channel_order: str = 'bgr', replay: str = '') -> Backend:
  if name == 'replay':
    if not replay:
      raise ConfigError('--replay: the replay backend needs --replay=PATH')
    return ReplayBackend(replay)
  if name == 'mmdet':
    return MmdetBackend(checkpoint, config, device, channel_order)
  raise ConfigError(f'--backend: {name!r} is not one of mmdet, replay')


class DetectorService(ThreadingHTTPServer):
  """The HTTP server; `backend` runs one request at a time."""
  daemon_threads = True

  def __init__(self, address: Tuple[str, int], backend: Backend,
               max_body_bytes: int = MAX_BODY_BYTES):
    super().__init__(address, _Handler)
    self.backend = backend
    self.max_body_bytes = max_body_bytes
    self.lock = threading.Lock()

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f'http://{host}:{port}'

  def run_request(self, body: bytes) -> bytes:
    images, names, min_score, masks = proto.decode_request(body)
    if names is None:
      names = [list(COCO_CLASSES)] * len(images)
    for per_image in names:
      unknown = sorted(set(per_image) - set(COCO_CLASSES))
      if unknown:
        raise RequestRejected(f'unknown class names {unknown}; the detector knows the 80 COCO '
                              'classes of opd_jax.eval.geneval.COCO_CLASSES')
    with self.lock:
      dets = self.backend.detect(images, names, masks)
    dets = [proto.filter_detections(d, min_score, masks) for d in dets]
    return proto.encode_detections(dets, [im.shape[:2] for im in images], masks)


class _Handler(BaseHTTPRequestHandler):
  server: DetectorService

  def do_GET(self):  # pylint: disable=invalid-name
    if self.path.rstrip('/').endswith(proto.HEALTH_PATH):
      self._send_json(200, {'status': 'ok', 'backend': self.server.backend.name,
                            'protocol': proto.PROTOCOL_VERSION})
    else:
      self._send_json(404, {'error': f'no such path {self.path}; use {proto.HEALTH_PATH}'})

  def do_POST(self):  # pylint: disable=invalid-name
    if not self.path.rstrip('/').endswith(proto.DETECT_PATH):
      self._send_json(404, {'error': f'no such path {self.path}; use {proto.DETECT_PATH}'})
      return
    try:
      length = int(self.headers.get('Content-Length', ''))
    except ValueError:
      self._send_json(411, {'error': 'a Content-Length header is required'})
      return
    if length > self.server.max_body_bytes:
      self._send_json(413, {'error': f'request of {length} bytes is over the '
                                     f'{self.server.max_body_bytes}-byte limit'})
      return
    body = self.rfile.read(length)
    try:
      answer = self.server.run_request(body)
    except proto.ProtocolError as e:
      self._send_json(400, {'error': one_line(str(e))})
    except RequestRejected as e:
      self._send_json(422, {'error': one_line(str(e))})
    except Exception as e:  # pylint: disable=broad-except
      log.error('backend %s failed:\n%s', self.server.backend.name, traceback.format_exc())
      self._send_json(500, {'error': one_line(f'{self.server.backend.name} backend failed: '
                                              f'{type(e).__name__}: {e}')})
    else:
      self._send(200, answer, proto.CONTENT_TYPE)

  def _send_json(self, status: int, obj: Any) -> None:
    self._send(status, json.dumps(obj).encode('utf-8'), 'application/json')

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    log.info('%s %s', self.address_string(), format % args)


def make_server(backend: Backend, host: str = '127.0.0.1', port: int = 0) -> DetectorService:
  """A service bound to host:port (port 0: any free port; see `.url`), not yet serving."""
  try:
    return DetectorService((host, port), backend)
  except OSError as e:
    raise ConfigError(f'--port={port}: cannot listen on {host}:{port} ({e.strerror or e})') \
        from None


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (loopback by default).')
  flags.DEFINE_integer('port', 8085, 'Port to listen on.')
  flags.DEFINE_enum('backend', 'mmdet', ['mmdet', 'replay'], 'Which detector answers.')
  flags.DEFINE_string('checkpoint', '', 'mmdet: the Mask2Former .pth checkpoint.')
  flags.DEFINE_string('config', '', 'mmdet: the model config (default: GenEval\'s, found in '
                      'the installed mmdet).')
  flags.DEFINE_string('device', 'cuda:0', 'mmdet: the torch device.')
  flags.DEFINE_enum('channel_order', 'bgr', ['bgr', 'rgb'],
                    'mmdet: channel order handed to the model (bgr: as GenEval reads files).')
  flags.DEFINE_string('replay', '', 'replay: the replay file (detector.write_replay).')
  flags.DEFINE_bool('traceback', False, 'Show tracebacks of user errors too.')
  return flags.FLAGS


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from opd_jax.errors import report_errors  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  with report_errors(f.traceback):
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {list(argv[1:])}; every input is a --flag')
    backend = build_backend(f.backend, checkpoint=os.path.expanduser(f.checkpoint),
                            config=os.path.expanduser(f.config), device=f.device,
                            channel_order=f.channel_order, replay=os.path.expanduser(f.replay))
    server = make_server(backend, f.host, f.port)
  log.info('%s backend serving on %s', backend.name, server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    log.info('stopped')
  finally:
    server.server_close()


if __name__ == '__main__':
  from absl import app  # pylint: disable=import-outside-toplevel
  from opd_jax.errors import parse_absl_flags  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main, flags_parser=parse_absl_flags)
