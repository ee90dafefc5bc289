"""CocoDataset + transforms: category mapping, filtering, crowd, and exact box round trips.

The round-trip tests map the pipeline's boxes back (undo flip, then scale) and compare them with
the JSON's boxes to 1e-3 px, on a JSON written here with the awkward parts of real COCO and on
the real coco128 subset when ../shared/datasets is present.
"""
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gfl_det.data import (CocoDataset, KeepRatioResize, build_transforms, collate,
                          rescale_size)

SHARED = Path(os.environ.get('GFL_DET_SHARED') or Path(__file__).parents[2] / 'shared') / 'datasets'
COCO128 = SHARED / 'coco128'


def write_image(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def awkward_coco(tmp_path):
    """A COCO JSON with ids up to 90 (out of order), crowd boxes, an image without boxes,
    a too-small image, polygon segmentations, portrait and landscape images."""
    img_dir = tmp_path / 'images'
    img_dir.mkdir()
    images = [  # id, name, h, w
        (397133, 'a.jpg', 96, 128), (37777, 'b.jpg', 120, 80), (252219, 'c.jpg', 64, 64),
        (87038, 'empty.jpg', 50, 70), (11, 'tiny.jpg', 24, 40)]
    for k, (_, name, h, w) in enumerate(images):
        write_image(img_dir / name, h, w, seed=k)
    cats = [{'id': 90, 'name': 'toothbrush', 'supercategory': 'indoor'},
            {'id': 1, 'name': 'person', 'supercategory': 'person'},
            {'id': 44, 'name': 'bottle', 'supercategory': 'kitchen'}]
    poly = [[10.0, 10.0, 20.0, 10.0, 20.0, 20.0]]
    anns = [
        # image a: 2 normal (one touching the right border exactly), 1 crowd (RLE-ish)
        (1, 397133, 1, [10.5, 20.25, 30.0, 40.5], 0),
        (2, 397133, 90, [100.0, 0.0, 28.0, 96.0], 0),
        (3, 397133, 44, [0.0, 0.0, 50.0, 50.0], 1),
        # image b (portrait): one box of each class
        (4, 37777, 44, [5.0, 7.0, 11.0, 13.0], 0),
        (5, 37777, 1, [40.2, 60.7, 39.8, 59.3], 0),
        (6, 37777, 90, [0.0, 100.0, 10.0, 20.0], 0),
        # image c: only a crowd box (kept for training, as mmdet)
        (7, 252219, 1, [1.0, 1.0, 30.0, 30.0], 1),
        # tiny image has a box but is < 32 px: filtered in training
        (8, 11, 1, [1.0, 1.0, 5.0, 5.0], 0),
    ]
    data = {
        'info': {}, 'licenses': [],
        'images': [{'id': i, 'file_name': n, 'height': h, 'width': w, 'license': 1}
                   for i, n, h, w in images],
        'annotations': [{'id': a, 'image_id': i, 'category_id': c, 'bbox': b, 'iscrowd': cr,
                         'area': b[2] * b[3],
                         'segmentation': ({'counts': [0, 5], 'size': [96, 128]} if cr else poly)}
                        for a, i, c, b, cr in anns],
        'categories': cats}
    ann_file = tmp_path / 'instances.json'
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir, data


def json_boxes(data, img_id, crowd=False):
    """xyxy float64 of an image's boxes straight from the JSON, clipped to the image."""
    im = next(i for i in data['images'] if i['id'] == img_id)
    out = []
    for a in data['annotations']:
        if a['image_id'] == img_id and bool(a.get('iscrowd', 0)) == crowd:
            x, y, w, h = a['bbox']
            out.append([max(x, 0), max(y, 0), min(x + w, im['width']), min(y + h, im['height'])])
    return np.array(out, np.float64).reshape(-1, 4)


def json_labels(data, img_id):
    cat_ids = sorted(c['id'] for c in data['categories'])
    return [cat_ids.index(a['category_id']) for a in data['annotations']
            if a['image_id'] == img_id and not a.get('iscrowd', 0)]


def test_category_mapping_and_classes_come_from_json(tmp_path):
    ann_file, img_dir, data = awkward_coco(tmp_path)
    ds = CocoDataset(ann_file, img_dir, dict(scale=None, flip_prob=0))
    assert ds.cat_ids == [1, 44, 90]
    assert ds.classes == ('person', 'bottle', 'toothbrush')
    assert ds.label2cat == {0: 1, 1: 44, 2: 90}
    assert all(ds.cat2label[ds.label2cat[k]] == k for k in range(3))
    i = ds.img_ids.index(37777)
    assert ds[i]['labels'].tolist() == [1, 0, 2] == json_labels(data, 37777)


def test_training_filters_empty_and_small_images_eval_keeps_all(tmp_path):
    ann_file, img_dir, _ = awkward_coco(tmp_path)
    train = CocoDataset(ann_file, img_dir, dict(scale=None))
    assert sorted(train.img_ids) == sorted([397133, 37777, 252219])
    assert train.skipped['no_boxes'] == 1 and train.skipped.files('no_boxes') == ['empty.jpg']
    assert train.skipped['too_small'] == 1 and train.skipped.files('too_small') == ['tiny.jpg']
    assert not train.skipped.errors
    test = CocoDataset(ann_file, img_dir, dict(scale=None), test_mode=True)
    assert test.img_ids == [397133, 37777, 252219, 87038, 11]       # JSON order, all of them
    # configurable
    keep = CocoDataset(ann_file, img_dir, dict(scale=None), filter_empty_gt=False, min_size=0)
    assert len(keep) == 5


def test_crowd_boxes_are_ignore_regions_not_targets(tmp_path):
    ann_file, img_dir, data = awkward_coco(tmp_path)
    ds = CocoDataset(ann_file, img_dir, dict(scale=None, flip_prob=0))
    i = ds.img_ids.index(397133)
    info = ds.get_ann_info(i)
    np.testing.assert_allclose(info['boxes'], json_boxes(data, 397133), atol=1e-4)
    np.testing.assert_allclose(info['boxes_ignore'], [[0, 0, 50, 50]])
    assert len(ds[i]['boxes']) == 2
    j = ds.img_ids.index(252219)                      # crowd-only image: no targets
    assert ds[j]['boxes'].shape == (0, 4) and ds[j]['labels'].shape == (0,)


def test_sample_follows_contract(tmp_path):
    ann_file, img_dir, _ = awkward_coco(tmp_path)
    ds = CocoDataset(ann_file, img_dir, dict(scale=(200, 150), flip_prob=0))
    s = ds[ds.img_ids.index(397133)]
    assert s['image'].dtype == torch.uint8 and s['image'].shape == (3, 150, 200)
    assert s['boxes'].dtype == torch.float32 and s['boxes'].shape == (2, 4)
    assert s['labels'].dtype == torch.int64
    m = s['meta']
    assert m['img_id'] == 397133 and m['file_name'] == 'a.jpg'
    assert m['ori_shape'] == (96, 128) and m['img_shape'] == (150, 200) and m['flip'] is False
    assert m['scale_factor'] == pytest.approx((200 / 128, 150 / 96))
    # RGB order: the decoded pixels equal cv2's BGR read flipped on channels
    raw = cv2.imread(str(img_dir / 'a.jpg'))[:, :, ::-1]
    ds1 = CocoDataset(ann_file, img_dir, dict(scale=None, flip_prob=0))
    np.testing.assert_array_equal(ds1[ds1.img_ids.index(397133)]['image'].permute(1, 2, 0),
                                  raw)


@pytest.mark.parametrize('h,w,scale,expected', [
    (480, 640, (1333, 800), (800, 1067)),       # short side bound
    (427, 640, (1333, 800), (800, 1199)),
    (200, 1000, (1333, 800), (267, 1333)),      # long side bound
    (640, 480, (1333, 800), (1067, 800)),       # portrait
    (375, 500, (1333, 480), (480, 640)),
])
def test_keep_ratio_size_is_mmcv_rescale_size(h, w, scale, expected):
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    assert expected == (int(h * f + 0.5), int(w * f + 0.5))
    assert rescale_size(h, w, scale) == expected
    img = np.zeros((h, w, 3), np.uint8)
    out = KeepRatioResize(scale)({'image': img, 'boxes': np.zeros((0, 4), np.float32),
                                  'labels': np.zeros(0, np.int64),
                                  'meta': {'ori_shape': (h, w), 'img_shape': (h, w)}})
    assert out['image'].shape[:2] == expected == out['meta']['img_shape']


def test_multiscale_range_samples_short_edge_over_the_range():
    np.random.seed(0)
    r = KeepRatioResize(ms_range=[(1333, 480), (1333, 960)])
    scales = [r.sample_scale() for _ in range(2000)]
    assert {s[0] for s in scales} == {1333}
    short = np.array([s[1] for s in scales])
    assert short.min() == 480 and short.max() == 960 and len(set(short)) > 300
    out_shapes = set()
    for _ in range(20):
        out = r({'image': np.zeros((480, 640, 3), np.uint8), 'boxes': np.zeros((0, 4)),
                 'labels': np.zeros(0, np.int64), 'meta': {'ori_shape': (480, 640)}})
        out_shapes.add(out['image'].shape[:2])
    assert len(out_shapes) > 10


def restore_boxes(boxes, meta: dict):
    """Map xyxy boxes from a sample's image back to the original image: undo flip, then scale.

    Works on numpy arrays and torch tensors (returns the same type, float64 for numpy).
    """
    h, w = meta['img_shape']
    sw, sh = meta['scale_factor']
    if isinstance(boxes, np.ndarray):
        b = boxes.astype(np.float64).reshape(-1, 4).copy()
    else:
        b = boxes.reshape(-1, 4).clone().double()
    if meta.get('flip', False):
        x1 = w - b[:, 2]
        x2 = w - b[:, 0]
        b[:, 0], b[:, 2] = x1, x2
    b[:, 0::2] /= sw
    b[:, 1::2] /= sh
    return b


def round_trip_max_err(ds, data, flip_prob):
    worst = 0.0
    for i in range(len(ds)):
        s = ds[i]
        m = s['meta']
        assert m['flip'] is (flip_prob == 1.0)
        h, w = m['img_shape']
        assert s['image'].shape[1:] == (h, w)
        b = s['boxes']
        assert (b[:, 0::2] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        back = restore_boxes(s['boxes'], m).numpy()
        ref = json_boxes(data, m['img_id'])
        assert back.shape == ref.shape
        if len(ref):
            worst = max(worst, float(np.abs(back - ref).max()))
    return worst


@pytest.mark.parametrize('kw', [dict(scale=(1333, 800)), dict(scale=(100, 60)),
                                dict(ms_range=[(1333, 480), (1333, 960)])])
@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_boxes_round_trip_exactly_awkward_json(tmp_path, kw, flip_prob):
    ann_file, img_dir, data = awkward_coco(tmp_path)
    ds = CocoDataset(ann_file, img_dir, dict(flip_prob=flip_prob, **kw))
    assert round_trip_max_err(ds, data, flip_prob) < 1e-3


def test_flip_moves_box_to_mirror_position(tmp_path):
    ann_file, img_dir, _ = awkward_coco(tmp_path)
    ds = CocoDataset(ann_file, img_dir, dict(scale=None, flip_prob=1.0))
    s = ds[ds.img_ids.index(397133)]
    # JSON box [10.5, 20.25, 30, 40.5] in a 128-wide image -> x from 128-40.5 to 128-10.5
    np.testing.assert_allclose(s['boxes'][0].numpy(), [87.5, 20.25, 117.5, 60.75], atol=1e-5)
    raw = cv2.imread(str(img_dir / 'a.jpg'))[:, :, ::-1]
    np.testing.assert_array_equal(s['image'].permute(1, 2, 0).numpy(), raw[:, ::-1])


def test_test_pipeline_does_not_flip_or_jitter():
    t = build_transforms(train=False, scale=(1333, 800), ms_range=[(1333, 480), (1333, 960)])
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    outs = [t({'image': img, 'boxes': np.array([[1, 2, 30, 40]], np.float32),
               'labels': np.zeros(1, np.int64), 'meta': {'ori_shape': (48, 64)}})
            for _ in range(5)]
    assert all(o['image'].shape == (800, 1067, 3) and not o['meta'].get('flip') for o in outs)
    assert all(np.array_equal(o['image'], outs[0]['image']) for o in outs)


def test_photometric_changes_pixels_only_and_differs_per_call():
    np.random.seed(1)
    t = build_transforms(train=True, scale=None, flip_prob=0, photometric=True)
    img = np.random.default_rng(0).integers(30, 220, (40, 50, 3), dtype=np.uint8)
    boxes = np.array([[1.5, 2.5, 30.0, 40.0]], np.float32)
    outs = [t({'image': img, 'boxes': boxes, 'labels': np.zeros(1, np.int64),
               'meta': {'ori_shape': (40, 50)}}) for _ in range(8)]
    assert all(o['image'].dtype == np.uint8 and o['image'].shape == img.shape for o in outs)
    assert all(np.array_equal(o['boxes'], boxes) for o in outs)
    assert len({o['image'].tobytes() for o in outs}) > 2


@pytest.mark.skipif(not COCO128.is_dir(), reason=f'real COCO subset not found at {COCO128} '
                    '(set GFL_DET_SHARED=/path/to/shared; default: a folder named shared beside the clone)')
@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_coco128_boxes_round_trip_at_1333x800(flip_prob):
    ann = COCO128 / 'annotations' / 'instances_coco128.json'
    data = json.loads(ann.read_text())
    ds = CocoDataset(ann, COCO128 / 'images', dict(scale=(1333, 800), flip_prob=flip_prob))
    assert len(ds) == 126 and ds.skipped.files('no_boxes') == ['000000000250.jpg',
                                                               '000000000508.jpg']
    assert len(ds.cat_ids) == 80 and ds.cat_ids[-1] == 90 and ds.classes[0] == 'person'
    assert not ds.skipped.errors and not ds.skipped.warnings
    assert round_trip_max_err(ds, data, flip_prob) < 1e-3
    # crowd boxes are ignore regions: 10 in the JSON
    assert sum(len(ds.get_ann_info(i)['boxes_ignore']) for i in range(len(ds))) == 10
    # evaluation keeps the two images without boxes
    assert len(CocoDataset(ann, COCO128 / 'images', test_mode=True)) == 128
    batch = collate([ds[0], ds[1]])
    assert batch['inputs'].shape[-2] % 32 == 0 and batch['inputs'].shape[-1] % 32 == 0
