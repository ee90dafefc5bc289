# The R50 GFL model alone (no data, no schedule), for tests that need the full-size network.
model = dict(type='GFL',
             backbone=dict(type='ResNet', depth=50, frozen_stages=1, norm_eval=True),
             neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1,
                       add_extra_convs='on_output', num_outs=5),
             bbox_head=dict(type='GFLHead', num_classes=80, in_channels=256, stacked_convs=4, feat_channels=256,
                            reg_max=16))
