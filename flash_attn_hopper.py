"""FlashAttention-3 (arXiv 2407.08608) on Hopper (sm_90), head dims 128 and 64: warp-specialized Gluon kernels.

flash_attn.py calls these for CUDA tensors of compute capability 9.x and 16-bit dtypes at head dim
128, and at head dim 64 from the sequence lengths in MIN_SEQLEN; everything else (and the CPU
interpreter) takes its portable Triton kernels. Same layout, masks, grouped-query heads and
log2-unit lse as those kernels, so the algorithm is the one in flash_attn.py's docstring. What
differs is how the work is scheduled on an SM (README, Benchmarks: the speeds against cuDNN).

Each program runs three kinds of warps at once (gl.warp_specialize), talking through mbarriers:
  - a loader warp issues TMA copies into rings of shared-memory slots: it waits until a slot
    is "empty" (every consumer arrived), then the copy's completion marks it "full";
  - consumer warpgroups (4 warps each; two with 240 registers per thread or three with 160,
    taken from the loader by setmaxnreg) do the wgmma matmuls and the softmax, each on its own
    64 rows, so one warpgroup's exp2s run while another's matmuls occupy the tensor cores;
  - backward only: a writer warp adds each dQ tile into global memory by a TMA bulk reduction.
Forward consumers also overlap within a warpgroup: block i's S = Q K^T and block i-1's
O += P V are issued together, and the softmax of block i runs while P V still computes. Results
leave through shared memory by TMA stores (O through a buffer of its own; dK, dV through K's and
V's), as FlashAttention-3's epilogue does.

Forward: persistent programs, one per SM, each taking query tiles (128 or 192 rows of one head) from
an atomic counter in a fixed order; Q has two buffers, so the next tile's loads overlap this one's
last blocks and epilogue.

Backward (one program per 128 keys, FlashAttention-2's partitioning, all five matmuls once):
each warpgroup keeps dK, dV for its 64 keys in registers and loops over query blocks of 64 (with a
causal mask and few programs, a key block's query blocks are split over several programs, whose
float32 partial dK, dV are added up after: BWD_SPLIT_WAVES).
dQ_i = dS K needs dS for all 128 keys, so both warpgroups write dS^T to shared memory, and the
writer adds each dQ_i to a float32 dQ (zeroed by flash_attn's _delta in its pass for delta, cast
at the end). At head dim 128 the two warpgroups meet at every step and each computes half of
dQ_i's head dim; at 64, where shared memory's bandwidth rather than the tensor cores bounds a
step, the warpgroups take turns at whole dQ_i, a step late, and hold K and V in registers. lse
and delta come in by TMA with Q and dO: loading them with plain loads in the consumers cost 15%
(the loads sit in front of every exp2). The reductions land in whatever order the programs reach
them, so dQ is not bitwise reproducible from run to run (as with FlashAttention-2/3);
FLASH_ATTN_HOPPER=0 selects the portable kernels, which add no atomics.

Compiled only on a GPU; tests/test_flash_attn.py compiles the kernels for sm_90a on CPU
machines (no GPU needed) and checks them against the reference on a GPU.

Tested with Triton 3.6.0 to 3.9.0 (Gluon is experimental and its API moves between releases:
the few renames are bridged below by feature checks). A Triton whose Gluon lacks what these
kernels call fails the import with an ImportError that names what is missing, before any
call, and flash_attn keeps its portable kernels.
"""
import functools
import inspect

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

import flash_attn

TESTED_TRITON = "3.6.0 to 3.9.0"  # tests/test_flash_attn.py compiles the kernels with each release


def _missing_features():
    """What this Triton's Gluon lacks of what the kernels call: features, not version numbers, so
    that a release past the tested ones is tried (flash_attn falls back if it then fails)."""
    missing = []
    if "functions_and_args" not in inspect.signature(gl.warp_specialize).parameters:
        missing.append("gl.warp_specialize([(function, args), ...], warps, regs)")  # 3.6's form
    if not (hasattr(tma, "async_load") or hasattr(tma, "async_copy_global_to_shared")):
        missing.append("tma.async_load")
    return missing


if _missing_features():  # before the first call: flash_attn then keeps its portable kernels
    raise ImportError(f"Triton {triton.__version__} lacks {' and '.join(_missing_features())}; "
                      f"flash_attn_hopper is tested with Triton {TESTED_TRITON}")

# Forward (query rows, key rows, K/V ring slots, Q slots) per head dim: BLOCK_M // 64 consumer
# warpgroups of 64 query rows; at head dim 64 from FWD_LONG_SEQLEN tokens three (FlashAttention-3's
# tile. H200, causal, TFLOP/s 192 x 128 / 128 x 128: 1k 226 / 303, 4k 381 / 411, 8k 455 / 437, 16k 486 /
# 453). Two Q slots against one: head dim 64 1k 303 / 288, 4k 411 / 400; 128 1k 414 / 399, 2k 497 / 490;
# within 1% from 8k. Backward (query rows, key rows, ring slots, dQ_i's parts: _bwd_program): two
# warpgroups of 64 keys
FWD_TILES = {64: (128, 128, 2, 2), 128: (128, 128, 2, 2)}
FWD_TILES_LONG = {64: (192, 128, 2, 2)}
FWD_LONG_SEQLEN = 8192
BWD_TILES = {64: (64, 128, 2, 1), 128: (64, 128, 2, 2)}
CAST_BLOCK = 4096  # dQ elements per program of the backward's cast to q's dtype (flash_attn._cast)
# The backward's programs (one per key block and kv head) are few where B x kv heads x T / 128 is small,
# and long with grouped-query heads (each loops over the group's query heads); with a causal mask, whose
# first key blocks take the longest, the SMs then run dry before the end. There each key block's steps
# are split over up to BWD_MAX_SPLITS programs (_splits_for), as many as stay within BWD_SPLIT_WAVES waves
# with parts of at least BWD_MIN_STEPS steps (shorter ones cost more in their fixed work, the float32
# partial dK, dV, than they recover), which _cast adds up in order (the same bits on every run; at most
# 8 waves x 128 keys x D x 2 x 4 bytes in all: 138 MB at head dim 128 on 132 SMs). H200,
# causal, TFLOP/s unsplit / split (cuDNN): 1 x 8192 tokens x 32/8 heads 438 / 490 in 2 (450); 2 x 4096 x
# 28/4 332 / 441 in 4 (443); 2 x 4096 x 32/8 411 / 448 in 2 (446); 8 heads 1 x 4096, 64 steps, 446 /
# 334 in 2 (321); full mask: unsplit best (notes/flash_attn_bench.md)
BWD_SPLIT_WAVES = 8
BWD_MAX_SPLITS = 8
BWD_MIN_STEPS = 96
# the shortest sequence these kernels take; below it the portable ones are faster (H200, 16k tokens per
# batch, TFLOP/s portable / these): head dim 64 forward, causal, 1k 274 / 289, 2k 333 / 362 (2026-12-02);
# backward 1k 259 / 263 causal, 308 / 347 full (README's table, 2026-12-04)
MIN_SEQLEN = {64: 1024}  # head dim -> tokens, both directions
# the order in which the programs start (_tile_order): heads in groups whose streamed tiles (the forward's
# K and V, the backward's Q and dO) fill this many bytes of the H200's 50 MB L2, within a group the
# longest blocks of all its heads first. Head by head (flash_attn.py's grid order) the last head's longest
# causal tiles start last while SMs idle; all heads at once stream every head's tiles through L2. H200,
# head dim 128, causal, TFLOP/s head by head / these groups (interleaved runs, notes/flash_attn_bench.md):
# forward 2k 432 / 442, 4k 499 / 522, 8k 562 / 569, 16k 607 / 598 (8 and 32 MB within 2% of 16; all heads
# at once 0.70-0.97x); backward 2k 375 / 377, 4k 433 / 448, 8k 486 / 494, 16k 524 / 521. Heads left over
# join the last group (_tile_at): alone, a few heads' longest causal tiles started last in the same way
# (causal, forward / backward: 4 x 4224 tokens x 16 heads in groups of 7, 545 / 447 -> 565 / 471; 2 x 6000
# x 16 in groups of 5, 552 / 456 -> 576 / 488; full mask 0.98-1.01x)
L2_GROUP_BYTES = 16 << 20
COMPUTE_REGS = gl.constexpr(240)  # setmaxnreg per thread: 2 x 128 x 240 + 128 x 24 <= 64K registers
COMPUTE_REGS_3 = gl.constexpr(160)  # three consumer warpgroups: 3 x 128 x 160 + 128 x 24 <= 64K
LOADER_REGS = gl.constexpr(24)
# 4 warps launched run warp_specialize's first partition (consumer warpgroup 0), which adds the
# others' warps; FMA contraction as in flash_attn's launches
COMPILE_OPTIONS = dict(num_warps=4, **flash_attn.FP_FUSION)
LOG2E = flash_attn.LOG2E

# the portable kernels' mask helpers, compiled as Gluon (pure scalar / elementwise code)
_block_range = gluon.jit(flash_attn._block_range.fn)
_band = gluon.jit(flash_attn._band.fn)
_wait_for_inputs = gluon.jit(flash_attn._wait_for_inputs.fn)  # (the kernels call it after their prologue)


def supported(q, direction):
    """Hopper GPU, a head dim with tiles for direction ("forward" or "backward") and a sequence
    that long, 16-bit; lse small enough for the int32 coordinates of its 1D TMA."""
    B, T, H, D = q.shape
    tiles = FWD_TILES if direction == "forward" else BWD_TILES
    return (q.is_cuda and D in tiles and T >= MIN_SEQLEN.get(D, 0)
            and q.dtype in (torch.bfloat16, torch.float16)
            and B * H * (T + 128) < 2 ** 31 and _is_hopper(q.device.index))


@functools.lru_cache(maxsize=None)
def _is_hopper(index):
    return torch.cuda.get_device_capability(index)[0] == 9


@builtin
def _tma_reduce_add_36(desc, offsets, src, _semantic=None):
    """desc[offsets] += src (a shared-memory tile), an asynchronous TMA bulk reduction
    (cp.reduce.async.bulk.tensor); tma.store_wait covers it like a TMA store. Triton 3.6 and 3.7
    have the op but no Python wrapper."""
    offsets = _semantic._convert_to_ir_values(offsets, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, offsets, src.handle)


# Gluon's API moves between Triton releases; feature checks, not version numbers. Triton 3.8
# renamed tma.async_copy_global_to_shared to async_load (3.9 keeps the old name only to raise)
# and added async_atomic_add, the same reduction as _tma_reduce_add_36.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_reduce_add = getattr(tma, "async_atomic_add", None) or _tma_reduce_add_36
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # 3.7 renamed it


@triton.constexpr_function
def _mma_layout(N):
    """wgmma accumulator layout of a (64, N) tile on one warpgroup."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])


# --------------------------------------------------------------------------- forward
# Persistent programs, min(#SMs, #tiles) of them: program p starts with tile p of _tile_at's sequence
# (heads in L2-sized groups, longest query blocks first) and then takes the next tile of that sequence
# from an atomic counter (FlashAttention-3's scheduler, arXiv 2407.08608), as the hardware would start
# the programs of a grid: the tiles in flight stay together and share one group's K and V. (A fixed
# stride, tiles p, p + #programs, ..., let the programs drift apart: 0.85-0.90x of cuDNN; one program
# per tile paid each tile's fill and drain: notes/flash_attn_bench.md.) The loader refills a consumer's
# Q buffer as soon as that consumer's last S = Q K^T of a tile is done, and the K/V rings run on across
# tiles, so the next tile's loads overlap this tile's last P V and epilogue.
@gluon.jit
def _fwd_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT, IS_CAUSAL: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t's batch, head, (batch, head) index, first query row and key blocks (lo, mid_lo, mid_hi, count)."""
    m, bh = _tile_at(t, n_tiles, n_m, HEADS)
    if IS_CAUSAL:  # the longest rows first
        m = n_m - 1 - m
    m0 = m * BLOCK_M
    lo, mid_lo, mid_hi, hi = _block_range(m0, T, T, LEFT, RIGHT, None, 0, BLOCK_M, BLOCK_N, False)  # no documents
    return bh // H, bh % H, bh, m0, lo, mid_lo, mid_hi, gl.cdiv(hi - lo, BLOCK_N)  # >= 1 block: row m0 sees key m0


@gluon.jit
def _publish_tile(tile_smem, tile_full, tile_empty, j, t):
    """Loader: t is the program's j-th tile; two slots, each free again once every consumer has read it."""
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
def _fwd_loader(desc_q, desc_k, desc_v, q_smem, o_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty,
                v_empty, tile_smem, tile_full, tile_empty, Counter, T, H, GROUP, LEFT, RIGHT, HEADS, n_m, n_tiles,
                IS_CAUSAL: gl.constexpr):
    """Loader warp, per tile: the tile's number to the consumers (_publish_tile; n_tiles or more is the
    end), each consumer's 64 query rows into Q slot j % Q_STAGES (j counts the program's tiles) once
    that slot is free, then K_i, V_i into slot c % STAGES of their rings (c counts the program's key
    blocks over all its tiles), each once the slot is released. Two Q slots: the next tile's Q (and
    with it its first K, V) loads while this tile still computes, not after its last S = Q K^T."""
    W: gl.constexpr = o_smem.shape[0]  # o_smem: only its shape (arguments of partitions are no constexprs)
    Q_STAGES: gl.constexpr = q_smem.shape[0] // W
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    it = 0  # key blocks of the earlier tiles
    j = 0  # tiles done
    t = gl.program_id(0)
    while t < n_tiles:
        _publish_tile(tile_smem, tile_full, tile_empty, j, t)
        b, h, bh, m0, lo, mid_lo, mid_hi, n_blocks = _fwd_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT, IS_CAUSAL,
                                                               W * ROWS, BLOCK_N)
        for w in gl.static_range(W):
            q_slot = j % Q_STAGES * W + w
            # parity of the slot's last release (a fresh barrier passes)
            mbarrier.wait(q_empty.index(q_slot), ((j // Q_STAGES) & 1) ^ 1)
            mbarrier.expect(q_bars.index(q_slot), desc_q.block_type.nbytes)
            _tma_load(desc_q, [b * T + m0 + w * ROWS, h * D], q_bars.index(q_slot), q_smem.index(q_slot))
        for i in range(n_blocks):
            c = it + i
            s = c % STAGES
            released = ((c // STAGES) & 1) ^ 1
            row = b * T + lo + i * BLOCK_N
            mbarrier.wait(k_empty.index(s), released)
            mbarrier.expect(k_full.index(s), desc_k.block_type.nbytes)
            _tma_load(desc_k, [row, (h // GROUP) * D], k_full.index(s), k_ring.index(s))
            mbarrier.wait(v_empty.index(s), released)
            mbarrier.expect(v_full.index(s), desc_v.block_type.nbytes)
            _tma_load(desc_v, [row, (h // GROUP) * D], v_full.index(s), v_ring.index(s))
        it += n_blocks
        j += 1
        fetched = gl.atomic_add(Counter, 1)  # one fetch per tile done: n_tiles in all, values 0 .. n_tiles - 1
        if fetched == n_tiles - 1:  # the kernel's last fetch: the counter back to 0 for the next call (_tile_counter)
            gl.atomic_xchg(Counter, 0)
        t = gl.num_programs(0) + fetched  # the first num_programs tiles went at launch
    _publish_tile(tile_smem, tile_full, tile_empty, j, t)  # the end


@gluon.jit
def _online_softmax(qk, m_i, l_i, rows, cols, masked, T, LEFT, RIGHT, qk_scale):
    """One key block of the online softmax (flash_attn.py's docstring): P (float32), the factor
    that rescales the old sums, and the new m, l."""
    if masked:  # flash_attn._visible as per-row bounds: row r sees c in [r - LEFT, min(r + RIGHT + 1, T)),
        # two compares per element (_visible's three compares of differences spilled ~970 B at 192 x 128)
        c = gl.expand_dims(cols, 0)
        qk = gl.where((c >= gl.expand_dims(rows - LEFT, 1)) & (c < gl.expand_dims(gl.minimum(rows + RIGHT + 1, T), 1)),
                      qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    m_new = gl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: subtract 0, not -inf
    p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _fwd_warpgroup(wg, q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, o_smem, desc_o,
                   tile_smem, tile_full, tile_empty, Out, Lse, softmax_scale, T, T_pad, H, LEFT, RIGHT, HEADS, n_m,
                   n_tiles, IS_CAUSAL: gl.constexpr):
    """Consumer warpgroup wg, per tile: query rows r0 = m0 + 64 wg ... r0 + 63 against the tile's key
    blocks, then O and lse stored. Out is contiguous (B, T, H, D)."""
    W: gl.constexpr = o_smem.shape[0]
    Q_STAGES: gl.constexpr = q_smem.shape[0] // W
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)  # S: (rows, keys)
    o_layout: gl.constexpr = _mma_layout(D)  # O: (rows, D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)  # P from registers
    dtype: gl.constexpr = q_smem.dtype
    qk_scale = softmax_scale * LOG2E  # exp(x) = exp2(x * log2(e))
    it = 0  # key blocks of the earlier tiles: ring slot and phase of block i are those of it + i
    j = 0
    t = _read_tile(tile_smem, tile_full, tile_empty, 0)
    while t < n_tiles:
        b, h, bh, m0, lo, mid_lo, mid_hi, n_blocks = _fwd_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT, IS_CAUSAL,
                                                               W * ROWS, BLOCK_N)
        r0 = m0 + wg * ROWS
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([ROWS, D], gl.float32, layout=o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        q_slot = j % Q_STAGES * W + wg
        q = q_smem.index(q_slot)
        mbarrier.wait(q_bars.index(q_slot), (j // Q_STAGES) & 1)

        first = it % STAGES
        mbarrier.wait(k_full.index(first), (it // STAGES) & 1)
        qk = warpgroup_mma(q, k_ring.index(first).permute((1, 0)), s_zero, use_acc=False)
        mbarrier.arrive(k_empty.index(first), count=1)
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, rows, lo + cols, (lo < mid_lo) | (lo >= mid_hi),
                                             T, LEFT, RIGHT, qk_scale)
        p = gl.convert_layout(p.to(dtype), p_layout)  # P_0 in registers, the A operand of P V
        for i in range(1, n_blocks):
            start_n = lo + i * BLOCK_N
            c = it + i
            s = c % STAGES
            prev = (c - 1) % STAGES
            mbarrier.wait(k_full.index(s), (c // STAGES) & 1)
            s_tok = warpgroup_mma(q, k_ring.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_full.index(prev), ((c - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p, v_ring.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(1, deps=[s_tok])  # S_i is ready, P_{i-1} V_{i-1} still computing
            mbarrier.arrive(k_empty.index(s), count=1)
            p_new, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, rows, start_n + cols,
                                                     (start_n < mid_lo) | (start_n >= mid_hi), T, LEFT, RIGHT,
                                                     qk_scale)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p = gl.convert_layout(p_new.to(dtype), p_layout)
        mbarrier.arrive(q_empty.index(q_slot), count=1)  # the loader may fetch a later tile's Q
        c = it + n_blocks - 1
        last = c % STAGES
        mbarrier.wait(v_full.index(last), (c // STAGES) & 1)
        acc = warpgroup_mma(p, v_ring.index(last), acc)
        mbarrier.arrive(v_empty.index(last), count=1)

        # epilogue: O = acc / l, lse = m + log2(l); padding rows get lse = +inf (so P = 0 there). A tile
        # of 192 rows can reach past T_pad (a multiple of 128): the next head's lse, not stored
        valid = rows < T
        l_i = gl.where(valid, l_i, 1.0)
        gl.store(Lse + bh.to(gl.int64) * T_pad + rows, gl.where(valid, m_i + gl.log2(l_i), float("inf")),
                 mask=rows < T_pad)
        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        # FlashAttention-3's epilogue: O into shared memory (o_smem: Q's buffer is being refilled), one
        # asynchronous bulk copy out, so the next tile starts without waiting for global stores (stores
        # from the wgmma layout, 4-byte pieces, cost up to 10% at 1k tokens). The 2D descriptor would
        # write rows past T into the next sequence's: those tiles use plain stores
        if r0 + ROWS <= T:
            tma.store_wait(pendings=0)  # the last tile's copy has read o_smem
            _thread_barrier()
            o_smem.index(wg).store(out.to(dtype))
            fence_async_shared()
            _thread_barrier()
            _tma_store(desc_o, [b * T + r0, h * D], o_smem.index(wg))
        else:
            # t // n_tiles is 0, but the compiler cannot prove it: the offsets are computed here instead
            # of hoisted out of the tile loop and kept live through it (spilling them, as a first version did)
            stride_ot = H * D + t // n_tiles
            rows_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            offs = gl.expand_dims(rows_o * stride_ot, 1) + gl.expand_dims(cols_o, 0)  # 32-bit, from a 64-bit base
            base = (b * T + r0).to(gl.int64) * (H * D) + h * D
            gl.store(Out + base + offs, out.to(dtype), mask=gl.expand_dims(r0 + rows_o < T, 1))
        it += n_blocks
        j += 1
        t = _read_tile(tile_smem, tile_full, tile_empty, j)
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "HEADS", "n_m", "n_tiles"])
def _fwd_kernel(desc_q, desc_k, desc_v, desc_o, Out, Lse, Counter, softmax_scale, T, T_pad, H, GROUP, LEFT, RIGHT,
                HEADS, n_m, n_tiles, IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, Q_STAGES: gl.constexpr, GDC: gl.constexpr = False):
    """n_tiles = n_m query blocks x B * H tiles over the programs: BLOCK_M // 64 consumer warpgroups
    (2 or 3), each on its own 64 query rows, and the loader warp."""
    dtype: gl.constexpr = desc_q.dtype
    D: gl.constexpr = desc_k.block_type.shape[1]
    W: gl.constexpr = BLOCK_M // 64
    gl.static_assert(BLOCK_M == 128 or BLOCK_M == 192, "two or three consumer warpgroups of 64 query rows")
    q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES * W, 64, D], desc_q.layout)  # slot s, warpgroup w: s W + w
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_k.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_v.layout)
    o_smem = gl.allocate_shared_memory(dtype, [W, 64, D], desc_o.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [Q_STAGES * W, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_STAGES * W, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    tile_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    tile_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    tile_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(2):
        mbarrier.init(tile_full.index(s), count=1)
        mbarrier.init(tile_empty.index(s), count=W)  # read by every warpgroup
    for w in gl.static_range(Q_STAGES * W):
        mbarrier.init(q_bars.index(w), count=1)
        mbarrier.init(q_empty.index(w), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_full.index(s), count=1)
        mbarrier.init(v_full.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=W)  # released by every warpgroup
        mbarrier.init(v_empty.index(s), count=W)
    _wait_for_inputs(GDC)  # (the tile counter too: the kernel before may be this one)
    consumer = (q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, o_smem, desc_o, tile_smem,
                tile_full, tile_empty, Out, Lse, softmax_scale, T, T_pad, H, LEFT, RIGHT, HEADS, n_m, n_tiles,
                IS_CAUSAL)
    loader = (desc_q, desc_k, desc_v, q_smem, o_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty, v_empty,
              tile_smem, tile_full, tile_empty, Counter, T, H, GROUP, LEFT, RIGHT, HEADS, n_m, n_tiles, IS_CAUSAL)
    if W == 3:
        gl.warp_specialize([(_fwd_warpgroup, (0, ) + consumer), (_fwd_warpgroup, (1, ) + consumer),
                            (_fwd_warpgroup, (2, ) + consumer), (_fwd_loader, loader)],
                           [4, 4, 1], [COMPUTE_REGS_3, COMPUTE_REGS_3, LOADER_REGS])
    else:
        gl.warp_specialize([(_fwd_warpgroup, (0, ) + consumer), (_fwd_warpgroup, (1, ) + consumer),
                            (_fwd_loader, loader)], [4, 1], [COMPUTE_REGS, LOADER_REGS])


@gluon.jit
def _tile_order(n_blocks, HEADS):
    """(block, head) of this program of a 1D grid of n_blocks x heads: the heads in groups of HEADS (the last
    with the leftover heads), one group after another; within a group block by block, every head of the
    group at each block."""
    return _tile_at(gl.program_id(0), gl.num_programs(0), n_blocks, HEADS)


@gluon.jit
def _tile_at(t, n_tiles, n_blocks, HEADS):
    """_tile_order's (block, head) of tile t of n_tiles = n_blocks x heads. The last group also takes the
    heads left over, so that no group but a lone one has fewer than HEADS: a small last group's longest
    causal tiles would start when the other SMs run out of work. Scalar code only (tests run it as Python)."""
    n_heads = n_tiles // n_blocks
    last = n_heads // HEADS * HEADS - HEADS  # the last group's first head
    if last < 0:  # fewer than HEADS heads: one group
        last = 0
    first = t // (HEADS * n_blocks) * HEADS  # the group's first head
    if first > last:
        first = last
    size = HEADS
    if first == last:
        size = n_heads - last
    r = t - first * n_blocks
    return r // size, first + r % size


# --------------------------------------------------------------------------- backward
@gluon.jit
def _bwd_step(j, n_q, lo, BLOCK_M: gl.constexpr):
    """Step j of a backward program's loop (loader, consumers and writer walk the same steps):
    the query head g of the group and the first query row of its block."""
    g = j // n_q
    return g, lo + (j - g * n_q) * BLOCK_M


@gluon.jit
def _bwd_loader(desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, k_smem, v_smem, q_ring, do_ring,
                lse_ring, delta_ring, kv_bar, q_full, q_empty, kv_row, kv_col, q_row, h0, j0, n_steps, lo, n_q,
                stat_base, T_pad):
    """Loader warp: this program's K, V once, then Q_i, dO_i, lse_i, delta_i of each of its steps (a query
    block of a query head of the group) into slot j % STAGES."""
    STAGES: gl.constexpr = q_ring.shape[0]
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    D: gl.constexpr = q_ring.shape[2]
    mbarrier.expect(kv_bar, 2 * desc_k.block_type.nbytes)
    _tma_load(desc_k, [kv_row, kv_col], kv_bar, k_smem)
    _tma_load(desc_v, [kv_row, kv_col], kv_bar, v_smem)
    for j in range(n_steps):
        s = j % STAGES
        g, start_m = _bwd_step(j0 + j, n_q, lo, BLOCK_M)
        mbarrier.wait(q_empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(q_full.index(s), 2 * desc_q.block_type.nbytes + 2 * desc_lse.block_type.nbytes)
        _tma_load(desc_q, [q_row + start_m, (h0 + g) * D], q_full.index(s), q_ring.index(s))
        _tma_load(desc_do, [q_row + start_m, (h0 + g) * D], q_full.index(s), do_ring.index(s))
        stat = (stat_base + g * T_pad + start_m).to(gl.int32)
        _tma_load(desc_lse, [stat], q_full.index(s), lse_ring.index(s))
        _tma_load(desc_delta, [stat], q_full.index(s), delta_ring.index(s))


@gluon.jit
def _bwd_dq_writer(desc_dq, dq_smem, dq_full, dq_empty, q_row, h0, lo, n_q, j0, n_steps):
    """Writer warp: global dQ_i += its parts (two halves of the head dim, or all of it), by TMA bulk
    reductions, so that no consumer waits for them. (The consumers adding dQ from their registers by
    red.global.add instead, without this warp and the staging buffers, lost 29-35% at head dim 128 and
    7-15% at 64: notes/flash_attn_bench.md, 2026-12-04.)"""
    PARTS: gl.constexpr = dq_smem.shape[0] // 2  # DQ_PARTS
    BLOCK_M: gl.constexpr = dq_smem.shape[1]
    PART_D: gl.constexpr = dq_smem.shape[2]
    for j in range(n_steps):
        buf = j % 2
        g, start_m = _bwd_step(j0 + j, n_q, lo, BLOCK_M)
        mbarrier.wait(dq_full.index(buf), (j // 2) & 1)
        # rows >= T of the tile are the next sequence's (or clipped by TMA): their dS, so dQ, is 0
        for w in gl.static_range(PARTS):
            _tma_reduce_add(desc_dq, [q_row + start_m, (h0 + g) * PARTS * PART_D + w * PART_D],
                            dq_smem.index(PARTS * buf + w))
        tma.store_wait(pendings=0)
        mbarrier.arrive(dq_empty.index(buf), count=1)


@gluon.jit
def _bwd_dq_hand(part, buf, phase, dq, dq_smem, ds_empty, dq_full, dq_empty):
    """A finished part of dQ (of a step with dS^T buffer buf and its phase) to the writer warp; the buffer
    free again as far as this warpgroup goes."""
    PARTS: gl.constexpr = dq_smem.shape[0] // 2
    mbarrier.arrive(ds_empty.index(buf), count=1)
    mbarrier.wait(dq_empty.index(buf), phase ^ 1)  # the writer has added this buffer's last tile
    dq_smem.index(PARTS * buf + part).store(dq)
    fence_async_shared()
    mbarrier.arrive(dq_full.index(buf), count=1)


@gluon.jit
def _bwd_step_inputs(j, j0, q_ring, do_ring, q_full, n_q, lo):
    """A consumer's step j (the program's j0 + j): its ring slot, first query row, and Q, dO once the loader
    has filled the slot (query head g's Q, dO, lse, delta). Kept out of _bwd_scores: with the wait in there
    ptxas allocates the head-dim-128 kernel otherwise (172 B of spills against 148)."""
    STAGES: gl.constexpr = q_ring.shape[0]
    s = j % STAGES
    _, start_m = _bwd_step(j0 + j, n_q, lo, q_ring.shape[1])
    q = q_ring.index(s)
    do = do_ring.index(s)
    mbarrier.wait(q_full.index(s), (j // STAGES) & 1)
    return s, start_m, q, do


@gluon.jit
def _bwd_scores(k_a, v_a, q, do, lse_smem, delta_smem, dk, dv, st_zero, keys, cols, start_m, mid_lo, mid_hi, ragged,
                T, LEFT, RIGHT, softmax_scale, qk_scale):
    """A step's first four matmuls for 64 keys (K, V: the A operands k_a, v_a, in registers or shared memory)
    against the query block start_m (Q, dO in shared memory): S^T and dP^T, then dV += P^T dO and dK += dS^T Q
    issued, not waited for. Tokens of dV and dK, and dS^T (to dtype) for dQ."""
    st_layout: gl.constexpr = st_zero.type.layout  # S^T, dP^T: (keys, queries)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)  # P^T, dS^T
    dtype: gl.constexpr = q.dtype
    s_tok = warpgroup_mma(k_a, q.permute((1, 0)), st_zero, use_acc=False, is_async=True)  # S^T = K Q^T
    dp_tok = warpgroup_mma(v_a, do.permute((1, 0)), st_zero, use_acc=False, is_async=True)  # dP^T = V dO^T
    lse = lse_smem.load(gl.SliceLayout(0, st_layout))  # log2 units; +inf for rows >= T
    s_t = warpgroup_mma_wait(1, deps=[s_tok])
    p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))  # P^T, recomputed
    if (start_m < mid_lo) | (start_m >= mid_hi) | ragged:
        p_t = gl.where(_band(keys, start_m + cols, RIGHT, LEFT) & gl.expand_dims(keys < T, 1), p_t, 0.0)
    dv_tok = warpgroup_mma(gl.convert_layout(p_t.to(dtype), a_layout), do, dv, is_async=True)  # dV += P^T dO
    delta = delta_smem.load(gl.SliceLayout(0, st_layout))
    dp_t = warpgroup_mma_wait(1, deps=[dp_tok])
    # dS^T = P^T (dP^T - delta), times the softmax scale that dK = scale dS^T Q and dQ = scale dS K share
    ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0)) * softmax_scale).to(dtype)
    dk_tok = warpgroup_mma(gl.convert_layout(ds_t, a_layout), q, dk, is_async=True)  # dK += dS^T Q
    return dv_tok, dk_tok, ds_t


@gluon.jit
def _bwd_publish_ds(ds_t, wg, buf, phase, ds_smem, ds_full, ds_empty):
    """This warpgroup's dS^T of a step (its buffer and phase) into its rows of the buffer, once the dQ
    matmuls of two steps before that read the buffer are done."""
    mbarrier.wait(ds_empty.index(buf), phase ^ 1)
    ds_smem.index(buf).slice(wg * 64, 64, dim=0).store(ds_t)
    fence_async_shared()
    mbarrier.arrive(ds_full.index(buf), count=1)


@gluon.jit
def _bwd_consumer_setup(wg, n0, T, BLOCK_M: gl.constexpr, D: gl.constexpr):
    """A consumer warpgroup's loop-invariant values for its 64 keys n0 + 64 wg ...: the keys (rows of S^T),
    the query offsets (its columns), zeroed dK and dV, a zero S^T, and whether keys past T are in the block."""
    st_layout: gl.constexpr = _mma_layout(BLOCK_M)  # S^T, dP^T: (keys, queries)
    kv_layout: gl.constexpr = _mma_layout(D)  # dK, dV: (keys, D)
    keys = n0 + wg * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, st_layout))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
    dk = gl.zeros([64, D], gl.float32, layout=kv_layout)
    dv = gl.zeros([64, D], gl.float32, layout=kv_layout)
    st_zero = gl.zeros([64, BLOCK_M], gl.float32, layout=st_layout)
    ragged = n0 + 128 > T  # keys >= T here are the next sequence's: masked, or dQ would see them
    return keys, cols, dk, dv, st_zero, ragged


@gluon.jit
def _bwd_warpgroup(wg, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, ds_smem, dq_smem, kv_bar, q_full,
                   q_empty, ds_full, ds_empty, dq_full, dq_empty, dK, dV, softmax_scale, stride_t, kv_base,
                   n0, lo, mid_lo, mid_hi, n_q, j0, n_steps, T, LEFT, RIGHT, desc_dk, desc_dv, kv_done, kv_row, kv_col):
    """Consumer warpgroup wg at head dim 128 (DQ_PARTS 2): keys n0 + 64 wg ... + 63 against every query
    block (tiles are transposed, keys along rows, so dK and dV come out as (keys, D)). dQ_i = dS K sums
    over both warpgroups' keys: at each step's end both meet at the dS^T buffer and each computes half of
    dQ_i's head dim. (Issued a step early, during the next softmax, that accumulator spills 1156 B; a step
    late at the step's end lost 3-9%; K in registers spills and ptxas serializes the wgmma:
    notes/flash_attn_bench.md, 2026-12-03 and 04.)"""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    D: gl.constexpr = q_ring.shape[2]
    KEYS: gl.constexpr = 64
    k_w = k_smem.slice(wg * KEYS, KEYS, dim=0)  # (64 keys, D)
    v_w = v_smem.slice(wg * KEYS, KEYS, dim=0)
    k_half = k_smem.slice(wg * (D // 2), D // 2, dim=1)  # (128 keys, D / 2): dQ_i's half is dS K_half
    keys, cols, dk, dv, st_zero, ragged = _bwd_consumer_setup(wg, n0, T, BLOCK_M, D)
    dq_zero = gl.zeros([BLOCK_M, D // 2], gl.float32, layout=_mma_layout(D // 2))
    qk_scale = softmax_scale * LOG2E
    mbarrier.wait(kv_bar, 0)
    for j in range(n_steps):
        s, start_m, q, do = _bwd_step_inputs(j, j0, q_ring, do_ring, q_full, n_q, lo)
        dv_tok, dk_tok, ds_t = _bwd_scores(k_w, v_w, q, do, lse_ring.index(s),
                                           delta_ring.index(s), dk, dv, st_zero, keys, cols, start_m, mid_lo,
                                           mid_hi, ragged, T, LEFT, RIGHT, softmax_scale, qk_scale)
        buf = j % 2
        phase = (j // 2) & 1
        _bwd_publish_ds(ds_t, wg, buf, phase, ds_smem, ds_full, ds_empty)
        mbarrier.wait(ds_full.index(buf), phase)  # both warpgroups' dS^T of this step
        dq_tok = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_half, dq_zero, use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok])
        mbarrier.arrive(q_empty.index(s), count=1)
        _bwd_dq_hand(wg, buf, phase, dq, dq_smem, ds_empty, dq_full, dq_empty)
    _bwd_epilogue(wg, dk, dv, k_w, v_w, kv_done, dK, dV, stride_t, kv_base, n0, T, desc_dk, desc_dv, kv_row, kv_col)


@gluon.jit
def _bwd_warpgroup_dq_turns(wg, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, ds_smem, dq_smem, kv_bar,
                            q_full, q_empty, ds_full, ds_empty, dq_full, dq_empty, dK, dV, softmax_scale, stride_t,
                            kv_base, n0, lo, mid_lo, mid_hi, n_q, j0, n_steps, T, LEFT, RIGHT, desc_dk, desc_dv,
                            kv_done, kv_row, kv_col):
    """_bwd_warpgroup at head dim 64 (DQ_PARTS 1), where shared memory's bandwidth, not the tensor cores,
    bounds a step (counted, two warpgroups moved about 210 KB a step through it, 1,600 clocks at 128 B a
    clock, for 1,300 clocks of matmuls; shrinking the dQ matmul to 1/8 sped a step up 10-18%):
      - K and V are the A operands of S^T and dP^T from registers (32 KB a step less; H200 +5-8%);
      - dQ_i = dS K over all of the head dim is one warpgroup's, in turns: warpgroup (j + 1) % 2 issues
        step j's in step j + 1 after that step's dV and dK (its accumulator is not live through the
        softmax, where it spills). It reads dS and K once (32 KB) where two halves read dS twice (48 KB),
        and the other warpgroup does not wait for the meeting point: H200 +2-5% (notes/flash_attn_bench.md,
        2026-12-04)."""
    BLOCK_M: gl.constexpr = q_ring.shape[1]
    D: gl.constexpr = q_ring.shape[2]
    KEYS: gl.constexpr = 64
    gl.static_assert(D <= 64 and BLOCK_M == 64, "registers for K and V, and dQ_i in dK's layout")
    st_layout: gl.constexpr = _mma_layout(BLOCK_M)  # S^T, dP^T: (keys, queries)
    kv_layout: gl.constexpr = _mma_layout(D)  # dK, dV: (keys, D); dQ_i: (queries, D)
    kv_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2)
    k_w = k_smem.slice(wg * KEYS, KEYS, dim=0)  # (64 keys, D)
    v_w = v_smem.slice(wg * KEYS, KEYS, dim=0)
    keys, cols, dk, dv, st_zero, ragged = _bwd_consumer_setup(wg, n0, T, BLOCK_M, D)
    dq_zero = gl.zeros([BLOCK_M, D], gl.float32, layout=kv_layout)
    qk_scale = softmax_scale * LOG2E
    mbarrier.wait(kv_bar, 0)
    k_a = k_w.load(kv_a)
    v_a = v_w.load(kv_a)
    for j in range(n_steps):
        s, start_m, q, do = _bwd_step_inputs(j, j0, q_ring, do_ring, q_full, n_q, lo)
        dv_tok, dk_tok, ds_t = _bwd_scores(k_a, v_a, q, do, lse_ring.index(s),
                                           delta_ring.index(s), dk, dv, st_zero, keys, cols, start_m, mid_lo,
                                           mid_hi, ragged, T, LEFT, RIGHT, softmax_scale, qk_scale)
        _bwd_publish_ds(ds_t, wg, j % 2, (j // 2) & 1, ds_smem, ds_full, ds_empty)
        if (j + 1) % 2 == wg:  # step j - 1's dQ is this warpgroup's (at j = 0 a product thrown away)
            pbuf = (j + 1) % 2
            pphase = ((j + 3) // 2) & 1  # step j - 1's phase, and 1 at j = 0: the wait passes at once
            mbarrier.wait(ds_full.index(pbuf), pphase)
            dq_tok = warpgroup_mma(ds_smem.index(pbuf).permute((1, 0)), k_smem, dq_zero, use_acc=False,
                                   is_async=True)
            dv, dk, dq = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok])
            mbarrier.arrive(q_empty.index(s), count=1)
            if j > 0:
                _bwd_dq_hand(0, pbuf, pphase, dq, dq_smem, ds_empty, dq_full, dq_empty)
        else:
            dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok])
            mbarrier.arrive(q_empty.index(s), count=1)
    last = n_steps - 1
    if (last >= 0) & (last % 2 == wg):  # the last step's dQ
        buf = last % 2
        phase = (last // 2) & 1
        mbarrier.wait(ds_full.index(buf), phase)
        dq = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_smem, dq_zero, use_acc=False)
        _bwd_dq_hand(0, buf, phase, dq, dq_smem, ds_empty, dq_full, dq_empty)
    _bwd_epilogue(wg, dk, dv, k_w, v_w, kv_done, dK, dV, stride_t, kv_base, n0, T, desc_dk, desc_dv, kv_row, kv_col)


@gluon.jit
def _bwd_epilogue(wg, dk, dv, k_w, v_w, kv_done, dK, dV, stride_t, kv_base, n0, T, desc_dk, desc_dv, kv_row, kv_col):
    """dK, dV (64 keys, D) of consumer warpgroup wg out, through K's and V's buffers by TMA stores
    where the 64 keys are this sequence's, as the forward's O; float32 partial sums (dK, dV pointing at
    them) by plain stores."""
    KEYS: gl.constexpr = 64
    D: gl.constexpr = k_w.shape[1]
    dtype: gl.constexpr = k_w.dtype
    kv_layout: gl.constexpr = _mma_layout(D)
    r0 = n0 + wg * KEYS
    mbarrier.arrive(kv_done, count=1)
    if dK.dtype.element_ty == gl.float32:  # partial sums
        by_tma = False
    else:  # where the 64 keys are this sequence's (the backward is 1-10% faster so at 128: notes/flash_attn_bench.md)
        by_tma = r0 + KEYS <= T
    if by_tma:
        v_w.store(dv.to(dtype))  # only this warpgroup read these rows of V
        mbarrier.wait(kv_done, 0)  # both warpgroups' last dQ matmuls, which read every row of K, are done
        k_w.store(dk.to(dtype))
        fence_async_shared()
        _thread_barrier()
        _tma_store(desc_dv, [kv_row + r0, kv_col], v_w)
        _tma_store(desc_dk, [kv_row + r0, kv_col], k_w)
        tma.store_wait(pendings=0)
    else:
        rows = gl.arange(0, KEYS, layout=gl.SliceLayout(1, kv_layout))
        cols_d = gl.arange(0, D, layout=gl.SliceLayout(0, kv_layout))
        offs = gl.expand_dims(rows * stride_t, 1) + gl.expand_dims(cols_d, 0)  # 32-bit, from a 64-bit base
        base = kv_base + r0.to(gl.int64) * stride_t
        mask = gl.expand_dims(r0 + rows < T, 1)
        gl.store(dK + base + offs, dk.to(dK.dtype.element_ty), mask=mask)
        gl.store(dV + base + offs, dv.to(dV.dtype.element_ty), mask=mask)


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "HEADS"])
def _bwd_kernel(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, desc_dk, desc_dv, dK, dV,
                softmax_scale, stride_b, stride_t, stride_h, T, T_pad, H_KV, GROUP, LEFT, RIGHT, HEADS, SPLITS,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, DQ_PARTS: gl.constexpr,
                GDC: gl.constexpr = False):
    # a 1D grid of (key blocks) x (B * H_KV * SPLITS) programs in _tile_order (HEADS of those at a time, the
    # SPLITS parts of a kv head together); causal: the first key blocks, which the most query blocks see,
    # are the longest and start first
    pid_n, part = _tile_order(gl.cdiv(T, BLOCK_N), HEADS)
    _bwd_program(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, desc_dk, desc_dv, dK, dV,
                 softmax_scale, stride_b, stride_t, stride_h, T, T_pad, H_KV, GROUP, LEFT, RIGHT, pid_n,
                 part // SPLITS, part % SPLITS, SPLITS, BLOCK_M, BLOCK_N, STAGES, DQ_PARTS, GDC)


@gluon.jit
def _bwd_program(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, desc_dk, desc_dv, dK, dV,
                 softmax_scale, stride_b, stride_t, stride_h, T, T_pad, H_KV, GROUP, LEFT, RIGHT, pid_n, bhk,
                 split, SPLITS, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 DQ_PARTS: gl.constexpr, GDC: gl.constexpr):
    """Key block pid_n of (batch, kv head) bhk: two consumer warpgroups of 64 keys, the loader warp
    and the dQ writer warp. DQ_PARTS 2: each warpgroup computes half of dQ_i's head dim at every step
    (_bwd_warpgroup); 1: one warpgroup all of it, in turns (_bwd_warpgroup_dq_turns). The block's steps
    (query blocks of each query head of the group) in SPLITS near-equal parts, of which this program takes
    part `split`; with more than one, dK and dV are float32 partial sums, head split * H_KV + hk of
    (B, T, SPLITS * H_KV, D) (backward's _splits_for)."""
    b, hk = bhk // H_KV, bhk % H_KV
    n0 = pid_n * BLOCK_N
    dtype: gl.constexpr = desc_q.dtype
    D: gl.constexpr = desc_q.block_type.shape[1]
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, D], desc_v.layout)
    q_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], desc_q.layout)
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, D], desc_do.layout)
    lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], desc_lse.layout)
    delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], desc_delta.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M],  # dS^T of both warpgroups
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    dq_smem = gl.allocate_shared_memory(gl.float32, [2 * DQ_PARTS, BLOCK_M, D // DQ_PARTS],  # [PARTS buffer + part]
                                        desc_dq.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(kv_done, count=2)
    for s in gl.static_range(STAGES):
        mbarrier.init(q_full.index(s), count=1)
        mbarrier.init(q_empty.index(s), count=2)  # released by both warpgroups
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=2)
        mbarrier.init(ds_empty.index(i), count=DQ_PARTS)  # released by the warpgroups whose dQ read it
        mbarrier.init(dq_full.index(i), count=DQ_PARTS)
        mbarrier.init(dq_empty.index(i), count=1)  # released by the writer
    _wait_for_inputs(GDC)
    # the query rows that see these keys: the transpose of the forward's band (LEFT <-> RIGHT)
    lo, mid_lo, mid_hi, hi = _block_range(n0, T, T, RIGHT, LEFT, None, 0, BLOCK_N, BLOCK_M, False)
    n_q = gl.cdiv(hi - lo, BLOCK_M)
    j0 = split * (GROUP * n_q) // SPLITS  # this program's steps: j0 .. j0 + n_steps - 1
    n_steps = (split + 1) * (GROUP * n_q) // SPLITS - j0
    h0 = hk * GROUP  # grouped-query: the query heads h0 .. h0 + GROUP - 1 share this kv head
    consumer = (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, ds_smem, dq_smem, kv_bar, q_full, q_empty,
                ds_full, ds_empty, dq_full, dq_empty, dK, dV, softmax_scale, stride_t,
                b.to(gl.int64) * stride_b + (split * H_KV + hk) * stride_h, n0, lo, mid_lo, mid_hi, n_q, j0, n_steps,
                T, LEFT, RIGHT, desc_dk, desc_dv, kv_done, b * T, hk * D)
    loader = (desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, k_smem, v_smem, q_ring, do_ring, lse_ring,
              delta_ring, kv_bar, q_full, q_empty, b * T + n0, hk * D, b * T, h0, j0, n_steps, lo, n_q,
              (b * H_KV * GROUP + h0) * T_pad, T_pad)
    writer = (desc_dq, dq_smem, dq_full, dq_empty, b * T, h0, lo, n_q, j0, n_steps)
    if DQ_PARTS == 2:
        gl.warp_specialize([(_bwd_warpgroup, (0, ) + consumer), (_bwd_warpgroup, (1, ) + consumer),
                            (_bwd_loader, loader), (_bwd_dq_writer, writer)],
                           [4, 1, 1], [COMPUTE_REGS, LOADER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([(_bwd_warpgroup_dq_turns, (0, ) + consumer), (_bwd_warpgroup_dq_turns, (1, ) + consumer),
                            (_bwd_loader, loader), (_bwd_dq_writer, writer)],
                           [4, 1, 1], [COMPUTE_REGS, LOADER_REGS, LOADER_REGS])


# --------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def _layout(block, dtype):
    """The shared-memory layout (swizzle) of a TMA block; cached: descriptors are built on every call."""
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


def _desc(x, rows, cols=None):
    """TMA descriptor over (B, T, H, D) seen as 2D (B*T, H*D), block (rows, cols or D)."""
    B, T, H, D = x.shape
    block = (rows, cols or D)
    return flash_attn.descriptor(TensorDescriptor, x, [B * T, H * D], [H * D, 1], list(block), _layout(block, x.dtype))


def _stat_desc(x, block):
    """1D TMA descriptor over a float32 (B, H, T_pad) statistic: lse or delta."""
    return flash_attn.descriptor(TensorDescriptor, x, [x.numel()], [1], [block], _layout((block,), x.dtype))


def _heads_at_a_time(l2_bytes, unit_bytes, heads, unit=1):
    """_tile_order's HEADS: as many units of `unit` heads as have their streamed tiles (unit_bytes each)
    fit in l2_bytes; at least one unit, at most all heads (the last group also takes the heads left over)."""
    return min(heads, unit * max(1, l2_bytes // unit_bytes))


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def forward(q, k, v, causal, scale, left, right, T_pad, tile=None, l2_bytes=L2_GROUP_BYTES):
    """out, lse (B, H, T_pad) in log2 units, as flash_attn._forward. tile: (query rows, key rows,
    K/V ring slots, Q slots) and l2_bytes: others than FWD_TILES' and L2_GROUP_BYTES only in
    notes/hopper_variants.py."""
    B, T, H, D = q.shape
    bm, bn, stages, q_stages = tile or _fwd_tile_for(T, D)
    out = flash_attn._empty((B, T, H, D), q.dtype, q.device)  # contiguous, as the kernel writes it
    lse = flash_attn._empty((B, H, T_pad), torch.float32, q.device)
    group = H // k.shape[2]
    heads = _heads_at_a_time(l2_bytes, 4 * T * D, B * H, group)  # a kv head's K, V: 2 x 2 x T x D bytes
    n_m = triton.cdiv(T, bm)
    counter = _tile_counter(q.device.index)
    flash_attn._run(
        _fwd_kernel, (min(_sm_count(q.device.index), n_m * B * H), ),
        _desc(q, 64), _desc(k, bn), _desc(v, bn), _desc(out, 64), out, lse, counter, scale, T, T_pad, H, group,
        left, right, heads, n_m, n_m * B * H, IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages,
        Q_STAGES=q_stages, key=(*flash_attn._shapes_key(q, k, None, None, T_pad, left, right), heads),
        **flash_attn._dependent_launch(q.device), **COMPILE_OPTIONS)
    return out, lse


_COUNTERS = {}  # (device, stream) -> _fwd_kernel's tile counter


def _tile_counter(index):
    """A zeroed int32 on GPU index for _fwd_kernel's tile counter, which every launch leaves at zero
    again: one per device and stream, as the kernels of a stream run one after another (no fill
    kernel per call). While a CUDA graph is captured a fresh one, zeroed in the graph, so that
    replays share nothing with calls outside it."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, device=f"cuda:{index}", dtype=torch.int32)
    key = (index, torch._C._cuda_getCurrentRawStream(index))
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, device=f"cuda:{index}", dtype=torch.int32)
        flash_attn._KEPT_TENSORS[id(counter)] = counter  # (replays use it as it is)
    return counter


def _fwd_tile_for(T, D):
    """FWD_TILES' tile, FWD_TILES_LONG's from FWD_LONG_SEQLEN tokens."""
    return FWD_TILES_LONG[D] if T >= FWD_LONG_SEQLEN and D in FWD_TILES_LONG else FWD_TILES[D]


def _splits_for(programs, steps, sms):
    """How many programs share each key block's steps in a causal backward (_bwd_program): as many as keep
    the programs within BWD_SPLIT_WAVES waves on sms SMs, at most BWD_MAX_SPLITS, none with fewer than
    BWD_MIN_STEPS of the longest block's `steps`; at least 1."""
    return max(1, min(BWD_MAX_SPLITS, BWD_SPLIT_WAVES * sms // programs, steps // BWD_MIN_STEPS))


def backward(do, q, k, v, out, lse, scale, left, right, tile=None, l2_bytes=L2_GROUP_BYTES, splits=None):
    """dq, dk, dv from either forward's out and lse, do and out with q's strides, as
    flash_attn._backward. tile: (query rows, key rows, ring slots, dQ_i's parts), l2_bytes and splits:
    others than BWD_TILES', L2_GROUP_BYTES and _splits_for's only in tests and notes/ scripts."""
    B, T, H, D = q.shape
    H_kv = k.shape[2]
    T_pad = lse.shape[-1]
    bm, bn, stages, dq_parts = tile or BWD_TILES[D]
    programs = triton.cdiv(T, bn) * B * H_kv
    causal = min(left, right) == 0 and max(left, right) >= T  # (or its mirror): blocks of very unequal lengths
    if splits is None:
        splits = _splits_for(programs, H // H_kv * triton.cdiv(T, bm), _sm_count(q.device.index)) if causal else 1
    dk, dv = (flash_attn._empty(x.shape, x.dtype, x.device) for x in (k, v))
    # split: float32 partial sums (B, T, splits x kv heads, D) that _cast adds up
    dk_part, dv_part = dk, dv
    if splits > 1:
        dk_part, dv_part = (flash_attn._empty((B, T, splits * H_kv, D), torch.float32, q.device) for _ in range(2))
    dq = flash_attn._empty((B, T, H, D), torch.float32, q.device)  # zeroed with delta, then TMA reductions
    # a kv head's query heads' Q, dO (each of its parts streams a share)
    heads = _heads_at_a_time(l2_bytes, 4 * T * D * (H // H_kv), B * H_kv * splits, splits)
    key = (*flash_attn._shapes_key(q, k, do, None, T_pad, left, right), heads, splits)
    delta = flash_attn._delta(out, do, T_pad, key, zero_dq=dq)
    flash_attn._run(
        _bwd_kernel, (programs * splits, ),
        _desc(q, bm), _desc(k, bn), _desc(v, bn), _desc(do, bm), _desc(dq, bm, D // dq_parts),
        _stat_desc(lse, bm), _stat_desc(delta, bm), _desc(dk, 64), _desc(dv, 64), dk_part, dv_part, scale,
        dk_part.stride(0), dk_part.stride(1), dk_part.stride(2), T, T_pad, H_kv, H // H_kv, left, right, heads,
        splits, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, DQ_PARTS=dq_parts, key=key,
        **flash_attn._dependent_launch(q.device), **COMPILE_OPTIONS)
    dq_out = flash_attn._empty(q.shape, q.dtype, q.device)
    flash_attn._run(flash_attn._cast, (triton.cdiv(dq.numel(), CAST_BLOCK), ), dq, dq_out, dq.numel(), 1,
                    BLOCK=CAST_BLOCK, **flash_attn._dependent_launch(q.device))
    if splits > 1:
        for part, whole in ((dk_part, dk), (dv_part, dv)):
            flash_attn._run(flash_attn._cast, (triton.cdiv(whole.numel(), CAST_BLOCK), ), part, whole, whole.numel(),
                            H_kv * D, BLOCK=CAST_BLOCK, PARTS=splits, **flash_attn._dependent_launch(q.device))
    return dq_out, dk, dv
