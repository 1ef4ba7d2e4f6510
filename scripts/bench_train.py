"""Time full SAE training steps: saekit's TopK fast path against the naive dense TopK step.

A step is forward, backward, decoder-gradient projection, Adam, decoder renormalization, on the same
data, with AuxK active (10% of latents marked dead). Steps of the two implementations are interleaved
and each is summarized by its median, so load from other processes hits both alike. The ceiling is
one dense encoder product per token (2·d·n FLOP) at the matmul rate measured here, in this run.
Each ``--kinds`` family is reported with its tokens/s as a fraction of saekit topk's in the same run,
and its L0 (mean active latents per token over the timed steps) beside it: families without a k
(relu, jumprelu) are calibrated to L0 ~ k first, so the comparison is at a matched L0 (ReLU: each
latent's bias lowered to its (1 - k/n) quantile on the batch; JumpReLU: thresholds set there).
Transcoders (which predict a target activation) get a random target batch of the input's shape.
``--batches 512,4096`` times every implementation at each batch size, all steps interleaved in one
process (smaller batches take proportionally more steps per round), and prints the per-token throughput
of saekit topk at each size as a fraction of the largest's. ``--phases`` then times saekit topk's steps
phase by phase (forward, backward, gradient projection, Adam, renormalization), synchronized, after
the timed steps, and prints each phase's cost beyond the largest batch's per-token cost: the fixed
per-step costs that ratio pays for.

    python scripts/bench_train.py [--device cpu|cuda] [--d 384 --n 6144 --k 32 --batch 4096 --steps 5]
                                  [--batches 512,4096 [--phases]] [--dtype fp32|bf16] [--kinds relu,batchtopk,jumprelu]
                                  [--chunk 0] [--triton] [--compile] [--no-naive] [--dense-kinds]
                                  [--topk auto|torch|two_stage|strided] [--compare-topk]
    python scripts/bench_train.py --sweep 8 [--sweep-tokens 65536] [--store DIR --hook HOOK]

``--sweep N`` times whole training runs instead: N small TopK SAEs (d 384 unless --store, 1536 latents,
k and lr varied) on a real on-disk store (a temporary synthetic one written with StoreWriter unless
``--store``), trained together by ``train_many`` (one pass over the data) and one after another by
``train`` over the same store, in one process; tokens/s counts every run's tokens over the wall time,
start-up and outputs included, and the last line is ``ratio X.XX (goal >= 1.5)``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from saekit.autoencoders import REGISTRY, AutoencoderConfig, KernelOptions, build
from saekit.autoencoders.kernels import keep_freed_memory, resolve_topk_method
from saekit.training.optimizer import make_adam


# Issue 6's H100 goals (tokens/s) for the two named shapes (d, n, k, batch): 6x and 5x SAELens.
GPU_GOALS = {(768, 24576, 32, 4096): 2.5e6, (2304, 65536, 64, 8192): 6e5}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(B: int, d: int, n: int, device, dtype) -> float:
    """FLOP/s of the encoder-shaped product [B, d] @ [d, n], best of a few."""
    x, W = torch.randn(B, d, device=device, dtype=dtype), torch.randn(d, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        sync(device)
        t0 = time.perf_counter()
        x @ W
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * B * d * n / best


@torch.no_grad()
def calibrate_l0(model, x, k: int) -> None:
    """Give a family without a k (relu, jumprelu) an L0 of ~k on ``x``: each latent fires on its top
    k/n fraction of the batch (ReLU: bias lowered to that quantile; JumpReLU: threshold there)."""
    if not hasattr(model, "pre_acts") or "k" in model.cfg.__dataclass_fields__:
        return
    pre = model.pre_acts(model.scale_in(x))
    B, n = pre.shape
    q = pre.kthvalue(max(1, B - round(B * k / n)), dim=0).values
    if hasattr(model, "log_threshold"):
        model.log_threshold.copy_(q.clamp_min(1e-3).log())
    else:
        model.b_enc.sub_(q)


class Stepper:
    """One model + optimizer; ``step()`` runs a full training step and returns its seconds."""

    def __init__(self, cfg: AutoencoderConfig, d: int, x, dead, autocast_dtype, seed: int = 0,
                 compile: bool = False, kernels: KernelOptions = KernelOptions(), k: int = 0):
        torch.manual_seed(seed)
        self.model = build(cfg, d).to(x.device)
        if k:
            calibrate_l0(self.model, x, k)
        self.l0: list[float] = []
        # Transcoders predict a target: random rows of the input's shape (throughput only).
        self.target = torch.randn_like(x) if self.model.predicts_target else None
        self.model.use_kernels(kernels)
        self.model.set_dead_mask(dead)
        self.forward = torch.compile(self.model) if compile else self.model
        self.x, self.autocast_dtype = x, autocast_dtype
        self.opt = make_adam(self.model, 1e-4, (0.9, 0.999), x.device)  # the trainer's optimizer
        self.phases: list[list[float]] | None = None  # set to [] to record PHASES' seconds per step

    def step(self) -> float:
        device = self.x.device
        marks = []

        def mark(always: bool = False) -> None:  # a phase boundary: synchronizes only to record phases
            if always or self.phases is not None:
                sync(device)
                marks.append(time.perf_counter())

        mark(always=True)
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.forward(self.x) if self.target is None else self.forward(self.x, self.target)
        mark()
        out.loss.backward()
        mark()
        self.model.before_optimizer_step()
        mark()
        self.opt.step()
        mark()
        self.model.after_optimizer_step()
        self.opt.zero_grad(set_to_none=True)
        mark(always=True)
        seconds = marks[-1] - marks[0]
        if self.phases is not None:
            self.phases.append([b - a for a, b in zip(marks, marks[1:])])
        self.l0.append(out.nonzero_per_token().float().mean().item())  # untimed
        return seconds


PHASES = ("forward", "backward", "grad projection", "adam", "renorm + zero_grad")


def phase_table(steppers: dict, batches: list[int]) -> None:
    """saekit topk's median seconds per phase at each batch size, and each phase's cost beyond the
    largest batch's per-token cost: the fixed per-step costs the --batches ratio pays for."""
    top = max(batches)
    med = {b: [statistics.median(p[i] for p in steppers[b, "saekit topk"].phases) * 1e3 for i in range(len(PHASES))]
           for b in batches}
    print(f"{'saekit topk, ms per step':<26}" + "".join(f"{name:>20}" for name in PHASES))
    for b in batches:
        print(f"{'batch ' + str(b):<26}" + "".join(f"{m:>20.2f}" for m in med[b]))
        if b != top:
            extra = [m - t * b / top for m, t in zip(med[b], med[top])]
            print(f"{'  beyond ' + str(top) + ' per token':<26}" + "".join(f"{m:>+20.2f}" for m in extra)
                  + f"   (sum {sum(extra):+.2f})")
    print()


def synthetic_store(directory: Path, d: int, rows: int, hook: str) -> Path:
    """A store of ``rows`` activation rows (sparse combinations of a random dictionary plus an offset, like
    real activations), written by the store writer in 128-token sequences."""
    from saekit.data.store import StoreWriter

    ctx, n_seq = 128, -(-rows // 128)
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(4 * d, d, generator=g) / d ** 0.5
    writer = StoreWriter(directory, {"model": "synthetic", "context_size": ctx}, {}, [hook], d, "float32",
                         shard_sequences=64)
    for s in range(0, n_seq, 16):
        b = min(16, n_seq - s)
        codes = torch.rand(b, ctx, 4 * d, generator=g).lt(0.02) * torch.rand(b, ctx, 4 * d, generator=g)
        writer.add(torch.zeros(b, ctx, dtype=torch.long), torch.ones(b, ctx, dtype=torch.bool),
                   {hook: codes @ atoms + 1.0})
    writer.finish()
    return directory


def bench_sweep(args) -> None:
    from saekit.config import DataConfig, TrainConfig
    from saekit.training import train
    from saekit.training.trainer import train_many

    with tempfile.TemporaryDirectory(prefix="saekit-bench-sweep-") as tmp:
        tmp = Path(tmp)
        store, hook = (Path(args.store), args.hook) if args.store else (
            synthetic_store(tmp / "store", args.d, args.sweep_tokens // 2, args.hook), args.hook)

        def configs(root: Path) -> list[TrainConfig]:
            ks, lrs = [16, 32, 64, 128], [5e-4, 1e-3]
            return [TrainConfig(out=str(root / f"sae{i}"), total_tokens=args.sweep_tokens, progress=False,
                                device=args.device, lr=lrs[i // len(ks) % len(lrs)], log_every_steps=20,
                                data=DataConfig(store=str(store), hook=hook, batch_tokens=args.batch,
                                                buffer_tokens=65536),
                                model=AutoencoderConfig.for_kind("topk", n_latents=args.n, k=ks[i % len(ks)]))
                    for i in range(args.sweep)]

        # Untimed: the first run in a process pays one-off costs (thread pools, allocator, plotting).
        train(replace(configs(tmp / "warmup")[0], total_tokens=2 * args.batch))
        t0 = time.perf_counter()
        train_many(configs(tmp / "one_pass"))
        one_pass = time.perf_counter() - t0
        t0 = time.perf_counter()
        for cfg in configs(tmp / "sequential"):
            train(cfg)
        sequential = time.perf_counter() - t0
    tokens = args.sweep * args.sweep_tokens
    print(f"device {args.device} ({torch.get_num_threads()} threads): {args.sweep} TopK SAEs, d={args.d} "
          f"n={args.n}, batch {args.batch}, {args.sweep_tokens} tokens each, "
          f"store {store if args.store else 'synthetic'}")
    print(f"one pass (train_many)   {one_pass:8.1f} s {tokens / one_pass:10.0f} tok/s")
    print(f"sequential (train x{args.sweep}) {sequential:8.1f} s {tokens / sequential:10.0f} tok/s")
    print(f"ratio {sequential / one_pass:.2f} (goal >= 1.5)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--n", type=int, default=6144)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    ap.add_argument("--dead", type=float, default=0.10, help="fraction of latents marked dead")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--kinds", default="", help="also time these kinds, e.g. matryoshka,gated,transcoder")
    ap.add_argument("--chunk", type=int, default=0, help="saekit topk: tokens per pre-activation chunk (0: auto)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive step (when it would not fit)")
    ap.add_argument("--triton", action="store_true", help="also time the triton backend of the sparse products")
    ap.add_argument("--compile", action="store_true", help="also time saekit topk under torch.compile")
    ap.add_argument("--topk", default="auto", help="saekit topk's selection: auto, torch, two_stage, strided")
    ap.add_argument("--compare-topk", action="store_true",
                    help="also time saekit topk with the other selection method")
    ap.add_argument("--phases", action="store_true",
                    help="also time saekit topk's step phase by phase (synchronized) at each batch size")
    ap.add_argument("--batches", default="", help="comma-separated batch sizes timed in one run, e.g. 512,4096")
    ap.add_argument("--dense-kinds", action="store_true",
                    help="also time each --kinds family's dense reference step (kernels.fast_path: false)")
    ap.add_argument("--page-faults", action="store_true",
                    help="leave glibc's default (trim freed memory; what the trainer avoids on CPU)")
    ap.add_argument("--sweep", type=int, default=0, help="time N whole runs: one pass against one by one")
    ap.add_argument("--sweep-tokens", type=int, default=65536, help="--sweep: training tokens per run")
    ap.add_argument("--store", default="", help="--sweep: an existing store (default: a temporary synthetic one)")
    ap.add_argument("--hook", default="blocks.3.hook_resid_post", help="--sweep: the store's hook")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        if "--n" not in sys.argv:
            args.n = 1536
        if "--batch" not in sys.argv:
            args.batch = 1024
        return bench_sweep(args)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.page_faults:
        keep_freed_memory()  # as the trainer does on CPU
    autocast_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    batches = sorted({int(b) for b in args.batches.split(",") if b}) or [args.batch]
    gen = torch.Generator().manual_seed(0)
    x_all = torch.randn(max(batches), args.d, generator=gen).to(device)
    dead = torch.zeros(args.n, dtype=torch.bool)
    dead[torch.randperm(args.n, generator=gen)[: int(args.dead * args.n)]] = True
    dead = dead.to(device)

    topk = AutoencoderConfig.for_kind("topk", n_latents=args.n, k=args.k)
    fast = KernelOptions(chunk_tokens=args.chunk, topk_method=resolve_topk_method(args.topk, device))
    steppers = {}  # (batch, name) -> Stepper
    for b in batches:
        common = (args.d, x_all[:b], dead, autocast_dtype)
        if not args.no_naive:
            steppers[b, "naive topk"] = Stepper(topk, *common, kernels=KernelOptions(fast_path=False))
        steppers[b, "saekit topk"] = Stepper(topk, *common, kernels=fast)
        if args.compare_topk:
            other = "strided" if fast.topk_method == "torch" else "torch"
            steppers[b, f"saekit topk {other}"] = Stepper(topk, *common, kernels=replace(fast, topk_method=other))
        if args.triton:
            steppers[b, "saekit topk triton"] = Stepper(topk, *common, kernels=replace(fast, backend="triton"))
        if args.compile:
            steppers[b, "saekit topk compile"] = Stepper(topk, *common, compile=True, kernels=fast)
        for kind in filter(None, args.kinds.split(",")):
            if kind not in REGISTRY:
                ap.error(f"--kinds: unknown kind {kind!r} (valid: {', '.join(sorted(REGISTRY))})")
            if kind == "topk":
                continue  # always timed, as "saekit topk"
            has_k = "k" in REGISTRY[kind].config.__dataclass_fields__
            cfg = AutoencoderConfig.for_kind(kind, n_latents=args.n, **({"k": args.k} if has_k else {}))
            steppers[b, f"saekit {kind}"] = Stepper(cfg, *common, kernels=fast, k=args.k)
            if args.dense_kinds:
                steppers[b, f"dense {kind}"] = Stepper(cfg, *common, kernels=KernelOptions(fast_path=False),
                                                       k=args.k)

    peak = {}
    for key, s in steppers.items():  # one step alone each, for its peak memory (GPU only)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        s.step()
        s.l0.clear()
        peak[key] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    times: dict[tuple, list[float]] = {key: [] for key in steppers}
    reps = {b: max(1, min(8, round(max(batches) / b))) for b in batches}
    for i in range(args.warmup + args.steps):
        for key, s in steppers.items():  # interleaved: background load hits every implementation
            for _ in range(reps[key[0]]):
                t = s.step()
                if i >= args.warmup:
                    times[key].append(t)
                else:
                    s.l0.clear()

    if args.phases:  # phase marks synchronize the device, so these steps come after the timed ones
        for b in batches:
            steppers[b, "saekit topk"].phases = []
        for i in range(args.steps):
            for b in batches:
                for _ in range(reps[b]):
                    steppers[b, "saekit topk"].step()
        phase_table(steppers, batches)

    tok_s_topk = {}
    for b in batches:
        rate = matmul_rate(b, args.d, args.n, device, torch.bfloat16 if autocast_dtype else torch.float32)
        ceiling = rate / (2 * args.d * args.n)
        print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}, d={args.d} n={args.n} k={args.k} "
              f"batch={b}, saekit topk selects by {fast.topk_method}, "
              f"{args.dead:.0%} dead (AuxK on), {args.steps * reps[b]} timed steps (median)")
        print(f"matmul rate {rate / 1e9:.1f} GFLOP/s -> ceiling {ceiling / 1e3:.1f}k tok/s (2*d*n FLOP/token)")
        print(f"{'impl':<26}{'ms/step':>10}{'tok/s':>12}{'of ceiling':>12}{'vs topk':>9}{'L0':>8}{'peak GiB':>10}")
        tok_s = {name: b / statistics.median(ts) for (bb, name), ts in times.items() if bb == b}
        for (bb, name), ts in times.items():
            if bb != b:
                continue
            vs = tok_s[name] / tok_s["saekit topk"]
            l0 = statistics.mean(steppers[bb, name].l0)
            print(f"{name:<26}{statistics.median(ts) * 1e3:>10.1f}{tok_s[name]:>12.0f}{tok_s[name] / ceiling:>12.1%}"
                  f"{vs:>9.2f}{l0:>8.1f}{peak[bb, name]:>10.2f}")
        best = max((t, name) for name, t in tok_s.items() if name.startswith("saekit topk"))
        if "naive topk" in tok_s:
            print(f"ratio {best[0] / tok_s['naive topk']:.2f} ({best[1]} vs naive topk; goal >= 2.0)")
        for name in tok_s:
            if name.startswith("dense "):
                kind = name.split(" ", 1)[1]
                print(f"saekit {kind} vs its dense step: {tok_s[f'saekit {kind}'] / tok_s[name]:.2f}x")
        goal = GPU_GOALS.get((args.d, args.n, args.k, b))
        if device.type == "cuda" and goal:
            print(f"tokens/s {best[0]:.0f} ({best[1]}), {best[0] / goal:.2f} of the goal (goal >= {goal:.0f} on an H100)")
        tok_s_topk[b] = tok_s["saekit topk"]
        print()
    if len(batches) > 1:
        top = max(batches)
        for b in batches[:-1]:
            print(f"saekit topk per-token throughput at batch {b}: {tok_s_topk[b]:.0f} tok/s = "
                  f"{tok_s_topk[b] / tok_s_topk[top]:.2f} of batch {top}'s {tok_s_topk[top]:.0f} (goal >= 0.85)")


if __name__ == "__main__":
    main()
