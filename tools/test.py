#!/usr/bin/env python
"""COCO bbox evaluation of a checkpoint (pycocotools): the 12 COCO numbers and a per-class table
(and, for a model with an embedding branch and a config listing ``ReIDMetric``, the ``reid/``
metrics: R@1..8, MAP@R, NMI, F1, verification, one-shot accuracy; two-view matching on a
``MultiViewDataset``).

    python tools/test.py configs/gfl_r18_synthetic.py work_dirs/gfl_r18_synthetic/epoch_12.pth
    python tools/test.py configs/gfl_r50.py gfl_r50_fpn_1x_coco_20200629_121244-25944287.pth \
        --out results.bbox.json --show-dir vis/ --plot-dir plots/

Checkpoints load with ``weights_only=True``: gfl_det's own and MMDetection's model-zoo files
both do; class names come from the checkpoint. A full training checkpoint from elsewhere that
holds Python objects is refused (nothing of it runs); if you trust its source, convert it once:
``python -m gfl_det.checkpoint convert --trust IN OUT``.

Exit status: 0 done; 2 bad input (a missing or refused checkpoint, unusable images, ground truth
with no box to score), with one ``error:`` line naming the file and the fix.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402

from gfl_det.apis import add_inference_args, parse_inference_args  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='COCO evaluation of a GFL checkpoint')
    p.add_argument('config', help='config file')
    p.add_argument('checkpoint', help='checkpoint (gfl_det or MMDetection)')
    p.add_argument('--work-dir', help='where the log goes (default: work_dirs/<config name>)')
    p.add_argument('--out', help='write the detections as a COCO results JSON '
                                 '(e.g. results.bbox.json)')
    p.add_argument('--show-dir', help='write every test image with its predictions drawn here')
    p.add_argument('--score-thr', type=float, default=0.3, help='--show-dir / --plot-dir: draw '
                                                                '(count) boxes scoring at least this')
    p.add_argument('--plot-dir', help='write pr_curves.png (COCOeval precision-recall per IoU and '
                                      'area) and confusion_matrix.png (IoU >= 0.5, --score-thr) here')
    add_inference_args(p)
    p.add_argument('--trust-checkpoint', action='store_true', help=argparse.SUPPRESS)  # removed
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config keys, e.g. test_dataloader.batch_size=4')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help='distributed launcher (pytorch: under torchrun; default none)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parse_inference_args(p, argv)
    if args.trust_checkpoint:
        from gfl_det.checkpoint import trust_flag_removed
        p.error(trust_flag_removed(args.checkpoint))
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def setup_cfg(args) -> Config:
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    if args.channels_last:
        cfg.model.channels_last = True
    cfg.resume = False
    cfg.load_from_strict = True  # evaluate the checkpoint as it is, or fail saying what differs
    cfg.model.backbone.init_cfg = None  # the checkpoint has the weights: no ImageNet download
    if args.out:
        if not args.out.endswith('.json'):
            raise SystemExit('--out must name a .json file (COCO results format)')
        metrics = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        for m in metrics:  # a list: the CocoMetric beside others (ReIDMetric)
            if m.get('type', 'CocoMetric') == 'CocoMetric':
                m.outfile = args.out
    if args.show_dir:
        hooks = list(cfg.get('custom_hooks') or [])
        hooks.append(dict(type='DrawPredictionsHook', out_dir=args.show_dir,
                          score_thr=args.score_thr))
        cfg.custom_hooks = hooks
    import torch
    if not torch.cuda.is_available():
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if '://' not in path and not osp.isfile(path):  # before anything is built or loaded
            print(f'error: {what} not found: {path}', file=sys.stderr)
            return 2
    from gfl_det.fast.malloc import retain_freed_memory
    retain_freed_memory()  # freed activations stay mapped (gfl_det/fast/malloc.py; GFL_DET_MALLOC=system to opt out)
    cfg = setup_cfg(args)
    from gfl_det.checkpoint import CheckpointError
    from gfl_det.data import DatasetError
    from gfl_det.mm import GFLRunner
    try:
        runner = GFLRunner.from_cfg(cfg)
        if args.fuse_conv_bn or args.compile or args.winograd or args.cuda_graph:
            from gfl_det.apis import optimize_for_inference_hook
            runner.register_hook(optimize_for_inference_hook(args.fuse_conv_bn, args.compile, args.winograd,
                                                             args.cuda_graph))
        metrics = runner.test()
    except (DatasetError, CheckpointError) as e:  # the message names the file and the fix
        print(f'error: {e}', file=sys.stderr)
        return 2
    if runner.rank == 0 and metrics and metrics.get('coco/bbox_mAP') == -1:
        ann = cfg.test_evaluator.get('ann_file') if isinstance(cfg.test_evaluator, dict) else ''
        print(f'error: nothing was scored: the ground truth ({ann}) '
              'has no usable box in the evaluated images, so every COCO metric is -1 '
              '(undefined). fix: evaluate on an annotated split (an instances_*.json with '
              "'annotations'); tools/check_dataset.py ANN_FILE IMG_DIR shows what the file holds",
              file=sys.stderr)
        return 2
    if runner.rank == 0 and metrics:
        runner.logger.info('test: ' + '  '.join(f'{k}: {v:.4f}' for k, v in metrics.items()))
    if runner.rank == 0 and args.plot_dir:
        from gfl_det.plots import write_eval_plots
        evaluators = [m.last_evaluator for m in runner.test_evaluator.metrics
                      if getattr(m, 'last_evaluator', None) is not None]
        if not evaluators:
            print('error: --plot-dir: the test evaluator computed no COCO metrics to plot '
                  '(format_only?)', file=sys.stderr)
            return 2
        for path in write_eval_plots(evaluators[0], args.plot_dir, score_thr=args.score_thr):
            runner.logger.info(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
