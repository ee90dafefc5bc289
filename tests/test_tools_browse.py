"""tools/browse_dataset.py: pictures after the pipeline, ground truth in class colours, the boxes
the validation drops or clips dashed in magenta and named, mapped through resize and flip."""
from __future__ import annotations

import json

import numpy as np
from conftest import ROOT, assert_png_ok, load_tool

from gfl_det.data import make_synthetic_coco
from gfl_det.visualize import BAD_COLOR, color



CONFIG = """
_base_ = {base!r}
pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(192, 160), keep_ratio=True), dict(type='RandomFlip', prob=1.0),
            dict(type='PackDetInputs')]
train_dataloader = dict(dataset=dict(_delete_=True, type='CocoDataset', data_root={root!r},
                                     ann_file='annotations/with_bad_boxes.json',
                                     data_prefix=dict(img='train/'), pipeline=pipeline))
"""


def test_browse_draws_the_pipeline_output_and_names_bad_boxes(tmp_path, capsys):
    paths = make_synthetic_coco(tmp_path / 'data', num_train=2, num_val=1, seed=0)
    data = json.loads(open(paths['train_ann']).read())
    im = data['images'][0]
    bad = [[-30, 20, 80, 60],            # crosses the left border: clipped
           [50, 50, 0, 10],              # zero width
           [im['width'] + 5, 0, 10, 10],  # outside the image
           [float('nan'), 1, 2, 3]]      # not drawable
    for i, b in enumerate(bad):
        data['annotations'].append({'id': 1000 + i, 'image_id': im['id'], 'category_id': 1, 'bbox': b,
                                    'area': 100.0, 'iscrowd': 0})
    (tmp_path / 'data' / 'annotations' / 'with_bad_boxes.json').write_text(json.dumps(data))
    cfg = tmp_path / 'browse.py'
    cfg.write_text(CONFIG.format(base=str(ROOT / 'configs' / 'gfl_r18_synthetic.py'), root=str(tmp_path / 'data') + '/'))
    out = tmp_path / 'out'
    assert load_tool('browse_dataset').main([str(cfg), '--out-dir', str(out), '--num', '2']) == 0
    text = capsys.readouterr().out
    assert '2 image(s) of the train split' in text
    for reason in ('clipped 1', 'nonpositive_size 1', 'outside_image 1', 'nan_bbox 1'):
        assert reason in text
    assert 'not drawable' in text and 'nan' in text
    pics = sorted(out.glob('*.jpg'))
    assert len(pics) == 2
    first = assert_png_ok(pics[0], colors=[BAD_COLOR])        # the bad boxes' magenta
    classes = [a['category_id'] - 1 for a in data['annotations'] if a['image_id'] == im['id'] and a['id'] < 1000]
    assert any((np.abs(first.astype(int) - color(k)).max(-1) <= 40).sum() > 10 for k in classes)
    assert first.shape[:2] != (im['height'], im['width'])    # resized by the pipeline (to <= 192 x 160)
    assert max(first.shape[:2]) <= 192


def test_bad_box_coordinates_follow_resize_and_flip():
    tool = load_tool('browse_dataset')
    meta = {'scale_factor': (0.5, 0.25), 'flip': True, 'img_shape': (100, 200)}
    # x 10..50 -> 5..25 scaled -> flipped in a 200-wide image: 175..195; y 8..48 -> 2..12
    np.testing.assert_allclose(tool.to_sample_coords([10, 8, 40, 40], meta), [175, 2, 195, 12])
    assert tool.to_sample_coords([float('nan'), 0, 1, 1], meta) is None
    assert tool.to_sample_coords('junk', meta) is None
