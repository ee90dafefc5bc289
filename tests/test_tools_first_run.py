"""The first hour with the tools: offline ImageNet weights, a random frozen stem, FLOPs at the
config's size, help for every option, the BCCD path a user sets."""
from __future__ import annotations

import argparse
import json
import urllib.error
import warnings

import pytest
import torch
from conftest import ROOT, load_tool, write_tiny_config

from gfl_det.models.backbone import PretrainedWeightsError, ResNet



def test_offline_imagenet_download_names_both_ways_on(monkeypatch):
    import torchvision

    def offline(self, *a, **k):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torchvision.models.WeightsEnum, 'get_state_dict', offline)
    with pytest.raises(PretrainedWeightsError) as e:
        ResNet(18, pretrained='torchvision://resnet18')
    msg = str(e.value)
    assert "could not download the pretrained backbone 'torchvision://resnet18'" in msg
    assert 'Name or service not known' in msg
    assert 'model.backbone.init_cfg.checkpoint=' in msg and 'init_cfg=None' in msg and 'frozen_stages=-1' in msg


def test_train_tool_ends_in_one_clear_line_for_missing_weights(tmp_path, capsys):
    tiny = write_tiny_config(tmp_path / 'tiny.py', tmp_path / 'data', num_val=1)
    missing = tmp_path / 'resnet18.pth'
    cfg = tmp_path / 'pretrained.py'
    cfg.write_text(f"_base_ = {str(tiny)!r}\nmodel = dict(backbone=dict(init_cfg=dict(\n"
                   f"    _delete_=True, type='Pretrained', checkpoint={str(missing)!r})))\n")
    rc = load_tool('train').main([str(cfg), '--work-dir', str(tmp_path / 'wd')])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    assert f"error: pretrained backbone weights not found: '{missing}'" in err and 'Two ways on' in err


def test_random_frozen_stem_warns_once_loaded_or_from_scratch_does_not():
    with pytest.warns(UserWarning, match='trains from random weights.*frozen_stages=1 keeps the random stem and '
                                         'stage 1 as initialised and norm_eval=True keeps every BatchNorm'):
        ResNet(18, base_channels=8).train()
    with pytest.warns(UserWarning, match='but norm_eval=True keeps every BatchNorm at its initial statistics'):
        ResNet(18, base_channels=8, frozen_stages=-1).train()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ResNet(18, base_channels=8, frozen_stages=-1, norm_eval=False).train()  # from scratch, as bccd
        loaded = ResNet(18, base_channels=8)
        state = loaded.state_dict()
        state['bn1.running_mean'] = torch.rand(8)          # weights from a checkpoint
        loaded.load_state_dict(state)
        loaded.train()
        ResNet(18, base_channels=8).eval()                 # inference: no training, no warning


def test_get_flops_defaults_to_the_test_resize(capsys):
    from mmengine.config import Config

    from gfl_det.export import test_input_shape
    assert test_input_shape(Config.fromfile(str(ROOT / 'configs' / 'gfl_r50.py'))) == (800, 1344)
    load_tool('get_flops').main([str(ROOT / 'configs' / 'gfl_r18_synthetic.py'), '--json'])
    assert json.loads(capsys.readouterr().out)['shape'] == [320, 384]


@pytest.mark.parametrize('tool,argv', [
    ('benchmark', ['c.py']), ('get_flops', ['c.py']), ('export_onnx', ['c.py', '--out', 'x.onnx']),
    ('demo', ['x.jpg', '--onnx', 'x.onnx']), ('analyze_logs', ['plot_curve', 'wd']),
    ('browse_dataset', ['c.py', '--out-dir', 'o']), ('test', ['c.py', 'x.pth'])])
def test_every_option_has_help(tool, argv, monkeypatch):
    parsers = []
    orig = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args',
                        lambda self, *a, **k: parsers.append(self) or orig(self, *a, **k))
    mod = load_tool(tool)
    if hasattr(mod, 'parse_args'):
        mod.parse_args(argv)
    else:  # get_flops builds its parser in main
        with pytest.raises(Exception):
            mod.main(argv)  # stops at the missing config, after parsing
    actions = [a for p in parsers for a in p._actions if not isinstance(a, argparse._SubParsersAction)]
    missing = [a.option_strings or a.dest for a in actions if not a.help]
    assert actions and not missing, f'{tool}: options without help: {missing}'


def test_bccd_path_is_a_variable(monkeypatch):
    from mmengine.config import Config
    cfg = ROOT / 'configs' / 'gfl_r18_bccd.py'
    monkeypatch.delenv('BCCD_ROOT', raising=False)
    assert Config.fromfile(str(cfg)).train_dataloader.dataset.data_prefix.img == 'data/BCCD_Dataset/BCCD/JPEGImages/'
    monkeypatch.setenv('BCCD_ROOT', '/data/bccd_clone')
    assert Config.fromfile(str(cfg)).val_dataloader.dataset.data_prefix.img == '/data/bccd_clone/BCCD/JPEGImages/'
