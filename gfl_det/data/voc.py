"""Pascal VOC XML -> COCO instances dict (for custom datasets; CLI: ``tools/voc2coco.py``).

Conventions, as MMDetection's ``tools/dataset_converters/pascal_voc.py`` (the reference):

* VOC pixel indices are 1-based: every coordinate gets ``- 1``; COCO ``bbox`` is
  ``[xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]``.
* ``difficult=1`` objects are written with ``iscrowd=1``: not trained on, ignored by COCO
  evaluation (VOC's rule for difficult objects).
* Categories: ids 1..C in the order of ``classes`` (default: the names found, sorted).

Bad boxes are **not written** and are reported by file name in the returned report
(``report['degenerate']`` = list of ``(xml_file, class, [xmin, ymin, xmax, ymax])``): a box of
zero or negative width/height (``xmax <= xmin`` or ``ymax <= ymin``) is a labelling slip that
would only be dropped again at load. Boxes crossing the image border are clipped and counted
(``report['clipped']``). Objects of a class outside ``classes`` are reported as
``report['unknown_class']``. A missing/unreadable XML or image raises ``DatasetError``.

The VOC root is the folder holding ``Annotations/``, ``JPEGImages/`` and
``ImageSets/Main/``, or a folder with exactly one such sub-folder (``bccd/`` -> ``bccd/BCCD``,
``VOCdevkit/`` with one year).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

from .validation import DatasetError

__all__ = ['find_voc_root', 'voc_to_coco']


def find_voc_root(root: Union[str, os.PathLike]) -> Path:
    """The folder with ``Annotations/``: ``root`` itself or its only sub-folder having one."""
    root = Path(root)
    if (root / 'Annotations').is_dir():
        return root
    subs = sorted(p for p in root.iterdir() if (p / 'Annotations').is_dir()) \
        if root.is_dir() else []
    if len(subs) == 1:
        return subs[0]
    raise DatasetError(f'{root} is not a Pascal VOC folder: no Annotations/ in it'
                       + (f' and several sub-folders have one ({", ".join(p.name for p in subs)});'
                          ' fix: pass one of them' if subs else
                          '; fix: pass the folder holding Annotations/ and JPEGImages/'))


def _split_ids(voc: Path, splits: Sequence[str]) -> list[str]:
    ids: list[str] = []
    for split in splits:
        f = voc / 'ImageSets' / 'Main' / f'{split}.txt'
        if not f.is_file():
            have = sorted(p.stem for p in (voc / 'ImageSets' / 'Main').glob('*.txt')) \
                if (voc / 'ImageSets' / 'Main').is_dir() else []
            raise DatasetError(f'split file not found: {f}; fix: use one of {have[:20]} '
                               "or --split all")
        ids += [line.split()[0] for line in f.read_text().splitlines() if line.strip()]
    dup = [k for k, c in Counter(ids).items() if c > 1]
    if dup:
        raise DatasetError(f'splits {list(splits)} overlap ({len(dup)} images in more than one, '
                           f'e.g. {dup[:3]}); fix: use disjoint splits, e.g. trainval,test')
    return ids


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size  # (w, h)
    except (OSError, ValueError) as e:
        raise DatasetError(f'cannot read image {path} ({e}); fix: restore the file or remove '
                           'its XML') from None


def voc_to_coco(voc_root: Union[str, os.PathLike], splits: Union[None, str, Sequence[str]] = None,
                classes: Optional[Sequence[str]] = None, check_images: bool = True
                ) -> tuple[dict, dict]:
    """Convert a VOC dataset to a COCO instances dict.

    Args:
        voc_root: see the module docstring.
        splits: ``None`` or ``'all'`` -> every XML in ``Annotations/``; else split names of
            ``ImageSets/Main`` (``'trainval'``, ``['trainval', 'test']``, ``'trainval,test'``).
        classes: category names in label order (default: sorted names found).
        check_images: the image must exist; its real size is compared with the XML's (and
            used when the XML has none).

    Returns:
        ``(coco, report)``; ``coco['images'][i]['file_name']`` is relative to
        ``report['img_dir']``. ``report``: ``voc_root, img_dir, num_images, num_objects``
        (objects read), ``num_boxes`` (written), ``class_counts`` (written),
        ``degenerate``, ``clipped``, ``unknown_class``, ``difficult``.
    """
    voc = find_voc_root(voc_root)
    img_dir = voc / 'JPEGImages'
    if isinstance(splits, str):
        splits = None if splits == 'all' else [s for s in splits.split(',') if s]
    if splits:
        ids = _split_ids(voc, splits)
        xml_files = [voc / 'Annotations' / f'{i}.xml' for i in ids]
    else:
        xml_files = sorted((voc / 'Annotations').glob('*.xml'))
    if not xml_files:
        raise DatasetError(f'no XML annotation in {voc / "Annotations"}; fix: check the folder')

    parsed = []
    for xf in xml_files:
        if not xf.is_file():
            raise DatasetError(f'annotation listed in the split but missing: {xf}; fix: restore '
                               'it or remove the id from the split file')
        try:
            root = ET.parse(xf).getroot()
        except ET.ParseError as e:
            raise DatasetError(f'cannot parse {xf} ({e}); fix: repair or remove it') from None
        name = (root.findtext('filename') or '').strip()
        if not name or not (img_dir / name).is_file():
            # some VOC tools write the file name without extension, or a stale one
            for cand in ([name + '.jpg'] if name and '.' not in name else []) + [xf.stem + '.jpg']:
                if (img_dir / cand).is_file():
                    name = cand
                    break
        w = int(float(root.findtext('size/width') or 0))
        h = int(float(root.findtext('size/height') or 0))
        if check_images:
            if not (img_dir / name).is_file():
                raise DatasetError(f'image of {xf.name} not found: {img_dir / name}; fix: '
                                   'restore it or remove the XML')
            rw, rh = _image_size(img_dir / name)
            if (w, h) == (0, 0):
                w, h = rw, rh
            elif (w, h) != (rw, rh):
                raise DatasetError(f'{xf}: <size> says {w}x{h} but {name} is {rw}x{rh}; fix: '
                                   'correct the XML')
        if w <= 0 or h <= 0:
            raise DatasetError(f'{xf}: no image size (<size> missing/zero); fix: add it, or '
                               'keep check_images on so it is read from the image')
        objs = []
        for o in root.findall('object'):
            cls = (o.findtext('name') or '').strip()
            try:
                box = [float(o.findtext(f'bndbox/{k}')) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
            except (TypeError, ValueError):
                raise DatasetError(f'{xf}: object {cls!r} has no valid <bndbox>; fix: repair '
                                   'or delete it') from None
            objs.append((cls, box, int(float(o.findtext('difficult') or 0))))
        parsed.append((xf, name, w, h, objs))

    if classes is None:
        classes = sorted({c for *_, objs in parsed for c, _, _ in objs})
    classes = list(classes)
    cat_id = {c: i + 1 for i, c in enumerate(classes)}

    report = {'voc_root': str(voc), 'img_dir': str(img_dir), 'num_images': len(parsed),
              'num_objects': 0, 'num_boxes': 0, 'class_counts': Counter(), 'degenerate': [],
              'clipped': [], 'unknown_class': [], 'difficult': 0}
    images, anns = [], []
    for img_id, (xf, name, w, h, objs) in enumerate(parsed, 1):
        images.append({'id': img_id, 'file_name': name, 'width': w, 'height': h})
        for cls, (x1, y1, x2, y2), difficult in objs:
            report['num_objects'] += 1
            if cls not in cat_id:
                report['unknown_class'].append((xf.name, cls))
                continue
            if not (x2 > x1 and y2 > y1):
                report['degenerate'].append((xf.name, cls, [x1, y1, x2, y2]))
                continue
            # VOC 1-based pixel indices -> 0-based (as mmdet's converter), then clip
            b = [x1 - 1, y1 - 1, x2 - 1, y2 - 1]
            c = [min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w),
                 min(max(b[3], 0), h)]
            if c != b:
                report['clipped'].append((xf.name, cls, [x1, y1, x2, y2]))
                if not (c[2] > c[0] and c[3] > c[1]):
                    report['degenerate'].append((xf.name, cls, [x1, y1, x2, y2]))
                    continue
            bw, bh = c[2] - c[0], c[3] - c[1]
            report['difficult'] += difficult
            report['class_counts'][cls] += 1
            anns.append({'id': len(anns) + 1, 'image_id': img_id, 'category_id': cat_id[cls],
                         'bbox': [c[0], c[1], bw, bh], 'area': bw * bh,
                         'iscrowd': int(bool(difficult)), 'segmentation': []})
    report['num_boxes'] = len(anns)
    report['class_counts'] = dict(report['class_counts'])
    coco = {'info': {'description': f'converted from Pascal VOC {voc}',
                     'splits': list(splits) if splits else 'all'},
            'images': images, 'annotations': anns,
            'categories': [{'id': cat_id[c], 'name': c, 'supercategory': 'none'}
                           for c in classes]}
    return coco, report
