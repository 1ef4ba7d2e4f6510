"""Which latents have stopped firing: tokens since each latent last fired."""
from __future__ import annotations

import torch
from torch import Tensor


class DeadTracker:
    """Per-latent count of tokens since the latent last fired (batch granularity).

    Fed with fire counts summed over every rank, so all ranks hold the same tracker and hand the model
    the same dead mask.
    """

    def __init__(self, n_latents: int, device=None):
        self.idle = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.tokens = 0  # tokens seen since the tracker started (bounds the window below)

    def update(self, fire_counts: Tensor, n_tokens: int) -> None:
        self.idle += n_tokens
        self.idle.masked_fill_(fire_counts > 0, 0)
        self.tokens += n_tokens

    def dead_mask(self, idle_tokens: int) -> Tensor:
        """Latents idle for at least ``idle_tokens`` (what AuxK revives)."""
        return self.idle >= idle_tokens

    def dead_fraction(self, window_tokens: int) -> float:
        """Fraction never active over the last ``window_tokens`` (or over all tokens so far, if fewer)."""
        return self.dead_mask(max(1, min(window_tokens, self.tokens))).float().mean().item()
