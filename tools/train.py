#!/usr/bin/env python
"""Train a GFL detector from an MMDetection-style config (mmengine Runner).

    python tools/train.py configs/gfl_r18_synthetic.py                 # CPU or GPU
    python tools/train.py configs/gfl_r50.py --amp --auto-scale-lr
    tools/dist_train.sh configs/gfl_r50.py 8                           # torchrun, 8 GPUs
    python tools/train.py CONFIG --resume                              # continue after a kill

Logs (ETA, losses, lr) and TensorBoard events go to the work dir (default
``work_dirs/<config name>``), with a checkpoint per epoch, ``best_coco_bbox_mAP_epoch_N.pth``
and COCO validation after every epoch.

The console shows a short header (config, work dir, log file, data, schedule, device), then
progress lines with ETA; mmengine's environment / config / hook dump is in the log file only.

Exit status: 0 done; 2 bad input (dataset, a missing or refused checkpoint, missing pretrained
weights: one ``error:`` line naming the file and the fix); 3 training stopped by the non-finite
guard (``optim_wrapper.nonfinite_guard.max_consecutive`` NaN/Inf steps in a row, or non-finite
weights; the message names the last good checkpoint); 130 interrupted (Ctrl-C: the message gives
the ``--resume`` command); anything else is an error with its traceback. Every error's traceback
is also in the run's log file.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout too

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Train a GFL detector')
    p.add_argument('config', help='config file, e.g. configs/gfl_r18_synthetic.py')
    p.add_argument('--work-dir', help='where logs and checkpoints go '
                   '(default: work_dirs/<config name>)')
    p.add_argument('--resume', nargs='?', type=str, const='auto',
                   help='resume: alone, from the latest checkpoint in the work dir; '
                        'with a path, from that checkpoint (read with weights_only=True, as '
                        'every checkpoint)')
    p.add_argument('--amp', nargs='?', const='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='mixed precision (AmpOptimWrapper); alone: float16 on CUDA, '
                        'bfloat16 on the CPU')
    p.add_argument('--channels-last', action='store_true',
                   help='weights and batches in the NHWC memory layout (model.channels_last=True); '
                        'same results to float rounding (see README, Speed)')
    p.add_argument('--auto-scale-lr', action='store_true',
                   help='scale lr by total batch size / auto_scale_lr.base_batch_size (16)')
    p.add_argument('--seed', type=int, help='random seed (overrides the config)')
    p.add_argument('--deterministic', action='store_true',
                   help='deterministic cuDNN / torch algorithms')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config keys, e.g. train_cfg.max_epochs=6 '
                        'optim_wrapper.optimizer.lr=0.005')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                   help="'pytorch' under torchrun (tools/dist_train.sh)")
    p.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def setup_cfg(args) -> Config:
    cfg = Config.fromfile(args.config)  # imports gfl_det.mm through custom_imports
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        ow = cfg.optim_wrapper
        if ow.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP is already on in the config', file=sys.stderr)
        ow.type = 'AmpOptimWrapper'
        ow.dtype = None if args.amp == 'auto' else args.amp
        ow.setdefault('loss_scale', 'dynamic')

    if args.channels_last:
        cfg.model.channels_last = True

    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise SystemExit('--auto-scale-lr: the config has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True

    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    if args.seed is not None or args.deterministic:
        rnd = dict(cfg.get('randomness') or {})
        if args.seed is not None:
            rnd['seed'] = args.seed
        if args.deterministic:
            rnd['deterministic'] = True
        cfg.randomness = rnd

    if not torch.cuda.is_available():
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.config, 'config'), (args.resume, '--resume: checkpoint')):
        if path not in (None, 'auto') and not osp.isfile(path):  # before anything is built
            print(f'error: {what} not found: {path}', file=sys.stderr)
            return 2
    from gfl_det.fast.malloc import retain_freed_memory
    retain_freed_memory()  # freed activations stay mapped (gfl_det/fast/malloc.py; GFL_DET_MALLOC=system to opt out)
    cfg = setup_cfg(args)
    from gfl_det.checkpoint import CheckpointError
    from gfl_det.data import DatasetError
    from gfl_det.guard import NonFiniteLossError
    from gfl_det.mm import GFLRunner
    from gfl_det.mm.console import log_exception
    from gfl_det.models.backbone import PretrainedWeightsError
    runner = None
    try:
        runner = GFLRunner.from_cfg(cfg)
        runner.train()
    except KeyboardInterrupt as e:  # Ctrl-C: say how to go on
        return interrupted(runner, cfg, sys.argv[1:] if argv is None else list(argv), e)
    except NonFiniteLossError as e:  # already in the log; the message names the checkpoint
        print(f'error: training stopped: {e}', file=sys.stderr)
        return 3
    except (DatasetError, PretrainedWeightsError, CheckpointError) as e:  # names the file and the fix
        log_exception(getattr(runner, 'logger', None), e, 'training stopped:')  # the traceback: log file
        print(f'error: {e}', file=sys.stderr)
        return 2
    except Exception as e:  # the traceback goes to the console (Python) and into the log file
        log_exception(getattr(runner, 'logger', None), e, 'training stopped:')
        raise
    if runner.rank == 0:
        best = runner.message_hub.get_info('best_score')
        ckpt = runner.message_hub.get_info('best_ckpt')
        if best is not None:
            runner.logger.info(f'best coco/bbox_mAP {best:.4f}: {ckpt}')
    return 0


def interrupted(runner, cfg, argv: list, exc: KeyboardInterrupt) -> int:
    """Ctrl-C (SIGINT): the command that continues (``--resume``) and the checkpoint it would
    start from, on the console and in the log file; exit status 130 (128 + SIGINT)."""
    import logging

    from gfl_det.mm.console import interrupted_message, log_to_file
    from gfl_det.resume import find_latest_checkpoint
    where = ''
    loop = getattr(runner, '_train_loop', None)
    if loop is not None and not isinstance(loop, dict):
        where = f' in epoch {runner.epoch + 1}, after iteration {runner.iter}'
    msg = interrupted_message(cfg.work_dir, argv, find_latest_checkpoint(cfg.work_dir), where)
    log_to_file(getattr(runner, 'logger', None), logging.WARNING, msg)
    print(f'\n{msg}', file=sys.stderr)
    return 130


if __name__ == '__main__':
    sys.exit(main())
