# Instance matching on real photos without identities: coco128 (../shared/datasets/coco128, or
# $COCO128_ROOT), every annotation its own identity, two independently augmented views of each
# image in every batch (MultiViewDataset, views=2): the embedding branch learns to find each object
# again across augmentations. tools/test.py reports reid/two_view_R@1: for each detection matched to
# a gt, is its nearest detection among the other views' detections its counterpart?
#   python tools/train.py configs/gfl_r18_coco128_views.py
#   python tools/test.py configs/gfl_r18_coco128_views.py work_dirs/gfl_r18_coco128_views/epoch_24.pth
# coco128 is COCO train2017's first 128 images: it is the training and the evaluation set here (as
# coco128 is meant to be used); the evaluated views are other augmentations than the trained ones.
_base_ = [
    './_base_/models/gfl_r50_fpn.py',
    './_base_/datasets/coco_detection.py',
    './_base_/default_runtime.py',
]
data_root = '{{$COCO128_ROOT:../shared/datasets/coco128}}/'
img_scale = (512, 384)
base_channels = 16  # the narrow ResNet-18 of the synthetic job, from scratch

model = dict(
    backbone=dict(depth=18, base_channels=base_channels, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[base_channels * 2**i for i in range(4)], out_channels=64),
    bbox_head=dict(num_classes=80, in_channels=64, feat_channels=64, stacked_convs=2, embed=dict(
        # norm='GN', bn_neck=False: the dense GroupNorm tower the README's coco128 figure was measured with
        dim=128, stacked_convs=2, norm='GN', bn_neck=False,
        loss=dict(type='triplet', mining='facenet', margin=0.2, synthesis='symmetrical'),
        loss_weight=1.0, max_per_gt=4)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PhotoMetricDistortion'),
    dict(type='RandomResize', scale=[(416, 312), (608, 456)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs')
]
# the evaluated views: the test resize, then an augmentation of its own per view (seeded: the
# same views in every run)
view_pipeline = [
    dict(type='PhotoMetricDistortion'),
    dict(type='RandomResize', scale=[(416, 312), (608, 456)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
]
coco128 = dict(type='CocoDataset', data_root=data_root, ann_file='annotations/instances_coco128.json',
               data_prefix=dict(img='images/'))
train_dataloader = dict(
    batch_size=4,  # images: 2 views each, 8 samples per step
    num_workers=1,
    dataset=dict(_delete_=True, type='MultiViewDataset', views=2,
                 dataset=dict(coco128, filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=train_pipeline)))
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(_delete_=True, type='MultiViewDataset', views=2, view_pipeline=view_pipeline, seed=0,
                 dataset=dict(coco128, test_mode=True, pipeline=test_pipeline)))
test_dataloader = val_dataloader
# COCO mAP would count each image twice (and flipped views in another frame): the reid/ metrics only
val_evaluator = dict(_delete_=True, type='ReIDMetric')
test_evaluator = val_evaluator

max_epochs = 24
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=4)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[18, 22], gamma=0.1)
]
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001, fused=True),
                     clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(logger=dict(interval=10),
                     checkpoint=dict(save_best='reid/two_view_R@1', rule='greater', max_keep_ckpts=2))
randomness = dict(seed=0)
