"""The Triton kernel itself. Imported lazily by ``triton_grouped`` (this module imports triton at the top).

``triton.jit`` decides at import time whether the kernel is compiled or interpreted, so TRITON_INTERPRET=1 must be
set before this module is first imported for the kernel to run on CPU tensors.

One program handles BLOCK_M query rows of one (batch, key/value head): the rows are the query heads sharing that
key/value head times the query rows (GQA by index arithmetic, k/v never repeated). K/V are streamed once, block by
block, while G online-softmax accumulators (running max, running sum, running weighted values) per row are kept as a
(BLOCK_M, G_PAD, ...) tile: a key of group g only feeds accumulator g.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: exact fp32 products (the default would be tf32 on recent GPUs); 16-bit inputs: the default.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def grouped_attention_kernel(
    Q,
    K,
    V,
    GID,
    MASK,
    OUT,
    LSE,
    sqb,
    sqh,
    sqq,
    sqd,
    skb,
    skh,
    skk,
    skd,
    svb,
    svh,
    svk,
    svd,
    sgb,
    sgh,
    sgk,
    smb,
    smh,
    smq,
    smk,
    sog,
    sob,
    soh,
    soq,
    sod,
    slg,
    slb,
    slh,
    slq,
    H_KV,
    N_REP,
    N_Q,
    N_K,
    D,
    DV,
    scaling,
    hidden_bias,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: none, 1: bool read as uint8 (nonzero = visible), 2: additive float
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # int64 offsets: k/v of long contexts can exceed 2**31 elements
    kvh = (pid_bh % H_KV).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # folded (query head within kv group, query row)
    row_ok = rows < N_REP * N_Q
    h = kvh * N_REP + rows // N_Q
    qi = rows % N_Q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    gidx = tl.arange(0, G_PAD)

    q_ptrs = Q + b * sqb + h[:, None] * sqh + qi[:, None] * sqq + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full((BLOCK_M, G_PAD), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M, G_PAD), tl.float32)
    acc = tl.zeros((BLOCK_M, G_PAD, BLOCK_DV), tl.float32)

    for start in range(0, N_K, BLOCK_N):
        n = start + offs_n
        n_ok = n < N_K
        k_ptrs = K + b * skb + kvh * skh + n[None, :] * skk + offs_d[:, None] * skd
        kt = tl.load(k_ptrs, mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, kt, IEEE) * scaling  # (BLOCK_M, BLOCK_N) fp32

        visible = row_ok[:, None] & n_ok[None, :]
        if MASK_KIND == 1:
            m_ptrs = MASK + b * smb + h[:, None] * smh + qi[:, None] * smq + n[None, :] * smk
            allowed = tl.load(m_ptrs, mask=visible, other=0)
            visible = visible & (allowed != 0)
        if MASK_KIND == 2:
            m_ptrs = MASK + b * smb + h[:, None] * smh + qi[:, None] * smq + n[None, :] * smk
            bias = tl.load(m_ptrs, mask=visible, other=0.0).to(tl.float32)
            visible = visible & (bias > hidden_bias)
            s = s + bias
        g_ptrs = GID + b * sgb + h[:, None] * sgh + n[None, :] * sgk
        gid = tl.load(g_ptrs, mask=visible, other=-1)
        s = tl.where(visible, s, float("-inf"))

        # (BLOCK_M, G_PAD, BLOCK_N): logits of the keys of group g, -inf elsewhere
        s3 = tl.where(gid[:, None, :] == gidx[None, :, None], s[:, None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s3, axis=2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf for still-empty groups
        alpha = tl.exp(m_i - m_safe)
        p3 = tl.exp(s3 - m_safe[:, :, None])
        l_i = l_i * alpha + tl.sum(p3, axis=2)

        v_ptrs = V + b * svb + kvh * svh + n[:, None] * svk + offs_dv[None, :] * svd
        vb = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        p2 = tl.reshape(p3.to(vb.dtype), (BLOCK_M * G_PAD, BLOCK_N))
        pv = _dot(p2, vb, IEEE)
        acc = acc * alpha[:, :, None] + tl.reshape(pv, (BLOCK_M, G_PAD, BLOCK_DV))
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, :, None]  # acc is exactly 0 for empty groups
    lse = tl.where(has, m_i + tl.log(l_safe), float("-inf"))

    o_ptrs = (
        OUT
        + gidx[None, :, None] * sog
        + b * sob
        + h[:, None, None] * soh
        + qi[:, None, None] * soq
        + offs_dv[None, None, :] * sod
    )
    o_mask = row_ok[:, None, None] & (gidx[None, :, None] < G) & (offs_dv[None, None, :] < DV)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
    l_ptrs = LSE + gidx[None, :] * slg + b * slb + h[:, None] * slh + qi[:, None] * slq
    tl.store(l_ptrs, lse, mask=row_ok[:, None] & (gidx[None, :] < G))
