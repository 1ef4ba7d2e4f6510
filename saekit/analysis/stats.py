"""One streaming pass over codes: per-latent top activations, a uniform sample, and summary statistics.

Memory is O(n_latents x examples kept), never O(tokens x latents). Each batch only offers the entries
that beat a latent's current k-th best (a threshold that quickly rises), so after the first few batches
the merge touches a tiny fraction of the batch and the pass costs about one read of the codes.
The uniform sample per latent is a reservoir kept the same way: every nonzero entry gets a random key
and each latent keeps the entries with the largest keys, which is a uniform sample without replacement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _merge_top(best_val: Tensor, best_row: Tensor, best_key: Tensor, lat: Tensor, val: Tensor,
               row: Tensor, key: Tensor) -> None:
    """Merge candidate (latent, value, row, key) entries into per-latent top-`key` tables, in place."""
    n, k = best_key.shape
    occupied = best_row >= 0
    old_lat = torch.arange(n, device=lat.device).repeat_interleave(k)[occupied.flatten()]
    all_lat = torch.cat([old_lat, lat])
    all_key = torch.cat([best_key[occupied], key])
    all_val = torch.cat([best_val[occupied], val])
    all_row = torch.cat([best_row[occupied], row])
    # Sort by key descending, then stably by latent: entries grouped by latent, best first.
    order = torch.argsort(all_key, descending=True, stable=True)
    order = order[torch.argsort(all_lat[order], stable=True)]
    sorted_lat = all_lat[order]
    counts = torch.bincount(sorted_lat, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=lat.device) - starts[sorted_lat]
    keep = rank < k
    sel = order[keep]
    slot_lat, slot_rank = sorted_lat[keep], rank[keep]
    best_key.fill_(-float("inf"))
    best_row.fill_(-1)
    best_val.zero_()
    best_key[slot_lat, slot_rank] = all_key[sel]
    best_val[slot_lat, slot_rank] = all_val[sel]
    best_row[slot_lat, slot_rank] = all_row[sel]


@dataclass
class FeatureStats:
    """Everything the dashboard needs per latent, all [n] or [n, k] tensors on CPU."""

    n_tokens: int
    fire_count: Tensor  # [n] tokens on which the latent was nonzero
    max_act: Tensor  # [n]
    sum_act: Tensor  # [n] sum of activations (for the mean over firing tokens)
    top_val: Tensor  # [n, top_k] descending; rows -1 where fewer fired
    top_row: Tensor  # [n, top_k] global store row of each example
    sample_val: Tensor  # [n, n_sample] a uniform sample of nonzero activations
    sample_row: Tensor

    @property
    def density(self) -> Tensor:
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> Tensor:
        """Mean activation over the tokens where the latent fired."""
        return self.sum_act.double() / self.fire_count.clamp(min=1)

    def quantile_examples(self, latent: int, n_bins: int, per_bin: int) -> list[list[tuple[float, int]]]:
        """Examples from activation-quantile bins of the uniform sample, highest bin first."""
        ok = self.sample_row[latent] >= 0
        vals, rows = self.sample_val[latent][ok], self.sample_row[latent][ok]
        if len(vals) == 0:
            return []
        order = torch.argsort(vals, descending=True)
        vals, rows = vals[order], rows[order]
        bins = torch.tensor_split(torch.arange(len(vals)), min(n_bins, len(vals)))
        return [[(float(vals[i]), int(rows[i])) for i in b[:per_bin]] for b in bins]


class FeatureStatsAccumulator:
    def __init__(self, n_latents: int, top_k: int = 20, n_sample: int = 50, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.n, self.device = n_latents, torch.device(device)
        f = dict(device=self.device)
        self.n_tokens = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.long, **f)
        self.max_act = torch.zeros(n_latents, **f)
        self.sum_act = torch.zeros(n_latents, dtype=torch.float64, **f)
        self.top = self._table(top_k)
        self.sample = self._table(n_sample)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def _table(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.zeros(self.n, k, device=self.device),
                torch.full((self.n, k), -1, dtype=torch.long, device=self.device),
                torch.full((self.n, k), -float("inf"), device=self.device))

    def update(self, code_BN: Tensor, rows_B: Tensor) -> None:
        """Add a batch of codes [B, n] whose store rows are ``rows_B``."""
        code_BN = code_BN.float()
        rows_B = rows_B.to(code_BN.device)
        active = code_BN != 0
        self.n_tokens += code_BN.shape[0]
        self.fire_count += active.sum(0)
        self.max_act = torch.maximum(self.max_act, code_BN.max(0).values)
        self.sum_act += code_BN.sum(0, dtype=torch.float64)
        self._offer(self.top, code_BN, code_BN, active, rows_B)
        keys = torch.rand(code_BN.shape, generator=self.gen, device=code_BN.device)
        self._offer(self.sample, keys, code_BN, active, rows_B)

    @staticmethod
    def _offer(table, key_BN: Tensor, code_BN: Tensor, active: Tensor, rows_B: Tensor) -> None:
        best_val, best_row, best_key = table
        threshold = best_key[:, -1]  # k-th best key so far; -inf while a latent's table has room
        cand = active & (key_BN > threshold[None, :])
        b, lat = cand.nonzero(as_tuple=True)
        if len(b):
            _merge_top(best_val, best_row, best_key, lat, code_BN[b, lat], rows_B[b], key_BN[b, lat])

    def result(self) -> FeatureStats:
        cpu = lambda t: t.cpu()  # noqa: E731
        return FeatureStats(self.n_tokens, cpu(self.fire_count), cpu(self.max_act), cpu(self.sum_act),
                            cpu(self.top[0]), cpu(self.top[1]), cpu(self.sample[0]), cpu(self.sample[1]))
