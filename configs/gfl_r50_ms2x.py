# GFL R50-FPN, multi-scale training, 2x (24 epochs, steps at 16 and 22).
# Short side drawn from 480..960 as in the GFL paper. Deviation, on purpose: MMDetection's
# gfl_r50_fpn_ms-2x_coco.py (published 42.9 box AP) samples 480..800; for its exact recipe use
#   --cfg-options "train_dataloader.dataset.pipeline.2.scale=[[1333,480],[1333,800]]"
_base_ = './gfl_r50.py'
max_epochs = 24

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[16, 22],
         gamma=0.1)
]
train_cfg = dict(max_epochs=max_epochs)

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=[(1333, 480), (1333, 960)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
