"""Where flash_attn_func's host time goes on a GPU: cProfile of many tiny calls (the GPU finishes each
before the host issues the next), top functions by own time, per path (Hopper hd128, portable hd64),
forward and forward + backward. Also times the pieces alone: one Triton launch, one TensorDescriptor.

    python notes/host_profile.py [--calls 2000]
"""
import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import flash_attn  # noqa: E402
from bench_attention import per_call_us  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=18)
    a = p.parse_args()
    for D in (128, 64):
        q, k, v = (torch.randn(1, 128, 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        fwd = lambda: flash_attn.flash_attn_func(q, k, v, causal=True)  # noqa: E731
        both = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)  # noqa: E731
        for name, fn in (("forward", fwd), ("forward+backward", both)):
            us = per_call_us(fn, a.calls)
            hopper = [d for d in ("forward", "backward") if flash_attn._hopper(q, d)]
            print(f"\n=== head dim {D} {name}: {us:.1f} us per call (hopper kernels: {', '.join(hopper) or 'none'})")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.calls // 4):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    # the pieces
    from triton.tools.tensor_descriptor import TensorDescriptor
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    desc_us = per_call_us(lambda: TensorDescriptor(x, [128, 256], [256, 1], [16, 128]), a.calls)
    print(f"TensorDescriptor(...) alone: {desc_us:.2f} us")
    print(f"torch.empty alone: {per_call_us(lambda: torch.empty(128, 256, device='cuda'), a.calls):.2f} us")


if __name__ == "__main__":
    main()
