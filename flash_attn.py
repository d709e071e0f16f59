"""FlashAttention in Triton: forward and backward kernels, (batch, seqlen, nheads, headdim) layout.

    from flash_attn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)   # q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D)
    out = flash_attn_func(q, k, v, doc_ids=ids)   # ids (B, T): attention within each document

The algorithm (the book's section 2.4.2; FlashAttention, arXiv 2205.14135, algorithm 1;
FlashAttention-2's work partitioning, arXiv 2307.08691). Attention is O = softmax(S) V with S = scale * Q K^T. The (T, T) matrix S
never reaches global memory: one program owns a block of BLOCK_M query rows, keeps it in
on-chip memory and streams over the key/value blocks. The softmax is computed online: with a
running row maximum m and running denominator l,

    m_new = max(m, rowmax(S_j))                 S_j: the scores against key block j
    P_j   = exp(S_j - m_new)
    l     = l * exp(m - m_new) + rowsum(P_j)
    acc   = acc * exp(m - m_new) + P_j V_j
    ...   O = acc / l,  lse = m + log(l)   after the last block

Rescaling by exp(m - m_new) keeps every exponent <= 0 (no overflow) and makes the result exact.
The kernels work in base 2 (exp2 is one instruction): scores are multiplied by
scale * log2(e) and lse is kept as m + log2(l) internally.

Backward (recompute instead of storing P): with the saved lse, P = exp(S - lse) is rebuilt
tile by tile, and with D = rowsum(dO * O) (a small preprocess kernel),

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ = scale * dS K,   dK = scale * dS^T Q.

Following FlashAttention-2, one kernel owns a key block and loops over query blocks (dK, dV
accumulate in registers, no atomics) and a second owns a query block and loops over key
blocks (dQ). For grouped-query attention the dK/dV program also loops over the query heads
of its group, so repeated k/v are never materialised. Masks (causal, sliding window, documents,
ragged tails) split each loop into blocks that need a mask and blocks that don't; fully masked
blocks are skipped. attention_reference() at the end is the plain PyTorch version, used on
CPUs and by the tests.

Masks. With Tq queries and Tk keys they are aligned bottom-right, as in FlashAttention: query i
sits at position i + Tk - Tq, so with a KV cache the last query is the last key (causal: it
sees keys <= i + Tk - Tq; a query that sees no key gets out 0 and lse +inf). Documents (packed
rows): doc_ids gives each token a document, a contiguous run of one id, and a query sees only
keys of its own document: FlashAttention-2's variable-length batches (arXiv 2307.08691)
without unpadding the row. Since documents are contiguous, query i sees the key range
[start[i], end[i]) (document_bounds) cut by the causal/window band, and both ends grow with i, so
a tile's first and last rows bound the keys the whole tile sees: tiles in other documents
are skipped and the cost falls with the document length.

Loads use TMA tensor descriptors (Hopper's bulk tensor copy engine; Triton falls back to
ordinary loads on older GPUs) and Triton's software pipelining (num_stages). Tile sizes are
autotuned per (head dim, causal, documents, dtype, sequence-length bucket) among a few candidates that fit
that head dim and dtype, once per GPU and Triton version (the choices are kept in Triton's cache
directory). The kernels are torch.library operators (flash_attn::forward, flash_attn::backward),
so torch.compile traces flash_attn_func without a graph break; a kernel's later launches of a
shape skip Triton's argument binding (_run), descriptors of a shape skip their checks
(descriptor), and nothing on the launch path synchronizes, so CUDA graphs capture it. On sm_90 and
later each kernel is a programmatic dependent launch: it starts during the previous kernel's end
and waits for its results first thing (_dependent_launch). Without
Triton installed the module still imports and flash_attn_func is attention_reference (HAVE_TRITON).

On a Hopper GPU (bf16/fp16), flash_attn_hopper.py runs instead at head dim 128, and at head dim
64 from the lengths in flash_attn_hopper.MIN_SEQLEN: the same algorithm, masks and lse,
scheduled as FlashAttention-3 does (a loader warp, consumer warpgroups, the five backward
matmuls in one kernel). These kernels stay the portable path: every other GPU, head dim and
dtype, shorter sequences, documents, Tq != Tk, and the interpreter on CPUs.
FLASH_ATTN_HOPPER=0 keeps them on Hopper too, and so does any failure of the Hopper path (one
line on stderr).
"""
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import types

import torch

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    HAVE_TRITON = True  # the kernels exist; without Triton flash_attn_func is attention_reference
except ImportError:
    HAVE_TRITON = False
    # a stand-in so that the kernel definitions below still parse: the decorators return the
    # function unchanged and tl.constexpr is the identity; nothing below calls these kernels
    triton = tl = types.SimpleNamespace(jit=lambda fn=None, **kw: fn or (lambda f: f), constexpr=lambda x: x)

INTERPRET = HAVE_TRITON and bool(triton.knobs.runtime.interpret)  # TRITON_INTERPRET=1: kernels run on the CPU in numpy
if not HAVE_TRITON and torch.cuda.is_available():
    print("flash_attn: Triton is not installed, so flash_attn_func runs attention_reference (PyTorch, (T, T) "
          "scores in memory) on the GPU too; pip install triton for the kernels", file=sys.stderr)
HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_BLOCK = 128  # largest tile in any config; lse/delta buffers are padded to a multiple of it
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e); a constexpr, so the kernels can read it


# --------------------------------------------------------------------------- masks and tile ranges
@triton.jit
def _visible(rows, cols, T, BEFORE, AFTER):
    """(len(rows), len(cols)) bool: row r sees column c iff r - BEFORE <= c <= r + AFTER and c < T.
    Query i sees key j: rows=i, BEFORE=left window, AFTER=right window (0 when causal)."""
    r, c = rows[:, None], cols[None, :]
    return (c < T) & (r - c <= BEFORE) & (c - r <= AFTER)


@triton.jit
def _band(rows, cols, BEFORE, AFTER):
    """_visible without the c < T test, in one unsigned compare: rows - cols in [-AFTER, BEFORE].
    For the dK/dV kernel (rows: keys, cols: queries), where query rows >= T have lse = +inf,
    so P = 0 there already."""
    d = rows[:, None] - cols[None, :] + AFTER
    return d.to(tl.uint32, bitcast=True) <= (BEFORE + AFTER).to(tl.uint32, bitcast=True)


@triton.jit
def _in_doc(starts, ends, cols):
    """(len(starts), len(cols)) bool: starts[r] <= c < ends[r] (row r's document), one unsigned compare."""
    d = (cols[None, :] - starts[:, None]).to(tl.uint32, bitcast=True)
    return d < (ends - starts)[:, None].to(tl.uint32, bitcast=True)


@triton.jit
def _row_docs(Doc, DOC_STRIDE, rows, T):
    """(starts, ends) of the documents of these rows (doc_range, see document_bounds); rows >= T: empty."""
    return (tl.load(Doc + rows, mask=rows < T, other=0),
            tl.load(Doc + DOC_STRIDE + rows, mask=rows < T, other=0))


@triton.jit
def _block_range(start, T_rows, T, BEFORE, AFTER, Doc, DOC_STRIDE,
                 BLOCK: tl.constexpr, STEP: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Rows start..start+BLOCK-1 see columns [lo, hi): the band of _visible and, with HAS_DOCS, the
    row's document [Doc[r], Doc[DOC_STRIDE + r]). Splits it into [lo, mid_lo) masked | [mid_lo,
    mid_hi) visible to every row, no mask | [mid_hi, hi) masked; lo, mid_lo, mid_hi are multiples
    of STEP (the column tile). Columns outside [lo, hi) are the fully masked tiles that are skipped
    (causal: everything right of the diagonal; documents: every other document)."""
    # Row r sees [r - BEFORE, r + AFTER + 1) of [0, T), intersected with its document. Both ends
    # grow with r (documents are contiguous runs), so the first row has the lowest start and end,
    # the last row the highest: a column tile [c, c+STEP) is fully visible if the last row's start
    # is <= c and the first row's end >= c+STEP.
    first_start, last_start = start - BEFORE, start + BLOCK - 1 - BEFORE
    first_end, last_end = start + 1 + AFTER, start + BLOCK + AFTER
    if HAS_DOCS:
        last = tl.minimum(start + BLOCK, T_rows) - 1  # the last row that exists
        first_start = tl.maximum(first_start, tl.load(Doc + start))
        last_start = tl.maximum(last_start, tl.load(Doc + last))
        first_end = tl.minimum(first_end, tl.load(Doc + DOC_STRIDE + start))
        last_end = tl.minimum(last_end, tl.load(Doc + DOC_STRIDE + last))
    lo = tl.maximum(first_start, 0) // STEP * STEP
    hi = tl.maximum(tl.minimum(last_end, T), lo)  # hi == lo: no row sees anything (Tq > Tk)
    mid_lo = tl.minimum(tl.cdiv(tl.maximum(last_start, lo), STEP) * STEP, tl.cdiv(hi, STEP) * STEP)
    mid_hi = tl.maximum(tl.maximum(tl.minimum(first_end, T), 0) // STEP * STEP, mid_lo)
    return lo, mid_lo, mid_hi, hi


# --------------------------------------------------------------------------- tiles of one head
@triton.jit
def _wait_for_inputs(GDC: tl.constexpr):
    """GDC (a dependent launch: _dependent_launch): the kernel may have started before the previous
    one in the stream ended, so wait here for its results before touching global memory. Then let
    the next kernel start early too: a kernel of ours, which waits likewise; others are launched
    without PDL and wait for this one to end, as usual. (flash_attn_hopper's kernels call it too,
    after their prologue: shared memory and barriers.)"""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _tile(desc, row, head, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM: tl.constexpr):
    """Rows row..row+ROWS-1 of one head as a (ROWS, HEAD_DIM) tile (_desc). A head dim DIM that is not
    a power of two is padded here: the descriptor is 3D (H, B*T, DIM) and TMA fills columns DIM..
    HEAD_DIM-1 with zeros, which change no dot product; no padded copy of q, k, v is ever made."""
    if DIM < HEAD_DIM:  # (if/else: both returns of a constexpr if would be compiled)
        tile = desc.load([head, row, 0]).reshape(ROWS, HEAD_DIM)
    else:
        tile = desc.load([row, head * HEAD_DIM])
    return tile


@triton.jit
def _tile_mask(rows_ok, HEAD_DIM: tl.constexpr, DIM: tl.constexpr):
    """Where a (rows, HEAD_DIM) tile is stored: rows that exist, and only the DIM real columns."""
    if DIM < HEAD_DIM:
        mask = rows_ok[:, None] & (tl.arange(0, HEAD_DIM) < DIM)[None, :]
    else:
        mask = rows_ok[:, None]
    return mask


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_row, kv_head, offs_m, start, end,
               T, LEFT, RIGHT, doc_start, doc_end, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
               HEAD_DIM: tl.constexpr, DIM: tl.constexpr):
    """Online softmax over key blocks [start, end) for one query block (see the module docstring)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _tile(desc_k, kv_row + start_n, kv_head, BLOCK_N, HEAD_DIM, DIM)  # (BLOCK_N, D)
        qk = tl.dot(q, k.T, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N); S_j = scale * qk
        v = _tile(desc_v, kv_row + start_n, kv_head, BLOCK_N, HEAD_DIM, DIM)  # (BLOCK_N, D)
        if MASKED:
            seen = _visible(offs_m, start_n + offs_n, T, LEFT, RIGHT)
            if HAS_DOCS:
                seen = seen & _in_doc(doc_start, doc_end, start_n + offs_n)
            qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units
        if MASKED:  # a row that has seen no visible key yet: subtract 0, not -inf (inf - inf = nan)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # P_j = exp(S_j - m_new), one FMA + exp2
        alpha = tl.math.exp2(m_i - m_new)  # exp(m - m_new) rescales the old sums
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(H, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's (batch * head index, batch, head, first query row). Grid: (query blocks,
    B * H); causal: the longest rows (the last blocks) start first, so the tail is short."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    return bh, bh // H, bh % H, pid_m * BLOCK_M


@triton.jit(do_not_specialize=["Tq", "Tk", "T_pad", "GROUP", "LEFT", "RIGHT", "DOC_STRIDE", "SEQ_BUCKET"])
def _fwd_kernel(desc_q, desc_k, desc_v, Out, Lse, Docs, softmax_scale,
                stride_ob, stride_ot, stride_oh,
                Tq, Tk, T_pad, H, GROUP, LEFT, RIGHT, DOC_STRIDE, SEQ_BUCKET,
                HEAD_DIM: tl.constexpr, DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GDC: tl.constexpr = False):
    _wait_for_inputs(GDC)
    bh, b, h, m0 = _query_block(H, IS_CAUSAL, BLOCK_M)
    # q/k/v are seen as 2D (B*T, heads*D) (3D for a padded head dim, _desc): a tile is BLOCK rows of
    # one head's D columns.
    # Rows past Tq (Tk) read the next sequence (or zeros at the end): those keys are masked and
    # those query rows are never stored.
    kv_row, kv_head = b * Tk, h // GROUP
    q = _tile(desc_q, b * Tq + m0, h, BLOCK_M, HEAD_DIM, DIM)  # (BLOCK_M, D), stays on chip
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = softmax_scale * LOG2E  # exp(x) = exp2(x * log2(e))

    doc_start, doc_end = 0, 0
    if HAS_DOCS:
        Docs += b * Tq
        doc_start, doc_end = _row_docs(Docs, DOC_STRIDE, offs_m, Tq)
    lo, mid_lo, mid_hi, hi = _block_range(m0, Tq, Tk, LEFT, RIGHT, Docs, DOC_STRIDE, BLOCK_M, BLOCK_N, HAS_DOCS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_row, kv_head, offs_m, lo, mid_lo,
                               Tk, LEFT, RIGHT, doc_start, doc_end, qk_scale, BLOCK_N, True, HAS_DOCS, PRECISION,
                               HEAD_DIM, DIM)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_row, kv_head, offs_m, mid_lo, mid_hi,
                               Tk, LEFT, RIGHT, doc_start, doc_end, qk_scale, BLOCK_N, False, HAS_DOCS, PRECISION,
                               HEAD_DIM, DIM)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, kv_row, kv_head, offs_m, mid_hi, hi,
                               Tk, LEFT, RIGHT, doc_start, doc_end, qk_scale, BLOCK_N, True, HAS_DOCS, PRECISION,
                               HEAD_DIM, DIM)

    # epilogue: O = acc / l, lse = m + log2(l); rows that saw no key (padding rows, or queries
    # before the first key when Tq > Tk) get O = 0 and lse = +inf (so P = 0 there in backward)
    valid = offs_m < Tq
    seen = l_i > 0
    lse = tl.where(valid & seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    l_i = tl.where(seen, l_i, 1.0)
    tl.store(Lse + bh.to(tl.int64) * T_pad + offs_m, lse)
    Out += b.to(tl.int64) * stride_ob + h * stride_oh + m0.to(tl.int64) * stride_ot  # scalar 64-bit base
    offs = tl.arange(0, BLOCK_M)[:, None] * stride_ot + tl.arange(0, HEAD_DIM)[None, :]  # 32-bit offsets
    tl.store(Out + offs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=_tile_mask(valid, HEAD_DIM, DIM))


# --------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["T", "T_pad"])
def _bwd_preprocess(Out, dOut, Delta, dQ, stride_b, stride_t, stride_h, T, T_pad, H,
                    HEAD_DIM: tl.constexpr, DIM: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr = False,
                    GDC: tl.constexpr = False):
    """Delta = rowsum(dO * O) (float32), one value per query row; rows >= T get 0. ZERO_DQ: dQ (float32,
    O's strides) zeroed in the same pass, for a backward that sums dQ by atomic adds (flash_attn_hopper)."""
    _wait_for_inputs(GDC)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs = (b.to(tl.int64) * stride_b + h * stride_h
            + offs_m[:, None].to(tl.int64) * stride_t + offs_d[None, :])
    mask = _tile_mask(offs_m < T, HEAD_DIM, DIM)
    o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dOut + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T_pad + offs_m, tl.sum(o * do, 1))
    if ZERO_DQ:
        tl.store(dQ + offs, tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), mask=mask)


@triton.jit
def _cast(Src, Dst, N, ROW, BLOCK: tl.constexpr, PARTS: tl.constexpr = 1, GDC: tl.constexpr = False):
    """Dst[:N] = Src's float32 in Dst's dtype: with PARTS > 1 the sum of PARTS parts, Dst's row r (ROW
    elements) being the sum of Src's rows r PARTS ... r PARTS + PARTS - 1. flash_attn_hopper's dQ, or
    its dK, dV from partial sums, in q's dtype, by a launch of ours rather than torch's .to, so that the
    backward's call is one that _replayed can replay."""
    _wait_for_inputs(GDC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    src = offs + offs // ROW * ((PARTS - 1) * ROW)  # part 0 of the element's row
    acc = tl.load(Src + src, mask=offs < N)
    for p in tl.static_range(1, PARTS):  # in order: the same sum on every run
        acc += tl.load(Src + src + p * ROW, mask=offs < N)
    tl.store(Dst + offs, acc.to(Dst.dtype.element_ty), mask=offs < N)


@triton.jit
def _dkdv_inner(dk, dv, k, v, desc_q, desc_do, Lse, Delta, q_row, q_head, bh, offs_n, start, end,
                T, T_pad, LEFT, RIGHT, doc_start, doc_end, qk_scale,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
                HEAD_DIM: tl.constexpr, DIM: tl.constexpr):
    """One key block against query blocks [start, end) of one query head; tiles are transposed
    (keys along rows) so that dK and dV come out as (BLOCK_N, D)."""
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _tile(desc_q, q_row + start_m, q_head, BLOCK_M, HEAD_DIM, DIM)  # (BLOCK_M, D)
        do = _tile(desc_do, q_row + start_m, q_head, BLOCK_M, HEAD_DIM, DIM)
        lse = tl.load(Lse + bh * T_pad + offs_m)  # (BLOCK_M,), log2 units
        delta = tl.load(Delta + bh * T_pad + offs_m)
        s_t = tl.dot(k, q.T, input_precision=PRECISION) * qk_scale  # S^T: (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])  # P^T = exp(S - lse)^T, recomputed
        if MASKED:  # key j is seen by query i iff j - RIGHT <= i <= j + LEFT (and i < T: lse)
            seen = _band(offs_n, offs_m, RIGHT, LEFT)
            if HAS_DOCS:  # and i is in j's document
                seen = seen & _in_doc(doc_start, doc_end, offs_m)
            p_t = tl.where(seen, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, do.T, input_precision=PRECISION)  # dP^T = V dO^T
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # dS^T = P^T * (dP^T - D)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)  # dK += dS^T Q
    return dk, dv


# GROUP is specialized (GROUP == 1: no group loop)
@triton.jit(do_not_specialize=["Tq", "Tk", "T_pad", "LEFT", "RIGHT", "DOC_STRIDE", "SEQ_BUCKET"])
def _bwd_dkdv_kernel(desc_q, desc_k, desc_v, desc_do, dK, dV, Lse, Delta, Docs, softmax_scale,
                     stride_b, stride_t, stride_h,
                     Tq, Tk, T_pad, H_KV, GROUP, LEFT, RIGHT, DOC_STRIDE, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_LOOP: tl.constexpr = False,
                     GDC: tl.constexpr = False):
    _wait_for_inputs(GDC)
    # grid: (key blocks, B * H_KV); causal: the first key blocks have the most work and start first
    bhk = tl.program_id(1)
    b, hk = bhk // H_KV, bhk % H_KV
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _tile(desc_k, b * Tk + n0, hk, BLOCK_N, HEAD_DIM, DIM)  # (BLOCK_N, D), on chip for the whole loop
    v = _tile(desc_v, b * Tk + n0, hk, BLOCK_N, HEAD_DIM, DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = softmax_scale * LOG2E
    # the query rows that see these keys: the transpose of the forward's band (BEFORE <-> AFTER);
    # documents are symmetric (queries of key j's document: [start[j], end[j]), Tq == Tk)
    doc_start, doc_end = 0, 0
    if HAS_DOCS:
        Docs += b * Tk
        doc_start, doc_end = _row_docs(Docs, DOC_STRIDE, offs_n, Tk)
    lo, mid_lo, mid_hi, hi = _block_range(n0, Tk, Tq, RIGHT, LEFT, Docs, DOC_STRIDE, BLOCK_N, BLOCK_M, HAS_DOCS)
    for g in range(GROUP):  # grouped-query: sum over the query heads that share this kv head
        h = hk * GROUP + g
        bh = (b * H_KV * GROUP + h).to(tl.int64)
        if ONE_LOOP:  # mask every block: more arithmetic, but fewer live registers (no spills)
            dk, dv = _dkdv_inner(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b * Tq, h, bh, offs_n,
                                 lo, hi, Tq, T_pad, LEFT, RIGHT, doc_start, doc_end, qk_scale,
                                 BLOCK_M, True, HAS_DOCS, PRECISION, HEAD_DIM, DIM)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b * Tq, h, bh, offs_n,
                                 lo, mid_lo, Tq, T_pad, LEFT, RIGHT, doc_start, doc_end, qk_scale,
                                 BLOCK_M, True, HAS_DOCS, PRECISION, HEAD_DIM, DIM)
            dk, dv = _dkdv_inner(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b * Tq, h, bh, offs_n,
                                 mid_lo, mid_hi, Tq, T_pad, LEFT, RIGHT, doc_start, doc_end, qk_scale,
                                 BLOCK_M, False, HAS_DOCS, PRECISION, HEAD_DIM, DIM)
            dk, dv = _dkdv_inner(dk, dv, k, v, desc_q, desc_do, Lse, Delta, b * Tq, h, bh, offs_n,
                                 mid_hi, hi, Tq, T_pad, LEFT, RIGHT, doc_start, doc_end, qk_scale,
                                 BLOCK_M, True, HAS_DOCS, PRECISION, HEAD_DIM, DIM)
    # a scalar 64-bit base, 32-bit offsets and a row mask (a 2D int64/mask epilogue costs ~30
    # registers across the whole loop and made the kernel spill)
    base = b.to(tl.int64) * stride_b + hk * stride_h + n0.to(tl.int64) * stride_t
    dK += base
    dV += base
    offs = tl.arange(0, BLOCK_N)[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
    mask = _tile_mask(offs_n < Tk, HEAD_DIM, DIM)
    tl.store(dK + offs, (dk * softmax_scale).to(dK.dtype.element_ty), mask=mask)  # dK = scale dS^T Q
    tl.store(dV + offs, dv.to(dV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, desc_k, desc_v, kv_row, kv_head, offs_m, start, end,
              T, LEFT, RIGHT, doc_start, doc_end, qk_scale,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, PRECISION: tl.constexpr,
              HEAD_DIM: tl.constexpr, DIM: tl.constexpr):
    """One query block against key blocks [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _tile(desc_k, kv_row + start_n, kv_head, BLOCK_N, HEAD_DIM, DIM)  # (BLOCK_N, D)
        v = _tile(desc_v, kv_row + start_n, kv_head, BLOCK_N, HEAD_DIM, DIM)
        s = tl.dot(q, k.T, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            seen = _visible(offs_m, start_n + offs_n, T, LEFT, RIGHT)
            if HAS_DOCS:
                seen = seen & _in_doc(doc_start, doc_end, start_n + offs_n)
            p = tl.where(seen, p, 0.0)
        dp = tl.dot(do, v.T, input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])  # dS = P * (dP - D)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)  # dQ += dS K
    return dq


@triton.jit(do_not_specialize=["Tq", "Tk", "T_pad", "GROUP", "LEFT", "RIGHT", "DOC_STRIDE", "SEQ_BUCKET"])
def _bwd_dq_kernel(desc_q, desc_k, desc_v, desc_do, dQ, Lse, Delta, Docs, softmax_scale,
                   stride_b, stride_t, stride_h,
                   Tq, Tk, T_pad, H, GROUP, LEFT, RIGHT, DOC_STRIDE, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GDC: tl.constexpr = False):
    _wait_for_inputs(GDC)
    bh, b, h, m0 = _query_block(H, IS_CAUSAL, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _tile(desc_q, b * Tq + m0, h, BLOCK_M, HEAD_DIM, DIM)  # (BLOCK_M, D)
    do = _tile(desc_do, b * Tq + m0, h, BLOCK_M, HEAD_DIM, DIM)
    lse = tl.load(Lse + bh.to(tl.int64) * T_pad + offs_m)
    delta = tl.load(Delta + bh.to(tl.int64) * T_pad + offs_m)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = softmax_scale * LOG2E
    kv_row, kv_head = b * Tk, h // GROUP
    doc_start, doc_end = 0, 0
    if HAS_DOCS:
        Docs += b * Tq
        doc_start, doc_end = _row_docs(Docs, DOC_STRIDE, offs_m, Tq)
    lo, mid_lo, mid_hi, hi = _block_range(m0, Tq, Tk, LEFT, RIGHT, Docs, DOC_STRIDE, BLOCK_M, BLOCK_N, HAS_DOCS)
    dq = _dq_inner(dq, q, do, lse, delta, desc_k, desc_v, kv_row, kv_head, offs_m, lo, mid_lo,
                   Tk, LEFT, RIGHT, doc_start, doc_end, qk_scale, BLOCK_N, True, HAS_DOCS, PRECISION,
                   HEAD_DIM, DIM)
    dq = _dq_inner(dq, q, do, lse, delta, desc_k, desc_v, kv_row, kv_head, offs_m, mid_lo, mid_hi,
                   Tk, LEFT, RIGHT, doc_start, doc_end, qk_scale, BLOCK_N, False, HAS_DOCS, PRECISION,
                   HEAD_DIM, DIM)
    dq = _dq_inner(dq, q, do, lse, delta, desc_k, desc_v, kv_row, kv_head, offs_m, mid_hi, hi,
                   Tk, LEFT, RIGHT, doc_start, doc_end, qk_scale, BLOCK_N, True, HAS_DOCS, PRECISION,
                   HEAD_DIM, DIM)
    dQ += b.to(tl.int64) * stride_b + h * stride_h + m0.to(tl.int64) * stride_t  # scalar base
    offs = tl.arange(0, BLOCK_M)[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(dQ + offs, (dq * softmax_scale).to(dQ.dtype.element_ty), mask=_tile_mask(offs_m < Tq, HEAD_DIM, DIM))


# --------------------------------------------------------------------------- tile configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M tiles queries, BLOCK_N keys. On Hopper,
# Triton issues wgmma for the dots (a warpgroup of 4 warps owns 64 rows of a tile) and
# pipelines the TMA loads num_stages deep; shared memory (228 KB per SM) and registers bound
# the tiles (bench_attention.py --tiles times each; notes/ptxas_regs.py reports registers and
# spills). The first tile that fits is the default when autotuning is off. dkdv also tries
# ONE_LOOP (see _bwd_dkdv_kernel). The last, 8-warp tiles are for float32 at large head dims (_fits).
TILES = {
    "fwd": [(64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2)],
    "dkdv": [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2), (16, 64, 4, 3),
             (16, 32, 8, 2)],
    "dq": [(64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3), (32, 32, 8, 2)],
}
INTERPRET_TILES = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}  # CPU: BLOCK_M != BLOCK_N
# which tiles stay on chip for the whole program and which stream through the pipeline
# (q: a BLOCK_M x D tile of Q or dO, kv: a BLOCK_N x D tile of K or V)
ON_CHIP = {"fwd": (1, 2), "dkdv": (2, 2), "dq": (2, 2)}  # (resident, streamed) tile counts
VARIANTS = {"fwd": [{}], "dkdv": [{"ONE_LOOP": False}, {"ONE_LOOP": True}], "dq": [{}]}  # constexprs also tuned
# Autotuning compiles every candidate (seconds each on a GPU host) and times it on the first call of each key;
# every config of a float32 head-dim-256 backward took 361 s on an H200. So at most MAX_CONFIGS candidates
# per kernel and key, MAX_CONFIGS_SLOW for the slowest compiles (float32: FMA dots; head dim >= 192), and
# the choices are kept across processes (_tuned).
MAX_CONFIGS, MAX_CONFIGS_SLOW = 4, 2
# every launch states FMA contraction (a*b+c in one rounding) rather than taking Triton's default, which
# 3.9 warns about and 3.10 turns off
FP_FUSION = {"enable_fp_fusion": True}
AUTOTUNE = os.environ.get("FLASH_ATTN_AUTOTUNE", "1") != "0"  # 0: default tiles, no tuning (quick tests)
HOPPER = os.environ.get("FLASH_ATTN_HOPPER", "1") != "0"  # 0: the portable kernels on Hopper too
_HOPPER_MODULE = None  # flash_attn_hopper once imported, False if it cannot be or once it failed
PDL = True  # False: no programmatic dependent launch (_dependent_launch; notes/step_host.py --no_pdl)
REPLAY = True  # False: operator calls never replayed (_replayed; notes/step_host.py --no_replay)
DIRECT_LAUNCH = True  # False: every launch through Triton's own launcher (_launcher; notes/host_profile.py --launch)
FORCE_TILES = {}  # e.g. {"fwd": (128, 64, 4, 3)}: bench_attention.py --tiles times each tile this way
_TUNED = None  # {key: (tile, variant)}: the autotuned choices, loaded from _tuned_path() on first use


def _fits(which, tile, head_dim, elem_bytes=2):
    """Shared memory of the tiles (elem_bytes per element): resident ones once, streamed ones num_stages
    times. float32 (elem_bytes 4) runs its dots on FMA units, with both operands in registers: there the
    resident tiles and the float32 accumulators (dK and dV in dkdv) also get at most half of the 255
    registers per thread (ptxas for sm_90a, head dim 256: the 4-warp 64x32 forward tile spills 10 KB
    and compiles 5x longer than the 8-warp one)."""
    bm, bn, warps, stages = tile
    resident, streamed = ON_CHIP[which]
    res_rows, stream_rows = (bm, bn) if which in ("fwd", "dq") else (bn, bm)
    smem = elem_bytes * head_dim * (resident * res_rows + stages * streamed * stream_rows)
    regs = (resident + (2 if which == "dkdv" else 1)) * res_rows * head_dim / (32 * warps)
    return smem <= 200 * 1024 and (elem_bytes == 2 or regs <= 128)


@functools.lru_cache(maxsize=None)
def _space(which, head_dim, elem_bytes):
    """The autotune candidates [(tile, variant)] of one kernel for a head dim and element size: TILES x
    VARIANTS that fit, in TILES' order, at most MAX_CONFIGS (MAX_CONFIGS_SLOW); never empty. The first
    is the default tile when autotuning is off. Cached (_launch asks on every call): TILES, VARIANTS
    and the caps are read once per process."""
    tiles = [t for t in TILES[which] if _fits(which, t, head_dim, elem_bytes)] or TILES[which][-1:]
    cap = MAX_CONFIGS_SLOW if elem_bytes == 4 or head_dim >= 192 else MAX_CONFIGS
    return [(t, x) for t in tiles for x in VARIANTS[which]][:cap]


def _elem_bytes(meta):
    return 4 if meta["PRECISION"] == "ieee" else 2  # _common: "ieee" exactly for float32


def _set_blocks(nargs):
    """The descriptors' block shapes must match the tile the kernel is compiled for (_desc, _tile)."""
    d, bm, bn = nargs["HEAD_DIM"], nargs["BLOCK_M"], nargs["BLOCK_N"]
    for name, rows in (("desc_q", bm), ("desc_do", bm), ("desc_k", bn), ("desc_v", bn)):
        if name in nargs:
            nargs[name].block_shape = [rows, d] if len(nargs[name].shape) == 2 else [1, rows, d]


def _config(tile, variant):
    bm, bn, w, s = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **variant}, num_warps=w, num_stages=s, pre_hook=_set_blocks)


def _autotuned(kernel, which):
    def prune(configs, named_args, **meta):  # the candidates for this call's head dim and dtype
        return [_config(t, x) for t, x in _space(which, meta["HEAD_DIM"], _elem_bytes(meta))]
    # key: plus the dtypes of the tensor arguments, which Triton adds itself
    return triton.autotune([_config(t, x) for t in TILES[which] for x in VARIANTS[which]],
                           key=["HEAD_DIM", "DIM", "IS_CAUSAL", "HAS_DOCS", "SEQ_BUCKET"],
                           prune_configs_by={"early_config_prune": prune})(kernel)


KERNELS = {"fwd": (_fwd_kernel, _autotuned(_fwd_kernel, "fwd")),
           "dkdv": (_bwd_dkdv_kernel, _autotuned(_bwd_dkdv_kernel, "dkdv")),
           "dq": (_bwd_dq_kernel, _autotuned(_bwd_dq_kernel, "dq"))} if HAVE_TRITON else {}


def _tuned_path():
    """Next to Triton's compiled kernels (TRITON_CACHE_DIR), so that emptying that cache retunes too.
    (Triton's own autotune cache_results skips configs with a pre_hook, which ours need.)"""
    return os.path.join(triton.knobs.cache.dir, "flash_attn_tuned.json")


@functools.lru_cache(maxsize=None)
def _tuned_prefix(device):
    """The part of a tuned choice's key fixed per device and process: the GPU, the Triton version and a
    hash of this file (an edited kernel or tile list is tuned afresh). Cached: _launch is on every call."""
    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()[:16]
    return f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}|{source}"


def _tuned():
    global _TUNED
    if _TUNED is None:
        try:
            with open(_tuned_path()) as f:
                _TUNED = {key: (tuple(c[:4]), c[4]) for key, c in json.load(f).items()}
        except (OSError, ValueError, TypeError, IndexError):  # none yet, or unreadable: tune again
            _TUNED = {}
    return _TUNED


def _remember(key, config):
    """Records the autotuner's choice, in this process and in the JSON file (merged with what other
    processes wrote meanwhile; a failed write only costs a retune in the next process)."""
    kw = dict(config.kwargs)
    tile = (kw.pop("BLOCK_M"), kw.pop("BLOCK_N"), config.num_warps, config.num_stages)
    _tuned()[key] = (tile, kw)
    path = _tuned_path()
    try:
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = {}
        saved[key] = [*tile, kw]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.{os.getpid()}", "w") as f:
            json.dump(saved, f, indent=0)
        os.replace(f"{path}.{os.getpid()}", path)
    except OSError:
        pass


_COMPILED = {}  # _run's launch key -> (_launcher's launch for the compiled kernel and grid, the trailing arguments)
_CHOICES = {}  # _launch's (which, caller's key, forced tile, AUTOTUNE, meta) -> (tile, variant) once chosen
# the current CUDA device: torch.cuda.current_device without its lazy-init check (a launch is on an initialized GPU)
_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # a device's current stream's handle (as Triton's)


def _keep(cache, key, value):
    """cache[key] = value, emptying the cache first above 4096 keys (a KV cache's growing Tk makes a
    new key per token for _COMPILED, _CHOICES and _DESCRIPTOR_FIELDS). Returns value."""
    if len(cache) > 4096:
        cache.clear()
    cache[key] = value
    return value


def _launch_key(arg):
    """What Triton's JIT specializes a kernel on, for one argument, or finer: a tensor's dtype and
    16-byte alignment; a TMA descriptor's base dtype and alignment, shape, strides, block and layout;
    any other value exactly (with its type: True and 1 are different launches)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if hasattr(arg, "block_shape"):  # triton.tools' or Gluon's TensorDescriptor
        return (arg.base.dtype, arg.base.data_ptr() % 16 == 0, tuple(arg.shape), tuple(arg.strides),
                tuple(arg.block_shape), getattr(arg, "layout", None), arg.padding)
    return type(arg), arg


def _run(kernel, grid, *args, key=None, **kwargs):
    """kernel[grid](*args, **kwargs) without Triton's per-launch binding: its JIT specializes every
    argument and looks the compiled kernel up on each call, a large part of the host's time per
    attention call. The compiled kernel that a launch key (_launch_key of every argument, or `key`:
    a tuple of values that determine all of those, such as the shapes the arguments derive from; and
    the grid and keyword arguments) got on its first call is launched directly from then on (by
    _launcher, all arguments in signature order: the keyword ones, fixed by the key, are kept as
    the tail). Exact values in the key: every hit is a launch the JIT would compile
    identically. The current device is part of the key (a compiled kernel is loaded per device);
    under the interpreter (kernels without Triton's device caches) nothing is kept. Every launch
    gets FP_FUSION."""
    kwargs = {**FP_FUSION, **kwargs}
    if not hasattr(kernel, "device_caches"):
        return kernel[grid](*args, **kwargs)
    key = (kernel, _device(), *grid, *(map(_launch_key, args) if key is None else key), *kwargs.items())
    hit = _COMPILED.get(key)
    if hit is None:
        _not_replayable_launch()
        compiled = kernel[grid](*args, **kwargs)
        tail = tuple(kwargs.get(p.name, p.default) for p in kernel.params[len(args):])
        _keep(_COMPILED, key, (_launcher(compiled, (*grid, 1, 1)[:3]), tail))
        return
    launcher, tail = hit
    recorded = None if _RECORDING is None else len(_RECORDING.launches)
    launcher(*args, *tail)
    if recorded is not None and len(_RECORDING.launches) == recorded:  # Triton's own launch, not a direct one
        _RECORDING.direct = False


def _launcher(compiled, grid):
    """A launch of a compiled kernel on grid (3 values), all arguments in signature order. Triton's
    own (compiled[grid]) costs about 24 us of host per launch on an H200's host: its runner builds
    launch metadata and calls the launch hooks, a Python wrapper expands each TMA descriptor into a
    CUtensorMap (fill_tma_descriptor), shape and strides, and the C launcher asks the driver about
    every tensor. Under Triton 3.6 (the launcher this was written against and tested with; others get
    Triton's own) the generated C launcher is called straight, about 16 us sooner
    (notes/flash_attn_bench.md): each descriptor as its CUtensorMap, kept per base address, shape
    and strides (all that the map encodes but what the compiled kernel fixes), a tensor as its
    address. Not for kernels with scratch memory, clusters or descriptors Triton decomposes, where
    Triton's internals are not as read here, nor while a launch hook is set (profilers), nor with
    DIRECT_LAUNCH off: Triton's own then."""
    runner = compiled[grid]
    if not DIRECT_LAUNCH or not triton.__version__.startswith("3.6."):
        return runner
    try:  # Triton 3.6's internals as read here; anything else (a patch release that moved them): its own launch
        from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
        run = compiled.run  # Triton's CudaLauncher (compiled[grid] loaded it)
        kinds = [str(kind) for kind in compiled.src.signature.values()]
        metas = list(getattr(compiled.metadata, "tensordesc_meta", None) or ())
        at = [i for i, kind in enumerate(kinds) if kind.startswith("tensordesc")]
        if (run.global_scratch_size or run.profile_scratch_size or run.num_ctas != 1 or len(metas) != len(at)
                or any(m is None or m["fp4_padded"] for m in metas)):
            return runner
        descs = [(i, m["swizzle"], m["elem_size"], TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]], m["block_size"])
                 for i, m in reversed(list(zip(at, metas)))]  # from the last: each expands to 1 + 2 * rank arguments
        pointers = [i for i, kind in enumerate(kinds) if kind.startswith("*")]
        c_launch = inspect.getclosurevars(run.launch).nonlocals["launcher"] if descs else run.launch
        fill = triton.runtime.driver.active.utils.fill_tma_descriptor
        fixed = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None, compiled.packed_metadata,
                 None, None, None)  # function, launch flags, no scratch, kernel metadata, no launch metadata or hooks
        knobs, maps, device = triton.knobs.runtime, {}, _device()  # (_run's key holds the device)
        enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
        if not (isinstance(enter.calls, list) and isinstance(leave.calls, list)):  # 3.6's hook chains
            return runner
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return runner

    def cu_map(ptr, i, swizzle, elem_size, elem_type, block, shape, strides, padding):
        """Descriptor i's CUtensorMap over the tensor at ptr, kept per base address, shape and strides."""
        key = (i, ptr, *shape, *strides, padding)
        found = maps.get(key)
        if found is None:
            found = _keep(maps, key, fill(ptr, swizzle, elem_size, elem_type, block, shape, strides,
                                          int(padding == "nan")))
        return found

    def launch(*args):
        if enter.calls or leave.calls or knobs.launch_enter_hook is not enter or knobs.launch_exit_hook is not leave:
            return runner(*args)
        expanded = list(args)
        for i in pointers:
            expanded[i] = expanded[i].data_ptr()
        for i, *spec in descs:
            d = expanded[i]
            expanded[i:i + 1] = (cu_map(d.base.data_ptr(), i, *spec, d.shape, d.strides, d.padding), *d.shape,
                                 *d.strides)
        c_launch(*grid, _stream(device), *fixed, *expanded)
        if _RECORDING is not None:
            _RECORDING.launches.append((c_launch, grid, fixed, pointers, descs, cu_map, args))
    return launch


def _launch(which, T, heads, descs, *args, key=None, **meta):
    """Grid (row blocks, heads): fwd and dq tile the rows by BLOCK_M (queries), dkdv by BLOCK_N
    (keys); key: _run's. The tile: _choose's, kept per key (_CHOICES) on a GPU, so that later calls
    of the same shapes skip the lookup."""
    forced = FORCE_TILES.get(which)
    choice_key = None if key is None or INTERPRET else (which, key, forced, AUTOTUNE, *meta.values())
    choice = _CHOICES.get(choice_key)
    if choice is None:
        choice = _choose(which, T, heads, descs, args, meta)
        if choice is None:  # tuned just now: the autotuner has launched this call
            return
        if choice_key is not None:
            _keep(_CHOICES, choice_key, choice)
    (bm, bn, w, s), variant = choice
    nargs = dict(zip(("desc_q", "desc_k", "desc_v", "desc_do"), descs), BLOCK_M=bm, BLOCK_N=bn, **meta)
    _set_blocks(nargs)
    grid = (triton.cdiv(T, bn if which == "dkdv" else bm), heads)
    _run(KERNELS[which][0], grid, *descs, *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, key=key,
         **variant, **meta)


def _choose(which, T, heads, descs, args, meta):
    """(tile, variant): FORCE_TILES', the interpreter's, the default (FLASH_ATTN_AUTOTUNE=0) or the
    autotuned one (once per GPU, Triton version, source of this file and tuned_key: _tuned); None
    when this call tuned it, the autotuner launching the call itself."""
    if which in FORCE_TILES:
        return FORCE_TILES[which], {}
    if INTERPRET:
        return INTERPRET_TILES[which], {}
    space = _space(which, meta["HEAD_DIM"], _elem_bytes(meta))
    x = descs[0].base
    tuned_key = (f"{_tuned_prefix(x.device)}|{which}|{x.dtype}|D{meta['DIM']}|causal{meta['IS_CAUSAL']}|"
                 f"docs{meta['HAS_DOCS']}|bucket{meta['SEQ_BUCKET']}")
    choice = space[0] if not AUTOTUNE else _tuned().get(tuned_key, (None, None))
    if choice in space:
        return choice
    # not tuned yet (or tuned over another TILES)
    rows = "BLOCK_N" if which == "dkdv" else "BLOCK_M"
    autotuned = KERNELS[which][1]
    _not_replayable_launch()
    autotuned[lambda cfg: (triton.cdiv(T, cfg[rows]), heads)](*descs, *args, **meta, **FP_FUSION)
    _remember(tuned_key, autotuned.best_config)
    return None


# --------------------------------------------------------------------------- host side
def _desc(x):
    """TMA descriptor over (B, T, H, D) seen as 2D (B*T, H*D), or, for a head dim that is not a
    power of two, as 3D (H, B*T, D) so that a tile's columns past D are out of bounds (zeros, _tile);
    block shape set at launch. (Heads first: a (1, rows, width) block lands in shared memory as the
    (rows, width) tile the dots read; (rows, 1, width) went through registers, ptxas_regs.py.)"""
    B, T, H, D = x.shape
    if D != _width(D):
        return descriptor(TensorDescriptor, x, [H, B * T, D], [D, H * D, 1], [1, 16, _width(D)])
    return descriptor(TensorDescriptor, x, [B * T, H * D], [H * D, 1], [16, D])


_DESCRIPTOR_FIELDS = {}  # descriptor's key -> the fields of a descriptor built (and checked) by its class, but base


def descriptor(cls, x, shape, strides, block, *extra):
    """cls(x, shape, strides, block, *extra): a TMA descriptor (triton.tools' or Gluon's TensorDescriptor)
    in about a microsecond less of host time each (several per attention call). The class's checks run
    once per (class, dtype, shape, strides, block); later descriptors copy the fields of that first one
    with x as the base. extra (Gluon's shared-memory layout) must follow from those; the one check that
    depends on x itself, 16-byte alignment, holds for every base here (_prepare, fresh outputs)."""
    key = (cls, x.dtype, *shape, *strides, *block)
    fields = _DESCRIPTOR_FIELDS.get(key)
    if fields is None:
        fields = _keep(_DESCRIPTOR_FIELDS, key, vars(cls(x, shape, strides, block, *extra)) | {"base": None})
    desc = object.__new__(cls)
    desc.__dict__.update(fields, base=x)
    return desc


def _width(D):
    """The kernels' tile width for head dim D: the next of HEAD_DIMS."""
    return next(d for d in HEAD_DIMS if d >= D)


def _prepare(x):
    """Contiguous and 16-byte aligned, as TMA requires."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _common(q, causal, doc_range):
    B, T, H, D = q.shape
    return dict(HEAD_DIM=_width(D), DIM=D, IS_CAUSAL=causal, HAS_DOCS=doc_range is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                SEQ_BUCKET=0 if T <= 1024 else 1 if T <= 4096 else 2, **_dependent_launch(q.device))


def _dependent_launch(device):
    """The kernels' launch options on device: programmatic dependent launch (PDL) on sm_90 and later,
    while PDL is set. Such a launch lets a kernel's programs onto the SMs as the previous kernel in
    the stream finishes, instead of after it has ended (it saves 0.1-0.3% of the 134M training
    step's GPU time, notes/flash_attn_bench.md). The protocol: a kernel launched so (launch_pdl)
    waits for the previous one's results (GDC: _wait_for_inputs) before it touches global memory."""
    gdc = PDL and device.type == "cuda" and not INTERPRET and _sm90(device.index)
    return dict(GDC=gdc, launch_pdl=gdc)


@functools.lru_cache(maxsize=None)
def _sm90(index):
    return torch.cuda.get_device_capability(index)[0] >= 9


def _hopper(q, direction):
    """flash_attn_hopper (warp-specialized Gluon kernels) where it applies to direction ("forward",
    "backward"): a Hopper GPU, its head dims and lengths, bf16/fp16, FLASH_ATTN_HOPPER not 0. Imported
    on first use (it compiles for the GPU only); any failure there (e.g. a Triton whose Gluon API
    differs) leaves the portable kernels (_hopper_failed)."""
    global _HOPPER_MODULE
    if not HOPPER:
        return None
    if _HOPPER_MODULE is None and q.is_cuda and not INTERPRET:
        try:
            import flash_attn_hopper
            _HOPPER_MODULE = flash_attn_hopper
        except Exception as e:  # noqa: BLE001 (ImportError, AttributeError, ...)
            _hopper_failed(e)
    try:
        return _HOPPER_MODULE if _HOPPER_MODULE and _HOPPER_MODULE.supported(q, direction) else None
    except Exception as e:  # noqa: BLE001
        _hopper_failed(e)
        return None


def _hopper_failed(e):
    """Any failure of the Hopper path (import, attribute, compile, launch): one line on stderr, then the
    portable kernels for good (same inputs, same lse format, so a portable backward can follow a Hopper
    forward). Out of memory is not a failure of the path: the caller gets it."""
    global _HOPPER_MODULE
    if isinstance(e, torch.cuda.OutOfMemoryError):
        raise e
    _HOPPER_MODULE = False
    first = (str(e).strip().splitlines() or [""])[0][:200]
    print(f"flash_attn: the Hopper kernels failed ({type(e).__name__}: {first}); using the portable Triton kernels "
          "from now on", file=sys.stderr)


def _shapes_key(q, k, do, doc_range, T_pad, left, right):
    """_run's key for the launches of one attention call: every argument follows from these, as the
    tensors are contiguous and 16-byte aligned (_prepare, fresh outputs), doc_range (int32, (2, B, T))
    aside, whose alignment is in the key."""
    docs = None if doc_range is None else doc_range.data_ptr() % 16 == 0
    return q.dtype, None if do is None else do.dtype, q.shape, k.shape, T_pad, left, right, docs


def _lse_len(T):
    """lse and delta rows per (batch, head): T padded to a multiple of MAX_BLOCK (tiles read past T)."""
    return -(-T // MAX_BLOCK) * MAX_BLOCK


def _forward(q, k, v, doc_range, causal, scale, left, right):
    """out (B, Tq, H, D), lse (B, H, T_pad) float32 in log2 units (+inf on rows that see no key).
    left/right: the window around each query's bottom-right-aligned position (_window)."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    group = H // k.shape[2]
    T_pad = _lse_len(Tq)
    hopper = _hopper(q, "forward") if doc_range is None and Tq == Tk else None
    if hopper:
        try:
            return hopper.forward(q, k, v, causal, scale, left, right, T_pad)
        except Exception as e:  # noqa: BLE001
            _hopper_failed(e)
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((B, H, T_pad), torch.float32, q.device)  # log2 units
    _launch("fwd", Tq, B * H, [_desc(q), _desc(k), _desc(v)],
            out, lse, doc_range, scale, out.stride(0), out.stride(1), out.stride(2),
            Tq, Tk, T_pad, H, group, *_band_args(Tq, Tk, left, right, doc_range),
            key=_shapes_key(q, k, None, doc_range, T_pad, left, right), **_common(q, causal, doc_range))
    return out, lse


def _delta(out, do, T_pad, key, zero_dq=None):
    """delta = rowsum(dO * O) (B, H, T_pad) float32, by _bwd_preprocess (key: _run's); zero_dq: a
    float32 tensor of out's shape that the same pass zeroes (flash_attn_hopper's dQ), or None."""
    B, T, H, D = out.shape
    delta = _empty((B, H, T_pad), torch.float32, out.device)
    _run(_bwd_preprocess, (T_pad // MAX_BLOCK, B * H), out, do, delta, zero_dq, out.stride(0), out.stride(1),
         out.stride(2), T, T_pad, H, HEAD_DIM=_width(D), DIM=D, BLOCK_M=MAX_BLOCK, ZERO_DQ=zero_dq is not None,
         key=key, **_dependent_launch(out.device))
    return delta


def _backward(do, q, k, v, out, lse, doc_range, causal, scale, left, right):
    """dq, dk, dv; out and lse from _forward (either kernels'), do and out with q's strides."""
    B, Tq, H, D = q.shape
    Tk, H_kv = k.shape[1], k.shape[2]
    T_pad = lse.shape[-1]
    hopper = _hopper(q, "backward") if doc_range is None and Tq == Tk else None
    if hopper:  # its lse has the same format, so either kernels' forward can come first
        try:
            return hopper.backward(do, q, k, v, out, lse, scale, left, right)
        except Exception as e:  # noqa: BLE001
            _hopper_failed(e)
    key = _shapes_key(q, k, do, doc_range, T_pad, left, right)
    delta = _delta(out, do, T_pad, key)
    dq, dk, dv = (_empty(x.shape, x.dtype, x.device) for x in (q, k, v))
    band, meta = _band_args(Tq, Tk, left, right, doc_range), _common(q, causal, doc_range)
    descs = [_desc(q), _desc(k), _desc(v), _desc(do)]  # (each launch sets its own tile's block on them)
    _launch("dkdv", Tk, B * H_kv, descs, dk, dv, lse, delta, doc_range, scale,
            dk.stride(0), dk.stride(1), dk.stride(2), Tq, Tk, T_pad, H_kv, H // H_kv, *band, key=key, **meta)
    descs = [_desc(q), _desc(k), _desc(v), _desc(do)]
    _launch("dq", Tq, B * H, descs, dq, lse, delta, doc_range, scale,
            dq.stride(0), dq.stride(1), dq.stride(2), Tq, Tk, T_pad, H, H // H_kv, *band, key=key, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------- replayed calls
# Inside a compiled training step an operator call's Python (shapes, tiles, descriptors, launch keys)
# costs an H200 machine's host 60-100 us per forward and 150-210 per backward (notes/flash_attn_bench.md),
# which a host-bound step (a small model, a slow host) waits for. All of it follows from the call's
# shapes and switches, so a call is recorded once (the C-launcher arguments of its launches, and which
# of them are the call's inputs, its allocations or kept buffers) and later calls with the same key
# only allocate, read addresses and launch. The protocol a path (_forward, _backward and
# flash_attn_hopper's) keeps: its GPU work is launches through _run and allocations through _empty,
# it writes no tensor by a torch op, and its outputs are its allocations; a call that breaks it
# (a copy in _prepare, say) is never replayed.
_PLANS = {}  # _replayed's call key -> the recorded call's replay, or None: such calls are never replayed
_RECORDING = None  # while _replayed records a call: .launches (launch's parts, arguments), .allocs (_empty's),
# .complete (no launch through Triton's compile/tune path) and .direct (every later launch a direct one)
_KEPT_TENSORS = {}  # id -> a device tensor that outlives calls (flash_attn_hopper's tile counters): replays reuse it


def _empty(shape, dtype, device):
    """torch.empty for a path's outputs and scratch, recorded while _replayed records."""
    x = torch.empty(shape, dtype=dtype, device=device)
    if _RECORDING is not None:
        _RECORDING.allocs.append(x)
    return x


def _not_replayable_launch():
    """A launch through Triton (a kernel's first, autotuning): the call being recorded is not
    complete, so the next call is recorded again. (A later launch that is still Triton's, as under
    other Triton releases, makes such calls never replayed: _run.)"""
    if _RECORDING is not None:
        _RECORDING.complete = False


def _replayable(x):
    """Whether a call on x may be recorded or replayed: on a GPU, with REPLAY and DIRECT_LAUNCH, no
    launch hook set (Triton 3.6's empty hook chains) and no CUDA graph being captured (whose replays
    own their buffers)."""
    hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
    return (x.is_cuda and REPLAY and DIRECT_LAUNCH and not any(getattr(hook, "calls", True) for hook in hooks)
            and not torch.cuda.is_current_stream_capturing())


def _replayed(path, inputs, n_prepared, statics):
    """path(*inputs, *statics), the first n_prepared inputs contiguous and 16-byte aligned (_prepare);
    recorded, and replayed (_replay) once a call with the same key was, while _replayable."""
    global _RECORDING
    if not _replayable(inputs[0]):
        return path(*(_prepare(t) for t in inputs[:n_prepared]), *inputs[n_prepared:], *statics)
    device = _device()
    key = (path, *statics, device, _stream(device), PDL, HOPPER, _HOPPER_MODULE is False, AUTOTUNE,
           *sorted(FORCE_TILES.items()),
           *(None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16) for t in inputs))
    plan = _PLANS.get(key, False)
    if plan:
        return plan(inputs)
    prepared = [_prepare(t) for t in inputs[:n_prepared]] + list(inputs[n_prepared:])
    if plan is None:
        return path(*prepared, *statics)
    _RECORDING = types.SimpleNamespace(launches=[], allocs=[], complete=True, direct=True)
    try:
        outputs = path(*prepared, *statics)
        record = _RECORDING
    finally:
        _RECORDING = None
    if record.complete:  # (a copy by _prepare: a tensor that _replay refuses)
        _keep(_PLANS, key, _replay(record, inputs, outputs, device) if record.direct else None)
    return outputs


def _replay(record, inputs, outputs, device):
    """The recorded call as a function of new inputs (same key): allocate as the call did, then each
    launch's C-launcher arguments as recorded, with the addresses of this call's tensors and their
    CUtensorMaps patched in, on the current stream of device (the key's). None if a launch used a
    tensor that is neither an input, nor allocated by the call, nor kept, or an output is not one
    of its allocations."""
    kept = list(_KEPT_TENSORS.values())
    tensors = [*inputs, *record.allocs, *kept]
    index = {id(t): j for j, t in enumerate(tensors) if t is not None}
    if len(index) != sum(t is not None for t in tensors):  # an input passed twice: which position is which?
        return None
    allocs = [(t.shape, t.stride(), t.dtype, t.device) for t in record.allocs]
    if not all(len(inputs) <= index.get(id(t), -1) < len(inputs) + len(allocs) for t in outputs):
        return None
    out_at = [index[id(t)] for t in outputs]
    launches = []
    for c_launch, grid, fixed, pointers, descs, cu_map, args in record.launches:
        desc_at = {i: spec for i, *spec in descs}
        template, patches = [], []  # the C launcher's arguments after the stream; (position, tensor, map spec)
        for i, a in enumerate(args):
            if i in desc_at:
                if id(a.base) not in index:
                    return None
                patches.append((len(template), index[id(a.base)], (i, *desc_at[i], a.shape, a.strides, a.padding)))
                template += [None, *a.shape, *a.strides]
            elif i in pointers:
                if id(a) not in index:
                    return None
                patches.append((len(template), index[id(a)], None))
                template.append(None)
            else:
                template.append(a)
        launches.append((c_launch, grid, fixed, template, patches, cu_map))
    kept_ptrs = [t.data_ptr() for t in kept]  # (alive in _KEPT_TENSORS for good)

    def replay(new_inputs):
        fresh = [torch.empty_strided(shape, stride, dtype=dtype, device=at) for shape, stride, dtype, at in allocs]
        ptrs = [None if t is None else t.data_ptr() for t in new_inputs] + [t.data_ptr() for t in fresh] + kept_ptrs
        stream = _stream(device)
        for c_launch, grid, fixed, template, patches, cu_map in launches:
            args = template.copy()
            for at, j, spec in patches:
                args[at] = ptrs[j] if spec is None else cu_map(ptrs[j], *spec)
            c_launch(*grid, stream, *fixed, *args)
        all_tensors = [*new_inputs, *fresh]
        return tuple(all_tensors[j] for j in out_at)
    return replay


def _forward_impl(q, k, v, doc_range, causal, scale, left, right):
    """_forward on contiguous, 16-byte aligned inputs (TMA), so every output is contiguous."""
    return _replayed(_forward, (q, k, v, doc_range), 3, (causal, scale, left, right))


def _backward_impl(do, q, k, v, out, lse, doc_range, causal, scale, left, right):
    """_backward on contiguous inputs: do and out with q's strides."""
    return _replayed(_backward, (do, q, k, v, out, lse, doc_range), 5, (causal, scale, left, right))


# The kernels as a pair of torch.library operators, so that torch.compile keeps each call as one opaque
# node of its graph (no graph break; the fake functions give it shapes), with autograd from _Attention,
# which Dynamo traces: AOTAutograd puts flash_attn::backward into the backward graph. Defined with
# Library.define/impl rather than torch.library.custom_op, whose Python wrappers (an aliasing check of
# every output, a Python autograd kernel) cost 110-200 us of host time per call on an H200 host, more
# than the GPU's time for a 1k-token attention (notes/flash_attn_bench.md).
_LIB = torch.library.Library("flash_attn", "DEF")
_LIB.define("forward(Tensor q, Tensor k, Tensor v, Tensor? doc_range, bool causal, float scale, int left, "
            "int right) -> (Tensor, Tensor)")
_LIB.define("backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? doc_range, "
            "bool causal, float scale, int left, int right) -> (Tensor, Tensor, Tensor)")
_LIB.impl("forward", _forward_impl, "CompositeExplicitAutograd")
_LIB.impl("backward", _backward_impl, "CompositeExplicitAutograd")
for _name in ("forward", "backward"):  # not differentiable themselves (_Attention is): autograd passes through
    _LIB.impl(_name, torch.library.fallthrough_kernel, "Autograd")


@torch.library.register_fake("flash_attn::forward", lib=_LIB)
def _(q, k, v, doc_range, causal, scale, left, right):
    """(out, lse (B, Hq, _lse_len(Tq)) float32 in log2 units) = _forward."""
    B, T, H, D = q.shape
    return q.new_empty(q.shape), q.new_empty(B, H, _lse_len(T), dtype=torch.float32)


@torch.library.register_fake("flash_attn::backward", lib=_LIB)
def _(do, q, k, v, out, lse, doc_range, causal, scale, left, right):
    """(dq, dk, dv) = _backward; out and lse from flash_attn::forward."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _Attention(torch.autograd.Function):
    """(out, lse) = flash_attn::forward, differentiable in q, k, v (lse is a statistic: no gradient)."""
    @staticmethod
    def forward(ctx, q, k, v, doc_range, causal, scale, left, right):
        out, lse = torch.ops.flash_attn.forward(q, k, v, doc_range, causal, scale, left, right)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros for lse's gradient (eager autograd's default: a fill per call)
        ctx.save_for_backward(q, k, v, out, lse, doc_range)
        ctx.args = (causal, scale, left, right)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, doc_range = ctx.saved_tensors
        dq, dk, dv = torch.ops.flash_attn.backward(dout, q, k, v, out, lse, doc_range, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------- public API
def _window(causal, window_size, Tq, Tk):
    """(left, right): query i, at position p = i + Tk - Tq among the keys (bottom-right aligned, as
    FlashAttention), sees keys p-left..p+right. -1 (or None) means unbounded, which is encoded as
    max(Tq, Tk) (every key); causal forces right = 0 (FlashAttention's convention)."""
    if window_size is None:
        window_size = (-1, -1)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size={window_size!r} must be None or a pair (left, right) of ints >= -1 "
                         "(-1: unbounded); e.g. window_size=(256, 0) for a causal band of 257 keys")
    left, right = window_size
    T = max(Tq, Tk)
    left = T if left < 0 else min(left, T)
    right = 0 if causal else (T if right < 0 else min(right, T))
    return left, right


def _band_args(Tq, Tk, left, right, doc_range):
    """The kernels' (LEFT, RIGHT, DOC_STRIDE): the window relative to the query's row index i
    (query i sees keys i-LEFT..i+RIGHT; bottom-right alignment shifts it by Tk - Tq, so either
    may be negative) and the offset of the ends in doc_range (2, B, T)."""
    shift = Tk - Tq
    return left - shift, right + shift, 0 if doc_range is None else doc_range[0].numel()


def document_bounds(doc_ids):
    """int32 (2, B, T): [0] the index of the first token of each token's document, [1] one past its
    last. A document is a maximal run of equal ids in a row (so ids may repeat in later runs).
    Query i sees key j only if start[i] <= j < end[i] (FlashAttention-2's variable-length batches,
    arXiv 2307.08691, with the packed row kept as one sequence). Plain torch ops (torch.compile)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T-1): token t+1 starts a document
    edge = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    first, last = torch.cat([edge, change], 1), torch.cat([change, edge], 1)
    start = torch.where(first, idx, 0).cummax(1).values
    end = torch.where(last, idx + 1, T).flip(1).cummin(1).values.flip(1)
    return torch.stack([start, end]).to(torch.int32).contiguous()


def _check(q, k, v, doc_ids=None, doc_bounds=None):
    """Named errors for bad inputs; returns the documents' bounds (document_bounds of doc_ids, or
    doc_bounds as given), or None without documents."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, seqlen, nheads, headdim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k and v must be (batch, seqlen_k, nheads_kv, headdim) matching q's batch and "
                         f"headdim; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"nheads={q.shape[2]} of q is not a multiple of nheads_kv={k.shape[2]} of k/v; "
                         "each kv head must serve a whole group of query heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype")
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor):
            raise ValueError(f"doc_ids must be None or an integer (batch, seqlen) tensor; got {type(doc_ids).__name__}")
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"doc_ids needs seqlen_q == seqlen_k (one packed row); got {q.shape[1]} and "
                             f"{k.shape[1]}: pass doc_ids=None with a KV cache")
        if doc_ids.shape != q.shape[:2] or doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex \
                or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer (batch, seqlen) = {tuple(q.shape[:2])} tensor of "
                             f"document ids; got {doc_ids.dtype} {tuple(doc_ids.shape)}")
        if doc_ids.device != q.device:
            raise ValueError(f"doc_ids is on {doc_ids.device} but q on {q.device}; move it to q's device")
    if doc_bounds is not None:
        if doc_ids is not None:
            raise ValueError("pass doc_ids or doc_bounds (= document_bounds(doc_ids)), not both")
        B, T = q.shape[:2]
        if not isinstance(doc_bounds, torch.Tensor) or doc_bounds.shape != (2, B, T) \
                or doc_bounds.dtype != torch.int32 or doc_bounds.device != q.device or k.shape[1] != T:
            raise ValueError(f"doc_bounds must be document_bounds(doc_ids): an int32 (2, {B}, {T}) tensor on "
                             f"{q.device} with seqlen_q == seqlen_k; got "
                             + (f"{doc_bounds.dtype} {tuple(doc_bounds.shape)} on {doc_bounds.device}, seqlen_k "
                                f"{k.shape[1]}" if isinstance(doc_bounds, torch.Tensor) else type(doc_bounds).__name__))
    return document_bounds(doc_ids) if doc_ids is not None else doc_bounds


def flash_attn_func(q, k, v, causal=True, softmax_scale=None, window_size=None, return_lse=False, doc_ids=None,
                    doc_bounds=None):
    """softmax(scale * q k^T + mask) v for q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), Hkv dividing Hq
    (query head h uses kv head h // (Hq // Hkv)). Masks are aligned bottom-right (FlashAttention's
    convention): query i sits at position p = i + Tk - Tq, so with a KV cache the last query is the
    last key. causal: query i sees keys <= p. window_size=(left, right): keys p-left..p+right (-1:
    unbounded; the book's band attention). doc_ids: None or an integer (B, T) tensor (Tq == Tk),
    a document being a run of one id; a query sees only keys of its own document (packed rows).
    doc_bounds: instead of doc_ids, document_bounds(doc_ids), made once for many calls (a model's
    layers). A query that sees no key (Tq > Tk) gets out 0, lse +inf and zero gradients.
    D: any multiple of 8 up to 256 (tiles are zero-padded to the next power of two inside the kernels).
    Returns out (B, Tq, Hq, D), and with return_lse=True also lse (B, Hq, Tq) float32, the
    log-sum-exp of each row's scores. Triton kernels on CUDA (and on CPU under TRITON_INTERPRET=1);
    elsewhere the PyTorch reference."""
    doc_range = _check(q, k, v, doc_ids, doc_bounds)
    Tq, Tk, D = q.shape[1], k.shape[1], q.shape[3]
    if D % 8 or not 8 <= D <= 256:
        raise ValueError(f"head dim {D} is not supported: use a multiple of 8 from 8 to 256 "
                         "(or attn_impl='sdpa')")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    left, right = _window(causal, window_size, Tq, Tk)
    if not HAVE_TRITON or not (q.is_cuda or INTERPRET):
        out, lse = attention_reference(q, k, v, causal, scale, window_size, doc_bounds=doc_range)
    else:
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
        out, lse = _Attention.apply(q, k, v, doc_range, bool(causal), float(scale), left, right)
        if return_lse:  # log2 units and padded rows (one more kernel): only when asked for
            lse = lse[..., :Tq] / math.log2(math.e)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- reference
def attention_reference(q, k, v, causal=True, softmax_scale=None, window_size=None, doc_ids=None, doc_bounds=None):
    """Plain PyTorch attention with the same arguments and masks (flash_attn_func); materialises
    the (Tq, Tk) scores. Computes in float32 (float64 inputs stay float64). Returns (out, lse);
    a row that sees no key has out 0 and lse +inf, and gets zero gradients."""
    bounds = _check(q, k, v, doc_ids, doc_bounds)
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    group = H // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    left, right = _window(causal, window_size, Tq, Tk)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.to(ct).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    s = (qf @ kf.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    i = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)  # bottom-right aligned positions
    j = torch.arange(Tk, device=q.device)[None, :]
    seen = (i - j <= left) & (j - i <= right)  # (Tq, Tk)
    if bounds is not None:
        start, end = bounds[:, :, None, :, None]  # (B, 1, T, 1) each
        seen = seen & (j >= start) & (j < end)  # (B, 1, T, T)
    empty = ~seen.any(-1, keepdim=True)  # rows that see no key: a finite logsumexp, then P = 0
    s = s.masked_fill(~seen, float("-inf")).masked_fill(empty, 0.0)
    lse = s.logsumexp(-1, keepdim=True)  # (B, H, Tq, 1)
    out = torch.exp(s - lse).masked_fill(empty, 0.0) @ vf
    lse = lse.masked_fill(empty, float("inf")).squeeze(-1)
    return out.transpose(1, 2).to(q.dtype), lse.float() if ct == torch.float32 else lse
