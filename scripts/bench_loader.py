"""How fast does ActivationLoader turn a store on disk into shuffled float32 training batches?

Creates a synthetic store (d=384 float32, ~1M rows, in a temporary directory) unless --store is given,
then times the loader over a few epochs from a fresh StoreReader (so the first epoch includes checking
every shard's sha256). The reference is the CPU TopK training step rate, about 6000 tok/s (TARGETS.md:
d=384, 6144 latents, k=32 on 2 cores); the goal is a loader at least 10x faster than that.

    python scripts/bench_loader.py [--store DIR] [--rows 1000000] [--epochs 2] [--batch-size 4096]

On a GPU, the batches delivered into device memory against the H100 goal step rate at GPT-2 shape:

    python scripts/bench_loader.py --device cuda --d 768 --dtype bfloat16 --rows 2000000 \
        --reference-tok-s 2.5e6 --goal 1.0
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch

from saekit.data.loader import ActivationLoader
from saekit.data.store import StoreReader, StoreWriter

REFERENCE_TOK_S = 6000.0  # CPU TopK SAE training step, d=384 (TARGETS.md, sparsify on MiniLM acts)
GOAL = 10.0


def make_store(path: str, rows: int, d: int, ctx: int = 128, dtype: str = "float32") -> None:
    """Windows of ``ctx`` tokens with the first and last position (CLS/SEP) excluded, as a harvest would."""
    per_seq = ctx - 2
    n_seq = -(-rows // per_seq)
    keep = torch.ones(256, ctx, dtype=torch.bool)
    keep[:, [0, -1]] = False
    g = torch.Generator().manual_seed(0)
    writer = StoreWriter(path, {"model": "synthetic", "context_size": ctx}, {"bench": True}, ["acts"], d,
                         dtype, shard_sequences=256, max_rows=rows)
    for s in range(0, n_seq, 256):
        n = min(256, n_seq - s)
        tokens = torch.randint(1000, 30000, (n, ctx), generator=g)
        writer.add(tokens, keep[:n], {"acts": torch.randn(n, ctx, d, generator=g)})
    writer.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="existing store directory (default: make a synthetic one)")
    ap.add_argument("--hook", help="hook to read (default: the store's first)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=262_144)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default=None, help="deliver batches to this device (cuda: pinned, side-stream copies)")
    ap.add_argument("--reference-tok-s", type=float, default=REFERENCE_TOK_S,
                    help="the training step rate the loader must outpace (GPU: e.g. 2.5e6)")
    ap.add_argument("--goal", type=float, default=GOAL, help="required loader rate / reference rate")
    ap.add_argument("--dtype", default="float32", help="store dtype of the synthetic store (float32, bfloat16)")
    args = ap.parse_args()

    tmp = None
    path = args.store
    if path is None:
        tmp = tempfile.mkdtemp(prefix="saekit-bench-store-")
        path = tmp
        t0 = time.perf_counter()
        make_store(path, args.rows, args.d, dtype=args.dtype)
        print(f"made synthetic store: {args.rows} rows x {args.d} {args.dtype} in {time.perf_counter() - t0:.1f}s")
    try:
        reader = StoreReader(path)
        hook = args.hook or reader.hooks[0]
        t0 = time.perf_counter()
        loader = ActivationLoader(reader, hook, args.batch_size, buffer_tokens=args.buffer_tokens,
                                  epochs=args.epochs, device=args.device)
        per_epoch, epoch_times, rows, checksum = loader.batches_per_epoch, [], 0, 0.0
        sync = torch.cuda.synchronize if args.device and args.device.startswith("cuda") else (lambda: None)
        t_epoch = t0
        for i, batch in enumerate(loader):
            rows += len(batch)
            checksum = checksum + batch[0, 0]  # touch every batch (no per-batch device sync)
            if (i + 1) % per_epoch == 0:
                sync()
                now = time.perf_counter()
                epoch_times.append(now - t_epoch)
                t_epoch = now
        sync()
        total = time.perf_counter() - t0
        rate = rows / total
        rows_per_epoch = per_epoch * args.batch_size
        result = {
            "store": path if tmp is None else "synthetic", "hook": hook, "d_model": reader.d_model,
            "dtype": reader.manifest["dtype"], "device": args.device or "cpu", "store_rows": reader.n_rows, "shards": len(reader.shards),
            "batch_size": args.batch_size, "buffer_tokens": args.buffer_tokens, "epochs": args.epochs,
            "rows_served": rows, "seconds": round(total, 3), "tok_per_s": round(rate),
            "epoch_tok_per_s": [round(rows_per_epoch / t) for t in epoch_times],
            "reference_train_tok_per_s": args.reference_tok_s, "ratio": round(rate / args.reference_tok_s, 2),
        }
        print(json.dumps(result))
        print("(epoch 0 includes opening and sha256-checking every shard; the store was just written or "
              "is otherwise likely in the page cache)")
        print(f"ratio {rate / args.reference_tok_s:.2f} (goal >= {args.goal:.1f}; loader tok/s / "
              f"{args.reference_tok_s:.0f} tok/s training step)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
