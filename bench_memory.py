"""Memory against its models: ZeRO's bytes per rank against the book's formulas (zero.formula), and
a training step's peak against plan.py's prediction.

  python bench_memory.py [--dp=1,2,4] [--dtype=bfloat16] [--dim=256 --n_layers=4 --n_heads=4 --vocab_size=1024]
  python bench_memory.py --peak [--shapes=134m,1b] [--ckpt=none,selective,full] [--micro=1,2,4,8]
                         [--master=0,1] [--accum=1] [--steps=3] [--device=cuda|cpu] [--out=FILE.json]

The first: one CPU/gloo job of max(dp) processes; for each dp size (the first dp ranks) and zero
stage it builds the model, runs one training step and prints the bytes rank 0 holds
(zero.memory_report).

--peak: on one device, for each shape (bench_train.SHAPES; --device=cpu adds the small "tiny"),
master_weights off/on, activation_checkpointing mode and micro-batch, train.py's step (eager,
bf16 autocast, one process): a warm-up step, then the peak of one step (torch.cuda.max_memory_allocated
on a GPU; on the CPU profiled_peak), next to plan.predict's peak, and the median step time (on the CPU the eager optimizers' temporaries,
which CUDA's fused AdamW and compiled ZeroAdamW update do not have, are not in the prediction:
rows whose activations are small read low there). Prints a markdown table, then each mode's
memory and time against none.
"""
import gc
import os
import socket
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._subclasses.fake_tensor import FakeTensor

import parallel
import zero
from model import ModelConfig, Transformer


def _worker(rank, world, port, args, results):
    if world > 1:
        torch.set_num_threads(1)  # world processes share the CPU cores
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = {dp: parallel.new_groups([range(dp)], rank) if dp > 1 else None for dp in args["dps"]}
    dtype = getattr(torch, args["dtype"])
    mcfg = ModelConfig(dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
                       vocab_size=args["vocab_size"], max_seq_len=16, multiple_of=16)
    cfg = SimpleNamespace(learning_rate=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    out = {}
    for dp in args["dps"]:
        if rank >= dp:
            continue
        mesh = parallel.Mesh(world=dp, rank=rank, dp=dp, dp_rank=rank, dp_group=groups[dp])
        for stage in args["stages"]:
            torch.manual_seed(0)
            model = Transformer(mcfg)
            x = torch.randint(0, mcfg.vocab_size, (2, 16))
            cfg.zero = stage  # low-precision parameters with float32 master weights (master_weights=True)
            opt = zero.ZeroAdamW(model, cfg, mesh, dtype)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x, x)[1]
            loss.backward()
            model.grad_sync.finish()
            opt.step(grad_scale=1.0 / opt.grad_norm())
            out[(dp, stage)] = (opt.memory(model), model.num_params())
    if rank == 0:
        results.update(out)
    if world > 1:
        dist.destroy_process_group()


def measure(dps=(1, 2, 4), stages=(0, 1, 2, 3), dtype="bfloat16", dim=64, n_layers=2, n_heads=4, vocab_size=128):
    """{(dp, stage): (measured bytes of rank 0, Phi)} from one CPU/gloo job of max(dps) ranks."""
    args = dict(dps=list(dps), stages=list(stages), dtype=dtype, dim=dim, n_layers=n_layers, n_heads=n_heads,
                vocab_size=vocab_size)
    world = max(dps)
    if world == 1:
        results = {}
        _worker(0, 1, 0, args, results)
        return results
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, port, args, results), nprocs=world)
    return dict(results)


# --------------------------------------------------------------------------- --peak: a step's peak against plan.py
TINY = (dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=2048), 8, 128)


def cpu_storages():
    """{data_ptr: bytes} of the CPU tensors alive now (found by the garbage collector, each storage once)."""
    gc.collect()  # what only reference cycles keep is about to go
    out = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta \
                and not isinstance(obj, FakeTensor):  # torch.compile's tracing leaves these: no memory behind them
            st = obj.untyped_storage()
            out[st.data_ptr()] = st.nbytes()
    return out


def profiled_peak(fn, before):
    """The most bytes alive during fn() on the CPU, which has no allocator statistics: the storages
    alive now that were not alive at `before` (cpu_storages() then: the model, optimizer state and
    batch built since, not whatever else the process holds) plus the most the profiler's running
    total of CPU allocations reaches during fn()."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    held = sum(n for ptr, n in cpu_storages().items() if ptr not in before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    most, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            most = max(most, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return held + most


def peak_row(shape, micro, seq, master, ckpt, accum, steps, device):
    """One setting: (predicted bytes, measured bytes or None on out-of-memory, median step seconds)."""
    import plan
    import train
    args = [f"--{k}={v}" for k, v in shape.items()] + [
        f"--block_size={seq}", f"--micro_batch_size={micro}", f"--batch_size={micro * accum}", "--dtype=bfloat16",
        f"--master_weights={bool(master)}", f"--activation_checkpointing={ckpt}", f"--device={device.type}",
        "--compile=False"]
    cfg = train.load_config(args)
    mc = train.model_config(cfg)
    predicted = plan.peak(cfg, mc, plan.layout_of(cfg, 1), cuda=device.type == "cuda")[0]
    mesh, cuda = parallel.Mesh(), device.type == "cuda"
    model = optimizer = None
    before = {} if cuda else cpu_storages()
    left = torch.cuda.memory_allocated(device) if cuda else 0  # what earlier rows left (normally 0), not this row's
    try:
        torch.manual_seed(0)
        model = parallel.parallelize(Transformer(mc), mesh, cfg, device)
        autocast = train.setup_device(cfg)[2]
        optimizer = train.build_optimizer(model, cfg, mesh, device)
        seqs = torch.randint(0, mc.vocab_size, (cfg.batch_size, seq + 1), generator=torch.Generator().manual_seed(0))
        seqs = seqs.to(device)  # the step's batch, as train.get_micro_batches leaves it
        micro_batches = [(seqs[i:i + micro, :-1], seqs[i:i + micro, 1:]) for i in range(0, cfg.batch_size, micro)]
        scaler = train.LossScaler(False)

        def step():  # train.train's step, without the logging
            loss, norm = train.compute_gradients(cfg, mesh, model, model, optimizer, micro_batches, scaler, autocast)
            train.apply_update(cfg, model, optimizer, norm, scaler)
            optimizer.zero_grad(set_to_none=model.grad_sync.set_to_none)
        step()  # the AdamW state exists from here on, as in every later step
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated(device) - left
        else:
            measured = profiled_peak(step, before)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return predicted, measured, sorted(times)[len(times) // 2]
    except torch.OutOfMemoryError:
        return predicted, None, None
    finally:
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def peak_main(opts):
    import bench_train
    device = torch.device(opts.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but no CUDA GPU is visible; use --device=cpu for the small smoke run")
    shapes = {**bench_train.SHAPES, "tiny": TINY}
    names = opts.get("shapes", "134m,1b" if device.type == "cuda" else "tiny").split(",")
    if any(n not in shapes for n in names):
        raise SystemExit(f"error: --shapes={opts['shapes']}: each must be one of {list(shapes)}")
    lists = {k: opts.get(k, d).split(",") for k, d in (("ckpt", "none,selective,full"), ("micro", "1,2,4,8"),
                                                     ("master", "0,1"))}
    try:
        micros, masters = [int(m) for m in lists["micro"]], [int(m) for m in lists["master"]]
        accum, steps = int(opts.get("accum", 1)), int(opts.get("steps", 3))
    except ValueError:
        raise SystemExit(f"error: --micro, --master, --accum and --steps take integers (got {opts})")
    if any(c not in ("none", "selective", "full") for c in lists["ckpt"]):
        raise SystemExit(f"error: --ckpt={opts['ckpt']}: each must be none, selective or full")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_memory.py --peak on {gpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: eager, bf16 "
          f"autocast, one process, {accum} micro-step(s) per step; measured = "
          + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "the CPU profiler's allocations (bench_memory.profiled_peak)"))
    print("| shape | master weights | checkpointing | micro-batch x seq | predicted GiB | measured GiB | "
          "predicted / measured | step ms | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name in names:
        shape, _, seq = shapes[name]
        for master in masters:
            for micro in micros:
                for ckpt in lists["ckpt"]:
                    pred, got, sec = peak_row(shape, micro, seq, master, ckpt, accum, steps, device)
                    rows.append(dict(shape=name, master=master, ckpt=ckpt, micro=micro, seq=seq, predicted=pred,
                                     measured=got, step_s=sec))
                    cells = [f"{got / 2 ** 30:.2f}", f"{pred / got:.3f}", f"{1e3 * sec:.1f}",
                             f"{micro * accum * seq / sec:,.0f}"] if got else ["OOM", "", "", ""]
                    print(f"| {name} | {'on' if master else 'off'} | {ckpt} | {micro} x {seq} | {pred / 2 ** 30:.2f} | "
                          + " | ".join(cells) + " |", flush=True)
    print("\nwhat each checkpointing mode costs against none (same shape, master weights, micro-batch):")
    for r in rows:
        base = next((b for b in rows if b["ckpt"] == "none" and all(b[k] == r[k] for k in ("shape", "master", "micro"))),
                    None)
        if r["ckpt"] != "none" and base and base["measured"] and r["measured"]:
            print(f"  {r['shape']} master {'on' if r['master'] else 'off'} micro {r['micro']} {r['ckpt']}: memory "
                  f"{r['measured'] / base['measured']:.2f}x, step time {r['step_s'] / base['step_s']:.2f}x")
    worst = max((abs(r["predicted"] / r["measured"] - 1) for r in rows if r["measured"]), default=0.0)
    print(f"largest prediction error: {worst:.1%}")
    if "out" in opts:
        import json
        with open(opts["out"], "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if "--peak" in argv:
        unknown = set(opts) - {"shapes", "ckpt", "micro", "master", "accum", "steps", "device", "out"}
        if unknown or any(a != "--peak" and (not a.startswith("--") or "=" not in a) for a in argv):
            raise SystemExit(f"error: unknown arguments {argv}; usage:\n{__doc__}")
        return peak_main(opts)
    unknown = set(opts) - {"dp", "dtype", "dim", "n_layers", "n_heads", "vocab_size"}
    if unknown or any(not a.startswith("--") or "=" not in a for a in argv):
        raise SystemExit(f"error: unknown arguments {argv}; usage:\n{__doc__}")
    dps = [int(d) for d in opts.get("dp", "1,2,4").split(",")]
    dtype = opts.get("dtype", "bfloat16")
    kw = {"dim": 256, "n_layers": 4, "vocab_size": 1024, **{k: int(v) for k, v in opts.items() if k not in ("dp", "dtype")}}
    k = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    print(f"bytes per rank, {dtype} compute (k = {k}), measured from the tensors after one step on CPU/gloo")
    for (dp, stage), (measured, phi) in sorted(measure(dps, dtype=dtype, **kw).items()):
        print(zero.memory_report(stage, measured, phi, dp, k))


if __name__ == "__main__":
    main(sys.argv[1:])
