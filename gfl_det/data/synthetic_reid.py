"""The synthetic shapes set with identities: every object is one of N identities, each with its own
appearance inside its shape class, for the embedding branch (detect and identify).

    from gfl_det.data.synthetic_reid import make_synthetic_reid_coco
    paths = make_synthetic_reid_coco('data/synthetic_reid', num_train=400, num_val=80, seed=0)

The same layout, classes, image sizes and background as :mod:`gfl_det.data.synthetic` (whose
default set does not change); every annotation has an ``instance_id``. An identity is

* its shape class (the detection class: rectangle, ellipse, triangle, diamond);
* a primary colour: the class's colour with its hue moved by -20, 0 or +20 degrees;
* a pattern in a secondary colour (any hue, dark or light): stripes, checker, dots, rings, sectors
  (2, 4 or 6), or a border; with its own frequency and angle;
* a texture: pixel grain of its own strength.

Identities of one class differ in at least two of (pattern, frequency, secondary hue, secondary
brightness, primary hue). Every appearance varies: size (32-120 px) and aspect, pattern rotation
(+-15 degrees), colour jitter (brightness x0.85-1.15, +-10 per channel), blur (40 % of the objects,
sigma 0.3-1.0 px), occlusion (a fifth of them: a muted patch over up to ~12 % of the box; the box
stays the whole object). Train and val identities are disjoint (``train_ids_per_class`` and
``test_ids_per_class`` per class; ids 0..N_train-1 and N_train..N_train+N_test-1): val identities
are never seen in training, so the val split measures one-shot recognition of new identities.
Deterministic and idempotent like the default set.
"""
from __future__ import annotations

import colorsys
import os
from typing import NamedTuple, Union

import cv2
import numpy as np

from .synthetic import SYNTHETIC_CLASSES, _background, _iou, _shape_mask, write_synthetic

__all__ = ['make_synthetic_reid_coco', 'make_identities', 'Identity', 'PATTERNS']

PATTERNS = ('stripes', 'checker', 'dots', 'rings', 'split', 'border')
FREQS = (1.5, 2.5, 3.5)  # pattern repetitions per half object
VERSION = 2


class Identity(NamedTuple):
    id: int
    cls: int
    primary: tuple  # RGB 0..255
    secondary: tuple
    pattern: str
    freq: float  # pattern repetitions per half object
    angle: float  # degrees
    grain: float  # pixel noise std
    key: tuple  # (pattern, frequency, secondary hue bin, secondary dark/light, primary hue step)


def _rgb(h: float, s: float, v: float) -> tuple:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def make_identities(rng: np.random.Generator, per_class: int, first_id: int = 0) -> list[Identity]:
    """``per_class`` identities for each of the 4 classes, ids from ``first_id`` on."""
    out = []
    for cls, (_, base) in enumerate(SYNTHETIC_CLASSES):
        h0, s0, v0 = colorsys.rgb_to_hsv(*(c / 255 for c in base))
        keys: list[tuple] = []
        while len(keys) < per_class:
            key = (str(rng.choice(PATTERNS)), float(rng.choice(FREQS)), int(rng.integers(8)), int(rng.integers(2)),
                   int(rng.integers(3)) - 1)
            if any(sum(a == b for a, b in zip(key, k)) > len(key) - 2 for k in keys):
                continue  # identities of a class differ in at least two attributes
            keys.append(key)
            pattern, freq, hue_bin, light, step = key
            out.append(Identity(
                id=first_id + len(out), cls=cls, primary=_rgb(h0 + step * 20 / 360, max(s0, 0.6), max(v0, 0.75)),
                secondary=_rgb(hue_bin / 8 + 1 / 16, 0.75, 0.95 if light else 0.3), pattern=pattern,
                freq=freq, angle=float(rng.uniform(0, 180)), grain=float(rng.uniform(3, 12)), key=key))
    return out


def _pattern_mask(ident: Identity, mask: np.ndarray, box: tuple, angle: float) -> np.ndarray:
    """bool (h, w): where the secondary colour goes, in the object's own coordinates u, v in
    [-1, 1] (so the pattern scales with the object), rotated by ``angle`` degrees."""
    x0, y0, bw, bh = box
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
    u, v = (xs - (x0 + bw / 2)) / (bw / 2), (ys - (y0 + bh / 2)) / (bh / 2)
    t = np.deg2rad(angle)
    u, v = u * np.cos(t) + v * np.sin(t), -u * np.sin(t) + v * np.cos(t)
    f = ident.freq
    if ident.pattern == 'stripes':
        sec = np.sin(np.pi * f * u) > 0
    elif ident.pattern == 'checker':
        sec = (np.floor(f * u) + np.floor(f * v)) % 2 == 0
    elif ident.pattern == 'dots':
        sec = (np.mod(f * u, 1) - 0.5) ** 2 + (np.mod(f * v, 1) - 0.5) ** 2 < 0.09
    elif ident.pattern == 'rings':
        sec = np.sin(np.pi * f * np.sqrt(u * u + v * v)) > 0
    elif ident.pattern == 'split':  # 2, 4 or 6 sectors around the centre
        sectors = 2 * int(round(f - 0.5))
        sec = np.floor(sectors * (np.arctan2(v, u) + np.pi) / (2 * np.pi)) % 2 == 0
    else:  # border: a band along the outline, its width ~ 1 / (2 freq) of the object
        width = max(2, int(round(min(bw, bh) / (4 * f))))
        sec = ~cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=width).astype(bool)
    return sec & mask.astype(bool)


def _draw_object(rng: np.random.Generator, img: np.ndarray, ident: Identity, box: tuple) -> list:
    """Paint one appearance of ``ident`` in ``box`` (x0, y0, w, h); returns its COCO xywh
    (the whole object, before occlusion)."""
    h, w = img.shape[:2]
    x0, y0, bw, bh = box
    mask = _shape_mask(ident.cls, h, w, x0, y0, bw, bh)
    sec = _pattern_mask(ident, mask, box, ident.angle + rng.uniform(-15, 15))
    gain, shift = rng.uniform(0.85, 1.15), rng.uniform(-10, 10, 3)
    layer = np.where(sec[..., None], np.float32(ident.secondary), np.float32(ident.primary)) * gain + shift
    layer = layer + rng.normal(0, ident.grain, size=layer.shape)
    inside = mask.astype(bool)
    if rng.random() < 0.4:  # blur the object with its own edges (a soft mask)
        sigma = rng.uniform(0.3, 1.0)
        layer = cv2.GaussianBlur(np.where(inside[..., None], layer, img).astype(np.float32), (0, 0), sigma)
        alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)[..., None]
        img[:] = np.clip(alpha * layer + (1 - alpha) * img, 0, 255).astype(np.uint8)
    else:
        img[inside] = np.clip(layer[inside], 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask)
    x1, y1 = int(xs.min()), int(ys.min())
    if rng.random() < 0.2:  # occluder: a muted patch at a random spot of the box
        ow, oh = int(bw * rng.uniform(0.2, 0.35)), int(bh * rng.uniform(0.2, 0.35))
        ox, oy = x0 + int(rng.integers(0, bw - ow + 1)), y0 + int(rng.integers(0, bh - oh + 1))
        grey = rng.uniform(80, 170)
        img[oy:oy + oh, ox:ox + ow] = np.clip(grey + rng.uniform(-15, 15, 3), 0, 255).astype(np.uint8)
    return [x1, y1, int(xs.max()) + 1 - x1, int(ys.max()) + 1 - y1]


def render_reid_image(rng: np.random.Generator, h: int, w: int, identities: list[Identity],
                      min_obj: int = 32, max_obj: int = 120, max_objects: int = 5) -> tuple[np.ndarray, list]:
    """One RGB image and its objects ``[(class, [x, y, w, h], {'instance_id': id}), ...]``."""
    img = _background(rng, h, w)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(30):
            size = float(np.exp(rng.uniform(np.log(min_obj), np.log(max_obj))))
            ar = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
            bw = int(np.clip(round(size * np.sqrt(ar)), min_obj, min(max_obj, w - 2)))
            bh = int(np.clip(round(size / np.sqrt(ar)), min_obj, min(max_obj, h - 2)))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            if all(_iou((x0, y0, x0 + bw, y0 + bh), p) <= 0.1 for p in placed):
                break
        else:
            continue
        ident = identities[int(rng.integers(len(identities)))]
        bbox = _draw_object(rng, img, ident, (x0, y0, bw, bh))
        placed.append((x0, y0, x0 + bw, y0 + bh))
        objects.append((ident.cls, bbox, {'instance_id': ident.id}))
    return img, objects


def make_synthetic_reid_coco(root: Union[str, os.PathLike], num_train: int = 600, num_val: int = 80,
                             seed: int = 0, train_ids_per_class: int = 25, test_ids_per_class: int = 5) -> dict:
    """Write (or find) the identities set under ``root``; the paths as ``make_synthetic_coco``."""
    bank = make_identities(np.random.default_rng([seed, 2]), train_ids_per_class + test_ids_per_class)
    per = train_ids_per_class + test_ids_per_class  # the bank is class by class: split each class's
    train = [i for i in bank if (i.id % per) < train_ids_per_class]
    test = [i for i in bank if (i.id % per) >= train_ids_per_class]
    renumber = {i.id: n for n, i in enumerate(train + test)}  # train 0..N_train-1, then test
    train = [i._replace(id=renumber[i.id]) for i in train]
    test = [i._replace(id=renumber[i.id]) for i in test]
    info = {'description': 'gfl_det synthetic shapes with identities', 'version': VERSION,
            'num_train': int(num_train), 'num_val': int(num_val), 'seed': int(seed),
            'identities': {'train': len(train), 'test': len(test)}}

    def render(rng, h, w, split):
        return render_reid_image(rng, h, w, train if split == 'train' else test)
    return write_synthetic(root, info, num_train, num_val, seed, render)
