"""LoRA and full fine-tuning steps: finetune.py's model against transformers + PEFT, same settings.

    python bench_finetune.py                           # 1.1B-class shape (configs/llama_1b.py), on a GPU
    python bench_finetune.py --shape=tiny --steps=3    # the CPU smoke run (tests/test_finetune.py)

Every row runs in this one process, one after the other, on random weights and random tokens:
bf16 autocast, fused torch AdamW (on a GPU) over the trainable parameters, gradient clipping at
1.0. LoRA: r=16, alpha=32, no dropout, on q, k, v, o, gate, up, down; base weights frozen and
stored in bf16 on a GPU (as finetune.py keeps them), adapters float32. Full: float32 parameters.
"ours" is model.py with finetune.add_lora through train.py's forward_backward; "hf" is
transformers' LlamaForCausalLM (SDPA attention) with peft.get_peft_model. Reports tokens/s and
the peak memory (torch.cuda.max_memory_allocated; not measured on the CPU).
"""
import argparse
import gc
import time

import torch

import finetune
import parallel
import train
from model import Transformer, config_from_dict

SHAPES = {"1b": ("configs/llama_1b.py", 4, 2048), "tiny": (None, 2, 32)}  # config, batch, seq
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
TARGETS = "q,k,v,o,gate,up,down"


def model_config(shape, seq):
    path, _, _ = SHAPES[shape]
    cfg = train.load_config([path] if path else [f"--{k}={v}" for k, v in TINY.items()])
    return config_from_dict({**vars(cfg), "max_seq_len": seq})


def lora_cfg():
    return finetune.load_config(["--data=-", "--lora_rank=16", "--lora_alpha=32", "--lora_dropout=0.0",
                                 f"--lora_targets={TARGETS}"])


def ours(mcfg, lora, device):
    """(model, optimizer, step(x, y))."""
    torch.manual_seed(0)
    model = Transformer(mcfg)
    if lora:
        finetune.add_lora(model, lora_cfg())
        if device.type == "cuda":
            for p in model.parameters():
                if not p.requires_grad and p.dim() >= 2:
                    p.data = p.data.to(torch.bfloat16)
    model = parallel.parallelize(model, parallel.Mesh(), train.Config(), device)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(x, y):
        train.forward_backward(model, [(x, y)], 1.0, autocast, model.grad_sync)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, step


def hf(mcfg, lora, device):
    import transformers
    c = mcfg
    conf = transformers.LlamaConfig(hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                    num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
                                    intermediate_size=c.ffn_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                                    max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
                                    attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf)
    if lora:
        import peft
        if device.type == "cuda":
            model = model.to(torch.bfloat16)  # the frozen base in bf16; PEFT's adapters are cast back to float32
        names = sorted(finetune.LORA_TARGETS[t][2] for t in TARGETS.split(","))
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=names,
                                                           task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model = model.to(device).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, step


def run(name, build, mcfg, lora, batch, seq, steps, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, opt, step = build(mcfg, lora, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, mcfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    x, y = x[:, :-1], x[:, 1:]
    step(x, y)  # warm-up: kernels, AdamW state
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync()
    dt = (time.perf_counter() - t0) / steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    row = dict(name=name, tokens_per_s=batch * seq / dt, step_s=dt, peak_gib=peak, trainable=trainable)
    print(f"{name:10s} {row['tokens_per_s']:>12,.0f} tok/s {dt * 1e3:>9.1f} ms/step   peak {peak:6.2f} GiB   "
          f"trainable {trainable:,}", flush=True)
    del model, opt, step
    gc.collect()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", default="ours_lora,hf_lora,ours_full,hf_full")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, batch, seq = SHAPES[a.shape]
    mcfg = model_config(a.shape, seq)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"shape {a.shape}: dim {mcfg.dim}, {mcfg.n_layers} layers, batch {batch} x {seq} tokens | {gpu} | "
          f"torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    rows = []
    for name in a.rows.split(","):
        impl, kind = name.split("_")
        rows.append(run(name, ours if impl == "ours" else hf, mcfg, kind == "lora", batch, seq, a.steps, device))
    return rows


if __name__ == "__main__":
    main()
