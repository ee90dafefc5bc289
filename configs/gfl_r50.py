# GFL R50-FPN 1x COCO: MMDetection's configs/gfl/gfl_r50_fpn_1x_coco.py
# (SGD lr 0.01 for 16 images = 8 GPUs x 2; 12 epochs, steps at 8 and 11; 1333x800; flip 0.5).
# MMDetection's published result: 40.2 box AP (theirs, not re-measured here).
_base_ = [
    './_base_/models/gfl_r50_fpn.py',
    './_base_/datasets/coco_detection.py',
    './_base_/schedules/schedule_1x.py',
    './_base_/default_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
