"""Registers and spills of flash_attn.py's kernels for sm_90a, from `ptxas -v`, on any machine
(no GPU needed: Triton compiles to PTX and runs its bundled ptxas).

    python notes/ptxas_regs.py                      # every kernel x tile config, head dim 128, bf16
    python notes/ptxas_regs.py --head-dim 64 --which dkdv
    python notes/ptxas_regs.py --docs 1             # the document-masking variants (HAS_DOCS)
    python notes/ptxas_regs.py --head-dim 96        # a head dim padded inside the kernels (3D descriptors)

Prints one line per (kernel, constexpr variant, tile): registers per thread, spill stores/loads
(bytes), shared memory from Triton's metadata, and whether the dots became wgmma.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flash_attn  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, descs, bm, bn, d, dtype, padded):
    """Every runtime argument of fn typed; descriptors with their block shapes (flash_attn._desc)."""
    sig = {}
    for name in fn.arg_names:
        if name in descs:
            rows = bm if name in ("desc_q", "desc_do") else bn
            sig[name] = f"tensordesc<{dtype}[1, {rows}, {d}]>" if padded else f"tensordesc<{dtype}[{rows}, {d}]>"
        elif name in ("Out", "dK", "dV", "dQ"):
            sig[name] = f"*{dtype}"
        elif name in ("Lse", "Delta"):
            sig[name] = "*fp32"
        elif name == "Docs":
            sig[name] = "*i32"
        elif name == "softmax_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, consts, bm, bn, d, warps, stages, dtype="bf16"):
    descs = [n for n in fn.arg_names if n.startswith("desc_")]
    consts = dict(consts)
    if "GROUP" in fn.arg_names and "GROUP" not in fn.do_not_specialize:
        consts["GROUP"] = 1  # Triton specializes ints equal to 1 (multi-head attention, no groups)
    consts.setdefault("GDC", True)  # launched as on Hopper (flash_attn._dependent_launch)
    for p in fn.params:  # constexpr parameters left at their defaults
        if p.is_constexpr and p.name not in consts:
            consts[p.name] = p.default
    sig = signature(fn, descs, bm, bn, d, dtype, consts["DIM"] != d)
    for k in consts:
        sig[k] = "constexpr"
    src = ASTSource(fn, sig, constexprs=consts)
    opts = {"num_warps": warps, "num_stages": stages, **flash_attn.FP_FUSION}  # as flash_attn launches
    k = triton.compile(src, target=TARGET, options=opts)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    ptxas = get_ptxas(90).path  # the ptxas Triton runs for sm_90 (3.9: its CUDA 13 one)
    log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, spill.groups() if spill else ("?", "?"),
            k.metadata.shared, "wgmma" in k.asm["ptx"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--which", default="fwd,dkdv,dq")
    p.add_argument("--causal", type=int, default=1)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--docs", type=int, default=0)
    args = p.parse_args()
    width = flash_attn._width(args.head_dim)
    for which in args.which.split(","):
        fn = flash_attn.KERNELS[which][0]
        for variant in flash_attn.VARIANTS[which]:
            for bm, bn, w, s in flash_attn.TILES[which]:
                consts = dict(HEAD_DIM=width, DIM=args.head_dim, IS_CAUSAL=bool(args.causal), PRECISION="tf32",
                              HAS_DOCS=bool(args.docs), BLOCK_M=bm, BLOCK_N=bn, **variant)
                if not args.docs:
                    consts["Docs"] = None  # no document pointer: the kernels never read it
                if not flash_attn._fits(which, (bm, bn, w, s), width):
                    print(f"{which:5s} {fn.__name__:24s} {variant} tile {(bm, bn, w, s)}: does not fit (pruned)")
                    continue
                try:
                    regs, (st, ld), smem, wgmma = compile_one(fn, consts, bm, bn, width, w, s, args.dtype)
                    print(f"{which:5s} {fn.__name__:24s} {variant} tile {(bm, bn, w, s)}: {regs} regs, "
                          f"spill st/ld {st}/{ld} B, smem {smem} B{'' if wgmma else ', NO wgmma'}",
                          flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"{which:5s} {fn.__name__:24s} {variant} tile {(bm, bn, w, s)}: FAILED "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)


if __name__ == "__main__":
    main()
