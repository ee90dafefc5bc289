# The loss-choice table of the README (Detect and identify): configs/gfl_r18_synthetic_reid.py with
# its embedding loss replaced by the one named in $EMBED_LOSS (default: the config's own), same
# data, sampler, schedule and budget:
#   EMBED_LOSS=contrastive python tools/train.py configs/gfl_r18_synthetic_reid_losses.py \
#       --work-dir work_dirs/reid_loss_contrastive
# The table was measured on the set of 600 training images and 100 training identities (25 per
# class), which this config keeps (in its own folder):
_base_ = './gfl_r18_synthetic_reid.py'

data_root = 'data/synthetic_reid100/'
synthetic = dict(num_train=600, num_val=80, seed=0, train_ids_per_class=25, test_ids_per_class=5)
train_dataloader = dict(dataset=dict(data_root=data_root, synthetic=synthetic))
val_dataloader = dict(dataset=dict(data_root=data_root, synthetic=synthetic))
test_dataloader = val_dataloader
val_evaluator = [dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json'),
                 dict(type='ReIDMetric')]
test_evaluator = val_evaluator

LOSSES = dict(
    triplet_all=dict(type='triplet', mining='all', margin=0.2),
    triplet_semihard=dict(type='triplet', mining='semihard', margin=0.2),
    triplet_hard=dict(type='triplet', mining='hard', margin=0.2),
    triplet_batch_hard=dict(type='triplet', mining='batch-hard', margin=0.2),
    triplet_facenet=dict(type='triplet', mining='facenet', margin=0.2),
    symm_triplet_batch_hard=dict(type='triplet', mining='batch-hard', margin=0.2, synthesis='symmetrical'),
    symm_triplet_facenet=dict(type='triplet', mining='facenet', margin=0.2, synthesis='symmetrical'),
    contrastive=dict(type='contrastive', pos_margin=0.0, neg_margin=1.0),
    npair=dict(type='npair', scale=16.0),
    symm_npair=dict(type='npair', scale=16.0, synthesis='symmetrical'),
    arcface=dict(type='arcface', num_ids=100, scale=16.0, margin=0.5),  # the 100 training identities
    siamese=dict(type='siamese', neg_per_pos=1.0),
)
# norm='GN', bn_neck=False, feature_grad=1.0: the dense GroupNorm tower, without a BN neck, and the
# whole gradient into the FPN, as the table was measured (the reid config now differs in all three)
model = dict(bbox_head=dict(embed=dict(norm='GN', bn_neck=False, feature_grad=1.0,
                                       loss=dict(_delete_=True, **LOSSES['{{$EMBED_LOSS:symm_triplet_facenet}}']))))
