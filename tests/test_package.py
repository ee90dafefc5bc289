"""The package's shape: no import cycle anywhere in gfl_det (import-time or inside functions),
no file over 500 lines, and importing the mmengine adapter patches nothing of mmengine's."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'gfl_det'
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob('*.py'):
        parts = list(f.relative_to(PKG.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        mods['.'.join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the gfl_det modules it imports (every import statement, wherever it is)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == '__init__.py'
        package = mod if is_pkg else mod.rpartition('.')[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')
                    base = base[:len(base) - node.level + 1]
                    src = '.'.join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ''
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
                targets = [f'{src}.{a.name}' if f'{src}.{a.name}' in mods else src for a in node.names]
            for t in targets:
                while t and t not in mods and '.' in t:
                    t = t.rpartition('.')[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_gfl_det():
    graph = import_graph()
    assert graph['gfl_det.mm.runner'] >= {'gfl_det.checkpoint', 'gfl_det.mm.registry'}  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, ' -> '.join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_file_over_500_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob('*.py')
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_importing_the_adapter_patches_nothing():
    """gfl_det.mm registers its classes in its own registries and changes nothing of mmengine's
    (the Config's pretty_text memo is a subclass the runner uses, not a patch)."""
    code = ('import sys; from mmengine.config import Config; before = Config.pretty_text; '
            'import gfl_det.mm, gfl_det.registry; '
            'assert Config.pretty_text is before; '
            "assert sys.modules['gfl_det.registry'].__file__.endswith('gfl_det/registry.py'); "
            'assert gfl_det.registry.MODELS is gfl_det.mm.MODELS')
    r = subprocess.run([sys.executable, '-c', code], cwd=PKG.parent, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_memo_config_formats_once_and_follows_changes(monkeypatch):
    from mmengine.config import Config

    from gfl_det.mm import MemoConfig
    calls = []
    real = Config.pretty_text.fget
    monkeypatch.setattr(Config, 'pretty_text', property(lambda self: calls.append(1) or real(self)))
    cfg = MemoConfig.of(Config(dict(a=1, b=dict(c=2))))
    assert cfg.pretty_text == cfg.pretty_text == real(Config(dict(a=1, b=dict(c=2))))
    assert len(calls) == 1
    cfg.b.c = 3
    assert 'c=3' in cfg.pretty_text and len(calls) == 2
