"""Is the compiled training step host-bound? bench_train.py's step with attn_impl sdpa and flash, both
built and compiled once, then timed round after round, interleaved:
  - wall: milliseconds per step over 30 steps (as bench_train.py times them);
  - host: milliseconds the host takes to issue one step while the GPU sleeps behind 200 ms of
    torch.cuda._sleep (so the launch queue never blocks it), the median and the largest of --host_samples;
  - head start: milliseconds per step with a 5 ms GPU sleep before each step, minus the 5 ms: the
    GPU's own time per step, when the host is never behind.
Where host is near the GPU's step, the wall time pays for the host's slower steps; the head-start
ratio is the attentions' ratio on the GPU alone. The garbage collector's collections and their
milliseconds (gc.callbacks) are counted per attention over all rounds. --gc_freeze moves every object
alive after warm-up out of the collector's reach (gc.freeze).
--triton_launch: another row, the flash step with Triton's own kernel launcher instead of
flash_attn._launcher's; --no_pdl: another, the flash step without programmatic dependent launch;
--no_replay: another, the flash step with every operator call running its path (flash_attn.DIRECT_LAUNCH,
PDL or REPLAY off around the row's rounds, each switch followed by an untimed step).
--cprofile N: then cProfile over N issued steps of each attention (each behind a GPU sleep), its costliest
functions by own time; and, unprofiled, the host microseconds per forward and backward call spent in
flash_attn._replayed over N issued steps (the operators' Python as the compiled step runs it), with
replays and without.

    python notes/step_host.py [134m|1b] [--rounds 3] [--gc_freeze] [--triton_launch] [--no_pdl] [--no_replay]
                              [--cprofile 5]
"""
import argparse
import cProfile
import gc
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import bench_train  # noqa: E402
import flash_attn  # noqa: E402

IMPLS = ("ours_compile", "ours_compile_flash")
TRITON_LAUNCH, NO_PDL, NO_REPLAY = "flash, Triton's launch", "flash, no PDL", "flash, no replay"
SWITCHES = {TRITON_LAUNCH: "DIRECT_LAUNCH", NO_PDL: "PDL", NO_REPLAY: "REPLAY"}  # row -> flash_attn's switch off


def sleep_ms(ms, cycles_per_ms):
    torch.cuda._sleep(int(ms * cycles_per_ms))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shape", nargs="?", default="134m", choices=sorted(bench_train.SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--host_samples", type=int, default=9)
    p.add_argument("--cprofile", type=int, default=0, metavar="N")
    p.add_argument("--gc_freeze", action="store_true", help="gc.freeze() after warm-up")
    p.add_argument("--triton_launch", action="store_true", help="also the flash step with Triton's launcher")
    p.add_argument("--no_pdl", action="store_true", help="also the flash step without dependent launch")
    p.add_argument("--no_replay", action="store_true", help="also the flash step without replayed calls")
    args = p.parse_args()
    shape, batch, seq = bench_train.SHAPES[args.shape]
    xy = bench_train.random_documents(batch, seq, shape["vocab_size"], torch.Generator().manual_seed(0)).cuda()
    x, y = xy[:, :-1], xy[:, 1:]
    steps = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        steps[impl] = bench_train.IMPLS[impl](shape, batch, seq)[1]
        for _ in range(8):  # compile, tune
            steps[impl](x, y)
    for row, wanted in ((TRITON_LAUNCH, args.triton_launch), (NO_PDL, args.no_pdl), (NO_REPLAY, args.no_replay)):
        if wanted:
            steps[row] = steps["ours_compile_flash"]
    torch.cuda.synchronize()
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 100_000_000 / start.elapsed_time(end)
    res = {impl: {"wall": [], "host": [], "host max": [], "head start": []} for impl in steps}
    gc_time = {impl: [0, 0.0] for impl in steps}  # collections, milliseconds
    gc_start = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_time[impl][0] += 1
            gc_time[impl][1] += (time.perf_counter() - gc_start[0]) * 1e3
    gc.callbacks.append(on_gc)
    for _ in range(args.rounds):
        for impl, step in steps.items():  # (on_gc counts for impl)
            if set(steps) & set(SWITCHES):
                use_switches(impl, step, x, y)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            torch.cuda.synchronize()
            res[impl]["wall"].append((time.perf_counter() - t0) / args.steps * 1e3)
            host = []
            for _ in range(args.host_samples):
                sleep_ms(200, cycles_per_ms)
                t0 = time.perf_counter()
                step(x, y)
                host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
            res[impl]["host"].append(sorted(host)[len(host) // 2])
            res[impl]["host max"].append(max(host))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sleep_ms(5, cycles_per_ms)
                step(x, y)
            torch.cuda.synchronize()
            res[impl]["head start"].append((time.perf_counter() - t0) / args.steps * 1e3 - 5)
    print(f"{torch.cuda.get_device_name()}, {args.shape}{', gc.freeze()' if args.gc_freeze else ''}: "
          "milliseconds per step, one value per round")
    for impl, d in res.items():
        print(f"{impl:20s}", " | ".join(f"{k} " + " / ".join(f"{v:.2f}" for v in vals) for k, vals in d.items()))
    for impl, (n, ms) in gc_time.items():
        print(f"{impl:20s} garbage collections: {n}, {ms:.1f} ms in all")
    gc.callbacks.remove(on_gc)  # (cProfile below: not counted)
    if set(steps) & set(SWITCHES):
        use_switches(None, steps["ours_compile_flash"], x, y)
    sdpa = res["ours_compile"]
    for impl in [i for i in steps if i != "ours_compile"]:
        for k in ("wall", "head start"):
            print(f"{impl} / sdpa speed, {k}:", " ".join(f"{a / b:.4f}" for a, b in zip(sdpa[k], res[impl][k])))
    for row in SWITCHES:
        steps.pop(row, None)
    for impl, step in steps.items() if args.cprofile else ():
        prof = cProfile.Profile()
        for _ in range(args.cprofile):
            sleep_ms(200, cycles_per_ms)
            prof.enable()
            step(x, y)
            prof.disable()
            torch.cuda.synchronize()
        print(f"=== {impl}: cProfile of {args.cprofile} issued steps")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    for replay in (True, False) if args.cprofile else ():
        flash_attn.REPLAY = replay
        op_host_us(steps["ours_compile_flash"], x, y, args.cprofile, cycles_per_ms)
    flash_attn.REPLAY = True


def use_switches(impl, step, x, y):
    """flash_attn's switches as row impl wants them (SWITCHES: its own off, the others on); the launch
    and replay caches emptied and refilled by two untimed steps."""
    for row, switch in SWITCHES.items():
        setattr(flash_attn, switch, impl != row)
    flash_attn._COMPILED.clear()
    flash_attn._PLANS.clear()
    step(x, y)
    step(x, y)  # (recorded)
    torch.cuda.synchronize()


def op_host_us(step, x, y, n, cycles_per_ms):
    """Host microseconds per forward and backward call in flash_attn._replayed (an operator's body) over
    n issued steps, replayed or not as flash_attn.REPLAY says."""
    replayed = flash_attn._replayed
    spent = {flash_attn._forward: [], flash_attn._backward: []}

    def timed(path, *args):
        t0 = time.perf_counter()
        out = replayed(path, *args)
        spent[path].append(time.perf_counter() - t0)
        return out
    flash_attn._replayed = timed
    try:
        for _ in range(n):
            sleep_ms(200, cycles_per_ms)
            step(x, y)
            torch.cuda.synchronize()
    finally:
        flash_attn._replayed = replayed
    for path, t in spent.items():
        t = sorted(t)
        print(f"flash_attn.{path.__name__} in the issued step, REPLAY={flash_attn.REPLAY}: {len(t)} calls, median "
              f"{t[len(t) // 2] * 1e6:.1f} us, max {t[-1] * 1e6:.1f} us, {sum(t) * 1e3 / n:.2f} ms per step")


if __name__ == "__main__":
    main()
