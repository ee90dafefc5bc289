"""tools/demo.py: folders with bad files, videos, --show-fps, --onnx (onnxruntime), paths checked first."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from conftest import ROOT, assert_png_ok, load_tool, synthetic_images, tiny_detector

from gfl_det.visualize import color



@pytest.fixture(scope='module')
def onnx_file(tmp_path_factory):
    pytest.importorskip('onnxruntime', reason='pip install -e ".[export]" for the --onnx demo')
    from gfl_det.export import export_onnx
    path = str(tmp_path_factory.mktemp('onnx') / 'tiny.onnx')
    export_onnx(tiny_detector(), path, shape=(320, 384), dynamic=True, with_nms=True, simplify=False)
    return path


def test_folder_with_bad_files_is_drawn_skipping_and_naming_them(onnx_file, tmp_path, capsys):
    folder = tmp_path / 'in'
    imgs = synthetic_images(tmp_path / 'syn', 2)
    folder.mkdir()
    for p in imgs:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    (folder / 'fake.jpg').write_bytes(b'GIF89a but not really')
    (folder / 'sub').mkdir()
    out = tmp_path / 'out'
    assert load_tool('demo').main([str(folder), '--onnx', onnx_file, '--out-dir', str(out),
                                   '--device', 'cpu', '--score-thr', '0.5']) == 0
    cap = capsys.readouterr()
    assert '2 picture(s) written' in cap.out
    assert 'skipped 4 of 6 input(s)' in cap.err and 'notes.txt (not an image file)' in cap.err
    assert 'broken.jpg (corrupt image)' in cap.err and 'fake.jpg (corrupt image)' in cap.err
    assert 'sub (a folder: not searched)' in cap.err
    assert 'JSON' not in cap.err and 'Traceback' not in cap.err  # no dataset-oriented fix
    for p in imgs:
        drawn = assert_png_ok(out / p.name)
        src = cv2.imread(str(p))[..., ::-1]
        assert drawn.shape == src.shape and np.abs(drawn.astype(int) - src).max() > 100
        assert any((np.abs(drawn.astype(int) - color(k)).max(-1) <= 8).sum() > 20 for k in range(4))


def test_video_is_annotated_frame_by_frame_with_fps(onnx_file, tmp_path, capsys):
    src = tmp_path / 'clip.mp4'
    frames = [cv2.imread(str(p)) for p in synthetic_images(tmp_path / 'syn', 1)] * 4
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*'mp4v'), 5.0, (w, h))
    if not vw.isOpened():
        pytest.skip('this cv2 build cannot write mp4v')
    for f in frames:
        vw.write(f)
    vw.release()
    out = tmp_path / 'out'
    assert load_tool('demo').main([str(src), '--onnx', onnx_file, '--out-dir', str(out), '--device', 'cpu',
                                   '--show-fps']) == 0
    assert f'{src}: 4 frame(s) -> {out / "clip.mp4"}' in capsys.readouterr().out
    cap = cv2.VideoCapture(str(out / 'clip.mp4'))
    got = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        got.append(f)
    assert len(got) == 4 and got[0].shape == frames[0].shape
    assert np.abs(got[0].astype(int) - frames[0]).max() > 100         # boxes drawn
    corner = got[0][5:35, 5:120]
    assert (corner.min(-1) > 200).sum() > 30                          # the white "xx.x fps" text


def test_paths_are_checked_before_any_model_loads(tmp_path, capsys):
    demo = load_tool('demo')
    cfg = str(ROOT / 'configs' / 'gfl_r18_synthetic.py')
    with pytest.raises(SystemExit, match='checkpoint not found: .*missing.pth'):
        demo.main([str(ROOT / 'README.md'), cfg, str(tmp_path / 'missing.pth')])
    with pytest.raises(SystemExit, match='input not found: .*nothing.jpg'):
        demo.main([str(tmp_path / 'nothing.jpg'), '--onnx', str(tmp_path / 'x.onnx')])
    with pytest.raises(SystemExit, match='ONNX file not found'):
        demo.main([str(ROOT / 'README.md'), '--onnx', str(tmp_path / 'x.onnx')])
    with pytest.raises(SystemExit, match='neither an image'):
        demo.main([str(ROOT / 'pyproject.toml'), '--onnx', str(ROOT / 'pyproject.toml')])
    with pytest.raises(SystemExit):  # argparse: --onnx runs alone
        demo.main([str(ROOT / 'README.md'), cfg, 'x.pth', '--onnx', 'x.onnx'])
    assert '--onnx runs the exported file alone' in capsys.readouterr().err
