"""Object detectors for GenEval: the `Detector` interface, the wire protocol, an HTTP client.

GenEval's detector (Mask2Former Swin-S, COCO, mmdetection 2.x) needs mmcv-full, which has no
wheels here, so it runs as a service (`opd_jax.eval.detector_service`) in its own environment
and this process talks to it over HTTP, usually on loopback. This module holds everything both
sides share, so a client/server test exercises the real protocol:

Protocol (version 1). Bodies are uncompressed `.npz` archives read with `allow_pickle=False`
(never pickle); JSON fields travel as uint8 arrays of UTF-8 bytes.
  GET  /health → 200, JSON {"status": "ok", "backend": name, "protocol": 1}.
  POST /detect, body npz:
      `request`  JSON {"protocol": 1, "num_images": B, "class_names": null (all 80 COCO
                 classes) | [[name, …] per image], "min_score": float, "masks": bool}
      `png_<i>`  image i (i = 0 … B−1) as PNG bytes, RGB 8-bit (lossless, as GenEval reads
                 its PNG files).
    → 200, body npz (also the format of replay files, see `write_replay`):
      `response` JSON {"protocol": 1, "images": [{"height", "width", "classes": [name, …],
                 "digest"?}, …]}
      per image i: `boxes_<i>` float32 [M, 4] (x0, y0, x1, y1 pixels), `scores_<i>` float32
                 [M], `labels_<i>` int32 [M] (index into that image's "classes"), and with
                 masks `masks_<i>` uint8 [M, ceil(H·W / 8)]: each bool [H, W] mask flattened
                 row-major and packed with np.packbits (big bit order).
      Every requested class appears in "classes", also with no detection; detections with
      score < min_score are left out.
    → 4xx/5xx, JSON {"error": one line}. 4xx: the request cannot be served (bad payload,
      unknown class, image missing from a replay file); 5xx: the backend failed.

The client retries connection failures, timeouts and 5xx answers a bounded number of times with
exponential backoff, then raises `DetectorServiceError` (an InputError: one line naming the
URL); a 4xx answer or a malformed response raises it at once. It never returns an empty
detection in place of a failure.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
from PIL import Image

from opd_jax.errors import ConfigError, InputError, one_line
from opd_jax.eval.geneval import COCO_CLASSES, Detections

PROTOCOL_VERSION = 1
CONTENT_TYPE = 'application/octet-stream'
DETECT_PATH = '/detect'
HEALTH_PATH = '/health'

ImageDetections = Dict[str, Detections]  # class name → detections in one image


class Detector(Protocol):
  """Detects objects of the given classes in a batch of images."""

  def detect(self, images: np.ndarray,
             class_names: Optional[Sequence[Sequence[str]]] = None) -> List[ImageDetections]:
    """Per image, class name → Detections for every requested class.

    Args:
      images: uint8 [B, H, W, 3] RGB.
      class_names: per image, the classes wanted; None: all COCO_CLASSES.
    """


class ProtocolError(ValueError):
  """A payload that does not follow the protocol (either direction)."""


class DetectorServiceError(InputError):
  """The detector service cannot be reached or does not answer usefully."""


# --- payload helpers (shared by client, service and replay files) ---------------------------

def _json_array(obj: Any) -> np.ndarray:
  return np.frombuffer(json.dumps(obj).encode('utf-8'), np.uint8)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _load_npz(body: bytes, what: str) -> Dict[str, np.ndarray]:
  try:
    with np.load(io.BytesIO(body), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # zipfile/ValueError/OSError: anything unreadable
    raise ProtocolError(f'{what}: not a readable npz archive ({one_line(str(e))})') from None


def _read_json(arrays: Mapping[str, np.ndarray], key: str, what: str) -> Dict[str, Any]:
  if key not in arrays or arrays[key].dtype != np.uint8 or arrays[key].ndim != 1:
    raise ProtocolError(f'{what}: no `{key}` field')
  try:
    value = json.loads(arrays[key].tobytes().decode('utf-8'))
  except ValueError as e:
    raise ProtocolError(f'{what}: `{key}` is not JSON ({e})') from None
  if not isinstance(value, dict) or value.get('protocol') != PROTOCOL_VERSION:
    raise ProtocolError(f'{what}: `{key}` is not a protocol {PROTOCOL_VERSION} object')
  return value


def check_images(images: Any, what: str = 'images') -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not images.size:
    raise InputError(f'{what}: expected uint8 [B, H, W, 3] with B, H, W > 0, got '
                     f'{images.dtype} {images.shape}')
  return images


def image_digest(image: np.ndarray) -> str:
  """sha256 of an uint8 [H, W, 3] image's shape and pixels: its key in a replay file."""
  image = np.ascontiguousarray(image, np.uint8)
  h = hashlib.sha256(f'{image.shape[0]}x{image.shape[1]}x{image.shape[2]}:'.encode())
  h.update(image.tobytes())
  return h.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image), 'RGB').save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def decode_png(data: bytes, what: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data), formats=['PNG']) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:
    raise ProtocolError(f'{what}: not a readable PNG ({one_line(str(e))})') from None


def encode_request(images: np.ndarray, class_names: Optional[Sequence[Sequence[str]]],
                   min_score: float, masks: bool) -> bytes:
  images = check_images(images)
  if class_names is not None:
    class_names = [list(names) for names in class_names]
    if len(class_names) != len(images):
      raise InputError(f'class_names: {len(class_names)} lists for {len(images)} images')
  arrays = {'request': _json_array({
      'protocol': PROTOCOL_VERSION, 'num_images': len(images), 'class_names': class_names,
      'min_score': float(min_score), 'masks': bool(masks)})}
  for i, image in enumerate(images):
    arrays[f'png_{i}'] = np.frombuffer(encode_png(image), np.uint8)
  return _npz_bytes(arrays)


def decode_request(
    body: bytes) -> Tuple[List[np.ndarray], Optional[List[List[str]]], float, bool]:
  """(images uint8 [H, W, 3] each, class names per image or None, min_score, masks)."""
  arrays = _load_npz(body, 'request')
  req = _read_json(arrays, 'request', 'request')
  n = req.get('num_images')
  if not isinstance(n, int) or n < 1:
    raise ProtocolError(f'request: num_images {n!r} is not a positive integer')
  names = req.get('class_names')
  if names is not None:
    if (not isinstance(names, list) or len(names) != n
        or not all(isinstance(x, list) and all(isinstance(c, str) for c in x) for x in names)):
      raise ProtocolError(f'request: class_names is not null or {n} lists of names')
  min_score, masks = req.get('min_score', 0.0), req.get('masks', True)
  if not isinstance(min_score, (int, float)) or not isinstance(masks, bool):
    raise ProtocolError('request: min_score must be a number and masks a boolean')
  images = []
  for i in range(n):
    png = arrays.get(f'png_{i}')
    if png is None or png.dtype != np.uint8 or png.ndim != 1:
      raise ProtocolError(f'request: no png_{i} field')
    images.append(decode_png(png.tobytes(), f'request: png_{i}'))
  return images, names, float(min_score), masks


def filter_detections(per_image: Mapping[str, Detections], min_score: float,
                      masks: bool) -> ImageDetections:
  """Drops detections scoring below min_score, and the masks when not wanted."""
  out = {}
  for cls, det in per_image.items():
    keep = det.scores >= np.float32(min_score)
    out[cls] = Detections(det.boxes[keep], det.scores[keep],
                          det.masks[keep] if masks and det.masks is not None else None)
  return out


def encode_detections(per_image: Sequence[Mapping[str, Detections]],
                      sizes: Sequence[Tuple[int, int]], masks: bool,
                      digests: Optional[Sequence[str]] = None) -> bytes:
  """A response body (or replay file) for these detections; sizes are the images' (H, W)."""
  entries, arrays = [], {}
  for i, (dets, (h, w)) in enumerate(zip(per_image, sizes)):
    classes = list(dets)
    entry = {'height': int(h), 'width': int(w), 'classes': classes}
    if digests is not None:
      entry['digest'] = digests[i]
    entries.append(entry)
    parts = [dets[c] for c in classes]
    arrays[f'boxes_{i}'] = np.concatenate(
        [d.boxes for d in parts] + [np.zeros((0, 4), np.float32)]).astype(np.float32)
    arrays[f'scores_{i}'] = np.concatenate(
        [d.scores for d in parts] + [np.zeros((0,), np.float32)]).astype(np.float32)
    arrays[f'labels_{i}'] = np.concatenate(
        [np.full(len(d), k, np.int32) for k, d in enumerate(parts)] + [np.zeros(0, np.int32)])
    if masks:
      packed = [np.zeros((0, (h * w + 7) // 8), np.uint8)]
      for cls, d in zip(classes, parts):
        if d.masks is None:
          raise ValueError(f'image {i}: masks requested but {cls!r} has none')
        if len(d) and d.masks.shape[1:] != (h, w):
          raise ValueError(f'image {i}: {cls!r} masks {d.masks.shape[1:]} are not {(h, w)}')
        packed.append(np.packbits(d.masks.reshape(len(d), h * w), axis=1))
      arrays[f'masks_{i}'] = np.concatenate(packed)
  arrays['response'] = _json_array({'protocol': PROTOCOL_VERSION, 'images': entries})
  return _npz_bytes(arrays)


def decode_detections(
    body: bytes, what: str = 'response') -> Tuple[List[ImageDetections], List[Dict[str, Any]]]:
  """(per image class → Detections, per image {"height", "width", "classes", "digest"?})."""
  arrays = _load_npz(body, what)
  resp = _read_json(arrays, 'response', what)
  entries = resp.get('images')
  if not isinstance(entries, list):
    raise ProtocolError(f'{what}: no images list')
  out = []
  for i, entry in enumerate(entries):
    try:
      h, w, classes = int(entry['height']), int(entry['width']), list(entry['classes'])
      boxes, scores = arrays[f'boxes_{i}'], arrays[f'scores_{i}']
      labels = arrays[f'labels_{i}']
    except (KeyError, TypeError, ValueError) as e:
      raise ProtocolError(f'{what}: image {i}: missing field {e}') from None
    m = len(scores)
    if (boxes.shape != (m, 4) or scores.shape != (m,) or labels.shape != (m,)
        or labels.dtype.kind not in 'iu'
        or (m and (labels.min() < 0 or labels.max() >= len(classes)))):
      raise ProtocolError(f'{what}: image {i}: boxes {boxes.shape}, scores {scores.shape}, '
                          f'labels {labels.shape} disagree')
    masks = None
    if f'masks_{i}' in arrays:
      packed = arrays[f'masks_{i}']
      if packed.shape != (m, (h * w + 7) // 8) or packed.dtype != np.uint8:
        raise ProtocolError(f'{what}: image {i}: masks {packed.shape} are not '
                            f'[{m}, {(h * w + 7) // 8}] uint8')
      masks = np.unpackbits(packed, axis=1, count=h * w).astype(bool).reshape(m, h, w)
    dets = {}
    for k, cls in enumerate(classes):
      sel = labels == k
      dets[cls] = Detections(boxes[sel], scores[sel], None if masks is None else masks[sel])
    out.append(dets)
  return out, entries


# --- replay files ---------------------------------------------------------------------------

def write_replay(path: str, images: np.ndarray,
                 detections: Sequence[Mapping[str, Detections]]) -> None:
  """Saves detections keyed by image content, for the service's `replay` backend.

  Masks are stored when every class of every image has them. Re-scoring a run then needs no
  detector: serve the file with `--backend=replay --replay=path` and send the same images.
  """
  images = check_images(images)
  if len(detections) != len(images):
    raise InputError(f'{path}: {len(detections)} detection sets for {len(images)} images')
  masks = all(d.masks is not None for dets in detections for d in dets.values())
  body = encode_detections(detections, [im.shape[:2] for im in images], masks,
                           [image_digest(im) for im in images])
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(body)
  os.replace(tmp, path)


def read_replay(path: str) -> Dict[str, Tuple[Tuple[int, int], ImageDetections]]:
  """A replay file: image digest → ((H, W), class → Detections)."""
  try:
    with open(path, 'rb') as f:
      body = f.read()
  except OSError as e:
    raise InputError(f'{path}: cannot read the replay file ({e.strerror})') from None
  try:
    per_image, entries = decode_detections(body, path)
  except ProtocolError as e:
    raise InputError(str(e)) from None
  table = {}
  for dets, entry in zip(per_image, entries):
    if not isinstance(entry.get('digest'), str):
      raise InputError(f'{path}: an image entry has no digest; not a replay file')
    table[entry['digest']] = ((entry['height'], entry['width']), dets)
  return table


# --- HTTP client ----------------------------------------------------------------------------

def _error_text(body: bytes) -> str:
  try:
    return one_line(str(json.loads(body.decode('utf-8'))['error']))
  except Exception:
    return one_line(body[:300].decode('utf-8', 'replace')) if body else '(empty body)'


class HttpDetector:
  """A `Detector` backed by an `opd_jax.eval.detector_service` over HTTP (stdlib only).

  Args:
    url: the service's base URL, e.g. 'http://127.0.0.1:8085'.
    timeout_s: per attempt: connecting, and each wait for data from the service.
    retries: further attempts after a connection failure, a timeout or a 5xx answer.
    backoff_s: wait before the first retry; doubled before each next one (capped at 60 s).
    min_score: the service leaves out detections scoring below it (GenEval ignores scores
      <= 0.3, so 0.3 keeps every detection that matters and shrinks the answer).
    masks: ask for instance masks (needed for GenEval's colour crops).
    batch_size: images per request.
  """

  def __init__(self, url: str, *, timeout_s: float = 300.0, retries: int = 2,
               backoff_s: float = 1.0, min_score: float = 0.0, masks: bool = True,
               batch_size: int = 16):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != 'http' or not parts.hostname or parts.query or parts.fragment:
      raise ConfigError(f'{url}: detector URL must look like http://HOST:PORT[/PATH]')
    try:
      port = parts.port or 80
    except ValueError:
      raise ConfigError(f'{url}: detector URL has a bad port') from None
    if timeout_s <= 0 or retries < 0 or backoff_s < 0 or batch_size < 1:
      raise ConfigError(f'{url}: need timeout_s > 0, retries >= 0, backoff_s >= 0, '
                        f'batch_size >= 1 (got {timeout_s}, {retries}, {backoff_s}, '
                        f'{batch_size})')
    self.url = url
    self._host, self._port = parts.hostname, port
    self._base = parts.path.rstrip('/')
    self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), backoff_s
    self.min_score, self.masks, self.batch_size = float(min_score), bool(masks), batch_size

  def health(self) -> Dict[str, Any]:
    """The service's /health answer (raises DetectorServiceError when it is not up)."""
    body = self._call('GET', HEALTH_PATH, None)
    try:
      return json.loads(body.decode('utf-8'))
    except ValueError:
      raise DetectorServiceError(f'{self.url}: /health answer is not JSON') from None

  def detect(self, images: np.ndarray,
             class_names: Optional[Sequence[Sequence[str]]] = None) -> List[ImageDetections]:
    images = check_images(images)
    if class_names is not None and len(class_names) != len(images):
      raise InputError(f'class_names: {len(class_names)} lists for {len(images)} images')
    out: List[ImageDetections] = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      names = None if class_names is None else class_names[start:start + len(chunk)]
      body = self._call('POST', DETECT_PATH,
                        encode_request(chunk, names, self.min_score, self.masks))
      try:
        dets, entries = decode_detections(body)
      except ProtocolError as e:
        raise DetectorServiceError(f'{self.url}: {e}') from None
      if len(dets) != len(chunk) or any(
          (e['height'], e['width']) != chunk.shape[1:3] for e in entries):
        raise DetectorServiceError(f'{self.url}: answer does not match the {len(chunk)} '
                                   f'images of shape {chunk.shape[1:3]} sent')
      wanted = COCO_CLASSES if names is None else None
      for k, d in enumerate(dets):
        expect = set(wanted if wanted is not None else names[k])
        if set(d) != expect:
          raise DetectorServiceError(f'{self.url}: answer for image {start + k} has classes '
                                     f'{sorted(set(d) ^ expect)} wrong')
      out.extend(dets)
    return out

  def _call(self, method: str, path: str, body: Optional[bytes]) -> bytes:
    attempts = self.retries + 1
    last = ''
    for attempt in range(attempts):
      if attempt:
        time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 60.0))
      try:
        status, data = self._request(method, path, body)
      except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, …
        last = f'{type(e).__name__}: {one_line(str(e))}'
        continue
      if status == 200:
        return data
      if 500 <= status < 600:
        last = f'HTTP {status}: {_error_text(data)}'
        continue
      raise DetectorServiceError(f'{self.url}{path}: HTTP {status}: {_error_text(data)}')
    raise DetectorServiceError(
        f'{self.url}{path}: no answer after {attempts} attempt(s) (timeout {self.timeout_s:g} s '
        f'each); last: {last}')

  def _request(self, method: str, path: str, body: Optional[bytes]) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
    try:
      headers = {'Content-Type': CONTENT_TYPE} if body is not None else {}
      conn.request(method, self._base + path, body=body, headers=headers)
      resp = conn.getresponse()
      return resp.status, resp.read()
    finally:
      conn.close()
