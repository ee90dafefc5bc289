import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The shared reference folder (MMDetection golden outputs, coco128, BCCD): $GFL_DET_SHARED, by
# default a folder named shared beside the clone. Tests that need it skip, saying what to set.
SHARED = Path(os.environ.get("GFL_DET_SHARED") or ROOT.parent / "shared")
SHARED_HINT = "set GFL_DET_SHARED=/path/to/shared (default: a folder named shared beside the clone)"
COCO128 = SHARED / "datasets" / "coco128"
# BCCD (github.com/Shenggan/BCCD_Dataset, MIT): $BCCD_ROOT, the folder holding BCCD/Annotations
BCCD = Path(os.environ.get("BCCD_ROOT") or SHARED / "datasets" / "bccd")


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'gfl_tool_{name}', ROOT / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kept_for_backward(fn, *args):
    """``fn(*args)`` and the bytes autograd keeps for its backward (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(storages.values())


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: {SHARED_HINT}")
    return SHARED


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    """The 128-image COCO subset (images/, annotations/instances_coco128.json)."""
    if not (COCO128 / "annotations").is_dir():
        pytest.skip(f"coco128 not found at {COCO128}: {SHARED_HINT}")
    return COCO128


# A tiny GFL (the synthetic config, narrower) with random weights whose classifier is spread out
# so that a few hundred boxes per image pass the score threshold with well separated scores:
# for export / demo tests that need detections without training a model first.
TINY_CFG = {'model.backbone.base_channels': 8, 'model.neck.in_channels': [8, 16, 32, 64],
            'model.neck.out_channels': 32, 'model.bbox_head.in_channels': 32,
            'model.bbox_head.feat_channels': 32, 'model.bbox_head.stacked_convs': 1}
TINY_CONFIG = """
_base_ = {base!r}
data_root = {data_root!r}
synthetic = dict(num_train=2, num_val={num_val}, seed=0)
model = dict(backbone=dict(base_channels=8), neck=dict(in_channels=[8, 16, 32, 64], out_channels=32),
             bbox_head=dict(in_channels=32, feat_channels=32, stacked_convs=1))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, synthetic=synthetic))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, synthetic=synthetic))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
"""


def write_tiny_config(path: Path, data_root: Path, num_val: int = 4) -> Path:
    """A child of configs/gfl_r18_synthetic.py: the tiny model on a few synthetic images."""
    path.write_text(TINY_CONFIG.format(base=str(ROOT / 'configs' / 'gfl_r18_synthetic.py'),
                                       data_root=str(data_root) + '/', num_val=num_val))
    return path


TINY_CLASSES = ('rectangle', 'ellipse', 'triangle', 'diamond')


def tiny_detector(cls_bias: float = -4.0, seed: int = 0, config=None):
    """An :func:`gfl_det.apis.init_detector` model (CPU, eval) of configs/gfl_r18_synthetic.py
    shrunk to ~0.1 M parameters (or of ``config``, a child written with :data:`TINY_CONFIG`);
    ``cls_bias=-20`` gives a model that detects nothing."""
    from gfl_det.apis import init_detector
    torch.manual_seed(seed)
    model = init_detector(str(config or ROOT / 'configs' / 'gfl_r18_synthetic.py'), None,
                          cfg_options=None if config else dict(TINY_CFG))
    head, g = model.bbox_head, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (head.gfl_cls, head.gfl_reg):
            conv.weight.normal_(0, 3.0 / conv.weight[0].numel() ** 0.5, generator=g)
        head.gfl_cls.bias.fill_(cls_bias)
    model.class_names = TINY_CLASSES
    return model


def synthetic_images(folder: Path, n: int = 3) -> list[Path]:
    """``n`` synthetic-shape JPEGs (the default job's generator, 4 classes) written to ``folder``."""
    from gfl_det.data import make_synthetic_coco
    make_synthetic_coco(str(folder), num_train=1, num_val=n, seed=0)
    return sorted((folder / 'val').glob('*.jpg'))[:n]


def assert_png_ok(path, min_colors: int = 8, colors=()):
    """``path`` decodes to a non-trivial picture (not one flat colour); each RGB of ``colors``
    appears in it. Returns the RGB array."""
    import cv2
    import numpy as np
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f'{path} is not a readable image'
    rgb = img[..., ::-1]
    assert min(rgb.shape[:2]) >= 32 and rgb.std() > 5, f'{path}: flat or tiny ({rgb.shape}, std {rgb.std():.1f})'
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) >= min_colors, f'{path}: too few colours'
    for c in colors:
        assert (np.abs(rgb.astype(int) - c).max(-1) <= 8).any(), f'{path}: colour {c} not drawn'
    return rgb
