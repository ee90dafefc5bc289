# Runtime defaults, as MMDetection's configs/_base_/default_runtime.py, in gfl_det's scope.
default_scope = 'gfl_det'
custom_imports = dict(imports=['gfl_det.mm'], allow_failed_imports=False)

default_hooks = dict(
    # mmengine's RuntimeInfoHook, minus its per-iteration .item() on every loss
    runtime_info=dict(type='DeferredRuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    # gfl_det's LoggerHook: 'auto' = a line ~5 times per epoch (at most every 50 iterations), and
    # progress lines with ETA at iterations 1, 2, 4, ... before the first interval
    logger=dict(type='LoggerHook', interval='auto'),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # a checkpoint every epoch, and the best one by COCO box AP (best_coco_bbox_mAP_epoch_N.pth)
    checkpoint=dict(type='CheckpointHook', interval=1, save_best='coco/bbox_mAP', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'))

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))  # tools/train.py switches to gloo without CUDA

vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
# no fixed name: every run (and every runner in one process) gets its own, writing to its log dir
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False
