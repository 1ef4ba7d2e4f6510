"""What an attached run hands back: per-token feature activations and feature attributions."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class FeatureActs:
    """One SAE's feature activations on one text, aligned with its tokens.

    ``acts`` is a sparse COO tensor [T, n_latents]; ``dense()`` gives the full [T, n_latents]."""

    hook: str
    tokens: list[str]
    token_ids: list[int]
    acts: Tensor

    @property
    def n_latents(self) -> int:
        return self.acts.shape[1]

    def dense(self) -> Tensor:
        return self.acts.to_dense()

    def active(self, position: int) -> dict[int, float]:
        """{feature: activation} of the nonzero features at ``position``, largest first."""
        row = self.dense()[position]
        ids = row.nonzero().flatten().tolist()
        return dict(sorted(((i, float(row[i])) for i in ids), key=lambda kv: -abs(kv[1])))

    def top(self, position: int, n: int = 5) -> list[tuple[int, float]]:
        return list(self.active(position).items())[:n]

    def feature(self, j: int) -> Tensor:
        """[T] activation of feature ``j`` per token."""
        return self.dense()[:, j]

    def html(self, feature: int | None = None, n_hover: int = 5) -> str:
        from saekit.intervene.display import tokens_html

        return tokens_html(self, feature, n_hover)

    def _repr_html_(self) -> str:
        return self.html()


@dataclass
class Attribution:
    """activation x gradient of a target, per (hook, position, feature), with the error term held fixed."""

    target: float  # the target's value on the (attached, unedited) run
    tokens: list[str]
    scores: dict[str, Tensor]  # hook -> dense [T, n_latents] attribution
    acts: dict[str, Tensor]  # hook -> dense [T, n_latents] activation
    dashboard: str | None = None  # the dashboard directory (``saekit analyze``'s RUN_DIR/dashboard)

    def top(self, n: int = 10) -> list[dict]:
        """The ``n`` largest |attribution| entries, each a dict (hook, position, token, feature,
        activation, attribution, and link when a dashboard directory was given)."""
        rows = []
        for hook, s in self.scores.items():
            flat = s.abs().flatten()
            k = min(n, int((flat > 0).sum()))
            if k == 0:
                continue
            vals, idx = flat.topk(k)
            for i in idx.tolist():
                pos, j = divmod(i, s.shape[1])
                row = {"hook": hook, "position": pos, "token": self.tokens[pos], "feature": j,
                       "activation": float(self.acts[hook][pos, j]), "attribution": float(s[pos, j])}
                if self.dashboard:
                    row["link"] = f"{self.dashboard.rstrip('/')}/index.html#f{j}"  # the card's anchor
                rows.append(row)
        rows.sort(key=lambda r: -abs(r["attribution"]))
        return rows[:n]

    def by_feature(self, hook: str | None = None) -> Tensor:
        """[n_latents] attribution summed over positions."""
        hook = hook or next(iter(self.scores))
        return self.scores[hook].sum(0)

    def _repr_html_(self) -> str:
        from saekit.intervene.display import attribution_html

        return attribution_html(self)


def sparse_rows(code_TN: Tensor) -> Tensor:
    return code_TN.detach().float().cpu().to_sparse_coo().coalesce()

