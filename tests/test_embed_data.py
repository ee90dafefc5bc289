"""Data with identities: COCO ``instance_id`` (and the bad cases, by name), every annotation its
own identity over two augmented views of each image, and the synthetic set with identities."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gfl_det.data import CocoDataset, IdentityError, MultiViewDataset, collate, make_synthetic_coco
from gfl_det.data.synthetic_reid import make_identities, make_synthetic_reid_coco


@pytest.fixture(scope='module')
def reid(tmp_path_factory):
    return make_synthetic_reid_coco(tmp_path_factory.mktemp('reid'), num_train=16, num_val=6, seed=0,
                                    train_ids_per_class=3, test_ids_per_class=2)


def rewrite(paths, tmp_path, edit) -> str:
    data = json.load(open(paths['train_ann']))
    edit(data['annotations'])
    out = tmp_path / 'ann.json'
    out.write_text(json.dumps(data))
    return str(out)


def test_instance_ids_ride_with_their_boxes_through_flips(reid):
    data = json.load(open(reid['train_ann']))
    ds = CocoDataset(reid['train_ann'], reid['train_img_dir'], dict(scale=(384, 320), flip_prob=1.0),
                     identities='instance_id')
    by_image = {}
    for a in data['annotations']:
        by_image.setdefault(a['image_id'], []).append(a['instance_id'])
    for i in range(len(ds)):
        s = ds[i]
        names = [ds.identity_names[k] for k in s['ids'].tolist()]
        assert names == by_image[s['meta']['img_id']] and len(s['ids']) == len(s['boxes'])
    batch = collate([ds[0], ds[1]])
    assert batch['targets'].ids is not None and (batch['targets'].ids[~batch['targets'].valid] == -1).all()


@pytest.mark.parametrize('edit, message', [
    (lambda anns: anns[3].update(instance_id='7'), r"must be an int; 1 are not, e.g. annotation id 4 \(train_\d+\.jpg\): '7'"),
    (lambda anns: anns[0].update(instance_id=2.5), r'must be an int.*annotation id 1 .*: 2.5'),
    (lambda anns: anns[1].update(instance_id=True), r'must be an int.*annotation id 2 .*: True'),
    (lambda anns: [a.pop('instance_id') for a in anns[:2]],
     r"'instance_id' on only \d+ of \d+ annotations; missing on 2, e.g. annotation id 1 \(train_00000.jpg\)"),
    (lambda anns: [a.pop('instance_id') for a in anns], r"no annotation has an 'instance_id'.*views=2"),
])
def test_bad_instance_ids_are_named(reid, tmp_path, edit, message):
    ann = rewrite(reid, tmp_path, edit)
    with pytest.raises(IdentityError, match=message):
        CocoDataset(ann, reid['train_img_dir'], identities='instance_id')
    CocoDataset(ann, reid['train_img_dir'])  # without identities the file is fine
    with pytest.raises(ValueError, match="identities='track'"):
        CocoDataset(ann, reid['train_img_dir'], identities='track')


def test_two_views_share_annotation_identities_and_batch_as_images_x_views(tmp_path):
    paths = make_synthetic_coco(tmp_path / 's', num_train=4, num_val=2, seed=0)  # no identities in it
    base = CocoDataset(paths['train_ann'], paths['train_img_dir'], dict(scale=(384, 320), flip_prob=0.5),
                       identities='annotation')
    views = MultiViewDataset(base, views=2)
    np.random.seed(3)
    batch = collate([views[0], views[1], views[2]])
    t, metas = batch['targets'], batch['metas']
    assert len(metas) == 6 and [m['view'] for m in metas] == [0, 1] * 3
    for i in range(0, 6, 2):  # the two views of an image: the same objects, possibly flipped
        assert metas[i]['img_id'] == metas[i + 1]['img_id']
        assert torch.equal(t.ids[i], t.ids[i + 1])
    ids = t.ids[t.valid]
    assert len(ids.unique()) == len(ids) // 2  # every annotation its own identity, twice
    assert any(m['flip'] for m in metas) and not all(m['flip'] for m in metas)  # independently augmented
    with pytest.raises(ValueError, match="identities='annotation'"):
        MultiViewDataset(CocoDataset(paths['train_ann'], paths['train_img_dir']))


def test_evaluation_views_are_augmented_the_same_in_every_run(tmp_path):
    from gfl_det.data import Compose, KeepRatioResize, PhotoMetricDistortion, RandomFlip
    paths = make_synthetic_coco(tmp_path / 's', num_train=2, num_val=3, seed=0)
    base = CocoDataset(paths['val_ann'], paths['val_img_dir'], dict(scale=(384, 320)), test_mode=True,
                       identities='annotation')
    aug = Compose([PhotoMetricDistortion(), KeepRatioResize(ms_range=[(320, 240), (480, 400)]), RandomFlip(0.5)])
    views = MultiViewDataset(base, 2, view_transforms=aug, seed=0)
    state = np.random.get_state()
    a, b = views[1], views[1]
    assert all(torch.equal(x['image'], y['image']) and torch.equal(x['boxes'], y['boxes']) for x, y in zip(a, b))
    x, y = a[0]['image'], a[1]['image']
    assert x.shape != y.shape or not torch.equal(x, y)  # two different views
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global stream is left as it was
    for v in a:  # boxes follow the view's scale (and flip): back in the original frame they match
        sf = torch.tensor(v['meta']['scale_factor'] * 2)
        w0 = v['meta']['ori_shape'][1]
        boxes = v['boxes'] / sf
        if v['meta']['flip']:
            boxes = torch.stack([w0 - boxes[:, 2], boxes[:, 1], w0 - boxes[:, 0], boxes[:, 3]], 1)
        assert torch.allclose(boxes, torch.as_tensor(base.get_ann_info(1)['boxes']), atol=0.6)


def test_synthetic_identities_are_disjoint_distinct_and_the_default_set_unchanged(reid, tmp_path):
    train = json.load(open(reid['train_ann']))
    val = json.load(open(reid['val_ann']))
    tr = {a['instance_id'] for a in train['annotations']}
    te = {a['instance_id'] for a in val['annotations']}
    assert tr <= set(range(12)) and te <= set(range(12, 20)) and len(tr) >= 10
    # an identity keeps one class
    cls_of = {}
    for a in train['annotations'] + val['annotations']:
        assert cls_of.setdefault(a['instance_id'], a['category_id']) == a['category_id']
    bank = make_identities(np.random.default_rng(5), 12)
    for c in range(4):  # identities of a class differ in at least two attributes
        keys = [i.key for i in bank if i.cls == c]
        assert len(keys) == 12
        assert all(sum(x == y for x, y in zip(keys[i], keys[j])) <= 3 for i in range(12) for j in range(i))
    default = make_synthetic_coco(tmp_path / 'd', num_train=2, num_val=1, seed=0)
    anns = json.load(open(default['train_ann']))
    assert 'instance_id' not in anns['annotations'][0] and 'identities' not in anns['info']


def test_identity_batches_use_every_image_once_and_group_shared_identities(reid):
    from torch.utils.data import SequentialSampler

    from gfl_det.data import IdentityBatchSampler
    ds = CocoDataset(reid['train_ann'], reid['train_img_dir'], identities='instance_id')
    sampler = IdentityBatchSampler(SequentialSampler(ds), batch_size=4, images_per_identity=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-len(ds) // 4)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    ids = [set(ds.get_ann_info(i)['ids'].tolist()) for i in range(len(ds))]
    shared = sum(bool(ids[b[j]] & ids[b[j + 1]]) for b in batches for j in range(0, len(b) - 1, 2))
    assert shared >= len(ds) // 2 - 2  # (almost) every pair of images side by side shares an identity
    with pytest.raises(ValueError, match='needs a dataset with identities'):
        IdentityBatchSampler(SequentialSampler(CocoDataset(reid['train_ann'], reid['train_img_dir'])), 4)
