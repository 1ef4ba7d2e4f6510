"""Time the TopK selection alone: torch.topk against saekit's two-stage selections on the same rows.

Each shape (B tokens, n latents, k) is one chunk of pre-activations as the TopK step selects from it
(``kernels.select_topk`` without the index sort). Methods are interleaved and summarized by their
median, so load from other processes hits all alike; ``two_stage`` uses 32 contiguous columns per
group (CUDA's default), ``strided`` the strided groups sized by ``kernels.strided_group`` (the CPU's
default). Every method's values are checked against torch.topk's before timing. The last line is
strided's speed-up over torch.topk at the first shape.

    python scripts/bench_topk.py [--device cpu|cuda] [--shapes 4096x6144x32,1024x1536x32,...] [--repeats 9]
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_train import sync  # the script beside this one (scripts/ is on the path when run)

from saekit.autoencoders.kernels import (TOPK_GROUP, keep_freed_memory, strided_group, strided_topk,
                                         two_stage_topk)

SHAPES = "4096x6144x32,4096x6144x64,512x6144x32,1024x1536x16,1024x1536x32,1024x1536x64,1024x1536x128," \
         "1024x24576x32,256x65536x64"


def methods(pre: torch.Tensor, k: int) -> dict:
    n = pre.shape[1]
    out = {"torch": lambda: pre.topk(k, dim=-1, sorted=False)}
    if n % TOPK_GROUP == 0 and k <= n // TOPK_GROUP:
        out["two_stage"] = lambda: two_stage_topk(pre, k, TOPK_GROUP)
    if group := strided_group(n, k):
        out[f"strided g{group}"] = lambda: strided_topk(pre, k, group)
    return out


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per call, calls of the methods interleaved."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated BxNxK")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does on CPU
    print(f"device {device} ({torch.get_num_threads()} threads); median ms per selection, interleaved")
    first = None
    for shape in args.shapes.split(","):
        B, n, k = (int(v) for v in shape.split("x"))
        pre = torch.randn(B, n, generator=torch.Generator().manual_seed(0)).to(device)
        fns = methods(pre, k)
        want = pre.topk(k, dim=-1).values.sort(-1).values
        for name, fn in fns.items():
            vals, idx = fn()
            assert torch.equal(vals.sort(-1).values, want) and torch.equal(pre.gather(1, idx), vals), name
        ms = timed(fns, args.repeats, device)
        cells = "  ".join(f"{name} {t:7.2f}" for name, t in ms.items())
        strided = next((t for name, t in ms.items() if name.startswith("strided")), float("nan"))
        print(f"B {B:5d} n {n:6d} k {k:4d}:  {cells}  (strided {ms['torch'] / strided:.2f}x torch.topk)")
        first = first if first is not None else ms["torch"] / strided
    print(f"ratio {first:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
