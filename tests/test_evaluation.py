"""gfl_det.evaluation and tools/eval_results.py against pycocotools run directly.

Every comparison with pycocotools is exact (==): the tool and coco_evaluate must give the very
numbers COCOeval gives on the same files, not numbers close to them.
"""

import contextlib
import copy
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gfl_det.evaluation import (METRIC_NAMES, CocoEvaluator, coco_evaluate, load_coco_gt,
                                predictions_to_coco)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'eval_results.py'
COCO128_ANN = (Path(__file__).resolve().parents[2] / 'shared' / 'datasets' / 'coco128'
               / 'annotations' / 'instances_coco128.json')

CATS = [(1, 'person'), (3, 'car'), (17, 'cat'), (44, 'bottle'), (90, 'toothbrush')]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def make_gt(seed=0, num_images=24):
    """Synthetic COCO GT: non-contiguous category ids up to 90, small/medium/large boxes,
    crowd boxes, images without annotations, a category (44) present in no image."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        img_id = 1000 + 7 * i  # non-contiguous image ids
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        images.append({'id': img_id, 'width': w, 'height': h, 'file_name': f'{img_id}.jpg'})
        if i % 6 == 5:
            continue  # image without annotations
        for _ in range(int(rng.integers(1, 9))):
            side = float(rng.choice([12, 24, 48, 80, 150])) * float(rng.uniform(0.8, 1.25))
            bw = min(side * float(rng.uniform(0.6, 1.6)), w - 2)
            bh = min(side * float(rng.uniform(0.6, 1.6)), h - 2)
            x = float(rng.uniform(0, w - bw))
            y = float(rng.uniform(0, h - bh))
            cat = int(rng.choice([1, 3, 17, 90]))
            anns.append({'id': len(anns) + 1, 'image_id': img_id, 'category_id': cat,
                         'bbox': [x, y, bw, bh], 'area': bw * bh * 0.9,
                         'iscrowd': int(rng.random() < 0.08), 'segmentation': []})
    return {'images': images, 'annotations': anns,
            'categories': [{'id': c, 'name': n} for c, n in CATS]}


def make_results(gt, seed=1, miss=0.2, fp_per_img=3, swap_cat=0.05):
    """Perturbed GT boxes with random scores, missed boxes, false positives (also on images
    without GT), detections on crowd boxes, occasional wrong categories, and one image with
    more than 100 detections (maxDets)."""
    rng = np.random.default_rng(seed)
    cat_ids = [c for c, _ in CATS]
    res = []
    for a in gt['annotations']:
        if rng.random() < miss:
            continue
        x, y, w, h = a['bbox']
        j = rng.normal(0, 0.08, 4)
        box = [float(v) for v in (x + j[0] * w, y + j[1] * h, w * (1 + j[2]), h * (1 + j[3]))]
        cat = a['category_id'] if rng.random() > swap_cat else int(rng.choice(cat_ids))
        res.append({'image_id': a['image_id'], 'category_id': cat, 'bbox': box,
                    'score': float(rng.random())})
    for img in gt['images']:
        for _ in range(int(rng.integers(0, fp_per_img + 1))):
            bw, bh = float(rng.uniform(5, 200)), float(rng.uniform(5, 200))
            res.append({'image_id': img['id'], 'category_id': int(rng.choice(cat_ids)),
                        'bbox': [float(rng.uniform(0, img['width'])),
                                 float(rng.uniform(0, img['height'])), bw, bh],
                        'score': float(rng.random() * 0.7)})
    img = gt['images'][0]
    for _ in range(130):
        res.append({'image_id': img['id'], 'category_id': 1,
                    'bbox': [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)),
                             float(rng.uniform(10, 100)), float(rng.uniform(10, 100))],
                    'score': float(rng.random())})
    return res


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def pycocotools_stats(ann_path, res, img_ids=None):
    """The reference: pycocotools alone, the way its README uses it."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        if isinstance(res, list) and not res:
            # loadRes crashes on []; build the empty result set by hand
            dt = COCO()
            dt.dataset = {'images': gt.dataset['images'], 'annotations': [],
                          'categories': copy.deepcopy(gt.dataset['categories'])}
            dt.createIndex()
        else:
            dt = gt.loadRes(str(res) if isinstance(res, Path) else copy.deepcopy(res))
        ev = COCOeval(gt, dt, 'bbox')
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats.tolist(), ev


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('coco')
    gt = make_gt()
    res = make_results(gt)
    return {'gt': gt, 'res': res, 'ann': write_json(d / 'ann.json', gt),
            'res_path': write_json(d / 'res.json', res), 'dir': d}


# ----------------------------------------------------------------------------------------------
# exact agreement with pycocotools
# ----------------------------------------------------------------------------------------------
def test_fixture_exercises_the_hard_cases(files):
    gt, res = files['gt'], files['res']
    assert any(a['iscrowd'] for a in gt['annotations'])
    assert {a['image_id'] for a in gt['annotations']} != {i['id'] for i in gt['images']}
    assert max(c for c, _ in CATS) == 90
    ref, _ = pycocotools_stats(files['ann'], files['res_path'])
    # neither trivial nor degenerate: AP strictly between 0 and 1, every area bucket defined
    assert 0.2 < ref[0] < 0.95 and all(s > 0 for s in ref)
    assert len(res) > 100


def test_tool_json_equals_pycocotools(files):
    ref, _ = pycocotools_stats(files['ann'], files['res_path'])
    p = run_tool(files['ann'], files['res_path'], '--json', '--classwise')
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout  # exactly one JSON line, no pycocotools chatter
    out = json.loads(lines[0])
    assert out['stats'] == ref
    assert list(out['metrics']) == list(METRIC_NAMES)
    assert list(out['metrics'].values()) == ref
    assert out['num_detections'] == len(files['res'])
    assert out['num_images'] == len(files['gt']['images'])
    by_id = {r['category_id']: r for r in out['classwise']}
    assert by_id[44]['AP'] is None  # no GT of category 44 anywhere: nan -> null
    assert by_id[90]['name'] == 'toothbrush'


def _tool_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location('eval_results', TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_tool_text_output_in_process(files, capsys):
    ref, _ = pycocotools_stats(files['ann'], files['res_path'])
    assert _tool_main()([str(files['ann']), str(files['res_path']), '--classwise']) == 0
    out = capsys.readouterr().out
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]' in out
    for name, v in zip(METRIC_NAMES, ref):
        assert f'{name:>14s} {v:.4f}' in out
    assert 'toothbrush' in out and 'bottle' in out


def test_coco_evaluate_list_and_path_agree_with_pycocotools(files):
    ref, ev = pycocotools_stats(files['ann'], files['res_path'])
    from_list = coco_evaluate(str(files['ann']), files['res'])
    from_path = coco_evaluate(load_coco_gt(files['ann']), files['res_path'])
    assert from_list['stats'] == ref
    assert from_path['stats'] == ref
    assert [from_list[k] for k in METRIC_NAMES] == ref
    assert 'maxDets=100' in from_list['summary']
    # per-class AP: the same slice of eval['precision'] mmdet/detectron2 average
    prec = ev.eval['precision']
    for k, row in enumerate(from_list['classwise']):
        assert row['category_id'] == ev.params.catIds[k]
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            assert row['AP'] == float(np.mean(p))
            p50 = prec[0, :, k, 0, -1]
            assert row['AP50'] == float(np.mean(p50[p50 > -1]))
        else:
            assert math.isnan(row['AP']) and row['num_gt'] == 0
    # independent check: mean of per-class AP over classes with GT is the overall mAP
    aps = [r['AP'] for r in from_list['classwise'] if not math.isnan(r['AP'])]
    assert math.isclose(float(np.mean(aps)), ref[0], rel_tol=1e-12)
    assert 'toothbrush' in from_list['classwise_table']


def test_results_not_mutated(files):
    res = copy.deepcopy(files['res'])
    coco_evaluate(files['ann'], res, classwise=False)
    assert res == files['res']  # loadRes adds id/area/segmentation to the dicts it gets


def test_img_ids_restriction_matches_pycocotools(files):
    img_ids = [i['id'] for i in files['gt']['images'][::2]]
    ref, _ = pycocotools_stats(files['ann'], files['res_path'], img_ids=img_ids)
    full, _ = pycocotools_stats(files['ann'], files['res_path'])
    out = coco_evaluate(files['ann'], files['res'], img_ids=img_ids)
    assert out['stats'] == ref
    assert out['num_images'] == len(img_ids)
    assert ref != full  # the restriction matters on this data


def test_empty_results(files, tmp_path):
    ref, _ = pycocotools_stats(files['ann'], [])
    out = coco_evaluate(files['ann'], [])
    assert out['stats'] == ref
    # by hand: no detections -> AP/AR 0 wherever GT exists (every area bucket here)
    assert out['stats'] == [0.0] * 12
    p = run_tool(files['ann'], write_json(tmp_path / 'empty.json', []), '--json')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)['stats'] == [0.0] * 12


def test_empty_results_without_gt_gives_minus_one(tmp_path):
    gt = {'images': [{'id': 1, 'width': 100, 'height': 100}], 'annotations': [],
          'categories': [{'id': 5, 'name': 'x'}]}
    out = coco_evaluate(write_json(tmp_path / 'a.json', gt), [])
    assert out['stats'] == [-1.0] * 12


def test_hand_computed_ap(tmp_path):
    # one GT 100x100 at (0,0); a detection shifted by 15 px in x: IoU = 85*100/(115*100) = 0.739
    # -> matched at IoU thresholds 0.50..0.70 (5 of 10): AP = 0.5, AP50 = 1, AP75 = 0
    gt = {'images': [{'id': 1, 'width': 400, 'height': 400}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 7, 'bbox': [0, 0, 100, 100],
                           'area': 10000.0, 'iscrowd': 0}],
          'categories': [{'id': 7, 'name': 'thing'}]}
    ann = write_json(tmp_path / 'a.json', gt)
    out = coco_evaluate(ann, [{'image_id': 1, 'category_id': 7, 'bbox': [15, 0, 100, 100],
                               'score': 0.9}])
    s = out['stats']  # (pycocotools' precision is tp / (tp + fp + eps): isclose, not ==)
    assert math.isclose(s[0], 0.5) and math.isclose(s[1], 1.0) and s[2] == 0.0
    assert s[3] == -1.0 and s[4] == -1.0 and math.isclose(s[5], 0.5)  # 10000 px^2 is 'large'
    assert math.isclose(s[8], 0.5)  # AR@100: recalled at 5 of 10 thresholds
    assert math.isclose(out['classwise'][0]['AP50'], 1.0)


def test_unknown_image_and_category_are_clear_errors(files):
    res = [dict(files['res'][0], image_id=424242)]
    with pytest.raises(ValueError, match=r'image id.*not in the annotation file: 424242'):
        coco_evaluate(files['ann'], res)
    res = [dict(files['res'][0], category_id=2)]
    with pytest.raises(ValueError, match=r'category id.*\b2\b.*1, 3, 17, 44, 90'):
        coco_evaluate(files['ann'], res)
    with pytest.raises(ValueError, match='img_ids not in the annotation file: 5'):
        coco_evaluate(files['ann'], files['res'], img_ids=[5])
    with pytest.raises(ValueError, match=r'entry 0 lacks \[.score.\]'):
        coco_evaluate(files['ann'], [{'image_id': 1000, 'category_id': 1, 'bbox': [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match='bbox'):
        coco_evaluate(files['ann'], [{'image_id': 1000, 'category_id': 1, 'bbox': [0, 0, 1],
                                      'score': 0.5}])


def test_tool_errors_name_the_file(files, tmp_path, capsys):
    main = _tool_main()
    missing = tmp_path / 'nope.json'
    assert main([str(files['ann']), str(missing)]) == 2
    assert f"results file not found: '{missing}'" in capsys.readouterr().err
    bad = tmp_path / 'bad.json'
    bad.write_text('[{"image_id": 1,')
    assert main([str(files['ann']), str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and 'not valid JSON' in err
    assert main([str(bad), str(files['res_path'])]) == 2
    assert 'annotation file' in capsys.readouterr().err
    obj = write_json(tmp_path / 'obj.json', {'annotations': []})
    assert main([str(files['ann']), str(obj)]) == 2
    assert 'expected a JSON list' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# predictions_to_coco / CocoEvaluator
# ----------------------------------------------------------------------------------------------
def _preds_from_results(res, img_ids, cat_ids):
    """Contract-style predictions (float32 tensors, xyxy, contiguous labels) per image."""
    import torch
    label_of = {c: i for i, c in enumerate(cat_ids)}
    preds, metas = [], []
    for img_id in img_ids:
        rs = [r for r in res if r['image_id'] == img_id]
        xywh = torch.tensor([r['bbox'] for r in rs], dtype=torch.float32).reshape(-1, 4)
        preds.append({'bboxes': torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                      'scores': torch.tensor([r['score'] for r in rs], dtype=torch.float32),
                      'labels': torch.tensor([label_of[r['category_id']] for r in rs],
                                             dtype=torch.int64)})
        metas.append({'img_id': img_id, 'file_name': f'{img_id}.jpg'})
    return preds, metas


def test_predictions_to_coco_round_trip():
    import torch
    cat_ids = [1, 3, 17, 44, 90]
    preds = [{'bboxes': torch.tensor([[10.5, 20.25, 30.75, 60.0], [0, 0, 1, 1]]),
              'scores': torch.tensor([0.9, 0.1]), 'labels': torch.tensor([4, 0])},
             {'bboxes': torch.zeros(0, 4), 'scores': torch.zeros(0),
              'labels': torch.zeros(0, dtype=torch.int64)}]
    out = predictions_to_coco(preds, [{'img_id': 7}, {'img_id': 8}], cat_ids)
    assert out == [
        {'image_id': 7, 'category_id': 90, 'bbox': [10.5, 20.25, 20.25, 39.75],
         'score': float(torch.tensor(0.9))},
        {'image_id': 7, 'category_id': 1, 'bbox': [0.0, 0.0, 1.0, 1.0],
         'score': float(torch.tensor(0.1))}]
    assert all(type(v) is float for r in out for v in r['bbox'] + [r['score']])
    assert type(out[0]['image_id']) is int and type(out[0]['category_id']) is int
    json.dumps(out)  # plain Python types only
    with pytest.raises(ValueError, match='label 5'):
        predictions_to_coco([dict(preds[0], labels=torch.tensor([5, 0]))], [{'img_id': 7}],
                            cat_ids)


def test_predictions_to_coco_boxes_are_exact_float32(files):
    """xyxy float32 -> xywh: x, y are the float32 values exactly; w = x2 - x1 in float64."""
    cat_ids = [c for c, _ in CATS]
    img_ids = [i['id'] for i in files['gt']['images']]
    preds, metas = _preds_from_results(files['res'], img_ids, cat_ids)
    out = predictions_to_coco(preds, metas, cat_ids)
    assert len(out) == len(files['res'])
    for p, m in zip(preds, metas):
        mine = [r for r in out if r['image_id'] == m['img_id']]
        b = p['bboxes'].double()
        for r, bb in zip(mine, b.tolist()):
            assert r['bbox'] == [bb[0], bb[1], bb[2] - bb[0], bb[3] - bb[1]]


def test_coco_evaluator_equals_pycocotools_on_processed_images(files, tmp_path):
    cat_ids = [c for c, _ in CATS]
    logs = []
    ev = CocoEvaluator(str(files['ann']), cat_ids=cat_ids, logger=logs.append)
    # images 0..17 processed (some without detections or GT), the last ones "failed to load"
    img_ids = [i['id'] for i in files['gt']['images']][:18]
    preds, metas = _preds_from_results(files['res'], img_ids, cat_ids)
    for b in range(0, len(preds), 4):
        ev.process(preds[b:b + 4], metas[b:b + 4])
    ev.process(preds[:1], metas[:1])  # a duplicate (sampler padding) is ignored
    ev.add_failed(['broken1.jpg', 'broken2.jpg'])
    out = ev.evaluate()
    res_path = tmp_path / 'res.json'
    ev.dump(res_path)
    ref, _ = pycocotools_stats(files['ann'], res_path, img_ids=img_ids)
    assert out['stats'] == ref
    assert out['num_images'] == 18
    assert out['failed_images'] == ['broken1.jpg', 'broken2.jpg']
    text = '\n'.join(logs)
    assert '2 image(s) failed to load' in text and 'broken1.jpg' in text
    assert 'predicted twice' in text
    assert 'bbox_mAP_copypaste' in text and 'toothbrush' in text


def test_coco_evaluator_counts_images_that_failed_to_load(files):
    """A dataset's stand-in for an unreadable image (meta 'load_failed') is reported as failed
    and left out of the evaluation, exactly as if it had never been processed."""
    cat_ids = [c for c, _ in CATS]
    img_ids = [i['id'] for i in files['gt']['images']][:10]
    preds, metas = _preds_from_results(files['res'], img_ids, cat_ids)
    logs = []
    ev = CocoEvaluator(str(files['ann']), cat_ids=cat_ids, logger=logs.append)
    failed = dict(metas[3], load_failed='corrupt_image')
    ev.process(preds[:3] + [preds[3]] + preds[4:], metas[:3] + [failed] + metas[4:])
    out = ev.evaluate()
    assert out['failed_images'] == [metas[3]['file_name']] and out['num_images'] == 9
    kept = img_ids[:3] + img_ids[4:]
    ref, _ = pycocotools_stats(files['ann'], [r for r in files['res'] if r['image_id'] in kept],
                               img_ids=kept)
    assert out['stats'] == ref
    assert '1 image(s) failed to load' in '\n'.join(logs)


def test_coco_evaluator_nothing_processed(files):
    ev = CocoEvaluator(files['ann'])
    ev.add_failed(['a.jpg'])
    with pytest.raises(RuntimeError, match='no images were processed.*a.jpg'):
        ev.evaluate()


# ----------------------------------------------------------------------------------------------
# real annotations
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not COCO128_ANN.is_file(),
                    reason=f'real COCO annotations not found at {COCO128_ANN} '
                           f'(../shared/datasets/coco128 is only present in the shared checkout)')
def test_coco128_perturbed_gt_equals_pycocotools(tmp_path):
    gt = json.loads(COCO128_ANN.read_text())
    rng = np.random.default_rng(3)
    res = []
    for a in gt['annotations']:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a['bbox']
        j = rng.normal(0, 0.06, 4)
        res.append({'image_id': a['image_id'], 'category_id': a['category_id'],
                    'bbox': [float(v) for v in (x + j[0] * w, y + j[1] * h,
                                                w * (1 + j[2]), h * (1 + j[3]))],
                    'score': float(rng.random())})
    res_path = write_json(tmp_path / 'res.json', res)
    ref, _ = pycocotools_stats(COCO128_ANN, res_path)
    assert 0.3 < ref[0] < 0.95
    out = coco_evaluate(str(COCO128_ANN), str(res_path))
    assert out['stats'] == ref
    p = run_tool(COCO128_ANN, res_path, '--json')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)['stats'] == ref
    # class names come from the GT json, all 80 categories listed
    assert len(out['classwise']) == 80
    assert {r['name'] for r in out['classwise']} >= {'person', 'toothbrush'}


def test_gt_pycocotools_cannot_evaluate_is_left_out_with_a_warning(files, tmp_path):
    """A GT box that is not 4 numbers makes COCOeval raise deep inside; ours leaves it out
    (named in a warning) and gives exactly pycocotools' numbers on the file without it. GT
    without 'area' / 'iscrowd' (COCOeval reads both) is filled as w * h and 0."""
    gt = json.loads(Path(files['ann']).read_text())
    broken = copy.deepcopy(gt)
    bad_id = 99999
    broken['annotations'].append(dict(broken['annotations'][0], id=bad_id, bbox=[1, 2, 3]))
    for a in broken['annotations'][:5]:
        a.pop('area'), a.pop('iscrowd')
    res = files['res']
    with pytest.raises(Exception):   # pycocotools itself, on the broken file
        pycocotools_stats(write_json(tmp_path / 'broken.json', broken), res)
    clean = copy.deepcopy(gt)        # what the broken file means: the box gone, fields filled
    for a in clean['annotations'][:5]:
        a['area'], a['iscrowd'] = float(a['bbox'][2] * a['bbox'][3]), 0
    ref, _ = pycocotools_stats(write_json(tmp_path / 'clean.json', clean), res)
    logs = []
    out = coco_evaluate(tmp_path / 'broken.json', res, logger=logs.append)
    assert out['stats'] == ref
    text = '\n'.join(logs)
    assert f'left out of the evaluation: annotation ids {bad_id};' in text
    assert "5 ground-truth annotation(s) without 'area' or 'iscrowd'" in text
