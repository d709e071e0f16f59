"""Variants of flash_attn_hopper's kernels, checked and timed in one GPU call, or compiled for sm_90a
on any machine (--compile-only: shared memory, spills, whether ptxas kept wgmma pipelined).

    python notes/hopper_variants.py [--only forward|backward] [--masks causal|full|both]  # GPU: correctness, then
                                                   # TFLOP/s against SDPA cuDNN (causal by default)
    python notes/hopper_variants.py --compile-only [NAME ...]  # CPU: Triton's sm_90a compile and ptxas -v

tests/test_flash_attn.py's test_hopper_kernels_compile_for_sm90 runs --compile-only on the shipped kernels
("kept", "kept d64", "kept d64 long", "bwd 128", "bwd 64", and the backward split over programs, "bwd 128 split",
"bwd 64 split").

A variant is a tile (BLOCK_M, BLOCK_N, STAGES, and the forward's Q_STAGES) of the shipped kernels at a
head dim (the forward runs BLOCK_M // 64 consumer warpgroups, 2 or 3; the backward two) and an order in
which the programs start (flash_attn_hopper's l2_bytes: heads in groups whose streamed tiles fill that
many bytes, 0 for head by head); or the portable kernels of flash_attn.py (tile None). The variants of a
shape are timed interleaved, round after round, with SDPA cuDNN among them (median_ms).

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
atomic tile counter it beat the kept forward at every length: 0.98-1.11x of cuDNN at head dim 128,
and at head dim 64 the portable kernels below 8k with a 128 x 128 tile; it ships as the forward (the
one-program-per-tile forward it replaced is in commit 967a473). A second Q buffer, so the loader no longer
waits for a tile's last S = Q K^T before the next tile's Q and first K, V, bought 2-5% below 8k (most at
1k) and ships; with it a third K/V slot at head dim 64 stayed within 1%. Forward tiles of 64 keys
(128 x 64, two or three slots) lost at every length: 0.81-0.91x of cuDNN at head dim 64 (kept 0.90-1.05x),
0.92-0.98x at 128 (kept 0.99-1.09x); removed after commit 476e8a4. On the atomic-counter forward, ping-pong
again and FlashAttention-3's rescale order (O rescaled while S computes) stayed within the runs' noise
(about 2%, notes/flash_attn_bench.md, 2026-12-03); not kept. The backward with the forward's tile layout
(queries along rows, P and dS through shared memory: FlashAttention-3's at head dim 64) lost: 0.82-0.90x
cuDNN at head dim 64 with 128 queries a step (kept 0.91-1.00), the kept's speed with 64, 0.72-0.86x with
the next step's S and dP issued before the softmax, 0.95-1.04x at 128 (kept 0.97-1.04); removed after
commit 95ea7aa (notes/flash_attn_bench.md, 2026-12-04). At head dim 64 the backward's dQ_i whole, by
one warpgroup in turns a step late, beat halves by both (each reading all of dS) by 2-5% and ships
(BWD_TILES' last entry, 1; notes/hopper_ab.py times it against an older flash_attn_hopper.py). Forward
tiles that read K and V less often through 64-key blocks (256 x 64 with two row blocks per warpgroup,
192 x 64 with three warpgroups) lost 4-23% at head dim 128, and a third Q/dO slot in the backward (in place
of a dQ staging buffer) 3-9%; removed after commit 8cec06a (notes/flash_attn_bench.md, 2026-12-04).
The forward in clusters of two CTAs sharing K and V by TMA multicast (Triton 3.8) bought 0-4%, below the
halved reads' 8-14%: notes/fwd_cluster.py. The backward's dQ added from the consumers' registers by
red.global.add (no writer warp, no staging) lost 29-35% at head dim 128 and 7-15% at 64 (the patch is in commit
634a0d3); its last partial wave (2,048 programs, 15.5 waves) costs nothing that shapes of whole waves recover.
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
from triton.experimental.gluon import language as gl  # noqa: E402

VARIANTS = [  # (name, head dim, tile, l2_bytes: the tile order, flash_attn_hopper.forward's)
    ("kept", 128, fh.FWD_TILES[128], fh.L2_GROUP_BYTES),
    ("kept d64", 64, fh.FWD_TILES[64], fh.L2_GROUP_BYTES),
    ("kept d64 long", 64, fh.FWD_TILES_LONG[64], fh.L2_GROUP_BYTES),  # three consumer warpgroups, from 8k
    ("one Q", 128, fh.FWD_TILES[128][:3] + (1, ), fh.L2_GROUP_BYTES),  # Q single-buffered, as before 2026-12-03
    ("one Q d64", 64, fh.FWD_TILES[64][:3] + (1, ), fh.L2_GROUP_BYTES),
    ("one Q d64 long", 64, fh.FWD_TILES_LONG[64][:3] + (1, ), fh.L2_GROUP_BYTES),
    ("d64 portable", 64, None, None),  # flash_attn.py's own kernels (autotuned): below MIN_SEQLEN they run
]


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
    return fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T), tile=tile, l2_bytes=l2_bytes)


def check(D, tile, l2_bytes):
    """Fresh random ragged inputs (grouped heads, a partial last tile; 48 heads at 3000 tokens, so the
    16 MB groups are 20 + 28 heads at head dim 128, all 48 at 64) against the float64 reference."""
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
BWD_VARIANTS = [  # (name, head dim, tile, l2_bytes) as VARIANTS, flash_attn_hopper.backward's order; a tile's
    # fifth entry: each key block's steps split over that many programs (float32 partial dK, dV)
    ("bwd 128", 128, fh.BWD_TILES[128], fh.L2_GROUP_BYTES),
    ("bwd 64", 64, fh.BWD_TILES[64], fh.L2_GROUP_BYTES),
    ("bwd 128 split", 128, fh.BWD_TILES[128] + (2, ), fh.L2_GROUP_BYTES),
    ("bwd 64 split", 64, fh.BWD_TILES[64] + (2, ), fh.L2_GROUP_BYTES),
    ("bwd 64 portable", 64, None, None),  # as "d64 portable"
]


def backward(do, q, k, v, out, lse, causal, tile, l2_bytes=None):
    """dq, dk, dv by flash_attn_hopper.backward with a variant's tile and tile order (tile None: the
    portable kernels)."""
    T, D = q.shape[1], q.shape[3]
    left, right = flash_attn._window(causal, None, T, T)
    if tile is None:
        return portable(flash_attn._backward, do, q, k, v, out, lse, None, causal, D ** -0.5, left, right)
    return fh.backward(do, q, k, v, out, lse, D ** -0.5, left, right, tile=tile[:4], l2_bytes=l2_bytes,
                       splits=tile[4] if len(tile) > 4 else 1)


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


def time_direction(direction, variants, check_fn, rounds, masks=(True, )):
    """Every variant of one direction and SDPA cuDNN, interleaved (median_ms), for each mask (causal
    True / False), 16k tokens per batch and 2048 = heads x head dim: a markdown table of TFLOP/s."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for D in sorted({v[1] for v in variants}, reverse=True):
        here = [v for v in variants if v[1] == D]
        status = {name: check_fn(D, tile, l2) for name, _, tile, l2 in here}
        for causal in masks:
            for T in (1024, 2048, 4096, 8192, 16384):
                B, H = 16384 // T, 2048 // D
                q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1) * (2.5 if direction == "backward" else 1)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                if direction == "forward":
                    fns = {name: (lambda t=tile, l2=l2: forward(q, k, v, causal, t, l2))
                           for name, _, tile, l2 in here}

                    def cudnn():
                        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                else:
                    out, lse = forward(q, k, v, causal, fh.FWD_TILES[D])
                    fns = {name: (lambda t=tile, l2=l2: backward(do, q, k, v, out, lse, causal, t, l2))
                           for name, _, tile, l2 in here}

                    def cudnn():
                        torch.autograd.grad(ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True)
                with torch.no_grad() if direction == "forward" else torch.enable_grad():
                    ms = median_ms({**fns, "cuDNN": cudnn}, rounds)
                for name in fns:
                    rows.append((name, D, "causal" if causal else "full", T, status[name],
                                 flops / ms[name] * 1e-9, flops / ms["cuDNN"] * 1e-9))
                    print(*rows[-1], flush=True)
    print_table(direction, rows)


def print_table(direction, rows):
    """rows: (variant, head dim, mask, seqlen, check, our TFLOP/s, SDPA cuDNN's) as a markdown table."""
    print(f"\n| {direction} variant | head dim | mask | seqlen | check | TFLOP/s | SDPA cuDNN | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, D, mask, T, status, ours, cudnn in rows:
        print(f"| {name} | {D} | {mask} | {T} | {status} | {ours:.0f} | {cudnn:.0f} | {ours / cudnn:.2f} |")


def ptxas_report(k):
    """`ptxas -v` of a kernel compiled for sm_90a (Triton's bundled ptxas): registers per thread at launch
    (they bound the programs per SM), bytes of spill stores, and "pipelined" or "wgmma serialized" (what
    ptxas does to the wgmma when registers run out)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    spill = re.search(r"(\d+) bytes spill stores", log)
    regs = re.search(r"Used (\d+) registers", log)
    return (regs.group(1) if regs else "?", spill.group(1) if spill else "?",
            "wgmma serialized" if "serialized" in log else "pipelined")


def compile_all(names):
    """Compile the variants called names (all if empty), each tile once per direction."""
    from triton.backends.compiler import GPUTarget
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
        regs, spill, wgmma = ptxas_report(k)
        print(f"{name:14s} D={D:3d} tile {tile}: {regs} registers, smem {k.metadata.shared} B, spill stores {spill} B, "
              f"{k.asm['ptx'].count('griddepcontrol.wait')} grid dependency wait(s), {wgmma}")

    for direction, variants in (("forward", VARIANTS), ("backward", BWD_VARIANTS)):
        tiles = {}  # the orders are an argument (l2_bytes) of one compiled kernel per tile
        for name, D, tile, _ in variants:
            if tile is not None and (not names or name in names):  # not the portable kernels
                tiles.setdefault((D, tile), name)
        for (D, (bm, bn, stages, *q_stages)), name in tiles.items():  # forward [Q_STAGES], backward [DQ_PARTS]
            if direction == "forward":
                sig = {"desc_q": desc([64, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
                       "desc_o": desc([64, D]), "Out": "*bf16", "Lse": "*fp32", "softmax_scale": "fp32"}
                sig["Counter"] = "*i32"
                compile_one(name, D, (bm, bn, stages, *q_stages), fh._fwd_kernel, sig,
                            dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, Q_STAGES=q_stages[0],
                                 GDC=True))
            else:  # [DQ_PARTS, splits]: unsplit, SPLITS is 1 as the launch specializes it; split, dK and dV float32
                split = len(q_stages) > 1
                sig = {"desc_q": desc([bm, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
                       "desc_do": desc([bm, D]), "desc_dq": desc([bm, D // q_stages[0]], "fp32"), "desc_lse": desc([bm], "fp32"),
                       "desc_delta": desc([bm], "fp32"), "desc_dk": desc([64, D]), "desc_dv": desc([64, D]),
                       "dK": "*fp32" if split else "*bf16", "dV": "*fp32" if split else "*bf16",
                       "softmax_scale": "fp32"}
                compile_one(name, D, (bm, bn, stages, *q_stages), fh._bwd_kernel, sig,
                            dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, DQ_PARTS=q_stages[0], GDC=True,
                                 **({} if split else {"SPLITS": 1})))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", nargs="*", metavar="NAME",
                   help="compile for sm_90a here, no GPU needed: the variants named (default all)")
    p.add_argument("--only", choices=["forward", "backward"], help="time one direction's variants")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, the variants interleaved in each")
    p.add_argument("--names", nargs="+", metavar="NAME", help="time only these variants (a hang stops just them)")
    p.add_argument("--masks", default="causal", choices=["causal", "full", "both"], help="the masks timed")
    args = p.parse_args()
    if args.compile_only is not None:
        compile_all(args.compile_only)
    else:
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
        masks = {"causal": (True, ), "full": (False, ), "both": (True, False)}[args.masks]
        def chosen(variants):
            return [v for v in variants if not args.names or v[0] in args.names]
        if args.only != "forward" and chosen(BWD_VARIANTS):
            time_direction("backward", chosen(BWD_VARIANTS), check_bwd, args.rounds, masks)
        if args.only != "backward" and chosen(VARIANTS):
            time_direction("forward", chosen(VARIANTS), check, args.rounds, masks)
