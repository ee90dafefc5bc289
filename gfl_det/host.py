"""Small host -> device copies that do not stall the GPU.

``torch.tensor(python_list, device='cuda')`` copies from pageable memory, which synchronises
the stream with the host before the copy: a hidden host sync in every iteration that builds
per-image shapes that way. Copying from pinned memory with ``non_blocking=True`` is queued on
the stream like any kernel instead.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def host_tensor(data: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.tensor(data, dtype)`` on ``device``, copied asynchronously when that is a GPU.

    Under ``torch.compile`` the data may be symbolic sizes: the tensor is made where it is
    needed, inside the graph (no host copy to schedule)."""
    if torch.compiler.is_compiling():
        return torch.tensor(data, dtype=dtype, device=device)
    t = torch.tensor(data, dtype=dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
