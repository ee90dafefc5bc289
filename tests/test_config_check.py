"""A config never builds something other than it says: every ``type`` or option gfl_det does not
implement is refused with an error naming the key, the value and what is supported."""
import copy

import pytest
from mmengine.config import Config

from gfl_det.models import build_detector

from test_engine_model import CONFIGS


def base():
    cfg = Config.fromfile(str(CONFIGS / 'gfl_r18_synthetic.py')).model.to_dict()
    return cfg


def with_(path, value):
    """base() with the dotted key ``path`` set to ``value``."""
    cfg = base()
    *parents, leaf = path.split('.')
    d = cfg
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value
    return cfg


# (dotted key, value, text the error must contain)
REFUSED = [
    ('type', 'RetinaNet', "model: type 'RetinaNet'"),
    ('backbone.type', 'ResNeXt', "backbone: type 'ResNeXt'"),
    ('backbone.norm_cfg', dict(type='SyncBN', requires_grad=True), 'backbone.norm_cfg='),
    ('backbone.dcn', dict(type='DCNv2'), 'backbone.dcn='),
    ('backbone.style', 'caffe', "backbone.style='caffe'"),
    ('backbone.init_cfg', dict(type='Kaiming'), "backbone.init_cfg: type 'Kaiming'"),
    ('neck.type', 'PAFPN', "neck: type 'PAFPN'"),
    ('neck.add_extra_convs', 'on_input', "neck.add_extra_convs='on_input'"),
    ('bbox_head.type', 'ATSSHead', "bbox_head: type 'ATSSHead'"),
    ('bbox_head.loss_cls', dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
     "loss_cls: type 'FocalLoss'"),
    ('bbox_head.loss_cls', dict(type='QualityFocalLoss', use_sigmoid=False, beta=2.0), 'loss_cls.use_sigmoid=False'),
    ('bbox_head.loss_cls', dict(type='QualityFocalLoss', activated=True), 'loss_cls.activated=True'),
    ('bbox_head.loss_bbox', dict(type='L1Loss', loss_weight=1.0), "loss_bbox: type 'L1Loss'"),
    ('bbox_head.loss_bbox', dict(type='GIoULoss', reduction='sum'), "loss_bbox.reduction='sum'"),
    ('bbox_head.loss_dfl', dict(type='SmoothL1Loss'), "loss_dfl: type 'SmoothL1Loss'"),
    ('bbox_head.loss_dfl', dict(type='DistributionFocalLoss', gamma=2), 'loss_dfl.gamma'),
    ('bbox_head.bbox_coder', dict(type='DeltaXYWHBBoxCoder'), "bbox_coder: type 'DeltaXYWHBBoxCoder'"),
    ('bbox_head.anchor_generator', dict(type='AnchorGenerator', ratios=[0.5, 1.0, 2.0], octave_base_scale=8,
                                        scales_per_octave=1, strides=[8, 16, 32, 64, 128]),
     'anchor_generator.ratios'),
    ('bbox_head.anchor_generator', dict(type='YOLOAnchorGenerator'), "anchor_generator: type 'YOLOAnchorGenerator'"),
    ('bbox_head.norm_cfg', dict(type='BN', requires_grad=True), 'bbox_head.norm_cfg='),
    ('train_cfg.assigner', dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4),
     "train_cfg.assigner: type 'MaxIoUAssigner'"),
    ('train_cfg.assigner', dict(type='ATSSAssigner', topk=9, alpha=1.0), 'train_cfg.assigner.alpha=1.0'),
    ('train_cfg.sampler', dict(type='RandomSampler', num=256), "train_cfg.sampler: type 'RandomSampler'"),
    ('train_cfg.pos_weight', 2.0, 'train_cfg.pos_weight=2.0'),
    ('train_cfg.ohem', True, 'train_cfg.ohem'),
    ('test_cfg.nms', dict(type='soft_nms', iou_threshold=0.6), "test_cfg.nms: type 'soft_nms'"),
    ('test_cfg.nms', dict(type='nms', iou_threshold=0.6, score_voting=True), 'test_cfg.nms.score_voting'),
    ('test_cfg.with_nms', False, 'test_cfg.with_nms'),
    ('data_preprocessor.bgr_to_rgb', False, 'data_preprocessor.bgr_to_rgb=False'),
    ('data_preprocessor.batch_augments', [dict(type='BatchSyncRandomResize')], 'data_preprocessor.batch_augments'),
    ('fast', dict(winograd=True), 'model.fast.winograd'),
]


@pytest.mark.parametrize('path,value,message', REFUSED, ids=[r[0] + '=' + str(r[1])[:30] for r in REFUSED])
def test_unsupported_is_refused_naming_it(path, value, message):
    with pytest.raises(ValueError) as e:
        build_detector(with_(path, value))
    text = str(e.value)
    assert message in text, text
    assert 'supported' in text or 'known' in text, text  # says what would work


def test_the_shipped_and_mmdet_configs_build():
    """MMDetection's own spellings of what gfl_det implements are accepted."""
    cfg = base()
    cfg['bbox_head'].update(norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
                            bbox_coder=dict(type='DistancePointBBoxCoder'))
    cfg['train_cfg'] = dict(assigner=dict(type='ATSSAssigner', topk=9), sampler=dict(type='PseudoSampler'),
                            allowed_border=-1, pos_weight=-1, debug=False)
    cfg['neck']['init_cfg'] = dict(type='Xavier', layer='Conv2d', distribution='uniform')
    model = build_detector(copy.deepcopy(cfg))
    assert model.criterion.topk == 9 and model.test_cfg['nms'] == dict(type='nms', iou_threshold=0.6)
    for name in ('gfl_r50.py', 'gfl_r50_ms2x.py', 'gfl_r101_ms2x.py', 'gfl_r18_bccd.py'):
        m = Config.fromfile(str(CONFIGS / name)).model.to_dict()
        m['backbone']['init_cfg'] = None  # no download
        build_detector(m)


def test_loss_options_reach_the_criterion():
    cfg = with_('bbox_head.loss_cls', dict(type='QualityFocalLoss', use_sigmoid=True, beta=1.5, loss_weight=0.5))
    cfg['bbox_head']['loss_bbox'] = dict(type='GIoULoss', loss_weight=3.0, eps=1e-7)
    cfg['train_cfg'] = dict(assigner=dict(type='ATSSAssigner', topk=5))
    c = build_detector(cfg).criterion
    assert (c.beta, c.giou_eps, c.topk) == (1.5, 1e-7, 5)
    assert c.loss_weights == {'loss_cls': 0.5, 'loss_bbox': 3.0, 'loss_dfl': 0.25}
