"""A loss that learns: a tiny network trained with gfl_det.metric on 200 digits separates two
identities it has never seen better than the same network untrained."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gfl_det.metric import retrieval_metrics, triplet_loss

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn's bundled digits")

UNSEEN = (4, 9)  # similar strokes: an untrained network mixes them up
MARGIN = 0.05  # the MAP@R gain the test asks for, averaged over 3 seeds (measured: about +0.14)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds waiting (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _map_at_r(net, x, y):
    with torch.no_grad():
        return retrieval_metrics(F.normalize(net(x), dim=1), y)["map_at_r"]


def test_triplet_loss_learns_an_embedding_for_unseen_digits():
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    unseen = torch.isin(y, torch.tensor(UNSEEN))
    gains = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        train = (~unseen).nonzero().squeeze(1)
        train = train[torch.randperm(len(train), generator=g)[:200]]  # 200 digits of the 8 other classes
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
        before = _map_at_r(net, x[unseen], y[unseen])
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(150):
            idx = train[torch.randperm(200, generator=g)[:64]]
            loss = triplet_loss(net(x[idx]), y[idx], margin=0.2, mining="semihard")
            opt.zero_grad()
            loss.backward()
            opt.step()
        gains.append(_map_at_r(net, x[unseen], y[unseen]) - before)
    assert sum(gains) / len(gains) >= MARGIN, gains
