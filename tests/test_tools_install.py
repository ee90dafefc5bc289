"""`pip install -e .` imports the same package from anywhere, also from the folder above a clone
named gfl_det (what `git clone` makes): there the clone itself is a namespace-package candidate
for `gfl_det` (and its data/ folder for `gfl_det.data`), which setuptools' import-hook editable
finder loses to; pyproject's package-dir makes the install a plain path entry, which wins."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def test_editable_install_imports_from_the_clones_parent_folder(tmp_path):
    if importlib.util.find_spec('pip') is None:
        pytest.skip('needs pip in this environment to make an editable install')
    clone = tmp_path / 'gfl_det'  # the folder `git clone .../gfl_det` makes
    clone.mkdir()
    for f in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / f, clone / f)
    shutil.copytree(ROOT / 'gfl_det', clone / 'gfl_det', ignore=shutil.ignore_patterns('__pycache__'))
    (clone / 'data').mkdir()  # as in the repo: data/ shadows gfl_det.data in a namespace import
    (clone / 'data' / 'README.md').write_text('datasets go here')
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', '--system-site-packages', str(venv)], check=True)
    py = venv / 'bin' / 'python'
    if not py.exists():
        pytest.skip('no POSIX venv layout here')
    r = subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '-e', str(clone)],
                       capture_output=True, text=True)
    if r.returncode and 'setuptools' in r.stderr:
        pytest.skip(f'setuptools (the build backend) is not installed here: {r.stderr[-300:]}')
    assert r.returncode == 0, r.stderr[-2000:]
    pths = sorted(p.name for p in venv.glob('lib/python*/site-packages/__editable__*'))
    assert pths and not any(p.endswith('finder.py') for p in pths), pths  # a path entry, no import hook
    code = ('import gfl_det, gfl_det.data as d; print(gfl_det.__file__); '
            'assert hasattr(d, "PhotoMetricDistortion") and hasattr(d, "CocoDataset")')
    r = subprocess.run([str(py), '-c', code], cwd=tmp_path, capture_output=True, text=True)  # parent of the clone
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(clone / 'gfl_det' / '__init__.py')
