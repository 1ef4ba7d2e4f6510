"""Representation quality: a linear probe on a model's codes against one on the raw activations.

The property needs no labels beyond the tokenizer: does a token continue a word?

* WordPiece (BERT): the token carries the continuation prefix (``##``).
* Everything else (byte-level BPE, SentencePiece, word-level): the token's decoded text starts with a
  letter or digit (no leading space -- ``Ġ``/``▁`` in the vocabulary --, newline or punctuation) and the
  token before it in the window is a real (non-special) token ending in a letter or digit. "ing" after "Ġplay" continues; "Ġthe" does not.

The probe is logistic regression trained with Adam on standardized features (a few hundred full-batch
steps, no closed form), on the first part of the held-out rows and scored on the rest: contiguous
rows, so train and test mostly come from different windows.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from saekit.data.tokens import continuation_prefix
from saekit.errors import UserError


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocab_tables(tokenizer) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per vocabulary id: has the WordPiece prefix, starts with a word character, ends with one, special.

    "Starts/ends" look at the token's decoded text (byte-level BPE spells a leading space 'Ġ', itself a
    letter) and treat a SentencePiece '▁' as a leading space (decoding a lone token may drop it)."""
    if tokenizer in _TABLES:
        return _TABLES[tokenizer]
    n = len(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(n)))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    prefix = continuation_prefix(tokenizer)
    pieces = [bool(prefix) and s is not None and s.startswith(prefix) and len(s) > len(prefix)
              for s in strings]
    starts = [t[:1].isalnum() and not (s or "").startswith("▁") for s, t in zip(strings, texts)]
    ends = [t[-1:].isalnum() for t in texts]
    special = torch.zeros(n, dtype=torch.bool)
    special[[i for i in tokenizer.all_special_ids if i < n]] = True
    _TABLES[tokenizer] = tables = (torch.tensor(pieces), torch.tensor(starts), torch.tensor(ends), special)
    return tables


def continues_word(tokenizer, ids_BT: Tensor) -> Tensor:
    """Bool [B, T]: whether each token of these windows continues the word before it (see above)."""
    pieces, starts, ends, special = _vocab_tables(tokenizer)
    ids_BT = ids_BT.long().cpu()
    if continuation_prefix(tokenizer) is not None:
        return pieces[ids_BT]
    prev_ok = torch.zeros_like(ids_BT, dtype=torch.bool)
    prev = ids_BT[:, :-1]
    prev_ok[:, 1:] = ends[prev] & ~special[prev]
    return starts[ids_BT] & ~special[ids_BT] & prev_ok


def probe_labels(reader, rows: tuple[int, int], tokenizer) -> Tensor:
    """Bool [n]: the continuation label of every store row in [start, stop)."""
    seq, pos, _ = reader.token_info(rows)
    uniq, inverse = torch.unique(seq, return_inverse=True)
    windows = torch.stack([reader.sequence(int(s)) for s in uniq])
    return continues_word(tokenizer, windows)[inverse, pos]


def train_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, steps: int = 300,
                lr: float = 0.02, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Logistic regression with Adam; returns held-out accuracy, the majority-class rate ("chance") and
    the balanced accuracy (mean of the per-class recalls)."""
    x_train, x_test = x_train.float(), x_test.float()
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    y_train, y_test = y_train.float().to(x_train.device), y_test.bool().to(x_test.device)
    gen = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(x_train.shape[1], generator=gen)).to(x_train.device).requires_grad_()
    b = torch.zeros((), device=x_train.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (x_test @ w + b) > 0
        train_acc = (((x_train @ w + b) > 0) == y_train.bool()).float().mean().item()
    pos_rate = y_test.float().mean().item()
    recalls = [(pred[y_test == c] == c).float().mean().item() for c in (True, False) if (y_test == c).any()]
    return {"accuracy": (pred == y_test).float().mean().item(), "train_accuracy": train_acc,
            "chance": max(pos_rate, 1 - pos_rate), "balanced_accuracy": sum(recalls) / len(recalls),
            "positive_rate": pos_rate, "train_tokens": len(y_train), "test_tokens": len(y_test)}


@torch.no_grad()
def codes(model, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Dense codes [n, n_latents] of raw activations x."""
    model.eval()
    return torch.cat([model(c).dense_code(model.n_latents) for c in x.split(batch_size)])


def probe_run(model, reader, hook: str, rows: tuple[int, int], n_tokens: int = 6000, device="cpu",
              tokenizer=None, train_fraction: float = 2 / 3, steps: int = 300) -> dict:
    """Probe the codes and the raw activations of the first ``n_tokens`` rows of ``rows``."""
    if tokenizer is None:
        from saekit.lm import load_manifest_tokenizer

        tokenizer = load_manifest_tokenizer(reader.manifest)
    rows = (rows[0], min(rows[1], rows[0] + n_tokens))
    y = probe_labels(reader, rows, tokenizer)
    x = reader.activations(hook, rows, dtype=torch.float32).to(device)
    cut = int(len(y) * train_fraction)
    if cut < 2 or len(y) - cut < 2:
        raise UserError(f"too few rows ({len(y)}) for a probe; raise probe_tokens or heldout_tokens")
    code = codes(model, x)
    on_code = train_probe(code[:cut], y[:cut], code[cut:], y[cut:], steps=steps)
    on_raw = train_probe(x[:cut], y[:cut], x[cut:], y[cut:], steps=steps)
    return {"property": "continues_word", "accuracy": on_code["accuracy"],
            "accuracy_raw": on_raw["accuracy"], "chance": on_code["chance"],
            "balanced_accuracy": on_code["balanced_accuracy"],
            "balanced_accuracy_raw": on_raw["balanced_accuracy"], "code": on_code, "raw": on_raw}
