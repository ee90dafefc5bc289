# GFL R101-FPN, multi-scale training, 2x: MMDetection's gfl_r101_fpn_ms-2x_coco.py on top of
# gfl_r50_ms2x.py (see its note on the scale range). MMDetection's published result: 44.7 box AP.
_base_ = './gfl_r50_ms2x.py'
model = dict(
    backbone=dict(
        type='ResNet',
        depth=101,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet101')))
