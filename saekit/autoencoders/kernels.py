"""The TopK fast path: encoder and decoder whose backward touches only the selected latents.

A TopK SAE must do one dense product, the encoder GEMM ``x @ W_enc`` (2·d·n FLOP/token), to find the k
largest pre-activations. Everything after that can be O(k·d) per token. The naive way
(``topk_sae_naive`` below) spends ~5 more dense GEMMs of that size: the dense decoder ``code @ W_dec``,
its two backward products, the encoder weight gradient ``x.T @ grad_pre`` and the input gradient
``grad_pre @ W_enc.T`` (needed for b_dec), and AuxK adds three more.

Pieces (every one is checked against the naive reference in tests/test_kernels.py):

* ``topk_encode``: autograd Function. Forward: encoder GEMM, top-k + ReLU, and, for AuxK, the dense
  pre-activations of a small column subset (the dead latents). Backward, for a [B, k] value gradient
  ``g``: W_enc's gradient is ``x_c.T @ G`` with G the [B, n] matrix holding g at the selected entries;
  we compute it as ``G.T @ x_c`` with G.T a latent-major CSR matrix (``LatentMajor``), so no dense
  [B, n] tensor and no [B, k, d] gather is ever formed. b_enc's gradient is an index_add of g, and
  b_dec's is ``-W_enc @ grad_b_enc`` (pre = (x - b_dec) @ W_enc + b_enc), a single [d, n] x [n] product.
* ``sparse_decode``: ``x_hat[b] = sum_j vals[b, j] * W_dec[idx[b, j]]`` via ``F.embedding_bag``
  (per_sample_weights, mode="sum"). Backward: the value gradients are the k dot products
  ``grad[b] . W_dec[idx[b, j]]``, computed by ``torch.sparse.sampled_addmm`` (an SDDMM: only the
  sampled entries of ``grad @ W_dec.T``), and W_dec's gradient is again a latent-major CSR product.
* ``auxk_decode``: AuxK's decode of the top auxk_k dead pre-activations. With few dead latents the
  [B, n_dead] subset is small, and three dense GEMMs of that size beat sparse kernels at auxk_k = d/2
  entries per token; with many dead latents the sparse decode wins. See ``AUXK_DENSE_FACTOR``.

Choices measured on the 2-core CPU (B 4096, d 384, n 6144, k 32, fp32, 2 threads, one quiet run;
this machine is shared, so absolute times vary 2-3x run to run). W_enc gradient: dense scatter then
GEMM 137 ms; ``index_add_`` of materialized [B*k, d] rows 85 ms; ``x.T @ G`` with G a token-major CSR
(dense @ sparse) 72 ms (1 thread); latent-major CSR ``sparse.mm`` 5.6 ms + 1.8 ms to build the layout
(one stable argsort of the B*k latent ids). Value gradients: gather W_dec[idx] then bmm over
[B, k, d] 101 ms; ``sampled_addmm`` 4 ms. Decoder forward: ``embedding_bag`` 3.7 ms.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.schema import Section, value


@dataclass
class KernelOptions(Section):
    """How the TopK fast path runs: settings of a training (or analysis) run, not of the model, so a
    saved model carries none of them. The trainer hands its ``kernels:`` section to the model
    (``Autoencoder.use_kernels``); families without sparse kernels ignore it."""

    # False: the dense reference step (same math; for tests and the benchmark).
    fast_path: bool = True
    # Tokens per chunk of [tokens, latents] pre-activations, so memory stays bounded at large widths
    # (0: auto, at most PRE_CHUNK_ELEMENTS at a time).
    chunk_tokens: int = value(0, ge=0)
    # Where the three sparse products run: "torch" (library calls, every device) or "triton" (one kernel
    # each, triton_kernels.py, CUDA; a model trained so still runs on a CPU, through torch).
    backend: Literal["torch", "triton"] = "torch"
    # How the k largest are found: "torch" (torch.topk), "two_stage" (group maxima first, exact, see
    # two_stage_topk), "strided" (the same with strided groups, see strided_topk) or "auto"
    # (two_stage on CUDA, strided elsewhere).
    topk_method: Literal["auto", "torch", "two_stage", "strided"] = "auto"

    def on(self, device: torch.device) -> "Resolved":
        """These options as they apply on ``device``: the backend and top-k method resolved. Resolved
        per call, not at build, so a model trained on triton kernels loads and runs anywhere."""
        return Resolved(self.fast_path, self.chunk_tokens, resolve_backend(self.backend, device),
                        resolve_topk_method(self.topk_method, device))


class Resolved(NamedTuple):
    """KernelOptions for one device (a plain tuple: built every step, also inside torch.compile)."""

    fast_path: bool
    chunk_tokens: int
    backend: str
    topk_method: str

    def on(self, device: torch.device) -> "Resolved":
        return self


def _triton():
    from saekit.autoencoders import triton_kernels
    return triton_kernels


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to use on ``device``: triton runs on CUDA (or in Triton's interpreter when
    TRITON_INTERPRET=1), so a model trained with it still encodes on a CPU, through torch."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "torch"
    return backend

# AuxK decodes densely over the dead subset while n_dead <= AUXK_DENSE_FACTOR * auxk_k, sparsely beyond.
# Full TopK steps on the 2-core CPU (1 thread; B 4096, d 384, n 6144, k 32, auxk_k 192), dense vs
# sparse aux: 10% dead 774 vs 847 ms, 25% dead 850 vs 945 ms, 50% dead 1572 vs 1226 ms.
AUXK_DENSE_FACTOR = 10


_workspace = threading.local()


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (CPU training only).

    A training step allocates and frees several [n, d] and [B, n] tensors (gradients, the sparse
    products' outputs). By default glibc serves large blocks with fresh mmaps and trims freed heap
    memory, so every step first-touches (page-faults) those megabytes again: measured on the 2-core
    CPU (TopK, B 512, d 384, n 6144) the backward took 20-23 ms with, 13-14 ms without. Raising the
    mmap and trim thresholds keeps the process at its peak footprint, which a training process reaches
    every step anyway. Process-wide, so called by the trainer (and the benchmark), never on import.
    Returns whether it took effect (False off glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False

# ------------------------------------------------------------------------------------ small helpers
def _pre_buffer(B: int, N: int, x_BD: Tensor, W_DN: Tensor) -> Tensor | None:
    """A reused [B, n] output for the pre-activations, on CPU without autocast (else None).

    A fresh 100 MB tensor (B 4096, n 6144) comes from mmap, and first touch page-faults every 4 KiB
    page: ~50 ms per step, as much as the whole sparse backward. CUDA's caching allocator already
    reuses blocks. Safe because the pre-activations never leave ``_topk_block``: what it returns are
    fresh tensors (top-k values and indices, index_select of a few columns).
    One buffer per thread, grown as needed and kept between steps."""
    if x_BD.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x_BD.dtype != W_DN.dtype:
        return None
    buf = getattr(_workspace, "pre", None)
    # (A buffer made under inference_mode, e.g. by the analysis pass, cannot be written outside it.)
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or stale or buf.numel() < B * N or buf.dtype != x_BD.dtype:
        buf = _workspace.pre = torch.empty(B * N, dtype=x_BD.dtype)
    return buf[: B * N].view(B, N)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # Invariant checks cost a pass over the indices; ours hold by construction (rows sorted).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" (once per process)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


# --------------------------------------------------------------------------------- top-k selection
# On an H100, torch.topk over the [B, n] pre-activations is the slowest piece of a TopK step (TARGETS.md:
# 0.86 ms at GPT-2 shape, 4x the encoder GEMM; about six memory passes). ``two_stage_topk`` selects the
# same set from ~k·g + n/g candidates after one pass. On the CPU, torch.topk costs a few ns per entry
# and a reduction over 32 contiguous columns vectorizes poorly, so ``strided_topk`` groups columns
# j, j + n/g, j + 2n/g, ... instead (the group maxima are then an element-wise max of g contiguous
# rows) and sizes g to the row (``strided_group``). Interleaved, 2-core CPU (scripts/bench_topk.py):
# 1.5x torch.topk at B 4096, n 6144, k 32, 1.65x at k 64, 1.9x at n 24576 (B 1024), 2.1x at n 65536
# (B 256). "auto" means two stages with contiguous groups on CUDA (measured there), strided elsewhere.
TOPK_GROUP = 32  # g ~ sqrt(n / k) balances the two stages: 24576/32 -> 28, 65536/64 -> 32


def two_stage_topk(pre_BN: Tensor, k: int, group: int = TOPK_GROUP) -> tuple[Tensor, Tensor]:
    """(vals_BK, idx_BK), unsorted, of the k largest entries per row; the same set as torch.topk.

    Split each row into groups of ``group`` columns and take each group's max. Let t be the k-th
    largest group max: the k groups holding the k largest maxima hold k distinct entries >= t, so any
    entry of another group (<= its max <= t) is at best the (k+1)-th largest. Hence the top k of the
    row lie in those k groups, and a top-k over their k·group entries finds them. Needs n % group == 0
    and k <= n / group."""
    B, N = pre_BN.shape
    groups_BGg = pre_BN.view(B, N // group, group)
    top_groups_BK = groups_BGg.amax(-1).topk(k, dim=-1, sorted=False).indices
    cand_BC = groups_BGg.gather(1, top_groups_BK[..., None].expand(B, k, group)).view(B, k * group)
    vals_BK, loc_BK = cand_BC.topk(k, dim=-1, sorted=False)
    group_BK = top_groups_BK.gather(1, torch.div(loc_BK, group, rounding_mode="floor"))
    return vals_BK, group_BK * group + loc_BK % group


def strided_group(N: int, k: int) -> int:
    """``strided_topk``'s group size for rows of N: the power of two nearest sqrt(N / 2k), which
    minimizes N/g + 2·k·g (the second stage gathers as well as selects, about twice the per-entry
    cost of the first), among those dividing N with N/g >= k. 0 when no group of 2 or more fits."""
    target = math.log2(max(N / (2 * k), 1.0)) / 2  # log2 of sqrt(N / 2k)
    for e in sorted(range(1, 21), key=lambda e: abs(e - target)):
        if N % (1 << e) == 0 and N >> e >= k:
            return 1 << e
    return 0


def strided_topk(pre_BN: Tensor, k: int, group: int) -> tuple[Tensor, Tensor]:
    """(vals_BK, idx_BK), unsorted, of the k largest entries per row; the same set as torch.topk.

    Group g of the N/group groups holds columns g, g + N/group, g + 2N/group, ... (any partition
    will do for ``two_stage_topk``'s argument: the k groups with the largest maxima hold every entry
    of the top k). Needs contiguous rows, N % group == 0 and k <= N / group."""
    B, N = pre_BN.shape
    m = N // group
    top_groups_BK = pre_BN.view(B, group, m).amax(1).topk(k, dim=-1, sorted=False).indices
    cols_BC = (top_groups_BK[:, :, None] + torch.arange(0, N, m, device=pre_BN.device)).view(B, k * group)
    vals_BK, loc_BK = pre_BN.gather(1, cols_BC).topk(k, dim=-1, sorted=False)
    return vals_BK, cols_BC.gather(1, loc_BK)


def resolve_topk_method(method: str, device: torch.device) -> str:
    return ("two_stage" if device.type == "cuda" else "strided") if method == "auto" else method


def select_topk(pre_BN: Tensor, k: int, method: str = "torch") -> tuple[Tensor, Tensor]:
    """Top-k + ReLU per row. Returns (idx_BK, vals_BK), indices sorted ascending within each row
    (CSR kernels want sorted column indices, and a canonical order makes outputs comparable).
    ``method``: "torch" (torch.topk), "two_stage" or "strided" (where the width allows; else
    torch.topk)."""
    N = pre_BN.shape[1]
    if method == "two_stage" and N % TOPK_GROUP == 0 and k <= N // TOPK_GROUP:
        vals_BK, idx_BK = two_stage_topk(pre_BN, k, TOPK_GROUP)
    elif method == "strided" and pre_BN.is_contiguous() and (group := strided_group(N, k)):
        vals_BK, idx_BK = strided_topk(pre_BN, k, group)
    else:
        vals_BK, idx_BK = pre_BN.topk(k, dim=-1, sorted=False)
    idx_BK, order_BK = idx_BK.sort(dim=-1)
    return idx_BK, vals_BK.gather(-1, order_BK).relu()


def _token_major(idx_BK: Tensor, values_BK: Tensor, n: int) -> Tensor:
    """The [B, n] CSR matrix with values_BK at idx_BK (each row holds exactly k entries)."""
    B, K = idx_BK.shape
    crow = torch.arange(0, B * K + 1, K, device=idx_BK.device)
    return _csr(crow, idx_BK.reshape(-1), values_BK.reshape(-1), (B, n))


def latent_order(ids: Tensor, n: int) -> Tensor:
    """The stable argsort of latent ids in [0, n): as int32 where they fit, which torch's CPU radix
    sort takes in half the passes (2.2 against 4.1 ms for 131k ids on the 2-core CPU)."""
    return torch.argsort(ids.to(torch.int32) if n <= 2**31 - 1 else ids, stable=True)


class LatentMajor:
    """The transpose of a [B, n] selection pattern as a latent-major CSR layout: row j lists the tokens
    that selected latent j. ``matmul`` then scatters per-entry-weighted token rows into latent rows,
    the shape of both W_enc's gradient (weights: value gradients, rows: x) and W_dec's (weights:
    values, rows: the output gradient)."""

    def __init__(self, idx_BK: Tensor, n: int):
        B, K = idx_BK.shape
        flat = idx_BK.reshape(-1)
        # Stable, so token ids stay ascending within each latent's row.
        self.order = latent_order(flat, n)
        self.tokens = torch.div(self.order, K, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=n)
        self.crow = torch.zeros(n + 1, dtype=torch.int64, device=idx_BK.device)
        torch.cumsum(counts, 0, out=self.crow[1:])
        self.shape = (n, B)

    def matmul(self, values_BK: Tensor, dense_BD: Tensor, backend: str = "torch") -> Tensor:
        """[n, d]: row j = sum over tokens b that selected j of values[b, j'] * dense[b]."""
        if backend == "triton":
            return _triton().csr_rows(self.crow, self.tokens, values_BK.reshape(-1)[self.order], dense_BD)
        S_NB = _csr(self.crow, self.tokens, values_BK.reshape(-1)[self.order], self.shape)
        if dense_BD.device.type == "cpu" and dense_BD.dtype in (torch.float32, torch.float64):
            # torch.sparse.mm zero-fills a result, computes into another and copies: three [n, d]
            # passes where MKL's CSR product with beta 0 writes every row once (rows with no entry
            # become 0, whatever the empty memory held): 0.66 against 1.5 ms at n 6144, d 384, B 512
            # on the 2-core CPU, twice per step. (Other devices and dtypes take sparse.mm.)
            out_ND = torch.empty(self.shape[0], dense_BD.shape[1], dtype=dense_BD.dtype)
            return out_ND.addmm_(S_NB, dense_BD, beta=0)
        return torch.sparse.mm(S_NB, dense_BD)


class SharedLayout:
    """One ``LatentMajor`` for a step's encoder and decoder backward, built on first use: both take the
    transpose of the same selection (the W_enc and W_dec gradients), and building it is an argsort of
    all B·k entries. Passed to both autograd Functions as a plain argument."""

    def __init__(self):
        self.layout: LatentMajor | None = None

    def get(self, make) -> LatentMajor:
        """The layout, made by ``make()`` the first time."""
        if self.layout is None:
            self.layout = make()
        return self.layout


def _layout(shared: SharedLayout | None, idx_BK: Tensor, n: int) -> LatentMajor:
    return shared.get(lambda: LatentMajor(idx_BK, n)) if shared is not None else LatentMajor(idx_BK, n)


def gather_dots(idx_BK: Tensor, g_BD: Tensor, W_ND: Tensor, backend: str = "torch") -> Tensor:
    """[B, k]: out[b, j] = g[b] . W[idx[b, j]], i.e. (g @ W.T) sampled at the pattern (an SDDMM)."""
    if backend == "triton":
        return _triton().gather_dots(idx_BK, g_BD, W_ND)
    pattern = _token_major(idx_BK, g_BD.new_zeros(idx_BK.numel()), W_ND.shape[0])
    out = torch.sparse.sampled_addmm(pattern, g_BD, W_ND.T, beta=0.0)
    return out.values().view(idx_BK.shape)


def _decode(idx_BK: Tensor, vals_BK: Tensor, W_ND: Tensor, backend: str = "torch") -> Tensor:
    vals_BK = vals_BK.to(W_ND.dtype)
    if backend == "triton":
        return _triton().decode(idx_BK, vals_BK, W_ND)
    return F.embedding_bag(idx_BK, W_ND, per_sample_weights=vals_BK, mode="sum")


# ------------------------------------------------------------------------------- the sparse decoder
class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx_BK: Tensor, vals_BK: Tensor, W_dec_ND: Tensor, backend: str,
                shared: SharedLayout | None) -> Tensor:
        ctx.save_for_backward(idx_BK, vals_BK, W_dec_ND)
        ctx.backend, ctx.shared = backend, shared
        return _decode(idx_BK, vals_BK, W_dec_ND, backend)

    @staticmethod
    def backward(ctx, g_BD: Tensor):
        with torch.autocast(g_BD.device.type, enabled=False):  # dtypes are managed here
            return _SparseDecode._backward(ctx, g_BD)

    @staticmethod
    def _backward(ctx, g_BD: Tensor):
        idx_BK, vals_BK, W_dec_ND = ctx.saved_tensors
        g_BD = g_BD.to(W_dec_ND.dtype).contiguous()
        g_vals = None
        if ctx.needs_input_grad[1]:
            g_vals = gather_dots(idx_BK, g_BD, W_dec_ND, ctx.backend).to(vals_BK.dtype)
        g_W = None
        if ctx.needs_input_grad[2]:
            g_W = _layout(ctx.shared, idx_BK, W_dec_ND.shape[0]).matmul(vals_BK.to(g_BD.dtype), g_BD,
                                                                        ctx.backend)
        return None, g_vals, g_W, None, None


def sparse_decode(idx_BK: Tensor, vals_BK: Tensor, W_dec_ND: Tensor, backend: str = "torch",
                  shared: SharedLayout | None = None) -> Tensor:
    """[B, d] = sum_j vals[b, j] * W_dec[idx[b, j]] (no bias), with an O(B·k·d) backward. ``shared``:
    the layout the encoder of the same selection uses (built once for both backward passes)."""
    with torch.autocast(idx_BK.device.type, enabled=False):
        return _SparseDecode.apply(idx_BK, vals_BK, W_dec_ND, backend, shared)


# ------------------------------------------------------------------ chunked top-k pre-activations
# The most pre-activations held at once: 2^27 (512 MiB in fp32, 256 MiB in bf16). The dense [B, n]
# matrix at B 8192, n 65536 would be 2 GiB in fp32; chunks of 2048 tokens keep the GEMM as efficient
# (each is still a [2048, d] x [d, 65536] product) and bound the memory whatever the width.
PRE_CHUNK_ELEMENTS = 1 << 27


def chunk_rows(B: int, N: int, chunk: int = 0) -> int:
    """Tokens per chunk: ``chunk`` if set, else as many as keep a chunk under PRE_CHUNK_ELEMENTS."""
    return max(1, min(B, chunk if chunk > 0 else PRE_CHUNK_ELEMENTS // N))


def topk_chunked(x_c_BD: Tensor, W_enc_DN: Tensor, b_enc_N: Tensor, k: int, cols_M: Tensor,
                 chunk: int = 0, method: str = "torch") -> tuple[Tensor, Tensor, Tensor]:
    """(idx_BK, vals_BK, pre_BM) of pre = x_c @ W_enc + b_enc, never holding more than one chunk of
    [rows, n] pre-activations; pre_BM are the columns ``cols_M`` (AuxK's dead latents). No autograd:
    ``topk_encode`` wraps this with the sparse backward."""
    B, N = x_c_BD.shape[0], W_enc_DN.shape[1]
    rows = chunk_rows(B, N, chunk)
    if rows >= B:
        return _topk_block(x_c_BD, W_enc_DN, b_enc_N, k, cols_M, method)
    parts = [_topk_block(x_c_BD[s:s + rows], W_enc_DN, b_enc_N, k, cols_M, method) for s in range(0, B, rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _topk_block(x_c_BD: Tensor, W_enc_DN: Tensor, b_enc_N: Tensor, k: int, cols_M: Tensor, method: str):
    with torch.no_grad():
        out = _pre_buffer(x_c_BD.shape[0], W_enc_DN.shape[1], x_c_BD, W_enc_DN)
        if out is None:
            pre_BN = torch.addmm(b_enc_N, x_c_BD, W_enc_DN)  # autocast may make this bf16
        else:
            pre_BN = torch.addmm(b_enc_N, x_c_BD, W_enc_DN, out=out)
        idx_BK, vals_BK = select_topk(pre_BN, k, method)
        pre_BM = pre_BN.index_select(1, cols_M).to(W_enc_DN.dtype)  # fresh: the buffer is reused
        return idx_BK, vals_BK.to(W_enc_DN.dtype), pre_BM


# ------------------------------------------------------------------------------- the sparse encoder
class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_DN, b_enc_N, k: int, cols_M: Tensor | None, opts: Resolved,
                shared: SharedLayout | None):
        x_c_BD = x_BD - b_dec_D
        if cols_M is None:
            cols_M = torch.zeros(0, dtype=torch.long, device=x_BD.device)
        idx_BK, vals_BK, pre_BM = topk_chunked(x_c_BD, W_enc_DN, b_enc_N, k, cols_M, opts.chunk_tokens,
                                               opts.topk_method)
        ctx.save_for_backward(x_c_BD, W_enc_DN, idx_BK, vals_BK, cols_M)
        ctx.device_type, ctx.backend, ctx.shared = x_BD.device.type, opts.backend, shared
        ctx.mark_non_differentiable(idx_BK)
        ctx.set_materialize_grads(False)
        return vals_BK, idx_BK, pre_BM

    @staticmethod
    def backward(ctx, g_vals_BK, _g_idx, g_pre_BM):
        with torch.autocast(ctx.device_type, enabled=False):  # dtypes are managed here
            return _TopKEncode._backward(ctx, g_vals_BK, g_pre_BM)

    @staticmethod
    def _backward(ctx, g_vals_BK, g_pre_BM):
        x_c_BD, W_enc_DN, idx_BK, vals_BK, cols_M = ctx.saved_tensors
        D, N = W_enc_DN.shape
        dtype = W_enc_DN.dtype
        g_x_BD = x_c_BD.new_zeros(x_c_BD.shape, dtype=dtype) if ctx.needs_input_grad[0] else None
        if g_vals_BK is not None:
            g_BK = torch.where(vals_BK > 0, g_vals_BK.to(dtype), 0.0)  # ReLU after the top-k
            g_W_enc_ND = _layout(ctx.shared, idx_BK, N).matmul(g_BK, x_c_BD, ctx.backend)
            g_b_enc_N = torch.zeros(N, dtype=dtype, device=g_BK.device).index_add_(
                0, idx_BK.reshape(-1), g_BK.reshape(-1))
            if g_x_BD is not None:
                g_x_BD += _decode(idx_BK, g_BK, W_enc_DN.T.contiguous(), ctx.backend)
        else:
            g_W_enc_ND = x_c_BD.new_zeros(N, D, dtype=dtype)
            g_b_enc_N = x_c_BD.new_zeros(N, dtype=dtype)
        add_dead_column_grads(g_pre_BM, cols_M, x_c_BD, W_enc_DN, g_W_enc_ND, g_b_enc_N, g_x_BD)
        # pre = (x - b_dec) @ W_enc + b_enc, so d pre / d b_dec = -W_enc: summed over the batch that
        # is -W_enc @ (the b_enc gradient), whatever mix of selections produced it.
        g_b_dec_D = -(W_enc_DN @ g_b_enc_N) if ctx.needs_input_grad[1] else None
        return g_x_BD, g_b_dec_D, g_W_enc_ND.T, g_b_enc_N, None, None, None, None


def add_dead_column_grads(g_pre_BM: Tensor | None, cols_M: Tensor, x_c_BD: Tensor, W_enc_DN: Tensor,
                          g_W_enc_ND: Tensor, g_b_enc_N: Tensor, g_x_BD: Tensor | None) -> None:
    """Add, in place, the gradients from AuxK's dense pre-activations of the dead columns ``cols_M``
    (pre_BM = x_c @ W_enc[:, cols_M] + b_enc[cols_M]) to the encoder's and the input's gradients."""
    if g_pre_BM is None or not cols_M.numel():
        return
    g_pre_BM = g_pre_BM.to(W_enc_DN.dtype)
    g_W_enc_ND.index_add_(0, cols_M, g_pre_BM.T @ x_c_BD)
    g_b_enc_N.index_add_(0, cols_M, g_pre_BM.sum(0))
    if g_x_BD is not None:
        g_x_BD += g_pre_BM @ W_enc_DN.index_select(1, cols_M).T


class SAEWeights(NamedTuple):
    """The parameters of one SAE, in the shapes the kernels take."""

    b_dec_D: Tensor
    W_enc_DN: Tensor
    b_enc_N: Tensor
    W_dec_ND: Tensor


def topk_encode(x_BD: Tensor, w: SAEWeights, k: int, cols_M: Tensor | None = None,
                opts: KernelOptions = KernelOptions(),
                shared: SharedLayout | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k of pre = (x - b_dec) @ W_enc + b_enc, ReLU'd. Returns (vals_BK, idx_BK, pre_BM) where
    pre_BM holds the dense pre-activations of columns ``cols_M`` (for AuxK; [B, 0] if None).
    Gradients flow to x, b_dec, W_enc, b_enc through the selected entries and pre_BM only.
    ``opts`` (resolved for the device, ``KernelOptions.on``) sets the chunking, selection and backend;
    ``shared``, the layout the decoder of this selection uses (see ``SharedLayout``)."""
    opts = opts.on(x_BD.device)
    return _TopKEncode.apply(x_BD, w.b_dec_D, w.W_enc_DN, w.b_enc_N, k, cols_M, opts, shared)


def _densify_grad(param: Tensor) -> None:
    """Post-accumulate hook: a gradient that is still sparse (only AuxK's rows reached it) turns dense,
    so a parameter's .grad is always a plain tensor (optimizers, clipping and DDP expect one)."""
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


def _dead_rows(W_dec_ND: Tensor, dead_M: Tensor) -> Tensor:
    """W_dec's dead rows. For a parameter, through a sparse-gradient lookup: its gradient is M rows,
    which autograd adds into the main decode's dense W_dec gradient (through index_select it was a
    zero-filled [n, d] tensor plus an [n, d] sum: ~3.5 ms per step at n 6144, d 384 on the 2-core CPU,
    whatever the batch). The hook makes the gradient dense where AuxK's is the only one (a backward of
    the aux loss alone); it is registered here, once per parameter, so copies of a model get it too."""
    if not (W_dec_ND.is_leaf and W_dec_ND.requires_grad):
        return W_dec_ND.index_select(0, dead_M)  # a computed decoder: its producer wants a dense grad
    hooks = getattr(W_dec_ND, "_post_accumulate_grad_hooks", None) or {}
    if _densify_grad not in hooks.values():
        W_dec_ND.register_post_accumulate_grad_hook(_densify_grad)
    return F.embedding(dead_M, W_dec_ND, sparse=True)


def auxk_decode(pre_BM: Tensor, dead_M: Tensor, auxk_k: int, W_dec_ND: Tensor, backend: str = "torch") -> Tensor:
    """AuxK's reconstruction (no decoder bias) from the top auxk_k of the dead latents' pre-activations.

    pre_BM holds the pre-activations of the dead latents ``dead_M`` only, so the top-k is taken among
    dead latents by construction (same as masking live ones to -inf over all n)."""
    M = dead_M.numel()
    vals_BA, loc_BA = pre_BM.topk(min(auxk_k, M), dim=-1, sorted=False)
    vals_BA = vals_BA.relu()
    W_MD = _dead_rows(W_dec_ND, dead_M)
    if M <= AUXK_DENSE_FACTOR * auxk_k:
        code_BM = torch.zeros_like(pre_BM).scatter(1, loc_BA, vals_BA)
        return code_BM @ W_MD
    loc_BA, order = loc_BA.sort(dim=-1)
    return sparse_decode(loc_BA, vals_BA.gather(-1, order), W_MD, backend)


# ------------------------------------------------------------------------ fast and naive TopK SAEs
class TopKResult(NamedTuple):
    xhat_BD: Tensor  # reconstruction without the decoder bias
    idx_BK: Tensor
    vals_BK: Tensor
    ehat_BD: Tensor | None  # AuxK reconstruction of the residual (no bias); None if nothing is dead


def topk_sae_fast(x_BD: Tensor, w: SAEWeights, k: int, dead_M: Tensor | None, auxk_k: int,
                  opts: KernelOptions = KernelOptions()) -> TopKResult:
    """Sparse kernels throughout; ``dead_M`` holds the ids of dead latents (or None)."""
    opts = opts.on(x_BD.device)
    use_aux = dead_M is not None and dead_M.numel() > 0
    shared = SharedLayout()
    vals_BK, idx_BK, pre_BM = topk_encode(x_BD, w, k, dead_M if use_aux else None, opts, shared)
    xhat_BD = sparse_decode(idx_BK, vals_BK, w.W_dec_ND, opts.backend, shared)
    ehat_BD = auxk_decode(pre_BM, dead_M, auxk_k, w.W_dec_ND, opts.backend) if use_aux else None
    return TopKResult(xhat_BD, idx_BK, vals_BK, ehat_BD)


def topk_sae_naive(x_BD: Tensor, w: SAEWeights, k: int, dead_M: Tensor | None, auxk_k: int,
                   opts: KernelOptions | None = None) -> TopKResult:
    """The reference: dense [B, n] codes, dense decoder GEMMs, autograd's dense backward, and AuxK as
    in Gao et al.'s code (live latents masked to -inf over all n, dense aux code). ``opts`` is unused:
    the reference holds all [B, n] pre-activations, uses dense products and torch.topk."""
    pre_BN = torch.addmm(w.b_enc_N, x_BD - w.b_dec_D, w.W_enc_DN)
    idx_BK, vals_BK = select_topk(pre_BN, k)
    code_BN = torch.zeros_like(pre_BN).scatter(1, idx_BK, vals_BK)
    xhat_BD = code_BN @ w.W_dec_ND
    ehat_BD = None
    if dead_M is not None and dead_M.numel() > 0:
        dead_N = torch.zeros(pre_BN.shape[1], dtype=torch.bool, device=pre_BN.device)
        dead_N[dead_M] = True
        aux_vals, aux_idx = pre_BN.masked_fill(~dead_N, float("-inf")).topk(
            min(auxk_k, dead_M.numel()), dim=-1, sorted=False)
        ehat_BD = torch.zeros_like(pre_BN).scatter(1, aux_idx, aux_vals.relu()) @ w.W_dec_ND
    return TopKResult(xhat_BD, idx_BK, vals_BK, ehat_BD)
