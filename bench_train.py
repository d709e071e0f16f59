"""Time train.py's training step against transformers' LlamaForCausalLM on the same GPU.

    python bench_train.py                      # both shapes, every implementation
    python bench_train.py --shapes=134m --steps=30 --impls=ours_compile,hf_compile
    python bench_train.py --shapes=134m --impls=ours_compile,ours_compile_flash --profile=15  # + kernel times

Each implementation runs the same shapes in one process, one after the other: float32
master weights, bf16 autocast, fused torch AdamW, random tokens (never zeros). "ours" is
model.py through train.py's forward_backward / grad_norm / clip / optimizer.step; "hf" is
LlamaForCausalLM with SDPA attention. "ours_compile_master" is train.py's --master_weights=True
step instead: bf16 parameters and gradients, float32 master weights and moments in
zero.ZeroAdamW (book fig. 4.16). "_flash" rows use attn_impl="flash" (flash_attn.py's Triton
kernels), the others attn_impl="sdpa" (cuDNN first). "_docs" rows train with document masking
(train.py --doc_mask=True): the tokens are random documents, lengths drawn with mean DOC_MEAN, each
ending in EOT, and the step computes the doc ids from them as train.py does; every other row gets
the same tokens and ignores the documents. MFU counts model.flops_per_token (6N + 12*L*d*T, PaLM,
the causal count also for "_docs", which compute less attention) against the bf16 matmul rate
measured in this run and against the datasheet peak (train.PEAK_TFLOPS). The ratios at the end:
flash / sdpa under --compile=True, and doc_mask=True / False for each attention.
"""
import argparse
import dataclasses
import gc
import math
import time

import torch

import parallel
import train
import model as model_module
from model import ModelConfig, Transformer
from torch.nn.attention import SDPBackend

SHAPES = {  # name: (model config, batch, seq)
    "134m": (dict(dim=768, n_layers=12, n_heads=12, ffn_dim=2048, vocab_size=32000), 16, 1024),
    "1b": (dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=8192, vocab_size=32000), 4, 2048),
}


def measured_matmul_rate(n=8192, iters=20):
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3)


DOC_MEAN = 512  # mean document length of the tokens (the "_docs" rows mask by document)


def random_documents(batch, seq, vocab_size, generator):
    """(batch, seq + 1) random tokens in documents of lengths uniform in 1..2 DOC_MEAN - 1 (mean
    DOC_MEAN), each ending in EOT = vocab_size - 1, as prepare.py joins documents."""
    x = torch.randint(0, vocab_size - 1, (batch, seq + 1), generator=generator)
    lengths = torch.randint(1, 2 * DOC_MEAN, (batch * (seq + 1),), generator=generator)
    ends = lengths.cumsum(0) - 1
    x.view(-1)[ends[ends < x.numel()]] = vocab_size - 1
    return x


def ours_step(shape, batch, seq, compile_model, attn_impl, sdpa_first=SDPBackend.CUDNN_ATTENTION, master=False,
              doc_mask=False):
    """train.py's step: compute_gradients (forward_backward, grad_norm) and apply_update (clip,
    AdamW), built as train.py builds it. master: bf16 parameters and gradients with float32
    master weights and moments in zero.ZeroAdamW (no autocast weight casts, one fused AdamW
    pass); else float32 parameters under bf16 autocast, torch's fused AdamW. doc_mask: the doc
    ids of each batch (train.document_ids, on the GPU as train.py computes them) go with it."""
    model_module.SDPA_BACKENDS.sort(key=lambda b: b != sdpa_first)  # which SDPA backend is tried first
    cfg, mesh = dataclasses.replace(train.Config(), master_weights=master, dtype="bfloat16", device="cuda"), parallel.Mesh()
    device, _, autocast = train.setup_device(cfg)
    model = parallel.parallelize(Transformer(ModelConfig(**shape, max_seq_len=seq, attn_impl=attn_impl)), mesh, cfg, device)
    opt = train.build_optimizer(model, cfg, mesh, device)
    fwd = torch.compile(model) if compile_model else model
    scaler = train.LossScaler(enabled=False)

    def step(x, y):
        micro = [(x, y, train.document_ids(x, shape["vocab_size"] - 1))] if doc_mask else [(x, y)]
        _, norm = train.compute_gradients(cfg, mesh, model, fwd, opt, micro, scaler, autocast)
        train.apply_update(cfg, model, opt, norm, scaler)
        opt.zero_grad(set_to_none=model.grad_sync.set_to_none)
    return model, step


def hf_step(shape, batch, seq, compile_model):
    from transformers import LlamaConfig, LlamaForCausalLM
    hcfg = LlamaConfig(hidden_size=shape["dim"], num_hidden_layers=shape["n_layers"],
                       num_attention_heads=shape["n_heads"], num_key_value_heads=shape.get("n_kv_heads", shape["n_heads"]),
                       intermediate_size=shape["ffn_dim"], vocab_size=shape["vocab_size"],
                       max_position_embeddings=seq, tie_word_embeddings=False)
    hcfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hcfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile_model else model

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, step


IMPLS = {
    "hf": lambda s, b, t: hf_step(s, b, t, False),
    "hf_compile": lambda s, b, t: hf_step(s, b, t, True),
    "ours": lambda s, b, t: ours_step(s, b, t, False, "sdpa"),
    "ours_compile": lambda s, b, t: ours_step(s, b, t, True, "sdpa"),
    "ours_compile_flash": lambda s, b, t: ours_step(s, b, t, True, "flash"),
    "ours_compile_master": lambda s, b, t: ours_step(s, b, t, True, "sdpa", master=True),
    "ours_compile_flash_master": lambda s, b, t: ours_step(s, b, t, True, "flash", master=True),
    "ours_compile_sdpa_flash": lambda s, b, t: ours_step(s, b, t, True, "sdpa", sdpa_first=SDPBackend.FLASH_ATTENTION),
    "ours_compile_docs": lambda s, b, t: ours_step(s, b, t, True, "sdpa", doc_mask=True),
    "ours_compile_flash_docs": lambda s, b, t: ours_step(s, b, t, True, "flash", doc_mask=True),
}
# (name, numerator, denominator) of the ratios printed after the table, per shape
RATIOS = [("flash / sdpa, --compile=True", "ours_compile_flash", "ours_compile"),
          ("flash / sdpa, --compile=True, doc_mask", "ours_compile_flash_docs", "ours_compile_docs"),
          ("doc_mask=True / False, flash", "ours_compile_flash_docs", "ours_compile_flash"),
          ("doc_mask=True / False, sdpa", "ours_compile_docs", "ours_compile")]


def kernel_table(step, x, y, rows):
    """One step under torch.profiler: how much of its wall time the GPU was busy (much less when the host's
    launches set the pace), its `rows` costliest GPU kernels (where two implementations' steps differ),
    and its `rows` costliest host operators by their own CPU time (where a host-bound step's time goes;
    the profiler adds its own cost to every operator)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step(x, y)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    # the GPU's own events (kernels, copies): an operator's row repeats its kernels' time; microseconds
    busy_ms = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3
    return (f"GPU busy {busy_ms:.1f} ms of the profiled step's {wall_ms:.1f} ms\n"
            + events.table(sort_by="self_device_time_total", row_limit=rows) + "\n"
            + events.table(sort_by="self_cpu_time_total", row_limit=rows))


def bench(impl, shape_name, steps, warmup, profile_rows=0):
    shape, batch, seq = SHAPES[shape_name]
    torch.manual_seed(0)
    model, step = IMPLS[impl](shape, batch, seq)
    with torch.device("meta"):  # model.py's count for either implementation: same shapes, same FLOPs
        flops_per_token = Transformer(ModelConfig(**shape, max_seq_len=seq)).flops_per_token(seq)
    xy = random_documents(batch, seq, shape["vocab_size"], torch.Generator().manual_seed(0)).cuda()
    x, y = xy[:, :-1], xy[:, 1:]
    if impl.endswith("_docs"):
        print(f"{shape_name} {impl}: {batch} x {seq} tokens in {int((x == shape['vocab_size'] - 1).sum()) + batch} "
              f"(partial) documents")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(x, y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    if profile_rows:  # after the timed steps: compiled, tuned
        print(f"{shape_name} {impl}: one step profiled\n{kernel_table(step, x, y, profile_rows)}")
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return batch * seq / dt, flops_per_token, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="134m,1b")
    p.add_argument("--impls", default="hf,hf_compile,ours,ours_compile,ours_compile_flash,ours_compile_master,"
                                      "ours_compile_docs,ours_compile_flash_docs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, print each implementation's ROWS costliest GPU kernels of one step")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rate, datasheet = measured_matmul_rate(), train.peak_flops(torch.cuda.get_device_name()) or math.nan
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | measured bf16 matmul {rate / 1e12:.0f} TFLOP/s"
          f" | datasheet {datasheet / 1e12:g} TFLOP/s (train.PEAK_TFLOPS)")
    rows = []
    for shape_name in args.shapes.split(","):
        for impl in args.impls.split(","):
            try:
                tok_s, fpt, peak = bench(impl, shape_name, args.steps, args.warmup, args.profile)
            except Exception as e:  # one failing implementation must not hide the others' numbers
                print(f"{shape_name} {impl}: failed: {type(e).__name__}: {e}")
                continue
            rows.append((shape_name, impl, tok_s, fpt * tok_s / rate, fpt * tok_s / datasheet, peak))
            print(f"{shape_name:5s} {impl:20s} {tok_s:12,.0f} tok/s  MFU {100 * rows[-1][3]:5.1f}% (measured) "
                  f"{100 * rows[-1][4]:5.1f}% (datasheet)  peak {peak:6.1f} GiB", flush=True)
    print("\n| shape | implementation | tokens/s | MFU (measured) | MFU (datasheet) | peak GiB | vs hf_compile |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape_name, impl, tok_s, mfu, mfu_ds, peak in rows:
        ref = next((r[2] for r in rows if r[0] == shape_name and r[1] == "hf_compile"), math.nan)
        print(f"| {shape_name} | {impl} | {tok_s:,.0f} | {100 * mfu:.1f}% | {100 * mfu_ds:.1f}% | {peak:.1f} | {tok_s / ref:.2f}x |")
    speed = {(r[0], r[1]): r[2] for r in rows}
    for shape_name in args.shapes.split(","):
        for name, num, den in RATIOS:
            if (shape_name, num) in speed and (shape_name, den) in speed:
                print(f"{shape_name} {name}: {speed[shape_name, num] / speed[shape_name, den]:.2f}x")


if __name__ == "__main__":
    main()
