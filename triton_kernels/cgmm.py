"""Fused Triton kernels of the cGMM op (design.md "The cGMM op"); float32.

Per patch row r = (n, p), im2col on the fly from the NHWC input (masked pointer loads, never the patch matrix):
    log_score[r, k] = log_pi[k] + sum_d log sigma[k, d] - 1/2 sum_d sigma[k, d]^2 (x[r, d] - mu[k, d])^2
computed either in the direct form (small D and K: a [BLOCK_R, BLOCK_K, BLOCK_D] broadcast) or, for larger
shapes, as two ``tl.dot`` (input_precision="ieee") on the centred rows: with xc = x - ctr, S = sigma^2,
B = (mu - ctr) S and c' = log_pi + sum log sigma - 1/2 sum S (mu - ctr)^2,
    log_score = xc @ B^T - 1/2 (xc * xc) @ S^T + c'.
One program holds a tile of BLOCK_R rows against all K components (BLOCK_K >= K), so the softmax, logsumexp,
the K x K smoothing (one more tl.dot) and the argmax happen in registers; resp, score, lse and kstar are written
once. Backward gets resp and kstar (saved by the forward): per row W[r, k] = g_score G[kstar, k] (mc) or
g_score resp (loglik) + resp (g_resp - <g_resp, resp>); ``_cgmm_bwd_param_kernel`` writes per-program partial
sums w, W^T x, W^T x^2 over a fixed BLOCK_R of rows (reduced afterwards in a fixed order: deterministic, no
atomics); ``_cgmm_bwd_x_kernel`` writes each patch row's gradient, and ``_fold_kernel`` gathers it back onto the
pixels (also the sampling's patch_average). Limits: K <= 256.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_K = 256


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _rows(pid, TILES, ROWS, P, Wo, INDEP: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tile's rows: GMM gi, flat rows r, validity, and (n, oy, ox). int64: M * K can pass 2^31."""
    pid = pid.to(tl.int64)  # Liger issue #1296: int32 offsets overflow on large inputs
    gi = pid // TILES
    j = (pid % TILES) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [BLOCK_R]
    valid = j < ROWS
    if INDEP:
        r = j * P + gi
    else:
        r = j
    n = r // P
    p = r % P
    return gi, r, valid, n, p // Wo, p % Wo


@triton.jit
def _gather_x(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw, D):
    """Patch entries d [BLOCK_D] of rows (n, oy, ox) [BLOCK_R]: x[n, oy*sh + ky, ox*sw + kx, c] with
    ky = d // (kw*C) and kx*C + c = d % (kw*C). Returns [BLOCK_R, BLOCK_D], 0 where masked."""
    ky = d // KWC
    rem = d % KWC
    off = ((n[:, None] * H + oy[:, None] * sh + ky[None, :]) * W + ox[:, None] * sw) * C + rem[None, :]
    return tl.load(x_ptr + off, mask=valid[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _weights(resp_ptr, g_resp_ptr, g_score_ptr, kstar_ptr, g_ptr, r, valid, k, K,
             IS_MC: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_G_RESP: tl.constexpr,
             HAS_G_SCORE: tl.constexpr):
    """W [BLOCK_R, BLOCK_K] of the backward (see module docstring); 0 on masked rows and components."""
    kmask = k < K
    m2 = valid[:, None] & kmask[None, :]
    resp = tl.load(resp_ptr + r[:, None] * K + k[None, :], mask=m2, other=0.0)  # [BLOCK_R, BLOCK_K]
    if HAS_G_SCORE:
        gs = tl.load(g_score_ptr + r, mask=valid, other=0.0)  # [BLOCK_R]
    else:
        gs = tl.sum(resp * 0.0, axis=1)
    if IS_MC:
        ks = tl.load(kstar_ptr + r, mask=valid, other=0).to(tl.int64)  # [BLOCK_R]
        if HAS_SMOOTHING:
            grow = tl.load(g_ptr + ks[:, None] * K + k[None, :], mask=m2, other=0.0)  # G[kstar, k]
            w = gs[:, None] * grow
        else:
            w = tl.where(k[None, :] == ks[:, None], gs[:, None], 0.0)
    else:
        w = gs[:, None] * resp
    if HAS_G_RESP:
        gr = tl.load(g_resp_ptr + r[:, None] * K + k[None, :], mask=m2, other=0.0)
        dot = tl.sum(gr * resp, axis=1)  # [BLOCK_R]
        w = w + resp * (gr - dot[:, None])
    return tl.where(m2, w, 0.0)


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _cgmm_fwd_kernel(
    # data ptrs
    resp_ptr, score_ptr, lse_ptr, kstar_ptr,
    x_ptr, a_ptr, b_ptr, c_ptr, ctr_ptr, g_ptr,
    # shapes
    H, W, C, Wo, P, K, D, KWC, sh, sw, ROWS, TILES,
    # scalars
    const,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INDEP: tl.constexpr, IS_MC: tl.constexpr, HAS_SMOOTHING: tl.constexpr, USE_DOT: tl.constexpr,
):
    """Log scores of BLOCK_R rows against all K components, then softmax / lse / smoothing / argmax.

    USE_DOT: a = S = sigma^2, b = B = (mu - ctr) S per (GMM, k, d), c = c' per (GMM, k).
    Direct form: a = mu, b = sigma, c = log_pi + sum log sigma.
    """
    gi, r, valid, n, oy, ox = _rows(tl.program_id(0), TILES, ROWS, P, Wo, INDEP, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    pbase = gi * K * D  # parameters of this tile's GMM (0 in shared mode)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        x = _gather_x(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw, D)  # [BLOCK_R, BLOCK_D]
        pm = kmask[:, None] & dmask[None, :]
        if USE_DOT:
            ctr = tl.load(ctr_ptr + gi * D + d, mask=dmask, other=0.0)  # [BLOCK_D]
            xc = tl.where(dmask[None, :], x - ctr[None, :], 0.0)
            pm_t = dmask[:, None] & kmask[None, :]
            s_t = tl.load(a_ptr + pbase + k[None, :] * D + d[:, None], mask=pm_t, other=0.0)  # [BLOCK_D, BLOCK_K]
            b_t = tl.load(b_ptr + pbase + k[None, :] * D + d[:, None], mask=pm_t, other=0.0)
            acc += tl.dot(xc, b_t, input_precision="ieee") - 0.5 * tl.dot(xc * xc, s_t, input_precision="ieee")
        else:
            mu = tl.load(a_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)  # [BLOCK_K, BLOCK_D]
            sg = tl.load(b_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)
            t = sg[None, :, :] * (x[:, None, :] - mu[None, :, :])  # [BLOCK_R, BLOCK_K, BLOCK_D]
            acc += -0.5 * tl.sum(t * t, axis=2)
    c = tl.load(c_ptr + gi * K + k, mask=kmask, other=0.0)
    ls = tl.where(kmask[None, :], acc + c[None, :], float("-inf"))  # [BLOCK_R, BLOCK_K]
    mx = tl.max(ls, axis=1)
    e = tl.exp(ls - mx[:, None])
    s = tl.sum(e, axis=1)
    lse = mx + tl.log(s)
    m2 = valid[:, None] & kmask[None, :]
    tl.store(resp_ptr + r[:, None] * K + k[None, :], e / s[:, None], mask=m2)
    tl.store(lse_ptr + r, lse, mask=valid)
    if IS_MC:
        if HAS_SMOOTHING:
            g_t = tl.load(g_ptr + k[None, :] * K + k[:, None], mask=kmask[:, None] & kmask[None, :], other=0.0)
            sm = tl.dot(tl.where(kmask[None, :], ls, 0.0), g_t, input_precision="ieee")  # sum_j ls[j] G[k, j]
            sm = tl.where(kmask[None, :], sm, float("-inf"))
        else:
            sm = ls
        tl.store(score_ptr + r, tl.max(sm, axis=1) - const, mask=valid)
        tl.store(kstar_ptr + r, tl.argmax(sm, axis=1).to(tl.int32), mask=valid)
    else:
        tl.store(score_ptr + r, lse - const, mask=valid)
        tl.store(kstar_ptr + r, tl.argmax(ls, axis=1).to(tl.int32), mask=valid)


# ------------------------------------------------------------------------------------------------ backward
@triton.jit
def _cgmm_bwd_param_kernel(
    # data ptrs
    pw_ptr, pa1_ptr, pa2_ptr,
    resp_ptr, g_resp_ptr, g_score_ptr, kstar_ptr, g_ptr, x_ptr,
    # shapes
    H, W, C, Wo, P, K, D, KWC, sh, sw, ROWS, TILES,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INDEP: tl.constexpr, IS_MC: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_G_RESP: tl.constexpr,
    HAS_G_SCORE: tl.constexpr,
):
    """Partial sums of one tile: w[k] = sum_r W, A1[k, d] = sum_r W x, A2[k, d] = sum_r W x^2."""
    pid = tl.program_id(0).to(tl.int64)
    gi, r, valid, n, oy, ox = _rows(pid, TILES, ROWS, P, Wo, INDEP, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    w = _weights(resp_ptr, g_resp_ptr, g_score_ptr, kstar_ptr, g_ptr, r, valid, k, K,
                 IS_MC, HAS_SMOOTHING, HAS_G_RESP, HAS_G_SCORE)  # [BLOCK_R, BLOCK_K]
    tl.store(pw_ptr + pid * K + k, tl.sum(w, axis=0), mask=kmask)
    w_t = tl.trans(w)  # [BLOCK_K, BLOCK_R]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = _gather_x(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw, D)  # [BLOCK_R, BLOCK_D]
        out = pid * K * D + k[:, None] * D + d[None, :]
        pm = kmask[:, None] & (d[None, :] < D)
        tl.store(pa1_ptr + out, tl.dot(w_t, x, input_precision="ieee"), mask=pm)
        tl.store(pa2_ptr + out, tl.dot(w_t, x * x, input_precision="ieee"), mask=pm)


@triton.jit
def _cgmm_bwd_x_kernel(
    # data ptrs
    dpatch_ptr,
    resp_ptr, g_resp_ptr, g_score_ptr, kstar_ptr, g_ptr, x_ptr, s2mu_ptr, s2_ptr,
    # shapes
    H, W, C, Wo, P, K, D, KWC, sh, sw, ROWS, TILES,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INDEP: tl.constexpr, IS_MC: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_G_RESP: tl.constexpr,
    HAS_G_SCORE: tl.constexpr,
):
    """dpatch[r, d] = sum_k W[r, k] sigma^2 (mu - x[r, d]) = (W @ S2MU)[r, d] - x[r, d] (W @ S2)[r, d]."""
    gi, r, valid, n, oy, ox = _rows(tl.program_id(0), TILES, ROWS, P, Wo, INDEP, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    w = _weights(resp_ptr, g_resp_ptr, g_score_ptr, kstar_ptr, g_ptr, r, valid, k, K,
                 IS_MC, HAS_SMOOTHING, HAS_G_RESP, HAS_G_SCORE)  # [BLOCK_R, BLOCK_K]
    pbase = gi * K * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        pm = kmask[:, None] & dmask[None, :]
        s2mu = tl.load(s2mu_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)  # [BLOCK_K, BLOCK_D]
        s2 = tl.load(s2_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)
        x = _gather_x(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw, D)
        g = tl.dot(w, s2mu, input_precision="ieee") - x * tl.dot(w, s2, input_precision="ieee")
        tl.store(dpatch_ptr + r[:, None] * D + d[None, :], g, mask=valid[:, None] & dmask[None, :])


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
            greater = tl.sum((a[None, :] > a[:, None]).to(tl.int32), axis=1)  # entries strictly above each
            a = tl.where(greater < top_s, a, 0.0)
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
def _geometry(x, mu, kernel, stride):
    N, H, W, C = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    P, K, D = Ho * Wo, mu.shape[-2], mu.shape[-1]
    indep = mu.dim() == 3
    rows = N if indep else N * P
    return dict(N=N, H=H, W=W, C=C, Ho=Ho, Wo=Wo, P=P, K=K, D=D, KWC=kw * C, sh=sh, sw=sw, ROWS=rows,
                G=P if indep else 1, INDEP=indep)


def _blocks(g):
    block_k = max(16, triton.next_power_of_2(g["K"]))
    if block_k > MAX_K:
        raise ValueError(f"mu: the triton backend supports K <= {MAX_K} components, got {g['K']}")
    use_dot = g["D"] > 16 or block_k > 32
    block_d = 16 if not use_dot else (32 if block_k <= 64 else 16)
    block_r = 64 if INTERPRET else (32 if block_k >= 128 else 64)
    return block_r, block_k, block_d, use_dot


def _num_warps(block_r, block_k):
    return 4 if block_r * block_k <= 2048 else 8


def cgmm_fwd(x, mu, sigma, log_pi, kernel, stride, loss, smoothing):
    """Forward launcher. x (N,H,W,C), mu/sigma (K,D)|(P,K,D), log_pi (K,)|(P,K), smoothing (K,K) or None.
    Returns resp (N,H',W',K), score, lse (N,H',W'), kstar (N,H',W') int32."""
    x, mu, sigma, log_pi = (t.contiguous() for t in (x, mu, sigma, log_pi))
    g = _geometry(x, mu, kernel, stride)
    block_r, block_k, block_d, use_dot = _blocks(g)
    G, K, D = g["G"], g["K"], g["D"]
    mu3, sig3 = mu.reshape(G, K, D), sigma.reshape(G, K, D)
    logdet = sig3.log().double().sum(-1)
    if use_dot:
        ctr = mu3.mean(1)  # (G, D): centring keeps the expanded form's cancellation small
        S = sig3 * sig3
        muc = mu3 - ctr[:, None, :]
        a, b = S.contiguous(), (muc * S).contiguous()
        c = (log_pi.reshape(G, K).double() + logdet - 0.5 * (S.double() * muc.double() ** 2).sum(-1)).float()
        ctr = ctr.contiguous()
    else:
        a, b, ctr = mu3, sig3, mu3  # ctr unused
        c = (log_pi.reshape(G, K).double() + logdet).float()
    N, Ho, Wo = g["N"], g["Ho"], g["Wo"]
    resp = x.new_empty(N, Ho, Wo, K)
    score, lse = x.new_empty(N, Ho, Wo), x.new_empty(N, Ho, Wo)
    kstar = x.new_empty(N, Ho, Wo, dtype=torch.int32)
    tiles = triton.cdiv(g["ROWS"], block_r)
    gm = smoothing.contiguous() if smoothing is not None else c  # placeholder pointer when unused
    _cgmm_fwd_kernel[(G * tiles,)](
        resp, score, lse, kstar, x, a, b, c.contiguous(), ctr, gm,
        g["H"], g["W"], g["C"], Wo, g["P"], K, D, g["KWC"], g["sh"], g["sw"], g["ROWS"], tiles,
        0.5 * D * math.log(2 * math.pi),
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, INDEP=g["INDEP"], IS_MC=loss == "mc",
        HAS_SMOOTHING=smoothing is not None, USE_DOT=use_dot, num_warps=_num_warps(block_r, block_k),
    )
    return resp, score, lse, kstar


BWD_BLOCK_R = 64  # fixed: the parameter partial sums' row blocks (determinism does not depend on the device)


def cgmm_bwd(g_resp, g_score, x, mu, sigma, log_pi, kernel, stride, loss, smoothing, resp, lse, kstar, need_x_grad):
    """Backward launcher: returns (dx or an empty tensor, d_mu, d_sigma, d_log_pi)."""
    x, mu, sigma = x.contiguous(), mu.contiguous(), sigma.contiguous()
    resp, kstar = resp.contiguous(), kstar.contiguous()
    g = _geometry(x, mu, kernel, stride)
    G, K, D = g["G"], g["K"], g["D"]
    block_k = max(16, triton.next_power_of_2(K))
    block_d = 32 if block_k <= 64 else 16
    tiles = triton.cdiv(g["ROWS"], BWD_BLOCK_R)
    n_prog = G * tiles
    g_resp = g_resp.contiguous() if g_resp is not None else None
    g_score = g_score.contiguous() if g_score is not None else None
    dummy = resp
    flags = dict(INDEP=g["INDEP"], IS_MC=loss == "mc", HAS_SMOOTHING=smoothing is not None,
                 HAS_G_RESP=g_resp is not None, HAS_G_SCORE=g_score is not None)
    common = (g["H"], g["W"], g["C"], g["Wo"], g["P"], K, D, g["KWC"], g["sh"], g["sw"], g["ROWS"], tiles)
    ptrs = (resp, g_resp if g_resp is not None else dummy, g_score if g_score is not None else dummy, kstar,
            smoothing.contiguous() if smoothing is not None else dummy)
    pw = x.new_empty(n_prog, K)
    pa1, pa2 = x.new_empty(n_prog, K, D), x.new_empty(n_prog, K, D)
    _cgmm_bwd_param_kernel[(n_prog,)](
        pw, pa1, pa2, *ptrs, x, *common,
        BLOCK_R=BWD_BLOCK_R, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, **flags,
    )
    # second pass: partial sums of each GMM's tiles, in tile order, in float64
    w = pw.reshape(G, tiles, K).double().sum(1)
    A1 = pa1.reshape(G, tiles, K, D).double().sum(1)
    A2 = pa2.reshape(G, tiles, K, D).double().sum(1)
    m, s = mu.reshape(G, K, D).double(), sigma.reshape(G, K, D).double()
    d_log_pi = w
    d_mu = s * s * (A1 - w[..., None] * m)
    d_sigma = w[..., None] / s - s * (A2 - 2 * m * A1 + w[..., None] * m * m)
    if not g["INDEP"]:
        d_log_pi, d_mu, d_sigma = d_log_pi[0], d_mu[0], d_sigma[0]
    dx = x.new_empty(0)
    if need_x_grad:
        s2 = (sigma * sigma).contiguous()
        s2mu = (s2 * mu).contiguous()
        dpatch = x.new_empty(g["N"], g["Ho"], g["Wo"], D)
        _cgmm_bwd_x_kernel[(n_prog,)](
            dpatch, *ptrs, x, s2mu, s2, *common,
            BLOCK_R=BWD_BLOCK_R, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4, **flags,
        )
        dx = fold(dpatch, (g["H"], g["W"]), kernel, stride, average=False)
    return dx, d_mu.to(mu.dtype), d_sigma.to(mu.dtype), d_log_pi.to(mu.dtype).reshape(log_pi.shape)


def fold(v, image_hw, kernel, stride, average: bool):
    """Patch values v (N, H', W', D) onto pixels (N, H, W, C): summed, or averaged by the cover count."""
    v = v.contiguous()
    N, Ho, Wo, D = v.shape
    (kh, kw), (sh, sw) = kernel, stride
    H, W = image_hw
    C = D // (kh * kw)
    out = v.new_empty(N, H, W, C)
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
    out = mu.new_empty(N, Ho, Wo, D)
    rows = N * Ho * Wo
    _sample_kernel[(rows,)](
        out, topdown, mu, sigma, u, eps, rows, Ho * Wo, K, D, int(top_s), float(divisor), float(sigma_ceiling),
        INDEP=mu.dim() == 3, BLOCK_K=max(16, triton.next_power_of_2(K)), BLOCK_D=64, num_warps=1,
    )
    return out
