"""The on-disk state of one evaluation cell (a model on a benchmark), so a killed run resumes.

    <cell>/settings.json     what the images depend on (model, adapter, CFG, steps, seed, …);
                             a resumed cell with other settings is refused, never mixed
    <cell>/images/00017.png  image i, written to a temporary name and renamed: a PNG that exists
                             is complete
    <cell>/scores.jsonl      one JSON object per scored image, {"index": i, ...}, appended and
                             flushed per batch; a torn last line (a kill mid-write) is dropped on
                             reading, so that image is scored again — no image is counted twice

Every image i is drawn from key fold_in(seed, i) whatever the batch size or device count, so the
images a resumed run adds are the ones an uninterrupted run would have made.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from opd_jax.errors import InputError

SETTINGS = 'settings.json'
SCORES = 'scores.jsonl'
IMAGES = 'images'


class CellStore:
  """Images and scores of one (model, benchmark) cell under `root`."""

  def __init__(self, root: str | os.PathLike, settings: Mapping[str, Any]):
    self.root = os.fspath(root)
    self.images_dir = os.path.join(self.root, IMAGES)
    path = os.path.join(self.root, SETTINGS)
    settings = json.loads(json.dumps(dict(settings)))   # as stored: lists, not tuples
    if os.path.exists(path):
      try:
        with open(path) as f:
          stored = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise InputError(f'{path}: unreadable ({e}); delete the folder to start it over') from None
      if stored != settings:
        changed = sorted(k for k in set(stored) | set(settings)
                         if stored.get(k) != settings.get(k))
        raise InputError(f'{path}: this evaluation was started with other settings '
                         f'({", ".join(changed)} differ); use another out_dir or delete '
                         f'{self.root} to redo it')
    else:
      os.makedirs(self.images_dir, exist_ok=True)
      _write_atomic(path, json.dumps(settings, indent=2, sort_keys=True).encode())
    os.makedirs(self.images_dir, exist_ok=True)

  def image_path(self, index: int) -> str:
    return os.path.join(self.images_dir, f'{index:05d}.png')

  def missing_images(self, count: int) -> list[int]:
    """Indices in [0, count) without a finished PNG."""
    done = {int(name[:-4]) for name in os.listdir(self.images_dir)
            if name.endswith('.png') and name[:-4].isdigit()}
    return [i for i in range(count) if i not in done]

  def save_images(self, indices: Sequence[int], images: np.ndarray) -> None:
    """uint8 [B, H, W, 3] images as PNGs, each renamed into place once written."""
    from PIL import Image
    for i, image in zip(indices, images):
      path = self.image_path(int(i))
      tmp = path + '.tmp'
      Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format='PNG')
      os.replace(tmp, path)

  def load_images(self, indices: Sequence[int]) -> np.ndarray:
    from PIL import Image
    images = []
    for i in indices:
      path = self.image_path(int(i))
      try:
        with Image.open(path) as image:
          images.append(np.asarray(image.convert('RGB')))
      except OSError as e:
        raise InputError(f'{path}: unreadable image ({e}); delete it to sample it again') from None
    return np.stack(images)

  def scores(self) -> dict[int, dict]:
    """index → score record, from every complete line of scores.jsonl."""
    path = os.path.join(self.root, SCORES)
    if not os.path.exists(path):
      return {}
    records: dict[int, dict] = {}
    with open(path) as f:
      lines = f.read().split('\n')
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        records[int(record['index'])] = record
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        if n == len(lines):     # the last line, torn by a kill: that image is scored again
          continue
        raise InputError(f'{path}:{n}: not a score record; delete the file to score again') \
            from None
    return records

  def append_scores(self, records: Iterable[Mapping[str, Any]]) -> None:
    path = os.path.join(self.root, SCORES)
    text = ''.join(json.dumps(dict(r), sort_keys=True) + '\n' for r in records)
    if os.path.exists(path):
      _drop_torn_tail(path)
    with open(path, 'a') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def _drop_torn_tail(path: str) -> None:
  """Cuts a last line without its newline (a write a kill interrupted) off the file."""
  with open(path, 'rb+') as f:
    data = f.read()
    if data and not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)


def _write_atomic(path: str, data: bytes) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
