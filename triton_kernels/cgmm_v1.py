"""The first generation of the Triton cGMM forward (``DCGMM_TRITON_KERNELS=v1``, and K > 128 components); float32.

Kept selectable until a GPU has measured the one-pass forward of ``cgmm.py`` faster; the backward, fold and
sampling kernels are ``cgmm.py``'s for both.

Per patch row r = (n, p), im2col on the fly from the NHWC input (masked pointer loads, never the patch matrix):
    log_score[r, k] = log_pi[k] + sum_d log sigma[k, d] - 1/2 sum_d sigma[k, d]^2 (x[r, d] - mu[k, d])^2
computed either in the direct form (small D and K: a [BLOCK_R, BLOCK_K, BLOCK_D] broadcast) or, for larger
shapes, as two ``tl.dot`` (input_precision="ieee") on the centred rows: with xc = x - ctr, S = sigma^2,
B = (mu - ctr) S and c' = log_pi + sum log sigma - 1/2 sum S (mu - ctr)^2,
    log_score = xc @ B^T - 1/2 (xc * xc) @ S^T + c'.
One program holds a tile of BLOCK_R rows and walks the components in tiles of BLOCK_K with an online
logsumexp and argmax; the raw log scores are parked in resp's memory, read back for the K x K smoothing (tl.dot
per pair of component tiles) and normalised in place, so score, lse and kstar are written once and resp twice.
Components are processed in tiles of BLOCK_K, so K is not limited.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .cgmm import device_guard, geometry, new_output

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Log scores by tl.dot on the centred expansion for D > 16 or K > 32 (the direct broadcast below that);
# DCGMM_TRITON_DOT=0 / 1 forces the direct / dot form everywhere (both pass tests/test_backends.py).
_FORCE_DOT = os.environ.get("DCGMM_TRITON_DOT")


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


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _log_scores_tile(x_ptr, a_ptr, b_ptr, c_ptr, ctr_ptr, gi, n, oy, ox, valid, k, kmask,
                     H, W, C, K, D, KWC, sh, sw,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr):
    """log_score [BLOCK_R, BLOCK_K] of a tile of rows and components (-inf on masked components)."""
    pbase = gi * K * D  # parameters of this tile's GMM (0 in shared mode)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        x = _gather_x(x_ptr, n, oy, ox, d, valid, H, W, C, KWC, sh, sw, D)  # [BLOCK_R, BLOCK_D]
        if USE_DOT:
            ctr = tl.load(ctr_ptr + gi * D + d, mask=dmask, other=0.0)  # [BLOCK_D]
            xc = tl.where(dmask[None, :], x - ctr[None, :], 0.0)
            pm_t = dmask[:, None] & kmask[None, :]
            s_t = tl.load(a_ptr + pbase + k[None, :] * D + d[:, None], mask=pm_t, other=0.0)  # [BLOCK_D, BLOCK_K]
            b_t = tl.load(b_ptr + pbase + k[None, :] * D + d[:, None], mask=pm_t, other=0.0)
            acc += tl.dot(xc, b_t, input_precision="ieee") - 0.5 * tl.dot(xc * xc, s_t, input_precision="ieee")
        else:
            pm = kmask[:, None] & dmask[None, :]
            mu = tl.load(a_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)  # [BLOCK_K, BLOCK_D]
            sg = tl.load(b_ptr + pbase + k[:, None] * D + d[None, :], mask=pm, other=0.0)
            t = sg[None, :, :] * (x[:, None, :] - mu[None, :, :])  # [BLOCK_R, BLOCK_K, BLOCK_D]
            acc += -0.5 * tl.sum(t * t, axis=2)
    c = tl.load(c_ptr + gi * K + k, mask=kmask, other=0.0)
    return tl.where(kmask[None, :], acc + c[None, :], float("-inf"))


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
    """Log scores of BLOCK_R rows, component tile by component tile, with an online logsumexp and argmax;
    the raw log scores go to resp's memory, then (smoothing: a pass of tl.dot over them) are normalised in place.

    USE_DOT: a = S = sigma^2, b = B = (mu - ctr) S per (GMM, k, d), c = c' per (GMM, k).
    Direct form: a = mu, b = sigma, c = log_pi + sum log sigma.
    """
    gi, r, valid, n, oy, ox = _rows(tl.program_id(0), TILES, ROWS, P, Wo, INDEP, BLOCK_R)
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    best = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        ls = _log_scores_tile(x_ptr, a_ptr, b_ptr, c_ptr, ctr_ptr, gi, n, oy, ox, valid, k, kmask,
                              H, W, C, K, D, KWC, sh, sw, BLOCK_R, BLOCK_K, BLOCK_D, USE_DOT)
        tl.store(resp_ptr + r[:, None] * K + k[None, :], ls, mask=valid[:, None] & kmask[None, :])
        m_new = tl.maximum(m_i, tl.max(ls, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(ls - m_new[:, None]), axis=1)
        m_i = m_new
        tile_best = tl.max(ls, axis=1)
        tile_arg = tl.argmax(ls, axis=1).to(tl.int32) + k0
        arg = tl.where(tile_best > best, tile_arg, arg)  # strictly greater: ties keep the lower index
        best = tl.maximum(best, tile_best)
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + r, lse, mask=valid)
    tl.debug_barrier()  # the raw log scores of this tile are read back by other threads below
    if IS_MC:
        if HAS_SMOOTHING:
            best = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
            arg = tl.zeros((BLOCK_R,), dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < K
                sm = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
                for j0 in range(0, K, BLOCK_K):
                    j = j0 + tl.arange(0, BLOCK_K)
                    jmask = j < K
                    lsj = tl.load(resp_ptr + r[:, None] * K + j[None, :], mask=valid[:, None] & jmask[None, :],
                                  other=0.0)  # [BLOCK_R, BLOCK_K(j)]
                    g_t = tl.load(g_ptr + k[None, :] * K + j[:, None], mask=jmask[:, None] & kmask[None, :],
                                  other=0.0)  # [BLOCK_K(j), BLOCK_K(k)] = G[k, j]
                    sm += tl.dot(lsj, g_t, input_precision="ieee")
                sm = tl.where(kmask[None, :], sm, float("-inf"))
                tile_best = tl.max(sm, axis=1)
                tile_arg = tl.argmax(sm, axis=1).to(tl.int32) + k0
                arg = tl.where(tile_best > best, tile_arg, arg)
                best = tl.maximum(best, tile_best)
            tl.debug_barrier()  # every thread has read the raw scores before they are overwritten
        tl.store(score_ptr + r, best - const, mask=valid)
    else:
        tl.store(score_ptr + r, lse - const, mask=valid)
    tl.store(kstar_ptr + r, arg, mask=valid)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m2 = valid[:, None] & (k[None, :] < K)
        ptrs = resp_ptr + r[:, None] * K + k[None, :]
        # exp(ls - max) / sum, not exp(ls - lse): lse of a large-D patch is ~1e4, where float32 resolves only 1e-3
        e = tl.exp(tl.load(ptrs, mask=m2, other=float("-inf")) - m_i[:, None])
        tl.store(ptrs, e / l_i[:, None], mask=m2)


# ------------------------------------------------------------------------------------------------ launchers
def _blocks(g):
    """Tile sizes that keep every kernel free of register spills (tools/triton_aot_check.py checks them)."""
    block_k = min(32, max(16, triton.next_power_of_2(g["K"])))
    use_dot = (g["D"] > 16 or g["K"] > 32) if _FORCE_DOT is None else _FORCE_DOT == "1"
    if use_dot:
        block_k = 32  # a 16-wide component tile spills on sm_80 in the dot form at both 4 and 8 warps
    block_d = 16 if use_dot else 8
    block_r = 16
    return block_r, block_k, block_d, use_dot


def _num_warps(use_dot):
    return 8

def cgmm_fwd_v1(x, mu, sigma, log_pi, kernel, stride, loss, smoothing):
    """Forward launcher. x (N,H,W,C), mu/sigma (K,D)|(P,K,D), log_pi (K,)|(P,K), smoothing (K,K) or None.
    Returns resp (N,H',W',K), score, lse (N,H',W'), kstar (N,H',W') int32."""
    x, mu, sigma, log_pi = (t.contiguous() for t in (x, mu, sigma, log_pi))
    g = geometry(x, mu, kernel, stride)
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
    with device_guard(x):
        return _launch(x, a, b, c, ctr, smoothing, g, loss, block_r, block_k, block_d, use_dot)


def _launch(x, a, b, c, ctr, smoothing, g, loss, block_r, block_k, block_d, use_dot):
    G, K, D, N, Ho, Wo = g["G"], g["K"], g["D"], g["N"], g["Ho"], g["Wo"]
    resp = new_output(N, Ho, Wo, K, like=x)
    score, lse = new_output(N, Ho, Wo, like=x), new_output(N, Ho, Wo, like=x)
    kstar = new_output(N, Ho, Wo, like=x, dtype=torch.int32)
    tiles = triton.cdiv(g["ROWS"], block_r)
    gm = smoothing.contiguous() if smoothing is not None else c  # placeholder pointer when unused
    _cgmm_fwd_kernel[(G * tiles,)](
        resp, score, lse, kstar, x, a, b, c.contiguous(), ctr, gm,
        g["H"], g["W"], g["C"], Wo, g["P"], K, D, g["KWC"], g["sh"], g["sw"], g["ROWS"], tiles,
        0.5 * D * math.log(2 * math.pi),
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, INDEP=g["INDEP"], IS_MC=loss == "mc",
        HAS_SMOOTHING=smoothing is not None, USE_DOT=use_dot, num_warps=_num_warps(use_dot),
    )
    return resp, score, lse, kstar
