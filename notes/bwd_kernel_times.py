"""The GPU kernels of one attention backward, ours (flash_attn_hopper.backward) and SDPA cuDNN's, from
torch.profiler: each kernel's microseconds per call, so that the main kernels compare apart from the
preparation (delta = rowsum(dO * O), dQ's float32 buffer zeroed) and dQ's conversion to bf16.

    python notes/bwd_kernel_times.py                      # bench_attention's shapes, head dim 128 and 64
    python notes/bwd_kernel_times.py --shapes 4,4096,16,128,0 2,8192,16,128,1   # B,T,heads,head dim,causal

Our conversion (flash_attn._cast) is launched as a dependent of the main kernel (programmatic dependent
launch): its programs start while the main kernel's last ones run and wait for it, so its time here
includes that wait, and the sum of the kernels can exceed the backward's wall time. Measured:
notes/flash_attn_bench.md (2026-12-04, twentieth session).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import flash_attn  # noqa: E402
import flash_attn_hopper as fh  # noqa: E402

SHAPES = [(4, 4096, 16, 128, False), (1, 16384, 16, 128, False), (2, 8192, 16, 128, True), (16, 1024, 16, 128, False),
          (4, 4096, 32, 64, False)]


def kernel_us(fn, calls=10):
    """{kernel name: (microseconds per call of fn, launches per call)} over `calls` calls after a warmup."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: (e.device_time_total / calls, e.count // calls) for e in prof.key_averages()
            if e.device_time_total > 0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", metavar="B,T,H,D,CAUSAL", help="default: " + " ".join(
        ",".join(str(int(x)) for x in s) for s in SHAPES))
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print(f"GPU: {torch.cuda.get_device_name()}; microseconds per backward, per kernel (launches per backward)")
    for B, T, H, D, causal in shapes:
        causal = bool(causal)
        q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        left, right = flash_attn._window(causal, None, T, T)
        out, lse = fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T))
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        fns = {"ours": lambda: fh.backward(do, q, k, v, out, lse, D ** -0.5, left, right),
               "cuDNN": lambda: torch.autograd.grad(ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True)}
        flops = 2.5 * 4 * B * H * T * T * D * (0.5 if causal else 1)
        for name, fn in fns.items():
            times = kernel_us(fn)
            main_us = max(us for us, _ in times.values())  # the main kernel is the longest
            parts = "; ".join(f"{kernel[:40]} {us:.0f} (x{n})" for kernel, (us, n) in
                              sorted(times.items(), key=lambda item: -item[1][0]))
            print(f"{B} x {T} x {H}, head dim {D}, {'causal' if causal else 'full'}, {name}: main kernel "
                  f"{flops / main_us * 1e-6:.0f} TFLOP/s; {parts}", flush=True)


if __name__ == "__main__":
    main()
