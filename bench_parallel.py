"""Step time and peak memory of our data parallelism and ZeRO stages against torch's, in one run.

  torchrun --nproc_per_node=8 bench_parallel.py                      all GPUs of a node, ~1.4B model
  torchrun --nproc_per_node=8 bench_parallel.py --dim=4096 --n_layers=8 --micro=1
  torchrun --nproc_per_node=2 bench_parallel.py --accum=8          gradient accumulation: sync every 8th backward
  torchrun --nproc_per_node=2 bench_parallel.py --device=cpu --dim=64 --n_layers=2 --vocab_size=256 --seq=32

Modes (--modes=a,b,...), each on a freshly built model with the same data, one after another:
  ddp         torch DDP + fused AdamW, float32 parameters under bf16 autocast
  dp          parallel.py's bucketed all-reduce (GradBuckets), otherwise the same as ddp (zero=0)
  torch_zero  DDP + torch.distributed.optim.ZeroRedundancyOptimizer (stage 1, float32 parameters)
  zero1..3    zero.py: bf16 parameters/gradients, float32 master weights and moments sharded
  fsdp2       torch's fully_shard per layer + root, bf16 parameters (a ZeRO-3)
Every mode clips gradients at global norm 1.0. Prints one line per mode on rank 0 and writes
bench_parallel.json: median step time (after warm-up), tokens/s, peak allocated memory per GPU (less what
earlier modes of the run left allocated, recorded as left_over_gib).
"""
import gc
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import parallel
import zero
from model import ModelConfig, Transformer

DEFAULTS = dict(dim=2048, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=0, vocab_size=32000, seq=2048, micro=2,
                accum=1, steps=10, warmup=3, modes="ddp,dp,torch_zero,zero1,zero2,zero3,fsdp2", device="auto",
                out="bench_parallel.json", bucket_mb=25.0)


def parse(argv):
    args = dict(DEFAULTS)
    for a in argv:
        key, _, value = a.lstrip("-").partition("=")
        if key not in args:
            sys.exit(f"unknown option --{key}; options: " + ", ".join(f"--{k}={v}" for k, v in DEFAULTS.items()))
        args[key] = type(DEFAULTS[key])(value)
    return SimpleNamespace(**args)


# --------------------------------------------------------------------------- one mode
# build() returns (model, set_sync, update): set_sync(flag) turns the gradient sync of the next
# backward on or off (off in the first accum - 1 micro-steps, as train.py does), update() runs
# after the last backward: wait for the sync, clip at global norm 1.0, optimizer step, zero grads.

def torch_update(model, opt, grad_sync=parallel.NoSync()):
    def update():
        grad_sync.finish()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=grad_sync.set_to_none)
    return update


def build(mode, args, mcfg, device, rank, world):
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model on the CPU takes seconds per mode
        model = Transformer(mcfg)
    groups = lambda: model.param_groups(0.1)  # decay on matrices only, as train.py
    cuda = device.type == "cuda"

    if mode in ("ddp", "torch_zero"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if cuda else None)
        if mode == "ddp":
            opt = torch.optim.AdamW(groups(), lr=1e-4, fused=cuda)
        else:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-4,
                                          weight_decay=0.1)  # (ZeroRedundancyOptimizer takes one group)
        ddp.require_backward_grad_sync = True  # what DDP's no_sync() context toggles
        return ddp, lambda flag: setattr(ddp, "require_backward_grad_sync", flag), torch_update(model, opt)

    if mode == "dp":
        sync = parallel.GradBuckets(list(model.parameters()), dist.group.WORLD, args.bucket_mb) if world > 1 \
            else parallel.NoSync()
        opt = torch.optim.AdamW(groups(), lr=1e-4, fused=cuda)
        return model, lambda flag: setattr(sync, "sync", flag), torch_update(model, opt, sync)

    if mode.startswith("zero"):
        mesh = parallel.Mesh(world=world, rank=rank, dp=world, dp_rank=rank,
                             dp_group=dist.group.WORLD if world > 1 else None)
        cfg = SimpleNamespace(zero=int(mode[4:]), learning_rate=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1,
                              zero_offload=False)
        opt = zero.ZeroAdamW(model, cfg, mesh, torch.bfloat16)

        def update():
            model.grad_sync.finish()
            norm = opt.grad_norm()
            opt.step(grad_scale=torch.clamp(1.0 / (norm + 1e-6), max=1.0))
            opt.zero_grad(set_to_none=model.grad_sync.set_to_none)
        return model, lambda flag: setattr(model.grad_sync, "sync", flag), update

    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        dmesh = init_device_mesh(device.type, (world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        for layer in model.layers.values():
            fully_shard(layer, mesh=dmesh, mp_policy=policy)
        fully_shard(model, mesh=dmesh, mp_policy=policy)
        opt = torch.optim.AdamW(groups(), lr=1e-4, foreach=True)  # after fully_shard: DTensor parameters
        return model, model.set_requires_gradient_sync, torch_update(model, opt)
    raise SystemExit(f"unknown mode {mode!r}")


def run_mode(mode, args, mcfg, device, rank, world):
    # what earlier modes left allocated (reference cycles, caches) is not this mode's: subtracted
    left_over = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    model, set_sync, update = build(mode, args, mcfg, device, rank, world)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randint(0, mcfg.vocab_size, (args.accum, args.micro, args.seq + 1), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for k in range(args.accum):  # gradient accumulation: sync only in the last micro-step
            set_sync(k == args.accum - 1)
            with autocast:
                loss = model(x[k, :, :-1], x[k, :, 1:])[1]
            (loss / args.accum).backward()
            total += loss.detach()
        update()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(total.item() / args.accum)
    dt = torch.tensor(statistics.median(times), device=device)
    if world > 1:
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    peak = (torch.cuda.max_memory_allocated() - left_over) / 2 ** 30 if device.type == "cuda" else None
    if device.type == "cuda" and world > 1:
        p = torch.tensor(peak, device=device)
        dist.all_reduce(p, op=dist.ReduceOp.MAX)
        peak = p.item()
    rec = {"mode": mode, "left_over_gib": left_over / 2 ** 30, "step_s": dt.item(),
           "tokens_per_s": world * args.accum * args.micro * args.seq / dt.item(),
           "peak_mem_gib": peak, "first_loss": losses[0], "last_loss": losses[-1]}
    del model, set_sync, update
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main(argv):
    args = parse(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    mcfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                       ffn_dim=args.ffn_dim or None, vocab_size=args.vocab_size, max_seq_len=args.seq)
    n_params = None
    if rank == 0:
        with torch.device("meta"):
            n_params = Transformer(mcfg).num_params()
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"{n_params / 1e6:,.1f}M parameters, {world} x {name}, micro-batch {args.micro} x {args.seq} "
              f"tokens per rank x {args.accum} accumulation steps, bf16 compute, median of {args.steps} steps after {args.warmup}")
    results = []
    for mode in args.modes.split(","):
        try:
            rec = run_mode(mode, args, mcfg, device, rank, world)
        except torch.OutOfMemoryError:
            rec = {"mode": mode, "error": "out of memory"}
            gc.collect()
            torch.cuda.empty_cache()
        results.append(rec)
        if rank == 0:
            if "error" in rec:
                print(f"{mode:>11}: {rec['error']}")
            else:
                mem = f"{rec['peak_mem_gib']:7.2f} GiB peak" if rec["peak_mem_gib"] is not None else "   (cpu)"
                print(f"{mode:>11}: {1000 * rec['step_s']:8.1f} ms/step {rec['tokens_per_s']:12,.0f} tok/s {mem}"
                      f" | loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}", flush=True)
        if world > 1:
            dist.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "world": world, "device": str(device), "n_params": n_params,
                       "results": results}, f, indent=1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
