"""ZeRO's memory per rank, measured from the tensors, next to the book's formulas (zero.formula).

  python bench_memory.py [--dp=1,2,4] [--dtype=bfloat16] [--dim=256 --n_layers=4 --n_heads=4 --vocab_size=1024]

One CPU/gloo job of max(dp) processes; for each dp size (the first dp ranks) and zero stage it
builds the model, runs one training step and prints the bytes rank 0 holds (zero.memory_report).
"""
import os
import socket
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
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
