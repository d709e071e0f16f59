"""Variants of flash_attn_hopper's forward, checked and timed in one GPU call, or compiled for sm_90a
on any machine (--compile-only: shared memory, spills, whether ptxas kept wgmma pipelined).

    python notes/hopper_variants.py                  # GPU: correctness, then TFLOP/s against SDPA cuDNN
    python notes/hopper_variants.py --compile-only   # CPU: Triton's sm_90a compile and ptxas -v

The questions (notes/flash_attn_bench.md): does `do_not_specialize` on T and the window bounds cost
the long causal rows (the dev forward without it reached 588 at D=128, T=8192; the kept one 555),
does a third ring slot pay, and how far the same kernel gets at head dim 64 with deeper rings.
Each variant is (name, head dim, (BLOCK_M, BLOCK_N, STAGES), specialized).
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

VARIANTS = [
    ("kept", 128, (128, 128, 2), False),
    ("specialized", 128, (128, 128, 2), True),
    ("3 slots", 128, (128, 128, 3), False),
    ("d64", 64, (128, 128, 2), False),
    ("d64 3 slots", 64, (128, 128, 3), False),
    ("d64 4 slots", 64, (128, 128, 4), False),  # (128, 256, 2) spills 864 B and serializes wgmma
]
SPECIALIZED = gluon.jit(fh._fwd_kernel.fn)  # the same kernel, compiled per T and window bounds


def forward(q, k, v, causal, tile, specialized):
    """flash_attn_hopper.forward with the tile and kernel of a variant: out, lse (log2 units)."""
    B, T, H, D = q.shape
    bm, bn, stages = tile
    left, right = flash_attn._window(causal, None, T, T)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, flash_attn._lse_len(T), device=q.device, dtype=torch.float32)
    kernel = SPECIALIZED if specialized else fh._fwd_kernel
    kernel[(triton.cdiv(T, bm), B * H)](
        fh._desc(q, bm // 2), fh._desc(k, bn), fh._desc(v, bn), out, lse, D ** -0.5,
        out.stride(0), out.stride(1), out.stride(2), T, lse.shape[-1], H, H // k.shape[2], left, right,
        IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, **fh.COMPILE_OPTIONS)
    return out, lse


def check(name, D, tile, specialized):
    """Fresh random ragged inputs (grouped heads, a partial last tile) against the float64 reference."""
    for causal in (True, False):
        q = torch.randn(2, 1000, 4, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 1000, 2, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = forward(q, k, v, causal, tile, specialized)
        ref, ref_lse = flash_attn.attention_reference(q.double(), k.double(), v.double(), causal=causal)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        lse_err = ((lse[..., :1000] / 1.4426950408889634 - ref_lse).abs().max()).item()
        if not (err < 2e-2 and lse_err < 1e-2):
            return f"WRONG (causal={causal}: out {err:.2e}, lse {lse_err:.2e})"
    return "ok"


def time_all():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    rows = []
    for name, D, tile, specialized in VARIANTS:
        status = check(name, D, tile, specialized)
        for T in (1024, 2048, 4096, 8192, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * B * H * T * T * D * 0.5
            ms = triton.testing.do_bench(lambda: forward(q, k, v, True, tile, specialized), warmup=50, rep=200,
                                         return_mode="median")
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = triton.testing.do_bench(
                    lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                    warmup=50, rep=200, return_mode="median")
            rows.append((name, D, T, status, flops / ms * 1e-9, flops / cudnn * 1e-9))
            print(*rows[-1], flush=True)
    print("\n| variant | head dim | seqlen | check | forward TFLOP/s | SDPA cuDNN | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, D, T, status, ours, cudnn in rows:
        print(f"| {name} | {D} | {T} | {status} | {ours:.0f} | {cudnn:.0f} | {ours / cudnn:.2f} |")


def compile_all():
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return f"tensordesc<bf16[{', '.join(map(str, block))}],{layout!r}>"

    for name, D, (bm, bn, stages), specialized in VARIANTS:
        fn = SPECIALIZED if specialized else fh._fwd_kernel
        sig = {"desc_q": desc([bm // 2, D]), "desc_k": desc([bn, D]), "desc_v": desc([bn, D]),
               "Out": "*bf16", "Lse": "*fp32", "softmax_scale": "fp32"}
        consts = dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages)
        for arg in fn.arg_names:
            sig.setdefault(arg, "constexpr" if arg in consts else "i32")
        try:
            k = triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options=fh.COMPILE_OPTIONS)
        except Exception as e:  # noqa: BLE001
            print(f"{name:14s} D={D:3d} tile {(bm, bn, stages)}: FAILED {type(e).__name__}: {str(e)[-300:]}")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        spill = re.search(r"(\d+) bytes spill stores", log)
        print(f"{name:14s} D={D:3d} tile {(bm, bn, stages)}: smem {k.metadata.shared} B, spill stores "
              f"{spill.group(1) if spill else '?'} B, {'wgmma serialized' if 'serialized' in log else 'pipelined'}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile-only", action="store_true", help="compile for sm_90a here, no GPU needed")
    args = p.parse_args()
    compile_all() if args.compile_only else time_all()
