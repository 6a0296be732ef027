"""kNN classification on frozen features, as DINO evaluates them: cosine similarity between normalised
features, each of the k nearest training rows voting for its class with weight exp(similarity / T)."""
from __future__ import annotations

import torch
from torch import Tensor

KS = (1, 5, 10, 20, 50, 100)  # 10 to 100 as DINO reports them; 1 and 5 for small training sets
TEMPERATURE = 0.07
SIMILARITIES = 2**26  # per batch of val rows (256 MiB of float32), whatever the number of training rows


def knn_hits(train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor, num_classes: int,
             ks: tuple[int, ...] = KS, temperature: float = TEMPERATURE) -> dict[int, list[int]]:
    """{k: [top-1 hits, top-5 hits]} of the val rows, for each k of ``ks`` the training rows allow (all of
    them, where there are fewer than the smallest k)."""
    ks = tuple(k for k in ks if k <= len(train)) or (len(train),)
    batch = max(1, SIMILARITIES // len(train))
    train = torch.nn.functional.normalize(train.float(), dim=1)
    hits = {k: torch.zeros(2, dtype=torch.int64) for k in ks}
    for rows in torch.arange(len(val)).split(batch):
        query = torch.nn.functional.normalize(val[rows].float(), dim=1)
        near = (query @ train.T).topk(max(ks), dim=1)
        weights, labels = (near.values / temperature).exp(), train_labels[near.indices]
        for k in ks:
            votes = torch.zeros(len(rows), num_classes).scatter_add_(1, labels[:, :k], weights[:, :k])
            top = votes.topk(min(5, num_classes), dim=1).indices == val_labels[rows, None]
            hits[k] += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
    return {k: h.tolist() for k, h in hits.items()}
