"""Drawing detections on images: one place for every picture gfl_det writes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['draw_detections', 'save_image']


def _color(label: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per class (golden-ratio hue steps)."""
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, result: dict, class_names: Optional[Sequence[str]] = None,
                    score_thr: float = 0.3, thickness: int = 2) -> np.ndarray:
    """A copy of the RGB uint8 ``image`` with the boxes of ``result`` (an
    :func:`inference_detector` dict, or a model prediction) drawn above ``score_thr``, each
    labelled ``'name 0.87'``."""
    import cv2
    img = np.ascontiguousarray(image.copy())

    def arr(x):
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    boxes, scores = arr(result['bboxes']).reshape(-1, 4), arr(result['scores']).reshape(-1)
    labels = arr(result['labels']).reshape(-1).astype(np.int64)
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, max(0.4, min(img.shape[:2]) / 900)
    for i in np.argsort(scores):  # highest score drawn last (on top)
        if scores[i] < score_thr:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        lab = int(labels[i])
        color = _color(lab)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thickness)
        name = class_names[lab] if class_names is not None and lab < len(class_names) else str(lab)
        text = f'{name} {scores[i]:.2f}'
        (tw, th), base = cv2.getTextSize(text, font, fs, 1)
        ty = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1  # above the box, else inside
        tx = max(0, min(x1, img.shape[1] - tw - 2))  # keep the label inside the picture
        cv2.rectangle(img, (tx, ty), (tx + tw + 2, ty + th + base + 2), color, -1)
        cv2.putText(img, text, (tx + 1, ty + th + 1), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def save_image(path: Union[str, os.PathLike], image_rgb: np.ndarray) -> str:
    """Write an RGB image (PNG/JPEG by extension); returns the path."""
    import cv2
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f'could not write {path}')
    return path
