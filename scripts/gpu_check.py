"""The one prepared device check for a lent GPU: correctness against the CPU path, then throughput.

    python scripts/gpu_check.py                 # on the device machine (about 3-4 minutes on an H100)

1. Correctness: the fast TopK SAE on CUDA, with the torch and the triton backend of its sparse
   products and with chunked pre-activations, against the naive dense path computed on the CPU in
   float64, same weights and data: forward outputs and every gradient.
2. Throughput: `scripts/bench_train.py --device cuda` at the GPT-2-small and Gemma-2-2B shapes (fp32/tf32
   with the naive step, then bf16 autocast with the triton backend, torch.compile and torch.topk
   selection (the default on CUDA is two-stage) beside it, each
   with its peak memory), the top-k selections alone (scripts/bench_topk.py), the CUDA tests, the
   loader into GPU memory, then
   `scripts/bench_harvest.py --gpt2-shape` on the GPU.
Prints one short table; each benchmark keeps its own `ratio X (goal >= Y)` line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saekit.autoencoders.kernels import KernelOptions, SAEWeights, topk_sae_fast, topk_sae_naive  # noqa: E402


def _loss(r, x):
    loss = (r.xhat_BD - x).square().sum()
    return loss + (r.ehat_BD.square().sum() if r.ehat_BD is not None else 0)


def correctness(device="cuda", B=1024, d=256, n=4096, k=32, auxk_k=128, dead_frac=0.1) -> list[str]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    params = dict(b_dec=torch.randn(d, generator=g, dtype=torch.float64) * 0.1,
                  W_enc=torch.randn(d, n, generator=g, dtype=torch.float64) / d ** 0.5,
                  b_enc=torch.randn(n, generator=g, dtype=torch.float64) * 0.1,
                  W_dec=torch.randn(n, d, generator=g, dtype=torch.float64) / d ** 0.5)
    dead = torch.randperm(n, generator=g)[: int(dead_frac * n)].sort().values

    def run(fn, device, dtype, backend="torch", chunk=0):
        p = {name: t.detach().to(device, dtype, copy=True).requires_grad_() for name, t in params.items()}
        xs = x.to(device, dtype)
        w = SAEWeights(p["b_dec"], p["W_enc"], p["b_enc"], p["W_dec"])
        r = fn(xs, w, k, dead.to(device), auxk_k, KernelOptions(chunk_tokens=chunk, backend=backend))
        _loss(r, xs).backward()
        out = {"xhat": r.xhat_BD, "ehat": r.ehat_BD, **{f"grad {n_}": t.grad for n_, t in p.items()}}
        return {name: t.detach().double().cpu() for name, t in out.items()}

    ref = run(topk_sae_naive, "cpu", torch.float64)
    lines = []
    for backend, chunk in (("torch", 0), ("triton", 0), ("torch", 100)):
        fast = run(topk_sae_fast, device, torch.float32, backend, chunk)
        errs = {name: ((fast[name] - want).norm() / want.norm().clamp(min=1e-30)).item()
                for name, want in ref.items()}
        worst = max(errs, key=errs.get)
        lines.append(f"  {backend:<7} chunk {chunk:<4} worst relative error {errs[worst]:.2e} ({worst}) "
                     f"{'ok' if errs[worst] < 1e-4 else 'FAIL'}")
    return lines


def bench(args: list[str]) -> str:
    cmd = [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # saekit need not be installed on the device
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    return out.stdout + (out.stderr[-2000:] if out.returncode else "")


def main():
    assert torch.cuda.is_available(), "run this on the device machine"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("correctness, fast TopK on CUDA (fp32) vs naive on CPU (float64):")
    print("\n".join(correctness()))
    shapes = [("gpt2-small", ["--d", "768", "--n", "24576", "--k", "32", "--batch", "4096"]),
              ("gemma-2-2b", ["--d", "2304", "--n", "65536", "--k", "64", "--batch", "8192"])]
    for name, shape in shapes:
        for dtype, extra in (("fp32", []), ("bf16", ["--triton", "--compile", "--compare-topk"])):
            print(f"\n== bench_train {name} {dtype}")
            print(bench(["scripts/bench_train.py", "--device", "cuda", "--dtype", dtype, "--steps", "20",
                         "--warmup", "3", *extra, *shape]))
    print("\n== bench_topk on CUDA: torch.topk, two stages (CUDA's default) and strided (the CPU's)")
    print(bench(["scripts/bench_topk.py", "--device", "cuda", "--repeats", "20",
                 "--shapes", "4096x24576x32,4096x65536x64,4096x6144x32"]))
    print("\n== the CUDA tests (skipped in CI): loader on the GPU vs the CPU loader, ...")
    print(bench(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/test_data_loader.py"])[-600:])
    print("\n== bench_loader to GPU memory, d 768 bf16 store, against the 2.5M tok/s step goal")
    print(bench(["scripts/bench_loader.py", "--device", "cuda", "--d", "768", "--dtype", "bfloat16",
                 "--rows", "1000000", "--reference-tok-s", "2.5e6", "--goal", "1.0"])[-400:])
    print("\n== bench_harvest GPT-2-small shape, bf16, ctx 1024, layer 8")
    print(bench(["scripts/bench_harvest.py", "--gpt2-shape", "--device", "cuda", "--model-dtype", "bfloat16",
                 "--ctx", "1024", "--batch", "32", "--hook", "blocks.8.hook_resid_post",
                 "--tokens", "2000000", "--dtype", "bfloat16"]))
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (this process)")


if __name__ == "__main__":
    main()
