"""Automated interpretability without an LLM: explain a latent by the tokens it fires on, then score the
explanation by detection on held-out text (after SAEBench's ``autointerp``, with a rule in place of the
LLM judge).

* **Data.** The store's held-out rows, split at a window boundary: the first half explains, the second
  scores. One encoder pass keeps every nonzero code entry. ``latents`` are sampled among those that fire
  at least ``MIN_FIRES`` times in each half.
* **Explanation.** From the latent's ``TOP_EXPLAIN`` top-activating rows of the first half. The default,
  ``TokenSetExplainer``, needs nothing: its candidates are the token at each top row and the bigram
  ending there; greedily it takes the candidate that adds the most top rows covered, weighted by its
  precision on the whole first half (how often the latent fires where the n-gram occurs), until 90% are
  covered or it holds ``MAX_NGRAMS``. ``ChatExplainer`` asks an OpenAI-compatible chat endpoint instead
  (base URL and model from the config, key from an environment variable) for a comma-separated list of
  tokens or short phrases, shown the top contexts with the firing token marked ``<<like this>>``; each
  phrase is tokenized into an n-gram. Either way an explanation is a set of token n-grams.
* **Detection score.** A context is the ``context_tokens`` tokens either side of a row (within its
  window). Scored are the ``TOP_SCORE`` top-activating contexts of the second half (no two overlapping)
  and ``RANDOM_SCORE`` random ones. A context's truth: the latent fires in it (above
  ``THRESHOLD_FRAC`` of its largest activation in the first half); the prediction: one of the
  explanation's n-grams occurs in it. The score is the balanced accuracy (mean of the recalls of firing
  and silent contexts), so 1 is perfect detection and 0.5 is chance; the overall score is the mean over
  the latents (and its standard deviation).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saekit.errors import ConfigError, UserError

MIN_FIRES = 5
TOP_EXPLAIN = 20
TOP_SCORE = 20
RANDOM_SCORE = 20
MAX_NGRAMS = 5
COVERAGE = 0.9
THRESHOLD_FRAC = 0.01
MARK = ("<<", ">>")


@dataclass
class Explanation:
    text: str
    ngrams: list[tuple[int, ...]] = field(default_factory=list)  # token-id sequences


@dataclass
class Rows:
    """Token rows of the store in order: token id, window index and position of each."""

    token: Tensor
    seq: Tensor
    pos: Tensor

    def __len__(self) -> int:
        return len(self.token)

    def shifted(self, k: int) -> Tensor:
        """Token id k >= 1 rows earlier in the same window, -1 where there is none."""
        out = torch.full_like(self.token, -1)
        if 0 < k < len(self.token):
            same = self.seq[k:] == self.seq[:-k]
            out[k:] = torch.where(same, self.token[:-k], out[k:])
        return out


def ngram_ends(rows: Rows, ngram: tuple[int, ...]) -> Tensor:
    """Bool [n]: the n-gram ends at this row (all of it in the row's window)."""
    hit = rows.token == ngram[-1]
    for k in range(1, len(ngram)):
        hit &= rows.shifted(k) == ngram[-1 - k]
    return hit


def window_any(flag: Tensor, rows: Rows, width: int) -> Tensor:
    """Bool [n]: ``flag`` holds somewhere within ``width`` rows either side, in the same window."""
    c = torch.cat([torch.zeros(1, dtype=torch.long), flag.long().cumsum(0)])
    idx = torch.arange(len(flag))
    starts = torch.searchsorted(rows.seq, rows.seq, side="left")
    ends = torch.searchsorted(rows.seq, rows.seq, side="right")
    lo = torch.maximum(idx - width, starts)
    hi = torch.minimum(idx + width + 1, ends)
    return (c[hi] - c[lo]) > 0


# ----------------------------------------------------------------------------------- explainers
class TokenSetExplainer:
    """The offline default: the n-grams (token, or previous token + token) at the top rows (above)."""

    name = "tokens"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def explain(self, acts: Tensor, rows: Rows, top: Tensor, fires: Tensor) -> Explanation:
        prev = rows.shifted(1)
        cands: dict[tuple[int, ...], Tensor] = {}
        for r in top.tolist():
            cands.setdefault((int(rows.token[r]),), None)
            if prev[r] >= 0:
                cands.setdefault((int(prev[r]), int(rows.token[r])), None)
        scored = []
        for gram in cands:
            where = ngram_ends(rows, gram)
            precision = (where & fires).sum().item() / max(1, where.sum().item())
            scored.append((gram, where[top], precision))
        covered = torch.zeros(len(top), dtype=torch.bool)
        chosen: list[tuple[int, ...]] = []
        while len(chosen) < MAX_NGRAMS and covered.float().mean() < COVERAGE:
            best = max(scored, key=lambda s: ((s[1] & ~covered).sum().item() * s[2], -len(s[0])))
            if not (best[1] & ~covered).any():
                break
            chosen.append(best[0])
            covered |= best[1]
        text = ", ".join(repr(self.tokenizer.decode(list(g)).strip()) for g in chosen)
        return Explanation(text=text, ngrams=chosen)


class ChatExplainer:
    """An OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``)."""

    name = "openai"

    def __init__(self, tokenizer, base_url: str, model: str, api_key_env: str, timeout_s: float = 60.0):
        key = os.environ.get(api_key_env, "")
        if not key:
            raise ConfigError(f"interp_explainer openai reads its API key from ${api_key_env}, which is not "
                              f"set; export {api_key_env}=KEY (any value for a local server), or set "
                              "interp_api_key_env to the variable that holds it")
        self.tokenizer, self.model, self.key, self.timeout_s = tokenizer, model, key, timeout_s
        self.url = base_url.rstrip("/") + "/chat/completions"

    def explain(self, acts: Tensor, rows: Rows, top: Tensor, fires: Tensor, width: int = 8) -> Explanation:
        lines = []
        for i, r in enumerate(top.tolist(), start=1):
            same = (rows.seq == rows.seq[r]).nonzero().flatten()
            lo, hi = max(int(same[0]), r - width), min(int(same[-1]), r + width)
            pieces = []
            for j in range(lo, hi + 1):
                text = self.tokenizer.decode([int(rows.token[j])]).strip()
                pieces.append(f"{MARK[0]}{text}{MARK[1]}" if fires[j] else text)
            lines.append(f"{i}. {' '.join(pieces)}")
        prompt = ("Each line is a text excerpt on which one feature of a neural network is active; the tokens "
                  f"it is active on are marked {MARK[0]}like this{MARK[1]}.\n\n" + "\n".join(lines) +
                  f"\n\nReply with at most {MAX_NGRAMS} tokens or short phrases, comma-separated on one line, "
                  "whose presence makes this feature fire. Reply with nothing else.")
        reply = self.complete([{"role": "system", "content": "You explain features of language models."},
                               {"role": "user", "content": prompt}])
        phrases = [p.strip().strip("'\"`*-•").replace(MARK[0], "").replace(MARK[1], "").strip()
                   for p in reply.replace("\n", ",").split(",")]
        ngrams = []
        for phrase in [p for p in phrases if p][:MAX_NGRAMS]:
            ids = self.tokenizer(phrase, add_special_tokens=False)["input_ids"][:4]
            if ids:
                ngrams.append(tuple(ids))
        return Explanation(text=reply.strip(), ngrams=ngrams)

    def complete(self, messages: list[dict]) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": 60}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace")
            raise UserError(f"explainer endpoint {self.url} answered HTTP {err.code} ({detail}); check "
                            "interp_base_url, interp_model and the key") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(f"explainer endpoint {self.url} is unreachable ({reason}); start the server "
                            "or set interp_base_url") from None
        except json.JSONDecodeError:
            raise UserError(f"explainer endpoint {self.url} did not answer JSON; is interp_base_url an "
                            "OpenAI-compatible API (ending in /v1)?") from None
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"explainer endpoint {self.url} answered without choices[0].message.content; is "
                            "it an OpenAI-compatible chat-completions API?") from None


def make_explainer(cfg, tokenizer):
    if cfg.interp_explainer == "openai":
        return ChatExplainer(tokenizer, cfg.interp_base_url, cfg.interp_model, cfg.interp_api_key_env)
    return TokenSetExplainer(tokenizer)


# ------------------------------------------------------------------------------------- scoring
def detection_score(acts: Tensor, rows: Rows, explanation: Explanation, threshold: float, width: int,
                    gen: torch.Generator) -> float | None:
    """Balanced accuracy of "an explanation n-gram occurs in the context" for "the latent fires in it",
    over the top contexts and random ones (module docstring); None without both kinds of context."""
    fires = acts > threshold
    fired = window_any(fires, rows, width)
    present = torch.zeros(len(rows), dtype=torch.bool)
    for gram in explanation.ngrams:
        present |= ngram_ends(rows, gram)
    present = window_any(present, rows, width)
    centers, blocked = [], torch.zeros(len(rows), dtype=torch.bool)
    for r in acts.argsort(descending=True).tolist():
        if len(centers) == TOP_SCORE or acts[r] <= threshold:
            break
        if not blocked[r]:
            centers.append(r)
            near = (rows.seq == rows.seq[r]) & ((torch.arange(len(rows)) - r).abs() <= 2 * width)
            blocked |= near
    randoms = torch.randint(len(rows), (RANDOM_SCORE,), generator=gen).tolist()
    idx = torch.tensor(centers + randoms)
    truth, pred = fired[idx], present[idx]
    if truth.all() or not truth.any():
        return None
    return 0.5 * ((pred[truth]).float().mean().item() + (~pred[~truth]).float().mean().item())


def interpret_latents(acts_gen: Tensor, rows_gen: Rows, acts_score: Tensor, rows_score: Rows, explainer,
                      width: int, seed: int = 0, latent_ids: list[int] | None = None, progress: bool = False
                      ) -> dict:
    """Explain and score each column of ``acts_gen`` [n_gen, L] / ``acts_score`` [n_score, L]."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    details = []
    for j in tqdm(range(acts_gen.shape[1]), desc="interp latents", disable=not progress, leave=False):
        a_gen, a_score = acts_gen[:, j], acts_score[:, j]
        threshold = THRESHOLD_FRAC * a_gen.max().item()
        fires = a_gen > threshold
        top = a_gen.argsort(descending=True)[:min(TOP_EXPLAIN, int(fires.sum()))]
        explanation = explainer.explain(a_gen, rows_gen, top, fires)
        score = detection_score(a_score, rows_score, explanation, threshold, width, gen)
        details.append({"latent": latent_ids[j] if latent_ids else j, "explanation": explanation.text,
                        "score": score, "fires_explain": int(fires.sum()),
                        "fires_score": int((a_score > threshold).sum())})
    scores = [d["score"] for d in details if d["score"] is not None]
    return {"latents": details, "autointerp_score": statistics.mean(scores) if scores else None,
            "autointerp_std_dev": statistics.stdev(scores) if len(scores) > 1 else None,
            "latents_scored": len(scores), "explainer": explainer.name}


# ---------------------------------------------------------------------------------------- the run
@torch.no_grad()
def interp_eval(model, reader, hook: str, rows: tuple[int, int], cfg, tokenizer, progress: bool = False,
                batch: int = 4096) -> dict:
    """Sample ``cfg.interp_latents`` latents and explain and score each on the held-out ``rows``."""
    from tqdm.auto import tqdm

    explainer = make_explainer(cfg, tokenizer)  # a missing key fails before the pass
    seq, pos, tok = reader.token_info(rows)
    # split at the first window boundary after the middle
    mid = len(seq) // 2
    while 0 < mid < len(seq) and seq[mid] == seq[mid - 1]:
        mid += 1
    r_idx, c_idx, vals = [], [], []
    for a in tqdm(range(*rows, batch), desc="interp pass", unit="batch", disable=not progress, leave=False):
        span = (a, min(rows[1], a + batch))
        code = model.encode(reader.activations(hook, span, dtype=torch.float32).to(model.device)).float().cpu()
        nz = (code > 0).nonzero()  # latents fire when positive (PCA-like signed codes: their positive side)
        r_idx.append(nz[:, 0] + (a - rows[0]))
        c_idx.append(nz[:, 1])
        vals.append(code[nz[:, 0], nz[:, 1]])
    r_idx, c_idx, vals = torch.cat(r_idx), torch.cat(c_idx), torch.cat(vals)
    n_lat = model.n_latents
    first = r_idx < mid
    fires_gen = torch.bincount(c_idx[first], minlength=n_lat)
    fires_score = torch.bincount(c_idx[~first], minlength=n_lat)
    eligible = ((fires_gen >= MIN_FIRES) & (fires_score >= MIN_FIRES)).nonzero().flatten()
    g = torch.Generator().manual_seed(cfg.seed)
    chosen = eligible[torch.randperm(len(eligible), generator=g)[:cfg.interp_latents]].sort().values
    slot = torch.full((n_lat,), -1, dtype=torch.long)
    slot[chosen] = torch.arange(len(chosen))
    keep = slot[c_idx] >= 0
    dense = torch.zeros(len(seq), len(chosen))
    dense[r_idx[keep], slot[c_idx[keep]]] = vals[keep]
    gen_rows = Rows(tok[:mid], seq[:mid], pos[:mid])
    score_rows = Rows(tok[mid:], seq[mid:], pos[mid:])
    result = interpret_latents(dense[:mid], gen_rows, dense[mid:], score_rows, explainer,
                               cfg.interp_context_tokens, seed=cfg.seed, latent_ids=chosen.tolist(),
                               progress=progress)
    result.update(latents_eligible=len(eligible), latents_sampled=len(chosen), rows=list(rows),
                  explain_rows=mid, score_rows=len(seq) - mid, context_tokens=cfg.interp_context_tokens)
    return result
