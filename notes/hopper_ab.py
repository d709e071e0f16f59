"""flash_attn_hopper against copies of it with a text substitution (CHANGES), in one GPU process: each
copy checked against the float64 reference first (fresh ragged inputs, both masks), then timed
interleaved with the shipped module and SDPA cuDNN, round after round.

    python notes/hopper_ab.py --names fence [--direction forward|backward] [--head-dims 128 64]
    git show REV:flash_attn_hopper.py > old.py; python notes/hopper_ab.py --names --also old.py  # against REV
    # (before 43653ff its backward calls flash_attn._cast without ROW: add ", 1" after "dq.numel()" in old.py)
    python notes/hopper_ab.py --names --also old.py --head-dims 128 --shapes 4,4224,16 2,6000,16  # B,T,heads

Unlike notes/hopper_ablations.py (parts taken out, results wrong), a change here is a candidate to ship.
Measured: notes/flash_attn_bench.md.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import flash_attn  # noqa: E402
import flash_attn_hopper as fh  # noqa: E402
from hopper_ablations import ablated  # noqa: E402
from hopper_variants import median_ms  # noqa: E402

CHANGES = {  # name: [(text in flash_attn_hopper.py, its replacement)]
    # ptxas schedules the forward's wait for P V right after the wait for S, above the softmax, so that a
    # warpgroup's softmax never overlaps its own P V (seen in the SASS); a never-taken branch between the
    # softmax and the wait is a block boundary ptxas does not hoist the wait across. Measured (H200,
    # 2026-12-04, two runs): head dim 128 +0-1.6% from 4k tokens, -3-5% at 1k; head dim 64 -4-8%. Not kept
    "fence": [("                                                     qk_scale)\n"
               "            acc = warpgroup_mma_wait(0, deps=[o_tok])\n",
               "                                                     qk_scale)\n"
               "            if start_n > T:  # never\n"
               "                gl.store(Lse + rows, l_i)\n"
               "            acc = warpgroup_mma_wait(0, deps=[o_tok])\n")],
}


def run(m, direction, q, k, v, do, causal, out_lse=None):
    """Out (forward) or dq, dk, dv (backward, from out_lse if given) of module m."""
    T, D = q.shape[1], q.shape[3]
    left, right = flash_attn._window(causal, None, T, T)
    if direction == "forward" or out_lse is None:
        out_lse = m.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T))
    if direction == "forward":
        return out_lse[:1]
    return m.backward(do, q, k, v, *out_lse, D ** -0.5, left, right)


def check(m, direction, D):
    """Fresh ragged inputs (3000 tokens, grouped heads) against the float64 reference: 'ok' or what is wrong."""
    for causal in (True, False):
        q, do = (torch.randn(3, 3000, 16, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(3, 3000, 8, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        got = run(m, direction, q, k, v, do, causal)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = flash_attn.attention_reference(*leaves, causal=causal)[0]
        want = (ref, ) if direction == "forward" else torch.autograd.grad(ref, leaves, do.double())
        for name, g, w in zip("oqkv" if direction == "forward" else "qkv", got, want):
            err = ((g.double() - w).norm() / w.norm()).item()
            if not err < 2e-2:
                return f"WRONG (causal={causal}: {name} {err:.2e})"
    return "ok"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--names", nargs="*", default=list(CHANGES), choices=list(CHANGES))
    p.add_argument("--also", nargs="*", default=[], metavar="FILE", help="other versions of flash_attn_hopper.py")
    p.add_argument("--direction", default="forward", choices=["forward", "backward"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[128, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", nargs="+", metavar="B,T,H", help="batch, tokens, heads (default: 16k tokens per "
                   "batch and 2048 = heads x head dim at 1k-16k tokens)")
    args = p.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    source = open(fh.__file__).read()
    modules = {"kept": fh, **{name: ablated(name, source, CHANGES[name]) for name in args.names},
               **{path: ablated(os.path.basename(path)[:-3], open(path).read(), []) for path in args.also}}
    shapes = "" if args.shapes else ", 16k tokens per batch"
    print(f"GPU: {torch.cuda.get_device_name()}; {args.direction} TFLOP/s{shapes}")
    for D in args.head_dims:
        print(f"head dim {D}: " + ", ".join(f"{n} {check(m, args.direction, D)}" for n, m in modules.items()))
    print("| change | head dim | mask | B, seqlen, heads | TFLOP/s | kept | cuDNN | change / kept | change / cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for D in args.head_dims:
        for causal in (True, False):
            for B, T, H in ([tuple(map(int, s.split(","))) for s in args.shapes] if args.shapes else
                            [(16384 // T, T, 2048 // D) for T in (1024, 2048, 4096, 8192, 16384)]):
                q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1) * (2.5 if args.direction == "backward" else 1)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                    def cudnn():
                        if args.direction == "forward":
                            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                        return torch.autograd.grad(ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True)
                    out_lse = fh.forward(q, k, v, causal, D ** -0.5, *flash_attn._window(causal, None, T, T),
                                         flash_attn._lse_len(T))  # the backward's inputs
                    fns = {n: (lambda m=m: run(m, args.direction, q, k, v, do, causal, out_lse))
                           for n, m in modules.items()}
                    with torch.no_grad() if args.direction == "forward" else torch.enable_grad():
                        ms = median_ms({**fns, "cuDNN": cudnn}, args.rounds)
                tf = {n: flops / t * 1e-9 for n, t in ms.items()}
                for n in modules:
                    if n == "kept":
                        continue
                    print(f"| {n} | {D} | {'causal' if causal else 'full'} | {B}, {T}, {H} | {tf[n]:.0f} | {tf['kept']:.0f} | "
                          f"{tf['cuDNN']:.0f} | {tf[n] / tf['kept']:.3f} | {tf[n] / tf['cuDNN']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
