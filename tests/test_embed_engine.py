"""The branch through mmengine: tools/train.py logs loss_embed and the active-triplet fraction and
validates with the reid/ keys; tools/test.py prints them; the checkpoint has the branch's keys and
the Python API returns embeddings. Two views of coco128 (when the shared folder is there)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, load_tool
from test_embed_tools import TINY_REID

from gfl_det.reid_eval import REID_KEYS


def scalars(work_dir):
    (path,) = list(work_dir.glob('*/vis_data/scalars.json'))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_train_and_test_log_the_reid_metrics(tmp_path, capsys):
    cfg = tmp_path / 'tiny_reid.py'
    cfg.write_text(TINY_REID.format(base=str(ROOT / 'configs' / 'gfl_r18_synthetic_reid.py'),
                                    data_root=str(tmp_path / 'data') + '/')
                   + "train_cfg = dict(max_epochs=1)\nmodel.update(test_cfg=dict(score_thr=0.0))\n")
    wd = tmp_path / 'work'
    assert load_tool('train').main([str(cfg), '--work-dir', str(wd)]) == 0
    recs = scalars(wd)
    train = [r for r in recs if 'loss_embed' in r]
    assert train and all(0 <= r['embed_active_triplets'] <= 1 for r in train)
    val = [r for r in recs if 'reid/R@1' in r]
    assert val and {f'reid/{k}' for k in REID_KEYS} <= set(val[-1]) and 'coco/bbox_mAP' in val[-1]
    ckpt = torch.load(wd / 'epoch_1.pth', weights_only=True)
    assert any(k.startswith('bbox_head.embed.') for k in ckpt['state_dict'])
    capsys.readouterr()
    assert load_tool('test').main([str(cfg), str(wd / 'epoch_1.pth'), '--work-dir', str(tmp_path / 'test'),
                                   '--out', str(tmp_path / 'dets.bbox.json')]) == 0
    log = capsys.readouterr()
    assert 'reid/one_shot_acc' in log.out + log.err and (tmp_path / 'dets.bbox.json').is_file()
    from gfl_det.apis import inference_detector, init_detector
    model = init_detector(str(cfg), str(wd / 'epoch_1.pth'))
    res = inference_detector(model, str(next((tmp_path / 'data' / 'val').glob('*.jpg'))))
    assert res['embeddings'].shape == (len(res['bboxes']), 16)


COCO128_VIEWS = """
_base_ = {base!r}
subset = dict(data_root={root!r}, ann_file={ann!r})
model = dict(backbone=dict(base_channels=8), neck=dict(in_channels=[8, 16, 32, 64], out_channels=32),
             bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1, embed=dict(dim=16, stacked_convs=1)),
             test_cfg=dict(score_thr=0.0))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(dataset=subset))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(dataset=subset))
test_dataloader = val_dataloader
train_cfg = dict(max_epochs=1, val_interval=1)
"""


@pytest.mark.slow
def test_two_views_of_coco128_report_instance_matching(coco128_dir, tmp_path, capsys):
    data = json.loads((coco128_dir / 'annotations' / 'instances_coco128.json').read_text())
    keep = {im['id'] for im in data['images'][:4]}
    data.update(images=data['images'][:4], annotations=[a for a in data['annotations'] if a['image_id'] in keep])
    (tmp_path / 'four.json').write_text(json.dumps(data))
    cfg = tmp_path / 'views.py'
    cfg.write_text(COCO128_VIEWS.format(base=str(ROOT / 'configs' / 'gfl_r18_coco128_views.py'),
                                        root=str(coco128_dir) + '/', ann=str(tmp_path / 'four.json')))
    wd = tmp_path / 'work'
    assert load_tool('train').main([str(cfg), '--work-dir', str(wd)]) == 0
    val = [r for r in scalars(wd) if 'reid/two_view_R@1' in r]
    assert val and 0 <= val[-1]['reid/two_view_R@1'] <= 1 and 'reid/two_view_R@1_same_image' in val[-1]
    train = [r for r in scalars(wd) if 'loss_embed' in r]
    assert train
