"""YOLO txt labels -> COCO: exact box conversion and every problem reported."""
import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from gfl_det.data import CocoDataset, DatasetError
from gfl_det.data.synthetic import make_synthetic_coco
from gfl_det.data.yolo import read_class_names, yolo_to_coco

REPO = Path(__file__).parents[1]


def test_round_trip_from_coco_and_problems(tmp_path, capsys):
    paths = make_synthetic_coco(tmp_path / 'syn', num_train=5, num_val=1, seed=3)
    data = json.loads(Path(paths['train_ann']).read_text())
    img_dir = tmp_path / 'y' / 'images' / 'train'
    lab_dir = tmp_path / 'y' / 'labels' / 'train'
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for im in data['images']:
        (img_dir / im['file_name']).write_bytes(
            (Path(paths['train_img_dir']) / im['file_name']).read_bytes())
        W, H = im['width'], im['height']
        lines = [f"{a['category_id'] - 1} {(a['bbox'][0] + a['bbox'][2] / 2) / W!r} "
                 f"{(a['bbox'][1] + a['bbox'][3] / 2) / H!r} {a['bbox'][2] / W!r} "
                 f"{a['bbox'][3] / H!r}" for a in data['annotations'] if a['image_id'] == im['id']]
        (lab_dir / im['file_name'].replace('.jpg', '.txt')).write_text('\n'.join(lines) + '\n')
    names = [c['name'] for c in data['categories']]
    (tmp_path / 'y' / 'data.yaml').write_text('names:\n' + ''.join(f'  - {n}\n' for n in names))
    assert read_class_names(tmp_path / 'y' / 'data.yaml') == names
    coco, rep = yolo_to_coco(img_dir, names)
    assert rep['num_boxes'] == len(data['annotations']) and not rep['malformed']
    got = np.array([a['bbox'] for a in coco['annotations']])
    ref = np.array([a['bbox'] for a in data['annotations']])
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert [a['category_id'] for a in coco['annotations']] == \
        [a['category_id'] for a in data['annotations']]

    # problems, each reported with file:line; a background image; an orphan label file
    bad = lab_dir / 'train_00000.txt'
    bad.write_text('0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n0 0.5 0.5 0 0.1\n0 nan 0.5 0.1 0.1\n'
                   '1 0.5 0.5\n2 0.95 0.5 0.2 0.2\n3 1.5 0.5 0.2 0.2\n')
    (lab_dir / 'train_00001.txt').unlink()
    (lab_dir / 'gone.txt').write_text('0 0.5 0.5 0.1 0.1\n')
    main = runpy.run_path(str(REPO / 'tools' / 'yolo2coco.py'), run_name='tool')['main']
    out = tmp_path / 'out.json'
    assert main([str(img_dir), '--classes', str(tmp_path / 'y' / 'data.yaml'),
                 '--out', str(out)]) == 0
    err = capsys.readouterr().err
    for needle in ('unknown_class, not written: train_00000.txt:2',
                   'degenerate, not written: train_00000.txt:3',
                   'malformed, not written: train_00000.txt:4',
                   'malformed, not written: train_00000.txt:5',
                   'outside_image, not written: train_00000.txt:7',
                   'orphan_label, not written: gone.txt'):
        assert needle in err, err
    coco, rep = yolo_to_coco(img_dir, names)
    assert rep['clipped'] == ['train_00000.txt:6'] and rep['background'] == 1
    W = coco['images'][0]['width']
    first = [a['bbox'] for a in coco['annotations'] if a['image_id'] == 1]
    assert first[1][0] + first[1][2] == pytest.approx(W)          # clipped at the border
    ds = CocoDataset(out, img_dir, dict(scale=None), test_mode=True)
    assert len(ds) == 5 and not ds.skipped.errors


def test_yolo_needs_labels(tmp_path):
    (tmp_path / 'pics').mkdir()
    with pytest.raises(DatasetError, match='cannot guess the labels folder'):
        yolo_to_coco(tmp_path / 'pics', ['a'])
