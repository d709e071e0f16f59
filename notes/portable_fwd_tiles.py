"""The portable forward (flash_attn.py, HOPPER off) on tiles beyond TILES["fwd"], interleaved with SDPA
cuDNN (hopper_variants.median_ms): which tile the short sequences want. H200 only; causal, bf16, 16k tokens
per batch, heads x head dim = 2048. Run from the repository root: python notes/portable_fwd_tiles.py"""
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import flash_attn  # noqa: E402
from hopper_variants import median_ms  # noqa: E402

CANDIDATES = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 4, 4),
              (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)]


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flash_attn.HOPPER = False
    print("| head dim | seqlen | tile | TFLOP/s | SDPA cuDNN | ratio |\n| --- | --- | --- | --- | --- | --- |")
    for D, T in ((64, 1024), (64, 2048), (64, 4096), (128, 1024), (128, 2048)):
        B, H = 16384 // T, 2048 // D
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        fns = {}
        for tile in CANDIDATES:
            if flash_attn._fits("fwd", tile, D):
                def run(tile=tile):
                    flash_attn.FORCE_TILES = {"fwd": tile}
                    return flash_attn.flash_attn_func(q, k, v, causal=True)
                fns[tile] = run

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        want = cudnn().transpose(1, 2).float()
        for tile, fn in fns.items():  # every tile computes the same attention
            err = ((fn().float() - want).norm() / want.norm()).item()
            assert err < 1e-2, (tile, err)
        fns["cudnn"] = cudnn
        ms = median_ms(fns, 3)
        flops = 4 * B * H * T * T * D * 0.5
        for tile in fns:
            if tile != "cudnn":
                print(f"| {D} | {T} | {tile} | {flops / ms[tile] * 1e-9:.0f} | {flops / ms['cudnn'] * 1e-9:.0f} | "
                      f"{ms['cudnn'] / ms[tile]:.2f} |", flush=True)
    flash_attn.FORCE_TILES = {}


if __name__ == "__main__":
    main()
