"""Learning-rate and sparsity-penalty schedules, as functions of tokens seen.

Schedules are in tokens, not steps, so a run means the same thing at any batch size or world size.
"""
from __future__ import annotations

import math

from saekit.config import TrainConfig


def default_lr(n_latents: int) -> float:
    """6e-4 / sqrt(n / 16384): Gao et al.'s width scaling at 3x their long-run rate, because saekit's
    reference runs are short (600k tokens, batch 512, 6144 latents: lr 1e-3, measured best; 2e-3
    reached a similar FVU but left ~20% of latents silent on held-out tokens). Kept in one place."""
    return 6e-4 / math.sqrt(n_latents / 16384)


def dead_after_tokens(cfg: TrainConfig) -> int:
    """Idle tokens after which a latent counts as dead. 10M suits long runs; a short run would never
    reach it and AuxK would never act, so by default it is a twentieth of the run."""
    if cfg.dead_after_tokens is not None:
        return cfg.dead_after_tokens
    return max(1, min(10_000_000, cfg.total_tokens // 20))


def base_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else default_lr(cfg.model.n_latents)


def lr_factor(tokens: float, cfg: TrainConfig) -> float:
    """Linear warm-up over ``lr_warmup_tokens``, flat, then linear decay to 0 after
    ``lr_decay_start_fraction`` of the run.

    The trainer evaluates this at the middle of each step's token interval, so neither the first step
    (warm-up) nor the last (decay) gets a learning rate of exactly 0.
    """
    factor = 1.0
    if cfg.lr_warmup_tokens > 0:
        factor = min(1.0, tokens / cfg.lr_warmup_tokens)
    progress, start = tokens / cfg.total_tokens, cfg.lr_decay_start_fraction
    if start < 1.0 and progress > start:
        factor *= max(0.0, (1.0 - progress) / (1.0 - start))
    return factor


def sparsity_scale(tokens: float, cfg: TrainConfig) -> float:
    """Warm-up factor for the sparsity penalty (model.set_sparsity_scale), 0 → 1 linearly."""
    if cfg.sparsity_warmup_tokens <= 0:
        return 1.0
    return min(1.0, tokens / cfg.sparsity_warmup_tokens)
