# 12 epochs, as MMDetection's configs/_base_/schedules/schedule_1x.py
# training schedule for 1x
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=12, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# learning rate
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(
        type='MultiStepLR',
        begin=0,
        end=12,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]

# optimizer
optim_wrapper = dict(
    type='OptimWrapper',
    # fused=True: torch's one-kernel SGD (the same update up to float rounding; 4.7x faster on
    # the CPU for R50's parameters), which also lets the guard below skip a step on the device
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001, fused=True),
    # gfl_det: a step whose loss or any gradient is NaN/Inf is skipped (no optimizer step,
    # gradients zeroed, BN statistics restored), counted (train/nonfinite_skipped in the log)
    # and logged with the iteration and the loss term; max_consecutive skipped steps in a row
    # stop training with NonFiniteLossError naming the last good checkpoint.
    # nonfinite_guard=None turns it off (what mmdet does). With a fused optimizer the verdict
    # stays on the device and is read at the logging interval (no host sync per iteration;
    # check='step' reads it every iteration, as it must for an optimizer that is not fused).
    nonfinite_guard=dict(max_consecutive=5))

# Default setting for scaling LR automatically
#   - `enable` means enable scaling LR automatically
#       or not by default.
#   - `base_batch_size` = (8 GPUs) x (2 samples per GPU).
auto_scale_lr = dict(enable=False, base_batch_size=16)
