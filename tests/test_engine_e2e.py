"""End to end on a tiny synthetic set: tools/train.py (train + COCO val each epoch + checkpoints
+ TensorBoard), tools/test.py (same numbers, --out, --show-dir), tools/demo.py, the Python API.

Seconds, not minutes: 8 training images, a ResNet-18 of width 8, 2 epochs.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'gfl_tool_{name}', ROOT / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_tiny_config(path: Path, data_root: Path, max_epochs: int = 2, flip: float = 0.5,
                      extra: str = '') -> Path:
    """A child of configs/gfl_r18_synthetic.py: tiny set and model, everything in-process."""
    path.write_text(f"""
_base_ = {str(CONFIGS / 'gfl_r18_synthetic.py')!r}
data_root = {str(data_root) + '/'!r}
synthetic = dict(num_train=8, num_val=4, seed=0)
img_scale = (160, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob={flip}),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs'),
]
model = dict(backbone=dict(base_channels=8), neck=dict(in_channels=[8, 16, 32, 64], out_channels=64),
             bbox_head=dict(in_channels=64, feat_channels=64),
             test_cfg=dict(score_thr=0.0))  # 2 epochs of a tiny model: keep every candidate
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, synthetic=synthetic, pipeline=train_pipeline))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, synthetic=synthetic, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={max_epochs})
param_scheduler = [dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=10)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(max_keep_ckpts=-1))
{extra}
""")
    return path


def scalars(work_dir: Path) -> list[dict]:
    """Every record of the newest run's vis_data/scalars.json (LocalVisBackend)."""
    files = sorted(work_dir.glob('*/vis_data/scalars.json'))
    assert files, f'no scalars.json under {work_dir}'
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Train the tiny config for 2 epochs through tools/train.py (in-process)."""
    tmp = tmp_path_factory.mktemp('e2e')
    cfg = write_tiny_config(tmp / 'tiny.py', tmp / 'synthetic')
    wd = tmp / 'work'
    assert load_tool('train').main([str(cfg), '--work-dir', str(wd)]) == 0
    return {'cfg': cfg, 'work_dir': wd, 'data': tmp / 'synthetic'}


def test_train_writes_checkpoints_logs_and_tensorboard(trained):
    wd = trained['work_dir']
    for name in ('epoch_1.pth', 'epoch_2.pth', 'last_checkpoint'):
        assert (wd / name).is_file(), name
    assert len(list(wd.glob('best_coco_bbox_mAP_epoch_*.pth'))) == 1
    assert list(wd.glob('*/vis_data/events.out.tfevents.*')), 'no TensorBoard event file'
    assert not list(wd.glob('.*.tmp')), 'atomic_save left a temp file'
    recs = scalars(wd)
    train = [r for r in recs if 'loss' in r]
    assert [r['iter'] for r in train] == list(range(1, 9))  # logged every iteration, none lost
    assert all({'loss_cls', 'loss_bbox', 'loss_dfl', 'lr', 'grad_norm'} <= set(r) for r in train)
    assert all(np.isfinite(r['loss']) for r in train)
    val = [r for r in recs if 'coco/bbox_mAP' in r]
    assert len(val) == 2 and {'coco/bbox_mAP_50', 'coco/bbox_AR@100'} <= set(val[0])


def test_checkpoint_is_weights_only_with_mmdet_keys(trained):
    from gfl_det.checkpoint import load_untrusted
    ckpt = load_untrusted(trained['work_dir'] / 'epoch_2.pth')  # weights_only=True
    keys = list(ckpt['state_dict'])
    assert keys and all(k.split('.')[0] in ('backbone', 'neck', 'bbox_head') for k in keys)
    assert ckpt['meta']['epoch'] == 2 and ckpt['meta']['iter'] == 8
    assert ckpt['meta']['dataset_meta']['classes'] == ('rectangle', 'ellipse', 'triangle', 'diamond')
    assert {'optimizer', 'param_schedulers', 'message_hub'} <= set(ckpt)


def test_test_tool_prints_the_validation_numbers(trained, tmp_path, capsys):
    from gfl_det.evaluation import coco_evaluate
    from gfl_det.mm import GFLRunner
    test_tool = load_tool('test')
    wd = trained['work_dir']
    out, show = tmp_path / 'results.bbox.json', tmp_path / 'show'
    args = test_tool.parse_args([str(trained['cfg']), str(wd / 'epoch_2.pth'), '--work-dir',
                                 str(tmp_path / 'test'), '--out', str(out), '--show-dir', str(show)])
    metrics = GFLRunner.from_cfg(test_tool.setup_cfg(args)).test()
    val = [r for r in scalars(wd) if 'coco/bbox_mAP' in r][-1]  # epoch 2's validation
    for k, v in metrics.items():
        assert v == pytest.approx(val[k], abs=1e-12), k
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95' in text and 'per-class bbox AP' in text
    # --out: COCO results format that evaluates to the same numbers
    dets = json.loads(out.read_text())
    assert dets and set(dets[0]) == {'image_id', 'category_id', 'bbox', 'score'}
    res = coco_evaluate(str(trained['data'] / 'annotations' / 'instances_val.json'), str(out),
                        classwise=False)
    assert res['bbox_mAP'] == pytest.approx(metrics['coco/bbox_mAP'], abs=1e-12)
    # --show-dir: one picture per test image
    assert len(list(show.glob('*.jpg'))) == 4


def test_demo_writes_pictures(trained, tmp_path):
    img = trained['data'] / 'val' / 'val_00000.jpg'
    out_dir = tmp_path / 'demo'
    assert load_tool('demo').main([str(img), str(trained['cfg']), str(trained['work_dir'] / 'epoch_2.pth'),
                                   '--out-dir', str(out_dir), '--device', 'cpu',
                                   '--score-thr', '0']) == 0
    out = cv2.imread(str(out_dir / 'val_00000.jpg'))
    src = cv2.imread(str(img))
    assert out is not None and out.shape == src.shape
    assert np.abs(out.astype(int) - src.astype(int)).max() > 100  # boxes were drawn


def test_inference_api(trained):
    from gfl_det.apis import inference_detector, init_detector
    model = init_detector(str(trained['cfg']), str(trained['work_dir'] / 'epoch_2.pth'))
    assert model.class_names == ('rectangle', 'ellipse', 'triangle', 'diamond')
    path = trained['data'] / 'val' / 'val_00001.jpg'
    r = inference_detector(model, str(path))
    assert set(r) == {'bboxes', 'scores', 'labels', 'class_names'}
    k = len(r['scores'])
    assert r['bboxes'].shape == (k, 4) and r['labels'].dtype == np.int64 and len(r['class_names']) == k
    bgr = cv2.imread(str(path))
    h, w = bgr.shape[:2]
    assert (r['bboxes'][:, 0::2] <= w + 1e-3).all() and (r['bboxes'][:, 1::2] <= h + 1e-3).all()
    both = inference_detector(model, [bgr, np.ascontiguousarray(bgr[:, :, ::-1])], channel_order='bgr')
    np.testing.assert_allclose(both[0]['bboxes'], r['bboxes'], atol=1e-4)  # BGR array == file
    rgb = inference_detector(model, np.ascontiguousarray(bgr[:, :, ::-1]), channel_order='rgb')
    np.testing.assert_allclose(rgb['bboxes'], r['bboxes'], atol=1e-4)
    batched = inference_detector(model, [str(path)] * 3, batch_size=2)
    assert len(batched) == 3
    np.testing.assert_allclose(batched[2]['bboxes'], r['bboxes'], atol=1e-3)


def test_test_tool_loads_mmdet_model_zoo_format(trained, tmp_path):
    """An MMDetection 2.x model-zoo style file (state_dict + meta with CLASSES, nothing else)
    evaluates through tools/test.py with weights_only=True, strictly, with its class names."""
    from gfl_det.checkpoint import load_untrusted
    from gfl_det.mm import GFLRunner
    ours = load_untrusted(trained['work_dir'] / 'epoch_2.pth')
    zoo = tmp_path / 'gfl_tiny_mmdet_zoo.pth'
    torch.save({'state_dict': ours['state_dict'],
                'meta': {'CLASSES': ('rectangle', 'ellipse', 'triangle', 'diamond'),
                         'mmcv_version': '1.3.8', 'config': '...', 'epoch': 2, 'iter': 8}}, zoo)
    test_tool = load_tool('test')
    args = test_tool.parse_args([str(trained['cfg']), str(zoo), '--work-dir', str(tmp_path / 't')])
    runner = GFLRunner.from_cfg(test_tool.setup_cfg(args))
    metrics = runner.test()
    assert runner.model.class_names == ('rectangle', 'ellipse', 'triangle', 'diamond')
    val = [r for r in scalars(trained['work_dir']) if 'coco/bbox_mAP' in r][-1]
    assert metrics['coco/bbox_mAP'] == pytest.approx(val['coco/bbox_mAP'], abs=1e-12)
    # strict: a checkpoint missing a key is refused rather than evaluated half-random
    from gfl_det.checkpoint import CheckpointMismatchError
    del ours['state_dict']['bbox_head.gfl_cls.bias']
    torch.save({'state_dict': ours['state_dict']}, zoo)
    runner = GFLRunner.from_cfg(test_tool.setup_cfg(test_tool.parse_args(
        [str(trained['cfg']), str(zoo), '--work-dir', str(tmp_path / 't2'),
         '--cfg-options', 'experiment_name=strict_load'])))
    with pytest.raises(CheckpointMismatchError, match='gfl_cls.bias'):
        runner.test()


def test_test_tool_channels_last_gives_the_same_numbers(trained, tmp_path):
    """--channels-last (NHWC weights and batches) evaluates to the validation numbers: the same
    arithmetic in another layout (float summation order aside, which does not move the mAP)."""
    from gfl_det.mm import GFLRunner
    test_tool = load_tool('test')
    wd = trained['work_dir']
    args = test_tool.parse_args([str(trained['cfg']), str(wd / 'epoch_2.pth'), '--work-dir',
                                 str(tmp_path / 'cl'), '--channels-last'])
    runner = GFLRunner.from_cfg(test_tool.setup_cfg(args))
    metrics = runner.test()
    assert runner.model.channels_last
    assert runner.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    val = [r for r in scalars(wd) if 'coco/bbox_mAP' in r][-1]
    for k in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_AR@100'):
        assert metrics[k] == pytest.approx(val[k], abs=1e-3), k


def test_test_tool_winograd_gives_the_same_numbers(trained, tmp_path, monkeypatch):
    """--winograd (NNPACK Winograd 3x3 convs, one image per batch) evaluates to the validation
    numbers: its float32 rounding (~1e-5 of the outputs) does not move the mAP."""
    from gfl_det.apis import optimize_for_inference_hook
    from gfl_det.mm import GFLRunner
    from gfl_det.fast.winograd import WinogradConv2d, winograd_available
    if not winograd_available():
        pytest.skip('this torch build has no NNPACK')
    monkeypatch.setattr(WinogradConv2d, 'min_pixels', 0)  # the tiny maps here: use it everywhere
    calls = []
    orig = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, '_nnpack_spatial_convolution', lambda *a: calls.append(1) or orig(*a))
    test_tool = load_tool('test')
    wd = trained['work_dir']
    args = test_tool.parse_args([str(trained['cfg']), str(wd / 'epoch_2.pth'), '--work-dir',
                                 str(tmp_path / 'wino'), '--winograd',
                                 '--cfg-options', 'test_dataloader.batch_size=1'])
    runner = GFLRunner.from_cfg(test_tool.setup_cfg(args))
    runner.register_hook(optimize_for_inference_hook(args.fuse_conv_bn, args.compile, args.winograd))
    metrics = runner.test()
    assert any(type(m) is WinogradConv2d for m in runner.model.modules())
    assert len(calls) >= 4 * 10   # 4 images, every 3x3 stride-1 conv of each
    val = [r for r in scalars(wd) if 'coco/bbox_mAP' in r][-1]
    for k in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_AR@100'):
        assert metrics[k] == pytest.approx(val[k], abs=1e-3), k
