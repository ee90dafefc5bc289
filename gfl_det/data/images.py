"""Reading image files: a decode that fails loudly (:func:`load_image`) and the load-time
check of a file against the size its JSON entry gives (:func:`check_image_file`). Problems are
:class:`gfl_det.data.validation.BadImageError` with the reasons of
:data:`gfl_det.data.validation.SEVERITY` (``missing_image``, ``corrupt_image``,
``size_mismatch``)."""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from .validation import BadImageError

__all__ = ['check_image_file', 'load_image']


def check_image_file(path: Union[str, os.PathLike], height: int, width: int,
                     level: str = 'header') -> Optional[tuple[str, str]]:
    """Check one image file. Returns ``None`` if fine else ``(reason, detail)``.

    ``level``: ``'exists'`` (stat only), ``'header'`` (PIL reads the size, EXIF rotation
    applied the way cv2.imread applies it), ``'decode'`` (full decode, as training does).
    """
    path = str(path)
    if not os.path.isfile(path):
        return 'missing_image', 'no such file'
    if level == 'exists':
        return None
    if level == 'decode':
        try:
            img = load_image(path)          # what training does
            from PIL import Image
            with Image.open(path) as im:    # strict: also catches truncated files, which
                im.load()                   # cv2 decodes with a grey bottom and a warning
        except BadImageError as e:
            return e.reason, str(e)
        except OSError as e:
            return 'corrupt_image', str(e)
        h, w = img.shape[:2]
    else:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                w, h = im.size
                try:
                    if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # rotated 90/270
                        w, h = h, w
                except Exception:  # noqa: BLE001 - a broken EXIF block is not our concern here
                    pass
        except (UnidentifiedImageError, OSError) as e:
            return 'corrupt_image', str(e)
    if (h, w) != (height, width):
        return 'size_mismatch', f'file is {w}x{h}, JSON says {width}x{height}'
    return None


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Decode an image file as RGB uint8 (H, W, 3); :class:`BadImageError` if impossible.

    cv2.imread (as mmcv's default backend): applies the EXIF orientation, as MMDetection does.
    """
    import cv2
    path = str(path)
    if not os.path.isfile(path):
        raise BadImageError(path, 'missing_image', 'no such file')
    if _jpeg_truncated(path):  # before cv2, whose libjpeg would print its own warning first
        raise BadImageError(path, 'corrupt_image', 'truncated JPEG: the file ends before the '
                            'end-of-image marker (cv2 would fill the rest with grey)')
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3 or img.size == 0:
        raise BadImageError(path, 'corrupt_image', 'cv2 could not decode it')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _jpeg_truncated(path: str) -> bool:
    """True for a JPEG cut short (an interrupted download or copy).

    cv2 decodes such a file "successfully", the missing rows grey, with only a libjpeg warning
    on stderr. Cheap test first: a complete JPEG ends with the EOI marker ``FF D9`` (trailing
    zero / whitespace padding allowed), checked by reading 2 + 64 bytes. Files that start as a
    JPEG but do not end that way (some cameras append data after EOI) are decoded strictly by
    PIL, which raises on a truncated file: only that decides.
    """
    with open(path, 'rb') as f:
        if f.read(2) != b'\xff\xd8':
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        tail = f.read().rstrip(b'\x00\r\n\t ')
    if tail.endswith(b'\xff\xd9'):
        return False
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
    except OSError:
        return True
    return False
