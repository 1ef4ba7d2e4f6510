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
    """Merge candidate (latent, value, row, key) entries into per-latent top-`key` tables, in place.

    Only the latents that received candidates are touched, so the cost follows the candidates.
    """
    k = best_key.shape[1]
    touched, slot = torch.unique(lat, return_inverse=True)  # candidate -> its touched-latent slot
    t = len(touched)
    # Old entries of the touched latents (t*k, -inf keys where empty), then the candidates.
    all_slot = torch.cat([torch.arange(t, device=lat.device).repeat_interleave(k), slot])
    all_key = torch.cat([best_key[touched].flatten(), key])
    all_val = torch.cat([best_val[touched].flatten(), val])
    all_row = torch.cat([best_row[touched].flatten(), row])
    # Sort by key descending, then stably by slot: entries grouped by latent, best first.
    order = torch.argsort(all_key, descending=True, stable=True)
    order = order[torch.argsort(all_slot[order], stable=True)]
    sorted_slot = all_slot[order]
    counts = torch.bincount(sorted_slot, minlength=t)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=lat.device) - starts[sorted_slot]
    keep = rank < k  # every slot has at least its k old entries, so exactly k survive per slot
    sel = order[keep]
    best_key[touched] = all_key[sel].view(t, k)
    best_val[touched] = all_val[sel].view(t, k)
    best_row[touched] = all_row[sel].view(t, k)


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


class _TopTable:
    """Per-latent top-k entries by key, fed in batches. Candidates are buffered and merged once the
    buffer is as large as the table, so the sort cost is amortized over many batches. Filtering by the
    last merged threshold stays correct: it only ever lets through extra candidates, never drops one
    that belongs in the top k."""

    def __init__(self, n: int, k: int, device):
        self.val = torch.zeros(n, k, device=device)
        self.row = torch.full((n, k), -1, dtype=torch.long, device=device)
        self.key = torch.full((n, k), -float("inf"), device=device)
        self.pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self.n_pending = 0

    def offer(self, lat: Tensor, val: Tensor, row: Tensor, key: Tensor) -> None:
        cand = key > self.key[lat, -1]  # beats the latent's k-th best so far (-inf while there is room)
        if cand.any():
            self.pending.append((lat[cand], val[cand], row[cand], key[cand]))
            self.n_pending += int(cand.sum())
        if self.n_pending >= self.key.numel():
            self.flush()

    def flush(self) -> None:
        if self.pending:
            lat, val, row, key = (torch.cat(t) for t in zip(*self.pending))
            _merge_top(self.val, self.row, self.key, lat, val, row, key)
            self.pending, self.n_pending = [], 0


class FeatureStatsAccumulator:
    def __init__(self, n_latents: int, top_k: int = 20, n_sample: int = 50, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.n, self.device = n_latents, torch.device(device)
        f = dict(device=self.device)
        self.n_tokens = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.long, **f)
        self.max_act = torch.full((n_latents,), -float("inf"), **f)  # codes may be negative (PCA)
        self.sum_act = torch.zeros(n_latents, dtype=torch.float64, **f)
        self.top = _TopTable(n_latents, top_k, self.device)
        self.sample = _TopTable(n_latents, n_sample, self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def update(self, code_BN: Tensor, rows_B: Tensor) -> None:
        """Add a batch of dense codes [B, n] whose store rows are ``rows_B``."""
        b, lat = code_BN.nonzero(as_tuple=True)
        self.update_sparse(b, lat, code_BN[b, lat], rows_B, code_BN.shape[0])

    def update_sparse(self, b: Tensor, lat: Tensor, val: Tensor, rows_B: Tensor, n_tokens: int) -> None:
        """Add the nonzero entries (token b, latent lat, value val) of a batch of ``n_tokens`` tokens.

        Everything is O(nonzeros): a TopK SAE's codes never need a dense [B, n] pass here.
        """
        val = val.float()
        rows = rows_B.to(val.device)[b]
        self.n_tokens += n_tokens
        self.fire_count += torch.bincount(lat, minlength=self.n)
        self.max_act.scatter_reduce_(0, lat, val, reduce="amax")
        self.sum_act.index_add_(0, lat, val.double())
        self.top.offer(lat, val, rows, val)
        self.sample.offer(lat, val, rows, torch.rand(val.shape, generator=self.gen, device=val.device))

    def result(self) -> FeatureStats:
        self.top.flush()
        self.sample.flush()
        cpu = lambda t: t.cpu()  # noqa: E731
        max_act = torch.where(self.fire_count > 0, self.max_act, torch.zeros_like(self.max_act))
        return FeatureStats(self.n_tokens, cpu(self.fire_count), cpu(max_act), cpu(self.sum_act),
                            cpu(self.top.val), cpu(self.top.row), cpu(self.sample.val), cpu(self.sample.row))
