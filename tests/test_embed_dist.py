"""The embedding loss across processes (gloo on the CPU, 2 processes): embeddings and identities
are gathered before mining, so each process computes the loss over the union, and the gradient
that DDP averages equals the single-process gradient of that loss."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gfl_det.embed_loss import EmbeddingLoss, gather_across_processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def case(loss: dict):
    """A shared linear 'network' (its weight is what DDP averages), 11 inputs split 7 / 4 over two
    ranks (unequal: the gather pads), identities shared across the ranks."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 8)
    term = EmbeddingLoss(8, loss)
    x = torch.randn(11, 6)
    ids = torch.tensor([0, 1, 2, 0, 1, 3, 2, 3, 0, 1, 2])
    return net, term, x, ids


def _rank(rank: int, port: int, loss: dict, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        net, term, x, ids = case(loss)
        part = slice(0, 7) if rank == 0 else slice(7, 11)
        emb, all_ids = gather_across_processes(net(x[part]), ids[part])
        value = term.metric_loss(emb, all_ids)
        value.backward()
        grads = {n: p.grad.clone() for n, p in list(net.named_parameters()) + list(term.named_parameters())}
        for g in grads.values():  # what DDP does with the parameter gradients
            dist.all_reduce(g)
            g /= 2
        results[rank] = (value.item(), all_ids.tolist(), {k: v.tolist() for k, v in grads.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('loss', [dict(type='triplet', mining='facenet', margin=0.2, synthesis='symmetrical'),
                                  dict(type='arcface', num_ids=4, scale=16.0)])
def test_two_processes_train_like_one_over_the_union(loss):
    net, term, x, ids = case(loss)
    single = term.metric_loss(net(x), ids)
    single.backward()
    want = {n: p.grad for n, p in list(net.named_parameters()) + list(term.named_parameters())}
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), loss, results), nprocs=2, join=True)
    for r in range(2):
        value, all_ids, grads = results[r]
        assert all_ids == ids.tolist()  # rank order: rank 0's 7 rows, then rank 1's 4
        assert value == pytest.approx(single.item(), rel=1e-6)
        for name, g in want.items():
            assert torch.allclose(torch.tensor(grads[name]), g, rtol=1e-5, atol=1e-7), name
    # without the gather each rank would see only its own rows: a different loss (the test can fail)
    part = term.metric_loss(net(x[:7]), ids[:7]).item()
    assert abs(part - single.item()) > 1e-3


def test_single_process_is_untouched():
    emb, ids = torch.randn(5, 3, requires_grad=True), torch.arange(5)
    out_emb, out_ids = gather_across_processes(emb, ids)
    assert out_emb is emb and out_ids is ids
