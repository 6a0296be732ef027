"""A linear probe on frozen features: multinomial logistic regression, L2-regularised as scikit-learn's
``LogisticRegression(C=...)`` is (the same minimum: the mean cross-entropy plus ||W||^2 / (2 C n), the
bias free), solved by L-BFGS. A sweep of C trains one head per value together, in one pass over the
features per step, and picks C on a held-out part of the training rows."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

CS = tuple(float(c) for c in 10.0 ** np.arange(-3, 3.01, 0.5))  # 13 values, 1e-3 to 1e3
HELD_OUT = 0.2
ROWS_PER_STEP = 8192  # rows per product: memory stays bounded on any number of rows
CACHED_VALUES = 2**26  # features kept in float64 between steps up to this many values (512 MiB)
SWEEP_ITERATIONS = 300  # enough to rank the Cs; the chosen one is then trained to convergence


def fit(x: Tensor, y: Tensor, num_classes: int, cs: tuple[float, ...], max_iter: int = 1000,
        start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One head per C: weights (C values, features, classes) and biases (C values, classes), in float64.
    The gradient is written out (softmax minus one-hot): no autograd graph per step."""
    n, d = x.shape
    heads, k = len(cs), num_classes
    weight = start[0].clone() if start else torch.zeros(heads, d, k, dtype=torch.float64)
    bias = start[1].clone() if start else torch.zeros(heads, k, dtype=torch.float64)
    params = torch.cat([weight.flatten(), bias.flatten()]).requires_grad_(False)
    strength = torch.tensor([1 / (c * n) for c in cs], dtype=torch.float64)
    chunks = [x[rows].double() if n * d <= CACHED_VALUES else rows for rows in torch.arange(n).split(ROWS_PER_STEP)]
    targets = [y[rows] for rows in torch.arange(n).split(ROWS_PER_STEP)]

    def closure() -> Tensor:
        w, b = params[:heads * d * k].view(heads, d, k), params[heads * d * k:].view(heads, k)
        flat = w.permute(1, 0, 2).reshape(d, heads * k)  # every head in one matrix product
        loss = (strength * w.pow(2).sum(dim=(1, 2))).sum() / 2
        grad_w, grad_b = strength[:, None, None] * w, torch.zeros_like(b)
        for part, target in zip(chunks, targets):
            rows = x[part].double() if part.dtype == torch.int64 else part
            logits = (rows @ flat).view(len(target), heads, k) + b
            log_p = logits.log_softmax(dim=2)
            loss -= log_p.gather(2, target[:, None, None].expand(-1, heads, 1)).sum() / n
            error = log_p.exp()
            error[torch.arange(len(target)), :, target] -= 1
            grad_w += (rows.T @ error.reshape(len(target), heads * k)).view(d, heads, k).permute(1, 0, 2) / n
            grad_b += error.sum(dim=0) / n
        params.grad = torch.cat([grad_w.flatten(), grad_b.flatten()])
        return loss

    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    optimizer.step(closure)
    return params[:heads * d * k].view(heads, d, k).clone(), params[heads * d * k:].view(heads, k).clone()


def predict(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Logits (C values, rows, classes)."""
    return torch.einsum("nd,cdk->cnk", x.double(), weight) + bias[:, None]


def held_out(y: Tensor, fraction: float = HELD_OUT, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Training and held-out row indices: ``fraction`` of each class (none from a class of one row)."""
    rng, train, kept = random.Random(seed), [], []
    for label in y.unique().tolist():
        rows = (y == label).nonzero().flatten().tolist()
        rng.shuffle(rows)
        n = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
        kept += rows[:n]
        train += rows[n:]
    return torch.tensor(sorted(train)), torch.tensor(sorted(kept))


def probe(x: Tensor, y: Tensor, num_classes: int, cs: tuple[float, ...] = CS) -> tuple[float, dict, Tensor, Tensor]:
    """The C whose head does best on the held-out rows (the largest regularisation among ties), each C's
    held-out top-1, and that C's head trained on every row: weight (features, classes), bias (classes)."""
    train, kept = held_out(y)
    weight, bias = fit(x[train], y[train], num_classes, cs, max_iter=SWEEP_ITERATIONS)
    correct = (predict(x[kept], weight, bias).argmax(dim=2) == y[kept]).sum(dim=1).tolist()
    scores = {c: 100 * k / len(kept) for c, k in zip(cs, correct)}
    best = max(range(len(cs)), key=lambda i: (correct[i], -i))
    weight, bias = fit(x, y, num_classes, (cs[best],), start=(weight[best:best + 1], bias[best:best + 1]))
    return cs[best], scores, weight[0], bias[0]
