"""OCR reward of the real setting (spec §2): Flow-GRPO's edit-distance score of a PP-OCR reading.

Score of one image, following yifan123/flow_grpo `flow_grpo/ocr.py` (`OcrScorer.__call__`) and
`flow_grpo/rewards.py` (`ocr_score`), rule by rule:

* Target: the text between the prompt's first and second ASCII double quote, i.e. upstream's
  `prompt.split('"')[1]` — the first quoted span; with a single quote, everything after it.
  A prompt without any `"` makes upstream fail (IndexError); here it is an `InputError`.
* Reading: the OCR engine's boxes, in its reading order (PaddleOCR's `sorted_boxes`: top to
  bottom, left to right within ~10 px rows), texts concatenated with no separator; a box is kept
  when its recognition confidence is > 0 (upstream's test) after the engine's own drop_score
  filter (PaddleOCR 2.x `drop_score` = 0.5; rapidocr `text_score` = 0.5, same `>=` test). No box
  at all reads as ''.
* Normalisation: target and reading have every ' ' (U+0020 only, not tabs or newlines) removed
  and are lower-cased with `str.lower`.
* Distance: 0 if the target is a substring of the reading, else Levenshtein(reading, target),
  then clamped to len(target) ("recognised many unrelated characters": at most a full penalty).
* Reward: 1 − distance / len(target), in [0, 1]. A target that is empty after normalisation
  (`""`, `" "`) divides by zero upstream; here it is an `InputError`.
* Images: float NHWC in [0, 1] become uint8 by round(x·255) clamped to [0, 255] (upstream's
  `(images * 255).round().clamp(0, 255)`); uint8 images pass unchanged. The RGB array goes to the
  engine as it is, as upstream passes it to PaddleOCR (which, like rapidocr, takes an array as BGR
  without converting it).
* Deliberate deviation: upstream catches any exception of the OCR call and scores that image 0
  with a printed message. Here an engine or service failure raises (`OCRBackendError`), so a
  broken OCR setup can never pass as a run of zero rewards.

Backends (`backend(images uint8 [B, H, W, 3] RGB) -> list[str]` of B readings):

* `RapidOCRBackend` (default): rapidocr-onnxruntime in-process, with the PP-OCRv4 ONNX models that
  ship inside its wheel (no download). Its pipeline is PaddleOCR's, and the engine is configured
  to PaddleOCR 2.9.1's defaults as upstream calls it (`PaddleOCR(use_angle_cls=False, lang="en")`,
  `ocr(img, cls=False)`): no angle classifier, DB detector thresh 0.3 / box_thresh 0.6 /
  unclip_ratio 1.5 / no dilation / 'fast' box score, longer side limited to 960, drop_score 0.5.
  The models differ: the wheel holds `ch_PP-OCRv4_det` and `ch_PP-OCRv4_rec` (Chinese + English
  dictionary), where PaddleOCR's lang="en" loads `en_PP-OCRv3_det` and `en_PP-OCRv4_rec`; so its
  scores are close to, not equal to, the paper's. For images longer than 960 px rapidocr's
  'max' resize picks its own limit (1500 or 2000) where PaddleOCR shrinks to 960.
* `PaddleOCRBackend`: PaddleOCR 2.x itself (paddleocr==2.9.1, upstream's version), in-process,
  when it is installed in this environment — paper-exact.
* `HttpOCRBackend`: a client of `opd_jax.rewards.ocr_service` on 127.0.0.1 (JSON with base64 PNG
  images; never pickle), for PaddleOCR run in its own virtual environment (see that module).
  Per-request timeout, a bounded number of attempts, then a one-line `OCRBackendError`.

`OCRScorer(backend)(images, prompts) -> float32 [B]` is the reward.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np

from opd_jax.errors import InputError, UserError

OCRBackend = Callable[[np.ndarray], list]

QUOTE = '"'
# The default address of `opd_jax.rewards.ocr_service`.
DEFAULT_SERVICE_URL = 'http://127.0.0.1:18090/ocr'

# PaddleOCR 2.9.1's defaults (tools/infer/utility.py) as rapidocr-onnxruntime 1.4.x parameters.
RAPIDOCR_PADDLE_DEFAULTS = {
    'use_cls': False,             # PaddleOCR(use_angle_cls=False), ocr(..., cls=False)
    'text_score': 0.5,            # drop_score
    'det_limit_type': 'max',      # det_limit_type
    'det_limit_side_len': 960,    # det_limit_side_len
    'det_thresh': 0.3,            # det_db_thresh
    'det_box_thresh': 0.6,        # det_db_box_thresh
    'det_unclip_ratio': 1.5,      # det_db_unclip_ratio
    'det_use_dilation': False,    # use_dilation
    'det_score_mode': 'fast',     # det_db_score_mode
}


class OCRBackendError(UserError, RuntimeError):
  """The OCR engine or service cannot be used: not installed, not reachable, or it failed."""


# --------------------------------------------------------------------------- the formula


def ocr_target(prompt: str) -> str:
  """The text an OCR prompt asks for: its first double-quoted span (upstream `split('"')[1]`).

  Raises:
    ValueError: no `"` in the prompt, or a span that is empty once spaces are removed (the
      message is the reason alone; callers prefix the prompt's file line or batch index).
  """
  parts = prompt.split(QUOTE)
  if len(parts) < 2:
    raise ValueError('no double-quoted target text (the OCR reward reads the first "…" span)')
  target = parts[1]
  if not normalize_text(target):
    raise ValueError('the quoted target text is empty')
  return target


def normalize_text(text: str) -> str:
  """Upstream's normalisation: every ' ' removed, then lower-cased."""
  return text.replace(' ', '').lower()


def levenshtein(a: str, b: str) -> int:
  """Edit distance with unit-cost insertion, deletion and substitution."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def ocr_score(reading: str, target: str) -> float:
  """1 − min(distance, len)/len of normalised texts; distance 0 when the target is a substring.

  Raises:
    ValueError: the target is empty once spaces are removed.
  """
  reading, target = normalize_text(reading), normalize_text(target)
  if not target:
    raise ValueError('the quoted target text is empty')
  distance = 0 if target in reading else levenshtein(reading, target)
  return 1.0 - min(distance, len(target)) / len(target)


def join_boxes(boxes: Iterable[tuple[str, float]]) -> str:
  """One reading from (text, confidence) boxes in reading order: kept if confidence > 0."""
  return ''.join(text for text, confidence in boxes if confidence > 0)


def to_uint8(images: Any) -> np.ndarray:
  """uint8 [B, H, W, 3] RGB from float [0, 1] (round(x·255), clamped) or uint8 NHWC images."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise InputError(f'OCR reward: expected images [B, H, W, 3], got shape {images.shape}')
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise InputError(f'OCR reward: expected float images in [0, 1] or uint8, got {images.dtype}')
  if not np.all(np.isfinite(images)):
    raise InputError('OCR reward: images contain NaN or Inf')
  return np.clip(np.round(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- in-process engines


class RapidOCRBackend:
  """rapidocr-onnxruntime with PaddleOCR 2.9.1's settings; the engine is built once, on first use.

  Args:
    **overrides: rapidocr parameters replacing `RAPIDOCR_PADDLE_DEFAULTS` (e.g.
      `rec_model_path=…`, `rec_keys_path=…` for English PP-OCR models converted to ONNX,
      `intra_op_num_threads=…`).
  """

  name = 'rapidocr'

  def __init__(self, **overrides: Any):
    self.params = {**RAPIDOCR_PADDLE_DEFAULTS, **overrides}
    self._engine = None

  def load(self) -> None:
    """Builds the engine now (the first call does it otherwise)."""
    if self._engine is not None:
      return
    try:
      from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
      raise OCRBackendError(
          f'rapidocr-onnxruntime cannot be imported ({e}): pip install -r requirements.txt; if '
          'OpenCV misses libGL/libglib on a headless system, apt-get install libgl1 '
          'libglib2.0-0, or replace opencv-python by opencv-python-headless') from None
    self._engine = RapidOCR(**self.params)

  def __call__(self, images: np.ndarray) -> list[str]:
    self.load()
    readings = []
    for image in images:
      result, _ = self._engine(image, use_det=True, use_cls=False, use_rec=True)
      readings.append(join_boxes((text, float(score)) for _, text, score in result or ()))
    return readings


class PaddleOCRBackend:
  """PaddleOCR 2.x in-process, called exactly as Flow-GRPO calls it (paper-exact readings).

  Needs `paddleocr` (2.9.1 upstream) and `paddlepaddle` installed; PaddleOCR downloads its
  lang="en" models on first use unless they are already in ~/.paddleocr.
  """

  name = 'paddleocr'

  def __init__(self, use_gpu: bool = False):
    self.use_gpu = use_gpu
    self._engine = None

  def load(self) -> None:
    if self._engine is not None:
      return
    try:
      from paddleocr import PaddleOCR
    except ImportError as e:
      raise OCRBackendError(f'paddleocr cannot be imported ({e}): install paddlepaddle and '
                            'paddleocr==2.9.1, or use the rapidocr backend') from None
    self._engine = PaddleOCR(use_angle_cls=False, lang='en', use_gpu=self.use_gpu,
                             show_log=False)

  def __call__(self, images: np.ndarray) -> list[str]:
    self.load()
    readings = []
    for image in images:
      # PaddleOCR 2.x: one entry per page; a page is None (no text) or [[box, (text, conf)], ...].
      page = self._engine.ocr(image, cls=False)[0]
      readings.append(join_boxes((res[1][0], float(res[1][1])) for res in page or ()))
    return readings


# --------------------------------------------------------------------------- HTTP service


def encode_png(image: np.ndarray) -> str:
  """base64 text of a lossless PNG of one uint8 [H, W, 3] image."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image, 'RGB').save(buf, format='PNG', compress_level=1)
  return base64.b64encode(buf.getvalue()).decode('ascii')


def decode_png(text: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB from base64 PNG text; ValueError if it is not one."""
  from PIL import Image
  try:
    data = base64.b64decode(text, validate=True)
    with Image.open(io.BytesIO(data)) as image:
      if image.format != 'PNG':
        raise ValueError(f'not a PNG image ({image.format})')
      return np.asarray(image.convert('RGB'))
  except (binascii.Error, OSError, TypeError, Image.DecompressionBombError) as e:
    raise ValueError(f'not a base64 PNG image ({e})') from None


def encode_request(images: np.ndarray) -> bytes:
  """The service's request body: {"images": [base64 PNG, ...]}."""
  return json.dumps({'images': [encode_png(image) for image in images]}).encode()


def decode_request(body: bytes) -> np.ndarray:
  """uint8 [B, H, W, 3] from a request body; ValueError naming what is wrong."""
  try:
    payload = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'request is not JSON ({e})') from None
  items = payload.get('images') if isinstance(payload, dict) else None
  if not isinstance(items, list) or not items:
    raise ValueError('request needs a non-empty "images" list of base64 PNG strings')
  images = []
  for i, item in enumerate(items):
    try:
      images.append(decode_png(item))
    except ValueError as e:
      raise ValueError(f'images[{i}]: {e}') from None
  if len({image.shape for image in images}) > 1:
    raise ValueError('images differ in size; send one size per request')
  return np.stack(images)


def decode_response(body: bytes, count: int) -> list[str]:
  """The readings of a service answer {"texts": [str, ...]}; ValueError if malformed."""
  try:
    payload = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'answer is not JSON ({e})') from None
  texts = payload.get('texts') if isinstance(payload, dict) else None
  if (not isinstance(texts, list) or len(texts) != count
      or not all(isinstance(t, str) for t in texts)):
    raise ValueError(f'answer needs "texts": a list of {count} strings')
  return texts


class HttpOCRBackend:
  """Client of `opd_jax.rewards.ocr_service` (see there for starting it with PaddleOCR).

  Each request carries up to `max_images_per_request` images. A connection failure, timeout or
  5xx answer is retried, `max_attempts` tries in all with `backoff_s`·attempt seconds between
  them; then, or at once for a 4xx or malformed answer, `OCRBackendError` names the URL and the
  last failure. No proxy is used (the service is local).

  Args:
    url: the service's /ocr endpoint.
    timeout_s: limit of each blocking socket operation of a request (connect, send, each read).
    max_attempts: tries per request, ≥ 1.
    backoff_s: base pause between tries.
    max_images_per_request: batch split size.
  """

  name = 'http'

  def __init__(self, url: str = DEFAULT_SERVICE_URL, timeout_s: float = 120.0,
               max_attempts: int = 3, backoff_s: float = 1.0, max_images_per_request: int = 16):
    if not url.startswith(('http://', 'https://')):
      raise OCRBackendError(f'OCR service url {url!r}: must start with http:// or https://')
    if max_attempts < 1 or timeout_s <= 0 or max_images_per_request < 1 or backoff_s < 0:
      raise OCRBackendError('HttpOCRBackend: max_attempts and max_images_per_request must be '
                            '≥ 1, timeout_s > 0, backoff_s ≥ 0')
    self.url = url
    self.timeout_s = timeout_s
    self.max_attempts = max_attempts
    self.backoff_s = backoff_s
    self.max_images_per_request = max_images_per_request
    self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

  def load(self) -> None:
    """Nothing to build: the service holds the engine."""

  def __call__(self, images: np.ndarray) -> list[str]:
    readings = []
    for start in range(0, len(images), self.max_images_per_request):
      chunk = images[start:start + self.max_images_per_request]
      readings.extend(self._request(encode_request(chunk), len(chunk)))
    return readings

  def _request(self, body: bytes, count: int) -> list[str]:
    failure = ''
    for attempt in range(1, self.max_attempts + 1):
      if attempt > 1:
        time.sleep(self.backoff_s * (attempt - 1))
      request = urllib.request.Request(self.url, data=body, method='POST',
                                       headers={'Content-Type': 'application/json'})
      try:
        with self._opener.open(request, timeout=self.timeout_s) as answer:
          data = answer.read()
      except urllib.error.HTTPError as e:
        failure = f'HTTP {e.code}: {_error_text(e)}'
        if e.code < 500:
          break
        continue
      except urllib.error.URLError as e:
        failure = f'{e.reason}'
        continue
      except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        failure = f'{type(e).__name__}: {e}' if str(e) else type(e).__name__
        continue
      try:
        return decode_response(data, count)
      except ValueError as e:
        raise OCRBackendError(f'{self.url}: bad answer from the OCR service: {e}') from None
    raise OCRBackendError(f'{self.url}: OCR service failed after {attempt} attempt(s), last: '
                          f'{failure} (start it with python -m opd_jax.rewards.ocr_service)')


def _error_text(error: urllib.error.HTTPError) -> str:
  try:
    payload = json.loads(error.read())
    return str(payload.get('error', payload)) if isinstance(payload, dict) else str(payload)
  except Exception:  # noqa: BLE001 — the status line is enough when the body is not JSON
    return str(error.reason)


# --------------------------------------------------------------------------- the reward


OCR_BACKENDS = ('rapidocr', 'http')


def backend_by_name(name: str, url: str, field: str = 'config.rewards.ocr_backend'):
  """'rapidocr' (in-process) or 'http' (the OCR service at `url`); another name is a
  ConfigError naming `field`."""
  if name == 'rapidocr':
    return RapidOCRBackend()
  if name == 'http':
    return HttpOCRBackend(url)
  from opd_jax.errors import ConfigError
  raise ConfigError(f'{field}: {name!r} is not one of {list(OCR_BACKENDS)}')


class OCRScorer:
  """The OCR reward: `scorer(images, prompts) -> float32 [B]` in [0, 1].

  Args:
    backend: `backend(uint8 [B, H, W, 3]) -> B readings`; default `RapidOCRBackend()`.
  """

  def __init__(self, backend: OCRBackend | None = None):
    self.backend = RapidOCRBackend() if backend is None else backend

  def __call__(self, images: Any, prompts: Sequence[Union[str, bytes]]) -> np.ndarray:
    images = to_uint8(images)
    prompts = [p.decode() if isinstance(p, bytes) else p for p in prompts]
    if len(prompts) != images.shape[0]:
      raise InputError(f'OCR reward: {images.shape[0]} images but {len(prompts)} prompts')
    targets = []
    for i, prompt in enumerate(prompts):   # checked before the (slow) OCR runs
      try:
        targets.append(ocr_target(prompt))
      except ValueError as e:
        raise InputError(f'OCR reward: prompts[{i}] {_short(prompt)}: {e}') from None
    readings = self.backend(images)
    if (not isinstance(readings, list) or len(readings) != len(targets)
        or not all(isinstance(r, str) for r in readings)):
      raise OCRBackendError(f'OCR backend {getattr(self.backend, "name", self.backend)!r} '
                            f'returned {type(readings).__name__} instead of {len(targets)} strings')
    return np.array([ocr_score(r, t) for r, t in zip(readings, targets)], np.float32)


def _short(text: str, limit: int = 60) -> str:
  return repr(text if len(text) <= limit else text[:limit - 1] + '…')
