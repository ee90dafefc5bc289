"""Pascal VOC -> COCO: the real BCCD set (when present) and a small hand-made VOC set."""
import json
import os
import runpy
from pathlib import Path

import cv2
import numpy as np
import pytest

from gfl_det.data import CocoDataset, DatasetError
from gfl_det.data.voc import voc_to_coco

REPO = Path(__file__).parents[1]
BCCD = Path(os.environ.get('BCCD_ROOT') or Path(__file__).parents[2] / 'shared' / 'datasets' / 'bccd')
needs_bccd = pytest.mark.skipif(
    not BCCD.is_dir(), reason=f'BCCD not found at {BCCD}: set BCCD_ROOT to a clone of '
    'github.com/Shenggan/BCCD_Dataset (the folder holding BCCD/Annotations)')


def tool(capsys, *argv):
    main = runpy.run_path(str(REPO / 'tools' / 'voc2coco.py'), run_name='tool')['main']
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@needs_bccd
def test_bccd_all_splits(tmp_path, capsys):
    out = tmp_path / 'bccd.json'
    rc, stdout, stderr = tool(capsys, BCCD, '--out', out)
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data['images']) == 364
    assert [c['name'] for c in data['categories']] == ['Platelets', 'RBC', 'WBC']
    # 4,888 boxes in the XML; the two degenerate ones are reported by file and not written
    assert '364 images, 4888 boxes read in 3 categories' in stdout
    assert len(data['annotations']) == 4886
    for name in ('BloodImage_00338.xml', 'BloodImage_00343.xml'):
        assert f'degenerate box (zero or negative size), not written: {name}' in stderr
    assert stderr.count('degenerate box') == 2
    counts = {c['name']: sum(a['category_id'] == c['id'] for a in data['annotations'])
              for c in data['categories']}
    assert counts == {'RBC': 4153, 'WBC': 372, 'Platelets': 361}
    # the JSON loads cleanly as a dataset
    ds = CocoDataset(out, BCCD / 'BCCD' / 'JPEGImages', dict(scale=None), test_mode=True)
    assert len(ds) == 364 and not ds.skipped.errors and not ds.skipped.warnings


@needs_bccd
def test_bccd_splits_add_up():
    tv, rtv = voc_to_coco(BCCD, 'trainval')
    te, rte = voc_to_coco(BCCD, 'test')
    both, rb = voc_to_coco(BCCD, 'trainval,test')
    assert (len(tv['images']), len(te['images'])) == (292, 72)
    assert rtv['num_objects'] + rte['num_objects'] == rb['num_objects'] == 4888
    assert len(both['images']) == 364 and rb['num_boxes'] == 4886
    assert sorted(d[0] for d in rb['degenerate']) == ['BloodImage_00338.xml',
                                                      'BloodImage_00343.xml']
    names = {im['file_name'] for im in tv['images']} & {im['file_name'] for im in te['images']}
    assert not names
    with pytest.raises(DatasetError, match='overlap'):
        voc_to_coco(BCCD, 'trainval,train')
    with pytest.raises(DatasetError, match='split file not found.*nope.txt.*trainval'):
        voc_to_coco(BCCD, 'nope')


def write_voc(root, objects, size=(60, 40), xml_size=True, filename='im1.jpg'):
    (root / 'VOC' / 'Annotations').mkdir(parents=True)
    (root / 'VOC' / 'JPEGImages').mkdir()
    (root / 'VOC' / 'ImageSets' / 'Main').mkdir(parents=True)
    w, h = size
    cv2.imwrite(str(root / 'VOC' / 'JPEGImages' / 'im1.jpg'), np.zeros((h, w, 3), np.uint8))
    objs = ''.join(
        f'<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>'
        f'<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>'
        for n, b, d in objects)
    sz = f'<size><width>{w}</width><height>{h}</height><depth>3</depth></size>' if xml_size \
        else ''
    (root / 'VOC' / 'Annotations' / 'im1.xml').write_text(
        f'<annotation><filename>{filename}</filename>{sz}{objs}</annotation>')
    (root / 'VOC' / 'ImageSets' / 'Main' / 'train.txt').write_text('im1\n')


def test_voc_conventions(tmp_path):
    write_voc(tmp_path, [('dog', (1, 1, 60, 40), 0), ('cat', (11, 21, 31, 26), 1),
                         ('dog', (5, 5, 5, 9), 0), ('dog', (50, 30, 70, 45), 0)],
              xml_size=False, filename='im1')
    coco, rep = voc_to_coco(tmp_path, 'train')            # finds the single VOC sub-folder
    assert [c['name'] for c in coco['categories']] == ['cat', 'dog']
    assert coco['images'][0] == {'id': 1, 'file_name': 'im1.jpg', 'width': 60, 'height': 40}
    by_cat = [(a['category_id'], a['bbox'], a['iscrowd']) for a in coco['annotations']]
    # 1-based -> 0-based as mmdet's converter; difficult -> iscrowd; width = xmax - xmin
    assert by_cat[:2] == [(2, [0, 0, 59, 39], 0), (1, [10, 20, 20, 5], 1)]
    assert by_cat[2] == (2, [49, 29, 11, 11], 0)           # clipped to the 60x40 image
    assert rep['degenerate'] == [('im1.xml', 'dog', [5.0, 5.0, 5.0, 9.0])]
    assert rep['clipped'] == [('im1.xml', 'dog', [50.0, 30.0, 70.0, 45.0])]
    assert rep['num_objects'] == 4 and rep['num_boxes'] == 3 and rep['difficult'] == 1
    coco, rep = voc_to_coco(tmp_path, None, classes=['dog'])
    assert rep['unknown_class'] == [('im1.xml', 'cat')] and rep['num_boxes'] == 2


def test_voc_size_mismatch_and_not_voc(tmp_path):
    write_voc(tmp_path, [('dog', (1, 1, 10, 10), 0)])
    xml = tmp_path / 'VOC' / 'Annotations' / 'im1.xml'
    xml.write_text(xml.read_text().replace('<width>60</width>', '<width>61</width>'))
    with pytest.raises(DatasetError, match='im1.xml: <size> says 61x40 but im1.jpg is 60x40'):
        voc_to_coco(tmp_path)
    with pytest.raises(DatasetError, match='not a Pascal VOC folder'):
        voc_to_coco(tmp_path / 'VOC' / 'JPEGImages')
