"""FlashAttention-3's clusters (arXiv 2407.08608) for flash_attn_hopper's forward: two CTAs share each
K/V tile by TMA multicast, so that the forward reads K and V from L2 half as often. Measured, not shipped.

    PYTHONPATH=<Triton >= 3.8> python notes/fwd_cluster.py                  # GPU: check, then TFLOP/s
    python notes/fwd_cluster.py --compile-only                              # CPU: sm_90a compile, ptxas -v

Why: halving the forward's K/V reads (hopper_ablations.py's halfkv) bought 8-14% at head dim 128, and
multicast halves the reads without costing a 64-key block. Gluon has multicast from Triton 3.7, but 3.7's
barriers shared by a cluster arrive locally only (the other CTA's release never reaches the lead), so 3.8.
The lent GPU has Triton 3.6 and no network: the 3.8 wheel (cp312, libtriton stripped, xz: 49 MB) went
along as a carried file.

The kernel is flash_attn_hopper._fwd_kernel written for a cluster (num_ctas=2, Gluon's CGA layouts):
a tile is 256 query rows, each consumer warpgroup 128 of them, 64 in each CTA (cga_layout [[1, 0]]:
the rows split), so both CTAs of a causal tile see the same key blocks; K and V are whole in each CTA
(cga_layout [[0, 0]]) and the lead CTA loads them for both (multicast=True). Two things Gluon does
not do inside warp_specialize: its atomics in a cluster kernel synchronize the cluster, so the tile
counter is inline PTX (_atom) in the lead, which passes each tile to the other CTA (_pass_tile); and
Triton 3.8 ends a warp-specialized cluster kernel without a cluster barrier, so a CTA could leave while
the other still arrived on its barriers (unspecified launch failures, at 33 clusters and more): one is
added (3.9's PTX has two cluster barriers more than 3.8's without it, likely the same fix).

Measured (1x H200, torch 2.11, Triton 3.8.0, 2026-12-04; notes/flash_attn_bench.md): the float64
check passes (ragged, grouped heads, both masks); against the shipped forward compiled by the same Triton,
interleaved, two runs: full +1 to +4% (1k-16k), causal -2 to -4% at 1-2k, -1 to +3% at 4-16k. A fraction
of what halving the reads bought in the ablation: the SM's own intake (each CTA still receives every
K/V tile) or the lockstep of two CTAs on each slot takes most of it. Not shipped for that, and because
the lent GPU's Triton cannot compile it. (Timed as a prototype; this file differs from it in names, state
kept per device and the cluster count asked of the driver after the first launch, and was compiled, not
run, after those edits: no GPU time was left.)
"""
import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402

if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8):  # barriers shared by a cluster
    sys.exit(f"notes/fwd_cluster.py needs Triton 3.8 or later (this is {triton.__version__}): "
             "PYTHONPATH=<a Triton 3.8 install> python notes/fwd_cluster.py")
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (cluster, fence_async_shared, mbarrier,  # noqa: E402
                                                             tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

import flash_attn  # noqa: E402
import flash_attn_hopper as fh  # noqa: E402
from flash_attn_hopper import (COMPUTE_REGS, LOADER_REGS, LOG2E, _fwd_tile, _online_softmax,  # noqa: E402
                               _thread_barrier, _tma_load, _tma_store)

SPLIT = [[1, 0]]  # cga_layout: a tile's rows split over the cluster's two CTAs (Q, O, S)
WHOLE = [[0, 0]]  # cga_layout: the whole tile in both CTAs (K, V: multicast)


@triton.constexpr_function
def _mma_layout(N):
    """wgmma accumulator layout of a (128, N) tile: 64 rows on each CTA's warpgroup."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16], cga_layout=SPLIT)


@gluon.jit
def _atom(ptr, val, OP: gl.constexpr):
    """One lane of the (one-warp) caller does atom.global.OP on *ptr; every lane gets the old value.
    (Gluon's own atomics in a cluster kernel synchronize the whole cluster: not inside warp_specialize.)"""
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 l; mov.u32 l, %laneid; setp.eq.u32 p, l, 0; mov.u32 $0, 0; "
        "@p atom.global.gpu." + OP + " $0, [$1], $2; shfl.sync.idx.b32 $0, $0, 0, 0x1f, 0xffffffff; }",
        "=r,l,r", [ptr, val], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _cta_rank(x):
    """This CTA's rank in its cluster (x: any scalar; the inline assembly needs an operand)."""
    return gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [x], dtype=gl.int32, is_pure=True,
                                     pack=1)


@gluon.jit
def _publish_tile(tile_smem, tile_full, tile_empty, j, t):
    """flash_attn_hopper._publish_tile in this CTA's shared memory (each CTA keeps its own copy of t)."""
    s = j % 2
    mbarrier.wait(tile_empty.index(s), ((j // 2) & 1) ^ 1)
    tile_smem.index(s).store(gl.full([1], t, gl.int32, layout=gl.BlockedLayout([1], [32], [1], [0], cga_layout=[[0]])))
    mbarrier.arrive(tile_full.index(s))


@gluon.jit
def _read_tile(tile_smem, tile_full, tile_empty, j):
    """flash_attn_hopper._read_tile, likewise."""
    s = j % 2
    mbarrier.wait(tile_full.index(s), (j // 2) & 1)
    t = gl.max(tile_smem.index(s).load(gl.BlockedLayout([1], [32], [4], [0], cga_layout=[[0]])), axis=0)
    mbarrier.arrive(tile_empty.index(s))
    return t


@gluon.jit
def _pass_tile(Mailbox, j, t, lead):
    """The lead CTA's loader hands tile t (the cluster's j-th) to the other CTA's through two slots in
    global memory, -1 when empty: the lead waits until the other has taken tile j - 2 (as the kernel's
    loaders are coupled by the K/V slots, it may be two tiles ahead), the other until tile j is there."""
    slot = Mailbox + 2 * gl.program_id(0) + j % 2
    if lead:
        while _atom(slot, 0, "add.u32") != -1:  # the other CTA has taken tile j - 2
            pass
        _atom(slot, t, "exch.b32")
    else:
        t = _atom(slot, -1, "exch.b32")
        while t == -1:
            t = _atom(slot, -1, "exch.b32")
    return t


@gluon.jit
def _fwd_loader(desc_q, desc_k, desc_v, q_smem, o_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty,
                v_empty, k_free, v_free, tile_smem, tile_full, tile_empty, Counter, Mailbox, T, H, GROUP, LEFT, RIGHT,
                HEADS, n_m, n_tiles, IS_CAUSAL: gl.constexpr):
    """flash_attn_hopper._fwd_loader in each CTA: its own 64 rows of each warpgroup's Q; K_i and V_i
    once its own consumers released the slot (k_free: its expect belongs to the next phase) and, in
    the lead CTA, the other's too (k_empty), then one multicast copy by the lead into both CTAs. The
    lead alone takes tiles from the counter and passes them on (_pass_tile)."""
    W: gl.constexpr = o_smem.shape[0]
    Q_STAGES: gl.constexpr = q_smem.shape[0] // W
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    lead = _cta_rank(n_tiles) == 0
    it = 0
    j = 0
    t = gl.program_id(0)
    while t < n_tiles:
        _publish_tile(tile_smem, tile_full, tile_empty, j, t)
        b, h, bh, m0, lo, mid_lo, mid_hi, n_blocks = _fwd_tile(t, n_tiles, n_m, HEADS, H, T, LEFT, RIGHT, IS_CAUSAL,
                                                               W * ROWS, BLOCK_N)
        for w in gl.static_range(W):
            q_slot = j % Q_STAGES * W + w
            mbarrier.wait(q_empty.index(q_slot), ((j // Q_STAGES) & 1) ^ 1)
            mbarrier.expect(q_bars.index(q_slot), desc_q.nbytes_per_cta)
            _tma_load(desc_q, [b * T + m0 + w * ROWS, h * D], q_bars.index(q_slot), q_smem.index(q_slot))
        for i in range(n_blocks):
            c = it + i
            s = c % STAGES
            released = ((c // STAGES) & 1) ^ 1
            row = b * T + lo + i * BLOCK_N
            mbarrier.wait(k_free.index(s), released)  # this CTA's consumers are done with the slot
            mbarrier.expect(k_full.index(s), desc_k.nbytes_per_cta)
            mbarrier.wait(k_empty.index(s), released)  # the lead only: so are the other CTA's
            _tma_load(desc_k, [row, (h // GROUP) * D], k_full.index(s), k_ring.index(s), multicast=True)
            mbarrier.wait(v_free.index(s), released)
            mbarrier.expect(v_full.index(s), desc_v.nbytes_per_cta)
            mbarrier.wait(v_empty.index(s), released)
            _tma_load(desc_v, [row, (h // GROUP) * D], v_full.index(s), v_ring.index(s), multicast=True)
        it += n_blocks
        j += 1
        fetched = 0
        if lead:
            fetched = _atom(Counter, 1, "add.u32")
            if fetched == n_tiles - 1:
                _atom(Counter, 0, "exch.b32")
        t = _pass_tile(Mailbox, j, gl.num_programs(0) + fetched, lead)
    _publish_tile(tile_smem, tile_full, tile_empty, j, t)


@gluon.jit
def _fwd_warpgroup(wg, q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, k_free, v_free,
                   o_smem, desc_o, tile_smem, tile_full, tile_empty, Out, Lse, softmax_scale, T, T_pad, H, LEFT, RIGHT,
                   HEADS, n_m, n_tiles, IS_CAUSAL: gl.constexpr):
    """flash_attn_hopper._fwd_warpgroup for 128 query rows, 64 in each CTA (the layouts' cga_layout);
    each K/V slot released to this CTA's loader (k_free) and to the lead's (k_empty)."""
    W: gl.constexpr = o_smem.shape[0]
    Q_STAGES: gl.constexpr = q_smem.shape[0] // W
    ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    s_layout: gl.constexpr = _mma_layout(BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    qk_scale = softmax_scale * LOG2E
    it = 0
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
        mbarrier.arrive(k_free.index(first))
        mbarrier.arrive(k_empty.index(first))
        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, rows, lo + cols, (lo < mid_lo) | (lo >= mid_hi),
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
            mbarrier.arrive(k_free.index(s))
            mbarrier.arrive(k_empty.index(s))
            p_new, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, rows, start_n + cols,
                                                     (start_n < mid_lo) | (start_n >= mid_hi), T, LEFT, RIGHT,
                                                     qk_scale)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(v_free.index(prev))
            mbarrier.arrive(v_empty.index(prev))
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p = gl.convert_layout(p_new.to(dtype), p_layout)
        mbarrier.arrive(q_empty.index(q_slot))
        c = it + n_blocks - 1
        last = c % STAGES
        mbarrier.wait(v_full.index(last), (c // STAGES) & 1)
        acc = warpgroup_mma(p, v_ring.index(last), acc)
        mbarrier.arrive(v_free.index(last))
        mbarrier.arrive(v_empty.index(last))

        valid = rows < T
        l_i = gl.where(valid, l_i, 1.0)
        gl.store(Lse + bh.to(gl.int64) * T_pad + rows, gl.where(valid, m_i + gl.log2(l_i), float("inf")),
                 mask=rows < T_pad)
        out = acc / gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
        if r0 + ROWS <= T:
            tma.store_wait(pendings=0)
            _thread_barrier()
            o_smem.index(wg).store(out.to(dtype))
            fence_async_shared()
            _thread_barrier()
            _tma_store(desc_o, [b * T + r0, h * D], o_smem.index(wg))
        else:
            stride_ot = H * D + t // n_tiles
            rows_o = gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
            cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            offs = gl.expand_dims(rows_o * stride_ot, 1) + gl.expand_dims(cols_o, 0)
            base = (b * T + r0).to(gl.int64) * (H * D) + h * D
            gl.store(Out + base + offs, out.to(dtype), mask=gl.expand_dims(r0 + rows_o < T, 1))
        it += n_blocks
        j += 1
        t = _read_tile(tile_smem, tile_full, tile_empty, j)
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "HEADS", "n_m", "n_tiles"])
def _fwd_cluster_kernel(desc_q, desc_k, desc_v, desc_o, Out, Lse, Counter, Mailbox, softmax_scale, T, T_pad, H, GROUP,
                        LEFT, RIGHT, HEADS, n_m, n_tiles, IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_STAGES: gl.constexpr):
    """flash_attn_hopper._fwd_kernel's schedule for a cluster of two CTAs (the module docstring):
    n_tiles = n_m blocks of 256 query rows x B * H, each cluster's two warpgroups on 128 rows apiece."""
    dtype: gl.constexpr = desc_q.dtype
    D: gl.constexpr = desc_k.block_type.shape[1]
    W: gl.constexpr = 2
    ROWS: gl.constexpr = desc_q.block_type.shape[0]  # 128: 64 on each CTA
    q_smem = gl.allocate_shared_memory(dtype, [Q_STAGES * W, ROWS, D], desc_q.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_k.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], desc_v.layout)
    o_smem = gl.allocate_shared_memory(dtype, [W, ROWS, D], desc_o.layout)
    q_bars = mbarrier.allocate_mbarrier(batch=Q_STAGES * W)
    q_empty = mbarrier.allocate_mbarrier(batch=Q_STAGES * W)
    k_full = mbarrier.allocate_mbarrier(batch=STAGES)
    v_full = mbarrier.allocate_mbarrier(batch=STAGES)
    k_free = mbarrier.allocate_mbarrier(batch=STAGES)
    v_free = mbarrier.allocate_mbarrier(batch=STAGES)
    k_empty = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=True)  # on the lead CTA, both CTAs arrive
    v_empty = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=True)
    tile_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0], cga_layout=[[0]]))
    tile_full = mbarrier.allocate_mbarrier(batch=2)
    tile_empty = mbarrier.allocate_mbarrier(batch=2)
    for s in gl.static_range(2):
        mbarrier.init(tile_full.index(s), count=1)
        mbarrier.init(tile_empty.index(s), count=W)
    for w in gl.static_range(Q_STAGES * W):
        mbarrier.init(q_bars.index(w), count=1)
        mbarrier.init(q_empty.index(w), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_full.index(s), count=1)
        mbarrier.init(v_full.index(s), count=1)
        mbarrier.init(k_free.index(s), count=W)
        mbarrier.init(v_free.index(s), count=W)
        mbarrier.init(k_empty.index(s), count=W)  # x 2 CTAs
        mbarrier.init(v_empty.index(s), count=W)
    consumer = (q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, k_free, v_free, o_smem,
                desc_o, tile_smem, tile_full, tile_empty, Out, Lse, softmax_scale, T, T_pad, H, LEFT, RIGHT, HEADS,
                n_m, n_tiles, IS_CAUSAL)
    loader = (desc_q, desc_k, desc_v, q_smem, o_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty,
              v_empty, k_free, v_free, tile_smem, tile_full, tile_empty, Counter, Mailbox, T, H, GROUP, LEFT, RIGHT,
              HEADS, n_m, n_tiles, IS_CAUSAL)
    gl.warp_specialize([(_fwd_warpgroup, (0, ) + consumer), (_fwd_warpgroup, (1, ) + consumer),
                        (_fwd_loader, loader)], [4, 1], [COMPUTE_REGS, LOADER_REGS])
    # no CTA leaves while the other may still arrive on its barriers (Triton 3.8 adds this only without
    # warp_specialize)
    if hasattr(cluster, "barrier"):  # Triton 3.9
        cluster.barrier()
    else:
        cluster.arrive()
        cluster.wait()


# --------------------------------------------------------------------------- host side
_STATE = {}  # device -> (tile counter, mailbox, clusters that fit at once)


def forward(q, k, v, causal, scale, left, right, T_pad, l2_bytes=fh.L2_GROUP_BYTES):
    """out, lse as flash_attn_hopper.forward, head dim 128, 16-bit, on Hopper with Triton >= 3.8."""
    B, T, H, D = q.shape
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_pad), dtype=torch.float32, device=q.device)
    group = H // k.shape[2]
    heads = fh._heads_at_a_time(l2_bytes, 4 * T * D, B * H, group)
    n_m = triton.cdiv(T, 256)
    n_tiles = n_m * B * H
    sms = fh._sm_count(q.device.index)
    state = _STATE.setdefault(q.device.index, {
        "counter": torch.zeros(1, device=q.device, dtype=torch.int32),  # left at 0 by every launch
        "mailbox": torch.full((sms, 2), -1, device=q.device, dtype=torch.int32)})  # left at -1
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]

    def desc(x, cga):
        x2 = x.view(x.shape[0] * x.shape[1], x.shape[2] * x.shape[3])
        layout = gl.NVMMASharedLayout.get_default_for([128, D], gl_dtype, cga_layout=cga)
        return TensorDescriptor(x2, list(x2.shape), [x2.stride(0), 1], [128, D], layout)
    clusters = min(state.get("clusters", 1), n_tiles)  # the first launch: one, to ask what fits
    compiled = _fwd_cluster_kernel[(clusters, )](
        desc(q, SPLIT), desc(k, WHOLE), desc(v, WHOLE), desc(out, SPLIT), out, lse, state["counter"],
        state["mailbox"], scale, T, T_pad, H, group, left, right, heads, n_m, n_tiles, IS_CAUSAL=causal,
        BLOCK_M=256, BLOCK_N=128, STAGES=2, Q_STAGES=2, num_warps=4, num_ctas=2, **flash_attn.FP_FUSION)
    if "clusters" not in state:  # persistent clusters: as many as are resident at once (H200: 66)
        compiled._init_handles()
        state["clusters"] = triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters(
            compiled.function, compiled.metadata.shared, 2)
    return out, lse


def compile_only():
    """Compile for sm_90a here (no GPU): shared memory, spills, wgmma pipelined or not."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from hopper_variants import ptxas_report

    def desc(cga):
        layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.bfloat16, cga_layout=cga)
        return f"tensordesc<bf16[128, 128],{layout!r}>"
    sig = {"desc_q": desc(SPLIT), "desc_k": desc(WHOLE), "desc_v": desc(WHOLE), "desc_o": desc(SPLIT), "Out": "*bf16",
           "Lse": "*fp32", "Counter": "*i32", "Mailbox": "*i32", "softmax_scale": "fp32"}
    consts = dict(IS_CAUSAL=True, BLOCK_M=256, BLOCK_N=128, STAGES=2, Q_STAGES=2)
    for arg in _fwd_cluster_kernel.arg_names:
        sig.setdefault(arg, "constexpr" if arg in consts else "i32")
    k = triton.compile(GluonASTSource(_fwd_cluster_kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_ctas=2, **flash_attn.FP_FUSION))
    _, spill, wgmma = ptxas_report(k)
    print(f"cluster forward D=128: smem {k.metadata.shared} B, spill stores {spill} B, "
          f"{k.asm['ptx'].count('multicast::cluster')} multicast copies, {wgmma}")


def main():
    """The float64 check, then the shipped forward and this one against SDPA cuDNN (hopper_variants)."""
    import hopper_variants as hv
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    shipped = hv.forward

    def either(q, k, v, causal, tile, l2_bytes=fh.L2_GROUP_BYTES):
        if tile != "cluster":
            return shipped(q, k, v, causal, tile, l2_bytes)
        T, D = q.shape[1], q.shape[3]
        left, right = flash_attn._window(causal, None, T, T)
        return forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T), l2_bytes)
    hv.forward = either  # hv.check and hv.time_direction call it
    variants = [("kept", 128, fh.FWD_TILES[128], fh.L2_GROUP_BYTES), ("cluster", 128, "cluster", fh.L2_GROUP_BYTES)]
    hv.time_direction("forward", variants, hv.check, args.rounds, (True, False))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90a here, no GPU needed")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, the variants interleaved in each")
    args = p.parse_args()
    if args.compile_only:
        compile_only()
    else:
        main()
