"""Where flash_attn_func's host time goes on a GPU: cProfile of many tiny calls (the GPU finishes each
before the host issues the next), top functions by own time, per path (Hopper hd128, portable hd64),
forward and forward + backward. Also times the pieces alone: one Triton launch, one TensorDescriptor.
--launch: the two operators' host time per call (one head, bench_train.py's shapes) with Triton's own
kernel launcher, with flash_attn._launcher's, and replayed (flash_attn._replayed), interleaved over rounds.
--ops: the two operators that a compiled training step calls (flash_attn::forward, ::backward) at
bench_train.py's attention shapes: GPU time per call at the full shape, host time per call (one head:
the GPU idles), SDPA cuDNN's for comparison, and where the operators' host time goes.

    python notes/host_profile.py [--calls 2000]
    python notes/host_profile.py --ops [--sort ncalls]
    python notes/host_profile.py --pieces
    python notes/host_profile.py --launch [--rounds 3]
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


SHAPES = {"134m": (16, 1024, 12, 12, 64), "1b": (4, 2048, 16, 8, 128)}  # B, T, H, H_kv, D (bench_train.SHAPES)


def ops(calls, top, sort="tottime"):
    """GPU and host microseconds per call of each op, and SDPA cuDNN's through autograd (its ops' own
    argument lists change between torch releases), then cProfile of the ops' host path."""
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fwd_op, bwd_op = torch.ops.flash_attn.forward.default, torch.ops.flash_attn.backward.default
    for name, (B, T, H, H_kv, D) in SHAPES.items():
        for label, (b, h, h_kv) in (("full", (B, H, H_kv)), ("one head", (1, H // H_kv, 1))):
            q = torch.randn(b, T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(b, T, h_kv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2))
            scale = D ** -0.5
            out, lse = fwd_op(q, k, v, None, True, scale, T, 0)
            do = torch.randn_like(out)
            fwd = lambda: fwd_op(q, k, v, None, True, scale, T, 0)  # noqa: E731
            bwd = lambda: bwd_op(do, q, k, v, out, lse, None, True, scale, T, 0)  # noqa: E731
            kv = [x.repeat_interleave(h // h_kv, 2).transpose(1, 2) for x in (k, v)]

            def sdpa_fwd():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), *kv, is_causal=True)
            o = sdpa_fwd()
            sdpa_both = lambda: torch.autograd.grad(sdpa_fwd(), (q, ), o)  # noqa: E731
            ours_both = lambda: torch.autograd.grad(flash_attn.flash_attn_func(q, k, v), (q, ), do)  # noqa: E731
            if label == "full":
                timed = (("fwd op", fwd), ("bwd op", bwd), ("sdpa fwd", sdpa_fwd), ("sdpa fwd+bwd", sdpa_both))
                us = {n: 1e3 * triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") for n, f in timed}
            else:
                timed = (("fwd op", fwd), ("bwd op", bwd), ("sdpa fwd", sdpa_fwd), ("sdpa fwd+bwd", sdpa_both),
                         ("ours fwd+bwd", ours_both))
                us = {n: per_call_us(f, calls) for n, f in timed}
            hopper = [d for d in ("forward", "backward") if flash_attn._hopper(q, d)]
            print(f"{name} {label} (B={b} T={T} H={h}/{h_kv} D={D}; hopper: {', '.join(hopper) or 'none'}) "
                  f"{'GPU' if label == 'full' else 'host'} us per call: "
                  + ", ".join(f"{n} {t:.1f}" for n, t in us.items()), flush=True)
        for n, f in (("fwd op", fwd), ("bwd op", bwd)):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls // 4):
                f()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\n=== {name} {n}, one head, {calls // 4} calls")
            pstats.Stats(prof).sort_stats(sort).print_stats(top)


def hopper_pieces(calls):
    """Host microseconds of each piece of one Hopper forward call at the 134M shape (one head): the
    operator's replayed call, its replay alone (the rest is the dispatcher and _replayed's key), its
    allocations, its four descriptors, and its launch through the cached launcher alone (the arguments
    of one call, recorded); and a torch.zeros(1), the tile counter's cost per call before a6b4860."""
    import flash_attn_hopper as fh
    q, k, v = (torch.randn(1, 1024, 1, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    forward = lambda: fh.forward(q, k, v, True, 0.125, 1024, 0, flash_attn._lse_len(1024))  # noqa: E731
    forward()  # compiles; _run keeps the launcher
    run, recorded = flash_attn._run, []
    flash_attn._run = lambda kernel, grid, *args, **kw: recorded.append(args) or run(kernel, grid, *args, **kw)
    try:
        forward()
    finally:
        flash_attn._run = run
    (launcher, tail), = [hit for key, hit in flash_attn._COMPILED.items() if key[0] is fh._fwd_kernel]
    op = lambda: torch.ops.flash_attn.forward.default(q, k, v, None, True, 0.125, 1024, 0)  # noqa: E731
    op(), op()  # recorded, then replayed
    plan, = [p for p in flash_attn._PLANS.values() if p]
    pieces = {
        "operator call, replayed": op,
        "its replay alone (allocations, CUtensorMaps, launch)": lambda: plan((q, k, v, None)),
        "torch.empty_strided x 2": lambda: (torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device="cuda"),
                                            torch.empty_strided((1, 1, 1024), (1024, 1024, 1), device="cuda")),
        "whole forward, not replayed": forward,
        "4 descriptors": lambda: [fh._desc(x, 64) for x in (q, k, v, q)],
        "cached launcher alone": lambda: launcher(*recorded[0], *tail),
        "torch.zeros(1)": lambda: torch.zeros(1, device="cuda", dtype=torch.int32),
    }
    for name, fn in pieces.items():
        print(f"hopper forward piece, {name}: {per_call_us(fn, calls):.1f} us", flush=True)


def launch_ab(calls, rounds):
    """Host us per call of flash_attn::forward and ::backward at bench_train's shapes with one head (the
    GPU idles): each kernel launched by Triton's launcher (compiled[grid]), by flash_attn._launcher's,
    and the whole call replayed (flash_attn._replayed)."""
    fwd_op, bwd_op = torch.ops.flash_attn.forward.default, torch.ops.flash_attn.backward.default
    try:
        for name, (B, T, H, H_kv, D) in SHAPES.items():
            q = torch.randn(1, T, H // H_kv, D, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, T, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            out, lse = fwd_op(q, k, v, None, True, D ** -0.5, T, 0)
            do = torch.randn_like(out)
            ops = {"fwd op": lambda: fwd_op(q, k, v, None, True, D ** -0.5, T, 0),
                   "bwd op": lambda: bwd_op(do, q, k, v, out, lse, None, True, D ** -0.5, T, 0)}
            for r in range(rounds):
                for label, direct, replay in (("triton", False, False), ("_launcher", True, False),
                                              ("replayed", True, True)):
                    flash_attn.DIRECT_LAUNCH, flash_attn.REPLAY = direct, replay
                    flash_attn._COMPILED.clear()
                    flash_attn._PLANS.clear()
                    us = {n: per_call_us(f, calls) for n, f in ops.items()}
                    print(f"{name} one head (T={T} D={D}), round {r}, {label}: host us per call "
                          + ", ".join(f"{n} {t:.1f}" for n, t in us.items()), flush=True)
    finally:
        flash_attn.DIRECT_LAUNCH = flash_attn.REPLAY = True
        flash_attn._COMPILED.clear()
        flash_attn._PLANS.clear()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--ops", action="store_true", help="the operators at bench_train.py's shapes instead")
    p.add_argument("--pieces", action="store_true", help="the pieces of one Hopper forward call instead")
    p.add_argument("--sort", default="tottime", help="--ops' cProfile order: tottime, ncalls, cumtime")
    p.add_argument("--launch", action="store_true",
                   help="Triton's launcher against flash_attn._launcher's and replayed calls")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    if a.ops:
        return ops(a.calls, a.top, a.sort)
    if a.pieces:
        return hopper_pieces(a.calls)
    if a.launch:
        return launch_ab(a.calls, a.rounds)
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
