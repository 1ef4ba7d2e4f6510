"""Notebook display: tokens coloured by one feature, top features per token on hover, a before/after
table of next-token predictions. Every token and label is passed through ``html.escape``."""
from __future__ import annotations

import html
from dataclasses import dataclass


def _shade(value: float, peak: float) -> str:
    a = 0.0 if peak <= 0 else min(1.0, abs(value) / peak)
    colour = "255,120,40" if value >= 0 else "60,120,255"
    return f"rgba({colour},{a:.3f})"


def tokens_html(acts, feature: int | None = None, n_hover: int = 5) -> str:
    """``acts`` (FeatureActs) as one line of tokens; coloured by ``feature`` (default: the feature with
    the largest activation anywhere), each token's top ``n_hover`` features in its tooltip."""
    dense = acts.dense()
    if feature is None:
        feature = int(dense.abs().max(0).values.argmax()) if dense.numel() else 0
    column = dense[:, feature]
    peak = float(column.abs().max()) if column.numel() else 0.0
    spans = []
    for pos, token in enumerate(acts.tokens):
        top = ", ".join(f"#{j}: {v:.3g}" for j, v in acts.top(pos, n_hover)) or "no active features"
        tip = f"{token!r} (position {pos}) | feature {feature}: {float(column[pos]):.3g} | {top}"
        spans.append(f'<span title="{html.escape(tip, quote=True)}" style="background:'
                     f'{_shade(float(column[pos]), peak)};white-space:pre">{html.escape(token)}</span>')
    head = html.escape(f"{acts.hook}: feature {feature} (max {peak:.3g})")
    return (f'<div class="saekit-features"><div style="font-size:smaller">{head}</div>'
            f'<div style="font-family:monospace">{"".join(spans)}</div></div>')


@dataclass
class Comparison:
    """Top next-token predictions before and after the run's edits."""

    text: str
    before: list[tuple[str, float]]
    after: list[tuple[str, float]]

    def __str__(self) -> str:
        rows = [f"{'before':>24}  {'after':>24}"]
        for (bt, bp), (at, ap) in zip(self.before, self.after):
            rows.append(f"{bt!r:>16} {bp:6.3f}  {at!r:>16} {ap:6.3f}")
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td>{html.escape(repr(bt))}</td><td>{bp:.3f}</td><td>{html.escape(repr(at))}</td>"
            f"<td>{ap:.3f}</td></tr>" for (bt, bp), (at, ap) in zip(self.before, self.after))
        return (f"<table><caption>{html.escape(self.text)}</caption><tr><th>before</th><th>p</th>"
                f"<th>after</th><th>p</th></tr>{cells}</table>")


def attribution_html(attr, n: int = 10) -> str:
    rows = []
    for r in attr.top(n):
        name = html.escape(f"#{r['feature']}")
        if "link" in r:
            name = f'<a href="{html.escape(r["link"], quote=True)}">{name}</a>'
        rows.append(f"<tr><td>{html.escape(r['hook'])}</td><td>{r['position']}</td>"
                    f"<td>{html.escape(repr(r['token']))}</td><td>{name}</td><td>{r['activation']:.3g}</td>"
                    f"<td>{r['attribution']:.3g}</td></tr>")
    return (f"<table><caption>target {attr.target:.4g}</caption><tr><th>hook</th><th>pos</th><th>token</th>"
            f"<th>feature</th><th>activation</th><th>attribution</th></tr>{''.join(rows)}</table>")
