"""reid/ metrics over detections matched to ground truth: the matching rule, one-shot
identification, two-view matching, and the mmengine metric's keys."""
from __future__ import annotations

import math

import pytest
import torch

from gfl_det.reid_eval import REID_KEYS, match_to_gt, one_shot_accuracy, reid_metrics, two_view_recall
from gfl_det.structures import Targets


def test_each_gt_takes_its_best_scoring_detection_duplicates_only_overlap():
    gt = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])
    ids = torch.tensor([5, 6])
    boxes = torch.tensor([[0., 0., 10., 11.],    # gt 0, lower score
                          [1., 0., 10., 10.],    # gt 0, best score
                          [20., 20., 30., 30.],  # gt 1
                          [50., 50., 60., 60.],  # nothing
                          [0., 0., 4., 4.]])     # IoU 0.16 with gt 0: nothing
    scores = torch.tensor([0.5, 0.9, 0.4, 0.8, 0.7])
    matched, overlapping = match_to_gt(boxes, scores, gt, ids)
    assert matched.tolist() == [-1, 5, 6, -1, -1]
    assert overlapping.tolist() == [5, 5, 6, -1, -1]
    empty = match_to_gt(boxes, scores, gt[:0], ids[:0])
    assert empty[0].tolist() == [-1] * 5


def test_one_shot_accuracy_by_hand():
    emb = torch.tensor([[0.], [0.1], [0.2], [5.], [5.1], [2.4]])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    acc = one_shot_accuracy(emb, ids, seed=0)
    # whichever example of each identity is enrolled, [0, 0.2] and [5, 5.1] are identified right;
    # 2.4 goes right only when it is closer to the enrolled 1 than to the enrolled 0
    assert 3 / 4 <= acc <= 1.0
    # over all 9 enrolments: right 4 of 4 when 2.4 is the enrolled 1 (1 in 3), else 3 of 4
    expected = 1 / 3 * 1.0 + 2 / 3 * 3 / 4
    assert abs(one_shot_accuracy(emb, ids, seed=0, trials=400) - expected) < 0.02
    assert one_shot_accuracy(emb, ids, seed=0, trials=1) in (3 / 4, 1.0)  # a single draw: one of the two
    assert math.isnan(one_shot_accuracy(emb[:2], torch.tensor([0, 1])))  # one example each: no query
    far = torch.tensor([[0.], [10.], [20.], [0.1], [10.1], [20.1]])
    assert one_shot_accuracy(far, torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0


def test_reid_metrics_keys_and_perfect_separation():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1)
    ids = torch.arange(6).repeat_interleave(5)
    emb = torch.nn.functional.normalize(centres[ids] + 0.01 * torch.randn(30, 16, generator=g), dim=1)
    m = reid_metrics(emb, ids)
    assert tuple(m) == REID_KEYS
    assert all(m[k] == pytest.approx(1.0) for k in ('R@1', 'R@8', 'MAP@R', 'NMI', 'F1', 'verify_acc', 'one_shot_acc'))
    shuffled = reid_metrics(emb, ids[torch.randperm(30, generator=g)])
    assert shuffled['R@1'] < 0.6 and shuffled['MAP@R'] < 0.4


def test_two_view_recall_finds_counterparts_in_the_other_view_only():
    # image 0, view 0: objects a, b; view 1: a', b' and a duplicate detection of b' (overlaps b)
    emb = torch.tensor([[0., 0.], [4., 0.], [0.1, 0.], [4.1, 0.], [3.9, 0.]])
    matched = torch.tensor([0, 1, 0, 1, -1])
    overlapping = torch.tensor([0, 1, 0, 1, 1])
    image = torch.zeros(5, dtype=torch.long)
    view = torch.tensor([0, 0, 1, 1, 1])
    assert two_view_recall(emb, matched, overlapping, image, view) == 1.0
    swapped = torch.tensor([0, 1, 1, 0, -1])  # the other view's identities swapped: every query misses
    assert two_view_recall(emb, swapped, torch.tensor([0, 1, 1, 0, 0]), image, view) == 0.0


def test_the_mm_metric_reports_the_reid_keys(tmp_path):
    from gfl_det.mm import ReIDMetric
    g = torch.Generator().manual_seed(1)
    metric = ReIDMetric()
    metric.dataset_meta = {}
    for img in range(6):  # 6 images x 2 objects of identities (img % 3) and 3 + img % 2
        boxes = torch.tensor([[0., 0., 20., 20.], [40., 40., 80., 80.]])
        ids = torch.tensor([[img % 3, 3 + img % 2]])
        targets = Targets(boxes[None] * 0.5, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), ids)
        metas = [{'img_id': img, 'scale_factor': (0.5, 0.5)}]  # the gt in the batch is in input pixels
        emb = torch.nn.functional.normalize(torch.eye(8)[ids[0]] + 0.05 * torch.randn(2, 8, generator=g), dim=1)
        pred = {'bboxes': boxes + 1, 'scores': torch.tensor([0.9, 0.8]), 'labels': torch.zeros(2, dtype=torch.long),
                'embeddings': emb}
        metric.process({'targets': targets, 'metas': metas}, [pred])
    out = metric.evaluate(6)
    assert {f'reid/{k}' for k in REID_KEYS} <= set(out) and out['reid/matched'] == 12
    assert out['reid/R@1'] == 1.0 and out['reid/one_shot_acc'] == 1.0 and 'reid/two_view_R@1' not in out
