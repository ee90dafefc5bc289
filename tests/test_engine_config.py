"""Configs: _base_ inheritance and the values that must equal MMDetection's GFL configs."""
from pathlib import Path

import pytest
from mmengine.config import Config

import gfl_det.mm  # noqa: F401  (registers the 'gfl_det' scope)
from gfl_det.data import KeepRatioResize, RandomFlip

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def load(name: str) -> Config:
    return Config.fromfile(str(CONFIGS / name))


def test_gfl_r50_equals_mmdet_1x():
    cfg = load('gfl_r50.py')
    assert cfg.default_scope == 'gfl_det'
    # optimizer: SGD lr 0.01 (mmdet's gfl_r50_fpn_1x_coco overrides the base's 0.02)
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    # (fused=True: torch's one-kernel SGD, the same update up to rounding; the guard skips on the device)
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=0.01, momentum=0.9,
                                               weight_decay=0.0001, fused=True)
    warm, steps = cfg.param_scheduler
    assert warm == dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500)
    assert steps == dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11],
                         gamma=0.1)
    assert cfg.train_cfg == dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=16)
    # data
    tr, va = cfg.train_dataloader, cfg.val_dataloader
    assert tr.batch_size == 2 and tr.batch_sampler.type == 'AspectRatioBatchSampler'
    assert tr.dataset.data_root == 'data/coco/'
    assert tr.dataset.ann_file == 'annotations/instances_train2017.json'
    assert tr.dataset.data_prefix == dict(img='train2017/')
    assert tr.dataset.filter_cfg == dict(filter_empty_gt=True, min_size=32)
    assert va.dataset.ann_file == 'annotations/instances_val2017.json'
    assert va.dataset.data_prefix == dict(img='val2017/') and va.dataset.test_mode
    types = {s['type']: s for s in tr.dataset.pipeline}
    assert types['Resize']['scale'] == (1333, 800) and types['Resize']['keep_ratio']
    assert types['RandomFlip']['prob'] == 0.5
    assert cfg.val_evaluator.ann_file == 'data/coco/annotations/instances_val2017.json'
    assert cfg.test_dataloader == cfg.val_dataloader
    # model
    m = cfg.model
    assert m.type == 'GFL' and m.backbone.depth == 50 and m.backbone.frozen_stages == 1
    assert m.backbone.norm_eval is True
    assert m.backbone.init_cfg == dict(type='Pretrained', checkpoint='torchvision://resnet50')
    assert m.neck.in_channels == [256, 512, 1024, 2048] and m.neck.out_channels == 256
    assert m.neck.start_level == 1 and m.neck.add_extra_convs == 'on_output'
    assert m.bbox_head.num_classes == 80 and m.bbox_head.stacked_convs == 4
    assert m.bbox_head.reg_max == 16
    assert m.bbox_head.anchor_generator.octave_base_scale == 8
    assert m.bbox_head.anchor_generator.strides == [8, 16, 32, 64, 128]
    assert m.test_cfg.nms.iou_threshold == 0.6 and m.test_cfg.max_per_img == 100
    assert m.data_preprocessor.mean == [123.675, 116.28, 103.53]
    # runtime: checkpoint per epoch + best by COCO AP, TensorBoard
    ck = cfg.default_hooks.checkpoint
    assert ck.interval == 1 and ck.save_best == 'coco/bbox_mAP'
    assert {'LocalVisBackend', 'TensorboardVisBackend'} <= {b['type'] for b in cfg.vis_backends}


def test_ms2x_and_r101_inherit():
    ms = load('gfl_r50_ms2x.py')
    assert ms.train_cfg.max_epochs == 24
    assert ms.param_scheduler[1].milestones == [16, 22] and ms.param_scheduler[1].end == 24
    assert ms.param_scheduler[0].end == 500
    rr = [s for s in ms.train_dataloader.dataset.pipeline if s['type'] == 'RandomResize'][0]
    assert rr['scale'] == [(1333, 480), (1333, 960)] and rr['keep_ratio']
    assert ms.optim_wrapper.optimizer.lr == 0.01
    assert ms.train_dataloader.dataset.ann_file == 'annotations/instances_train2017.json'
    r101 = load('gfl_r101_ms2x.py')
    assert r101.model.backbone.depth == 101
    assert r101.model.backbone.init_cfg.checkpoint == 'torchvision://resnet101'
    assert r101.train_cfg.max_epochs == 24 and r101.train_dataloader.dataset.pipeline == \
        ms.train_dataloader.dataset.pipeline


def test_small_configs():
    syn = load('gfl_r18_synthetic.py')
    assert syn.model.backbone.depth == 18 and syn.model.backbone.init_cfg is None
    assert syn.train_dataloader.dataset.type == 'SyntheticCocoDataset'
    assert syn.val_evaluator.ann_file == 'data/synthetic/annotations/instances_val.json'
    bccd = load('gfl_r18_bccd.py')
    b = bccd.model
    assert (b.backbone.depth, b.backbone.get('base_channels', 64), b.backbone.init_cfg) == (18, 64, None)
    assert b.neck.out_channels == 128 and b.neck.in_channels == [64, 128, 256, 512]
    assert (b.bbox_head.feat_channels, b.bbox_head.stacked_convs, b.bbox_head.num_classes) == \
        (128, 2, 3)
    assert bccd.train_dataloader.batch_size == 4
    assert bccd.optim_wrapper.clip_grad == dict(max_norm=35, norm_type=2)
    assert bccd.optim_wrapper.optimizer.lr == 0.01
    assert [s['type'] for s in bccd.param_scheduler] == ['LinearLR']  # then constant
    assert bccd.param_scheduler[0].end == 100
    resize = [s for s in bccd.train_dataloader.dataset.pipeline if s['type'] == 'Resize'][0]
    assert resize['scale'] == (640, 480)


@pytest.mark.parametrize('name', ['gfl_r50.py', 'gfl_r50_ms2x.py', 'gfl_r101_ms2x.py',
                                  'gfl_r18_synthetic.py', 'gfl_r18_bccd.py'])
def test_every_config_builds_its_model(name):
    cfg = load(name)
    cfg.model.backbone.init_cfg = None  # no ImageNet download in tests
    model = gfl_det.mm.MODELS.build(cfg.model)
    assert isinstance(model, gfl_det.models.GFL)
    assert model.num_classes == cfg.model.bbox_head.num_classes


def test_pipeline_maps_to_our_transforms():
    cfg = load('gfl_r50_ms2x.py')
    train = gfl_det.mm.build_pipeline(cfg.train_dataloader.dataset.pipeline).transforms
    assert [type(t) for t in train] == [KeepRatioResize, RandomFlip]
    assert train[0].ms_range == [(1333, 480), (1333, 960)] and train[1].prob == 0.5
    test = gfl_det.mm.build_pipeline(cfg.test_dataloader.dataset.pipeline).transforms
    assert [type(t) for t in test] == [KeepRatioResize] and test[0].scale == (1333, 800)
    with pytest.raises(KeyError, match='not supported'):
        gfl_det.mm.build_pipeline([dict(type='Mosaic')])
