"""Variants of flash_attn_hopper's kernels, checked and timed in one GPU call, or compiled for sm_90a
on any machine (--compile-only: shared memory, spills, whether ptxas kept wgmma pipelined).

    python notes/hopper_variants.py [--only forward|backward]  # GPU: correctness, then TFLOP/s against SDPA cuDNN
    python notes/hopper_variants.py --compile-only             # CPU: Triton's sm_90a compile and ptxas -v

A variant is a tile (BLOCK_M, BLOCK_N, STAGES) of the shipped kernels at a head dim (the forward runs
BLOCK_M // 64 consumer warpgroups, 2 or 3; the backward two), and for the forward an order in which
the tiles start (ORDERS: the shipped programs, flash_attn_hopper._fwd_program, on a 1D grid).

Measured (notes/flash_attn_bench.md): a third or fourth ring slot is within the noise both ways; at
head dim 64 the forward's 192 x 128 tile (FlashAttention-3's, three warpgroups) beats the portable
kernels from 8k tokens and the backward from 2k, so both ship from there. Persistent programs and the
ping-pong schedule lost (0.6-0.9x of the kept forward) and were removed after commit 8f667f9.
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

VARIANTS = [  # (name, head dim, (BLOCK_M, BLOCK_N, STAGES), tile order: None = the kept grid, or ORDERS' key)
    ("kept", 128, fh.FWD_TILES[128], None),
    ("order: heads in 16 MB groups", 128, fh.FWD_TILES[128], "l2"),
    ("order: longest first, all heads", 128, fh.FWD_TILES[128], "lpt"),
    ("kept d64", 64, fh.FWD_TILES[64], None),  # three consumer warpgroups
    ("d64 order: heads in 16 MB groups", 64, fh.FWD_TILES[64], "l2"),
    ("d64 128x128", 64, (128, 128, 2), None),
    ("d64 192x64", 64, (192, 64, 2), None),
]


# --------------------------------------------------------------------------- tile order
# The kept grid (query blocks, B * H) starts programs head by head: the query blocks of one head run
# side by side and share its K, V in L2, but when causal the last head's longest tiles start last,
# and SMs idle while they finish (at 1k tokens a tile has 1-8 key blocks, ~70 per SM in all). Groups of
# HEADS heads, each group longest tiles first across its heads, trade that tail against L2 reuse.
ORDERS = {"l2": lambda B, T, H, D: max(1, (16 << 20) // (4 * T * D)),  # heads whose K, V fill 16 MB
          "lpt": lambda B, T, H, D: B * H}  # one group: every head's longest tile first


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "HEADS"])
def _ordered_fwd_kernel(desc_q, desc_k, desc_v, Out, Lse, softmax_scale, stride_ob, stride_ot, stride_oh,
                        T, T_pad, H, GROUP, LEFT, RIGHT, HEADS,
                        IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr):
    """flash_attn_hopper._fwd_kernel's programs in _ordered_tile's order, longest query blocks first
    when causal. HEADS = 1 is the kept order."""
    n_m = gl.cdiv(T, BLOCK_M)
    pid_m, bh = _ordered_tile(n_m, HEADS)
    if IS_CAUSAL:
        pid_m = n_m - 1 - pid_m
    fh._fwd_program(desc_q, desc_k, desc_v, Out, Lse, softmax_scale, stride_ob, stride_ot, stride_oh, T, T_pad, H,
                    GROUP, LEFT, RIGHT, pid_m, bh, BLOCK_M, BLOCK_N, STAGES)


@gluon.jit
def _ordered_tile(n_blocks, HEADS):
    """(block, head) of this program of a 1D grid of n_blocks * heads: heads in groups of HEADS, one
    group after another; within a group, block by block, every head of the group at each."""
    pid = gl.program_id(0)
    first = pid // (HEADS * n_blocks) * HEADS  # the group's first head
    size = gl.minimum(HEADS, gl.num_programs(0) // n_blocks - first)  # the last group can be smaller
    r = pid - first * n_blocks
    return r // size, first + r % size


def forward(q, k, v, causal, tile, order=None):
    """flash_attn_hopper.forward with a variant's tile and tile order: out, lse (log2 units)."""
    B, T, H, D = q.shape
    left, right = flash_attn._window(causal, None, T, T)
    if order is None:
        return fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T), tile=tile)
    bm, bn, stages = tile
    out = torch.empty_like(q)
    lse = torch.empty(B, H, flash_attn._lse_len(T), device=q.device, dtype=torch.float32)
    _ordered_fwd_kernel[(triton.cdiv(T, bm) * B * H, )](
        fh._desc(q, 64), fh._desc(k, bn), fh._desc(v, bn), out, lse, D ** -0.5, out.stride(0), out.stride(1),
        out.stride(2), T, lse.shape[-1], H, H // k.shape[2], left, right, ORDERS[order](B, T, H, D),
        IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, **fh.COMPILE_OPTIONS)
    return out, lse


def check(D, tile, order=None):
    """Fresh random ragged inputs (grouped heads, a partial last tile; 48 heads, so a smaller last
    group of heads) against the float64 reference."""
    for causal in (True, False):
        q = torch.randn(3, 1000, 16, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 1000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = forward(q, k, v, causal, tile, order)
        ref, ref_lse = flash_attn.attention_reference(q.double(), k.double(), v.double(), causal=causal)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        lse_err = ((lse[..., :1000] / 1.4426950408889634 - ref_lse).abs().max()).item()
        if not (err < 2e-2 and lse_err < 1e-2):
            return f"WRONG (causal={causal}: out {err:.2e}, lse {lse_err:.2e})"
    return "ok"


# --------------------------------------------------------------------------- backward
BWD_VARIANTS = [  # (name, head dim, tile, tile order as in VARIANTS)
    ("bwd 128", 128, fh.BWD_TILES[128], None),
    ("bwd 128 order: heads in 16 MB groups", 128, fh.BWD_TILES[128], "l2"),
    ("bwd 128 order: longest first, all heads", 128, fh.BWD_TILES[128], "lpt"),
    ("bwd 64", 64, fh.BWD_TILES[64], None),
    ("bwd 64 order: heads in 16 MB groups", 64, fh.BWD_TILES[64], "l2"),
]


@gluon.jit(do_not_specialize=["T", "T_pad", "GROUP", "LEFT", "RIGHT", "HEADS"])
def _ordered_bwd_kernel(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, dK, dV, softmax_scale,
                        stride_b, stride_t, stride_h, T, T_pad, H_KV, GROUP, LEFT, RIGHT, HEADS,
                        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """flash_attn_hopper._bwd_kernel's programs in _ordered_tile's order (when causal the first key
    blocks, which the most query blocks see, are the longest: they come first, as in the kept grid)."""
    pid_n, bhk = _ordered_tile(gl.cdiv(T, BLOCK_N), HEADS)
    fh._bwd_program(desc_q, desc_k, desc_v, desc_do, desc_dq, desc_lse, desc_delta, dK, dV, softmax_scale, stride_b,
                    stride_t, stride_h, T, T_pad, H_KV, GROUP, LEFT, RIGHT, pid_n, bhk, BLOCK_M, BLOCK_N, STAGES)


def backward(do, q, k, v, out, lse, causal, tile, order=None):
    """dq, dk, dv by flash_attn_hopper.backward with a variant's tile and tile order (delta by
    flash_attn's preprocess)."""
    B, T, H, D = q.shape
    left, right = flash_attn._window(causal, None, T, T)
    delta = torch.empty_like(lse)
    flash_attn._run(flash_attn._bwd_preprocess, (lse.shape[-1] // flash_attn.MAX_BLOCK, B * H), out, do, delta,
                    out.stride(0), out.stride(1), out.stride(2), T, lse.shape[-1], H, HEAD_DIM=D, DIM=D,
                    BLOCK_M=flash_attn.MAX_BLOCK)
    if order is None:
        return fh.backward(do, q, k, v, lse, delta, D ** -0.5, left, right, tile=tile)
    bm, bn, stages = tile
    H_kv = k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros(B, T, H, D, device=q.device, dtype=torch.float32)
    # a kv head's programs share its query heads' Q and dO: GROUP times a head's bytes
    _ordered_bwd_kernel[(triton.cdiv(T, bn) * B * H_kv, )](
        fh._desc(q, bm), fh._desc(k, bn), fh._desc(v, bn), fh._desc(do, bm), fh._desc(dq, bm, D // 2),
        fh._stat_desc(lse, bm), fh._stat_desc(delta, bm), dk, dv, D ** -0.5, dk.stride(0), dk.stride(1),
        dk.stride(2), T, lse.shape[-1], H_kv, H // H_kv, left, right, ORDERS[order](B, T, H_kv, D * (H // H_kv)),
        BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, **fh.COMPILE_OPTIONS)
    return dq.to(q.dtype), dk, dv


def check_bwd(D, tile, order=None):
    """As check, for the gradients (forward by the kept kernel at D, checked above)."""
    for causal in (True, False):
        q = torch.randn(3, 1000, 16, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(3, 1000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do = torch.randn_like(q)
        out, lse = forward(q, k, v, causal, (128, 128, 2))
        grads = backward(do, q, k, v, out, lse, causal, tile, order)
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
    for name, D, tile, order in BWD_VARIANTS:
        status = check_bwd(D, tile, order)
        for T in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            flops = 2.5 * 4 * B * H * T * T * D * 0.5
            out, lse = forward(q, k, v, True, (128, 128, 2))
            ms = triton.testing.do_bench(lambda: backward(do, q, k, v, out, lse, True, tile, order), warmup=50, rep=200,
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
    for name, D, tile, order in VARIANTS:
        status = check(D, tile, order)
        for T in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * B * H * T * T * D * 0.5
            ms = triton.testing.do_bench(lambda: forward(q, k, v, True, tile, order), warmup=50, rep=200,
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

    for name, D, (bm, bn, stages), order in VARIANTS:
        sig = {"desc_q": desc([64, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
               "Out": "*bf16", "Lse": "*fp32", "softmax_scale": "fp32"}
        compile_one(name, D, (bm, bn, stages), fh._fwd_kernel if order is None else _ordered_fwd_kernel, sig,
                    dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages))
    for name, D, (bm, bn, stages), order in BWD_VARIANTS:
        sig = {"desc_q": desc([bm, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]), "desc_do": desc([bm, D]),
               "desc_dq": desc([bm, D // 2], "fp32"), "desc_lse": desc([bm], "fp32"),
               "desc_delta": desc([bm], "fp32"), "dK": "*bf16", "dV": "*bf16", "softmax_scale": "fp32"}
        compile_one(name, D, (bm, bn, stages), fh._bwd_kernel if order is None else _ordered_bwd_kernel, sig,
                    dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90a here, no GPU needed")
    p.add_argument("--only", choices=["forward", "backward"], help="time one direction's variants")
    args = p.parse_args()
    if args.compile_only:
        compile_all()
    else:
        if args.only != "forward":
            time_bwd()
        if args.only != "backward":
            time_all()
