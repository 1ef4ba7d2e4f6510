"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): the dictionary is split into nested
groups, and the loss sums the reconstruction error of every prefix of them,

    L = sum_i || x - (b_dec + sum_{j < m_i} code_j W_dec_j) ||^2        m_1 < m_2 < ... < m_G = n

so the first group must reconstruct on its own (general features), and each later group refines what the
earlier ones leave (specific ones). Selection is BatchTopK's (top k·B of the batch in training, the learned
threshold at inference) and AuxK revives dead latents from the full reconstruction's residual, as in
batchtopk.py. The prefixes cost one decode in all: the running reconstruction adds one group at a time.
On the sparse path (batchtopk.py, sparse_paths.py) the code's entries are decoded as one bag per
(group, token), and the prefix reconstructions are cumulative sums of those [G, B, d] group decodes.
Loss parts: "mse" (the full dictionary's, as every family reports it), "prefix_mse" (the sum over the
shorter prefixes, each times its ``group_weights`` share relative to the full one's; absent with one
group, which is BatchTopK exactly) and "auxk".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from saekit.autoencoders.base import register
from saekit.autoencoders.batchtopk import BatchTopKConfig, BatchTopKSAE
from saekit.autoencoders.sparse_paths import SparseResult
from saekit.metrics import mse
from saekit.schema import FieldError, value


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """BatchTopKConfig plus the nested groups: ``group_fractions`` of n_latents (summing to 1), or
    ``group_sizes`` in latents (summing to n_latents), which wins when given. ``group_weights``: one
    loss weight per prefix (as dictionary_learning's trainer takes them), relative to the whole
    dictionary's; None weighs every prefix alike."""

    group_fractions: list[float] = value(factory=lambda: [0.125, 0.125, 0.25, 0.5], gt=0, le=1)
    group_sizes: list[int] | None = value(None, ge=1)
    group_weights: list[float] | None = value(None, gt=0)

    def validate(self) -> None:
        super().validate()
        if self.group_sizes is not None:
            if sum(self.group_sizes) != self.n_latents:
                raise FieldError("group_sizes", f"sum to {sum(self.group_sizes)}, not n_latents ({self.n_latents})")
        elif not math.isclose(sum(self.group_fractions), 1.0, abs_tol=1e-6):
            raise FieldError("group_fractions", f"sum to {sum(self.group_fractions):g}, not 1")
        ends = self.group_ends()
        if any(end <= start for start, end in zip([0] + ends[:-1], ends)):
            raise FieldError("group_fractions", f"leave an empty group at n_latents {self.n_latents}")
        if self.group_weights is not None and len(self.group_weights) != len(ends):
            raise FieldError("group_weights", f"give {len(self.group_weights)} weights for {len(ends)} groups")

    def prefix_weights(self) -> list[float]:
        """Each shorter prefix's loss weight over the whole dictionary's (which stays 1, so the loss
        part "mse" is every family's, and one group is BatchTopK exactly)."""
        weights = self.group_weights or [1.0] * len(self.group_ends())
        return [w / weights[-1] for w in weights[:-1]]

    def group_ends(self) -> list[int]:
        """m_1 < ... < m_G = n_latents: where each prefix ends (fractions rounded to whole latents)."""
        if self.group_sizes is not None:
            sizes = self.group_sizes
            return [sum(sizes[:i + 1]) for i in range(len(sizes))]
        ends, total = [], 0.0
        for f in self.group_fractions:
            total += f
            ends.append(round(total * self.n_latents))
        ends[-1] = self.n_latents
        return ends


@register("matryoshka", MatryoshkaConfig)
class MatryoshkaSAE(BatchTopKSAE):
    def __init__(self, d_in: int, cfg: MatryoshkaConfig):
        super().__init__(d_in, cfg)
        self.group_ends = cfg.group_ends()
        self.prefix_weights = cfg.prefix_weights()

    def reconstruct(self, x_n_BD: Tensor, code_BN: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x_hat_n_BD, start, prefix = self.b_dec.expand_as(x_n_BD), 0, []
        for end in self.group_ends:
            x_hat_n_BD = x_hat_n_BD + code_BN[:, start:end] @ self.W_dec[start:end]
            prefix.append(mse(x_n_BD, x_hat_n_BD))
            start = end
        losses = {"mse": prefix[-1]}
        if len(prefix) > 1:
            losses["prefix_mse"] = self._weighted(prefix[:-1])
        return x_hat_n_BD, losses

    def _weighted(self, shorter: list[Tensor]) -> Tensor:
        return sum(w * loss for w, loss in zip(self.prefix_weights, shorter))

    def sparse_groups(self) -> list[int] | None:
        return self.group_ends if len(self.group_ends) > 1 else None

    def reconstruct_sparse(self, x_n_BD: Tensor, r: SparseResult) -> tuple[Tensor, dict[str, Tensor]]:
        if r.prefix_GBD is None:  # one group: BatchTopK exactly
            return super().reconstruct_sparse(x_n_BD, r)
        prefix = [mse(x_n_BD, p_BD + self.b_dec) for p_BD in r.prefix_GBD.unbind(0)]
        x_hat_n_BD = r.prefix_GBD[-1] + self.b_dec
        return x_hat_n_BD, {"mse": prefix[-1], "prefix_mse": self._weighted(prefix[:-1])}
