"""gfl_det.visualize: readable labels (contrast, inside the image, apart) and boxes that stay
visible on objects of their own colour."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from gfl_det.visualize import (color, contrast_ratio, draw_boxes, draw_detections, place_labels,
                               save_image, text_color)


def test_label_text_contrasts_with_every_class_fill():
    # WCAG AA asks 4.5 for text; black or white reaches >= 4.58 on any fill
    for k in range(200):
        fill = color(k)
        assert contrast_ratio(text_color(fill), fill) >= 4.5, (k, fill)
    assert text_color((20, 20, 120)) == (255, 255, 255)   # white on dark blue (was black)
    assert text_color((250, 240, 60)) == (0, 0, 0)        # black on yellow
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)


def test_labels_of_nested_boxes_stay_inside_and_apart():
    # 12 boxes nested in one corner and 6 at the image border: the --show-dir worst case
    boxes = [[10 + 3 * i, 10 + 3 * i, 200 - 5 * i, 150 - 4 * i] for i in range(12)]
    boxes += [[0, 0, 40, 30], [280, 0, 320, 20], [0, 220, 30, 240], [290, 210, 320, 240],
              [100, 100, 101, 101], [150, 0, 170, 239]]
    sizes = [(70, 14)] * len(boxes)
    rects = place_labels(np.array(boxes, float), sizes, (240, 320))
    placed = [r for r in rects if r is not None]
    assert len(placed) >= 12  # most find a place
    for x1, y1, x2, y2 in placed:
        assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
        assert (x2 - x1, y2 - y1) == (70, 14)
    for a, b in itertools.combinations(placed, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    # a lone box with room above gets its label right above its top-left corner
    assert place_labels(np.array([[50.0, 60, 120, 100]]), [(40, 12)], (200, 200)) == [(50, 48, 90, 60)]
    # a label wider than the image has no place
    assert place_labels(np.array([[0.0, 0, 10, 10]]), [(500, 12)], (100, 100)) == [None]


def test_red_box_on_red_object_keeps_a_contrasting_outline():
    img = np.full((120, 160, 3), 200, np.uint8)
    red = color(0)                       # class 0's colour
    img[30:90, 40:120] = red             # an object of exactly that colour
    drawn, _ = draw_boxes(img, np.array([[40.0, 30, 120, 90]]), ['thing'], [red], thickness=2)
    # along the box's top edge, beside the coloured line, there is a dark or light border
    col = drawn[26:36, 80].astype(int)
    assert any(contrast_ratio(px, red) >= 4 for px in col), col
    assert any(np.array_equal(px, red) for px in col)          # the coloured line itself


def test_drawn_labels_have_their_fill_and_text_colours():
    img = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    res = {'bboxes': np.array([[20, 40, 150, 200], [25, 45, 140, 190], [200, 10, 300, 100]], np.float32),
           'scores': np.array([0.9, 0.8, 0.25], np.float32), 'labels': np.array([1, 2, 3])}
    names = ['a', 'bird', 'cat', 'dog']
    out = draw_detections(img, res, names, score_thr=0.3)
    assert out.shape == img.shape and not np.array_equal(out, img)
    assert np.array_equal(out[220:, 200:], img[220:, 200:])   # far from every box: untouched
    texts = ['bird 0.90', 'cat 0.80']
    drawn, rects = draw_boxes(img, res['bboxes'][:2], texts, [color(1), color(2)])
    assert np.array_equal(drawn, out)                          # the 0.25 box is not drawn
    for (x1, y1, x2, y2), lab in zip(rects, (1, 2)):
        patch = drawn[y1:y2, x1:x2].reshape(-1, 3)
        fill, ink = color(lab), text_color(color(lab))
        assert (patch == fill).all(1).mean() > 0.5             # mostly the class colour
        assert (patch == ink).all(1).any()                     # the text in its contrast colour


def test_apis_keeps_no_drawing(tmp_path):
    import gfl_det.apis as apis
    assert not hasattr(apis, 'draw_detections') and not hasattr(apis, 'save_image')
    import cv2
    img = np.zeros((10, 12, 3), np.uint8)
    img[..., 0] = 255  # red in RGB
    path = save_image(tmp_path / 'sub' / 'x.png', img)
    assert cv2.imread(path)[0, 0].tolist() == [0, 0, 255]     # written as BGR
