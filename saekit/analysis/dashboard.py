"""Feature cards as self-contained HTML: one static file for the browser, ``_repr_html_`` for Jupyter.

Every string that came from a tokenizer or a dataset goes through ``html.escape`` (via ``_e``) before it
reaches the page, tokens first through ``visible`` (control characters as their Unicode control
pictures: a NUL from a byte-level tokenizer shows as ␀, not as nothing); numbers are formatted, never
interpolated raw. The page needs no network: styles and
the sorting script are inline, histograms are inline SVG.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from saekit.files import atomic_write, write_json


def _e(text) -> str:
    return html.escape(str(text), quote=True)


# C0 control characters and DEL -> U+2400.. control pictures; tab and newline stay layout.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(0x20) if chr(c) not in "\t\n"} | {0x7F: 0x2421}


def visible(token: str) -> str:
    """``token`` with every control character but tab and newline shown as its control picture."""
    return str(token).translate(_CONTROL_PICTURES)


def _t(token) -> str:
    """A token as page text: made visible, then escaped."""
    return _e(visible(token))


@dataclass
class Example:
    """One context window around a token where the feature fired."""

    tokens: list[str]
    acts: list[float]  # the feature's activation on each token of the window (0 where unknown)
    center: int  # index of the token the example is about
    activation: float


@dataclass
class FeatureCard:
    latent: int
    density: float
    max_act: float
    mean_act: float
    top: list[Example] = field(default_factory=list)
    quantiles: list[tuple[str, list[Example]]] = field(default_factory=list)
    lens_title: str = "logit lens"
    lens_pos: list[tuple[str, float]] = field(default_factory=list)
    lens_neg: list[tuple[str, float]] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)  # activation histogram over firing tokens
    hist_counts: list[int] = field(default_factory=list)

    def html(self) -> str:
        parts = [f'<div class="card" id="f{self.latent}"><h3>Feature {self.latent}</h3>',
                 f'<p class="meta">density {self.density:.3%} &middot; max {self.max_act:.3g} '
                 f'&middot; mean when active {self.mean_act:.3g}</p>', _histogram_svg(self.hist_edges,
                                                                                       self.hist_counts)]
        if self.lens_pos or self.lens_neg:
            parts.append(f'<div class="lens"><b>{_e(self.lens_title)}</b>'
                         f'<div>promotes: {_token_list(self.lens_pos)}</div>'
                         f'<div>suppresses: {_token_list(self.lens_neg)}</div></div>')
        parts.append("<h4>Top activations</h4>")
        parts += [_example_html(ex, self.max_act) for ex in self.top]
        for title, examples in self.quantiles:
            parts.append(f"<h4>{_e(title)}</h4>")
            parts += [_example_html(ex, self.max_act) for ex in examples]
        parts.append("</div>")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return f"<div class='saekit'>{STYLE}{self.html()}</div>"


def _token_list(items) -> str:
    return " ".join(f'<span class="tok">{_t(t)}</span><sub>{v:+.2f}</sub>' for t, v in items)


def _example_html(ex: Example, scale: float) -> str:
    spans = []
    for i, (tok, act) in enumerate(zip(ex.tokens, ex.acts)):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
        cls = "tok center" if i == ex.center else "tok"
        spans.append(f'<span class="{cls}" style="background:rgba(255,120,0,{alpha:.2f})" '
                     f'title="{act:.3g}">{_t(tok)}</span>')
    return f'<div class="ex"><span class="act">{ex.activation:.3g}</span>{"".join(spans)}</div>'


def _histogram_svg(edges: list[float], counts: list[int], width: int = 240, height: int = 50) -> str:
    if not counts or max(counts) == 0:
        return ""
    bar_w = width / len(counts)
    top = max(counts)
    bars = "".join(
        f'<rect x="{i * bar_w:.1f}" y="{height - height * c / top:.1f}" width="{bar_w * 0.9:.1f}" '
        f'height="{height * c / top:.1f}" fill="#4a7ab7"/>' for i, c in enumerate(counts))
    return (f'<svg class="hist" width="{width}" height="{height + 12}" role="img">{bars}'
            f'<text x="0" y="{height + 11}" font-size="9">{edges[0]:.2g}</text>'
            f'<text x="{width - 30}" y="{height + 11}" font-size="9">{edges[-1]:.2g}</text></svg>')


STYLE = """<style>
.saekit, body { font-family: system-ui, sans-serif; font-size: 14px; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.card h3 { margin: 2px 0; } .card h4 { margin: 8px 0 2px; font-size: 13px; color: #444; }
.meta { color: #555; margin: 2px 0; }
.ex { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; margin: 1px 0; }
.ex .act { display: inline-block; width: 4.5em; color: #888; }
.tok { border-radius: 2px; padding: 0 1px; } .tok.center { outline: 1px solid #c50; }
.lens { margin: 4px 0; font-size: 12px; } .lens sub { color: #888; margin-right: 6px; }
table.index { border-collapse: collapse; } table.index td, table.index th { padding: 2px 8px; }
table.index th { cursor: pointer; background: #eee; }
</style>"""

SORT_SCRIPT = """<script>
function sortBy(col, numeric) {
  const tbody = document.querySelector('table.index tbody');
  const rows = Array.from(tbody.rows);
  const dir = tbody.dataset.col == col && tbody.dataset.dir == 'desc' ? 'asc' : 'desc';
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    const c = numeric ? (parseFloat(x) - parseFloat(y)) : x.localeCompare(y);
    return dir == 'asc' ? c : -c;
  });
  rows.forEach(r => tbody.appendChild(r));
  tbody.dataset.col = col; tbody.dataset.dir = dir;
}
</script>"""


def index_html(cards: list[FeatureCard]) -> str:
    head = ('<table class="index"><thead><tr><th onclick="sortBy(0,true)">feature</th>'
            '<th onclick="sortBy(1,true)">density</th><th onclick="sortBy(2,true)">max act</th>'
            '<th onclick="sortBy(3,false)">top token</th></tr></thead><tbody>')
    rows = []
    for c in cards:
        top_tok = c.top[0].tokens[c.top[0].center] if c.top else ""
        rows.append(f'<tr><td data-v="{c.latent}"><a href="#f{c.latent}">{c.latent}</a></td>'
                    f'<td data-v="{c.density:.6g}">{c.density:.3%}</td>'
                    f'<td data-v="{c.max_act:.6g}">{c.max_act:.3g}</td>'
                    f'<td data-v="{_t(top_tok)}"><span class="tok">{_t(top_tok)}</span></td></tr>')
    return head + "".join(rows) + "</tbody></table>"


def anomaly_html(entries: list[dict]) -> str:
    """The worst-reconstructed tokens (from anomaly.worst_contexts), the token highlighted."""
    rows = []
    for e in entries:
        ctx = "".join(f'<span class="tok{" center" if i == e["index"] else ""}">{_t(t)}</span>'
                      for i, t in enumerate(e["context"]))
        rows.append(f'<div class="ex"><span class="act">{e["score"]:.3g}</span>{ctx}</div>')
    return "".join(rows)


def write_dashboard(cards: list[FeatureCard], path: str | Path, title: str, summary: dict,
                    sections: list[tuple[str, str]] = ()) -> Path:
    """One self-contained HTML file: summary, extra sections (already-escaped HTML), index, cards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>{STYLE}"
            f"{SORT_SCRIPT}</head><body><h1>{_e(title)}</h1><table>{summary_rows}</table>"
            + "".join(f"<h2>{_e(t)}</h2>{body}" for t, body in sections)
            + f"<h2>Features</h2>{index_html(cards)}<h2>Cards</h2>"
            + "\n".join(c.html() for c in cards) + "</body></html>")
    atomic_write(path, page)
    write_json(path.parent / "features.json",
               [{"latent": c.latent, "density": c.density, "max_act": c.max_act, "mean_act": c.mean_act,
                 "top_tokens": [ex.tokens[ex.center] for ex in c.top]} for c in cards], indent=1)
    return path
