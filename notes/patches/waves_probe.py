"""The backward's last partial wave, measured (notes/flash_attn_bench.md, 2026-12-04, nineteenth session): the kept
backward and SDPA cuDNN at shapes of 15.5 waves (2,048 programs on 132 SMs) or whole waves, head dim 128, both
masks. python notes/patches/waves_probe.py (a GPU)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import flash_attn, flash_attn_hopper as fh
from hopper_variants import median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
for causal in (False, True):
    for B, T, H in ((4, 4096, 16), (4, 4224, 16), (2, 8192, 16), (2, 8448, 16), (4, 4096, 33), (1, 16384, 16), (1, 16896, 16)):
        D = 128
        q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        left, right = flash_attn._window(causal, None, T, T)
        out, lse = fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            ms = median_ms({"ours": lambda: fh.backward(do, q, k, v, out, lse, D ** -0.5, left, right),
                            "cuDNN": lambda: torch.autograd.grad(ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True)}, 5)
        flops = 4 * B * H * T * T * D * (0.5 if causal else 1) * 2.5
        progs = -(-T // 128) * B * H
        print(f"causal={causal} B={B} T={T} H={H}: {progs} programs = {progs / 132:.2f} waves; ours {flops / ms['ours'] * 1e-9:.0f}"
              f" cuDNN {flops / ms['cuDNN'] * 1e-9:.0f} TFLOP/s, ratio {ms['cuDNN'] / ms['ours']:.3f}", flush=True)
