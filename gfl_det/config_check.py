"""Checking MMDetection-style config dicts against what gfl_det implements.

A config that names a ``type`` or an option gfl_det does not implement is refused, with the
key, the value and what is supported, instead of being built as something else than it says.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ['pop_type', 'check_keys']


def pop_type(key: str, cfg: Optional[dict], supported: str | tuple[str, ...]) -> dict:
    """``cfg`` without its ``type`` (absent = the first supported type); an unsupported type
    raises ``ValueError`` naming ``key``."""
    names = (supported,) if isinstance(supported, str) else tuple(supported)
    cfg = dict(cfg or {})
    t = cfg.pop('type', names[0])
    if t not in names:
        raise ValueError(f"{key}: type {t!r} is not implemented by gfl_det; supported: "
                         f"{', '.join(repr(n) for n in names)}")
    return cfg


def check_keys(key: str, cfg: dict, **allowed: Optional[tuple]) -> dict:
    """Every entry of ``cfg`` must be a name in ``allowed``; where ``allowed[name]`` is a tuple
    the value must be one of its values (None: any value). Returns ``cfg``."""
    for name, value in cfg.items():
        if name not in allowed:
            raise ValueError(f"{key}.{name} is not an option gfl_det implements; "
                             f"known: {', '.join(sorted(allowed)) or 'none'}")
        ok = allowed[name]
        if ok is not None and not any(_same(value, v) for v in ok):
            raise ValueError(f"{key}.{name}={value!r} is not implemented by gfl_det; supported: "
                             f"{', '.join(repr(v) for v in ok)}")
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and dict(a) == dict(b)
    return a == b
