"""One test per kind of bad input: a clear error naming the file and the fix, or a counted skip."""
import json
import os
import runpy
from pathlib import Path

import cv2
import numpy as np
import pytest

from gfl_det.data import (BadImageError, CocoDataset, DatasetError, SkipReport,
                          build_dataloader)
from gfl_det.data.groundtruth import check_dataset

REPO = Path(__file__).parents[1]
NO_RESIZE = dict(scale=None, flip_prob=0)


def make(tmp_path, anns=None, images=None, cats=None, n_images=4, write=True):
    """A small valid COCO set (n_images 40x60 images, one box each) with overrides."""
    img_dir = tmp_path / 'img'
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{'id': i + 1, 'file_name': f'{i}.jpg', 'height': 40, 'width': 60}
                  for i in range(n_images)]
    if anns is None:
        anns = [{'id': i + 1, 'image_id': i + 1, 'category_id': 1, 'bbox': [5, 5, 20, 10],
                 'area': 200, 'iscrowd': 0} for i in range(n_images)]
    if cats is None:
        cats = [{'id': 1, 'name': 'thing'}, {'id': 2, 'name': 'other'}]
    if write:
        for k, im in enumerate(images):
            cv2.imwrite(str(img_dir / im['file_name']),
                        np.full((im['height'], im['width'], 3), 40 * k % 255, np.uint8))
    ann_file = tmp_path / 'ann.json'
    ann_file.write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
    return ann_file, img_dir


def box_anns(*bboxes, cat=1):
    """Image 1 gets the given boxes; images 2..4 one good box each (so training can go on)."""
    anns = [{'id': k + 1, 'image_id': 1, 'category_id': cat, 'bbox': b, 'area': 1.0,
             'iscrowd': 0} for k, b in enumerate(bboxes)]
    anns += [{'id': 100 + i, 'image_id': i, 'category_id': 1, 'bbox': [5, 5, 20, 10],
              'area': 200, 'iscrowd': 0} for i in (2, 3, 4)]
    return anns


# ------------------------------------------------------------------ JSON-level: clear errors
def test_empty_json_file(tmp_path):
    f = tmp_path / 'ann.json'
    f.write_text('')
    with pytest.raises(DatasetError, match=r'empty \(0 bytes\).*ann\.json.*fix'):
        CocoDataset(f, tmp_path)


@pytest.mark.parametrize('content,msg', [
    ('{}', 'holds no COCO dataset'),
    ('[]', 'holds no COCO dataset'),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
     "no 'images'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], '
     '"annotations": []}', "no 'categories'"),
    ('{"images": [', 'not valid JSON'),
])
def test_unusable_json(tmp_path, content, msg):
    f = tmp_path / 'ann.json'
    f.write_text(content)
    with pytest.raises(DatasetError, match=msg) as e:
        CocoDataset(f, tmp_path)
    assert str(f) in str(e.value) and 'fix' in str(e.value)


def test_missing_json_file(tmp_path):
    with pytest.raises(DatasetError, match='not found.*nope.json'):
        CocoDataset(tmp_path / 'nope.json', tmp_path)


def test_duplicate_image_ids(tmp_path):
    ims = [{'id': 1, 'file_name': f'{i}.jpg', 'height': 40, 'width': 60} for i in range(2)]
    ann_file, img_dir = make(tmp_path, images=ims, anns=[])
    with pytest.raises(DatasetError, match=r'duplicate image ids \[1\]'):
        CocoDataset(ann_file, img_dir)


# ------------------------------------------------------------------ boxes: counted skips
def test_box_across_the_border_is_clipped_mostly_outside_is_invalid(tmp_path):
    ann_file, img_dir = make(tmp_path, anns=box_anns(
        [45, 30, 20, 12], [-2, -2, 10, 10],        # most of it inside the 60x40 image: clipped
        [50, 30, 20, 20], [-1e30, -1e30, 2e30, 2e30],  # a quarter / a speck inside: invalid
        [70, 5, 10, 10]))                           # entirely right of the image
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['clipped'] == 2 and ds.skipped.files('clipped') == ['0.jpg']
    assert ds.skipped['mostly_outside'] == 2 and 'mostly_outside' in ds.skipped.errors
    assert ds.skipped['outside_image'] == 1
    np.testing.assert_allclose(ds.get_ann_info(0)['boxes'], [[45, 30, 60, 40], [0, 0, 8, 8]])


@pytest.mark.parametrize('bbox', [[5, 5, 0, 10], [5, 5, 10, -3], [5, 5, -1, -1]])
def test_zero_or_negative_size_box_is_skipped_with_name(tmp_path, bbox):
    ann_file, img_dir = make(tmp_path, anns=box_anns(bbox, [1, 1, 10, 10]))
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['nonpositive_size'] == 1
    assert ds.skipped.files('nonpositive_size') == ['0.jpg']
    assert len(ds.get_ann_info(0)['boxes']) == 1
    assert 'nonpositive_size' in ds.skipped.errors


def test_nan_coordinates_are_skipped(tmp_path):
    ann_file, img_dir = make(tmp_path, anns=box_anns([float('nan'), 5, 10, 10], [1, 1, 10, 10],
                                                     [1, 1, float('inf'), 2]))
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['nan_bbox'] == 2 and ds.skipped.files('nan_bbox') == ['0.jpg']
    assert np.isfinite(ds.get_ann_info(0)['boxes']).all()


def test_malformed_bbox_is_skipped(tmp_path):
    anns = box_anns([1, 1, 10, 10])
    anns.append({'id': 50, 'image_id': 1, 'category_id': 1, 'bbox': [1, 2, 3]})
    anns.append({'id': 51, 'image_id': 1, 'category_id': 1})
    ann_file, img_dir = make(tmp_path, anns=anns)
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['malformed_bbox'] == 2


def test_unknown_category_is_skipped(tmp_path):
    ann_file, img_dir = make(tmp_path, anns=box_anns([1, 1, 10, 10], cat=7))
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['unknown_category'] == 1
    assert ds.skipped.files('unknown_category') == ['0.jpg (category_id 7)']  # the id, named
    assert ds.skipped['no_boxes'] == 1 and len(ds) == 3       # image 1 has nothing left


def test_annotation_for_unknown_image_is_skipped(tmp_path):
    anns = box_anns([1, 1, 10, 10])
    anns.append({'id': 77, 'image_id': 999, 'category_id': 1, 'bbox': [1, 1, 5, 5]})
    ann_file, img_dir = make(tmp_path, anns=anns)
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['unknown_image'] == 1
    assert ds.skipped.files('unknown_image') == ['annotation id 77 (image id 999)']
    assert sum(len(ds.get_ann_info(i)['boxes']) for i in range(len(ds))) == 4


def test_bad_image_entry_is_skipped(tmp_path):
    ims = [{'id': 1, 'file_name': '0.jpg', 'height': 0, 'width': 60},
           {'id': 2, 'file_name': '1.jpg', 'height': 40, 'width': 60}]
    anns = [{'id': i, 'image_id': i, 'category_id': 1, 'bbox': [1, 1, 5, 5]} for i in (1, 2)]
    ims_files = [dict(ims[0], height=40), ims[1]]
    ann_file, img_dir = make(tmp_path, images=ims_files, anns=anns)
    ann_file.write_text(json.dumps({'images': ims, 'annotations': anns,
                                    'categories': [{'id': 1, 'name': 'a'}]}))
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert ds.skipped['bad_image_entry'] == 1 and ds.img_ids == [2]


# ------------------------------------------------------------------ images
def test_missing_image_at_load_training_skips_with_count(tmp_path):
    ann_file, img_dir = make(tmp_path)
    os.remove(img_dir / '2.jpg')
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    assert len(ds) == 3 and ds.skipped['missing_image'] == 1
    assert ds.failed_images == ['2.jpg']


def test_missing_image_at_load_eval_raises_or_skips(tmp_path):
    ann_file, img_dir = make(tmp_path)
    os.remove(img_dir / '2.jpg')
    with pytest.raises(DatasetError, match=r"(?s)1 of 4 images.*missing_image.*2\.jpg.*fix"):
        CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True)
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True, on_bad_image='skip')
    assert ds.failed_images == ['2.jpg'] and ds.skipped['missing_image'] == 1
    # kept in the index: its sample is a flagged stand-in the evaluator counts, not scores
    assert len(ds) == 4
    s = ds[2]
    assert s['meta']['load_failed'] == 'missing_image' and s['meta']['file_name'] == '2.jpg'
    assert s['boxes'].shape == (0, 4) and s['image'].shape == (3, 32, 32)
    assert all('load_failed' not in ds[i]['meta'] for i in (0, 1, 3))


def test_image_missing_at_getitem_training_resamples_and_counts(tmp_path):
    ann_file, img_dir = make(tmp_path)
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    os.remove(img_dir / '0.jpg')                              # vanishes after loading
    s = ds[0]
    assert s['meta']['file_name'] != '0.jpg'
    assert s['meta']['skipped'] == [('missing_image', '0.jpg')]
    assert ds.skipped['missing_image'] == 1 and ds.failed_images == ['0.jpg']


def test_corrupt_image_training_resamples_eval_raises(tmp_path):
    ann_file, img_dir = make(tmp_path)
    (img_dir / '1.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)           # 'exists' check passes
    s = ds[1]
    assert s['meta']['file_name'] != '1.jpg' and ds.skipped['corrupt_image'] == 1
    ev = CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True)
    with pytest.raises(BadImageError, match=r'corrupt image: .*1\.jpg.*fix') as e:
        ev[1]
    assert e.value.reason == 'corrupt_image' and ev.failed_images == ['1.jpg']
    # a full check at load finds it up front, and eval can then skip it with a count
    ev2 = CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True, on_bad_image='skip',
                      check_images='decode')
    assert len(ev2) == 4 and ev2.failed_images == ['1.jpg']
    assert ev2[1]['meta']['load_failed'] == 'corrupt_image'
    # ... and so can evaluation without the up-front check: found when decoded, counted once
    ev3 = CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True, on_bad_image='skip')
    assert [ev3[i]['meta'].get('load_failed') for i in range(4)] == [None, 'corrupt_image', None, None]
    assert ev3[1]['meta']['load_failed'] == 'corrupt_image'
    assert ev3.failed_images == ['1.jpg'] and ev3.skipped['corrupt_image'] == 1


def test_image_size_disagreeing_with_json(tmp_path):
    ann_file, img_dir = make(tmp_path)
    cv2.imwrite(str(img_dir / '3.jpg'), np.zeros((41, 60, 3), np.uint8))
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    s = ds[3]
    assert s['meta']['skipped'] == [('size_mismatch', '3.jpg')]
    ev = CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True)
    with pytest.raises(BadImageError, match=r'3\.jpg \(file is 60x41, JSON says 60x40\).*fix'):
        ev[3]
    with pytest.raises(DatasetError, match='size_mismatch'):
        CocoDataset(ann_file, img_dir, NO_RESIZE, test_mode=True, check_images='header')


def test_too_many_bad_images_in_a_row_stops_with_clear_error(tmp_path):
    ann_file, img_dir = make(tmp_path)
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE, max_retries=0)
    os.remove(img_dir / '0.jpg')
    with pytest.raises(DatasetError, match=r'1 bad images in a row.*0\.jpg.*check_dataset'):
        ds[0]
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    for f in img_dir.iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match='every image of .*ann.json failed to load'):
        ds[0]


def test_no_usable_image_is_a_clear_error(tmp_path):
    ann_file, img_dir = make(tmp_path, write=False)
    with pytest.raises(DatasetError, match=r'(?s)no usable image.*missing_image: 4'):
        CocoDataset(ann_file, img_dir)


def test_training_goes_on_through_a_dataloader_with_workers(tmp_path):
    ann_file, img_dir = make(tmp_path, n_images=6)
    ds = CocoDataset(ann_file, img_dir, NO_RESIZE)
    (img_dir / '4.jpg').write_bytes(b'garbage')
    loader = build_dataloader(ds, batch_size=3, num_workers=1, persistent_workers=False)
    metas = [m for batch in loader for m in batch['metas']]
    assert len(metas) == 6
    assert sum(len(m.get('skipped', [])) for m in metas) == 1   # reported in the batch
    assert ds.skipped['corrupt_image'] == 0                      # counted in the worker's copy
    total = SkipReport().add_from_metas(metas)                   # ... and in the main process
    assert dict(total.counts) == {'corrupt_image': 1} and total.files('corrupt_image') == ['4.jpg']


# ------------------------------------------------------------------ check_dataset tool
def run_tool(capsys, *argv):
    """tools/check_dataset.py main() in this process (no second torch import)."""
    main = runpy.run_path(str(REPO / 'tools' / 'check_dataset.py'), run_name='tool')['main']
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_dataset_reports_everything_in_one_pass(tmp_path, capsys):
    anns = box_anns([5, 5, 0, 10], [float('nan'), 1, 2, 2], [45, 30, 20, 12], cat=1)
    anns.append({'id': 90, 'image_id': 2, 'category_id': 9, 'bbox': [1, 1, 5, 5]})
    anns.append({'id': 91, 'image_id': 12345, 'category_id': 1, 'bbox': [1, 1, 5, 5]})
    ann_file, img_dir = make(tmp_path, anns=anns)
    os.remove(img_dir / '1.jpg')
    (img_dir / '2.jpg').write_bytes(b'garbage')
    cv2.imwrite(str(img_dir / '3.jpg'), np.zeros((40, 61, 3), np.uint8))
    rep = check_dataset(ann_file, img_dir)['report']
    assert dict(rep.counts) == {'nonpositive_size': 1, 'nan_bbox': 1, 'clipped': 1,
                                'unknown_category': 1, 'unknown_image': 1, 'missing_image': 1,
                                'corrupt_image': 1, 'size_mismatch': 1}
    rc, out, err = run_tool(capsys, ann_file, img_dir)
    assert rc == 1, err
    for needle in ('missing_image: 1 (1.jpg)', 'corrupt_image: 1 (2.jpg)',
                   'size_mismatch: 1 (3.jpg)', 'nonpositive_size: 1 (0.jpg)', '[warning] clipped',
                   '7 error(s)'):
        assert needle in out, out


def test_truncated_jpeg_is_a_bad_image_not_a_grey_one(tmp_path):
    """cv2 decodes a JPEG cut in half with a grey bottom and only a libjpeg warning; loading
    must call it corrupt (training resamples, evaluation reports), while a complete JPEG with
    bytes appended after its end marker still loads."""
    from gfl_det.data import BadImageError, load_image
    rng = np.random.default_rng(0)
    p = tmp_path / 'a.jpg'
    cv2.imwrite(str(p), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    data = p.read_bytes()
    assert load_image(p).shape == (40, 60, 3)
    p.write_bytes(data + b'trailer appended by a camera' * 4)
    assert load_image(p).shape == (40, 60, 3)
    p.write_bytes(data[:len(data) // 2])
    assert cv2.imread(str(p)) is not None          # what cv2 alone would accept
    with pytest.raises(BadImageError, match='truncated JPEG') as e:
        load_image(p)
    assert e.value.reason == 'corrupt_image'


def test_check_dataset_finds_truncated_jpeg(tmp_path):
    ann_file, img_dir = make(tmp_path)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(img_dir / '0.jpg'), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    data = (img_dir / '0.jpg').read_bytes()
    (img_dir / '0.jpg').write_bytes(data[:len(data) // 2])
    rep = check_dataset(ann_file, img_dir)['report']
    assert rep.files('corrupt_image') == ['0.jpg']


def test_check_dataset_clean_and_unusable(tmp_path, capsys):
    ann_file, img_dir = make(tmp_path)
    rc, out, err = run_tool(capsys, ann_file, img_dir)
    assert rc == 0 and 'OK' in out, out + err
    ann_file.write_text('')
    rc, out, err = run_tool(capsys, ann_file, img_dir)
    assert rc == 2 and 'empty' in err


def test_check_dataset_notes_many_boxes_and_refuses_no_annotations(tmp_path, capsys):
    """1,000 boxes in one image: an info line saying why it matters (not an error); a JSON
    with images but no annotations at all: an error, not 'OK'."""
    many = [{'id': 1000 + k, 'image_id': 1, 'category_id': 1, 'area': 4.0, 'iscrowd': 0,
             'bbox': [k % 50, (k // 50) % 30, 2 + k % 7, 2 + k % 5]} for k in range(1000)]
    ann_file, img_dir = make(tmp_path, anns=many + box_anns()[1:])
    rc, out, _ = run_tool(capsys, ann_file, img_dir)
    assert rc == 0 and out.rstrip().endswith(': OK'), out
    assert ('[info] many_boxes: 1 (0.jpg (1000 boxes)) -- note: a GFL model keeps at most '
            'test_cfg.max_per_img (100) detections per image') in out
    (tmp_path / 'empty').mkdir()
    ann_file, img_dir = make(tmp_path / 'empty', anns=[])
    rc, out, _ = run_tool(capsys, ann_file, img_dir)
    assert rc == 1 and '[error] no_annotations: 1' in out and ': OK' not in out, out
    assert '0 annotation(s), none usable' in out and 'image_info_' in out
