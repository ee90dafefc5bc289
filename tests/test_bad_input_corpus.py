"""A bad-input corpus, made here, run through the tools a user runs: tools/check_dataset.py,
tools/train.py (training + validation each epoch) and tools/test.py.

The corpus is the tiny synthetic training set plus one image per problem (named after it), so
every line of every report can be checked by file name:

=====================  =====================================  =============================
file                   problem                                expected
=====================  =====================================  =============================
missing.jpg            file absent                            missing_image, skipped at load
corrupt.jpg            random bytes                           corrupt_image, replaced in
                                                              training / failed in evaluation
truncated.jpg          JPEG cut in half                       corrupt_image, idem
wrong_size.jpg         JSON says another size                 size_mismatch, idem
image id 9001          entry without a file name              bad_image_entry
box_outside.jpg        box entirely right of the image        outside_image
box_huge.jpg           [-1e30, -1e30, 2e30, 2e30]             mostly_outside (not clipped)
box_clipped.jpg        box across the border                  clipped (kept, clipped)
box_zero_w.jpg         w = 0                                  nonpositive_size
box_neg_h.jpg          h < 0                                  nonpositive_size
box_nan.jpg            NaN x                                  nan_bbox
box_malformed.jpg      3 numbers                              malformed_bbox
box_unknown_cat.jpg    category 999                           unknown_category (id named)
box_tiny.jpg           0.5 px wide                            tiny_box
box_zero_area.jpg      area 0                                 zero_area
annotation id 777      image_id 4242 (no such image)          unknown_image
empty.jpg              no annotation                          no_boxes (training filter)
small.jpg              20 x 20 px                             too_small (training filter)
=====================  =====================================  =============================

Every box-problem image also keeps its good boxes, so it stays in training. The model never
sees a bad box or a bad image, training finishes with finite losses, and validation scores the
images that loaded while counting the four that did not. Training and evaluation clean the
ground truth alike: the boxes the loader keeps, given back as predictions, score AP 1.0 on
every case.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gfl_det.data import make_synthetic_coco

from test_engine_e2e import load_tool, scalars, write_tiny_config

IMAGE_CASES = {'missing.jpg': 'missing_image', 'corrupt.jpg': 'corrupt_image',
               'truncated.jpg': 'corrupt_image', 'wrong_size.jpg': 'size_mismatch'}
BOX_CASES = {  # file -> (reason, a bad annotation's fields given the image's (w, h))
    'box_outside.jpg': ('outside_image', lambda w, h: dict(bbox=[w + 5, 2, 10, 10])),
    'box_huge.jpg': ('mostly_outside', lambda w, h: dict(bbox=[-1e30, -1e30, 2e30, 2e30])),
    'box_clipped.jpg': ('clipped', lambda w, h: dict(bbox=[w - 20, 5, 30, 20])),
    'box_zero_w.jpg': ('nonpositive_size', lambda w, h: dict(bbox=[5, 5, 0, 10])),
    'box_neg_h.jpg': ('nonpositive_size', lambda w, h: dict(bbox=[5, 5, 10, -4])),
    'box_nan.jpg': ('nan_bbox', lambda w, h: dict(bbox=[float('nan'), 5, 10, 10])),
    'box_malformed.jpg': ('malformed_bbox', lambda w, h: dict(bbox=[5, 5, 10])),
    'box_unknown_cat.jpg': ('unknown_category', lambda w, h: dict(bbox=[5, 5, 10, 10],
                                                                   category_id=999)),
    'box_tiny.jpg': ('tiny_box', lambda w, h: dict(bbox=[5, 5, 0.5, 10])),
    'box_zero_area.jpg': ('zero_area', lambda w, h: dict(bbox=[5, 5, 10, 10], area=0)),
}
FILTER_CASES = {'empty.jpg': 'no_boxes', 'small.jpg': 'too_small'}
UNKNOWN_IMAGE = 'annotation id 777 (image id 4242)'
BAD_ENTRY = 'image id 9001'
FAILED_IN_EVAL = ['missing.jpg', 'corrupt.jpg', 'truncated.jpg', 'wrong_size.jpg']


def make_corpus(root: Path) -> dict:
    """The synthetic set (8 train images) and corpus.json = its training split + the cases."""
    paths = make_synthetic_coco(root, num_train=8, num_val=4, seed=0)
    img_dir = Path(paths['train_img_dir'])
    data = json.loads(Path(paths['train_ann']).read_text())
    src = data['images'][0]
    src_anns = [a for a in data['annotations'] if a['image_id'] == src['id']]
    src_file = img_dir / src['file_name']
    next_img, next_ann = 1000, 10000

    def add_image(name, width=src['width'], height=src['height'], boxes=True, file_name=True):
        nonlocal next_img, next_ann
        next_img += 1
        entry = {'id': next_img, 'width': width, 'height': height}
        if file_name:
            entry['file_name'] = name
        data['images'].append(entry)
        for a in (src_anns if boxes else []):
            next_ann += 1
            data['annotations'].append(dict(a, id=next_ann, image_id=next_img))
        return next_img

    # images that cannot be used
    add_image('missing.jpg')
    (img_dir / 'corrupt.jpg').write_bytes(np.random.default_rng(0).bytes(3000))
    add_image('corrupt.jpg')
    raw = src_file.read_bytes()
    (img_dir / 'truncated.jpg').write_bytes(raw[:len(raw) // 2])
    add_image('truncated.jpg')
    shutil.copy(src_file, img_dir / 'wrong_size.jpg')
    add_image('wrong_size.jpg', width=src['width'] + 40)
    data['images'].append({'id': 9001, 'width': 100, 'height': 100})   # no file_name
    # images with one bad box (and their good ones)
    for name, (_, bad) in BOX_CASES.items():
        shutil.copy(src_file, img_dir / name)
        iid = add_image(name)
        next_ann += 1
        ann = dict(id=next_ann, image_id=iid, category_id=src_anns[0]['category_id'], iscrowd=0,
                   area=100.0)
        ann.update(bad(src['width'], src['height']))
        data['annotations'].append(ann)
    data['annotations'].append(dict(src_anns[0], id=777, image_id=4242))
    # normal training-time filtering
    shutil.copy(src_file, img_dir / 'empty.jpg')
    add_image('empty.jpg', boxes=False)
    cv2.imwrite(str(img_dir / 'small.jpg'), np.full((20, 20, 3), 128, np.uint8))
    iid = add_image('small.jpg', width=20, height=20, boxes=False)
    data['annotations'].append(dict(src_anns[0], id=next_ann + 1, image_id=iid,
                                    bbox=[2, 2, 10, 10], area=100.0))

    ann_file = root / 'annotations' / 'corpus.json'
    ann_file.write_text(json.dumps(data))   # NaN written as NaN, as Python's json reads it
    return {'ann_file': ann_file, 'img_dir': img_dir, 'data': data}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp('corpus') / 'synthetic')


def expected_lines() -> dict[str, list[str]]:
    """reason -> the names the report must list for it."""
    out: dict[str, list[str]] = {'bad_image_entry': [BAD_ENTRY], 'unknown_image': [UNKNOWN_IMAGE]}
    for cases in (IMAGE_CASES, {k: v[0] for k, v in BOX_CASES.items()}, FILTER_CASES):
        for name, reason in cases.items():
            out.setdefault(reason, []).append(name)
    return out


def report_line(text: str, reason: str) -> str:
    """The report line ``[severity] reason: N (names)`` of ``text`` (the last one)."""
    found = re.findall(rf'^.*\[\w+\] {reason}: \d+ \(.*$', text, re.M)
    assert found, f'no report line for {reason} in:\n{text[-4000:]}'
    return found[-1]


def test_check_dataset_lists_every_case(corpus, capsys):
    tool = load_tool('check_dataset')
    rc = tool.main([str(corpus['ann_file']), str(corpus['img_dir']), '--max-files', '20'])
    out = capsys.readouterr().out
    assert rc == 1, out     # errors found: non-zero exit
    for reason, names in expected_lines().items():
        line = report_line(out, reason)
        assert all(n in line for n in names), (reason, line)
        assert f'{reason}: {len(names)} (' in line, line
    # the fix is printed with every error; the unknown category is named by its id
    assert 'fix: check the image folder' in report_line(out, 'missing_image')
    assert 'box_unknown_cat.jpg (category_id 999)' in report_line(out, 'unknown_category')


def test_the_datasets_own_boxes_score_ap_1_on_every_case(corpus):
    """One cleaning of the ground truth: what the loader keeps (clipped where it clips), given
    back as predictions, is exactly what evaluation scores -- AP 1.0 overall and on each case's
    image. Scored against the raw JSON the same predictions lose AP (the rejected boxes count as
    missed, the clipped one matches its raw box at IoU < 0.95)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from gfl_det.data import CocoDataset
    from gfl_det.evaluation import CocoEvaluator, coco_evaluate
    ds = CocoDataset(corpus['ann_file'], corpus['img_dir'], test_mode=True, on_bad_image='skip',
                     check_images='none')
    preds, metas = [], []
    for i in range(len(ds)):
        info = ds.get_ann_info(i)
        preds.append({'bboxes': info['boxes'], 'scores': np.ones(len(info['boxes'])),
                      'labels': info['labels']})
        metas.append({'img_id': info['img_id'], 'file_name': info['file_name']})
    logs = []
    ev = CocoEvaluator(str(corpus['ann_file']), cat_ids=ds.cat_ids, logger=logs.append)
    ev.process(preds, metas)
    assert ev.evaluate()['bbox_mAP'] == pytest.approx(1.0, abs=1e-12)
    ids = {m['file_name']: m['img_id'] for m in metas}
    for name in [*BOX_CASES, *IMAGE_CASES]:
        one = coco_evaluate(ev.coco_gt, ev.results, img_ids=[ids[name]], classwise=False)
        assert one['bbox_mAP'] == pytest.approx(1.0, abs=1e-12), name
    # the difference from the raw JSON is reported, by annotation id and reason
    text = '\n'.join(map(str, logs))
    assert 'left out of the evaluation: annotation ids' in text and '1 scored clipped' in text
    for reason in ('nan_bbox', 'nonpositive_size', 'mostly_outside', 'unknown_category'):
        assert f'] {reason}: ' in text, reason
    # control: the raw JSON (minus the malformed box, which pycocotools cannot even read)
    raw = dict(corpus['data'], annotations=[a for a in corpus['data']['annotations']
                                            if len(a['bbox']) == 4])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = raw
        gt.createIndex()
        e = COCOeval(gt, gt.loadRes([dict(r) for r in ev.results]), 'bbox')
        e.params.imgIds = sorted(ev.img_ids)
        e.evaluate(), e.accumulate(), e.summarize()
    assert e.stats[0] < 0.99


@pytest.fixture(scope='module')
def trained(corpus, tmp_path_factory):
    """tools/train.py on the corpus (2 epochs), validating on the corpus each epoch."""
    tmp = tmp_path_factory.mktemp('corpus_train')
    root = corpus['img_dir'].parent
    ann = str(corpus['ann_file'])
    extra = f"""
train_dataloader['dataset'].update(ann_file={ann!r}, data_prefix=dict(img='train/'),
                                   filter_cfg=dict(filter_empty_gt=True, min_size=32))
val_dataloader['dataset'].update(ann_file={ann!r}, data_prefix=dict(img='train/'),
                                 on_bad_image='skip')
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={ann!r})
test_evaluator = val_evaluator
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
"""
    cfg = write_tiny_config(tmp / 'corpus.py', root, max_epochs=2, extra=extra)
    work = tmp / 'work'
    rc = load_tool('train').main([str(cfg), '--work-dir', str(work)])
    log = '\n'.join(p.read_text() for p in sorted(work.glob('*/*.log')))
    return {'rc': rc, 'cfg': cfg, 'work': work, 'log': log}


def test_training_runs_through_the_corpus_and_reports_every_case(trained):
    assert trained['rc'] == 0, trained['log'][-4000:]
    log = trained['log']
    recs = scalars(trained['work'])
    losses = [r['loss'] for r in recs if 'loss' in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert not any(r.get('train/nonfinite_skipped') for r in recs)  # nothing bad reached the model

    # the load-time report, before training starts
    head = log.split('training data report')[0]
    for reason, names in expected_lines().items():
        if reason in ('corrupt_image', 'size_mismatch'):
            continue      # only found when decoded: below
        line = report_line(head, reason)
        assert all(n in line for n in names), (reason, line)
    # images found bad when decoded: replaced in their batch, named in the iteration's warning
    replaced = re.findall(r'iteration \d+: \d+ bad image\(s\) replaced by other images in this '
                          r'batch: (.*?) \(\d+ replaced in this run so far\)', log)
    joined = ' '.join(replaced)
    for name in ('corrupt.jpg', 'truncated.jpg', 'wrong_size.jpg'):
        assert name in joined, replaced
    # the final training report lists every case with its count
    final = log.split('training data report')[-1]
    for reason, names in expected_lines().items():
        line = report_line(final, reason)
        assert all(n in line for n in names), (reason, line)
    line = report_line(final, 'corrupt_image')
    assert re.search(r'corrupt_image: (\d+)', line).group(1) in ('2', '4'), line  # 1/epoch each


def test_validation_counts_the_images_that_failed_and_scores_the_rest(trained, corpus):
    assert trained['rc'] == 0
    recs = [r for r in scalars(trained['work']) if 'coco/bbox_mAP' in r]
    assert len(recs) == 2   # validated after each of the 2 epochs
    for r in recs:
        assert r['coco/failed_images'] == len(FAILED_IN_EVAL)
        assert 0.0 <= r['coco/bbox_mAP'] <= 1.0
    log = trained['log']
    # (mmengine's logger shows a repeated warning once: the 2nd epoch's is filtered)
    assert ('4 image(s) failed to load and are NOT in this evaluation: '
            + ', '.join(FAILED_IN_EVAL)) in log, log[-4000:]
    # the GT is cleaned as training cleans it: the malformed box (pycocotools cannot take it)
    # and the others the loader rejects are left out of scoring, by id
    bad_id = next(a['id'] for a in corpus['data']['annotations']
                  if isinstance(a.get('bbox'), list) and len(a['bbox']) == 3)
    line = re.search(r'left out of the evaluation: annotation ids ([^;]*);', log)
    assert line and str(bad_id) in line.group(1).split(', '), log[-4000:]


def test_test_tool_names_the_bad_images_and_the_fix_by_default(trained, capsys):
    """Evaluation's default is to refuse a set with unusable images, naming them."""
    ckpt = trained['work'] / 'epoch_2.pth'
    rc = load_tool('test').main([str(trained['cfg']), str(ckpt), '--work-dir',
                                 str(trained['work'] / 'test_raise'),
                                 '--cfg-options', 'test_dataloader.dataset.on_bad_image=raise'])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert 'missing.jpg' in err and "on_bad_image='skip'" in err


def test_test_tool_on_ground_truth_without_annotations_is_an_error(corpus, trained, tmp_path,
                                                                    capsys):
    """A JSON with images but no annotations: check_dataset says so (not OK), and test.py
    stops with an error instead of printing every metric as -1 and exiting 0."""
    empty = tmp_path / 'no_annotations.json'
    empty.write_text(json.dumps(dict(corpus['data'], annotations=[])))
    rc = load_tool('check_dataset').main([str(empty), str(corpus['img_dir']), '--level', 'exists'])
    out = capsys.readouterr().out
    assert rc == 1 and '[error] no_annotations: 1' in out and ': OK' not in out, out
    ckpt = trained['work'] / 'epoch_2.pth'
    rc = load_tool('test').main([str(trained['cfg']), str(ckpt), '--work-dir',
                                 str(tmp_path / 'w'), '--cfg-options',
                                 f'test_dataloader.dataset.ann_file={empty}',
                                 f'test_evaluator.ann_file={empty}'])
    err = capsys.readouterr().err
    assert rc == 2 and 'error: nothing was scored' in err and str(empty) in err, err[-3000:]


def test_test_tool_with_a_model_that_detects_nothing_gives_ap_zero(trained):
    ckpt = trained['work'] / 'epoch_2.pth'
    work = trained['work'] / 'test_none'
    rc = load_tool('test').main([str(trained['cfg']), str(ckpt), '--work-dir', str(work),
                                 '--cfg-options', 'model.test_cfg.score_thr=1.1'])
    assert rc == 0
    log = '\n'.join(p.read_text() for p in sorted(work.glob('*/*.log')))
    m = re.search(r'test: coco/bbox_mAP: ([\d.-]+)', log)
    assert m and float(m.group(1)) == 0.0, log[-3000:]
    assert 'coco/failed_images: 4.0000' in log


def test_bad_image_with_raise_in_a_worker_is_one_clean_error(trained, capsys):
    """on_bad_image='raise' with a DataLoader worker: the same one-line ``error:`` (exit 2)
    as without workers, naming the file and the fix -- not torch's 'Caught BadImageError in
    DataLoader worker process 0' with a traceback."""
    ckpt = trained['work'] / 'epoch_2.pth'
    rc = load_tool('test').main([str(trained['cfg']), str(ckpt), '--work-dir',
                                 str(trained['work'] / 'test_raise_worker'), '--cfg-options',
                                 'test_dataloader.num_workers=1',
                                 'test_dataloader.persistent_workers=False',
                                 'test_dataloader.dataset.on_bad_image=raise',
                                 'test_dataloader.dataset.check_images=none'])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith('error: ')]
    assert len(line) == 1, err[-3000:]
    assert re.match(r'error: (missing image|corrupt image|size mismatch): \S+\.jpg .*fix: .*'
                    r'\(in DataLoader worker process 0\)$', line[0]), line[0]
    assert 'Traceback' not in err and 'Caught' not in err


def test_training_console_names_each_problem_once(trained, tmp_path):
    """tools/train.py with a worker process, as a user sees it (stdout + stderr): each bad
    image replaced is named once (the iteration's warning; no bare line from the worker), the
    load-time problems once per dataset, no libjpeg noise."""
    import os
    import subprocess
    import sys

    from test_engine_e2e import ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    p = subprocess.run([sys.executable, 'tools/train.py', str(trained['cfg']), '--work-dir',
                        str(tmp_path / 'w'), '--cfg-options', 'train_cfg.max_epochs=1',
                        'train_dataloader.num_workers=1', 'val_dataloader.num_workers=1'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert 'bad image skipped in training' not in out and 'image file(s) skipped' not in out
    assert 'Premature end of JPEG' not in out
    for name in ('corrupt.jpg', 'truncated.jpg', 'wrong_size.jpg'):
        named = [x for x in out.splitlines() if name in x and 'replaced by other images' in x]
        assert len(named) == 1, (name, named)
    assert len(re.findall(r'^\[error\] nan_bbox: 1 \(box_nan\.jpg\)', out, re.M)) == 4, out[-5000:]
