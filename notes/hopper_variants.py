"""Variants of flash_attn_hopper's forward, checked and timed in one GPU call, or compiled for sm_90a
on any machine (--compile-only: shared memory, spills, whether ptxas kept wgmma pipelined).

    python notes/hopper_variants.py                  # GPU: correctness, then TFLOP/s against SDPA cuDNN
    python notes/hopper_variants.py --compile-only   # CPU: Triton's sm_90a compile and ptxas -v

The questions (notes/flash_attn_bench.md): does `do_not_specialize` on T and the window bounds cost
the long causal rows (the dev forward without it reached 588 at D=128, T=8192; the kept one 555),
does a third ring slot pay, and how far the same kernel gets at head dim 64 with deeper rings.
And whether persistent programs (one per SM, looping over the query tiles, the next tile's loads
overlapping this one's epilogue) lift the 1-2k rows. Each variant is (name, head dim, (BLOCK_M,
BLOCK_N, STAGES), kernel).
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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier  # noqa: E402

VARIANTS = [  # (name, head dim, (BLOCK_M, BLOCK_N, STAGES), kernel: kept / specialized / persistent / pingpong)
    ("kept", 128, (128, 128, 2), "kept"),
    ("specialized", 128, (128, 128, 2), "specialized"),
    ("3 slots", 128, (128, 128, 3), "kept"),
    ("d64", 64, (128, 128, 2), "kept"),
    ("d64 3 slots", 64, (128, 128, 3), "kept"),
    ("d64 4 slots", 64, (128, 128, 4), "kept"),  # (128, 256, 2) spills 864 B and serializes wgmma
    # last: a hang (a barrier never passed) ends the run here, after the rows above are printed
    ("persistent", 128, (128, 128, 2), "persistent"),
    ("persistent 3 slots", 128, (128, 128, 3), "persistent"),
    ("d64 persistent", 64, (128, 128, 2), "persistent"),
    ("128x64 3 slots", 128, (128, 64, 3), "kept"),  # the persistent kernel's lighter tile, both ways
    ("persistent 128x64 3 slots", 128, (128, 64, 3), "persistent"),
    ("persistent ping-pong", 128, (128, 128, 2), "pingpong"),  # FlashAttention-3's schedule (_fwd_tile)
    ("d64 persistent ping-pong", 64, (128, 128, 2), "pingpong"),
]
SPECIALIZED = gluon.jit(fh._fwd_kernel.fn)  # the same kernel, compiled per T and window bounds


# --------------------------------------------------------------------------- persistent forward
# One program per SM loops over the query tiles t = pid, pid + #programs, ... (all heads of the
# last query block first when causal: the longest tiles start first). The loader refills each
# consumer's Q buffer as soon as that consumer's last S = Q K^T of a tile is done, and the K/V rings
# run on across tiles, so the next tile's loads overlap this tile's last P V and epilogue: the fixed
# cost per tile that a 1k-token sequence (at most 8 key blocks per tile) does not hide otherwise.
@gluon.jit
def _tile_of(t, BH, n_m, IS_CAUSAL: gl.constexpr):
    """(query block, batch * head) of tile t."""
    m = t // BH
    if IS_CAUSAL:
        m = n_m - 1 - m
    return m, t % BH


@gluon.jit
def _tile_range(m0, T, LEFT, RIGHT, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    lo, mid_lo, mid_hi, hi = fh._block_range(m0, T, T, LEFT, RIGHT, None, 0, BLOCK_M, BLOCK_N, False)
    return lo, mid_lo, mid_hi, gl.cdiv(hi - lo, BLOCK_N)


@gluon.jit
def _persistent_loader(desc_q, desc_k, desc_v, q_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty,
                       v_empty, T, H, GROUP, LEFT, RIGHT, n_m, n_tiles, IS_CAUSAL: gl.constexpr):
    BLOCK_M: gl.constexpr = 2 * q_smem.shape[1]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    BH = n_tiles // n_m
    it = 0  # key blocks loaded in this program's earlier tiles
    j = 0  # tiles done
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        m, bh = _tile_of(t, BH, n_m, IS_CAUSAL)
        b, h = bh // H, bh % H
        lo, mid_lo, mid_hi, n_blocks = _tile_range(m * BLOCK_M, T, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        for w in gl.static_range(2):  # both consumers are done with the last tile's Q
            mbarrier.wait(q_empty.index(w), (j & 1) ^ 1)
        fh._fwd_load_q(desc_q, q_smem, q_bars, b * T + m * BLOCK_M, h * D)
        fh._fwd_load_kv(desc_k, desc_v, k_ring, v_ring, k_full, v_full, k_empty, v_empty, b * T, (h // GROUP) * D,
                        lo, n_blocks, it)
        it += n_blocks
        j += 1


@gluon.jit
def _persistent_warpgroup(wg, q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, turn, Out,
                          Lse, softmax_scale, T, H, LEFT, RIGHT, n_tiles, IS_CAUSAL: gl.constexpr,
                          PINGPONG: gl.constexpr):
    """Few values live across the tile loop (the consumers have no register to spare): Out is
    contiguous (B, T, H, D) and lse (B, H, T_pad), so strides and T_pad follow from T, H, D."""
    ROWS: gl.constexpr = q_smem.shape[1]
    BLOCK_M: gl.constexpr = 2 * ROWS
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    D: gl.constexpr = k_ring.shape[2]
    MAX_BLOCK: gl.constexpr = flash_attn.MAX_BLOCK
    n_m = gl.cdiv(T, BLOCK_M)
    it = 0
    j = 0
    for t in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        m, bh = _tile_of(t, n_tiles // n_m, n_m, IS_CAUSAL)
        b, h = bh // H, bh % H
        m0 = m * BLOCK_M
        lo, mid_lo, mid_hi, n_blocks = _tile_range(m0, T, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        # t // n_tiles is 0, but the compiler cannot prove it: the epilogue's 64 store offsets per
        # thread (from this stride) are then computed per tile instead of hoisted out of the loop
        # and kept live through it (that spilled 1,164 bytes per thread at BLOCK_N = 128)
        stride_ot = H * D + t // n_tiles
        fh._fwd_tile(q_smem.index(wg), q_bars.index(wg), j & 1, q_empty.index(wg), k_ring, v_ring, k_full, v_full,
                     k_empty, v_empty, Out, Lse, softmax_scale, stride_ot, (b * T).to(gl.int64) * (H * D) + h * D,
                     bh.to(gl.int64) * (gl.cdiv(T, MAX_BLOCK) * MAX_BLOCK), m0 + wg * ROWS, lo, mid_lo, mid_hi,
                     n_blocks, T, LEFT, RIGHT, it, True,
                     # ping-pong: warpgroup 0 goes first; n_blocks - 1 turns per tile, so it - j before this one
                     turn.index(wg), turn.index(1 - wg), it - j, 1 - wg, PINGPONG)
        it += n_blocks
        j += 1


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "n_m", "n_tiles"])
def _persistent_fwd_kernel(desc_q, desc_k, desc_v, Out, Lse, softmax_scale, stride_ob, stride_ot, stride_oh,
                           T, T_pad, H, GROUP, LEFT, RIGHT, n_m, n_tiles,
                           IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, PINGPONG: gl.constexpr = False):
    # the kept kernel's arguments (forward() passes both the same) plus n_m query blocks and n_tiles = n_m * B * H;
    # stride_ob, stride_ot, stride_oh and T_pad go unused (_persistent_warpgroup)
    q_smem, k_ring, v_ring, q_bars, k_full, v_full, k_empty, v_empty = fh._fwd_buffers(desc_q, desc_k, desc_v,
                                                                                       BLOCK_M, BLOCK_N, STAGES)
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # Q's buffers free again
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong: whose turn
    for w in gl.static_range(2):
        mbarrier.init(q_empty.index(w), count=1)
        mbarrier.init(turn.index(w), count=1)
    consumer = (q_smem, q_bars, q_empty, k_ring, v_ring, k_full, v_full, k_empty, v_empty, turn, Out, Lse,
                softmax_scale, T, H, LEFT, RIGHT, n_tiles, IS_CAUSAL, PINGPONG)
    loader = (desc_q, desc_k, desc_v, q_smem, k_ring, v_ring, q_bars, q_empty, k_full, v_full, k_empty, v_empty,
              T, H, GROUP, LEFT, RIGHT, n_m, n_tiles, IS_CAUSAL)
    gl.warp_specialize([(_persistent_warpgroup, (0, ) + consumer), (_persistent_warpgroup, (1, ) + consumer),
                        (_persistent_loader, loader)], [4, 1], [fh.COMPUTE_REGS, fh.LOADER_REGS])


def forward(q, k, v, causal, tile, kind):
    """flash_attn_hopper.forward with the tile and kernel of a variant: out, lse (log2 units)."""
    B, T, H, D = q.shape
    bm, bn, stages = tile
    left, right = flash_attn._window(causal, None, T, T)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, flash_attn._lse_len(T), device=q.device, dtype=torch.float32)
    args = (fh._desc(q, bm // 2), fh._desc(k, bn), fh._desc(v, bn), out, lse, D ** -0.5,
            out.stride(0), out.stride(1), out.stride(2), T, lse.shape[-1], H, H // k.shape[2], left, right)
    meta = dict(IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, **fh.COMPILE_OPTIONS)
    if kind in ("persistent", "pingpong"):
        n_m = triton.cdiv(T, bm)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        _persistent_fwd_kernel[(min(sms, n_m * B * H), )](*args, n_m, n_m * B * H, PINGPONG=kind == "pingpong", **meta)
    else:
        kernel = SPECIALIZED if kind == "specialized" else fh._fwd_kernel
        kernel[(triton.cdiv(T, bm), B * H)](*args, **meta)
    return out, lse


def check(name, D, tile, kind):
    """Fresh random ragged inputs (grouped heads, a partial last tile) against the float64 reference;
    8 x 48 = 384 query tiles, more than an H100/H200 has SMs, so persistent programs loop."""
    for causal in (True, False):
        q = torch.randn(3, 1000, 16, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 1000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = forward(q, k, v, causal, tile, kind)
        ref, ref_lse = flash_attn.attention_reference(q.double(), k.double(), v.double(), causal=causal)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        lse_err = ((lse[..., :1000] / 1.4426950408889634 - ref_lse).abs().max()).item()
        if not (err < 2e-2 and lse_err < 1e-2):
            return f"WRONG (causal={causal}: out {err:.2e}, lse {lse_err:.2e})"
    return "ok"


# --------------------------------------------------------------------------- backward at head dim 64
# flash_attn_hopper's backward kernel at D=64 (it compiles there: no spills, wgmma pipelined). Each
# consumer computes dQ_i for half the head dim from a 32-column slice of K in shared memory, which
# cuts K's 128-byte swizzle atom at D=64 (64-byte rows of the slice): the check says whether wgmma
# reads such a slice correctly.
BWD_VARIANTS = [  # (name, head dim, (BLOCK_M, BLOCK_N, STAGES))
    ("bwd kept", 128, fh.BWD_TILE),
    ("bwd d64", 64, (64, 128, 2)),
    ("bwd d64 3 slots", 64, (64, 128, 3)),
    ("bwd d64 4 slots", 64, (64, 128, 4)),
]


def backward(do, q, k, v, out, lse, causal, tile):
    """dq, dk, dv by flash_attn_hopper.backward with a variant's tile (delta by flash_attn's preprocess)."""
    B, T, H, D = q.shape
    left, right = flash_attn._window(causal, None, T, T)
    delta = torch.empty_like(lse)
    flash_attn._run(flash_attn._bwd_preprocess, (lse.shape[-1] // flash_attn.MAX_BLOCK, B * H), out, do, delta,
                    out.stride(0), out.stride(1), out.stride(2), T, lse.shape[-1], H, HEAD_DIM=D, DIM=D,
                    BLOCK_M=flash_attn.MAX_BLOCK)
    return fh.backward(do, q, k, v, lse, delta, D ** -0.5, left, right, tile=tile)


def check_bwd(D, tile):
    """As check, for the gradients (forward by the kept kernel at D, checked above)."""
    for causal in (True, False):
        q = torch.randn(3, 1000, 16, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 1000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do = torch.randn_like(q)
        out, lse = forward(q, k, v, causal, (128, 128, 2), "kept")
        grads = backward(do, q, k, v, out, lse, causal, tile)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = flash_attn.attention_reference(*leaves, causal=causal)[0]
        for name, got, want in zip("qkv", grads, torch.autograd.grad(ref, leaves, do.double())):
            err = ((got.double() - want).norm() / want.norm()).item()
            if not err < 2e-2:
                return f"WRONG (causal={causal}: d{name} {err:.2e})"
    return "ok"


def time_bwd():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for name, D, tile in BWD_VARIANTS:
        status = check_bwd(D, tile)
        for T in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            flops = 2.5 * 4 * B * H * T * T * D * 0.5
            out, lse = forward(q, k, v, True, (128, 128, 2), "kept")
            ms = triton.testing.do_bench(lambda: backward(do, q, k, v, out, lse, True, tile), warmup=50, rep=200,
                                         return_mode="median")
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            cudnn = triton.testing.do_bench(
                lambda: torch.autograd.grad(ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True),
                warmup=50, rep=200, return_mode="median")
            rows.append((name, D, T, status, flops / ms * 1e-9, flops / cudnn * 1e-9))
            print(*rows[-1], flush=True)
    print_table("backward", rows)


def time_all():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    rows = []
    for name, D, tile, kind in VARIANTS:
        status = check(name, D, tile, kind)
        for T in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * B * H * T * T * D * 0.5
            ms = triton.testing.do_bench(lambda: forward(q, k, v, True, tile, kind), warmup=50, rep=200,
                                         return_mode="median")
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = triton.testing.do_bench(
                    lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                    warmup=50, rep=200, return_mode="median")
            rows.append((name, D, T, status, flops / ms * 1e-9, flops / cudnn * 1e-9))
            print(*rows[-1], flush=True)
    print_table("forward", rows)


def print_table(direction, rows):
    """rows: (variant, head dim, seqlen, check, our TFLOP/s, SDPA cuDNN's) as a markdown table."""
    print(f"\n| {direction} variant | head dim | seqlen | check | TFLOP/s | SDPA cuDNN | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, D, T, status, ours, cudnn in rows:
        print(f"| {name} | {D} | {T} | {status} | {ours:.0f} | {cudnn:.0f} | {ours / cudnn:.2f} |")


def compile_all():
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
        print(f"{name:14s} D={D:3d} tile {tile}: smem {k.metadata.shared} B, spill stores "
              f"{spill.group(1) if spill else '?'} B, {'wgmma serialized' if 'serialized' in log else 'pipelined'}")

    for name, D, (bm, bn, stages), kind in VARIANTS:
        fn = {"kept": fh._fwd_kernel, "specialized": SPECIALIZED}.get(kind, _persistent_fwd_kernel)
        sig = {"desc_q": desc([bm // 2, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
               "Out": "*bf16", "Lse": "*fp32", "softmax_scale": "fp32"}
        consts = dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages)
        if fn is _persistent_fwd_kernel:
            consts["PINGPONG"] = kind == "pingpong"
        compile_one(name, D, (bm, bn, stages), fn, sig, consts)
    for name, D, (bm, bn, stages) in BWD_VARIANTS:
        sig = {"desc_q": desc([bm, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]), "desc_do": desc([bm, D]),
               "desc_dq": desc([bm, D // 2], "fp32"), "desc_lse": desc([bm], "fp32"),
               "desc_delta": desc([bm], "fp32"), "dK": "*bf16", "dV": "*bf16", "softmax_scale": "fp32"}
        compile_one(name, D, (bm, bn, stages), fh._bwd_kernel, sig, dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90a here, no GPU needed")
    args = p.parse_args()
    if args.compile_only:
        compile_all()
    else:
        time_bwd()  # first: the forward variants end with the persistent ones, which could hang
        time_all()
