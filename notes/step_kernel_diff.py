"""Where two attentions' compiled training steps differ on the GPU: every kernel's microseconds per step
(five profiled steps after eight warm-up steps) with attn_impl sdpa and flash, the largest differences
first, and each step's GPU time against its busy time; then where the GPU idles between kernels (the
gaps of its timeline, summed by the kernels on either side). The profiled steps are issued while the GPU
sleeps (a head start of --sleep_ms; 1000 left the sdpa step host-bound under the profiler, 3000 did not),
so that the gaps are the GPU's own, not the profiled host's. Busy time sums the kernels' spans, which
overlap under programmatic dependent launch (flash_attn._dependent_launch: a kernel starts, and waits,
during the previous one's end), so it can exceed the GPU time.

    python notes/step_kernel_diff.py [134m|1b] [--sleep_ms 3000]   # bench_train.py's shapes and steps
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_train  # noqa: E402


def kernel_times(impl, shape_name, sleep_ms, warmup=8, steps=5):
    """{kernel name: (microseconds per step, calls per step)} of one implementation, its GPU
    microseconds per step under the profiler (issued behind a sleep of sleep_ms), and its GPU
    timeline's gaps: {(kernel before, kernel after): (microseconds per step, gaps per step)}."""
    shape, batch, seq = bench_train.SHAPES[shape_name]
    torch.manual_seed(0)
    model, step = bench_train.IMPLS[impl](shape, batch, seq)
    xy = bench_train.random_documents(batch, seq, shape["vocab_size"], torch.Generator().manual_seed(0)).cuda()
    x, y = xy[:, :-1], xy[:, 1:]
    for _ in range(warmup):
        step(x, y)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10 ** 8)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10 ** 8 / start.elapsed_time(end)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        end.record()
        issued = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / steps * 1e3
    # (when the launch queue fills the host waits for the GPU: issued then exceeds sleep_ms while the
    # host stays a queue ahead of the GPU)
    print(f"{impl}: the host issued {steps} profiled steps in {issued:.0f} ms, behind a {sleep_ms} ms GPU sleep")
    times = {e.key: (e.self_device_time_total / steps, e.count / steps) for e in prof.key_averages()
             if e.device_type != DeviceType.CPU and 0 < e.self_device_time_total < 10 ** 5 * steps}
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type != DeviceType.CPU and 0 < e.time_range.end - e.time_range.start < 10 ** 5)
    gaps = {}
    for (_, end, before), (start, _, after) in zip(spans, spans[1:]):
        if start > end:
            key = (before[:60], after[:60])
            us, n = gaps.get(key, (0.0, 0))
            gaps[key] = (us + (start - end) / steps, n + 1 / steps)
    del model, step
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return times, wall, gaps


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shape", nargs="?", default="134m", choices=sorted(bench_train.SHAPES))
    p.add_argument("--sleep_ms", type=int, default=3000, help="the GPU's head start before the profiled steps")
    args = p.parse_args()
    runs, idle = {}, {}
    for impl in ("ours_compile", "ours_compile_flash"):
        runs[impl], wall, idle[impl] = kernel_times(impl, args.shape, args.sleep_ms)
        print(f"{impl}: GPU {wall:.0f} us per step (profiled), busy {sum(t for t, _ in runs[impl].values()):.0f}, "
              f"{sum(n for _, n in runs[impl].values()):.0f} kernels per step, idle between them "
              f"{sum(t for t, _ in idle[impl].values()):.0f} us in {sum(n for _, n in idle[impl].values()):.0f} gaps")
    sdpa, flash = runs["ours_compile"], runs["ours_compile_flash"]
    rows = sorted(((flash.get(k, (0, 0)), sdpa.get(k, (0, 0)), k) for k in set(sdpa) | set(flash)),
                  key=lambda r: -abs(r[0][0] - r[1][0]))
    print("flash - sdpa us | sdpa us (calls) | flash us (calls) | kernel")
    for (tf, cf), (ts, cs), name in rows[:40]:
        print(f"{tf - ts:8.1f} | {ts:8.1f} ({cs:4.0f}) | {tf:8.1f} ({cf:4.0f}) | {name[:150]}")
    for impl, gaps in idle.items():
        print(f"\n{impl}: the GPU's idle microseconds per step between two kernels, largest first")
        for (before, after), (us, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:15]:
            print(f"{us:8.1f} ({n:4.0f} gaps) | {before} -> {after}")
