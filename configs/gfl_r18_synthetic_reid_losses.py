# The loss-choice table of the README (Detect and identify): configs/gfl_r18_synthetic_reid.py with
# its embedding loss replaced by the one named in $EMBED_LOSS (default: the config's own), same
# data, sampler, schedule and budget:
#   EMBED_LOSS=contrastive python tools/train.py configs/gfl_r18_synthetic_reid_losses.py \
#       --work-dir work_dirs/reid_loss_contrastive
_base_ = './gfl_r18_synthetic_reid.py'

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
model = dict(bbox_head=dict(embed=dict(loss=dict(_delete_=True, **LOSSES['{{$EMBED_LOSS:symm_triplet_facenet}}']))))
