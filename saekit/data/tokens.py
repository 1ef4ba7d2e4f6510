"""Tokenize documents and pack them into fixed, well-formed windows.

A window is ``prefix + body + suffix``: the specials the tokenizer normally wraps one text in (``[CLS]``
... ``[SEP]`` for BERT, ``<s>`` for Llama-style, nothing for GPT-2), around ``context_size - len(prefix) -
len(suffix)`` body tokens cut from the stream ``doc_0 SEP doc_1 SEP ...``, where SEP is the tokenizer's
separator (``sep_token``, else ``eos_token``). The body stream runs across window boundaries, so no text
is lost except the tail that does not fill a last window. The output depends only on the texts, the
tokenizer and ``context_size``.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch

_DOCS_PER_CALL = 512  # documents per batched tokenizer call: big enough to use the fast tokenizer well
_PROBE = "hello world"


def wrapper_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special ids the tokenizer puts around a single text by default."""
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    start = 0
    while start < len(full) and full[start] in special:
        start += 1
    end = len(full)
    while end > start and full[end - 1] in special:
        end -= 1
    return list(full[:start]), list(full[end:])


def separator_id(tokenizer) -> int | None:
    """The id placed between documents: SEP for BERT-style tokenizers, else EOS (None if neither)."""
    for tid in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def tokenizer_meta(tokenizer) -> dict:
    """What a store's manifest records about the tokenizer."""
    prefix, suffix = wrapper_ids(tokenizer)
    return {
        "name": tokenizer.name_or_path,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "prefix_ids": prefix,
        "suffix_ids": suffix,
        "separator_id": separator_id(tokenizer),
        "pad_id": tokenizer.pad_token_id,
    }


def special_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Bool tensor, True where ``ids`` is one of the tokenizer's special ids."""
    specials = torch.tensor(sorted(tokenizer.all_special_ids), dtype=ids.dtype, device=ids.device)
    return torch.isin(ids, specials)


def kept_positions(tokenizer, ids: torch.Tensor, keep_special_tokens: bool) -> torch.Tensor:
    """Bool like ``ids``: the positions whose activations become rows (all, or all but special tokens)."""
    if keep_special_tokens:
        return torch.ones_like(ids, dtype=torch.bool)
    return ~special_mask(tokenizer, ids)


def iter_windows(tokenizer, texts: Iterable[str], context_size: int) -> Iterator[torch.Tensor]:
    """Yield packed windows, each a LongTensor[context_size] (see the module docstring)."""
    for block in _iter_window_blocks(tokenizer, texts, context_size):
        yield from block


def iter_window_batches(tokenizer, texts: Iterable[str], context_size: int, batch_size: int,
                        skip: int = 0) -> Iterator[torch.Tensor]:
    """Yield LongTensor[B, context_size] batches of windows (the last may be smaller).

    ``skip`` drops the first ``skip`` windows (a resumed harvest passes ``writer.sequences_done``); the
    texts are still tokenized, which is cheap next to the forward pass they save.
    """
    pending = torch.zeros(0, context_size, dtype=torch.long)
    for block in _iter_window_blocks(tokenizer, texts, context_size):
        if skip:
            drop = min(skip, len(block))
            block, skip = block[drop:], skip - drop
        pending = torch.cat([pending, block])
        n_full = len(pending) // batch_size
        for i in range(n_full):
            yield pending[i * batch_size:(i + 1) * batch_size]
        pending = pending[n_full * batch_size:]
    if len(pending):
        yield pending


def _iter_window_blocks(tokenizer, texts: Iterable[str], context_size: int) -> Iterator[torch.Tensor]:
    """LongTensor[n, context_size] blocks of consecutive windows, one block per tokenizer call."""
    prefix, suffix = wrapper_ids(tokenizer)
    body = context_size - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"context_size {context_size} leaves no room for text between "
                         f"{len(prefix)} prefix and {len(suffix)} suffix special tokens")
    sep = separator_id(tokenizer)
    sep_list = [] if sep is None else [sep]
    prefix_t = torch.tensor(prefix, dtype=torch.long)
    suffix_t = torch.tensor(suffix, dtype=torch.long)
    carry = np.zeros(0, dtype=np.int64)  # body tokens that did not fill a window yet
    it = iter(texts)
    while docs := list(itertools.islice(it, _DOCS_PER_CALL)):
        # verbose=False: long documents are fine here, they get cut into windows below.
        encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
        stream = np.fromiter(itertools.chain.from_iterable(ids + sep_list for ids in encoded),
                             dtype=np.int64)
        stream = np.concatenate([carry, stream])
        n = len(stream) // body
        carry = stream[n * body:]
        if n == 0:
            continue
        bodies = torch.from_numpy(stream[: n * body]).view(n, body)
        yield torch.cat([prefix_t.expand(n, -1), bodies, suffix_t.expand(n, -1)], dim=1)


def continuation_prefix(tokenizer) -> str | None:
    """The WordPiece continuation prefix (``##``), or None for a tokenizer that does not use one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if model is not None and type(model).__name__ == "WordPiece":
        return model.continuing_subword_prefix
    return None
