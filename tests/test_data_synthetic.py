"""Synthetic shapes dataset: deterministic from the seed, idempotent, tight boxes, CLI."""
import json

import numpy as np
import pytest

from gfl_det.data import CocoDataset, load_image
from gfl_det.data.synthetic import SYNTHETIC_CLASSES, main, make_synthetic_coco


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp('a')
    return root, make_synthetic_coco(root, num_train=12, num_val=4, seed=0)


def test_same_seed_same_bytes_other_seed_differs(syn, tmp_path):
    root, _ = syn
    make_synthetic_coco(tmp_path / 'b', num_train=12, num_val=4, seed=0)
    make_synthetic_coco(tmp_path / 'c', num_train=12, num_val=4, seed=1)
    a, b, c = files(root), files(tmp_path / 'b'), files(tmp_path / 'c')
    assert len(a) == 12 + 4 + 2
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == len(a)
    # the validation split does not depend on the size of the training split
    make_synthetic_coco(tmp_path / 'd', num_train=3, num_val=4, seed=0)
    d = files(tmp_path / 'd')
    assert all(d[k] == a[k] for k in a if k.startswith('val/'))


def test_idempotent_and_redone_when_incomplete(syn):
    root, paths = syn
    ann = root / 'annotations' / 'instances_train.json'
    before = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
    assert make_synthetic_coco(root, num_train=12, num_val=4, seed=0) == paths
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
    content = files(root)
    (root / 'train' / 'train_00003.jpg').unlink()                 # incomplete -> rewritten
    make_synthetic_coco(root, num_train=12, num_val=4, seed=0)
    assert files(root) == content
    assert ann.stat().st_mtime_ns != before[ann]


def test_content_is_learnable_shapes(syn):
    root, paths = syn
    data = json.loads(open(paths['train_ann']).read())
    assert [c['name'] for c in data['categories']] == [n for n, _ in SYNTHETIC_CLASSES]
    ds = CocoDataset(paths['train_ann'], paths['train_img_dir'], dict(scale=None, flip_prob=0))
    assert len(ds) == 12 and not ds.skipped.errors and not ds.skipped.warnings
    shapes, hits, total = set(), 0, 0
    for i in range(len(ds)):
        info = ds.get_ann_info(i)
        img = load_image(ds.img_path(i)).astype(np.float32)
        shapes.add((info['height'], info['width']))
        assert 1 <= len(info['boxes']) <= 5
        wh = info['boxes'][:, 2:] - info['boxes'][:, :2]
        assert (wh >= 16).all() and (wh <= 121).all()    # 16-120 px, ellipses +-1 px
        for box, label in zip(info['boxes'].astype(int), info['labels']):
            x1, y1, x2, y2 = box
            cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
            centre = img[cy - 1:cy + 2, cx - 1:cx + 2].mean((0, 1))
            # the box centre is inside every shape and has the class colour (+-20 jitter,
            # JPEG), unless another shape overlaps there (IoU <= 0.1 keeps that rare)
            hits += np.abs(centre - SYNTHETIC_CLASSES[label][1]).max() < 45
            total += 1
            # tight: the row through the centre leaves the shape at the box edges
    assert hits >= 0.9 * total
    assert len(shapes) >= 2


def test_cli(tmp_path, capsys):
    main(['--out', str(tmp_path / 's'), '--num-train', '2', '--num-val', '1', '--seed', '5'])
    out = json.loads(capsys.readouterr().out)
    assert out['train_ann'].endswith('instances_train.json')
    assert len(list((tmp_path / 's' / 'train').glob('*.jpg'))) == 2
