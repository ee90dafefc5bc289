"""tools/get_flops.py against the convolution FLOPs formula (2 * out elements * Cin/groups * kh * kw)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import get_flops  # noqa: E402

from gfl_det.models import build_detector  # noqa: E402

SHAPE = (128, 160)


@pytest.fixture(scope="module")
def r50():
    cfg = Config.fromfile(str(ROOT / "configs/gfl_r50.py")).model.to_dict()
    cfg["backbone"].pop("init_cfg", None)
    torch.manual_seed(0)
    return build_detector(cfg)


def _conv_records(model, run):
    """(forward FLOPs, input needs grad, weight needs grad) of every conv call in ``run()``."""
    recs, hooks = [], []

    def hook(mod, inp, out):
        f = 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        recs.append((f, inp[0].requires_grad, mod.weight.requires_grad))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return recs


def test_forward_flops_equal_conv_formula(r50):
    total, parts = get_flops.count_flops(r50, SHAPE)
    with torch.no_grad():
        recs = _conv_records(r50, lambda: r50(torch.zeros(1, 3, *SHAPE)))
    assert total == sum(f for f, _, _ in recs)
    assert {k.split(".")[-1] for k in parts} == {"backbone", "neck", "bbox_head"}
    assert sum(parts.values()) == total


def test_train_step_flops_count_only_the_gradients_that_exist(r50):
    out = {}
    recs = _conv_records(r50, lambda: out.update(res=get_flops.count_train_flops(r50, SHAPE)))
    total, per_op = out["res"]
    fwd = sum(f for f, _, _ in recs)
    # every conv's backward: grad input (if its input needs one) + grad weight (if trainable),
    # each costing the forward's FLOPs; the frozen stem + layer1 (R50 default) have neither
    bwd = sum(f * (int(gi) + int(gw)) for f, gi, gw in recs)
    assert per_op["aten.convolution"] == fwd
    assert per_op["aten.convolution_backward"] == bwd
    assert fwd < bwd < 2 * fwd  # no input gradient for the image, none through the frozen stem
    frozen = [r for r in recs if not r[1] and not r[2]]
    assert frozen, "the frozen stem's convs should have no backward"
    # the rest (the loss's integral matmul) is a rounding error next to the convolutions
    assert 0 <= total - fwd - bwd < 1e-3 * total


def test_cli_json(capsys):
    get_flops.main([str(ROOT / "configs/gfl_r50.py"), "--shape", *map(str, SHAPE), "--train", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["gflops"] > 0 and res["train_step_gflops"] > 2 * res["gflops"]
    assert abs(res["params_m"] - 32.2) < 0.5  # GFL R50: ~32.2 M parameters
