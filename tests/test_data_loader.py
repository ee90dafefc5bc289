"""collate (padding, valid mask, metas), the aspect-ratio batch sampler, build_dataloader."""
import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from gfl_det.data import AspectRatioBatchSampler, CocoDataset, build_dataloader, collate
from gfl_det.structures import Targets
from gfl_det.data.synthetic import make_synthetic_coco


def sample(h, w, n, fill=7, flip=False):
    return {'image': torch.full((3, h, w), fill, dtype=torch.uint8),
            'boxes': torch.arange(n * 4, dtype=torch.float32).reshape(n, 4),
            'labels': torch.arange(n, dtype=torch.int64),
            'meta': {'img_id': n, 'file_name': f'{n}.jpg', 'ori_shape': (h, w),
                     'img_shape': (h, w), 'scale_factor': (1.0, 1.0), 'flip': flip}}


def test_collate_pads_images_and_ground_truth():
    samples = [sample(50, 70, 3, fill=1), sample(64, 33, 0, fill=2), sample(20, 96, 1, fill=3)]
    b = collate(samples)
    assert b['inputs'].shape == (3, 3, 64, 96) and b['inputs'].dtype == torch.uint8
    for i, s in enumerate(samples):
        h, w = s['meta']['img_shape']
        assert (b['inputs'][i, :, :h, :w] == s['image']).all()
        assert b['inputs'][i, :, h:, :].sum() == 0 and b['inputs'][i, :, :, w:].sum() == 0
    t = b['targets']
    assert isinstance(t, Targets) and t.ids is None
    assert t.boxes.shape == (3, 3, 4) and t.boxes.dtype == torch.float32
    assert t.labels.shape == (3, 3) and t.labels.dtype == torch.int64
    assert t.valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert torch.equal(t.boxes[0], samples[0]['boxes'])
    assert torch.equal(t.boxes[2, :1], samples[2]['boxes'])
    assert (t.boxes[~t.valid] == 0).all()
    assert (t.labels[~t.valid] == -1).all()
    assert [m['pad_shape'] for m in b['metas']] == [(64, 96), (64, 64), (32, 96)]
    assert all(m['batch_input_shape'] == (64, 96) for m in b['metas'])
    assert 'pad_shape' not in samples[0]['meta']              # input metas not modified


def test_collate_carries_identities_when_every_sample_has_them():
    samples = [sample(50, 70, 3), sample(64, 33, 0), sample(20, 96, 1)]
    for s, ids in zip(samples, ([7, 8, 9], [], [4])):
        s['ids'] = torch.tensor(ids, dtype=torch.int64)
    t = collate(samples)['targets']
    assert t.ids.tolist() == [[7, 8, 9], [-1, -1, -1], [4, -1, -1]]
    del samples[1]['ids']  # one sample without identities: none in the batch
    assert collate(samples)['targets'].ids is None


def test_targets_from_lists_equals_collate():
    samples = [sample(50, 70, 3), sample(64, 33, 0), sample(20, 96, 1)]
    t = collate(samples)['targets']
    f = Targets.from_lists([s['boxes'] for s in samples], [s['labels'] for s in samples])
    assert all(torch.equal(getattr(f, k), getattr(t, k)) for k in ('boxes', 'labels', 'valid'))


def test_collate_exact_multiple_and_no_boxes_at_all():
    b = collate([sample(64, 32, 0), sample(32, 32, 0)], size_divisor=32)
    assert b['inputs'].shape == (2, 3, 64, 32)
    assert b['targets'].boxes.shape == (2, 0, 4) and b['targets'].valid.shape == (2, 0)
    b = collate([sample(33, 31, 1)], size_divisor=16)
    assert b['inputs'].shape == (1, 3, 48, 32) and b['metas'][0]['pad_shape'] == (48, 32)


class Shapes(torch.utils.data.Dataset):
    def __init__(self, hw):
        self.img_shapes = np.asarray(hw)

    def __len__(self):
        return len(self.img_shapes)


def orientations(batches, hw):
    return [{bool(hw[i][1] >= hw[i][0]) for i in b} for b in batches]


def full_batches_of_one_orientation(batches, hw, batch_size):
    """MMDetection's rule: a batch filled from one bucket is of one orientation; only the
    remainders of the two buckets, merged at the end of the epoch, may mix."""
    mixed = [i for i, o in enumerate(orientations(batches, hw)) if len(o) > 1]
    return len(mixed) <= 1 and all(i >= len(batches) - 2 for i in mixed)


@pytest.mark.parametrize('drop_last', [False, True])
def test_aspect_ratio_sampler_groups_orientations(drop_last):
    rng = np.random.default_rng(0)
    hw = [(int(h), int(w)) for h, w in rng.integers(100, 900, (203, 2))]
    ds = Shapes(hw)
    n_land = sum(w >= h for h, w in hw)
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(0))
    bs = AspectRatioBatchSampler(sampler, batch_size=4, drop_last=drop_last)
    batches = list(bs)
    assert full_batches_of_one_orientation(batches, hw, 4)
    assert sum(len(o) == 1 for o in orientations(batches, hw)) >= len(batches) - 1
    assert len(batches) == len(bs)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    if drop_last:
        assert all(len(b) == 4 for b in batches)
        assert len(flat) == 203 // 4 * 4
    else:
        assert sorted(flat) == list(range(203))
        assert sum(len(b) < 4 for b in batches) == 1            # the merged remainder
    assert n_land % 4 and (203 - n_land) % 4  # both buckets had a remainder: the merge was exercised
    # a different epoch (sampler draws again) gives other batches
    assert list(bs) != batches


def test_aspect_ratio_sampler_with_mmengine_sampler_and_registry_style_kwargs():
    from mmengine.dataset import DefaultSampler
    hw = [(480, 640), (640, 480)] * 10 + [(500, 500)]
    ds = Shapes(hw)
    sampler = DefaultSampler(ds, shuffle=True, seed=3)
    # mmengine's Runner: DATA_SAMPLERS.build(cfg, default_args=dict(sampler=..., batch_size=...))
    bs = AspectRatioBatchSampler(**dict(sampler=sampler, batch_size=3))
    batches = list(bs)
    assert full_batches_of_one_orientation(batches, hw, 3)
    assert sorted(i for b in batches for i in b) == list(range(21)) and len(bs) == len(batches)
    sampler.set_epoch(1)
    assert list(bs) != batches
    with pytest.raises(ValueError):
        AspectRatioBatchSampler(sampler, batch_size=0)


def test_aspect_ratio_sampler_needs_sizes():
    with pytest.raises(TypeError, match='aspect_flags'):
        AspectRatioBatchSampler(SequentialSampler(range(5)), 2)
    bs = AspectRatioBatchSampler(SequentialSampler(range(5)), 2, aspect_flags=[0, 1, 0, 1, 1])
    assert list(bs) == [[0, 2], [1, 3], [4]]
    bs = AspectRatioBatchSampler(SequentialSampler(range(5)), 2, aspect_flags=[0, 1, 0, 1, 0])
    assert list(bs) == [[0, 2], [1, 3], [4]]
    bs = AspectRatioBatchSampler(SequentialSampler(range(6)), 4, aspect_flags=[0, 1, 0, 1, 0, 1])
    assert list(bs) == [[0, 2, 4, 1], [3, 5]]  # the remainders merged: [0, 2, 4] then [1, 3, 5]


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp('syn'), num_train=24, num_val=4, seed=0)


def test_build_dataloader_workers_seeded_and_grouped(synthetic):
    ds = CocoDataset(synthetic['train_ann'], synthetic['train_img_dir'],
                     dict(ms_range=[(400, 200), (400, 300)], flip_prob=0.5))

    def run(num_workers, seed):
        loader = build_dataloader(ds, batch_size=4, num_workers=num_workers, seed=seed,
                                  persistent_workers=False)
        out = []
        for b in loader:
            assert b['inputs'].dtype == torch.uint8 and b['inputs'].shape[-1] % 32 == 0
            assert len({m['img_shape'][1] >= m['img_shape'][0] for m in b['metas']}) == 1
            out.append([(m['img_id'], m['flip'], m['img_shape']) for m in b['metas']])
        return out

    a = run(2, seed=0)
    assert sorted(x[0] for b in a for x in b) == sorted(ds.img_ids)
    assert a == run(2, seed=0)                                   # reproducible with workers
    assert a != run(2, seed=1)
    flips = [x[1] for b in a for x in b]
    assert 0 < sum(flips) < len(flips)                            # workers don't share a stream
    zero = run(0, seed=0)                                         # same order without workers
    assert [[x[0] for x in b] for b in zero] == [[x[0] for x in b] for b in a]


def test_build_dataloader_eval_keeps_order(synthetic):
    ds = CocoDataset(synthetic['val_ann'], synthetic['val_img_dir'], test_mode=True,
                     transforms=dict(scale=(320, 320)))
    loader = build_dataloader(ds, batch_size=1, train=False, num_workers=0,
                              aspect_ratio_grouping=False)
    assert [b['metas'][0]['img_id'] for b in loader] == ds.img_ids


def test_workers_do_not_share_augmentation_streams(tmp_path):
    """Same image 8 times, colour jitter only: if forked workers shared albumentations' or
    numpy's generator, worker 0's batch would equal worker 1's."""
    import json

    import cv2
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / 'a.png'), rng.integers(40, 200, (40, 48, 3), dtype=np.uint8))
    ann = tmp_path / 'ann.json'
    ann.write_text(json.dumps({
        'images': [{'id': i, 'file_name': 'a.png', 'height': 40, 'width': 48} for i in range(8)],
        'annotations': [{'id': i, 'image_id': i, 'category_id': 1, 'bbox': [1, 1, 10, 10]}
                        for i in range(8)],
        'categories': [{'id': 1, 'name': 'a'}]}))
    ds = CocoDataset(ann, tmp_path, dict(scale=None, flip_prob=0, photometric=True),
                     min_size=0)
    loader = build_dataloader(ds, batch_size=4, num_workers=2, train=False,
                              persistent_workers=False)
    b0, b1 = list(loader)
    assert not torch.equal(b0['inputs'], b1['inputs'])


def test_worker_batches_equal_in_process_batches(synthetic):
    """The shared-memory collate path in workers gives the same tensors (padding included)."""
    ds = CocoDataset(synthetic['train_ann'], synthetic['train_img_dir'],
                     dict(scale=(256, 200), flip_prob=0))
    a = list(build_dataloader(ds, batch_size=3, num_workers=0, seed=4))
    b = list(build_dataloader(ds, batch_size=3, num_workers=2, seed=4, persistent_workers=False))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x['inputs'].shape == y['inputs'].shape
        assert torch.equal(x['inputs'], y['inputs'])
        for k in ('boxes', 'labels', 'valid'):
            assert torch.equal(getattr(x['targets'], k), getattr(y['targets'], k))
        assert x['metas'] == y['metas']


def test_mmengine_runner_builds_our_loader(synthetic):
    """mmengine's Runner.build_dataloader with our batch sampler and collate as cfg types."""
    from mmengine.runner import Runner
    ds = CocoDataset(synthetic['train_ann'], synthetic['train_img_dir'], dict(scale=(320, 320)))
    dl = Runner.build_dataloader(dict(
        dataset=ds, sampler=dict(type='DefaultSampler', shuffle=True),
        batch_sampler=dict(type=AspectRatioBatchSampler), collate_fn=dict(type=collate),
        batch_size=5, num_workers=0), seed=0)
    assert isinstance(dl.batch_sampler, AspectRatioBatchSampler)
    batches = list(dl)
    assert len(batches) == len(dl)
    assert sorted(m['img_id'] for b in batches for m in b['metas']) == sorted(ds.img_ids)
    hw = {m['img_id']: m['ori_shape'] for b in batches for m in b['metas']}
    idx = {img_id: i for i, img_id in enumerate(hw)}
    assert full_batches_of_one_orientation([[idx[m['img_id']] for m in b['metas']] for b in batches],
                                           list(hw.values()), 5)


def test_augmentation_depends_on_seed_epoch_and_index_only(synthetic):
    """Every sample's augmentation (multi-scale resize, flip, colour) comes from (seed, epoch,
    index): no workers, 2 persistent workers over 3 epochs, and a fresh loader started at epoch
    2 (a resumed run) give the same batches, bit for bit; another epoch gives others."""
    import pickle

    from gfl_det.data import SampleIndex
    i = SampleIndex(5, seed=3, epoch=7)
    j = pickle.loads(pickle.dumps(i))
    assert (int(j), j.seed, j.epoch, type(j)) == (5, 3, 7, SampleIndex)
    ds = CocoDataset(synthetic['train_ann'], synthetic['train_img_dir'],
                     dict(ms_range=[(320, 160), (320, 256)], flip_prob=0.5, photometric=True))

    def epochs(loader, which):
        out = []
        for e in which:
            loader.batch_sampler.sampler.set_epoch(e)
            out.append([(b['inputs'].clone(), [m['flip'] for m in b['metas']]) for b in loader])
        return out

    def same(a, b):
        return len(a) == len(b) and all(
            torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))

    zero = epochs(build_dataloader(ds, batch_size=4, num_workers=0, seed=1), range(3))
    persistent = epochs(build_dataloader(ds, batch_size=4, num_workers=2, seed=1,
                                         persistent_workers=True), range(3))
    resumed = epochs(build_dataloader(ds, batch_size=4, num_workers=2, seed=1,
                                      persistent_workers=True), [2])
    assert all(same(a, b) for a, b in zip(zero, persistent))
    assert same(resumed[0], zero[2])
    assert not same(zero[0], zero[1])
    flips = [f for b in zero[0] for f in b[1]]
    assert 0 < sum(flips) < len(flips)
