"""Identities of the annotated objects, for the embedding branch (``model.bbox_head.embed``).

Two sources (``CocoDataset(identities=...)``):

* ``'instance_id'``: an ``instance_id`` field on every (non-crowd) annotation, as MOT / TAO style
  COCO files carry it (a track id: the same object in many frames). Values must be ints; they
  are mapped to contiguous identities 0..K-1 in ascending order (``identity_names`` keeps the
  JSON's values). A file where only some annotations have one, or where one is not an int, is
  refused with an :class:`IdentityError` naming the annotations.
* ``'annotation'``: every annotation is its own identity (its annotation id). Meaningful with
  :class:`MultiViewDataset`: two independently augmented views of each image put every object
  in the batch twice, so the loss learns to match an object across augmentations (instance
  discrimination from static images, for data without identities); ``views.py``.

A sample then carries ``ids`` (n,) int64 beside ``boxes`` and ``labels`` (transforms never drop
or reorder boxes), and :func:`gfl_det.data.collate` builds ``Targets.ids``.
"""
from __future__ import annotations

import numpy as np

from .validation import DatasetError

__all__ = ['IdentityError', 'IDENTITY_SOURCES', 'annotation_identities', 'lookup']

IDENTITY_SOURCES = ('instance_id', 'annotation')


class IdentityError(DatasetError):
    """The annotations' identities cannot be used (the message names which and why)."""


def _where(a: dict, file_of: dict) -> str:
    return f"annotation id {a.get('id')} ({file_of.get(a.get('image_id'), 'image id %s' % a.get('image_id'))})"


def annotation_identities(data: dict, source: str, ann_file: str = '<dict>') -> tuple[dict, list]:
    """``({annotation id: identity 0..K-1}, names)`` of a COCO dict; ``names[k]`` is identity k's
    value in the JSON (the instance_id, or the annotation id). Crowd annotations need none."""
    if source not in IDENTITY_SOURCES:
        raise ValueError(f"identities={source!r}: use one of {IDENTITY_SOURCES} (or None)")
    anns = [a for a in data.get('annotations', []) if not a.get('iscrowd', 0)]
    if source == 'annotation':
        names = sorted({int(a['id']) for a in anns if 'id' in a})
        index = {n: k for k, n in enumerate(names)}
        return {int(a['id']): index[int(a['id'])] for a in anns if 'id' in a}, names
    file_of = {im.get('id'): im.get('file_name') for im in data.get('images', [])}
    missing = [a for a in anns if 'instance_id' not in a]
    if len(missing) == len(anns) and anns:
        raise IdentityError(f"{ann_file}: identities='instance_id' but no annotation has an 'instance_id'; "
                            'add them (MOT / TAO style), or train on two views of each image '
                            "(MultiViewDataset, views=2: every annotation its own identity)")
    if missing:
        raise IdentityError(f"{ann_file}: 'instance_id' on only {len(anns) - len(missing)} of {len(anns)} "
                            f"annotations; missing on {len(missing)}, e.g. "
                            + '; '.join(_where(a, file_of) for a in missing[:5])
                            + '. Every non-crowd annotation needs one (or none, with views=2)')
    bad = [a for a in anns if not isinstance(a['instance_id'], int) or isinstance(a['instance_id'], bool)]
    if bad:
        raise IdentityError(f"{ann_file}: 'instance_id' must be an int; {len(bad)} are not, e.g. "
                            + '; '.join(f"{_where(a, file_of)}: {a['instance_id']!r}" for a in bad[:5]))
    names = sorted({a['instance_id'] for a in anns})
    index = {n: k for k, n in enumerate(names)}
    return {int(a['id']): index[a['instance_id']] for a in anns}, names


def lookup(mapping: dict, ann_ids: np.ndarray) -> np.ndarray:
    """(n,) identities of annotation ids (-1 for an id without one)."""
    return np.array([mapping.get(int(i), -1) for i in ann_ids], np.int64)
