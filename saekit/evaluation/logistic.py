"""Logistic regression in torch, many binary probes at once: the one probe the evaluation suite fits.

``fit_logistic(x, y)`` takes a batch of problems ``x [P, n, d]`` with labels ``y [P, n]``, or problems
that share their features (``x [n, d]``, ``y [P, n]``), or one problem (``x [n, d]``, ``y [n]``); it standardizes each feature on its problem's training rows, and minimizes the mean
(optionally class-balanced) binary cross-entropy plus ``l2 * ||w||^2 / 2`` by full-batch L-BFGS. The
weights come back in the units of ``x`` (``logit = x @ w + b``), so a probe's direction can be compared
with a decoder's. Columns that are all zero (padding, when the problems use different feature counts)
get weight 0 and change nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-3, steps: int = 60, balanced: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """(w [P, d], b [P]) (or [d], [] for one problem) with ``logit = x @ w + b``."""
    single = y.ndim == 1
    if single:
        y = y[None]
    if x.ndim == 2:
        x = x[None]  # shared by every problem: broadcast, never copied
    x, y = x.float(), y.float().to(x.device)
    mu = x.mean(1, keepdim=True)
    sd = x.std(1, keepdim=True)
    keep = sd > 1e-8  # constant columns (padding): no weight
    sd = torch.where(keep, sd, torch.ones_like(sd))
    z = (x - mu) / sd
    pos = y.mean(1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    weight = (torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos)) if balanced else torch.ones_like(y))
    P, d = y.shape[0], z.shape[-1]
    w = torch.zeros(P, d, device=z.device, requires_grad=True)
    b = torch.logit(pos.squeeze(1)).detach().clone().requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        logits = torch.matmul(z, w[:, :, None]).squeeze(-1) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="none")
        # The sum over problems keeps each problem's gradient its own (they share no parameter).
        total = loss.mean(1).sum() + 0.5 * l2 * (w * w).sum()
        total.backward()
        return total

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        w_raw = torch.where(keep.squeeze(1), w / sd.squeeze(1), torch.zeros_like(w))
        b_raw = b - (mu.squeeze(1) * w_raw).sum(-1)  # mu [1 or P, d] broadcasts over the problems
    return (w_raw[0], b_raw[0]) if single else (w_raw, b_raw)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Share of correct sign predictions along the last dimension."""
    return ((logits > 0) == y.bool()).float().mean(-1)


def f1(pred: Tensor, y: Tensor) -> Tensor:
    """F1 of boolean predictions along the last dimension (0 where nothing is predicted or true)."""
    pred, y = pred.bool(), y.bool()
    tp = (pred & y).sum(-1).float()
    return 2 * tp / (pred.sum(-1) + y.sum(-1)).clamp(min=1)
