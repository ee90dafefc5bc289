"""All drawing of gfl_det: detections, ground truth, labels that stay readable, saving images.

Images are RGB uint8 (H, W, 3) throughout (:func:`save_image` converts for cv2). Three rules keep
a picture readable whatever is under the boxes:

* **Box outline**: every box line is drawn over a 1-px wider border in black or white, whichever
  contrasts more with the image under the line (a red box stays visible on a red object).
* **Label text colour** by contrast with the label's fill: black or white, whichever has the
  higher WCAG contrast ratio with the fill (>= 4.58 for every fill colour).
* **Label placement** (:func:`place_labels`): greedy, best score first: above the box, inside
  its top, below it, inside its bottom (left- then right-aligned), clamped into the image;
  a position overlapping an already placed label is skipped; a label with no free position is
  left out (its box is still drawn).
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ['color', 'text_color', 'contrast_ratio', 'luminance', 'place_labels', 'draw_boxes',
           'draw_detections', 'contact_sheet', 'save_image', 'BAD_COLOR']

RGB = tuple[int, int, int]
Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (inclusive-exclusive), pixels
BAD_COLOR: RGB = (255, 0, 255)  # boxes the dataset drops or clips (tools/browse_dataset.py)


def color(label: int) -> RGB:
    """A distinct, stable RGB colour per class (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour (0 black .. 1 white)."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ [0.2126, 0.7152, 0.0722])


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG contrast ratio of two colours (1 .. 21)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color(fill: Sequence[float]) -> RGB:
    """Black or white, whichever contrasts more with ``fill``."""
    black, white = (0, 0, 0), (255, 255, 255)
    return black if contrast_ratio(black, fill) >= contrast_ratio(white, fill) else white


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: np.ndarray, sizes: Sequence[tuple[int, int]], image_hw: tuple[int, int]
                 ) -> list[Optional[Rect]]:
    """Where each box's label goes (None: no free place), in the order given (put the most
    important first). ``sizes``: (w, h) of each label in pixels. Every rect lies inside the
    image and no two overlap."""
    H, W = image_hw
    placed: list[Rect] = []
    out: list[Optional[Rect]] = []
    for (x1, y1, x2, y2), (tw, th) in zip(np.asarray(boxes, np.float64).reshape(-1, 4), sizes):
        x1, y1, x2, y2 = (int(round(v)) for v in (x1, y1, x2, y2))
        spot = None
        if tw <= W and th <= H:
            for top in (y1 - th, y1, y2, y2 - th):  # above, inside top, below, inside bottom
                for left in (x1, x2 - tw):
                    x = min(max(left, 0), W - tw)
                    y = min(max(top, 0), H - th)
                    r = (x, y, x + tw, y + th)
                    if not any(_overlaps(r, p) for p in placed):
                        spot = r
                        break
                if spot:
                    break
        if spot:
            placed.append(spot)
        out.append(spot)
    return out


def _outline_color(image: np.ndarray, box: Sequence[int], width: int) -> RGB:
    """Black or white, whichever contrasts more with the mean colour under the box's border."""
    H, W = image.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0), W - 1), min(max(x2, 0), W - 1)))
    y1, y2 = sorted((min(max(y1, 0), H - 1), min(max(y2, 0), H - 1)))
    w = max(1, width)
    strips = [image[y1:y1 + w, x1:x2 + 1], image[max(y2 - w + 1, 0):y2 + 1, x1:x2 + 1],
              image[y1:y2 + 1, x1:x1 + w], image[y1:y2 + 1, max(x2 - w + 1, 0):x2 + 1]]
    pix = np.concatenate([s.reshape(-1, 3) for s in strips])
    return text_color(pix.mean(0) if len(pix) else (128, 128, 128))


def _dashed_rectangle(img: np.ndarray, p1: tuple[int, int], p2: tuple[int, int], col: RGB,
                      thickness: int, dash: int = 8) -> None:
    import cv2
    (x1, y1), (x2, y2) = p1, p2
    for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        n = max(1, int(np.hypot(b[0] - a[0], b[1] - a[1]) // dash))
        for i in range(0, n, 2):
            s = (int(a[0] + (b[0] - a[0]) * i / n), int(a[1] + (b[1] - a[1]) * i / n))
            e = (int(a[0] + (b[0] - a[0]) * min(i + 1, n) / n), int(a[1] + (b[1] - a[1]) * min(i + 1, n) / n))
            cv2.line(img, s, e, col, thickness)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, texts: Sequence[str], colors: Sequence[RGB],
               thickness: int = 2, dashed: Optional[Sequence[bool]] = None) -> tuple[np.ndarray, list]:
    """A copy of ``image`` with the boxes (most important first) and their labels drawn.

    Boxes are drawn last-to-first (the first on top); labels after all boxes, placed by
    :func:`place_labels`. Returns (image, label rects: one per box, None where left out)."""
    import cv2
    img = np.ascontiguousarray(image.copy())
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    dashed = dashed if dashed is not None else [False] * len(boxes)
    for i in reversed(range(len(boxes))):
        p1 = (int(round(boxes[i, 0])), int(round(boxes[i, 1])))
        p2 = (int(round(boxes[i, 2])), int(round(boxes[i, 3])))
        edge = _outline_color(image, (*p1, *p2), thickness + 2)
        if dashed[i]:
            _dashed_rectangle(img, p1, p2, edge, thickness + 2)
            _dashed_rectangle(img, p1, p2, colors[i], thickness)
        else:
            cv2.rectangle(img, p1, p2, edge, thickness + 2)
            cv2.rectangle(img, p1, p2, colors[i], thickness)
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(img.shape[:2]) / 900)
    metrics = [cv2.getTextSize(t, font, fs, 1) for t in texts]
    sizes = [(tw + 4, th + base + 4) for (tw, th), base in metrics]
    rects = place_labels(boxes, sizes, img.shape[:2])
    for text, rect, col, ((tw, th), base) in zip(texts, rects, colors, metrics):
        if rect is None:
            continue
        x1, y1, x2, y2 = rect
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), col, -1)
        cv2.putText(img, text, (x1 + 2, y1 + 2 + th), font, fs, text_color(col), 1, cv2.LINE_AA)
    return img, rects


def _numpy(x) -> np.ndarray:
    if hasattr(x, 'detach'):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def draw_detections(image: np.ndarray, result: dict, class_names: Optional[Sequence[str]] = None,
                    score_thr: float = 0.3, thickness: int = 2,
                    texts: Optional[Sequence[str]] = None) -> np.ndarray:
    """A copy of the RGB uint8 ``image`` with the boxes of ``result`` (an
    :func:`gfl_det.apis.inference_detector` dict, or a model prediction) scoring at least
    ``score_thr``, each labelled ``'name 0.87'`` -- or ``texts[i]`` for detection i where given
    (e.g. the identity a gallery gives it); higher scores on top and labelled first."""
    boxes = _numpy(result['bboxes']).reshape(-1, 4)
    scores = _numpy(result['scores']).reshape(-1)
    labels = _numpy(result['labels']).reshape(-1).astype(np.int64)
    order = [i for i in np.argsort(-scores, kind='stable') if scores[i] >= score_thr]
    names = [class_names[labels[i]] if class_names is not None and labels[i] < len(class_names)
             else str(labels[i]) for i in order]
    texts = [f'{n} {scores[i]:.2f}' if texts is None else texts[i] for n, i in zip(names, order)]
    return draw_boxes(image, boxes[order], texts, [color(labels[i]) for i in order], thickness)[0]


def contact_sheet(tiles: Sequence[np.ndarray], captions: Sequence[str] = (), tile: int = 96,
                  columns: int = 8) -> np.ndarray:
    """RGB crops side by side on a grid (``columns`` wide), each fitted into a ``tile`` x ``tile``
    cell keeping its aspect ratio, with its caption (if any) under it: one picture of a cluster."""
    import cv2
    rows = max(1, -(-len(tiles) // columns))
    cap_h = 14 if captions else 0
    sheet = np.full((rows * (tile + cap_h + 4) + 4, min(len(tiles), columns) * (tile + 4) + 4, 3), 255, np.uint8)
    for n, crop in enumerate(tiles):
        y, x = 4 + (n // columns) * (tile + cap_h + 4), 4 + (n % columns) * (tile + 4)
        h, w = crop.shape[:2]
        f = tile / max(h, w, 1)
        small = cv2.resize(crop, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        sheet[y:y + small.shape[0], x:x + small.shape[1]] = small
        if n < len(captions):
            cv2.putText(sheet, str(captions[n])[:16], (x, y + tile + cap_h - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def save_image(path: Union[str, os.PathLike], image_rgb: np.ndarray) -> str:
    """Write an RGB image (PNG/JPEG by extension); returns the path."""
    import cv2
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')
    return path
