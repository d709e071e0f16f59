"""Issue #4: flash_attn.py's backward variants against SDPA's flash and cuDNN backends, one process.

    python notes/kernel_bench.py                       # the key shapes, every variant
    python notes/kernel_bench.py --variants split,tma --shapes 128:8192:1

Per shape (head dim, seqlen, causal; bf16, batch*seqlen = 16384, heads*headdim = 2048): each
forward variant with the first backward variant, then each other backward variant with the
first forward variant ("fwd+bwd" rows: flash_attn.FWD_VARIANT / BWD_VARIANT), SDPA flash and
cuDNN, all on the same inputs; TFLOP/s as bench_attention.py counts them, and each pair's
output and gradients against the first pair's (max relative error, a sanity check; the GPU
tests check each against float64). Prints the tile each autotuned kernel picked.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flash_attn  # noqa: E402
from bench_attention import IMPLS, bench_one  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 dry runs of this script
SHAPES = "128:8192:1,128:2048:1,64:8192:1,128:8192:0"  # head dim : seqlen : causal


def grads(fn, q, k, v, causal, dout):
    out = fn(q, k, v, causal)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fwd", default=",".join(flash_attn.FWD_VARIANTS), help="forward variants")
    p.add_argument("--variants", default=",".join(flash_attn.BWD_VARIANTS), help="backward variants")
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--warmup-only", action="store_true", help="compile and autotune, print nothing (cache warm-up)")
    p.add_argument("--fwd-only", action="store_true", help="with --warmup-only: the forward only")
    args = p.parse_args()
    fwds, bwds = args.fwd.split(","), args.variants.split(",")
    variants = [f"{f}+{bwds[0]}" for f in fwds] + [f"{fwds[0]}+{b}" for b in bwds[1:]]
    import triton
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "none"
    print(f"GPU: {gpu}  torch {torch.__version__}  triton {triton.__version__}  "
          f"variants {variants}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        D, T, causal = (int(x) for x in shape.split(":"))
        causal = bool(causal)
        B, H = max(1, args.tokens // T), args.dim // D
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
        tf = lambda ms, bwd=False: (2.5 if bwd else 1.0) * flops / ms * 1e-9  # noqa: E731
        res = {}
        ref = None
        for name in variants:
            flash_attn.FWD_VARIANT, flash_attn.BWD_VARIANT = name.split("+")
            try:
                if args.fwd_only:
                    IMPLS["triton"](q, k, v, causal)
                    continue
                g = grads(IMPLS["triton"], q, k, v, causal, dout)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run: report, go on
                print(f"  D={D} T={T} causal={causal:d} {name}: FAILED {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
                continue
            if ref is None:
                ref = g
            err = max(rel(a, b) for a, b in zip(g, ref))
            if args.warmup_only:  # the grads above compiled and autotuned everything
                continue
            fwd, bwd = bench_one(IMPLS["triton"], q, k, v, causal)
            res[name] = (tf(fwd), tf(bwd, True), err)
            picked = {key: str(kern.best_config).split(", pre_hook")[0]
                      for key, kern in flash_attn._AUTOTUNED.items() if getattr(kern, "best_config", None)}
            print(f"  D={D} T={T} causal={causal:d} {name:12s} fwd {tf(fwd):4.0f} bwd {tf(bwd, True):4.0f} TFLOP/s "
                  f"(grad err vs {variants[0]} {err:.1e}) tiles {picked}", flush=True)
        if args.warmup_only:
            continue
        for name in ("sdpa-flash", "sdpa-cudnn"):
            fwd, bwd = bench_one(IMPLS[name], q, k, v, causal)
            res[name] = (tf(fwd), tf(bwd, True), 0.0)
            print(f"  D={D} T={T} causal={causal:d} {name} fwd {tf(fwd):4.0f} bwd {tf(bwd, True):4.0f}", flush=True)
        rows.append((D, T, causal, res))
        del q, k, v

    if args.warmup_only:
        return
    print("\nTFLOP/s fwd / bwd (fwd is the same kernel for every variant); x flash / x cuDNN = ratios\n")
    print("| head dim | seqlen | causal | impl | fwd | bwd | fwd x flash | bwd x flash | fwd x cuDNN | bwd x cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for D, T, causal, res in rows:
        fl, cu = res["sdpa-flash"], res["sdpa-cudnn"]
        for name, (f, b, _) in res.items():
            print(f"| {D} | {T} | {'yes' if causal else 'no'} | {name} | {f:.0f} | {b:.0f} | {f / fl[0]:.2f} | "
                  f"{b / fl[1]:.2f} | {f / cu[0]:.2f} | {b / cu[1]:.2f} |")


if __name__ == "__main__":
    main()
