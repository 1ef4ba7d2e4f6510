"""Latent-sharded TopK SAE: a dictionary too wide for one device, split by latents across ranks.

    torchrun --nproc_per_node 8 -m saekit.cli train cfg.yaml --shard_latents true
    model = ShardedTopK.from_full(TopKSAE(d, cfg), dist)   # from Python, on every rank

In the trainer (``shard_latents``): every rank builds or loads the same whole model and keeps its slice,
reads every batch (``distributed.RankView``: no data split, nothing all-reduced but what the model
exchanges), and rank 0 writes checkpoints (the whole model gathered, each rank's Adam state in its own
optimizer.rankR file) and the final model, a plain TopK model.

Rank r of W holds the contiguous slice [r·n/W, (r+1)·n/W) of the latents: those columns of W_enc,
entries of b_enc and rows of W_dec; b_dec and input_scale are replicated. Unlike DDP, every rank sees
the SAME batch (model parallelism). A step, with the same math as one process's ``TopKSAE.forward``:

1. each rank takes the top k of its shard's pre-activations (``kernels.topk_encode``: the chunked
   selection and the sparse backward);
2. every rank's (value, global id) candidates are all-gathered and the global top k per token chosen
   from them: a latent in the global top k has fewer than k larger ones in its own shard, so the
   union of the local top k's holds it. Ties go to the lower global id;
3. each rank decodes its own winners (its losers get value 0, hence no gradient), and
4. the partial reconstructions are summed by an all-reduce whose backward is the identity
   (``_SumOverShards``): every rank computes the same loss on the same x_hat, so the gradient of
   its own part is the loss's gradient itself.

What the shards share needs the opposite: b_dec (and x) enter every shard's encoder, so the
encoder-side part of their gradient is a sum over shards (``_ToShards``: identity forward, all-reduce
backward), while the decoder-side part is already the same on every rank. AuxK over the dead latents
goes the same way (local top auxk_k, gather, global top, partial decodes summed). Adam is
elementwise, so each rank's Adam over its shard is the slice of one process's Adam; gradient clipping
needs the global norm (``clip_grad_norm_``).

Output entries with value 0 are padding (as in ``base.Output``): where a token has fewer than k
positive pre-activations, the ids of its zero entries may differ from one process's, nothing else.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from saekit.autoencoders.base import Output
from saekit.autoencoders.kernels import KernelOptions, SAEWeights, sparse_decode, topk_encode
from saekit.autoencoders.sae import auxk_loss, normalize_rows_, remove_parallel_grad_
from saekit.autoencoders.topk import TopKConfig, TopKSAE
from saekit.errors import ConfigError
from saekit.metrics import mse
from saekit.training.distributed import Dist, all_gather_list, all_reduce_sum


# ----------------------------------------------------------------------------- collectives with autograd
class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of every rank's tensor. Backward: the identity, because every rank computes the
    same loss of the sum (an all-reduce here would count the gradient W times)."""

    @staticmethod
    def forward(ctx, part: Tensor, d: Dist) -> Tensor:
        return all_reduce_sum(part.clone(), d)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _ToShards(torch.autograd.Function):
    """Forward: the identity (a replicated tensor entering this rank's shard). Backward: the sum of
    every shard's gradient, so the replicated tensor gets its whole gradient on every rank."""

    @staticmethod
    def forward(ctx, t: Tensor, d: Dist) -> Tensor:
        ctx.d = d
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        return all_reduce_sum(g.clone(), ctx.d), None


def shard_range(n_latents: int, d: Dist) -> tuple[int, int]:
    """[lo, hi) of the latents rank ``d.rank`` holds; a one-line ConfigError if they do not divide."""
    if n_latents % d.world_size:
        up = -(-n_latents // d.world_size) * d.world_size
        raise ConfigError(f"model.n_latents is {n_latents}, which the {d.world_size} ranks of shard_latents "
                          f"cannot split evenly; use a multiple of {d.world_size} (e.g. {up}) or another "
                          "--nproc_per_node")
    size = n_latents // d.world_size
    return d.rank * size, (d.rank + 1) * size


def _winners(vals_BC: Tensor, k: int) -> Tensor:
    """Positions [B, k] of the k largest candidates per token. Candidates come in ascending global id
    order and the sort is stable, so ties go to the lower id."""
    return vals_BC.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def _gather_candidates(vals_BC: Tensor, ids_BC: Tensor, d: Dist) -> tuple[Tensor, Tensor]:
    """Every rank's [B, c] candidates side by side, [B, W·c], in rank order. One collective of 8 bytes
    per candidate: the values' float32 bits and the ids, as int32 (exact for every float type we train
    in, and for n < 2^31)."""
    packed = torch.stack([vals_BC.detach().float().view(torch.int32), ids_BC.to(torch.int32)])
    both = torch.cat(all_gather_list(packed, d), dim=-1)
    return both[0].view(torch.float32).to(vals_BC.dtype), both[1].long()


def _select(vals_BC: Tensor, ids_BC: Tensor, k: int, d: Dist) -> tuple[Tensor, Tensor, Tensor]:
    """The global top k among every rank's candidates [B, c] (ascending ids within each rank's).
    Returns (a 0/1 mask [B, c] of this rank's winners, the winners' global ids [B, k] ascending,
    their values [B, k])."""
    all_vals, all_ids = _gather_candidates(vals_BC, ids_BC, d)
    win_BK = _winners(all_vals, k)
    c = vals_BC.shape[1]
    keep = torch.zeros_like(all_vals).scatter_(1, win_BK, 1.0)[:, d.rank * c:(d.rank + 1) * c]
    ids_BK, order = all_ids.gather(1, win_BK).sort(dim=-1)
    return keep.to(vals_BC.dtype), ids_BK, all_vals.gather(1, win_BK).gather(1, order)


class ShardedTopK(nn.Module):
    """Rank ``dist.rank``'s shard of a TopK SAE; parameter names as in ``TopKSAE`` (W_enc [d, n/W],
    b_enc [n/W], W_dec [n/W, d], b_dec [d]), so ``param_groups`` and Adam work unchanged. Every rank
    must call ``forward``, ``clip_grad_norm_`` and ``full_state_dict`` together (they communicate)."""

    def __init__(self, d_in: int, cfg: TopKConfig, dist: Dist, W_enc_DN: Tensor, b_enc_N: Tensor,
                 W_dec_ND: Tensor, b_dec_D: Tensor, input_scale: Tensor):
        super().__init__()
        self.d_in, self.cfg, self.dist = d_in, cfg, dist
        self.lo, self.hi = shard_range(cfg.n_latents, dist)
        self.kernels = KernelOptions()
        self.W_enc = nn.Parameter(W_enc_DN.contiguous())
        self.b_enc = nn.Parameter(b_enc_N.contiguous())
        self.W_dec = nn.Parameter(W_dec_ND.contiguous())
        self.b_dec = nn.Parameter(b_dec_D.contiguous())
        self.register_buffer("input_scale", input_scale.clone())
        self.dead_mask: Tensor | None = None

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def from_full(cls, model: TopKSAE, dist: Dist) -> "ShardedTopK":
        """This rank's shard of ``model`` (copies: the full model can be freed afterwards)."""
        if type(model) is not TopKSAE:
            raise ConfigError(f"shard_latents supports model.kind 'topk' only, not {model.kind!r}")
        lo, hi = shard_range(model.n_latents, dist)
        with torch.no_grad():
            shard = cls(model.d_in, model.cfg, dist, model.W_enc[:, lo:hi].clone(), model.b_enc[lo:hi].clone(),
                        model.W_dec[lo:hi].clone(), model.b_dec.clone(), model.input_scale)
        shard.use_kernels(model.kernels)
        return shard

    @classmethod
    def from_config(cls, d_in: int, cfg: TopKConfig, dist: Dist, seed: int = 0) -> "ShardedTopK":
        """A fresh shard without ever building the full model (for widths even the host cannot hold):
        TopKSAE's random init (unit decoder rows, tied encoder, zero biases), drawn per rank. The data
        init (``decoder_init: data``) needs the full model: build it on the CPU, ``init_from_data``,
        then ``from_full`` and move the shard to its device."""
        lo, hi = shard_range(cfg.n_latents, dist)
        g = torch.Generator().manual_seed(seed * 65537 + dist.rank)
        W_dec_ND = torch.randn(hi - lo, d_in, generator=g)
        W_dec_ND /= W_dec_ND.norm(dim=-1, keepdim=True)
        return cls(d_in, cfg, dist, W_dec_ND.T, torch.zeros(hi - lo), W_dec_ND, torch.zeros(d_in), torch.ones(()))

    # --- what the trainer calls -----------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents  # the whole dictionary's: fire counts and indices are global

    @property
    def auxk_latents(self) -> int:
        return self.cfg.auxk_latents if self.cfg.auxk_latents is not None else self.d_in // 2

    def use_kernels(self, options: KernelOptions) -> None:
        self.kernels = options  # the sparse kernels always run here; fast_path: false is not honoured

    def set_sparsity_scale(self, scale: float) -> None:
        """TopK has no sparsity penalty to warm up."""

    def set_dead_mask(self, dead: Tensor | None) -> None:
        """The WHOLE dictionary's [n] dead mask (the same on every rank, as the trainer's tracker is)."""
        self.dead_mask = dead

    def lr_scales(self) -> dict[str, float]:
        return {}

    def step_state(self) -> dict[str, Tensor]:
        return {}  # TopK's step takes one path whatever happened before

    def load_step_state(self, state: dict[str, Tensor]) -> None:
        pass

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)  # row-wise, so the shard's rows are all it needs

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)

    def scale_in(self, x: Tensor) -> Tensor:
        return x * self.input_scale.to(x.dtype)

    def scale_out(self, x: Tensor) -> Tensor:
        return x / self.input_scale.to(x.dtype)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: shard gradients' squared norms summed
        over ranks, b_dec's (the same on every rank) counted once. Returns the total norm."""
        grads = [p.grad for p in (self.W_enc, self.b_enc, self.W_dec) if p.grad is not None]
        sq = torch.stack([g.square().sum() for g in grads]).sum() if grads else self.b_dec.new_zeros(())
        sq = all_reduce_sum(sq.double(), self.dist)
        if self.b_dec.grad is not None:
            sq = sq + self.b_dec.grad.double().square().sum()
        total = sq.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total.float()

    # --- the step -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Output:
        d, backend = self.dist, self.kernels.on(x.device).backend
        x_n_BD = self.scale_in(x)
        dead_M, n_dead = self._dead()
        k_local = min(self.cfg.k, self.hi - self.lo)
        w = SAEWeights(_ToShards.apply(self.b_dec, d), self.W_enc, self.b_enc, self.W_dec)
        vals_BK, idx_BK, pre_BM = topk_encode(_ToShards.apply(x_n_BD, d), w, k_local, dead_M, self.kernels)

        # Candidates come sorted by local id (select_topk), ranks in order: ascending global ids.
        keep_BK, indices, values = _select(vals_BK, idx_BK + self.lo, self.cfg.k, d)
        part_BD = sparse_decode(idx_BK, vals_BK * keep_BK, self.W_dec, backend)
        x_hat_n_BD = _SumOverShards.apply(part_BD, d) + self.b_dec

        ehat_BD = self._auxk(pre_BM, dead_M, n_dead, x_n_BD, backend) if n_dead else None
        losses = {"mse": mse(x_n_BD, x_hat_n_BD),
                  "auxk": auxk_loss(x_n_BD - x_hat_n_BD.detach(), ehat_BD, self.cfg.auxk_alpha)}
        return Output(x_hat=self.scale_out(x_hat_n_BD), indices=indices, values=values, losses=losses)

    def _dead(self) -> tuple[Tensor | None, int]:
        """(this shard's dead latents as local ids or None, the number dead over the whole dictionary)."""
        if self.dead_mask is None:
            return None, 0
        mask = self.dead_mask.to(self.W_dec.device)
        local = mask[self.lo:self.hi].nonzero().flatten()
        return (local if local.numel() else None), int(mask.sum())

    def _auxk(self, pre_BM: Tensor, dead_M: Tensor | None, n_dead: int, x_n_BD: Tensor, backend: str) -> Tensor:
        """AuxK's residual reconstruction from the top auxk_k dead latents of the WHOLE dictionary:
        each rank offers its top ones (pre-ReLU, as ``kernels.auxk_decode`` selects), padded to a common
        count with -inf, the global top is chosen, and each rank decodes its own winners."""
        A = min(self.auxk_latents, n_dead)
        a = 0 if dead_M is None else min(A, dead_M.numel())
        B = x_n_BD.shape[0]
        vals_BA, loc_BA = pre_BM.topk(a, dim=-1, sorted=False)
        ids_BA = dead_M[loc_BA] if a else loc_BA  # local ids
        ids_BA, order = ids_BA.sort(dim=-1)  # ascending ids: _winners breaks ties by order
        vals_BA = vals_BA.gather(1, order)
        pad_vals = vals_BA.new_full((B, A - a), float("-inf"))  # never chosen: >= A real candidates
        pad_ids = ids_BA.new_full((B, A - a), self.n_latents)
        keep_BA, _, _ = _select(torch.cat([vals_BA, pad_vals], 1), torch.cat([ids_BA + self.lo, pad_ids], 1),
                                  A, self.dist)
        if a:
            part_BD = sparse_decode(ids_BA, vals_BA.relu() * keep_BA[:, :a], self.W_dec, backend)
        else:
            part_BD = x_n_BD.new_zeros(B, self.d_in, dtype=self.W_dec.dtype)
        return _SumOverShards.apply(part_BD, self.dist)

    # --- saving ---------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole model's ``TopKSAE`` state dict on rank 0 (None elsewhere), gathered one tensor at
        a time so only rank 0 ever holds the full weights. Every rank must call it."""
        W_enc_ND = self._gather_main(self.W_enc.detach().T)
        b_enc_N = self._gather_main(self.b_enc.detach())
        W_dec_ND = self._gather_main(self.W_dec.detach())
        if not self.dist.is_main:
            return None
        return {"W_enc": W_enc_ND.T.contiguous(), "b_enc": b_enc_N, "W_dec": W_dec_ND,
                "b_dec": self.b_dec.detach().clone(), "input_scale": self.input_scale.clone()}

    def _gather_main(self, t: Tensor) -> Tensor | None:
        """Every rank's ``t`` concatenated along dim 0 on rank 0 (None elsewhere)."""
        if not self.dist.enabled:
            return t.clone()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.dist.world_size)] if self.dist.is_main else None
        torch_dist.gather(t, parts, dst=0)
        return torch.cat(parts) if self.dist.is_main else None

    def to_full(self) -> TopKSAE | None:
        """The whole model as a plain ``TopKSAE`` on rank 0 (None elsewhere); every rank must call it."""
        state = self.full_state_dict()
        if state is None:
            return None
        model = TopKSAE(self.d_in, self.cfg)
        model.load_state_dict(state)
        model.use_kernels(self.kernels)
        return model

    def save(self, directory: str | Path) -> None:
        """``Autoencoder.save`` of the whole model, written by rank 0: a normal TopK model directory."""
        model = self.to_full()
        if model is not None:
            model.save(directory)
