"""Triton versions of the TopK fast path's three sparse products (the training config's `kernels.backend: triton`).

The torch backend in kernels.py builds them from library calls: ``embedding_bag`` (decode),
``sparse.sampled_addmm`` (value gradients) and a CSR ``sparse.mm`` (weight gradients). These kernels do
the same arithmetic in one launch each, reading W rows once per (token, selected latent) and
accumulating in fp32 whatever the storage dtype:

* ``decode``:      out[b] = sum_j vals[b, j] * W[idx[b, j]]                    grid (B, d blocks)
* ``gather_dots``: out[b, j] = g[b] . W[idx[b, j]]                               grid (B,)
* ``csr_rows``:    out[r] = sum_{p in row r} val[p] * dense[col[p]]  (CSR x dense) grid (rows, d blocks)

``csr_rows`` takes the latent-major layout that ``kernels.LatentMajor`` already builds (rows sorted by
latent, tokens ascending within a row), so the sum order is fixed: no atomics, deterministic results.

On CUDA tensors the kernels are compiled. With TRITON_INTERPRET=1 in the environment before triton is
imported, Triton's interpreter runs the same kernel code on CPU tensors (slowly): that is how CI, which
has no GPU, checks these kernels against the torch path (tests/conftest.py sets it).
Triton is optional: without it only the torch backend exists, and asking for this one says so.
"""
from __future__ import annotations

import torch
from torch import Tensor

from saekit.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs none of this
    triton = None


def available() -> bool:
    return triton is not None


def require() -> None:
    if triton is None:
        raise UserError("kernels.backend: triton needs the triton package (pip install triton); "
                        "kernels.backend: torch needs nothing extra")


if triton is not None:
    @triton.jit
    def _decode_kernel(idx_ptr, vals_ptr, w_ptr, out_ptr, K, D,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k, mask_d = offs_k < K, offs_d < D
        idx = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)
        vals = tl.load(vals_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + idx[:, None] * D + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :],
                       other=0.0).to(tl.float32)
        acc = tl.sum(rows * vals[:, None], axis=0)
        tl.store(out_ptr + b * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _gather_dots_kernel(idx_ptr, g_ptr, w_ptr, out_ptr, K, D,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = tl.load(g_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            rows = tl.load(w_ptr + idx[:, None] * D + offs_d[None, :],
                           mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(rows * g[None, :], axis=1)
        tl.store(out_ptr + b * K + offs_k, acc.to(out_ptr.dtype.element_ty), mask=mask_k)

    @triton.jit
    def _csr_rows_kernel(crow_ptr, col_ptr, val_ptr, dense_ptr, out_ptr, D,
                         BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        start = tl.load(crow_ptr + r)
        end = tl.load(crow_ptr + r + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mask_p = offs_p < end
            col = tl.load(col_ptr + offs_p, mask=mask_p, other=0)
            val = tl.load(val_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            rows = tl.load(dense_ptr + col[:, None] * D + offs_d[None, :],
                           mask=mask_p[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(rows * val[:, None], axis=0)
        tl.store(out_ptr + r * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


def _for(kernel, t: Tensor):
    # Compiled kernels need CUDA tensors. Under TRITON_INTERPRET=1 (set before triton is imported;
    # tests/conftest.py does on machines without a GPU) they are interpreted and take CPU tensors.
    if t.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise UserError("kernels.backend: triton runs on CUDA tensors (on CPU only in Triton's "
                        "interpreter, TRITON_INTERPRET=1, for tests); use kernels.backend: torch on CPU")
    return kernel


BLOCK_D = 128  # one 128-wide slice of a row per program: 512 bytes of fp32, coalesced loads
BLOCK_P = 16  # CSR entries per inner iteration of csr_rows


def decode(idx_BK: Tensor, vals_BK: Tensor, W_ND: Tensor) -> Tensor:
    require()
    B, K = idx_BK.shape
    D = W_ND.shape[1]
    out = W_ND.new_empty(B, D)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _for(_decode_kernel, W_ND)[grid](idx_BK.contiguous(), vals_BK.contiguous(), W_ND.contiguous(), out, K, D,
                                     BLOCK_K=triton.next_power_of_2(K), BLOCK_D=BLOCK_D)
    return out


def gather_dots(idx_BK: Tensor, g_BD: Tensor, W_ND: Tensor) -> Tensor:
    require()
    B, K = idx_BK.shape
    D = W_ND.shape[1]
    out = W_ND.new_empty(B, K)
    _for(_gather_dots_kernel, W_ND)[(B,)](idx_BK.contiguous(), g_BD.contiguous(), W_ND.contiguous(), out, K, D,
                                          BLOCK_K=triton.next_power_of_2(K), BLOCK_D=BLOCK_D)
    return out


def csr_rows(crow_R: Tensor, col_P: Tensor, val_P: Tensor, dense_CD: Tensor) -> Tensor:
    """[R, d]: row r = sum over p in [crow[r], crow[r+1]) of val[p] * dense[col[p]]."""
    require()
    R, D = crow_R.numel() - 1, dense_CD.shape[1]
    out = dense_CD.new_empty(R, D)
    grid = (R, triton.cdiv(D, BLOCK_D))
    _for(_csr_rows_kernel, dense_CD)[grid](crow_R.contiguous(), col_P.contiguous(), val_P.contiguous(),
                                           dense_CD.contiguous(), out, D, BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D)
    return out
