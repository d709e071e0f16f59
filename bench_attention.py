"""TFLOP/s of attention forward and backward: flash_attn.py vs torch SDPA's flash and cuDNN backends.

    python bench_attention.py                                  # seqlen 1k-16k, head dims 64/128, causal and not
    python bench_attention.py --seqlens 2048,8192 --causal 1   # a subset
    python bench_attention.py --tiles --seqlens 8192 --head-dims 128 --causal 1   # time every tile config
    python bench_attention.py --host                           # host (CPU) microseconds per call
    python bench_attention.py --seqlens 4096 --head-dims 128 --dim 4096 --group 4   # 32 query / 8 kv heads
    python bench_attention.py --models                         # published models' attention shapes, causal

All four (this kernel, flash_attn.py's portable kernels, SDPA flash, SDPA cuDNN) run in the same process
on the same inputs, (batch, seqlen, heads, headdim) bf16 with batch * seqlen = --tokens and heads *
headdim = --dim (--group query heads per kv head; SDPA gets k, v with each kv head repeated, made before
the timing, as its cuDNN kernel takes no grouped heads). FLOPs: forward 4 * B * H * T^2 * D (two
matmuls), halved when causal; backward 2.5x forward (five matmuls instead of two). Times are medians of
triton.testing.do_bench (CUDA events), after a warm-up that includes autotuning.
"""
import argparse
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn
from flash_attn import flash_attn_func


def sdpa(backend):
    def f(q, k, v, causal):  # SDPA wants (B, H, T, D): transposed views of the same tensors
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)
    return f


IMPLS = {"triton": lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal),
         "portable": lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal),  # with HOPPER off
         "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
         "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def bench_one(fn, q, k, v, causal):
    """(forward ms, backward ms); nan where the backend refuses the shape."""
    try:
        out = fn(q, k, v, causal)
        dout = torch.randn_like(out)
        fwd = triton.testing.do_bench(lambda: fn(q, k, v, causal), warmup=50, rep=200, return_mode="median")
        bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                      warmup=50, rep=200, return_mode="median")
        return fwd, bwd
    except RuntimeError as e:
        print(f"  ({e.__class__.__name__}: {str(e).splitlines()[0][:100]})")
        return float("nan"), float("nan")


def time_tiles(q, k, v, causal, flops):
    """Each kernel's tile configs in turn (the others on their defaults): what the autotuner sees."""
    fn = IMPLS["portable"]
    flash_attn.HOPPER = False
    for which, tiles in flash_attn.TILES.items():
        for tile in tiles:
            if not flash_attn._fits(which, tile, q.shape[-1]):
                continue
            flash_attn.FORCE_TILES = {w: flash_attn.TILES[w][0] for w in flash_attn.TILES} | {which: tile}
            fwd, bwd = bench_one(fn, q, k, v, causal)
            print(f"  {which:4s} tile (BLOCK_M, BLOCK_N, warps, stages)={tile}: fwd {fwd:.3f} ms "
                  f"({flops / fwd * 1e-9:.0f} TFLOP/s), bwd {bwd:.3f} ms ({2.5 * flops / bwd * 1e-9:.0f} TFLOP/s)",
                  flush=True)
    flash_attn.FORCE_TILES = {}
    flash_attn.HOPPER = True


def per_call_us(call, n=2000):
    """Wall microseconds per call() over n calls after a warm-up; on inputs so small that the GPU
    finishes each call before the host has issued the next, that is the host's time (Python, checks,
    launches). Also notes/host_profile.py's."""
    for _ in range(100):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def host_us(fn, q, k, v, causal, backward):
    """Host time per call of fn (per_call_us), forward or forward + autograd.grad."""
    dout = torch.randn_like(fn(q, k, v, causal))
    if backward:
        return per_call_us(lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout))
    return per_call_us(lambda: fn(q, k, v, causal))


def time_host(dtype):
    """The per-call host cost of each implementation: at 1k tokens a forward is 40-100 us of GPU
    work, so a host that needs longer leaves the GPU idle between calls."""
    print("host us per call (batch 1, seqlen 128, 2 heads, causal): forward / forward + backward")
    for D in (64, 128):
        q, k, v = (torch.randn(1, 128, 2, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        for name, fn in IMPLS.items():
            flash_attn.HOPPER = name != "portable"
            fwd, both = (host_us(fn, q, k, v, True, backward) for backward in (False, True))
            print(f"  head dim {D:3d}  {name:10s} {fwd:6.1f} / {both:6.1f}", flush=True)
        flash_attn.HOPPER = True


# (model, batch, seqlen, query heads, kv heads, head dim): the attention of published models at a few
# training batches, and shapes with few programs (8 heads) or an odd length
MODEL_SHAPES = [("Llama-3-8B", 1, 8192, 32, 8, 128), ("Llama-3-8B", 2, 4096, 32, 8, 128),
                ("Llama-3-8B", 4, 2048, 32, 8, 128), ("Llama-2-7B", 2, 4096, 32, 32, 128),
                ("Llama-2-13B", 1, 4096, 40, 40, 128), ("Qwen2.5-7B", 2, 4096, 28, 4, 128),
                ("Llama-3.2-1B", 4, 4096, 32, 8, 64), ("SmolLM2-135M", 8, 2048, 9, 3, 64),
                ("SmolLM2-360M", 8, 2048, 15, 5, 64), ("GPT-2", 16, 1024, 12, 12, 64), ("8 heads", 1, 4096, 8, 8, 128),
                ("odd length", 3, 3000, 20, 20, 128), ("long", 1, 32768, 32, 8, 128)]


def time_models(dtype):
    """flash_attn_func against SDPA cuDNN at MODEL_SHAPES, causal: the better of two rounds each."""
    ours, cudnn = IMPLS["triton"], IMPLS["sdpa-cudnn"]
    print("| model | batch, seqlen, heads q / kv, head dim | ours fwd / bwd | SDPA cuDNN fwd / bwd | ours / cuDNN |")
    print("| --- | --- | --- | --- | --- |")
    for name, B, T, H, H_kv, D in MODEL_SHAPES:
        q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
        k, v = (torch.randn(B, T, H_kv, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
        kx, vx = (x.detach().repeat_interleave(H // H_kv, 2).requires_grad_() for x in (k, v))  # for SDPA
        times = {"ours": [], "cudnn": []}
        for _ in range(2):
            times["ours"].append(bench_one(ours, q, k, v, True))
            times["cudnn"].append(bench_one(cudnn, q, kx, vx, True))
        (of, ob), (cf, cb) = ([min(t[i] for t in times[n]) for i in (0, 1)] for n in ("ours", "cudnn"))
        flops = 2 * B * H * T * T * D  # causal: half of 4 B H T^2 D
        print(f"| {name} | {B}, {T}, {H} / {H_kv}, {D} | {flops / of * 1e-9:.0f} / {2.5 * flops / ob * 1e-9:.0f} | "
              f"{flops / cf * 1e-9:.0f} / {2.5 * flops / cb * 1e-9:.0f} | {cf / of:.2f} / {cb / ob:.2f} |", flush=True)
        del q, k, v, kx, vx


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--causal", default="1,0", help="comma list of 1 (causal) and/or 0")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    p.add_argument("--dim", type=int, default=2048, help="heads * head dim")
    p.add_argument("--group", type=int, default=1, help="query heads per kv head (grouped-query attention)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--tiles", action="store_true", help="time each tile config of flash_attn.py instead")
    p.add_argument("--host", action="store_true", help="host (CPU) microseconds per call instead")
    p.add_argument("--models", action="store_true", help="published models' attention shapes (MODEL_SHAPES) instead")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{args.dtype}, batch*seqlen={args.tokens}, heads*headdim={args.dim}, query heads per kv head={args.group}")
    if args.host:
        return time_host(dtype)
    if args.models:
        return time_models(dtype)

    rows = []
    for causal in [bool(int(c)) for c in args.causal.split(",")]:
        for D in [int(d) for d in args.head_dims.split(",")]:
            for T in [int(t) for t in args.seqlens.split(",")]:
                B, H = max(1, args.tokens // T), args.dim // D
                if H % args.group:
                    raise SystemExit(f"--group={args.group} does not divide the {H} query heads of head dim {D}")
                q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
                k, v = (torch.randn(B, T, H // args.group, D, device="cuda", dtype=dtype, requires_grad=True)
                        for _ in range(2))
                kx, vx = (x.detach().repeat_interleave(args.group, 2).requires_grad_() for x in (k, v))  # for SDPA
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                if args.tiles:
                    print(f"causal={causal:d} D={D} T={T} B={B} H={H}")
                    time_tiles(q, k, v, causal, flops)
                    continue
                tf = {}
                for name, fn in IMPLS.items():
                    # "portable": flash_attn.py's own kernels, also where flash_attn_hopper would run
                    # (on Hopper: head dim 128, and 64 on long sequences); each direction picks its kernels
                    flash_attn.HOPPER = name != "portable"
                    fwd, bwd = bench_one(fn, q, *((kx, vx) if name.startswith("sdpa") else (k, v)), causal)
                    tf[name] = (flops / fwd * 1e-9, 2.5 * flops / bwd * 1e-9)
                flash_attn.HOPPER = True
                rows.append((causal, D, T, tf))
                t, fl, cu, po = tf["triton"], tf["sdpa-flash"], tf["sdpa-cudnn"], tf["portable"]
                print(f"causal={causal:d} D={D:3d} T={T:5d}  triton {t[0]:4.0f}/{t[1]:4.0f}  "
                      f"(portable {po[0]:4.0f}/{po[1]:4.0f})  "
                      f"flash {fl[0]:4.0f}/{fl[1]:4.0f}  cudnn {cu[0]:4.0f}/{cu[1]:4.0f}", flush=True)
                del q, k, v, kx, vx

    if not rows:
        return
    print("\nTFLOP/s fwd / bwd; ratios are triton over SDPA's backend; portable: flash_attn.py's own kernels\n"
          "(triton equals portable except where flash_attn_hopper runs: on Hopper, head dim 128 and 64 from 2k/8k)\n")
    print("| causal | head dim | seqlen | triton | portable | SDPA flash | SDPA cuDNN | vs flash | vs cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for causal, D, T, tf in rows:
        t, fl, cu, po = tf["triton"], tf["sdpa-flash"], tf["sdpa-cudnn"], tf["portable"]
        print(f"| {'yes' if causal else 'no'} | {D} | {T} | {t[0]:.0f} / {t[1]:.0f} | {po[0]:.0f} / {po[1]:.0f} | "
              f"{fl[0]:.0f} / {fl[1]:.0f} | "
              f"{cu[0]:.0f} / {cu[1]:.0f} | {t[0] / fl[0]:.2f} / {t[1] / fl[1]:.2f} | "
              f"{t[0] / cu[0]:.2f} / {t[1] / cu[1]:.2f} |")


if __name__ == "__main__":
    main()
