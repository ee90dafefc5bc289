# The embedded default job: GFL with a narrow ResNet-18 trained from scratch on the synthetic
# shapes set (4 classes; 300 train / 60 val images of ~320x320), on a CPU in a few minutes.
#   python tools/train.py configs/gfl_r18_synthetic.py
# The set is written to data/synthetic/ on first use (gfl_det.data.make_synthetic_coco).
_base_ = [
    './_base_/models/gfl_r50_fpn.py',
    './_base_/datasets/coco_detection.py',
    './_base_/schedules/schedule_1x.py',
    './_base_/default_runtime.py',
]
data_root = 'data/synthetic/'
synthetic = dict(num_train=300, num_val=60, seed=0)
img_scale = (384, 320)  # keep-ratio bound (long, short): the images' own size
base_channels = 16  # a narrow ResNet-18 (stage widths 16/32/64/128), as the mmdet_ref "small" model

model = dict(
    backbone=dict(depth=18, base_channels=base_channels, frozen_stages=-1, norm_eval=False,
                  init_cfg=None),  # from scratch: BN trained, nothing frozen
    neck=dict(in_channels=[base_channels * 2**i for i in range(4)], out_channels=64),
    bbox_head=dict(num_classes=4, in_channels=64, feat_channels=64, stacked_convs=2))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(type='SyntheticCocoDataset', data_root=data_root, synthetic=synthetic,
                 ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(type='SyntheticCocoDataset', data_root=data_root, synthetic=synthetic,
                 ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[9, 11],
         gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=0.02), clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(checkpoint=dict(max_keep_ckpts=2))
randomness = dict(seed=0)
