"""A tiny, fully deterministic training run for the trainer's tests (resume after SIGKILL, torchrun).

    python scripts/train_check.py --out DIR [--kill-at-batch 7]
    torchrun --standalone --nproc_per_node 2 scripts/train_check.py --out DIR

Defines a small ReLU autoencoder (with input dropout, so resuming must restore the RNG) and a
resumable synthetic data source: global batch i is a pure function of (seed, i), and under torchrun
rank r gets rows [r·B/W, (r+1)·B/W) of it, so one process fed whole batches sees exactly the
concatenation of what the ranks see.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import dataclass  # noqa: E402

from saekit.autoencoders.base import REGISTRY, Autoencoder, AutoencoderConfig, Output  # noqa: E402
from saekit.autoencoders.base import register as register_family  # noqa: E402
from saekit.config import DataConfig, TrainConfig  # noqa: E402

TOY_KIND = "toy_relu_test"


@dataclass
class ToyConfig(AutoencoderConfig):
    l1_coefficient: float = 1e-3
    noise_level: float = 0.1  # input dropout in training (draws random numbers every step)


class ToyReLU(Autoencoder):
    """ReLU autoencoder; loss = per-token mean of Σ_d squared error + L1 (both in normalized units)."""

    kind = TOY_KIND
    kill_at_forward: int | None = None  # SIGKILL the process in this many-th forward (mid-step crash)
    forwards = 0

    def __init__(self, d_in: int, cfg: ToyConfig):
        super().__init__(d_in, cfg)
        n = cfg.n_latents
        self.W_enc = nn.Parameter(torch.randn(d_in, n) / d_in ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.sparsity_scale = 1.0

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((self.scale_in(x) - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, code: Tensor) -> Tensor:
        return self.scale_out(code @ self.W_dec + self.b_dec)

    def forward(self, x: Tensor) -> Output:
        ToyReLU.forwards += 1
        if ToyReLU.forwards == ToyReLU.kill_at_forward:
            os.kill(os.getpid(), signal.SIGKILL)
        xn = self.scale_in(x)
        h = xn
        if self.training and self.cfg.noise_level > 0:  # draws random numbers every step
            keep = (torch.rand_like(xn) >= self.cfg.noise_level).to(xn.dtype)
            h = xn * keep / (1 - self.cfg.noise_level)
        code = torch.relu((h - self.b_dec) @ self.W_enc + self.b_enc)
        xn_hat = code @ self.W_dec + self.b_dec
        mse = (xn_hat - xn).float().square().sum(-1).mean()
        l1 = self.cfg.l1_coefficient * self.sparsity_scale * code.float().sum(-1).mean()
        return Output(x_hat=self.scale_out(xn_hat), code=code, losses={"mse": mse, "l1": l1})

    def init_from_data(self, x: Tensor, b_dec: Tensor | None = None) -> None:
        if b_dec is not None:
            self.b_dec.data.copy_(self.scale_in(b_dec))

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def register() -> None:
    register_family(TOY_KIND, ToyConfig)(ToyReLU)


def unregister() -> None:
    REGISTRY.pop(TOY_KIND, None)


class SyntheticBatches:
    """Resumable source: global batch i from a generator seeded by (seed, i); this rank's slice of it.

    Rows are sparse combinations of a fixed dictionary plus a large offset, like real activations.
    ``kill_at`` SIGKILLs the process when batch ``kill_at`` is requested (a deterministic crash);
    ``bad_at`` puts an inf into batch ``bad_at``.
    """

    def __init__(self, d: int = 16, batch: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1,
                 kill_at: int | None = None, bad_at: int | None = None):
        self.d, self.batch, self.seed = d, batch, seed
        self.rank, self.world_size = rank, world_size
        self.kill_at, self.bad_at = kill_at, bad_at
        self.i = 0
        g = torch.Generator().manual_seed(seed + 12345)
        self.atoms = torch.randn(4 * d, d, generator=g)
        self.offset = 3.0 * torch.randn(d, generator=g)

    def global_batch(self, i: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        coef = torch.rand(self.batch, self.atoms.shape[0], generator=g)
        coef = coef * (torch.rand(coef.shape, generator=g) < 0.1)
        return coef @ self.atoms + self.offset + 0.05 * torch.randn(self.batch, self.d, generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        if self.kill_at is not None and self.i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = self.global_batch(self.i)
        per_rank = self.batch // self.world_size
        x = x[self.rank * per_rank:(self.rank + 1) * per_rank].clone()
        if self.bad_at is not None and self.i == self.bad_at:
            x[0, 0] = float("inf")
        self.i += 1
        return x

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


class PairedBatches:
    """For families that predict a target (transcoders): SyntheticBatches' rows paired with a fixed
    nonlinear function of them (an "MLP"), resumable like the source it wraps."""

    def __init__(self, source: SyntheticBatches):
        self.source = source
        g = torch.Generator().manual_seed(777)
        self.W = torch.randn(source.d, source.d, generator=g) / source.d ** 0.5

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        x = next(self.source)
        return x, torch.tanh(x @ self.W)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def toy_config(out, total_tokens=1024, batch=64, checkpoint_every=0, n_latents=48, kind=TOY_KIND,
               **overrides) -> TrainConfig:
    """The toy run's TrainConfig; ``kind`` another registered family (with k=4 where it has a k; a
    transcoder names a target hook, and trains on PairedBatches)."""
    if kind == TOY_KIND:
        model = ToyConfig(n_latents=n_latents)
    else:
        config = REGISTRY[kind].config
        fields = {"k": 4} if "k" in config.__dataclass_fields__ else {}
        model = config(n_latents=n_latents, **fields)
    target = "blocks.0.hook_mlp_out" if REGISTRY[model.kind].model.predicts_target else None
    cfg = TrainConfig(out=str(out), data=DataConfig(batch_tokens=batch, target_hook=target), model=model,
                      dead_after_tokens=256,
                      total_tokens=total_tokens, lr=3e-3, lr_warmup_tokens=128, sparsity_warmup_tokens=256,
                      checkpoint_every_tokens=checkpoint_every,
                      dead_window_tokens=512, log_every_steps=2, progress=False, device="cpu")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--total-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64, help="global batch (split over ranks)")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--kill-at-batch", type=int, default=None, help="SIGKILL when this batch is fetched")
    p.add_argument("--kill-at-step", type=int, default=None, help="SIGKILL in this process's n-th forward")
    p.add_argument("--noise", type=float, default=0.1, help="input dropout of the toy model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kind", default=TOY_KIND, help="any registered kind (default: the toy model here)")
    p.add_argument("--shard-latents", action="store_true",
                   help="split the latents over the torchrun ranks (topk); every rank reads whole batches")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    register()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    from saekit.training import train

    ToyReLU.kill_at_forward = args.kill_at_step
    cfg = toy_config(args.out, args.total_tokens, args.batch, args.checkpoint_every, kind=args.kind)
    if args.kind == TOY_KIND:
        cfg.model.noise_level = args.noise
    if args.shard_latents:
        cfg.shard_latents = True
        rank, world = 0, 1  # model parallel: the same batches on every rank
    data = SyntheticBatches(batch=args.batch, rank=rank, world_size=world, kill_at=args.kill_at_batch)
    train(cfg, data=data)


if __name__ == "__main__":
    main()
