"""Checked inputs, the hypersphere and the one distance every metric-learning loss uses.

Shape legend for ``gfl_det.metric``: N embeddings in a batch, D their dimension, U negative
units (samples, or same-identity pairs under Symmetrical Synthesis), C classes, B anchors in a
chunk.

Every loss L2-normalises its embeddings first (FaceNet's hypersphere; pytorch-metric-learning's
default ``LpDistance(normalize_embeddings=True)``) and measures Euclidean distance,
d(x, y) = |x - y|, or its square where a ``squared`` option asks for it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def check_embeddings(emb: Tensor, labels: Optional[Tensor] = None, name: str = "emb") -> None:
    """Raise a ValueError naming the problem: emb must be a finite floating (N, D) tensor and
    labels, where given, an int64 (N,) tensor on the same device."""
    if not isinstance(emb, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {emb.dtype}")
    if emb.shape[1] == 0:
        raise ValueError(f"{name} has dimension D = 0")
    if not bool(torch.isfinite(emb).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if labels.shape[0] != emb.shape[0]:
        raise ValueError(f"{name} has N = {emb.shape[0]} rows but labels has {labels.shape[0]}")
    if labels.device != emb.device:
        raise ValueError(f"labels are on {labels.device} but {name} on {emb.device}")


def normalize(emb: Tensor) -> Tensor:
    """x / |x| per row (F.normalize, eps 1e-12: a zero row stays zero)."""
    return F.normalize(emb, p=2.0, dim=1)


def pairwise_distance(x: Tensor, y: Optional[Tensor] = None, squared: bool = False) -> Tensor:
    """(Nx, Ny) Euclidean distances |x_i - y_j| (squared where asked).

    torch.cdist computes |x|^2 + |y|^2 - 2 x.y with one matrix product for more than 25 rows
    (as pytorch-metric-learning's LpDistance does) and defines the gradient as 0 where a
    distance is 0, so a sample's distance to itself or to a duplicate never gives NaN."""
    d = torch.cdist(x, x if y is None else y)
    return d * d if squared else d


def zero_loss(*tensors: Tensor) -> Tensor:
    """A zero that is still connected to the graph of every input (for batches with nothing
    to learn from: backward gives zero gradients, not an error)."""
    return sum(t.sum() * 0.0 for t in tensors)


def same_identity(labels: Tensor, start: int = 0, stop: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Masks over the pairs (i, j) of anchors i in [start, stop) (default all N) with every j:
    positives (same label, i != j) and negatives (different label), each (stop - start, N)."""
    stop = len(labels) if stop is None else stop
    same = labels[start:stop, None] == labels[None, :]  # (B, N)
    negative = ~same
    rows = torch.arange(stop - start, device=labels.device)
    same[rows, rows + start] = False
    return same, negative
