"""Train a small GPT-2-style causal LM on the built-in corpus and save it in HuggingFace format.

    python scripts/train_tiny_lm.py --out runs/tiny-gpt2 --minutes 5

The saved folder loads through exactly the path a user's `gpt2` takes (`saekit harvest --model
runs/tiny-gpt2`), so CE loss recovered can be shown offline. The tokenizer is a byte-level BPE trained
here on the same corpus. The last 5% of packed windows are held out and their loss is printed.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.data.text import iter_texts  # noqa: E402
from saekit.data.tokens import iter_windows  # noqa: E402

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[EOS], show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             model_max_length=1024)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tiny-gpt2")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: only the time budget)")
    p.add_argument("--max-windows", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = list(iter_texts("builtin:stdlib-docstrings"))
    tok = train_tokenizer(texts, a.vocab)
    windows = torch.stack(list(itertools.islice(iter_windows(tok, iter(texts), a.ctx), a.max_windows)))
    n_val = max(a.batch, len(windows) // 20)
    train, val = windows[:-n_val], windows[-n_val:]
    print(f"{len(texts)} documents, {windows.numel():,} tokens in {len(windows)} windows; {n_val} held out")

    cfg = GPT2Config(vocab_size=len(tok), n_positions=max(a.ctx, 128), n_embd=a.d, n_layer=a.layers,
                     n_head=a.heads, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget = a.minutes * 60
    start, step, seen = time.time(), 0, 0
    g = torch.Generator().manual_seed(a.seed)
    while (elapsed := time.time() - start) < budget and not (a.steps and step >= a.steps):
        # Cosine decay on wall-clock (or step) progress, whichever ends first, so the run ends cooled
        # down whatever the machine speed.
        progress = max(elapsed / budget, step / a.steps if a.steps else 0.0)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        batch = train[torch.randint(len(train), (a.batch,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + batch.numel()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({seen / elapsed:,.0f} tok/s)", flush=True)
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(input_ids=b, labels=b).loss.item() for b in val.split(a.batch)) / math.ceil(
            len(val) / a.batch)
    print(f"trained {step} steps, {seen:,} tokens; held-out loss {val_loss:.3f} nats/token")
    out = Path(a.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
