"""gfl_det/plots.py and the tools that write PNGs: analyze_logs.py plot_curve, test.py --plot-dir.
Every PNG written is opened: a valid picture, not one flat colour, with the curves' colours."""
from __future__ import annotations

import json

import numpy as np
import torch
from conftest import assert_png_ok, load_tool, tiny_detector, write_tiny_config

from gfl_det.plots import confusion_matrix, plot_confusion_matrix, plot_pr_curves, resolve_key

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours



def test_confusion_matrix_by_hand(tmp_path):
    gt = (np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float), [0, 1, 2])
    dets = (np.array([[0, 0, 10, 10],          # class 0 on the class-0 object: right
                      [20, 20, 30, 30],        # class 0 on the class-1 object: confused
                      [100, 100, 110, 110],    # class 1 on nothing: false positive
                      [50, 50, 60, 60],        # class 2 on its object, but below score_thr
                      [0, 0, 10, 9]], float),  # class 0 again on the taken object: false positive
            [0.9, 0.8, 0.7, 0.2, 0.6], [0, 0, 1, 2, 0])
    m = confusion_matrix([gt, (np.zeros((0, 4)), [])], [dets, (np.zeros((0, 4)), [], [])], 3,
                         iou_thr=0.5, score_thr=0.3)
    #                     pred 0 1 2 bg
    assert m.tolist() == [[1, 0, 0, 0],    # true 0
                          [1, 0, 0, 0],    # true 1
                          [0, 0, 0, 1],    # true 2: missed
                          [1, 1, 0, 0]]    # background: false positives
    assert_png_ok(plot_confusion_matrix(m, ['a', 'b', 'c'], str(tmp_path / 'cm.png')))


def test_pr_curves_from_cocoeval(tmp_path):
    from gfl_det.evaluation import coco_evaluate
    rng = np.random.default_rng(0)
    images = [{'id': i, 'file_name': f'{i}.jpg', 'height': 200, 'width': 200} for i in range(6)]
    anns, dets = [], []
    for i in range(6):
        for k in range(3):
            x, y, s = rng.uniform(0, 120), rng.uniform(0, 120), rng.uniform(10, 70)
            anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': 1 + k % 2, 'bbox': [x, y, s, s],
                         'area': s * s, 'iscrowd': 0})
            dets.append({'image_id': i, 'category_id': 1 + k % 2, 'score': float(rng.uniform(0.3, 1)),
                         'bbox': [x + rng.normal(0, 3), y + rng.normal(0, 3), s, s]})
    gt = {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]}
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    res = coco_evaluate(str(tmp_path / 'gt.json'), dets, classwise=False)
    assert res['precision'].shape == (10, 101, 2, 4, 3) and res['area_labels'][0] == 'all'
    assert 0.2 < res['bbox_mAP'] < 1
    out = plot_pr_curves(res['precision'], res['iou_thrs'], res['rec_thrs'], str(tmp_path / 'pr.png'),
                         res['area_labels'])
    assert_png_ok(out, colors=[BLUE, ORANGE])


def write_scalars(run_dir, lines):
    (run_dir / 'vis_data').mkdir(parents=True)
    (run_dir / 'vis_data' / 'scalars.json').write_text('\n'.join(json.dumps(x) for x in lines) + '\n')


def test_plot_curve_reads_the_newest_run_and_names_missing_keys(tmp_path, capsys):
    wd = tmp_path / 'work_dir'
    write_scalars(wd / '20260101_000000', [{'loss': 9.0, 'iter': 10, 'epoch': 1, 'step': 10}])
    train = [{'loss': 2.0 / (1 + i), 'loss_cls': 1.0 / (1 + i), 'time': 0.5, 'iter': 10 * i, 'epoch': 1 + i // 4,
              'step': 10 * i} for i in range(1, 13)]
    val = [{'coco/bbox_mAP': 0.1 * e, 'coco/bbox_mAP_50': 0.2 * e, 'time': 0.1, 'step': e} for e in (1, 2, 3)]
    write_scalars(wd / '20260102_000000', train + val)
    tool = load_tool('analyze_logs')
    out = tmp_path / 'curves.png'
    assert tool.main(['plot_curve', str(wd), '--keys', 'loss', 'loss_cls', 'bbox_mAP', '--out', str(out)]) == 0
    assert '20260102_000000' in capsys.readouterr().out
    assert_png_ok(out, colors=[BLUE])
    assert tool.main(['plot_curve', str(wd), '--keys', 'bbox_AP', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert "key 'bbox_AP' is not in the log" in err and 'coco/bbox_mAP, coco/bbox_mAP_50' in err
    assert resolve_key('bbox_mAP_50', ['coco/bbox_mAP', 'coco/bbox_mAP_50']) == 'coco/bbox_mAP_50'
    assert tool.main(['plot_curve', str(tmp_path / 'nothing'), '--out', str(out)]) == 2


def test_test_tool_plot_dir_writes_pr_curves_and_confusion_matrix(tmp_path):
    cfg = write_tiny_config(tmp_path / 'tiny.py', tmp_path / 'data', num_val=4)
    model = tiny_detector(config=cfg)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'tiny.pth')
    plots = tmp_path / 'plots'
    rc = load_tool('test').main([str(cfg), str(tmp_path / 'tiny.pth'), '--work-dir', str(tmp_path / 'wd'),
                                 '--plot-dir', str(plots), '--score-thr', '0.5'])
    assert rc == 0
    assert_png_ok(plots / 'pr_curves.png', colors=[BLUE])
    cm = assert_png_ok(plots / 'confusion_matrix.png')
    assert (np.abs(cm.astype(int) - (8, 48, 107)).max(-1) <= 20).any()  # the darkest 'Blues' cells
