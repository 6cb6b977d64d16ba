"""GenEval scoring rules: from an image's detections to `correct`, `strict` and a partial score.

GenEval (Ghosh et al. 2023, djghosh13/geneval `evaluation/evaluate_images.py`) scores an image
against its prompt's metadata `{"tag", "include": [{"class", "count", "color"?, "position"?}],
"exclude"?, "prompt"}` using a COCO instance segmenter (Mask2Former Swin-S, served by
`opd_jax.eval.detector_service`) and a CLIP-L zero-shot colour classifier (injected here as a
callable). Spec: ../shared/spec/teachers_rewards_eval.md §3. This module is the rules only, in
numpy, written from the upstream description:

Object selection (per class, per image): keep detections with score > 0.3 (> 0.9 when the tag is
`counting`), ordered by descending score, at most MAX_OBJECTS = 16; no NMS (upstream's
`max_overlap` default 1.0 disables it). Scores are compared in float32, the detector's dtype, as
upstream's numpy does (a float32 score equal to float32(0.3) is dropped).

`correct` (GenEval's metric): every include clause finds at least `count` objects of its class;
with a `color`, the first `count` of them (the most confident) are all classified as that
colour; with a `position` [relation, i], each of those objects stands in `relation` to each
object matched by include clause i (which must itself have matched); and no exclude clause's
class has `count` or more objects.

`strict` and `score` (Flow-GRPO's training variant, yifan123/reward-server `evaluate_reward`;
the GenEval teacher's reward is `score`): every include clause finds exactly `count` objects,
colour and position as above on those objects; exclude clauses are not checked. `score` is the
mean of per-clause terms:
  * count term 1 − |count − n| / count for the n kept objects (negative when n > 2·count);
  * if n ≠ count and the clause has a colour or a position: one extra 0 term;
  * if n = count and a colour: k / count for k objects of the right colour;
  * if n = count and a position (and the colour, if any, matched): 0 when the target clause
    did not match, else a 0 on the first failing pair, followed by a 1 in every case where the
    target matched — upstream appends that 1 after its pair loop even when a pair failed, and we
    keep it so the reward equals the teacher's.

Position (`relative_position`): offset of box centres A − B, each component shrunk towards 0 by
0.1·(size of A + size of B) along that axis; all shrunk components < 1e-3 → no relation; else
divide by the unshrunk offset's length: dx < −0.5 'left of', dx > 0.5 'right of', dy < −0.5
'above', dy > 0.5 'below' (image y grows downwards).

Summary (upstream `summary_scores.py`): per-tag accuracy, overall = mean of the per-tag
accuracies over the tags present (the six GenEval tags in a full run), the fraction of correct
images, and of prompts with at least one correct image.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from opd_jax.errors import InputError

# The 80 COCO classes in the detector's label order, spelled as GenEval's `object_names.txt`
# (mmdet's 'mouse', 'remote', 'keyboard' are 'computer mouse', 'tv remote', 'computer keyboard').
COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich',
    'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'computer mouse',
    'tv remote', 'computer keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier',
    'toothbrush')

TAGS = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')

# Zero-shot colour classification: the classes, and the prompt templates whose text embeddings
# are averaged per colour (CLIP-L, as clip_benchmark's zero_shot_classifier).
COLORS = ('red', 'orange', 'yellow', 'green', 'blue', 'purple', 'pink', 'brown', 'black',
          'white')
COLOR_TEMPLATES = ('a photo of a {color} {cls}', 'a photo of a {color}-colored {cls}',
                   'a photo of a {color} object')
CROP_BACKGROUND = (153, 153, 153)  # '#999': what surrounds the object's mask in its crop

SCORE_THRESHOLD = 0.3
COUNTING_SCORE_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_SHRINK = 0.1  # upstream's POSITION_THRESHOLD
RELATIONS = ('left of', 'right of', 'above', 'below')


@dataclasses.dataclass(frozen=True)
class Detections:
  """One class's detections in one image (any order; the rules sort by score).

  boxes: float32 [N, 4] pixel x0, y0, x1, y1; scores: float32 [N]; masks: bool [N, H, W] at the
  image's resolution, or None when the detector gave none (colour crops then use the box only).
  """
  boxes: np.ndarray
  scores: np.ndarray
  masks: Optional[np.ndarray] = None

  def __post_init__(self):
    boxes = np.asarray(self.boxes, np.float32)
    if boxes.size == 0:
      boxes = boxes.reshape(0, 4)
    scores = np.asarray(self.scores, np.float32).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != scores.shape[0]:
      raise InputError(f'detections: boxes {boxes.shape} and scores {scores.shape} are not '
                       '[N, 4] and [N]')
    object.__setattr__(self, 'boxes', boxes)
    object.__setattr__(self, 'scores', scores)
    if self.masks is not None:
      masks = np.asarray(self.masks)
      if masks.dtype != np.bool_ or masks.ndim != 3 or masks.shape[0] != scores.shape[0]:
        raise InputError(f'detections: masks {masks.dtype} {masks.shape} are not bool '
                         f'[{scores.shape[0]}, H, W]')
      object.__setattr__(self, 'masks', masks)

  def __len__(self) -> int:
    return int(self.scores.shape[0])


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """A kept detection: its box (x0, y0, x1, y1), score, and mask (bool [H, W]) or None."""
  box: np.ndarray
  score: float
  mask: Optional[np.ndarray]


# classify_colors(image uint8 [H, W, 3], objects, class name) -> one name from COLORS per object.
ColorClassifier = Callable[[np.ndarray, Sequence[DetectedObject], str], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Clause:
  """One include/exclude requirement of a prompt's metadata."""
  cls: str
  count: int
  color: Optional[str] = None
  position: Optional[Tuple[str, int]] = None  # (relation, index of the target include clause)


@dataclasses.dataclass(frozen=True)
class ImageResult:
  """GenEval's verdict on one image (upstream's results.jsonl row, plus the strict variant)."""
  tag: str
  prompt: str
  correct: bool
  strict: bool
  score: float
  reason: str          # why `correct` is False ('' when it is True); lines joined by '\n'
  strict_reason: str   # why `strict` is False
  metadata: str        # the metadata as JSON (sorted keys): identifies the prompt
  objects: Dict[str, List[List[float]]]  # kept objects per class: [x0, y0, x1, y1, score]

  def as_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def score_threshold(tag: str) -> float:
  return COUNTING_SCORE_THRESHOLD if tag == 'counting' else SCORE_THRESHOLD


def select_objects(detections: Mapping[str, Detections], tag: str,
                   max_objects: int = MAX_OBJECTS) -> Dict[str, List[DetectedObject]]:
  """The objects the rules see: per class, score > threshold(tag), best first, at most 16.

  Classes left with no object are absent from the result. Ties in score keep the detector's
  order (upstream's reversed quicksort argsort leaves them unspecified).
  """
  threshold = np.float32(score_threshold(tag))
  kept = {}
  for cls, det in detections.items():
    order = np.argsort(-det.scores, kind='stable')
    order = order[det.scores[order] > threshold][:max_objects]
    if order.size:
      kept[cls] = [DetectedObject(det.boxes[i], float(det.scores[i]),
                                  None if det.masks is None else det.masks[i]) for i in order]
  return kept


def relative_position(box_a: np.ndarray, box_b: np.ndarray,
                      shrink: float = POSITION_SHRINK) -> Tuple[str, ...]:
  """The relations (in RELATIONS order) in which box A stands to box B (module docstring)."""
  a = np.asarray(box_a, np.float64)[:4].reshape(2, 2)
  b = np.asarray(box_b, np.float64)[:4].reshape(2, 2)
  offset = a.mean(0) - b.mean(0)
  sizes = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
  shrunk = np.maximum(np.abs(offset) - shrink * sizes, 0.0) * np.sign(offset)
  if np.all(np.abs(shrunk) < 1e-3):
    return ()
  dx, dy = shrunk / np.linalg.norm(offset)
  found = (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)
  return tuple(rel for rel, hit in zip(RELATIONS, found) if hit)


def color_crop(image: np.ndarray, obj: DetectedObject) -> np.ndarray:
  """What the colour classifier looks at: the object on a #999 background, cut to its box.

  As upstream with PIL: pixels outside the mask become CROP_BACKGROUND (no mask: the image is
  kept), then the box is cut with each coordinate rounded half-to-even (Python's round, as
  PIL's crop); parts of the box outside the image are black (0), as PIL pads a crop.

  Args:
    image: uint8 [H, W, 3] RGB.
    obj: a kept detection; its mask, if any, must be [H, W].

  Returns:
    uint8 [y1 − y0, x1 − x0, 3].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise InputError(f'image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}')
  if obj.mask is not None:
    if obj.mask.shape != image.shape[:2]:
      raise InputError(f'mask: shape {obj.mask.shape} differs from the image {image.shape[:2]}')
    image = np.where(obj.mask[..., None], image, np.asarray(CROP_BACKGROUND, np.uint8))
  x0, y0, x1, y1 = (int(round(float(v))) for v in np.asarray(obj.box)[:4])
  if x1 < x0 or y1 < y0:
    raise InputError(f'box {np.asarray(obj.box)[:4].tolist()}: right < left or lower < upper')
  h, w = image.shape[:2]
  out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
  sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
  if sy1 > sy0 and sx1 > sx0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
  return out


def color_prompts(cls: str) -> Tuple[Tuple[str, ...], ...]:
  """The zero-shot texts for one class: per colour (COLORS order), its COLOR_TEMPLATES."""
  return tuple(tuple(t.format(color=c, cls=cls) for t in COLOR_TEMPLATES) for c in COLORS)


def parse_clauses(metadata: Mapping[str, Any]) -> Tuple[List[Clause], List[Clause]]:
  """The include and exclude clauses of one metadata record, checked."""
  where = f'metadata {metadata.get("prompt", "")!r}'

  def clause(entry: Any, field: str, index: int, includes_before: int) -> Clause:
    at = f'{where}: {field}[{index}]'
    if not isinstance(entry, Mapping):
      raise InputError(f'{at}: expected an object, got {entry!r}')
    cls, count = entry.get('class'), entry.get('count')
    if not isinstance(cls, str) or not cls:
      raise InputError(f'{at}.class: expected a class name, got {cls!r}')
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
      raise InputError(f'{at}.count: expected an integer >= 1, got {count!r}')
    color = entry.get('color')
    if color is not None and color not in COLORS:
      raise InputError(f'{at}.color: {color!r} is not one of {list(COLORS)}')
    position = entry.get('position')
    if position is not None:
      ok = (isinstance(position, (list, tuple)) and len(position) == 2
            and position[0] in RELATIONS and isinstance(position[1], int)
            and not isinstance(position[1], bool) and 0 <= position[1] < includes_before)
      if field != 'include' or not ok:
        raise InputError(f'{at}.position: expected [relation in {list(RELATIONS)}, index of an '
                         f'earlier include clause], got {position!r}')
      position = (position[0], position[1])
    return Clause(cls, count, color, position)

  includes = metadata.get('include', [])
  excludes = metadata.get('exclude', [])
  for field, value in (('include', includes), ('exclude', excludes)):
    if not isinstance(value, (list, tuple)):
      raise InputError(f'{where}: {field}: expected a list, got {value!r}')
  return ([clause(e, 'include', i, i) for i, e in enumerate(includes)],
          [clause(e, 'exclude', i, 0) for i, e in enumerate(excludes)])


def metadata_classes(metadata: Mapping[str, Any]) -> List[str]:
  """The classes a record's clauses name (include, then exclude; each once): what to detect."""
  includes, excludes = parse_clauses(metadata)
  return list(dict.fromkeys(c.cls for c in includes + excludes))


def evaluate_image(metadata: Mapping[str, Any], detections: Mapping[str, Detections],
                   image: Optional[np.ndarray] = None,
                   classify_colors: Optional[ColorClassifier] = None) -> ImageResult:
  """Scores one image against its prompt's metadata (module docstring for the rules).

  Args:
    metadata: one GenEval metadata record (a jsonl line as a dict).
    detections: class name → that class's detections (absent class: none detected).
    image: uint8 [H, W, 3] RGB; needed only when a colour clause is checked.
    classify_colors: the colour classifier; needed only when a colour clause is checked.
      Called at most once per clause, on the clause's first `count` objects.

  Returns:
    The image's ImageResult.
  """
  tag = metadata.get('tag')
  if tag not in TAGS:
    raise InputError(f'metadata {metadata.get("prompt", "")!r}: tag: {tag!r} is not one of '
                     f'{list(TAGS)}')
  includes, excludes = parse_clauses(metadata)
  objects = select_objects(detections, tag)
  colours_cache: Dict[int, List[str]] = {}

  def colours_of(index: int, objs: List[DetectedObject]) -> List[str]:
    # Both variants classify the same objects: the first `count`, only once there are enough.
    if index not in colours_cache:
      if classify_colors is None or image is None:
        raise ValueError(f'metadata {metadata.get("prompt", "")!r} has a colour clause: '
                         'evaluate_image needs `image` and `classify_colors`')
      colours = list(classify_colors(image, objs, includes[index].cls))
      if len(colours) != len(objs) or any(c not in COLORS for c in colours):
        raise ValueError(f'classify_colors returned {colours!r} for {len(objs)} objects; '
                         f'expected one of {list(COLORS)} each')
      colours_cache[index] = colours
    return colours_cache[index]

  correct, reason = _judge_correct(includes, excludes, objects, colours_of)
  strict, score, strict_reason = _judge_strict(includes, objects, colours_of)
  return ImageResult(
      tag=tag, prompt=str(metadata.get('prompt', '')), correct=correct, strict=strict,
      score=score, reason=reason, strict_reason=strict_reason,
      metadata=json.dumps(dict(metadata), sort_keys=True),
      objects={cls: [[*map(float, o.box[:4]), o.score] for o in objs]
               for cls, objs in objects.items()})


def _colour_reason(clause: Clause, colours: List[str], op: str) -> str:
  tally = ', '.join(f'{colours.count(c)} {c}' for c in COLORS if c in colours)
  return (f'expected {clause.color} {clause.cls}{op}{clause.count}, found '
          f'{colours.count(clause.color)} {clause.color}; and {tally}')


def _first_failed_pair(objs: List[DetectedObject], targets: List[DetectedObject],
                       relation: str) -> Optional[Tuple[str, ...]]:
  """The relations of the first (object, target) pair lacking `relation`; None if all have it."""
  for obj in objs:
    for target in targets:
      rels = relative_position(obj.box, target.box)
      if relation not in rels:
        return rels
  return None


def _position_reason(clause: Clause, rels: Tuple[str, ...]) -> str:
  return f'expected {clause.cls} {clause.position[0]} target, found {" and ".join(rels)} target'


def _judge_correct(includes, excludes, objects, colours_of) -> Tuple[bool, str]:
  """GenEval's `correct` and its reason."""
  correct, reasons = True, []
  matched: List[Optional[List[DetectedObject]]] = []
  for index, clause in enumerate(includes):
    found = objects.get(clause.cls, [])[:clause.count]
    ok = True
    if len(found) < clause.count:
      ok = False
      reasons.append(f'expected {clause.cls}>={clause.count}, found {len(found)}')
    else:
      if clause.color is not None:
        colours = colours_of(index, found)
        if colours.count(clause.color) < clause.count:
          ok = False
          reasons.append(_colour_reason(clause, colours, '>='))
      if clause.position is not None and ok:
        relation, target = clause.position
        if matched[target] is None:
          ok = False
          reasons.append(f'no target for {clause.cls} to be {relation}')
        else:
          rels = _first_failed_pair(found, matched[target], relation)
          if rels is not None:
            ok = False
            reasons.append(_position_reason(clause, rels))
    matched.append(found if ok else None)
    correct = correct and ok
  for clause in excludes:
    n = len(objects.get(clause.cls, []))
    if n >= clause.count:
      correct = False
      reasons.append(f'expected {clause.cls}<{clause.count}, found {n}')
  return correct, '\n'.join(reasons)


def _judge_strict(includes, objects, colours_of) -> Tuple[bool, float, str]:
  """Flow-GRPO's strict verdict, partial-credit score, and reason."""
  strict, reasons, terms = True, [], []
  matched: List[Optional[List[DetectedObject]]] = []
  for index, clause in enumerate(includes):
    found = objects.get(clause.cls, [])
    ok = True
    terms.append(1.0 - abs(clause.count - len(found)) / clause.count)
    if len(found) != clause.count:
      ok = False
      reasons.append(f'expected {clause.cls}=={clause.count}, found {len(found)}')
      if clause.color is not None or clause.position is not None:
        terms.append(0.0)
    else:
      if clause.color is not None:
        hits = colours_of(index, found).count(clause.color)
        terms.append(1.0 - abs(clause.count - hits) / clause.count)
        if hits != clause.count:
          ok = False
          reasons.append(_colour_reason(clause, colours_of(index, found), '=='))
      if clause.position is not None and ok:
        relation, target = clause.position
        if matched[target] is None:
          ok = False
          reasons.append(f'no target for {clause.cls} to be {relation}')
          terms.append(0.0)
        else:
          rels = _first_failed_pair(found, matched[target], relation)
          if rels is not None:
            ok = False
            reasons.append(_position_reason(clause, rels))
            terms.append(0.0)
          terms.append(1.0)  # upstream appends it after the pair loop, failed pair or not
    matched.append(found if ok else None)
    strict = strict and ok
  score = float(np.mean(terms)) if terms else 0.0
  return strict, score, '\n'.join(reasons)


@dataclasses.dataclass(frozen=True)
class TagSummary:
  tag: str
  images: int
  correct: int
  strict: int
  accuracy: float         # GenEval's per-task score
  strict_accuracy: float
  mean_score: float       # mean partial-credit score


@dataclasses.dataclass(frozen=True)
class Summary:
  """Aggregates of a run (upstream summary_scores.py, plus the strict and partial variants)."""
  images: int
  prompts: int
  image_accuracy: float      # fraction of correct images
  prompt_accuracy: float     # fraction of prompts with at least one correct image
  overall: float             # GenEval score: mean over the tags of their accuracy
  overall_strict: float      # the same with `strict`
  mean_score: float          # mean partial-credit score over images
  tags: Tuple[TagSummary, ...]     # in TAGS order, the tags present
  missing_tags: Tuple[str, ...]    # GenEval tags with no image (a partial run)

  def as_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def summarize(results: Sequence[ImageResult]) -> Summary:
  """Per-tag and overall accuracies of a set of image results."""
  if not results:
    raise InputError('results: no image results to summarise')
  tags = []
  for tag in TAGS:
    rows = [r for r in results if r.tag == tag]
    if rows:
      tags.append(TagSummary(
          tag=tag, images=len(rows), correct=sum(r.correct for r in rows),
          strict=sum(r.strict for r in rows),
          accuracy=float(np.mean([r.correct for r in rows])),
          strict_accuracy=float(np.mean([r.strict for r in rows])),
          mean_score=float(np.mean([r.score for r in rows]))))
  by_prompt: Dict[str, bool] = {}
  for r in results:
    by_prompt[r.metadata] = by_prompt.get(r.metadata, False) or r.correct
  return Summary(
      images=len(results), prompts=len(by_prompt),
      image_accuracy=float(np.mean([r.correct for r in results])),
      prompt_accuracy=float(np.mean(list(by_prompt.values()))),
      overall=float(np.mean([t.accuracy for t in tags])),
      overall_strict=float(np.mean([t.strict_accuracy for t in tags])),
      mean_score=float(np.mean([r.score for r in results])),
      tags=tuple(tags), missing_tags=tuple(t for t in TAGS if t not in {s.tag for s in tags}))
