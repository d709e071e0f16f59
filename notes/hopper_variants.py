"""Variants of flash_attn_hopper's kernels, checked and timed in one GPU call, or compiled for sm_90a
on any machine (--compile-only: shared memory, spills, whether ptxas kept wgmma pipelined).

    python notes/hopper_variants.py [--only forward|backward]  # GPU: correctness, then TFLOP/s against SDPA cuDNN
    python notes/hopper_variants.py --compile-only [NAME ...]  # CPU: Triton's sm_90a compile and ptxas -v

tests/test_flash_attn.py's test_hopper_kernels_compile_for_sm90 runs --compile-only on the shipped kernels
("kept", "kept d64", "bwd 128", "bwd 64").

A variant is a tile (BLOCK_M, BLOCK_N, STAGES) of the shipped kernels at a head dim (the forward runs
BLOCK_M // 64 consumer warpgroups, 2 or 3; the backward two) and an order in which the programs start
(flash_attn_hopper's l2_bytes: heads in groups whose streamed tiles fill that many bytes, 0 for head by
head); or the portable kernels of flash_attn.py (tile None). The variants of a shape are timed
interleaved, round after round, with SDPA cuDNN among them (median_ms).

Measured (notes/flash_attn_bench.md): a third or fourth ring slot is within the noise both ways; at
head dim 64 the forward's 192 x 128 tile (FlashAttention-3's, three warpgroups) beats 128 x 128 and
192 x 64, and the portable kernels from 8k tokens (the backward from 2k), so both ship from there.
Persistent programs and the ping-pong schedule lost (0.6-0.9x of the kept forward) and were removed
after commit 8f667f9; that persistent kernel walked all heads longest first, an order that costs 3-30%
by itself. Heads in 16 MB groups beat head by head by 2-5% at 2-4k (forward) and 1-3% (backward), and
ship; 8 and 32 MB groups were within 2% of 16. Forwards of one consumer warpgroup with registers capped
(maxnreg) so that 2-4 programs share an SM lost at every length, in one run 0.56-0.70x of cuDNN at head
dim 128 (kept tiles 0.82-1.06x) and 0.50-0.89x at 64 (0.61-1.09x); removed after commit bd806b1.
Storing O (forward) and dK, dV (backward) by TMA from shared memory, FlashAttention-3's epilogue, beat
plain stores by up to 10% (most at 1-2k) and ships. A persistent forward with a fixed stride over the
tiles lost even in the kept order (0.85-0.90x of cuDNN with the TMA store); with FlashAttention-3's
atomic tile counter (_persistent_fwd_kernel) it beat the kept forward at every length: 0.98-1.11x of
cuDNN at head dim 128, and at head dim 64 the portable kernels below 8k with a 128 x 128 tile.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402

import flash_attn  # noqa: E402
import flash_attn_hopper as fh  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,  # noqa: E402
                                                             warpgroup_mma, warpgroup_mma_wait)

VARIANTS = [  # (name, head dim, tile, l2_bytes: the tile order, flash_attn_hopper.forward's)
    ("kept", 128, fh.FWD_TILES[128], fh.L2_GROUP_BYTES),
    ("kept d64", 64, fh.FWD_TILES[64], fh.L2_GROUP_BYTES),  # three consumer warpgroups
    ("d64 128x128", 64, (128, 128, 2), fh.L2_GROUP_BYTES),
    ("d64 portable", 64, None, None),  # flash_attn.py's own kernels (autotuned): below MIN_SEQLEN they run
    # persistent programs taking tiles of the kept order from a counter (_persistent_fwd_kernel); last: a
    # hang ends the run here
    ("dynamic", 128, fh.FWD_TILES[128] + ("dynamic", ), fh.L2_GROUP_BYTES),
    ("d64 dynamic 128x128", 64, (128, 128, 2, "dynamic"), fh.L2_GROUP_BYTES),
    ("d64 dynamic", 64, fh.FWD_TILES[64] + ("dynamic", ), fh.L2_GROUP_BYTES),
]


# --------------------------------------------------------------------------- persistent forward
# min(#SMs, #tiles) programs. Program p starts with tile p of _tile_order's sequence (heads in L2-sized
# groups, longest query blocks first) and then takes the next tile of that sequence from an atomic
# counter (FlashAttention-3's scheduler, arXiv 2407.08608), as the hardware starts the kept grid's
# programs: the tiles in flight stay together and share one group's K and V. (A fixed stride, tiles p,
# p + #programs, ..., let the programs drift apart: 0.85-0.90x of cuDNN.) The loader refills a
# consumer's Q buffer as soon as that consumer's last S = Q K^T of a tile is done, and the K/V rings
# run on across tiles: the next tile's loads overlap this tile's last P V and epilogue, the fixed cost
# per tile that short sequences (at most 8 key blocks per tile at 1k) do not hide otherwise.
@gluon.jit
def _persistent_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT, IS_CAUSAL: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t's batch, head, first query row and key blocks (lo, mid_lo, mid_hi, n_blocks)."""
    m, bh = fh._tile_at(t, n_tiles, n_m, HEADS)
    if IS_CAUSAL:
        m = n_m - 1 - m
    m0 = m * BLOCK_M
    lo, mid_lo, mid_hi, hi = fh._block_range(m0, T, T, LEFT, RIGHT, None, 0, BLOCK_M, BLOCK_N, False)
    return bh // H, bh % H, bh, m0, lo, mid_lo, mid_hi, gl.cdiv(hi - lo, BLOCK_N)


@gluon.jit
def _publish_tile(tile_smem, tile_full, tile_empty, j, t):
    """Loader: tile t is the program's j-th; two slots, each free once every consumer has read it."""
    s = j % 2
    mbarrier.wait(tile_empty.index(s), ((j // 2) & 1) ^ 1)
    tile_smem.index(s).store(gl.full([1], t, gl.int32, layout=gl.BlockedLayout([1], [32], [1], [0])))
    mbarrier.arrive(tile_full.index(s), count=1)


@gluon.jit
def _read_tile(tile_smem, tile_full, tile_empty, j):
    """Consumer: the program's j-th tile, as the loader published it."""
    s = j % 2
    mbarrier.wait(tile_full.index(s), (j // 2) & 1)
    t = gl.max(tile_smem.index(s).load(gl.BlockedLayout([1], [32], [4], [0])), axis=0)
    mbarrier.arrive(tile_empty.index(s), count=1)
    return t


@gluon.jit
def _persistent_loader(desc_q, desc_k, desc_v, q_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty,
                       v_empty, tile_smem, tile_full, tile_empty, Counter, T, H, GROUP, LEFT, RIGHT, HEADS, n_m,
                       n_tiles, IS_CAUSAL: gl.constexpr):
    """The first tile is the program's id; each next one comes from the counter and goes to the
    consumers through shared memory (_publish_tile), n_tiles or more meaning the end."""
    W: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    it = 0  # key blocks of this program's earlier tiles: the rings' slots and phases run on
    j = 0  # tiles done
    t = gl.program_id(0)
    while t < n_tiles:
        _publish_tile(tile_smem, tile_full, tile_empty, j, t)
        b, h, bh, m0, lo, mid_lo, mid_hi, n_blocks = _persistent_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT,
                                                                      IS_CAUSAL, W * ROWS, BLOCK_N)
        for w in gl.static_range(W):  # consumer w is done with the last tile's Q
            mbarrier.wait(q_empty.index(w), (j & 1) ^ 1)
            mbarrier.expect(q_bars.index(w), desc_q.block_type.nbytes)
            fh._tma_load(desc_q, [b * T + m0 + w * ROWS, h * D], q_bars.index(w), q_smem.index(w))
        for i in range(n_blocks):
            c = it + i
            s = c % STAGES
            released = ((c // STAGES) & 1) ^ 1
            row = b * T + lo + i * BLOCK_N
            mbarrier.wait(k_empty.index(s), released)
            mbarrier.expect(k_full.index(s), desc_k.block_type.nbytes)
            fh._tma_load(desc_k, [row, (h // GROUP) * D], k_full.index(s), k_ring.index(s))
            mbarrier.wait(v_empty.index(s), released)
            mbarrier.expect(v_full.index(s), desc_v.block_type.nbytes)
            fh._tma_load(desc_v, [row, (h // GROUP) * D], v_full.index(s), v_ring.index(s))
        it += n_blocks
        j += 1
        t = gl.num_programs(0) + gl.atomic_add(Counter, 1)
    _publish_tile(tile_smem, tile_full, tile_empty, j, t)  # the end


@gluon.jit
def _persistent_warpgroup(wg, q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, o_smem,
                          desc_o, tile_smem, tile_full, tile_empty, Out, Lse, softmax_scale, T, T_pad, H, LEFT, RIGHT,
                          HEADS, n_m, n_tiles, IS_CAUSAL: gl.constexpr):
    """flash_attn_hopper._fwd_warpgroup per tile, its ring slots counted on from earlier tiles. Out is
    contiguous (B, T, H, D): few values live across the tile loop. O goes out through shared memory
    by an asynchronous TMA store (FlashAttention-3's epilogue), so the consumer starts the next tile
    without waiting for its global stores; a tile reaching past T stores with plain stores (the 2D
    descriptor would write those rows into the next sequence's). Unlike the kept kernel it cannot put O
    in Q's buffer, which the loader is refilling: o_smem, one (64, D) tile per consumer."""
    W: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    s_layout: gl.constexpr = fh._mma_layout(BLOCK_N)
    o_layout: gl.constexpr = fh._mma_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    q = q_smem.index(wg)
    qk_scale = softmax_scale * fh.LOG2E
    it = 0
    j = 0
    t = _read_tile(tile_smem, tile_full, tile_empty, 0)
    while t < n_tiles:
        b, h, bh, m0, lo, mid_lo, mid_hi, n_blocks = _persistent_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT,
                                                                      IS_CAUSAL, W * ROWS, BLOCK_N)
        r0 = m0 + wg * ROWS
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        mbarrier.wait(q_bars.index(wg), j & 1)
        first = it % STAGES
        mbarrier.wait(k_full.index(first), (it // STAGES) & 1)
        qk = warpgroup_mma(q, k_ring.index(first).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(first), count=1)
        p, alpha, m_i, l_i = fh._online_softmax(qk, m_i, l_i, rows, lo + cols, (lo < mid_lo) | (lo >= mid_hi),
                                                T, LEFT, RIGHT, qk_scale)
        p = gl.convert_layout(p.to(dtype), p_layout)
        for i in range(1, n_blocks):
            start_n = lo + i * BLOCK_N
            c = it + i
            s = c % STAGES
            prev = (c - 1) % STAGES
            mbarrier.wait(k_full.index(s), (c // STAGES) & 1)
            s_tok = warpgroup_mma(q, k_ring.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_full.index(prev), ((c - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p, v_ring.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(1, deps=[s_tok])
            mbarrier.arrive(k_empty.index(s), count=1)
            p_new, alpha, m_i, l_i = fh._online_softmax(qk, m_i, l_i, rows, start_n + cols,
                                                        (start_n < mid_lo) | (start_n >= mid_hi), T, LEFT, RIGHT,
                                                        qk_scale)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p = gl.convert_layout(p_new.to(dtype), p_layout)
        mbarrier.arrive(q_empty.index(wg), count=1)  # the loader may fetch the next tile's Q
        c = it + n_blocks - 1
        last = c % STAGES
        mbarrier.wait(v_full.index(last), (c // STAGES) & 1)
        acc = warpgroup_mma(p, v_ring.index(last), acc)
        mbarrier.arrive(v_empty.index(last), count=1)
        valid = rows < T
        l_i = gl.where(valid, l_i, 1.0)
        gl.store(Lse + bh.to(gl.int64) * T_pad + rows, gl.where(valid, m_i + gl.log2(l_i), float("inf")),
                 mask=rows < T_pad)
        # t // n_tiles is 0, but the compiler cannot prove it: the store offsets are computed per tile
        # instead of hoisted out of the loop and kept live through it (1,164 B of spills in 8f667f9)
        stride_ot = H * D + t // n_tiles
        rows_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
        cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        offs = gl.expand_dims(rows_o * stride_ot, 1) + gl.expand_dims(cols_o, 0)
        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        if r0 + ROWS <= T:
            tma.store_wait(pendings=0)  # the last tile's store has read o_smem
            fh._thread_barrier()
            o_smem.index(wg).store(out.to(dtype))
            fence_async_shared()
            fh._thread_barrier()
            fh._tma_store(desc_o, [b * T + r0, h * D], o_smem.index(wg))
        else:
            base = (b * T + r0).to(gl.int64) * (H * D) + h * D
            gl.store(Out + base + offs, out.to(dtype), mask=gl.expand_dims(r0 + rows_o < T, 1))
        it += n_blocks
        j += 1
        t = _read_tile(tile_smem, tile_full, tile_empty, j)
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "HEADS", "n_m", "n_tiles"])
def _persistent_fwd_kernel(desc_q, desc_k, desc_v, desc_o, Out, Lse, Counter, softmax_scale, T, T_pad, H, GROUP, LEFT,
                           RIGHT, HEADS, n_m, n_tiles, IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = desc_q.dtype
    D: gl.constexpr = desc_k.block_type.shape[1]
    W: gl.constexpr = BLOCK_M // 64
    q_smem = gl.allocate_shared_memory(dtype, [W, 64, D], desc_q.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_k.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_v.layout)
    o_smem = gl.allocate_shared_memory(dtype, [W, 64, D], desc_o.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [W, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [W, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    tile_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    tile_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    tile_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(2):
        mbarrier.init(tile_full.index(s), count=1)
        mbarrier.init(tile_empty.index(s), count=W)
    for w in gl.static_range(W):
        mbarrier.init(q_bars.index(w), count=1)
        mbarrier.init(q_empty.index(w), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_full.index(s), count=1)
        mbarrier.init(v_full.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=W)
        mbarrier.init(v_empty.index(s), count=W)
    consumer = (q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, o_smem, desc_o, tile_smem,
                tile_full, tile_empty, Out, Lse, softmax_scale, T, T_pad, H, LEFT, RIGHT, HEADS, n_m, n_tiles,
                IS_CAUSAL)
    loader = (desc_q, desc_k, desc_v, q_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty, v_empty,
              tile_smem, tile_full, tile_empty, Counter, T, H, GROUP, LEFT, RIGHT, HEADS, n_m, n_tiles, IS_CAUSAL)
    if W == 3:
        gl.warp_specialize([(_persistent_warpgroup, (0, ) + consumer), (_persistent_warpgroup, (1, ) + consumer),
                            (_persistent_warpgroup, (2, ) + consumer), (_persistent_loader, loader)],
                           [4, 4, 1], [fh.COMPUTE_REGS_3, fh.COMPUTE_REGS_3, fh.LOADER_REGS])
    else:
        gl.warp_specialize([(_persistent_warpgroup, (0, ) + consumer), (_persistent_warpgroup, (1, ) + consumer),
                            (_persistent_loader, loader)], [4, 1], [fh.COMPUTE_REGS, fh.LOADER_REGS])


def persistent_forward(q, k, v, causal, tile, l2_bytes):
    """out, lse as flash_attn_hopper.forward, by _persistent_fwd_kernel."""
    B, T, H, D = q.shape
    bm, bn, stages, kind = tile
    left, right = flash_attn._window(causal, None, T, T)
    out = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)  # contiguous
    lse = torch.empty(B, H, flash_attn._lse_len(T), device=q.device, dtype=torch.float32)
    group = H // k.shape[2]
    heads = fh._heads_at_a_time(l2_bytes, 4 * T * D, B * H, group)
    n_m = triton.cdiv(T, bm)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    counter = torch.zeros(1, device=q.device, dtype=torch.int32)  # tiles handed out after each program's first
    flash_attn._run(_persistent_fwd_kernel, (min(sms, n_m * B * H), ), fh._desc(q, 64), fh._desc(k, bn),
                    fh._desc(v, bn), fh._desc(out, 64), out, lse, counter, D ** -0.5, T, lse.shape[-1], H, group,
                    left, right, heads, n_m, n_m * B * H, IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages,
                    **fh.COMPILE_OPTIONS)
    return out, lse


def portable(fn, *args):
    """fn (flash_attn._forward or _backward) on flash_attn.py's portable kernels."""
    flash_attn.HOPPER = False
    try:
        return fn(*args)
    finally:
        flash_attn.HOPPER = True


def forward(q, k, v, causal, tile, l2_bytes=fh.L2_GROUP_BYTES):
    """flash_attn_hopper.forward with a variant's tile and tile order
    (tile None: the portable kernels): out, lse (log2 units)."""
    T, D = q.shape[1], q.shape[3]
    left, right = flash_attn._window(causal, None, T, T)
    if tile is None:
        return portable(flash_attn._forward, q, k, v, None, causal, D ** -0.5, left, right)
    if tile[3:] == ("dynamic", ):
        return persistent_forward(q, k, v, causal, tile, l2_bytes)
    return fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T), tile=tile, l2_bytes=l2_bytes)


def check(D, tile, l2_bytes):
    """Fresh random ragged inputs (grouped heads, a partial last tile; 48 heads at 3000 tokens, so the
    16 MB groups are 20 + 20 + 8 heads at head dim 128, 42 + 6 at 64) against the float64 reference."""
    for causal in (True, False):
        q = torch.randn(3, 3000, 16, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 3000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = forward(q, k, v, causal, tile, l2_bytes)
        ref, ref_lse = flash_attn.attention_reference(q.double(), k.double(), v.double(), causal=causal)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        lse_err = ((lse[..., :3000] / 1.4426950408889634 - ref_lse).abs().max()).item()
        if not (err < 2e-2 and lse_err < 1e-2):
            return f"WRONG (causal={causal}: out {err:.2e}, lse {lse_err:.2e})"
    return "ok"


# --------------------------------------------------------------------------- backward
BWD_VARIANTS = [  # (name, head dim, tile, l2_bytes) as VARIANTS, flash_attn_hopper.backward's order
    ("bwd 128", 128, fh.BWD_TILES[128], fh.L2_GROUP_BYTES),
    ("bwd 64", 64, fh.BWD_TILES[64], fh.L2_GROUP_BYTES),
    ("bwd 64 portable", 64, None, None),  # as "d64 portable"
]


def backward(do, q, k, v, out, lse, causal, tile, l2_bytes=None):
    """dq, dk, dv by flash_attn_hopper.backward with a variant's tile and tile order (delta by
    flash_attn's preprocess; tile None: the portable kernels)."""
    B, T, H, D = q.shape
    left, right = flash_attn._window(causal, None, T, T)
    if tile is None:
        return portable(flash_attn._backward, do, q, k, v, out, lse, None, causal, D ** -0.5, left, right)
    delta = torch.empty_like(lse)
    flash_attn._run(flash_attn._bwd_preprocess, (lse.shape[-1] // flash_attn.MAX_BLOCK, B * H), out, do, delta,
                    out.stride(0), out.stride(1), out.stride(2), T, lse.shape[-1], H, HEAD_DIM=D, DIM=D,
                    BLOCK_M=flash_attn.MAX_BLOCK)
    return fh.backward(do, q, k, v, lse, delta, D ** -0.5, left, right, tile=tile, l2_bytes=l2_bytes)


def check_bwd(D, tile, l2_bytes):
    """As check, for the gradients (forward by the shipped kernel at D, checked above)."""
    for causal in (True, False):
        q = torch.randn(3, 3000, 16, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 3000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do = torch.randn_like(q)
        out, lse = forward(q, k, v, causal, fh.FWD_TILES[D])
        grads = backward(do, q, k, v, out, lse, causal, tile, l2_bytes)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = flash_attn.attention_reference(*leaves, causal=causal)[0]
        for name, got, want in zip("qkv", grads, torch.autograd.grad(ref, leaves, do.double())):
            err = ((got.double() - want).norm() / want.norm()).item()
            if not err < 2e-2:
                return f"WRONG (causal={causal}: d{name} {err:.2e})"
    return "ok"


# --------------------------------------------------------------------------- timing
def median_ms(fns, rounds):
    """Median milliseconds of each callable over `rounds` rounds, the callables interleaved in each
    round, so that a drift of the GPU's clock reaches all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def time_direction(direction, variants, check_fn, rounds):
    """Every variant of one direction and SDPA cuDNN, interleaved (median_ms), causal, 16k tokens per
    batch and 2048 = heads x head dim: a markdown table of TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for D in sorted({v[1] for v in variants}, reverse=True):
        here = [v for v in variants if v[1] == D]
        status = {name: check_fn(D, tile, l2) for name, _, tile, l2 in here}
        for T in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            flops = 4 * B * H * T * T * D * 0.5 * (2.5 if direction == "backward" else 1)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            if direction == "forward":
                fns = {name: (lambda t=tile, l2=l2: forward(q, k, v, True, t, l2)) for name, _, tile, l2 in here}

                def cudnn():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            else:
                out, lse = forward(q, k, v, True, fh.FWD_TILES[D])
                fns = {name: (lambda t=tile, l2=l2: backward(do, q, k, v, out, lse, True, t, l2))
                       for name, _, tile, l2 in here}

                def cudnn():
                    torch.autograd.grad(ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True)
            with torch.no_grad() if direction == "forward" else torch.enable_grad():
                ms = median_ms({**fns, "cuDNN": cudnn}, rounds)
            for name in fns:
                rows.append((name, D, T, status[name], flops / ms[name] * 1e-9, flops / ms["cuDNN"] * 1e-9))
                print(*rows[-1], flush=True)
    print_table(direction, rows)


def print_table(direction, rows):
    """rows: (variant, head dim, seqlen, check, our TFLOP/s, SDPA cuDNN's) as a markdown table."""
    print(f"\n| {direction} variant | head dim | seqlen | check | TFLOP/s | SDPA cuDNN | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, D, T, status, ours, cudnn in rows:
        print(f"| {name} | {D} | {T} | {status} | {ours:.0f} | {cudnn:.0f} | {ours / cudnn:.2f} |")


def compile_all(names):
    """Compile the variants called names (all if empty), each tile once per direction."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(block, dtype="bf16"):
        layout = gl.NVMMASharedLayout.get_default_for(block, {"bf16": gl.bfloat16, "fp32": gl.float32}[dtype])
        return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"

    def compile_one(name, D, tile, fn, sig, consts):
        for arg in fn.arg_names:
            sig.setdefault(arg, "constexpr" if arg in consts else "i32")
        try:
            k = triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options=fh.COMPILE_OPTIONS)
        except Exception as e:  # noqa: BLE001
            print(f"{name:14s} D={D:3d} tile {tile}: FAILED {type(e).__name__}: {str(e)[-300:]}")
            return
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        spill = re.search(r"(\d+) bytes spill stores", log)
        regs = re.search(r"Used (\d+) registers", log)  # per thread at launch: bounds the programs per SM
        print(f"{name:14s} D={D:3d} tile {tile}: {regs.group(1) if regs else '?'} registers, "
              f"smem {k.metadata.shared} B, spill stores {spill.group(1) if spill else '?'} B, "
              f"{'wgmma serialized' if 'serialized' in log else 'pipelined'}")

    for direction, variants in (("forward", VARIANTS), ("backward", BWD_VARIANTS)):
        tiles = {}  # the orders are an argument (l2_bytes) of one compiled kernel per tile
        for name, D, tile, _ in variants:
            if tile is not None and (not names or name in names):  # not the portable kernels
                tiles.setdefault((D, tile), name)
        for (D, (bm, bn, stages, *kind)), name in tiles.items():
            if direction == "forward":
                sig = {"desc_q": desc([64, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
                       "desc_o": desc([64, D]), "Out": "*bf16", "Lse": "*fp32", "softmax_scale": "fp32"}
                persistent = kind == ["dynamic"]
                consts = dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages)
                if persistent:
                    sig["Counter"] = "*i32"
                compile_one(name, D, (bm, bn, stages, *kind), _persistent_fwd_kernel if persistent else fh._fwd_kernel,
                            sig, consts)
            else:
                sig = {"desc_q": desc([bm, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
                       "desc_do": desc([bm, D]), "desc_dq": desc([bm, D // 2], "fp32"), "desc_lse": desc([bm], "fp32"),
                       "desc_delta": desc([bm], "fp32"), "desc_dk": desc([64, D]), "desc_dv": desc([64, D]),
                       "dK": "*bf16", "dV": "*bf16", "softmax_scale": "fp32"}
                compile_one(name, D, (bm, bn, stages, *kind), fh._bwd_kernel, sig,
                            dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", nargs="*", metavar="NAME",
                   help="compile for sm_90a here, no GPU needed: the variants named (default all)")
    p.add_argument("--only", choices=["forward", "backward"], help="time one direction's variants")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, the variants interleaved in each")
    p.add_argument("--names", nargs="+", metavar="NAME", help="time only these variants (a hang stops just them)")
    args = p.parse_args()
    if args.compile_only is not None:
        compile_all(args.compile_only)
    else:
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
        def chosen(variants):
            return [v for v in variants if not args.names or v[0] in args.names]
        if args.only != "forward" and chosen(BWD_VARIANTS):
            time_direction("backward", chosen(BWD_VARIANTS), check_bwd, args.rounds)
        if args.only != "backward" and chosen(VARIANTS):
            time_direction("forward", chosen(VARIANTS), check, args.rounds)
