"""GenEval's scoring rules on synthetic detections: every tag, the three verdicts, the edges."""

import numpy as np
from PIL import Image
import pytest

from opd_jax.errors import InputError
from opd_jax.eval import geneval
from opd_jax.eval.geneval import Detections

F32 = np.float32
H, W = 40, 60
PALETTE = {(255, 0, 0): 'red', (0, 0, 255): 'blue', (255, 105, 180): 'pink',
           (0, 0, 0): 'black'}


def dets(*rows, masks=None):
  """Detections from (x0, y0, x1, y1, score) rows."""
  rows = np.asarray(rows, np.float64).reshape(-1, 5)
  return Detections(rows[:, :4], rows[:, 4].astype(F32), masks)


def box_mask(*boxes):
  m = np.zeros((len(boxes), H, W), bool)
  for k, (x0, y0, x1, y1) in enumerate(boxes):
    m[k, y0:y1, x0:x1] = True
  return m


class PaletteClassifier:
  """A stand-in for CLIP: names the commonest non-background colour of each object's crop."""

  def __init__(self):
    self.calls = []

  def __call__(self, image, objects, cls):
    self.calls.append((cls, len(objects)))
    names = []
    for obj in objects:
      crop = geneval.color_crop(image, obj).reshape(-1, 3)
      crop = crop[(crop != geneval.CROP_BACKGROUND).any(-1)]
      values, counts = np.unique(crop, axis=0, return_counts=True)
      names.append(PALETTE[tuple(int(v) for v in values[counts.argmax()])])
    return names


def paint(*regions):
  """An image with each (x0, y0, x1, y1, rgb) region filled, the rest a colour outside PALETTE."""
  image = np.full((H, W, 3), (20, 200, 20), np.uint8)
  for x0, y0, x1, y1, rgb in regions:
    image[y0:y1, x0:x1] = rgb
  return image


def meta(tag, include, exclude=None, prompt='p'):
  m = {'tag': tag, 'include': include, 'prompt': prompt}
  if exclude is not None:
    m['exclude'] = exclude
  return m


def test_thresholds_order_and_cap():
  at_03, above_03 = F32(0.3), np.nextafter(F32(0.3), F32(1))
  at_09, above_09 = F32(0.9), np.nextafter(F32(0.9), F32(1))
  d = {'dog': Detections(np.arange(16, dtype=F32).reshape(4, 4),
                         np.array([at_03, above_09, above_03, at_09], F32))}
  kept = geneval.select_objects(d, 'single_object')['dog']
  assert [o.score for o in kept] == [float(above_09), float(at_09), float(above_03)]
  assert kept[0].box.tolist() == [4, 5, 6, 7]
  assert [o.score for o in geneval.select_objects(d, 'counting')['dog']] == [float(above_09)]
  assert geneval.select_objects({'dog': dets((0, 0, 1, 1, 0.2))}, 'colors') == {}
  # More than MAX_OBJECTS above the threshold: the 16 best are kept.
  many = dets(*[(i, 0, i + 1, 1, 0.5 + 0.01 * i) for i in range(20)])
  kept = geneval.select_objects({'cup': many}, 'single_object')['cup']
  assert geneval.MAX_OBJECTS == 16 and len(kept) == 16
  assert [o.box[0] for o in kept] == list(range(19, 3, -1))


def test_single_and_two_object():
  one = meta('single_object', [{'class': 'dog', 'count': 1}])
  r = geneval.evaluate_image(one, {'dog': dets((0, 0, 5, 5, 0.8))})
  assert (r.correct, r.strict, r.score, r.reason) == (True, True, 1.0, '')
  r = geneval.evaluate_image(one, {'dog': dets((0, 0, 5, 5, 0.8), (9, 9, 12, 12, 0.7))})
  assert (r.correct, r.strict, r.score) == (True, False, 0.0)
  assert r.strict_reason == 'expected dog==1, found 2'
  r = geneval.evaluate_image(one, {'dog': dets((0, 0, 5, 5, 0.25)), 'cat': dets((0, 0, 5, 5, 1))})
  assert (r.correct, r.strict, r.score) == (False, False, 0.0)
  assert r.reason == 'expected dog>=1, found 0'
  assert r.objects == {'cat': [[0.0, 0.0, 5.0, 5.0, 1.0]]}

  two = meta('two_object', [{'class': 'dog', 'count': 1}, {'class': 'cat', 'count': 1}])
  r = geneval.evaluate_image(two, {'dog': dets((0, 0, 5, 5, 0.8))})
  assert (r.correct, r.strict, r.score) == (False, False, 0.5)
  r = geneval.evaluate_image(two, {'dog': dets((0, 0, 5, 5, 0.8)), 'cat': dets((1, 1, 2, 2, .4))})
  assert (r.correct, r.strict, r.score) == (True, True, 1.0)


def test_counting():
  two_glasses = meta('counting', [{'class': 'wine glass', 'count': 2}],
                     [{'class': 'wine glass', 'count': 3}], 'a photo of two wine glasses')
  g = (0, 0, 4, 4)
  r = geneval.evaluate_image(two_glasses, {'wine glass': dets((*g, 0.95), (*g, 0.97))})
  assert (r.correct, r.strict, r.score) == (True, True, 1.0)
  # A third glass at 0.85 is below the counting threshold (it would count for other tags).
  r = geneval.evaluate_image(two_glasses,
                             {'wine glass': dets((*g, 0.95), (*g, 0.97), (*g, 0.85))})
  assert (r.correct, r.strict) == (True, True)
  r = geneval.evaluate_image(two_glasses,
                             {'wine glass': dets((*g, 0.95), (*g, 0.97), (*g, 0.91))})
  assert (r.correct, r.strict, r.score) == (False, False, 0.5)
  assert r.reason == 'expected wine glass<3, found 3'
  assert geneval.metadata_classes(two_glasses) == ['wine glass']
  r = geneval.evaluate_image(two_glasses, {'wine glass': dets((*g, 0.95))})
  assert (r.correct, r.score) == (False, 0.5)
  # Five found for a count of 1: the partial score's count term goes negative, as upstream.
  one = meta('counting', [{'class': 'cup', 'count': 1}])
  r = geneval.evaluate_image(one, {'cup': dets(*[(*g, 0.95)] * 5)})
  assert (r.correct, r.strict, r.score) == (True, False, -3.0)
  # The 16-object cap hides the 17th object from the exclude clause.
  sixteen = meta('counting', [{'class': 'cup', 'count': 16}], [{'class': 'cup', 'count': 17}])
  r = geneval.evaluate_image(sixteen, {'cup': dets(*[(*g, 0.95)] * 20)})
  assert (r.correct, r.strict, r.score) == (True, True, 1.0)


def test_colors_and_color_attr():
  red, blue = (255, 0, 0), (0, 0, 255)
  red_car = meta('colors', [{'class': 'car', 'count': 1, 'color': 'red'}])
  image = paint((2, 2, 20, 20, red), (30, 5, 50, 25, blue))
  # The masks select the painted region; the boxes are wider (green would show without them).
  masks = box_mask((2, 2, 20, 20), (30, 5, 50, 25))
  clf = PaletteClassifier()
  car = {'car': dets((0, 0, 22, 22, 0.9), masks=masks[:1])}
  r = geneval.evaluate_image(red_car, car, image, clf)
  assert (r.correct, r.strict, r.score) == (True, True, 1.0) and clf.calls == [('car', 1)]
  blue_car = {'car': dets((28, 3, 52, 27, 0.9), masks=masks[1:])}
  r = geneval.evaluate_image(red_car, blue_car, image, clf)
  assert (r.correct, r.strict, r.score) == (False, False, 0.5)
  assert r.reason == 'expected red car>=1, found 0 red; and 1 blue'
  # Two cars, the more confident one red: `correct` checks only the first `count` (one
  # classifier call on one object); strict fails on the count, with one 0 term for the colour.
  clf = PaletteClassifier()
  both = {'car': dets((28, 3, 52, 27, 0.6), (0, 0, 22, 22, 0.9), masks=masks[::-1])}
  r = geneval.evaluate_image(red_car, both, image, clf)
  assert (r.correct, r.strict, r.score) == (True, False, 0.0) and clf.calls == [('car', 1)]
  with pytest.raises(ValueError, match='classify_colors'):
    geneval.evaluate_image(red_car, car)

  pink, black = (255, 105, 180), (0, 0, 0)
  attr = meta('color_attr', [{'class': 'handbag', 'count': 1, 'color': 'pink'},
                             {'class': 'scissors', 'count': 1, 'color': 'black'}])
  image = paint((2, 2, 20, 20, pink), (30, 5, 50, 25, black))
  found = {'handbag': dets((2, 2, 20, 20, 0.8)), 'scissors': dets((30, 5, 50, 25, 0.8))}
  assert geneval.metadata_classes(attr) == ['handbag', 'scissors']
  r = geneval.evaluate_image(attr, found, image, PaletteClassifier())
  assert (r.correct, r.strict, r.score) == (True, True, 1.0)
  swapped = {'handbag': dets((30, 5, 50, 25, 0.8)), 'scissors': dets((2, 2, 20, 20, 0.8))}
  r = geneval.evaluate_image(attr, swapped, image, PaletteClassifier())
  assert (r.correct, r.strict, r.score) == (False, False, 0.5)
  assert r.reason.count('\n') == 1


def test_position_rules():
  rp = geneval.relative_position
  assert rp((0, 0, 10, 10), (0, 0, 10, 10)) == ()
  # Centres 10 apart in x; widths 25 + 25 shrink the offset to 5: dx = 0.5 exactly, not > 0.5.
  assert rp((10, 0, 35, 4), (0, 0, 25, 4)) == ()
  assert rp((10, 0, 30, 4), (0, 0, 20, 4)) == ('right of',)   # dx = 0.6
  assert rp((0, 0, 20, 4), (10, 0, 30, 4)) == ('left of',)
  assert rp((50, 50, 60, 60), (0, 0, 10, 10)) == ('right of', 'below')
  assert rp((0, 0, 10, 10), (0, 30, 10, 40)) == ('above',)
  # Large overlapping boxes: the shrink swallows the offset; a shrunk offset < 1e-3 is none.
  assert rp((5, 5, 105, 105), (0, 0, 100, 100)) == ()
  assert rp((10.0004, 0, 10.0004, 0), (10, 0, 10, 0)) == ()

  dog_right_of_cat = meta('position', [{'class': 'cat', 'count': 1},
                                       {'class': 'dog', 'count': 1,
                                        'position': ['right of', 0]}])
  cat, dog_right, dog_left = (0, 0, 10, 10, .9), (40, 0, 50, 10, .9), (0, 30, 3, 33, .9)
  r = geneval.evaluate_image(dog_right_of_cat, {'cat': dets(cat), 'dog': dets(dog_right)})
  assert (r.correct, r.strict, r.score) == (True, True, 1.0)
  r = geneval.evaluate_image(dog_right_of_cat, {'cat': dets(cat), 'dog': dets(dog_left)})
  assert (r.correct, r.strict) == (False, False)
  assert r.reason == 'expected dog right of target, found below target'
  assert r.score == 0.75  # terms 1, 1, 0 and the 1 upstream appends after a failed pair
  r = geneval.evaluate_image(dog_right_of_cat, {'dog': dets(dog_right)})
  assert r.reason == 'expected cat>=1, found 0\nno target for dog to be right of'
  assert r.score == pytest.approx(1 / 3)  # terms 0 (no cat), 1 (one dog), 0 (no target)
  # Every object must be in relation to every target object (count 2 dogs, one misplaced).
  two_dogs = meta('position', [{'class': 'cat', 'count': 1},
                               {'class': 'dog', 'count': 2, 'position': ['right of', 0]}])
  r = geneval.evaluate_image(two_dogs, {'cat': dets(cat), 'dog': dets(dog_right, dog_left)})
  assert (r.correct, r.strict) == (False, False)


def test_color_crop_matches_pil():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  mask = rng.random((H, W)) < 0.5
  for box in [(3.5, 2.5, 20.5, 31.4), (4.5, 0.2, 59.6, 39.5), (-3.2, -2.0, 10.0, 45.0),
              (50.0, 30.0, 70.0, 50.0)]:
    obj = geneval.DetectedObject(np.array(box, F32), 0.9, mask)
    pil = Image.composite(Image.fromarray(image), Image.new('RGB', (W, H), '#999'),
                          Image.fromarray(mask)).crop(tuple(float(v) for v in obj.box))
    np.testing.assert_array_equal(geneval.color_crop(image, obj), np.asarray(pil))
  no_mask = geneval.DetectedObject(np.array((1, 2, 5, 9), F32), 0.9, None)
  np.testing.assert_array_equal(geneval.color_crop(image, no_mask), image[2:9, 1:5])
  prompts = geneval.color_prompts('tv remote')
  assert len(prompts) == 10 and all(len(p) == 3 for p in prompts)
  assert prompts[1] == ('a photo of a orange tv remote', 'a photo of a orange-colored tv remote',
                        'a photo of a orange object')


@pytest.mark.parametrize('bad, field', [
    (meta('colours', [{'class': 'dog', 'count': 1}]), 'tag'),
    (meta('position', [{'class': 'dog', 'count': 1, 'position': ['left of', 0]}]), 'position'),
    (meta('colors', [{'class': 'dog', 'count': 1, 'color': 'teal'}]), 'color'),
    (meta('counting', [{'class': 'dog', 'count': 0}]), 'count'),
])
def test_bad_metadata_is_one_line_input_error(bad, field):
  with pytest.raises(InputError, match=field) as e:
    geneval.evaluate_image(bad, {})
  assert str(e.value).startswith("metadata 'p'") and '\n' not in str(e.value)


def test_summary():
  def result(tag, correct, prompt='p', strict=None, score=None):
    strict = correct if strict is None else strict
    score = float(correct) if score is None else score
    return geneval.ImageResult(tag, prompt, correct, strict, score, '', '',
                               f'{{"prompt": "{prompt}", "tag": "{tag}"}}', {})

  results = [result('single_object', True, 'a'), result('single_object', True, 'a'),
             result('two_object', True, 'b'), result('two_object', False, 'c', score=0.5),
             result('counting', False, 'd'), result('counting', True, 'd', strict=False),
             result('colors', True, 'e'), result('position', False, 'f'),
             result('color_attr', False, 'g'), result('color_attr', True, 'h')]
  s = geneval.summarize(results)
  acc = {t.tag: t.accuracy for t in s.tags}
  assert acc == {'single_object': 1.0, 'two_object': 0.5, 'counting': 0.5, 'colors': 1.0,
                 'position': 0.0, 'color_attr': 0.5}
  assert s.overall == pytest.approx(3.5 / 6) and s.missing_tags == ()
  assert s.overall_strict == pytest.approx(3.0 / 6)
  assert (s.images, s.prompts) == (10, 8)
  assert s.image_accuracy == pytest.approx(0.6)
  assert s.prompt_accuracy == pytest.approx(5 / 8)   # a, b, d, e, h
  assert s.mean_score == pytest.approx(6.5 / 10)
  part = geneval.summarize(results[:4])
  assert part.missing_tags == ('counting', 'colors', 'position', 'color_attr')
  assert part.overall == pytest.approx(0.75)
  assert s.as_dict()['tags'][0]['tag'] == 'single_object'
  with pytest.raises(InputError):
    geneval.summarize([])
