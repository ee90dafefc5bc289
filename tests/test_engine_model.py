"""gfl_det.mm pieces on their own: the mmengine model (MMDetection's state-dict keys, forward
modes), the data preprocessor, AMP on the CPU, and the checkpoint encoding/trust policy."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.optim import OptimWrapper as MMOptimWrapper

from gfl_det import mm
from gfl_det.data import AspectRatioBatchSampler, collate
from gfl_det.models import GFL

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def small_model(num_classes: int = 4) -> mm.GFLDetector:
    cfg = Config.fromfile(str(CONFIGS / 'gfl_r18_synthetic.py'))
    cfg.model.bbox_head.num_classes = num_classes
    return mm.MODELS.build(cfg.model)


def batch(n: int = 2, h: int = 96, w: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        hh = h - 16 * i
        samples.append({
            'image': torch.randint(0, 255, (3, hh, w), dtype=torch.uint8, generator=g),
            'boxes': torch.tensor([[10., 12., 60., 70.], [70., 20., 120., 80.]])[:2 - i],
            'labels': torch.tensor([1, 3])[:2 - i],
            'meta': {'img_id': i, 'file_name': f'{i}.jpg', 'ori_shape': (2 * hh, 2 * w),
                     'img_shape': (hh, w), 'scale_factor': (0.5, 0.5), 'flip': False}})
    return collate(samples)


def test_state_dict_keys_equal_mmdet(shared_dir):
    golden = shared_dir / 'golden' / 'gfl_r50_state_dict_keys.txt'
    want = [line.split('\t')[0] for line in golden.read_text().splitlines()
            if line.strip() and not line.startswith('#')]
    cfg = Config.fromfile(str(CONFIGS / 'gfl_r50.py'))
    cfg.model.backbone.init_cfg = None
    model = mm.MODELS.build(cfg.model)
    assert isinstance(model, GFL) and isinstance(model.data_preprocessor, mm.GFLDataPreprocessor)
    assert list(model.state_dict()) == want
    shapes = {line.split('\t')[0]: line.split('\t')[1] for line in golden.read_text().splitlines()
              if line.strip() and not line.startswith('#')}
    assert all(str(tuple(v.shape)) == shapes[k] for k, v in model.state_dict().items())


def test_forward_modes_and_preprocessor():
    model = small_model()
    data = batch()
    out = model.data_preprocessor(data, True)
    assert out['inputs'].dtype == torch.uint8  # normalised later, on the device, by the model
    assert set(out['data_samples']) == {'metas', 'targets'}
    assert out['data_samples']['targets'] is not data['targets']  # moved (to the model's device)
    assert torch.equal(out['data_samples']['targets'].boxes, data['targets'].boxes)
    losses = model(**out, mode='loss')
    assert set(losses) == {'loss_cls', 'loss_bbox', 'loss_dfl'}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    preds = model.val_step(data)
    assert [p['img_id'] for p in preds] == [0, 1]
    assert set(preds[0]) >= {'bboxes', 'scores', 'labels', 'prior_idx'}
    out = model(model.data_preprocessor(data)['inputs'], data['metas'], mode='tensor')
    assert len(out.cls) == 5 and out.cls[0].shape[:2] == (2, 4) and out.reg[0].shape[1] == 4 * 17
    with pytest.raises(ValueError, match='pad_size_divisor'):
        model.data_preprocessor(dict(data, inputs=data['inputs'][..., :100]))


def test_train_step_sgd_and_amp_bf16_on_cpu():
    model = small_model()
    data = batch()
    for wrapper_cfg in (dict(type='OptimWrapper', clip_grad=dict(max_norm=35)),
                        dict(type='AmpOptimWrapper', dtype=None)):
        opt = mm.OPTIM_WRAPPERS.build(dict(wrapper_cfg, optimizer=torch.optim.SGD(
            model.parameters(), lr=0.001, momentum=0.9)))
        assert isinstance(opt, MMOptimWrapper)
        before = model.bbox_head.gfl_cls.weight.detach().clone()
        log_vars = model.train_step(data, opt)
        assert torch.isfinite(log_vars['loss'])
        assert not torch.equal(before, model.bbox_head.gfl_cls.weight)
    assert opt.cast_dtype == torch.bfloat16 and not opt.loss_scaler.is_enabled()


def test_message_hub_encoding_is_weights_only_and_round_trips():
    hub = MessageHub.get_instance('test_engine_model_hub')
    for v in (1.0, 2.5, np.float32(3.0)):
        hub.update_scalar('train/loss', v)
    hub.update_info('best_score', np.float64(0.5), resumed=True)
    hub.update_info('epoch', 3)
    state = hub.state_dict()
    enc = mm.encode_message_hub(state)
    buf = io.BytesIO()
    torch.save(enc, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain data only
    dec = mm.decode_message_hub(loaded)
    hb = dec['log_scalars']['train/loss']
    assert isinstance(hb, HistoryBuffer)
    np.testing.assert_array_equal(hb.data[0], state['log_scalars']['train/loss'].data[0])
    assert hb.max_length == state['log_scalars']['train/loss'].max_length
    assert dec['runtime_info']['best_score'] == 0.5 and dec['resumed_keys'] == state['resumed_keys']
    fresh = MessageHub.get_instance('test_engine_model_hub2')
    fresh.load_state_dict(dec)
    assert fresh.get_scalar('train/loss').mean() == pytest.approx(6.5 / 3)


def test_load_from_reads_weights_only_and_refuses_pickled_objects(tmp_path):
    """A full mmengine-style checkpoint (HistoryBuffer inside) is refused by load_from
    (weights_only=True) naming ``convert --trust``; its plain copy loads."""
    from gfl_det.checkpoint import UntrustedCheckpointError, main
    cfg = Config.fromfile(str(CONFIGS / 'gfl_r18_synthetic.py'))
    cfg.work_dir = str(tmp_path / 'wd')
    model_state = mm.MODELS.build(cfg.model).state_dict()
    bad = tmp_path / 'full.pth'
    torch.save({'state_dict': model_state, 'meta': {'dataset_meta': {'classes': ('a', 'b', 'c', 'd')}},
                'message_hub': {'log_scalars': {'train/loss': HistoryBuffer([1.0], [1])}}}, bad)
    runner = mm.GFLRunner.from_cfg(cfg)
    with pytest.raises(UntrustedCheckpointError, match='convert --trust'):
        runner.load_checkpoint(str(bad))
    assert main(['convert', '--trust', str(bad), str(tmp_path / 'plain.pth')]) == 0
    runner.load_checkpoint(str(tmp_path / 'plain.pth'))
    assert runner.model.class_names == ('a', 'b', 'c', 'd')


def test_aspect_ratio_batch_sampler_counts_are_equal_on_every_rank():
    """Each rank's share of indices gives exactly ceil(n / batch_size) batches whatever its
    orientation mix (DDP needs the same number of steps on every rank), every index once."""
    flags = np.array([0, 1] * 20, np.uint8)
    rng = np.random.default_rng(0)
    for n in (1, 5, 7, 8, 13):
        for _ in range(5):
            share = rng.permutation(len(flags))[:n].tolist()
            s = AspectRatioBatchSampler(share, batch_size=4, aspect_flags=flags)
            batches = list(s)
            assert len(batches) == len(s) == -(-n // 4)
            assert sorted(i for b in batches for i in b) == sorted(share)
            dl = AspectRatioBatchSampler(share, batch_size=4, drop_last=True, aspect_flags=flags)
            assert len(list(dl)) == len(dl) == n // 4
