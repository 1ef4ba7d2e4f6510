"""The latent-sharded TopK SAE against one process, and its per-rank memory.

    python scripts/sharded_check.py --out DIR                                    # one process: TopKSAE
    torchrun --standalone --nproc_per_node 2 scripts/sharded_check.py --out DIR   # ShardedTopK, 2 ranks
    python scripts/sharded_check.py --memory                                      # per-rank memory table

Both runs build the same TopKSAE (seed 0), initialize it from the same data sample (smaller than n, so
part of the decoder stays random) and take --steps trainer-style steps on the same batches: forward,
loss.backward, before_optimizer_step, gradient clipping by the global norm, fused Adam,
after_optimizer_step. The dead mask changes every step (none; spread over both shards; all on one
shard; fewer dead than auxk_latents) so AuxK runs across shards. The main process (rank 0) writes
DIR/model (the whole model, gathered: a normal TopK model directory), DIR/step0.safetensors (x_hat,
indices, values of the first forward) and DIR/trace.safetensors (loss parts, gradient norms per step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saekit.autoencoders.kernels import PRE_CHUNK_ELEMENTS  # noqa: E402
from saekit.autoencoders.topk import TopKConfig, TopKSAE  # noqa: E402
from saekit.files import write_tensors  # noqa: E402
from saekit.training import distributed  # noqa: E402
from saekit.training.distributed import Dist  # noqa: E402
from saekit.training.sharded import ShardedTopK  # noqa: E402

D, N, K, B = 16, 64, 4, 32
MIB = 2 ** 20


def batch(i: int) -> torch.Tensor:
    """Global batch i: a pure function of i, the same on every rank (sharding splits latents, not data)."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(B, D, generator=g) * 2.0 + 0.5


def dead_mask(step: int) -> torch.Tensor | None:
    ids = torch.arange(N)
    masks = [None, (ids * 7 + step) % 5 == 0, ids < 20, ids >= 60]
    return masks[step % len(masks)]


def build_reference() -> TopKSAE:
    torch.manual_seed(0)
    model = TopKSAE(D, TopKConfig(n_latents=N, k=K, auxk_latents=8, auxk_alpha=0.5))
    model.input_scale.fill_(0.7)
    return model


def clip(model, max_norm: float) -> torch.Tensor:
    if isinstance(model, ShardedTopK):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def train(out: Path, steps: int, lr: float, grad_clip: float) -> None:
    d = distributed.setup(torch.device("cpu"))
    full = build_reference()
    sample = batch(-1)[:48]  # fewer rows than latents: rows 48.. keep their random init
    full.init_from_data(sample, b_dec=sample.mean(0))
    model = ShardedTopK.from_full(full, d) if d.enabled else full
    # The trainer's contiguity fix before fused Adam (trainer.py), for the unsharded model too.
    for p in model.parameters():
        p.data = p.data.contiguous()
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    losses, norms = [], []
    for step in range(steps):
        model.set_dead_mask(dead_mask(step))
        x = batch(step)
        out_ = model(x)
        if step == 0 and d.is_main:
            write_tensors(out / "step0.safetensors", {"x_hat": out_.x_hat.detach(), "indices": out_.indices,
                                                      "values": out_.values.detach()})
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        model.before_optimizer_step()
        norms.append(clip(model, grad_clip))
        opt.step()
        model.after_optimizer_step()
        losses.append(torch.stack([out_.losses["mse"].detach(), out_.losses["auxk"].detach()]))
    model.save(out / "model")  # sharded: gathered, written by rank 0 as a normal TopK model
    if d.enabled:  # the replicated bias must not drift apart across ranks
        b_decs = distributed.all_gather_list(model.b_dec.detach(), d)
        assert all(torch.equal(b, b_decs[0]) for b in b_decs), "b_dec differs across ranks"
    if d.is_main:
        write_tensors(out / "trace.safetensors", {"losses": torch.stack(losses), "norms": torch.stack(norms)})
    distributed.barrier(d)  # leave together: a rank tearing gloo down while another still works aborts
    distributed.teardown(d)


# ------------------------------------------------------------------------------------------ memory
def measured_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(parameters + buffers, gradients, Adam state) in bytes, Adam's state measured after one step."""
    params = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    opt.step()
    adam = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
    return params, grads, adam


def memory_table(batch_tokens: int = 4096) -> None:
    print(f"{'d':>5} {'n':>6} {'ranks':>5} | {'params':>8} {'grads':>8} {'adam':>8} {'total':>8} MiB/rank"
          f" | {'vs 1':>5} | pre-acts B={batch_tokens} MiB")
    for d_in, n in ((384, 6144), (768, 24576)):
        cfg = TopKConfig(n_latents=n, k=32)
        base = None
        for world in (1, 2, 8):
            # World 1 is the plain TopKSAE; a shard is built alone (from_config needs no process group).
            model = TopKSAE(d_in, cfg) if world == 1 else ShardedTopK.from_config(d_in, cfg, Dist(0, world))
            p, g, a = measured_bytes(model)
            total = p + g + a
            base = base or total
            pre = min(batch_tokens * n // world, PRE_CHUNK_ELEMENTS) * 4  # fp32 chunk of [B, n/W]
            print(f"{d_in:>5} {n:>6} {world:>5} | {p / MIB:8.1f} {g / MIB:8.1f} {a / MIB:8.1f} {total / MIB:8.1f}"
                  f"          | {total / base:5.3f} | {pre / MIB:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--grad-clip", type=float, default=12.0)  # clips some of the 6 steps, not all
    ap.add_argument("--memory", action="store_true", help="print the per-rank memory table and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.memory:
        memory_table()
        return
    if args.out is None:
        ap.error("--out is required (or --memory)")
    args.out.mkdir(parents=True, exist_ok=True)
    train(args.out, args.steps, args.lr, args.grad_clip)


if __name__ == "__main__":
    main()
