"""Top-activation pass (store read + encode + streaming statistics) against the encoder forward alone.

    python scripts/bench_analyze.py                          # synthetic store, random TopK SAE
    python scripts/bench_analyze.py --run runs/demo/topk     # a trained run and its store

Both are timed over the same tokens in the same run; ends with `ratio X (goal >= 0.7)`.
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

from saekit.analysis.report import FeatureReport, run_paths  # noqa: E402
from saekit.autoencoders import Autoencoder, TopKConfig, build  # noqa: E402
from saekit.config import TrainConfig  # noqa: E402
from saekit.files import write_json  # noqa: E402
from saekit.schema import to_dict  # noqa: E402
from saekit.data.store import StoreReader, StoreWriter  # noqa: E402

HOOK = "blocks.3.hook_resid_post"


def synthetic_run(root: Path, rows: int, d: int, n: int, k: int) -> Path:
    """A store of random activations and a random TopK SAE saved as a run directory."""
    g = torch.Generator().manual_seed(0)
    ctx, per_shard = 128, 64
    with StoreWriter(root / "store", meta={"model": "synthetic"}, config={"bench": True}, hooks=[HOOK],
                     d_model=d, shard_sequences=per_shard, context_size=ctx) as w:
        for _ in range(0, rows, ctx * per_shard):
            tokens = torch.randint(1000, 2000, (per_shard, ctx), generator=g)
            acts = torch.randn(per_shard, ctx, d, generator=g)
            w.add(tokens, torch.ones(per_shard, ctx, dtype=torch.bool), {HOOK: acts})
        w.finish()
    model = build(TopKConfig(n_latents=n, k=k), d)
    run = root / "run"
    model.save(run / "model")
    cfg = TrainConfig(out=str(run))
    cfg.data.store, cfg.data.hook = str(root / "store"), HOOK
    write_json(run / "config.json", to_dict(cfg))
    return run


def encoder_rate(model: Autoencoder, x_batches: list[torch.Tensor]) -> float:
    encode = getattr(model, "encode_sparse", model.encode)
    with torch.inference_mode():
        encode(x_batches[0])
        t = time.perf_counter()
        for x in x_batches:
            encode(x)
        return sum(len(x) for x in x_batches) / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--n", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_analyze_"))
    try:
        run = Path(a.run) if a.run else synthetic_run(tmp, a.tokens, a.d, a.n, a.k)
        model_dir, store_dir, hook = run_paths(run)
        model = Autoencoder.load(model_dir).eval()
        reader = StoreReader(store_dir)
        n = min(a.tokens, reader.n_rows)
        x_batches = [reader.activations(hook, rows=(i, min(n, i + a.batch))) for i in range(0, n, a.batch)]
        enc, full = [], []
        for _ in range(2):  # alternate so machine noise hits both
            enc.append(encoder_rate(model, x_batches))
            t = time.perf_counter()
            FeatureReport.build(run, max_tokens=n, batch_tokens=a.batch, device="cpu", progress=False)
            full.append(n / (time.perf_counter() - t))
        print(json.dumps({"tokens": n, "n_latents": model.n_latents, "encoder_tok_s": round(max(enc)),
                          "top_activation_pass_tok_s": round(max(full))}))
        print(f"ratio {max(full) / max(enc):.2f} (goal >= 0.7)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
