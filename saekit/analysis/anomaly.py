"""Anomaly scores: per-token reconstruction error, and the contexts a model reconstructs worst.

A token's score is its squared reconstruction error ‖x − x̂‖² in raw activation units
(``metrics.token_sq_error``, so the mean of the scores over tokens is metrics.py's MSE); ``relative`` divides it by ‖x − x̄‖², x̄ the mean over the
scored tokens (so the scores sum to FVU times the number of tokens). Any trained model works: sparse,
classical or RBM. A transcoder's score is its prediction's error against the target hook's row
(``target_hook``).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from saekit.lm import load_manifest_tokenizer
from saekit.metrics import token_sq_error


@torch.no_grad()
def token_scores(model, x: Tensor, target: Tensor | None = None) -> Tensor:
    """[B] squared reconstruction error of each row of raw activations ``x`` (a transcoder's: of its
    prediction against ``target``)."""
    model.eval()
    return token_sq_error((x if target is None else target).float(), model(x).x_hat.float())


@torch.no_grad()
def worst_contexts(model, store, hook: str | None = None, top: int = 20,
                   rows: tuple[int, int] | None = None, left: int = 8, right: int = 4,
                   tokenizer=None, relative: bool = False, batch_size: int = 4096,
                   device="cpu", target_hook: str | None = None) -> list[dict]:
    """The ``top`` store rows in ``rows`` (default: all) with the largest error, worst first.

    Each entry: ``row``, ``sequence``, ``position``, ``score``, ``token`` (decoded), ``ids`` and
    ``context`` (the token ids around it, clipped to its window, and each decoded alone), ``index`` (where the token sits in ``context``) and
    ``text`` (the context joined, the token marked ``[[like this]]``)."""
    from saekit.data.store import StoreReader

    reader = store if isinstance(store, StoreReader) else StoreReader(os.fspath(store))
    hook = hook or reader.hooks[0]
    start, stop = rows if rows is not None else (0, reader.n_rows)
    model = model.to(device).eval()
    spans = [(a, min(stop, a + batch_size)) for a in range(start, stop, batch_size)]
    scored = target_hook or hook  # the rows the error is measured against
    mean = None
    if relative:  # a first pass for x̄, the mean over the scored rows
        total = sum(reader.activations(scored, span, dtype=torch.float64).sum(0) for span in spans)
        mean = total / max(stop - start, 1)
    best_s, best_r = torch.empty(0), torch.empty(0, dtype=torch.long)
    for a, b in spans:
        x = reader.activations(hook, (a, b), dtype=torch.float32).to(device)
        y = reader.activations(target_hook, (a, b), dtype=torch.float32).to(device) if target_hook else x
        s = token_scores(model, x, y).cpu()
        if relative:
            s = (s.double() / (y.cpu().double() - mean).square().sum(-1).clamp_min(1e-30)).float()
        order = torch.cat([best_s, s]).argsort(descending=True, stable=True)[:top]
        best_s, best_r = torch.cat([best_s, s])[order], torch.cat([best_r, torch.arange(a, b)])[order]
    tokenizer = tokenizer or load_manifest_tokenizer(reader.manifest)
    seq, pos, tok = reader.token_info(best_r)
    out = []
    for r, sc, q, p, t in zip(best_r.tolist(), best_s.tolist(), seq.tolist(), pos.tolist(), tok.tolist()):
        ids, index = reader.context(q, p, left, right)
        pieces = [tokenizer.decode([i]) for i in ids]
        out.append({"row": r, "sequence": q, "position": p, "score": sc, "token": tokenizer.decode([t]),
                    "ids": ids, "context": pieces, "index": index, "text": mark_context(tokenizer, ids, index)})
    return out


def mark_context(tokenizer, ids: list[int], index: int) -> str:
    """The decoded context with the token at ``index`` shown as ``[[token]]``."""
    from saekit.data.tokens import continuation_prefix

    left, right = tokenizer.decode(ids[:index]), tokenizer.decode(ids[index + 1:])
    mid = tokenizer.decode(ids[index:index + 1])
    prefix = continuation_prefix(tokenizer)
    if prefix is None:  # byte-level / SentencePiece decoding keeps the spaces inside the tokens
        return f"{left}[[{mid}]]{right}"
    glue_left = "" if mid.startswith(prefix) or not left else " "
    mid = mid[len(prefix):] if mid.startswith(prefix) else mid
    next_piece = tokenizer.convert_ids_to_tokens(ids[index + 1:index + 2])
    glued = bool(next_piece) and next_piece[0].startswith(prefix)
    if glued and right.startswith(prefix):
        right = right[len(prefix):]
    glue_right = "" if not right or glued else " "
    return f"{left}{glue_left}[[{mid}]]{glue_right}{right}"
