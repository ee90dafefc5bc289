"""ONNX export (gfl_det/export.py, tools/export_onnx.py): onnxruntime gives PyTorch's detections.

A tiny random GFL whose classifier lets a few hundred boxes per image through (conftest.tiny_detector)
is exported static and dynamic, with and without NMS in the graph, and run on synthetic shapes
and real COCO photos beside the PyTorch model (same resized input): equal counts and labels,
boxes within 0.05 px and scores within 1e-3 (TOLERANCE; measured ~1e-3 px and ~1e-6).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import COCO128, ROOT, load_tool, synthetic_images, tiny_detector

onnx = pytest.importorskip('onnx', reason='pip install -e ".[export]" (onnx, onnxruntime) for the ONNX tests')
pytest.importorskip('onnxruntime', reason='pip install -e ".[export]" (onnx, onnxruntime) for the ONNX tests')

from gfl_det.export import (OUTPUTS, TOLERANCE, GFLExportGraph, OnnxDetector, export_onnx,  # noqa: E402
                            torch_detect, verify_onnx)

SHAPE = (300, 380)  # not a multiple of 32: the graph pads inside


@pytest.fixture(scope='module')
def model():
    return tiny_detector()


@pytest.fixture(scope='module')
def exported(model, tmp_path_factory):
    """export(dynamic, with_nms) -> path, each variant exported once."""
    cache, folder = {}, tmp_path_factory.mktemp('onnx')

    def export(dynamic: bool, with_nms: bool) -> str:
        key = (dynamic, with_nms)
        if key not in cache:
            path = str(folder / f'tiny_{"dyn" if dynamic else "static"}_{"nms" if with_nms else "raw"}.onnx')
            export_onnx(model, path, shape=SHAPE, dynamic=dynamic, with_nms=with_nms, simplify=False)
            cache[key] = path
        return cache[key]
    return export


@pytest.fixture(scope='module')
def image_sets(tmp_path_factory):
    sets = {'synthetic': [str(p) for p in synthetic_images(tmp_path_factory.mktemp('syn'), 2)]}
    if (COCO128 / 'images').is_dir():
        sets['coco128'] = [str(p) for p in sorted((COCO128 / 'images').glob('*.jpg'))[:3]]
    return sets


@pytest.mark.parametrize('images', ['synthetic', 'coco128'])
@pytest.mark.parametrize('with_nms', [True, False], ids=['nms', 'no_nms'])
@pytest.mark.parametrize('dynamic', [False, True], ids=['static', 'dynamic'])
def test_onnxruntime_matches_pytorch(model, exported, image_sets, images, dynamic, with_nms):
    if images not in image_sets:
        pytest.skip(f'coco128 not found at {COCO128}: set GFL_DET_SHARED=/path/to/shared')
    res = verify_onnx(exported(dynamic, with_nms), model, image_sets[images])
    assert res['ok'], res
    assert res['num_dets']['onnx'] == res['num_dets']['torch'] >= 100 * len(image_sets[images])
    assert res['labels_equal'] and res['unmatched'] == 0
    assert res['max_box_diff'] <= TOLERANCE['fp32']['box_px'] and res['max_score_diff'] <= TOLERANCE['fp32']['score']
    assert res['onnx_ms'] > 0 and res['torch_ms'] > 0


def test_dynamic_graph_takes_batches_and_odd_sizes(model, exported, image_sets):
    """A batch of two images gives each image's own detections (batch_index), at a size the
    export never saw (odd: the stem pool and the padding to 32 stay shape-generic)."""
    import cv2
    det = OnnxDetector(exported(True, True))
    imgs = [cv2.resize(cv2.imread(p), (131, 97)) for p in image_sets['synthetic'][:2]]  # BGR
    out = det.run(np.stack(imgs))
    assert set(out) == set(OUTPUTS) and out['boxes'].dtype == np.float32 and out['labels'].dtype == np.int64
    for b, bgr in enumerate(imgs):
        ref = torch_detect(model, np.ascontiguousarray(bgr[..., ::-1]))
        mine = out['batch_index'] == b
        assert mine.sum() == len(ref['scores']) > 0
        np.testing.assert_allclose(out['scores'][mine], ref['scores'].numpy(), atol=1e-5)
        np.testing.assert_allclose(out['boxes'][mine], ref['bboxes'].numpy(), atol=0.05)
        assert (out['boxes'][mine][:, 2] <= 131).all() and (out['boxes'][mine][:, 3] <= 97).all()
        assert np.array_equal(out['labels'][mine], ref['labels'].numpy())


def test_original_image_pixels_match_inference_detector(model, exported, image_sets):
    """OnnxDetector (resize outside the graph, rescale after) == inference_detector."""
    import cv2

    from gfl_det.apis import inference_detector
    det = OnnxDetector(exported(True, False))  # no NMS in the graph: the detector adds it
    bgr = cv2.imread(image_sets['synthetic'][0])
    ours, ref = det(bgr), inference_detector(model, bgr)
    assert len(ours['scores']) == len(ref['scores']) == 100
    np.testing.assert_allclose(ours['bboxes'], ref['bboxes'], atol=0.05)
    np.testing.assert_allclose(ours['scores'], ref['scores'], atol=1e-5)
    assert ours['class_names'] == ref['class_names'] and len(ours['class_names']) == 100


def test_model_without_detections_exports_and_runs_empty(tmp_path, image_sets):
    silent = tiny_detector(cls_bias=-20.0)
    path = str(tmp_path / 'silent.onnx')
    export_onnx(silent, path, shape=SHAPE, dynamic=False, with_nms=True, simplify=False)
    det = OnnxDetector(path)
    out = det.run(np.zeros((1, *SHAPE, 3), np.uint8))
    assert [out[k].shape for k in OUTPUTS] == [(0, 4), (0,), (0,), (0,)]
    res = verify_onnx(path, silent, image_sets['synthetic'])
    assert res['ok'] and res['num_dets'] == {'onnx': 0, 'torch': 0}
    empty = det._nms({'boxes': np.zeros((0, 4), np.float32), 'scores': np.zeros(0, np.float32),
                      'labels': np.zeros(0, np.int64)})  # the runtime NMS of an NMS-less graph
    assert empty['boxes'].shape == (0, 4)


def test_file_is_checked_typed_and_documented(exported):
    for dynamic in (False, True):
        proto = onnx.load(exported(dynamic, True))
        onnx.checker.check_model(proto)
        assert max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx')) == 17
        (inp,) = proto.graph.input
        dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
        assert inp.name == 'images' and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert dims == (['batch', 'height', 'width', 3] if dynamic else [1, *SHAPE, 3])
        assert [o.name for o in proto.graph.output] == list(OUTPUTS)
        assert any(n.op_type == 'NonMaxSuppression' for n in proto.graph.node)
        meta = json.loads({p.key: p.value for p in proto.metadata_props}['gfl_det'])
        assert meta['class_names'] == ['rectangle', 'ellipse', 'triangle', 'diamond']
        assert meta['static_shape'] == (None if dynamic else list(SHAPE)) and meta['with_nms']
        assert meta['resize_scale'] == [384, 320] and meta['iou_threshold'] == 0.6


class WithClassLogits(GFLExportGraph):
    """An extra per-detection output the way an embedding branch would add one."""

    def per_prior_outputs(self, cls_levels, reg_levels):
        if cls_levels is None:
            return {'cls_logits': None}
        return {'cls_logits': torch.cat([c.permute(0, 2, 3, 1).flatten(1, 2) for c in cls_levels], 1)}


def test_extra_per_detection_output_is_gathered_at_the_kept_prior(model, image_sets, tmp_path):
    """An extra (B, A, D) map comes out per detection, at its prior: the class logits gathered so
    give back each detection's score. Exported through onnxslim (when installed)."""
    import cv2
    path = str(tmp_path / 'extra.onnx')
    info = export_onnx(model, path, shape=SHAPE, dynamic=True, with_nms=True, graph_cls=WithClassLogits)
    assert info['outputs'] == [*OUTPUTS, 'cls_logits']
    bgr = cv2.imread(image_sets['synthetic'][0])
    out = OnnxDetector(path).run(bgr[None])
    logits = out['cls_logits'][np.arange(len(out['labels'])), out['labels']]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), out['scores'], atol=1e-5)
    assert len(out['scores']) == 100



def test_export_tool_fp16_verifies_and_fails_loudly(model, image_sets, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': {'classes': list(model.class_names)}}}, ckpt)
    tiny = ['model.backbone.base_channels=8', 'model.neck.in_channels=[8,16,32,64]', 'model.neck.out_channels=32',
            'model.bbox_head.in_channels=32', 'model.bbox_head.feat_channels=32', 'model.bbox_head.stacked_convs=1']
    argv = [str(ROOT / 'configs' / 'gfl_r18_synthetic.py'), str(ckpt), '--out', str(tmp_path / 'fp16.onnx'),
            '--dynamic', '--with-nms', '--fp16', '--no-simplify', '--verify', *image_sets['synthetic'],
            '--cfg-options', *tiny]
    tool = load_tool('export_onnx')
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert res['ok'] and res['tolerance'] == TOLERANCE['fp16'] and res['num_dets']['onnx'] == 200
    assert 'fp16 network' in out and (tmp_path / 'fp16.onnx').stat().st_size < 0.7 * 4 * sum(
        p.numel() for p in model.parameters())  # half-size weights
    # a disagreement beyond the tolerance: non-zero exit, said loudly
    import gfl_det.export
    monkeypatch.setattr(gfl_det.export, 'verify_onnx', lambda *a, **k: dict(res, ok=False, max_box_diff=3.0))
    assert tool.main(argv) == 1
    assert 'VERIFY FAILED' in capsys.readouterr().err


def test_verify_sees_a_different_model(exported, image_sets):
    res = verify_onnx(exported(False, True), tiny_detector(seed=1), image_sets['synthetic'])
    assert not res['ok'] and res['max_score_diff'] > 1e-3


def test_missing_paths_are_named_before_loading(tmp_path, capsys):
    tool = load_tool('export_onnx')
    with pytest.raises(SystemExit, match='checkpoint not found: .*nope.pth'):
        tool.main([str(ROOT / 'configs' / 'gfl_r18_synthetic.py'), str(tmp_path / 'nope.pth'), '--out', 'x.onnx'])
    with pytest.raises(SystemExit, match='no such file or folder'):
        tool.main([str(ROOT / 'configs' / 'gfl_r18_synthetic.py'), '--out', 'x.onnx', '--verify', 'nothing.jpg'])
