# GFL on BCCD (blood cells, 3 classes, 640x480 microscope photos): a small custom VOC dataset,
# trained from scratch on a CPU. The same recipe as the MMDetection reference run in
# ../shared/mmdet_ref/README.md ("Learning anchor": 0.537 mAP / 0.888 mAP@0.5 after 477 iterations,
# 25 minutes on 2 CPU threads): ResNet-18 standard width, no pretrained weights, BN trained;
# FPN 128 channels over C3-C5; head 128 x 2 convs; 640x480 keep-ratio, flip 0.5; batch 4;
# SGD 0.01 momentum 0.9 wd 1e-4, grad clip 35, linear warm-up 100 iters from 0.001, then constant.
#
# The data: BCCD from https://github.com/Shenggan/BCCD_Dataset (MIT licence; 364 VOC-annotated
# JPEGs), e.g. `git clone https://github.com/Shenggan/BCCD_Dataset data/BCCD_Dataset` (the default
# place) or anywhere with `export BCCD_ROOT=/path/to/BCCD_Dataset` (the folder holding BCCD/).
# Convert the VOC annotations once (tools/voc2coco.py; trainval = 292 images, test = 72):
#   for s in trainval test; do python tools/voc2coco.py ${BCCD_ROOT:-data/BCCD_Dataset} --split $s --out data/bccd/$s.json; done
# then
#   python tools/train.py configs/gfl_r18_bccd.py
_base_ = [
    './_base_/models/gfl_r50_fpn.py',
    './_base_/datasets/coco_detection.py',
    './_base_/default_runtime.py',
]
bccd_root = '{{$BCCD_ROOT:data/BCCD_Dataset}}'  # $BCCD_ROOT when set
img_dir = bccd_root + '/BCCD/JPEGImages/'
ann_dir = 'data/bccd/'
classes = ('Platelets', 'RBC', 'WBC')  # the converter's (sorted) category order

model = dict(
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=128),
    bbox_head=dict(num_classes=3, in_channels=128, feat_channels=128, stacked_convs=2))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(640, 480), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(640, 480), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(data_root='', ann_file=ann_dir + 'trainval.json', data_prefix=dict(img=img_dir),
                 metainfo=dict(classes=classes), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(data_root='', ann_file=ann_dir + 'test.json', data_prefix=dict(img=img_dir),
                 metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=ann_dir + 'test.json')
test_evaluator = val_evaluator

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001, fused=True),
    clip_grad=dict(max_norm=35, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=4)
default_hooks = dict(logger=dict(interval=10))
randomness = dict(seed=0)
