"""The embedding branch at the edges: ONNX export of the embeddings (onnxruntime), the gallery
(threshold, unknowns, bad input by name), tools/gallery.py, tools/demo.py --gallery,
tools/cluster.py. A tiny random model: these test the plumbing, the learning test the learning."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_png_ok, load_tool, tiny_detector

from gfl_det.gallery import UNKNOWN, Gallery, GalleryError, choose_threshold

TINY_REID = """
_base_ = {base!r}
data_root = {data_root!r}
synthetic = dict(num_train=2, num_val=4, seed=0, train_ids_per_class=2, test_ids_per_class=2)
model = dict(backbone=dict(base_channels=8), neck=dict(in_channels=[8, 16, 32, 64], out_channels=32),
             bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1, embed=dict(dim=16, stacked_convs=1)))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, synthetic=synthetic))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, synthetic=synthetic))
test_dataloader = val_dataloader
val_evaluator = [dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json'), dict(type='ReIDMetric')]
test_evaluator = val_evaluator
"""


@pytest.fixture(scope='module')
def reid_setup(tmp_path_factory):
    """(config path, checkpoint path, data paths, model) of a tiny model with the branch."""
    from gfl_det.data.synthetic_reid import make_synthetic_reid_coco
    tmp = tmp_path_factory.mktemp('reid_tools')
    paths = make_synthetic_reid_coco(tmp / 'data', num_train=2, num_val=4, seed=0, train_ids_per_class=2,
                                     test_ids_per_class=2)
    cfg = tmp / 'tiny_reid.py'
    cfg.write_text(TINY_REID.format(base=str(ROOT / 'configs' / 'gfl_r18_synthetic_reid.py'),
                                    data_root=str(tmp / 'data') + '/'))
    model = tiny_detector(config=cfg)
    ckpt = tmp / 'tiny_reid.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': {'classes': list(model.class_names)}}}, ckpt)
    return cfg, ckpt, paths, model


def test_onnx_exports_each_detections_embedding(reid_setup, tmp_path):
    pytest.importorskip('onnxruntime', reason='pip install -e ".[export]"')
    from gfl_det.export import OUTPUTS, OnnxDetector, export_onnx, resize_like_graph, torch_detect
    from gfl_det.data import load_image
    _, _, paths, model = reid_setup
    image = sorted((ROOT / paths['val_img_dir']).glob('*.jpg'))[0]
    for with_nms in (True, False):
        path = str(tmp_path / f'reid_{with_nms}.onnx')
        info = export_onnx(model, path, dynamic=True, with_nms=with_nms, simplify=False)
        assert info['outputs'] == [*OUTPUTS, 'embeddings']
        det = OnnxDetector(path)
        rgb, _ = resize_like_graph(load_image(str(image)), det.meta)
        out = det.run(np.ascontiguousarray(rgb[..., ::-1])[None])
        out = out if with_nms else det._nms(out)
        ref = torch_detect(model, rgb)
        assert len(out['scores']) == len(ref['scores']) > 20 and out['embeddings'].shape == (len(out['scores']), 16)
        for i in range(len(out['scores'])):  # pair each detection with PyTorch's by its box
            j = int(np.abs(ref['bboxes'].numpy() - out['boxes'][i]).max(1).argmin())
            np.testing.assert_allclose(out['embeddings'][i], ref['embeddings'][j].numpy(), atol=1e-4)
        full = det(cv2.imread(str(image)))  # the OnnxDetector result carries them too
        assert full['embeddings'].shape == (len(full['scores']), 16)


def test_gallery_identifies_nearest_and_says_unknown_beyond_the_threshold(tmp_path):
    emb = torch.tensor([[1., 0.], [0., 1.], [0.8, 0.6]])
    g = Gallery(['alice', 'bob'], emb, torch.tensor([0, 1, 0]), threshold=0.5, info={'threshold_from': 'test'})
    names, dist = g.identify(np.array([[0.78, 0.62], [0.1, 0.99], [-1., 0.]], np.float32))
    assert names == ['alice', 'bob', UNKNOWN]
    assert dist[0] == pytest.approx(np.hypot(0.02, 0.02), abs=1e-6) and dist[2] == pytest.approx(np.sqrt(2))
    again = Gallery.load(g.save(tmp_path / 'g.pt'))
    assert again.names == g.names and torch.equal(again.embeddings, g.embeddings) and again.threshold == 0.5
    with pytest.raises(GalleryError, match=r'do not match the gallery \(D = 2\)'):
        g.identify(np.zeros((1, 3), np.float32))
    # the threshold decides the held-out pairs: same at 0.1, impostors at 0.9 -> between them
    t = choose_threshold(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([0, 1]),
                         torch.tensor([[0.995, 0.0998], [0.0998, 0.995]]), torch.tensor([0, 1]), 2)
    assert 0.1 < t['threshold'] < 1.3 and t['accuracy'] == 1.0 and t['same_pairs'] == t['different_pairs'] == 2


def test_empty_or_foreign_gallery_files_are_named(tmp_path):
    torch.save({'gfl_det_gallery': 1, 'names': [], 'embeddings': torch.zeros(0, 4), 'owner': torch.zeros(0),
                'threshold': 0.5}, tmp_path / 'empty.pt')
    with pytest.raises(GalleryError, match=r'empty.pt: the gallery is empty'):
        Gallery.load(tmp_path / 'empty.pt')
    torch.save({'state_dict': {}}, tmp_path / 'model.pth')
    with pytest.raises(GalleryError, match='not a gallery written by tools/gallery.py'):
        Gallery.load(tmp_path / 'model.pth')
    with pytest.raises(GalleryError, match='gallery not found'):
        Gallery.load(tmp_path / 'nope.pt')
    with pytest.raises(SystemExit, match='the gallery is empty'):
        load_tool('gallery').main(['show', str(tmp_path / 'empty.pt')])


def crops_folder(paths, folder, per_identity=2):
    """A folder of images named by identity: crops of the val objects, ``<instance_id>/<n>.jpg``."""
    data = json.load(open(paths['val_ann']))
    files = {im['id']: im['file_name'] for im in data['images']}
    count = {}
    for a in data['annotations']:
        k = a['instance_id']
        if count.get(k, 0) >= per_identity:
            continue
        img = cv2.imread(str(ROOT / paths['val_img_dir'] / files[a['image_id']]))
        x, y, w, h = (int(v) for v in a['bbox'])
        crop = img[max(0, y - 8):y + h + 8, max(0, x - 8):x + w + 8]
        (folder / str(k)).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / str(k) / f'{count.get(k, 0)}.jpg'), cv2.resize(crop, (96, 96)))
        count[k] = count.get(k, 0) + 1
    return sorted(count)


def test_enroll_from_a_folder_and_from_coco_then_name_detections(reid_setup, tmp_path, capsys):
    cfg, ckpt, paths, model = reid_setup
    folder = tmp_path / 'people'
    ids = crops_folder(paths, folder)
    (folder / 'README.txt').write_text('not an image')
    tool = load_tool('gallery')
    out = tmp_path / 'g_folder.pt'
    assert tool.main(['enroll', str(cfg), str(ckpt), '--folder', str(folder), '--out', str(out),
                      '--score-thr', '0.0']) == 0
    cap = capsys.readouterr()
    g = Gallery.load(out)
    assert sorted(g.names) == sorted(map(str, ids)) and 'README.txt (not an image file)' in cap.err
    assert 'held-out pairs' in g.info['threshold_from'] and f'{len(ids)} identities' in cap.out
    coco = tmp_path / 'g_coco.pt'
    assert tool.main(['enroll', str(cfg), str(ckpt), '--coco', paths['val_ann'], '--img-dir', paths['val_img_dir'],
                      '--out', str(coco), '--threshold', '0.7']) == 0
    gc = Gallery.load(coco)
    assert gc.threshold == 0.7 and set(gc.names) <= {str(i) for i in range(8, 16)}  # the val identities
    # demo: the detection an image's enrolled example came from is named, at distance ~0
    image = sorted((ROOT / paths['val_img_dir']).glob('*.jpg'))[0]
    from gfl_det.apis import inference_detector
    res = inference_detector(model, str(image))
    Gallery(['zoe'], res['embeddings'][:1], torch.tensor([0]), 1e-3).save(tmp_path / 'zoe.pt')
    demo = load_tool('demo')
    texts = demo.identity_texts(res, Gallery.load(tmp_path / 'zoe.pt'))
    same = np.abs(res['embeddings'] - res['embeddings'][:1]).max(1) < 1e-6  # other classes at the same prior
    assert texts == ['zoe 0.00' if s else texts[i] for i, s in enumerate(same)] and texts[0] == 'zoe 0.00'
    assert all(t.startswith(UNKNOWN) for t, s in zip(texts, same) if not s) and not same.all()
    assert demo.main([str(image), str(cfg), str(ckpt), '--gallery', str(tmp_path / 'zoe.pt'), '--out-dir',
                      str(tmp_path / 'drawn'), '--score-thr', '0.0']) == 0
    assert_png_ok(tmp_path / 'drawn' / image.name)


def test_images_without_detection_are_skipped_and_an_empty_gallery_refused(reid_setup, tmp_path, capsys):
    cfg, _, paths, _ = reid_setup
    silent = tiny_detector(cls_bias=-20.0, config=cfg)  # detects nothing
    ckpt = tmp_path / 'silent.pth'
    torch.save({'state_dict': silent.state_dict()}, ckpt)
    folder = tmp_path / 'people'
    crops_folder(paths, folder, per_identity=1)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    with pytest.raises(SystemExit, match='no example could be enrolled.*empty'):
        load_tool('gallery').main(['enroll', str(cfg), str(ckpt), '--folder', str(folder), '--out',
                                   str(tmp_path / 'g.pt'), '--threshold', '0.5'])
    err = capsys.readouterr().err
    assert 'no detection scoring >= 0.3' in err and 'broken.jpg (enrolled example of' in err and 'corrupt image' in err
    assert not (tmp_path / 'g.pt').exists()
    with pytest.raises(SystemExit, match='no held-out example'):  # one example each and no --threshold
        load_tool('gallery').main(['enroll', str(cfg), str(reid_setup[1]), '--folder', str(folder), '--out',
                                   str(tmp_path / 'g.pt'), '--score-thr', '0.0'])


def test_demo_refuses_a_gallery_without_embeddings(reid_setup, tmp_path):
    demo = load_tool('demo')
    g = Gallery(['a'], torch.ones(1, 16) / 4, torch.tensor([0]), 0.5)
    with pytest.raises(SystemExit, match='needs a model with an embedding branch'):
        demo.identity_texts({'scores': np.ones(1)}, g)


def test_cluster_writes_a_contact_sheet_per_cluster(reid_setup, tmp_path, capsys):
    cfg, ckpt, paths, _ = reid_setup
    out = tmp_path / 'clusters'
    assert load_tool('cluster').main([paths['val_img_dir'], str(cfg), str(ckpt), '--out-dir', str(out),
                                      '--k', '3', '--score-thr', '0.2']) == 0
    records = json.load(open(out / 'clusters.json'))
    assert len(records) > 3 and sorted({r['cluster'] for r in records}) == [0, 1, 2]
    sizes = [sum(r['cluster'] == c for r in records) for c in range(3)]
    assert sizes == sorted(sizes, reverse=True)  # cluster 0 is the largest
    for c in range(3):
        assert_png_ok(out / f'cluster_{c:03d}.png')
    assert f'{len(records)} detections in 3 clusters' in capsys.readouterr().out
    assert load_tool('cluster').main([paths['val_img_dir'], str(cfg), str(ckpt), '--out-dir', str(tmp_path / 'agg'),
                                      '--threshold', '0.5', '--score-thr', '0.2']) == 0
