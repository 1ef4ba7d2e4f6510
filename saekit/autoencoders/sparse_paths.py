"""Sparse steps for the families whose number of active latents varies per token: BatchTopK (and its
Matryoshka variant), JumpReLU and ReLU. Like the TopK fast path (kernels.py) they do one dense product,
the encoder GEMM, in chunks of tokens; everything after it is proportional to the active entries.

The code is held as CSR by token (``Csr``: row offsets ``crow`` [B+1], latent ids ``col`` ascending
within each token, and each entry's token ``row``): no padding, so a token holding many latents costs what
its entries cost, and the sparse decode (``F.embedding_bag`` with offsets), its sampled dot products
(``torch.sparse.sampled_addmm`` on the same CSR pattern) and the latent-major weight gradients
(``LatentMajor``) take it as it is. (Padded [B, max count] indices would make every product scale with
the fullest token's count, which BatchTopK leaves unbounded.) ``Output`` gets the padded form, built
once per step from the CSR (``padded``), since its (indices, values) are per-token rows.

Selection, per family (all on the chunked pre-activations, under no_grad; ``SparseEncode`` wraps it with
the sparse backward):

* ReLU, and BatchTopK at inference (the learned threshold): the entries above a scalar ``lo``
  (0, or the threshold). One mask and one ``nonzero`` pass per chunk; the flat positions of a row-major
  block come out sorted by token, then latent: CSR by construction.
* JumpReLU: the code is pre > theta_j, but the threshold's pseudo-derivative (jumprelu.py) also needs the
  output gradient at every entry within eps/2 *below* theta_j, where the code is 0. Those entries are
  extracted too, as ``probe`` entries: the decoder gets them with value zero (so the forward is the
  code's alone) and its backward returns their sampled dot products ``g . W_dec[j]``, exactly the dense
  path's ``g_code[b, j]`` there. One mask pass with theta_j - eps/2 (a hair lower, so float rounding
  never loses a band entry); the exact band test, the dense formula ``|(pre - theta)/eps| < 1/2``, runs
  on the extracted entries only.
* BatchTopK training: the k·B largest of relu(pre) over the whole [B, n] batch, without a top-k over
  all B·n of them (``batch_topk_select``). Exactness: extract S = {pre > lo} for a guess lo >= 0.
  If |S| >= k·B, S holds k·B entries > lo, so the (k·B)-th largest value t* > lo, and every entry
  outside S (<= lo < t*) has k·B entries strictly above it: it is no winner. So the k·B largest of S
  are the k·B largest of the batch, whatever the spread over tokens (one token may hold any number of
  them: nothing here is per token). If |S| < k·B and lo = 0, S is every positive entry and the batch
  top-k keeps all of them (the rest of its k·B are zeros, which the code does not hold). Otherwise
  the guess was too high: lower it and extract again (the block's pre-activations are kept when the
  batch is one chunk, recomputed when chunked); lo = 0 always succeeds. The guess is the previous
  batch's smallest kept value times ``GUESS_MARGIN`` (a 0-dim tensor: no host sync to form it), or at
  the first batch a quantile of a strided sample of the first chunk. Measured on the 2-core CPU
  (B 4096, n 6144, k 32, one run): a flat top-k of all B·n (the dense path's) 850 ms; mask + nonzero
  63 ms; for scale, a k·B top-k among 4·k·B candidates 4 ms.

Dense fallback (ReLU, JumpReLU): when the pattern (code, plus JumpReLU's probe entries) is dense, dense
GEMMs win. ``SPARSE_MAX_DENSITY`` is the crossover, measured as full ReLU training steps (forward,
backward, Adam) on the 2-core CPU, B 4096, d 384, n 6144, the biases set for each density, sparse vs
dense ms/step (median of 3, the machine shared, so within-run ratios only): 0.5% 530 vs 1591,
2% 680 vs 1262, 5% 1219 vs 1290 and 1342 vs 1488 (two runs), 10% 1596 vs 1536, 15% 1580 vs 1172,
20% 2088 vs 1456, 30% 2745 vs 1515: break-even at ~8-10% of [B, n]. The models decide per step from the
previous step's density (the sparse path knows it for free, the dense path counts it), starting dense.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.autoencoders.kernels import (LatentMajor, Resolved, SAEWeights, SharedLayout, _csr, _pre_buffer,
                                         add_dead_column_grads, auxk_decode, chunk_rows, latent_order)

SPARSE_MAX_DENSITY = 0.08  # fraction of [B, n] in the pattern above which the dense step is faster
GUESS_MARGIN = 0.9  # BatchTopK: next lo = this * the previous batch's smallest kept value
GUESS_SAMPLE_STRIDE = 97  # BatchTopK's first guess: every 97th pre-activation of the first chunk
JUMP_BAND_SLACK = 1e-3  # JumpReLU extracts pre > theta - eps * (1/2 + slack): no band entry is lost


class Csr(NamedTuple):
    """A sparse pattern by row (token): entries crow[r]:crow[r+1] are row r's, latent ids ascending."""

    crow: Tensor  # [R + 1] int64
    col: Tensor  # [E] int64
    row: Tensor  # [E] int64, ascending

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1


def csr_from_rows(row: Tensor, col: Tensor, n_rows: int) -> Csr:
    """The Csr of entries already sorted by row (and by latent within a row)."""
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=row.device)
    torch.cumsum(torch.bincount(row, minlength=n_rows), 0, out=crow[1:])
    return Csr(crow, col, row)


def latent_major(p: Csr, n: int, shared: SharedLayout | None = None) -> LatentMajor:
    """The transpose layout of ``p`` (row j of the result lists the tokens holding latent j); with
    ``shared``, the one the encoder and decoder backward of the same pattern both use."""
    if shared is not None:
        return shared.get(lambda: latent_major(p, n))
    lm = LatentMajor.__new__(LatentMajor)
    lm.order = latent_order(p.col, n)
    lm.tokens = p.row[lm.order]
    lm.crow = torch.zeros(n + 1, dtype=torch.int64, device=p.col.device)
    torch.cumsum(torch.bincount(p.col, minlength=n), 0, out=lm.crow[1:])
    lm.shape = (n, p.n_rows)
    return lm


def csr_decode(p: Csr, vals_E: Tensor, W_ND: Tensor) -> Tensor:
    """[R, d]: row r = sum of vals[e] * W[col[e]] over r's entries (empty rows give zeros)."""
    if p.col.numel() == 0:
        return W_ND.new_zeros(p.n_rows, W_ND.shape[1])
    return F.embedding_bag(p.col, W_ND, p.crow, per_sample_weights=vals_E.to(W_ND.dtype), mode="sum",
                           include_last_offset=True)


def csr_dots(p: Csr, g_RD: Tensor, W_ND: Tensor) -> Tensor:
    """[E]: g[row[e]] . W[col[e]], the entries of g @ W.T sampled at the pattern (an SDDMM)."""
    if p.col.numel() == 0:
        return g_RD.new_zeros(0)
    pattern = _csr(p.crow, p.col, g_RD.new_zeros(p.col.numel()), (p.n_rows, W_ND.shape[0]))
    return torch.sparse.sampled_addmm(pattern, g_RD, W_ND.T, beta=0.0).values()


def padded(p: Csr, vals_E: Tensor) -> tuple[Tensor, Tensor]:
    """([R, m] latent ids, [R, m] values) with m the largest row count, short rows padded with latent
    0 at value 0: the (indices, values) form of ``Output`` (zeros count as inactive there)."""
    counts = p.crow.diff()
    m = int(counts.max()) if counts.numel() else 0
    pos = torch.arange(p.col.numel(), device=p.col.device) - p.crow[p.row]
    idx = torch.zeros(p.n_rows, m, dtype=torch.int64, device=p.col.device).index_put_((p.row, pos), p.col)
    vals = vals_E.new_zeros(p.n_rows, m).index_put((p.row, pos), vals_E)
    return idx, vals


# ------------------------------------------------------------------------------------- selection
class Rule(NamedTuple):
    """What ``SparseEncode`` selects: "above" (pre > lo, a float or 0-dim tensor >= 0), "jumprelu"
    (pre > theta_N, with the probe band; ``eps`` the bandwidth) or "batchtopk" (``k`` per token on
    average; ``lo`` the guess, None at the first batch)."""

    kind: str
    lo: float | Tensor | None = 0.0
    k: int = 0
    eps: float = 1.0


class Selection(NamedTuple):
    p: Csr  # the code's entries
    vals_E: Tensor  # their pre-activations (all > 0)
    probe: Csr | None  # JumpReLU: band entries below the threshold
    probe_pre_P: Tensor | None
    pre_BM: Tensor  # pre-activations of the columns cols_M (AuxK's dead latents)
    low: Tensor  # smallest kept value (BatchTopK's threshold statistic); +inf if nothing was kept


def _blocks(x_c_BD: Tensor, W_enc_DN: Tensor, b_enc_N: Tensor, chunk: int):
    """(first row, [rows, n] pre-activations) per chunk; the block lives in a reused buffer on CPU, so
    it is only valid until the next one is made."""
    B, N = x_c_BD.shape[0], W_enc_DN.shape[1]
    rows = chunk_rows(B, N, chunk)
    for s in range(0, B, rows):
        x = x_c_BD[s:s + rows]
        out = _pre_buffer(x.shape[0], N, x, W_enc_DN)
        pre = torch.addmm(b_enc_N, x, W_enc_DN) if out is None else torch.addmm(b_enc_N, x, W_enc_DN, out=out)
        yield s, pre.to(W_enc_DN.dtype)


def _above(pre_BN: Tensor, lo, first_row: int):
    """(rows, cols, values) of the entries pre > lo (lo: scalar, 0-dim or [n]), row-major order."""
    N = pre_BN.shape[1]
    flat = (pre_BN > lo).view(-1).nonzero().squeeze(1)
    vals = pre_BN.view(-1).index_select(0, flat)
    row = torch.div(flat, N, rounding_mode="floor")
    return row + first_row, flat - row * N, vals


def _first_guess(pre_BN: Tensor, k: int) -> Tensor:
    """A lo for the first BatchTopK batch: the value with ~1.5 k per token above it in a strided
    sample of one chunk (any lo is exact; a good one avoids a second extraction)."""
    sample = pre_BN.reshape(-1)[::GUESS_SAMPLE_STRIDE].float()
    keep = min(sample.numel(), max(1, round(sample.numel() * 1.5 * k / pre_BN.shape[1])))
    return sample.kthvalue(sample.numel() - keep + 1).values.clamp_min(0).to(pre_BN.dtype)


def _gather(parts):
    rows, cols, vals, pre_m = zip(*parts)
    return torch.cat(rows), torch.cat(cols), torch.cat(vals), torch.cat(pre_m)


def select(x_c_BD: Tensor, W_enc_DN: Tensor, b_enc_N: Tensor, theta_N: Tensor | None, rule: Rule,
           cols_M: Tensor, chunk: int = 0) -> Selection:
    """The code's entries by ``rule`` (see the module docstring), chunk by chunk. No autograd."""
    B = x_c_BD.shape[0]
    dtype = W_enc_DN.dtype
    with torch.no_grad():
        if rule.kind == "batchtopk":
            return _batch_topk(x_c_BD, W_enc_DN, b_enc_N, rule, cols_M, chunk)
        lo = rule.lo
        if rule.kind == "jumprelu":
            lo = theta_N - rule.eps * (0.5 + JUMP_BAND_SLACK)
        parts = [(*_above(pre, lo, s), pre.index_select(1, cols_M))
                 for s, pre in _blocks(x_c_BD, W_enc_DN, b_enc_N, chunk)]
        row, col, vals, pre_BM = _gather(parts)
        probe = probe_pre = None
        if rule.kind == "jumprelu":
            th = theta_N[col]
            code = vals > th
            band = ((vals - th) / rule.eps).abs() < 0.5
            below = band & ~code
            probe, probe_pre = csr_from_rows(row[below], col[below], B), vals[below]
            row, col, vals = row[code], col[code], vals[code]
        low = vals.min() if vals.numel() else torch.tensor(float("inf"), dtype=dtype, device=vals.device)
        return Selection(csr_from_rows(row, col, B), vals, probe, probe_pre, pre_BM, low)


def _batch_topk(x_c_BD, W_enc_DN, b_enc_N, rule: Rule, cols_M, chunk) -> Selection:
    B, N = x_c_BD.shape[0], W_enc_DN.shape[1]
    want = min(rule.k * B, B * N)
    single = chunk_rows(B, N, chunk) >= B
    kept_pre = None  # one chunk: its pre-activations, reused by a second extraction
    lo = rule.lo
    for attempt in range(5):
        if lo is not None and attempt == 4:
            lo = 0.0  # always succeeds
        parts = []
        for s, pre in ([(0, kept_pre)] if kept_pre is not None else _blocks(x_c_BD, W_enc_DN, b_enc_N, chunk)):
            if lo is None:
                lo = _first_guess(pre, rule.k)
            lo = torch.as_tensor(lo, dtype=pre.dtype, device=pre.device).clamp_min(0)
            parts.append((*_above(pre, lo, s), pre.index_select(1, cols_M)))
            if single:
                kept_pre = pre
        row, col, vals, pre_BM = _gather(parts)
        if vals.numel() >= want or not bool(lo > 0):
            break
        lo = lo * 0.5
    if vals.numel() > want:  # keep the k*B largest; positions stay in (token, latent) order
        drop = vals.topk(vals.numel() - want, largest=False, sorted=False).indices
        keep = torch.ones_like(vals, dtype=torch.bool).index_fill_(0, drop, False)
        row, col, vals = row[keep], col[keep], vals[keep]
    low = vals.min() if vals.numel() else torch.tensor(float("inf"), dtype=vals.dtype, device=vals.device)
    return Selection(csr_from_rows(row, col, B), vals, None, None, pre_BM, low)


# ------------------------------------------------------------------------------- the sparse encoder
class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_enc_DN, b_enc_N, theta_N, rule: Rule, cols_M: Tensor, chunk: int,
                shared: SharedLayout | None):
        x_c_BD = x_BD - b_dec_D
        s = select(x_c_BD, W_enc_DN, b_enc_N, theta_N, rule, cols_M, chunk)
        probe = s.probe if s.probe is not None else Csr(*(torch.zeros(n, dtype=torch.int64, device=x_BD.device)
                                                         for n in (x_BD.shape[0] + 1, 0, 0)))
        probe_pre = s.probe_pre_P if s.probe_pre_P is not None else x_BD.new_zeros(0, dtype=W_enc_DN.dtype)
        theta = theta_N if theta_N is not None else W_enc_DN.new_zeros(0)
        ctx.save_for_backward(x_c_BD, W_enc_DN, *s.p, s.vals_E, *probe, probe_pre, theta, cols_M)
        ctx.eps, ctx.jump = rule.eps, rule.kind == "jumprelu"
        ctx.device_type, ctx.shared = x_BD.device.type, shared
        ctx.set_materialize_grads(False)
        l0_B = s.p.crow.diff().to(W_enc_DN.dtype)
        probe_zeros = probe_pre.new_zeros(probe_pre.shape)
        outs = (*s.p, *probe, s.low)
        ctx.mark_non_differentiable(*outs)
        return (s.vals_E, probe_zeros, l0_B, s.pre_BM) + outs

    @staticmethod
    def backward(ctx, g_vals_E, g_probe_P, g_l0_B, g_pre_BM, *_):
        with torch.autocast(ctx.device_type, enabled=False):
            return _SparseEncode._backward(ctx, g_vals_E, g_probe_P, g_l0_B, g_pre_BM)

    @staticmethod
    def _backward(ctx, g_vals_E, g_probe_P, g_l0_B, g_pre_BM):
        (x_c_BD, W_enc_DN, crow, col, row, vals_E, p_crow, p_col, p_row, probe_pre, theta_N,
         cols_M) = ctx.saved_tensors
        D, N = W_enc_DN.shape
        dtype = W_enc_DN.dtype
        p = Csr(crow, col, row)
        g_x_BD = x_c_BD.new_zeros(x_c_BD.shape, dtype=dtype) if ctx.needs_input_grad[0] else None
        g_b_enc_N = x_c_BD.new_zeros(N, dtype=dtype)
        if g_vals_E is not None and col.numel():
            g_E = g_vals_E.to(dtype)  # every kept entry has pre > 0 (> theta): the local derivative is 1
            g_W_enc_ND = latent_major(p, N, ctx.shared).matmul(g_E, x_c_BD)
            g_b_enc_N.index_add_(0, col, g_E)
            if g_x_BD is not None:
                g_x_BD += csr_decode(p, g_E, W_enc_DN.T.contiguous())
        else:
            g_W_enc_ND = x_c_BD.new_zeros(N, D, dtype=dtype)
        add_dead_column_grads(g_pre_BM, cols_M, x_c_BD, W_enc_DN, g_W_enc_ND, g_b_enc_N, g_x_BD)
        g_theta_N = None
        if ctx.jump and ctx.needs_input_grad[4]:
            # jumprelu.py's pseudo-derivatives: d code/d theta = -(theta/eps) rect, d step/d theta =
            # -(1/eps) rect, rect = 1 on |(pre - theta)/eps| < 1/2: the kept entries in that band and
            # every probe entry (all of which are in it).
            eps = ctx.eps
            g_theta_N = theta_N.new_zeros(N)
            th_E = theta_N[col]
            rect_E = (((vals_E - th_E) / eps).abs() < 0.5).to(dtype)
            th_P = theta_N[p_col]
            part_E = torch.zeros_like(vals_E)
            part_P = torch.zeros_like(probe_pre)
            if g_vals_E is not None:
                part_E += -(th_E / eps) * rect_E * g_vals_E.to(dtype)
            if g_probe_P is not None:
                part_P += -(th_P / eps) * g_probe_P.to(dtype)
            if g_l0_B is not None:
                g_l0_B = g_l0_B.to(dtype)
                part_E += -(1.0 / eps) * rect_E * g_l0_B[row]
                part_P += -(1.0 / eps) * g_l0_B[p_row]
            g_theta_N.index_add_(0, col, part_E).index_add_(0, p_col, part_P)
        # pre = (x - b_dec) @ W_enc + b_enc: the b_dec gradient is -W_enc @ (the b_enc gradient).
        g_b_dec_D = -(W_enc_DN @ g_b_enc_N) if ctx.needs_input_grad[1] else None
        return g_x_BD, g_b_dec_D, g_W_enc_ND.T, g_b_enc_N, g_theta_N, None, None, None, None


class Encoded(NamedTuple):
    p: Csr
    vals_E: Tensor  # the code's values (autograd to x, b_dec, W_enc, b_enc)
    probe: Csr | None  # JumpReLU's band entries below theta (None for the others)
    probe_zeros_P: Tensor | None  # zeros whose gradient is the output gradient's dot there (to theta)
    l0_B: Tensor  # entries per token; JumpReLU: the step's straight-through gradient to theta
    pre_BM: Tensor  # AuxK's dead columns
    low: Tensor


def sparse_encode(x_BD: Tensor, w: SAEWeights, rule: Rule, theta_N: Tensor | None = None,
                  cols_M: Tensor | None = None, chunk: int = 0, shared: SharedLayout | None = None) -> Encoded:
    """The code of pre = (x - b_dec) @ W_enc + b_enc selected by ``rule``, as CSR by token, with the
    sparse backward. ``theta_N``: JumpReLU's thresholds (gradients by its pseudo-derivatives);
    ``shared``: the latent-major layout the decoder of this pattern uses too."""
    if cols_M is None:
        cols_M = torch.zeros(0, dtype=torch.long, device=x_BD.device)
    with torch.autocast(x_BD.device.type, enabled=False):
        out = _SparseEncode.apply(x_BD, w.b_dec_D, w.W_enc_DN, w.b_enc_N, theta_N, rule, cols_M, chunk, shared)
    vals, probe_zeros, l0_B, pre_BM, crow, col, row, p_crow, p_col, p_row, low = out
    probe = Csr(p_crow, p_col, p_row) if rule.kind == "jumprelu" else None
    return Encoded(Csr(crow, col, row), vals, probe, probe_zeros if probe is not None else None, l0_B,
                   pre_BM, low)


# ------------------------------------------------------------------------------- the sparse decoder
class _CsrDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, crow, col, row, vals_E, W_dec_ND, p_crow, p_col, p_row, probe_P, shared):
        ctx.save_for_backward(crow, col, row, vals_E, W_dec_ND, p_crow, p_col, p_row)
        ctx.has_probe, ctx.shared = probe_P is not None, shared
        return csr_decode(Csr(crow, col, row), vals_E, W_dec_ND)  # probe entries are zeros: no part

    @staticmethod
    def backward(ctx, g_RD):
        with torch.autocast(g_RD.device.type, enabled=False):
            crow, col, row, vals_E, W_dec_ND, p_crow, p_col, p_row = ctx.saved_tensors
            g_RD = g_RD.to(W_dec_ND.dtype).contiguous()
            p = Csr(crow, col, row)
            g_vals = csr_dots(p, g_RD, W_dec_ND).to(vals_E.dtype) if ctx.needs_input_grad[3] else None
            g_W = None
            if ctx.needs_input_grad[4]:
                g_W = (latent_major(p, W_dec_ND.shape[0], ctx.shared).matmul(vals_E.to(g_RD.dtype), g_RD)
                       if col.numel() else torch.zeros_like(W_dec_ND))
            g_probe = None
            if ctx.has_probe and ctx.needs_input_grad[8]:
                g_probe = csr_dots(Csr(p_crow, p_col, p_row), g_RD, W_dec_ND)
            return None, None, None, g_vals, g_W, None, None, None, g_probe, None


def sparse_decode_csr(p: Csr, vals_E: Tensor, W_dec_ND: Tensor, probe: Csr | None = None,
                      probe_zeros_P: Tensor | None = None, shared: SharedLayout | None = None) -> Tensor:
    """[R, d] = per row, sum of vals * W_dec rows (no bias), with an O(E·d) backward. ``probe``
    entries add nothing (value 0) but get their gradient, the sampled dot with W_dec; ``shared``, the
    layout the encoder of the same pattern uses."""
    empty = p.crow.new_zeros(0)
    pc = probe if probe is not None else Csr(p.crow.new_zeros(1), empty, empty)
    with torch.autocast(p.col.device.type, enabled=False):
        return _CsrDecode.apply(*p, vals_E, W_dec_ND, *pc, probe_zeros_P, shared)


# ------------------------------------------------------------------------------- the family steps
class SparseResult(NamedTuple):
    xhat_BD: Tensor  # reconstruction without the decoder bias
    enc: Encoded
    ehat_BD: Tensor | None  # AuxK reconstruction of the residual (BatchTopK); None if nothing is dead
    prefix_GBD: Tensor | None  # Matryoshka: the reconstruction (no bias) of each prefix of groups


def group_decode(p: Csr, vals_E: Tensor, W_dec_ND: Tensor, ends: list[int]) -> Tensor:
    """[G, B, d]: each group's share of the decode, group g = latents [ends[g-1], ends[g]). One decode
    over G·B bags (group-major), entries stably re-sorted by (group, token)."""
    B = p.n_rows
    bounds = torch.tensor(ends[:-1], dtype=p.col.dtype, device=p.col.device)
    bag = torch.bucketize(p.col, bounds, right=True) * B + p.row
    order = torch.argsort(bag, stable=True)
    q = csr_from_rows(bag[order], p.col[order], len(ends) * B)
    return sparse_decode_csr(q, vals_E[order], W_dec_ND).view(len(ends), B, -1)


def sparse_sae(x_BD: Tensor, w: SAEWeights, rule: Rule, opts: Resolved, theta_N: Tensor | None = None,
               dead_M: Tensor | None = None, auxk_k: int = 0, group_ends: list[int] | None = None) -> SparseResult:
    """One sparse step: encode by ``rule``, decode (Matryoshka: per group), AuxK over ``dead_M``."""
    use_aux = dead_M is not None and dead_M.numel() > 0
    shared = SharedLayout()  # the encoder and the (ungrouped) decoder backward share one layout
    enc = sparse_encode(x_BD, w, rule, theta_N, dead_M if use_aux else None, opts.chunk_tokens, shared)
    groups = None
    if group_ends is not None and len(group_ends) > 1:
        groups = group_decode(enc.p, enc.vals_E, w.W_dec_ND, group_ends).cumsum(0)
        xhat = groups[-1]
    else:
        xhat = sparse_decode_csr(enc.p, enc.vals_E, w.W_dec_ND, enc.probe, enc.probe_zeros_P, shared)
    ehat = auxk_decode(enc.pre_BM, dead_M, auxk_k, w.W_dec_ND) if use_aux else None
    return SparseResult(xhat, enc, ehat, groups)


def pattern_density(enc: Encoded, n: int) -> float:
    """Fraction of [B, n] the step's pattern covered (code plus probe entries): the dense-fallback signal."""
    entries = enc.p.col.numel() + (enc.probe.col.numel() if enc.probe is not None else 0)
    return entries / max(1, enc.p.n_rows * n)
