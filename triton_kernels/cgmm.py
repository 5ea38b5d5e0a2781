"""Fused Triton kernels of the cGMM op (design.md "The cGMM op"); float32, CUDA (or CPU under TRITON_INTERPRET=1).

Per patch row r = (n, p), im2col on the fly from the NHWC input (masked pointer loads, never the patch matrix):
    log_score[r, k] = log_pi[k] + sum_d log sigma[k, d] - 1/2 sum_d sigma[k, d]^2 (x[r, d] - mu[k, d])^2

Forward (``_cgmm_fwd_kernel``): one program holds BLOCK_R rows and *all* K components (K <= 128, padded to a power
of two) in registers, so resp, score, lse and kstar are written once and nothing is re-read:
- small D (<= DIRECT_MAX_D): the direct form as rank-1 updates over d, acc -= 1/2 (sigma_d (x_d - mu_d))^2: no
  expansion, so no cancellation when mu sits on the data and sigma near its ceiling (trained parameters);
- larger D: two ``tl.dot`` on the rows centred at the components' mean ctr (prepared on the host, float64 sums):
  with xc = x - ctr, S = sigma^2, B = (mu - ctr) S and c' = log_pi + sum log sigma - 1/2 sum S (mu - ctr)^2,
  log_score = xc @ B^T - 1/2 (xc * xc) @ S^T + c'.
Then max m, l = sum exp(ls - m), lse = m + log l, resp = exp(ls - m) / l (not exp(ls - lse): lse of a large-D
patch is ~1e4, where float32 resolves only 1e-3), and for mc with a smoothing G one more dot,
(ls - m) @ G^T + m (G's rows sum to 1), argmax -> kstar (ties -> lowest index). K > 128 takes the first
generation's component-tiled kernel (``cgmm_v1.py``, online logsumexp).

Backward (forward's resp and kstar saved): per row W[r, k] = g_score G[kstar, k] (mc) or g_score resp (loglik)
+ resp (g_resp - <g_resp, resp>).
- ``_cgmm_bwd_w_kernel`` writes W (M, K);
- ``_cgmm_bwd_param_kernel``: a GEMM over fixed chunks of CHUNK_ROWS rows per (GMM, component tile, d tile):
  partial sums w = sum W, A1 = sum W xc, A2 = sum W xc^2 on rows centred at ctr (the expanded
  A2 - 2 mu A1 + w mu^2 cancels by factors of 10-50 on trained parameters without it);
- ``_cgmm_bwd_finalize_kernel`` adds the chunks' partials in chunk order in float64 registers and writes
  d log_pi = w, d mu = S (A1 - w muc), d sigma = w / sigma - sigma (A2 - 2 muc A1 + w muc^2): deterministic (the
  chunk is the reduction block, independent of the device), no atomics, no float64 copies in memory;
- ``_cgmm_bwd_x_kernel``: dpatch[r, d] = sum_k W[r, k] S[k, d] (mu[k, d] - x[r, d]) in the direct form (rank-1
  updates over k), gathered back onto pixels by ``_fold_kernel`` (also the sampling's patch_average).

Row indices are int32 (M < 2^31 is checked); memory offsets are widened to int64 before they can overflow
(Liger issue #1296). Products use ``tl.dot(input_precision=PRECISION)``: "ieee" by default, "tf32x3" (split-TF32
tensor-core products, fp32-grade) on request (``precision=`` of the launchers) until a GPU has measured it.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: all K in registers up to this many components; beyond it the first generation's tiled forward
MAX_REGISTER_K = 128
#: direct (rank-1, cancellation-free) forward up to this patch dimension; the centred GEMM form above it
DIRECT_MAX_D = 64
#: rows per reduction chunk of the parameter backward: fixed, so the result does not depend on the device
CHUNK_ROWS = 2048
#: row tiles of the parameter GEMM (its inner dimension) and of the W and x-gradient kernels
PARAM_BLOCK_R = 16
BWD_BLOCK_R = 32
PRECISIONS = ("ieee", "tf32x3")


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _rows(pid, TILES, ROWS, P, Wo, INDEP: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tile's rows: GMM gi, flat rows r (int32), validity, and (n, oy, ox) (int32: one division each)."""
    gi = pid // TILES
    j = (pid % TILES) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    valid = j < ROWS
    if INDEP:
        n = j
        p = j * 0 + gi
        r = j * P + gi
    else:
        n = j // P
        p = j - n * P
        r = j
    oy = p // Wo
    return gi, r, valid, n, oy, p - oy * Wo


@triton.jit
def _x_offsets(n, oy, ox, d, H, W, C, KWC, sh, sw):
    """Offsets [BLOCK_R, BLOCK_D] of patch entries d of rows (n, oy, ox): x[n, oy*sh + ky, ox*sw + kx, c] with
    ky = d // (kw*C) and kx*C + c = d % (kw*C); int64 from the image index on."""
    ky = d // KWC
    rem = d - ky * KWC
    img = n.to(tl.int64) * (H * W * C)
    return img[:, None] + (((oy[:, None] * sh + ky[None, :]) * W + ox[:, None] * sw) * C + rem[None, :])


@triton.jit
def _x_column(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw):
    """Patch entry d (a scalar) of rows (n, oy, ox): [BLOCK_R], 0 where masked."""
    ky = d // KWC
    rem = d - ky * KWC
    off = n.to(tl.int64) * (H * W * C) + ((oy * sh + ky) * W + ox * sw) * C + rem
    return tl.load(x_ptr + off, mask=valid, other=0.0)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _cgmm_fwd_kernel(
    # data ptrs
    resp_ptr, score_ptr, lse_ptr, kstar_ptr,
    x_ptr, a_ptr, b_ptr, c_ptr, ctr_ptr, gt_ptr,
    # shapes
    H, W, C, Wo, P, K, D, KWC, sh, sw, ROWS, TILES,
    # scalars
    const,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INDEP: tl.constexpr, IS_MC: tl.constexpr, HAS_SMOOTHING: tl.constexpr, DIRECT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """All K log scores of BLOCK_R rows in registers, then softmax, lse, (smoothed) max and argmax, each output
    written once.

    DIRECT: a = mu, b = sigma, (G, K, D); c = log_pi + sum log sigma (G, K).
    GEMM form: a = S^T, b = B^T, (G, D, K); c = c' (G, K); ctr (G, D). gt = G^T (K, K), gt[j, k] = G[k, j].
    """
    gi, r, valid, n, oy, ox = _rows(tl.program_id(0), TILES, ROWS, P, Wo, INDEP, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    pbase = gi.to(tl.int64) * K * D  # this program's GMM (0 in shared mode)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if DIRECT:
        for d in range(0, D):
            xd = _x_column(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw)  # [BLOCK_R]
            mu = tl.load(a_ptr + pbase + k * D + d, mask=kmask, other=0.0)  # [BLOCK_K]
            sg = tl.load(b_ptr + pbase + k * D + d, mask=kmask, other=0.0)
            t = sg[None, :] * (xd[:, None] - mu[None, :])  # [BLOCK_R, BLOCK_K]
            acc -= 0.5 * (t * t)
    else:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < D
            x = tl.load(x_ptr + _x_offsets(n, oy, ox, d, H, W, C, KWC, sh, sw),
                        mask=valid[:, None] & dmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]
            ctr = tl.load(ctr_ptr + gi.to(tl.int64) * D + d, mask=dmask, other=0.0)  # [BLOCK_D]
            xc = tl.where(dmask[None, :], x - ctr[None, :], 0.0)
            pm = dmask[:, None] & kmask[None, :]
            st = tl.load(a_ptr + pbase + d[:, None] * K + k[None, :], mask=pm, other=0.0)  # [BLOCK_D, BLOCK_K]
            bt = tl.load(b_ptr + pbase + d[:, None] * K + k[None, :], mask=pm, other=0.0)
            acc = tl.dot(xc, bt, acc, input_precision=PRECISION)
            acc = tl.dot(-0.5 * (xc * xc), st, acc, input_precision=PRECISION)
    c = tl.load(c_ptr + gi.to(tl.int64) * K + k, mask=kmask, other=0.0)
    ls = tl.where(kmask[None, :], acc + c[None, :], float("-inf"))  # [BLOCK_R, BLOCK_K]
    m = tl.max(ls, axis=1)  # [BLOCK_R]
    e = tl.exp(ls - m[:, None])
    l_sum = tl.sum(e, axis=1)
    lse = m + tl.log(l_sum)
    r64 = r.to(tl.int64)
    m2 = valid[:, None] & kmask[None, :]
    tl.store(resp_ptr + r64[:, None] * K + k[None, :], e / l_sum[:, None], mask=m2)
    tl.store(lse_ptr + r64, lse, mask=valid)
    if IS_MC:
        if HAS_SMOOTHING:
            # sum_j G[k, j] ls[j] = m + sum_j G[k, j] (ls[j] - m): rows of G sum to 1; padded columns hold 0
            j = tl.arange(0, BLOCK_K)
            gt = tl.load(gt_ptr + j[:, None] * K + k[None, :], mask=(j[:, None] < K) & kmask[None, :], other=0.0)
            sm = tl.dot(tl.where(kmask[None, :], ls - m[:, None], 0.0), gt, input_precision="ieee")
            sm = tl.where(kmask[None, :], sm, float("-inf"))
            best = tl.max(sm, axis=1)
            arg = tl.argmax(sm, axis=1)  # ties -> lowest index
            tl.store(score_ptr + r64, best + m - const, mask=valid)
        else:
            arg = tl.argmax(ls, axis=1)
            tl.store(score_ptr + r64, m - const, mask=valid)
    else:
        arg = tl.argmax(ls, axis=1)
        tl.store(score_ptr + r64, lse - const, mask=valid)
    tl.store(kstar_ptr + r64, arg.to(tl.int32), mask=valid)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _cgmm_bwd_w_kernel(
    # data ptrs
    w_ptr,
    resp_ptr, g_resp_ptr, g_score_ptr, kstar_ptr, g_ptr,
    # shapes
    M, K,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    IS_MC: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_G_RESP: tl.constexpr, HAS_G_SCORE: tl.constexpr,
):
    """W[r, k] = g_score[r] (G[kstar[r], k] if mc else resp[r, k]) + resp[r, k] (g_resp[r, k] - <g_resp, resp>_r)
    for BLOCK_R rows, components in tiles of BLOCK_K."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = r < M
    r64 = r.to(tl.int64)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)  # sum_j g_resp[r, j] resp[r, j]
    if HAS_G_RESP:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m2 = valid[:, None] & (k[None, :] < K)
            resp = tl.load(resp_ptr + r64[:, None] * K + k[None, :], mask=m2, other=0.0)
            gr = tl.load(g_resp_ptr + r64[:, None] * K + k[None, :], mask=m2, other=0.0)
            dot += tl.sum(gr * resp, axis=1)
    if HAS_G_SCORE:
        gs = tl.load(g_score_ptr + r64, mask=valid, other=0.0)  # [BLOCK_R]
    else:
        gs = dot * 0.0
    if IS_MC:
        ks = tl.load(kstar_ptr + r64, mask=valid, other=0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m2 = valid[:, None] & (k[None, :] < K)
        resp = tl.load(resp_ptr + r64[:, None] * K + k[None, :], mask=m2, other=0.0)  # [BLOCK_R, BLOCK_K]
        if IS_MC:
            if HAS_SMOOTHING:
                grow = tl.load(g_ptr + ks.to(tl.int64)[:, None] * K + k[None, :], mask=m2, other=0.0)  # G[kstar, k]
                w = gs[:, None] * grow
            else:
                w = tl.where(k[None, :] == ks[:, None], gs[:, None], 0.0)
        else:
            w = gs[:, None] * resp
        if HAS_G_RESP:
            gr = tl.load(g_resp_ptr + r64[:, None] * K + k[None, :], mask=m2, other=0.0)
            w = w + resp * (gr - dot[:, None])
        tl.store(w_ptr + r64[:, None] * K + k[None, :], w, mask=m2)


@triton.jit
def _cgmm_bwd_param_kernel(
    # data ptrs
    pw_ptr, pa1_ptr, pa2_ptr,
    w_ptr, x_ptr, ctr_ptr,
    # shapes
    H, W, C, Wo, P, K, D, KWC, sh, sw, ROWS, CHUNKS,
    INDEP: tl.constexpr, CHUNK_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
):
    """Partial sums of one chunk of CHUNK_ROWS rows of one GMM, for one component tile and one d tile:
    w[k] = sum_r W, A1[k, d] = sum_r W xc, A2[k, d] = sum_r W xc^2 with xc = x - ctr (a GEMM W^T [xc, xc^2]).
    DIRECT (small D): xc = x - mu[k] per component ([BLOCK_R, BLOCK_K, BLOCK_D] products summed over the rows),
    exact where centring at one ctr for all components still cancels (mu on the data, sigma at its ceiling)."""
    pid = tl.program_id(0)  # (GMM, chunk)
    gi = pid // CHUNKS
    chunk = pid - gi * CHUNKS
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    kmask, dmask = k < K, d < D
    if DIRECT:  # ctr_ptr holds mu: each component's own centre
        mu_t = tl.load(ctr_ptr + (gi.to(tl.int64) * K + k[:, None]) * D + d[None, :],
                       mask=kmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_K, BLOCK_D]
    else:
        ctr = tl.load(ctr_ptr + gi.to(tl.int64) * D + d, mask=dmask, other=0.0)  # [BLOCK_D]
    a1 = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    TILES = tl.cdiv(ROWS, BLOCK_R)
    PER_CHUNK: tl.constexpr = CHUNK_ROWS // BLOCK_R
    for t in range(0, tl.minimum(PER_CHUNK, TILES - chunk * PER_CHUNK)):  # the chunk's tiles, in order
        tile = chunk * PER_CHUNK + t
        _, r, valid, n, oy, ox = _rows(gi * TILES + tile, TILES, ROWS, P, Wo, INDEP, BLOCK_R)
        w = tl.load(w_ptr + r.to(tl.int64)[:, None] * K + k[None, :], mask=valid[:, None] & kmask[None, :],
                    other=0.0)  # [BLOCK_R, BLOCK_K]
        x = tl.load(x_ptr + _x_offsets(n, oy, ox, d, H, W, C, KWC, sh, sw), mask=valid[:, None] & dmask[None, :],
                    other=0.0)  # [BLOCK_R, BLOCK_D]
        if DIRECT:
            xm = x[:, None, :] - mu_t[None, :, :]  # [BLOCK_R, BLOCK_K, BLOCK_D]; w is 0 on masked rows
            wx = w[:, :, None] * xm
            a1 += tl.sum(wx, axis=0)
            a2 += tl.sum(wx * xm, axis=0)
        else:
            xc = tl.where(valid[:, None] & dmask[None, :], x - ctr[None, :], 0.0)
            wt = tl.trans(w)  # [BLOCK_K, BLOCK_R]
            a1 = tl.dot(wt, xc, a1, input_precision=PRECISION)
            a2 = tl.dot(wt, xc * xc, a2, input_precision=PRECISION)
        wsum += tl.sum(w, axis=0)
    out = pid.to(tl.int64) * K * D + k[:, None] * D + d[None, :]
    pm = kmask[:, None] & dmask[None, :]
    tl.store(pa1_ptr + out, a1, mask=pm)
    tl.store(pa2_ptr + out, a2, mask=pm)
    if tl.program_id(2) == 0:
        tl.store(pw_ptr + pid.to(tl.int64) * K + k, wsum, mask=kmask)


@triton.jit
def _cgmm_bwd_finalize_kernel(
    # data ptrs
    d_mu_ptr, d_sigma_ptr, d_log_pi_ptr,
    pw_ptr, pa1_ptr, pa2_ptr, mu_ptr, sigma_ptr, ctr_ptr,
    # shapes
    K, D, CHUNKS, TOTAL,
    BLOCK: tl.constexpr, DIRECT: tl.constexpr,
):
    """Per parameter entry (gi, k, d): the chunks' partials added in chunk order in float64, then
    d mu = S (A1 - w muc), d sigma = w / sigma - sigma (A2 - 2 muc A1 + w muc^2), muc = mu - ctr (0 when the
    partials were centred at each component's own mean, DIRECT); d log_pi[gi, k] = w from the entries with d == 0."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # flat (gi, k, d)
    valid = i < TOTAL
    d = i % D
    gk = i // D  # gi * K + k
    gi = gk // K
    kk = gk - gi * K
    w = tl.zeros((BLOCK,), dtype=tl.float64)
    a1 = tl.zeros((BLOCK,), dtype=tl.float64)
    a2 = tl.zeros((BLOCK,), dtype=tl.float64)
    for c in range(0, CHUNKS):
        prog = gi * CHUNKS + c
        w += tl.load(pw_ptr + prog * K + kk, mask=valid, other=0.0).to(tl.float64)
        a1 += tl.load(pa1_ptr + (prog * K + kk) * D + d, mask=valid, other=0.0).to(tl.float64)
        a2 += tl.load(pa2_ptr + (prog * K + kk) * D + d, mask=valid, other=0.0).to(tl.float64)
    mu = tl.load(mu_ptr + i, mask=valid, other=0.0).to(tl.float64)
    s = tl.load(sigma_ptr + i, mask=valid, other=1.0).to(tl.float64)
    if DIRECT:
        muc = mu * 0.0
    else:
        muc = mu - tl.load(ctr_ptr + gi * D + d, mask=valid, other=0.0).to(tl.float64)
    tl.store(d_mu_ptr + i, (s * s * (a1 - w * muc)).to(tl.float32), mask=valid)
    tl.store(d_sigma_ptr + i, (w / s - s * (a2 - 2.0 * muc * a1 + w * muc * muc)).to(tl.float32), mask=valid)
    tl.store(d_log_pi_ptr + gk, w.to(tl.float32), mask=valid & (d == 0))


@triton.jit
def _cgmm_bwd_x_kernel(
    # data ptrs
    dpatch_ptr,
    w_ptr, x_ptr, mu_ptr, s2_ptr,
    # shapes
    H, W, C, Wo, P, K, D, KWC, sh, sw, ROWS, TILES,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INDEP: tl.constexpr,
):
    """dpatch[r, d] = sum_k W[r, k] S[k, d] (mu[k, d] - x[r, d]) in the direct form, BLOCK_K components at a time
    ([BLOCK_R, BLOCK_K, BLOCK_D] products summed over k): nothing cancels when x sits on a component's mean
    (trained parameters), unlike W @ (S mu) - x (W @ S). dpatch is (M, D), row order r."""
    gi, r, valid, n, oy, ox = _rows(tl.program_id(0), TILES, ROWS, P, Wo, INDEP, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    pbase = gi.to(tl.int64) * K * D
    x = tl.load(x_ptr + _x_offsets(n, oy, ox, d, H, W, C, KWC, sh, sw), mask=valid[:, None] & dmask[None, :],
                other=0.0)  # [BLOCK_R, BLOCK_D]
    r64 = r.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        w = tl.load(w_ptr + r64[:, None] * K + k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        pm = kmask[:, None] & dmask[None, :]
        mu = tl.load(mu_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)  # [BLOCK_K, BLOCK_D]
        s2 = tl.load(s2_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)
        t = w[:, :, None] * (s2[None, :, :] * (mu[None, :, :] - x[:, None, :]))  # [BLOCK_R, BLOCK_K, BLOCK_D]
        acc += tl.sum(t, axis=1)
    tl.store(dpatch_ptr + r64[:, None] * D + d[None, :], acc, mask=valid[:, None] & dmask[None, :])


@triton.jit
def _fold_kernel(
    out_ptr, v_ptr,
    NPIX, H, W, C, Ho, Wo, kh, kw, sh, sw, D,
    AVERAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[n, y, x, c] = sum of v[n, oy, ox, (ky*kw + kx)*C + c] over the patches covering the pixel (divided by
    their count if AVERAGE; 0 where none), gathered per pixel: no atomics. Sums in float64."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = i < NPIX
    c = i % C
    xw = (i // C) % W
    y = (i // (C * W)) % H
    n = i // (C * W * H)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    cnt = tl.zeros((BLOCK,), dtype=tl.float64)
    for ky in range(0, kh):
        ty = y - ky
        oy = ty // sh
        okay_y = (ty >= 0) & (ty % sh == 0) & (oy < Ho)
        for kx in range(0, kw):
            tx = xw - kx
            ox = tx // sw
            ok = valid & okay_y & (tx >= 0) & (tx % sw == 0) & (ox < Wo)
            src = ((n * Ho + oy) * Wo + ox) * D + (ky * kw + kx) * C + c
            acc += tl.load(v_ptr + src, mask=ok, other=0.0).to(tl.float64)
            cnt += ok.to(tl.float64)
    if AVERAGE:
        acc = tl.where(cnt > 0, acc / tl.maximum(cnt, 1.0), 0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=valid)


# ------------------------------------------------------------------------------------------------ sampling
@triton.jit
def _sample_kernel(
    out_ptr,
    topdown_ptr, mu_ptr, sigma_ptr, u_ptr, eps_ptr,
    ROWS, P, K, D, top_s, divisor, sigma_ceiling,
    INDEP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One position per program: clip, keep the top_s largest (ties kept), inverse-CDF draw at u (cumulative
    sums in float64 rounded to float32, as torch.cumsum on CPU), return mu[k] + eps m[k] / (sigma[k] divisor)."""
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    t = tl.load(topdown_ptr + r * K + k, mask=kmask, other=0.0)
    total = tl.sum(t, axis=0)
    a = tl.minimum(tl.maximum(t, 1e-6), 11000.0)
    a = tl.where(kmask, a, 0.0)
    if top_s > 0:
        if top_s < K:
            # the top_s-th largest entry counting duplicates (torch.topk's), by stepping down distinct values
            live = tl.where(kmask, a, float("-inf"))
            v = tl.max(live, axis=0)
            for _ in range(1, top_s):
                cnt = tl.sum((live >= v).to(tl.int32), axis=0)
                nxt = tl.max(tl.where(live < v, live, float("-inf")), axis=0)
                v = tl.where(cnt < top_s, nxt, v)
            a = tl.where(live >= v, a, 0.0)
    csum = tl.cumsum(a.to(tl.float64), axis=0).to(tl.float32)
    last = tl.max(tl.where(kmask, csum, 0.0), axis=0)
    u = tl.load(u_ptr + r)
    below = (csum / last <= u) & kmask
    kk = tl.minimum(tl.sum(below.to(tl.int64), axis=0), K - 1)
    if INDEP:
        base = ((r % P) * K + kk) * D
    else:
        base = kk * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < D
        m = tl.load(mu_ptr + base + d, mask=dm, other=0.0)
        s = tl.load(sigma_ptr + base + d, mask=dm, other=1.0)
        e = tl.load(eps_ptr + r * D + d, mask=dm, other=0.0)
        noisy = (s < sigma_ceiling).to(tl.float32)
        val = m + e * noisy / (s * divisor)
        val = tl.where(total > 0, val, 0.0)
        tl.store(out_ptr + r * D + d, val, mask=dm)


# ------------------------------------------------------------------------------------------------ launchers
def device_guard(t: torch.Tensor):
    """Launch on t's device: Triton launches on the *current* device, so tensors on cuda:1 need the guard."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def new_output(*shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output buffer; NaN / -1 filled first under DCGMM_POISON=1 on every device (tests: an unwritten
    element shows, which on a GPU's caching allocator would otherwise hold stale, plausible values)."""
    out = like.new_empty(*shape, dtype=dtype or like.dtype)
    if os.environ.get("DCGMM_POISON") == "1":
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def geometry(x, mu, kernel, stride):
    """Shapes of a call: M = N * P rows in G GMMs of ROWS rows each (independent: G = P, ROWS = N)."""
    N, H, W, C = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    P, K, D = Ho * Wo, mu.shape[-2], mu.shape[-1]
    indep = mu.dim() == 3
    if N * P >= 2**31 or N * P * max(K, D) >= 2**62:
        raise ValueError(f"x: {N * P} patch rows; the triton kernels index rows in int32 (< 2^31)")
    return dict(N=N, H=H, W=W, C=C, Ho=Ho, Wo=Wo, P=P, K=K, D=D, KWC=kw * C, sh=sh, sw=sw, M=N * P,
                ROWS=N if indep else N * P, G=P if indep else 1, INDEP=indep)


def _shape_args(g):
    return (g["H"], g["W"], g["C"], g["Wo"], g["P"], g["K"], g["D"], g["KWC"], g["sh"], g["sw"], g["ROWS"])


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return "ieee" if INTERPRET else precision  # the interpreter computes tl.dot in full fp32 either way


def fwd_config(K: int, D: int):
    """(DIRECT, BLOCK_R, BLOCK_K, BLOCK_D, num_warps) of the forward for K <= MAX_REGISTER_K.

    Chosen by the spill check (tools/triton_aot_check.py compiles each for sm_80 and sm_90 with triton 3.6 and
    3.7.1; stack 0 required): fixed, not autotuned, so the AOT check covers exactly what runs on a GPU. Under the
    interpreter (CPU tests) wider d tiles: the same kernel, fewer interpreted iterations."""
    block_k = max(16, triton.next_power_of_2(K))
    direct = D <= DIRECT_MAX_D
    block_r = 64 if block_k <= 32 else 32  # 64 x 128 spills in every variant; 4 warps spill in the GEMM form
    block_d = 128 if INTERPRET else 32
    return direct, block_r, block_k, block_d, 8


def bwd_config(K: int, D: int):
    """(BLOCK_K, BLOCK_D, num_warps) of the parameter GEMM (fixed: its chunk is the reduction block, and the
    tiles do not change the order of the chunk sums), and (BLOCK_K, BLOCK_D) of the x gradient."""
    if D <= DIRECT_MAX_D and not INTERPRET:  # the direct sums: [16, 16, 16] products per row tile
        return (16, 16, 4), (4, 32)
    if INTERPRET:
        bd = min(512, max(16, triton.next_power_of_2(D)))
        bkx = min(128, triton.next_power_of_2(K))
        return (min(128, max(16, triton.next_power_of_2(K))), bd, 4), (bkx, max(16, min(bd, 8192 // bkx)))
    # 8 warps: with 4, tiles of 32 x 32 and up spill (ieee) on sm_80 and sm_90; 64-wide d tiles spill with
    # triton 3.6 (sm_80 tf32x3, sm_90 ieee)
    return (min(64, max(16, triton.next_power_of_2(K))), min(32, max(16, triton.next_power_of_2(D))), 8), (4, 32)


def smoothing_transposed(smoothing):
    return None if smoothing is None else smoothing.t().contiguous()


def prepare_centred(mu3, sig3, log_pi3):
    """Host prep of the GEMM form (float64 sums): ctr (G, D), S^T and B^T (G, D, K), c' (G, K)."""
    ctr = mu3.mean(1)
    S = sig3 * sig3
    muc = mu3 - ctr[:, None, :]
    c = (log_pi3.double() + sig3.log().double().sum(-1) - 0.5 * (S.double() * muc.double() ** 2).sum(-1)).float()
    return ctr.contiguous(), S.transpose(1, 2).contiguous(), (muc * S).transpose(1, 2).contiguous(), c.contiguous()


def cgmm_fwd(x, mu, sigma, log_pi, kernel, stride, loss, smoothing, precision: str = "ieee", config=None):
    """Forward launcher. x (N,H,W,C), mu/sigma (K,D)|(P,K,D), log_pi (K,)|(P,K), smoothing dense (K,K) or None.
    ``config``: a (DIRECT, BLOCK_R, BLOCK_K, BLOCK_D, num_warps) other than ``fwd_config``'s (the GPU check's
    tile sweep). Returns resp (N,H',W',K), score, lse (N,H',W'), kstar (N,H',W') int32."""
    g = geometry(x, mu, kernel, stride)
    if g["K"] > MAX_REGISTER_K:
        from .cgmm_v1 import cgmm_fwd_v1

        return cgmm_fwd_v1(x, mu, sigma, log_pi, kernel, stride, loss, smoothing)
    precision = _check_precision(precision)
    x, mu, sigma, log_pi = (t.contiguous() for t in (x, mu, sigma, log_pi))
    G, K, D, N, Ho, Wo = g["G"], g["K"], g["D"], g["N"], g["Ho"], g["Wo"]
    direct, block_r, block_k, block_d, warps = config or fwd_config(K, D)
    mu3, sig3, lp3 = mu.reshape(G, K, D), sigma.reshape(G, K, D), log_pi.reshape(G, K)
    with device_guard(x):
        if direct:
            a, b, ctr = mu3, sig3, mu3  # ctr unused
            c = (lp3.double() + sig3.log().double().sum(-1)).float().contiguous()
        else:
            ctr, a, b, c = prepare_centred(mu3, sig3, lp3)
        resp = new_output(N, Ho, Wo, K, like=x)
        score, lse = new_output(N, Ho, Wo, like=x), new_output(N, Ho, Wo, like=x)
        kstar = new_output(N, Ho, Wo, like=x, dtype=torch.int32)
        gt = smoothing_transposed(smoothing) if smoothing is not None else c  # placeholder pointer when unused
        tiles = triton.cdiv(g["ROWS"], block_r)
        _cgmm_fwd_kernel[(G * tiles,)](
            resp, score, lse, kstar, x, a, b, c, ctr, gt,
            *_shape_args(g), tiles,
            0.5 * D * math.log(2 * math.pi),
            BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, INDEP=g["INDEP"], IS_MC=loss == "mc",
            HAS_SMOOTHING=smoothing is not None, DIRECT=direct, PRECISION=precision, num_warps=warps,
        )
    return resp, score, lse, kstar


def cgmm_bwd(g_resp, g_score, x, mu, sigma, log_pi, kernel, stride, loss, smoothing, resp, lse, kstar, need_x_grad,
             precision: str = "ieee", need_param_grads: bool = True):
    """Backward launcher: returns (dx or an empty tensor, d_mu, d_sigma, d_log_pi; empty tensors without
    need_param_grads)."""
    precision = _check_precision(precision)
    x, mu, sigma = x.contiguous(), mu.contiguous(), sigma.contiguous()
    resp, kstar = resp.contiguous(), kstar.contiguous()
    g = geometry(x, mu, kernel, stride)
    G, K, D, M = g["G"], g["K"], g["D"], g["M"]
    with device_guard(x):
        g_resp = g_resp.contiguous() if g_resp is not None else None
        g_score = g_score.contiguous() if g_score is not None else None
        Wm = new_output(M, K, like=x)
        block_kw = min(32, max(16, triton.next_power_of_2(K)))  # 64 components x 64 rows spill
        _cgmm_bwd_w_kernel[(triton.cdiv(M, BWD_BLOCK_R),)](
            Wm, resp, g_resp if g_resp is not None else resp, g_score if g_score is not None else resp, kstar,
            smoothing.contiguous() if smoothing is not None else resp, M, K,
            BLOCK_R=BWD_BLOCK_R, BLOCK_K=block_kw, IS_MC=loss == "mc", HAS_SMOOTHING=smoothing is not None,
            HAS_G_RESP=g_resp is not None, HAS_G_SCORE=g_score is not None, num_warps=4,
        )
        direct = D <= DIRECT_MAX_D
        (block_k, block_d, warps), (block_kx, block_dx) = bwd_config(K, D)
        if need_param_grads:
            d_mu, d_sigma, d_log_pi = _param_grads(g, Wm, x, mu, sigma, log_pi, direct, block_k, block_d, warps,
                                                   precision)
        else:
            d_mu, d_sigma, d_log_pi = (mu.new_empty(0) for _ in range(3))  # distinct: outputs must not alias
        dx = x.new_empty(0)
        if need_x_grad:
            s2 = (sigma * sigma).contiguous()
            dpatch = new_output(g["N"], g["Ho"], g["Wo"], D, like=x)
            tiles = triton.cdiv(g["ROWS"], BWD_BLOCK_R)
            _cgmm_bwd_x_kernel[(G * tiles, triton.cdiv(D, block_dx))](
                dpatch, Wm, x, mu, s2, *_shape_args(g), tiles,
                BLOCK_R=BWD_BLOCK_R, BLOCK_K=block_kx, BLOCK_D=block_dx, INDEP=g["INDEP"], num_warps=4,
            )
            dx = fold(dpatch, (g["H"], g["W"]), kernel, stride, average=False)
    return dx, d_mu, d_sigma, d_log_pi


def _param_grads(g, Wm, x, mu, sigma, log_pi, direct, block_k, block_d, warps, precision):
    """d_mu, d_sigma, d_log_pi from the backward weights Wm (M, K): chunked sums, then the float64 finalize."""
    G, K, D = g["G"], g["K"], g["D"]
    with device_guard(x):
        # the centre of the sums: each component's own mean (direct), or their mean (G, D) for the GEMM form
        ctr = mu if direct else mu.reshape(G, K, D).mean(1).contiguous()
        chunks = triton.cdiv(g["ROWS"], CHUNK_ROWS)
        pw = new_output(G * chunks, K, like=x)
        pa1, pa2 = new_output(G * chunks, K, D, like=x), new_output(G * chunks, K, D, like=x)
        _cgmm_bwd_param_kernel[(G * chunks, triton.cdiv(K, block_k), triton.cdiv(D, block_d))](
            pw, pa1, pa2, Wm, x, ctr, *_shape_args(g), chunks,
            INDEP=g["INDEP"], CHUNK_ROWS=CHUNK_ROWS, BLOCK_R=PARAM_BLOCK_R, BLOCK_K=block_k, BLOCK_D=block_d,
            PRECISION=precision, DIRECT=direct, num_warps=warps,
        )
        d_mu, d_sigma = new_output(*mu.shape, like=mu), new_output(*sigma.shape, like=sigma)
        d_log_pi = new_output(*log_pi.shape, like=mu)
        total = G * K * D
        block_f = 4096 if INTERPRET else 256
        _cgmm_bwd_finalize_kernel[(triton.cdiv(total, block_f),)](
            d_mu, d_sigma, d_log_pi, pw, pa1, pa2, mu, sigma, ctr, K, D, chunks, total, BLOCK=block_f,
            DIRECT=direct, num_warps=4,
        )
    return d_mu, d_sigma, d_log_pi


def fold(v, image_hw, kernel, stride, average: bool):
    """Patch values v (N, H', W', D) onto pixels (N, H, W, C): summed, or averaged by the cover count."""
    v = v.contiguous()
    N, Ho, Wo, D = v.shape
    (kh, kw), (sh, sw) = kernel, stride
    H, W = image_hw
    C = D // (kh * kw)
    with device_guard(v):
        out = new_output(N, H, W, C, like=v)
        npix = out.numel()
        block = 1024 if not INTERPRET else 4096
        _fold_kernel[(triton.cdiv(npix, block),)](
            out, v, npix, H, W, C, Ho, Wo, kh, kw, sh, sw, D, AVERAGE=average, BLOCK=block, num_warps=4,
        )
    return out


def sample_components(topdown, mu, sigma, top_s, divisor, u, eps, sigma_ceiling):
    """Launcher of ``_sample_kernel``: (N, H', W', D) samples (see ops.sample_components)."""
    topdown, mu, sigma = topdown.contiguous().to(mu.dtype), mu.contiguous(), sigma.contiguous()
    u, eps = u.contiguous().to(mu.dtype), eps.contiguous().to(mu.dtype)
    N, Ho, Wo, K = topdown.shape
    D = mu.shape[-1]
    with device_guard(mu):
        out = new_output(N, Ho, Wo, D, like=mu)
        rows = N * Ho * Wo
        _sample_kernel[(rows,)](
            out, topdown, mu, sigma, u, eps, rows, Ho * Wo, K, D, int(top_s), float(divisor), float(sigma_ceiling),
            INDEP=mu.dim() == 3, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_D=64, num_warps=4,
        )
    return out
