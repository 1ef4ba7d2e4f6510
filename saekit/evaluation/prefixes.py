"""Reconstruction by a prefix of the dictionary: latents [0, m) alone, every later latent's code zeroed.

For a Matryoshka SAE the prefixes that matter are its groups' ends: its loss trains each prefix to
reconstruct on its own, so the first group alone should rival an ordinary SAE of that size (Bussmann et
al. 2025), which is the check this gives (``saekit evaluate`` reports it for Matryoshka models as
``reconstruction.prefixes``). Any model with a linear decoder works: the prefix reconstruction is
``decode(code * [j < m])``, and FVU, cosine and L0 are metrics.py's, over the same rows as the full
model's numbers.
"""
from __future__ import annotations

import torch

from saekit.metrics import FiringStats, ReconstructionStats


@torch.no_grad()
def prefix_metrics(model, reader, hook: str, rows: tuple[int, int], ends: list[int], batch_size: int = 4096,
                   device="cpu") -> list[dict]:
    """For each ``m`` in ``ends``: ``{"latents": m, "fvu", "cosine", "l0"}`` of the reconstruction by
    latents [0, m) over store rows [start, stop) of ``hook``."""
    n = model.n_latents
    if not ends or any(not 1 <= m <= n for m in ends):
        raise ValueError(f"prefix ends must lie in [1, {n}], got {ends}")
    model = model.to(device).eval()
    recon = [ReconstructionStats() for _ in ends]
    firing = [FiringStats(m) for m in ends]
    ids = torch.arange(n, device=device)
    for a in range(rows[0], rows[1], batch_size):
        x = reader.activations(hook, (a, min(rows[1], a + batch_size)), dtype=torch.float32).to(device)
        code = model.encode(x)
        for m, rec, fire in zip(ends, recon, firing):
            kept = code * (ids < m)
            rec.update(x, model.decode(kept))
            active = kept[:, :m] != 0
            fire.update(active.sum(0), active.sum(-1))
    out = []
    for m, rec, fire in zip(ends, recon, firing):
        r = rec.compute()
        out.append({"latents": m, "fvu": r["fvu"], "cosine": r["cosine"], "l0": fire.compute()["l0"]})
    return out
