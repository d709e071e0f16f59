"""Where the time of flash_attn_hopper's backward goes: the shipped kernel against copies of it with one
part taken out (results wrong, timing only), interleaved round after round in one GPU process.

    python notes/hopper_ablations.py [--head-dim 64] [--names smalldq noexp ...]

Each ablation is a text substitution in flash_attn_hopper.py's source, compiled as a module of its own; a
substitution that no longer matches the source stops the script with the ablation's name. Measured
(notes/flash_attn_bench.md, 2026-12-04, head dim 64, before K and V moved to registers): the dQ matmul cut
to 1/8 of its work bought 10-18%, more than its share of the FLOPs, while the warpgroups' meeting point,
the exp2s and the writer's reductions bought 0-7%: a step was bound by shared memory's bandwidth.
"""
import argparse
import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import flash_attn  # noqa: E402
import flash_attn_hopper as fh  # noqa: E402
from hopper_variants import median_ms  # noqa: E402

ABLATIONS = {  # name: [(text in flash_attn_hopper.py, its replacement)]
    # each warpgroup's dQ reads dS^T without waiting for the other's half (the meeting point gone)
    "nosync": [("    mbarrier.wait(ds_full.index(buf), phase)\n    return warpgroup_mma",
                "    return warpgroup_mma")],
    # the dQ matmul on 16 keys instead of 128 (1/8 of its tensor-core work and shared-memory reads)
    "smalldq": [("warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_half, dq_zero,",
                 "warpgroup_mma(ds_smem.index(buf).slice(0, 16, dim=0).permute((1, 0)), "
                 "k_half.slice(0, 16, dim=0), dq_zero,")],
    # P^T without its exp2s
    "noexp": [("p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))",
               "p_t = s_t * qk_scale - gl.expand_dims(lse, 0)")],
    # the writer warp hands dQ's buffers back without adding them to global memory
    "noreduce": [("            _tma_reduce_add(desc_dq, [q_row + start_m, (h0 + g) * 2 * HALF_D + w * HALF_D],\n"
                  "                            dq_smem.index(2 * buf + w))", "            pass")],
}


def ablated(name, source, substitutions=None):
    """flash_attn_hopper with substitutions (default ABLATIONS[name]) applied, as a module of its own."""
    for old, new in ABLATIONS[name] if substitutions is None else substitutions:
        if old not in source:
            sys.exit(f"{name}: its text is no longer in flash_attn_hopper.py; update its substitution")
        source = source.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), f"fh_{name}.py")  # Triton compiles from the file's source
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"fh_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, default=64, choices=sorted(fh.BWD_TILES))
    p.add_argument("--names", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    source = open(fh.__file__).read()
    modules = {"kept": fh, **{name: ablated(name, source) for name in args.names}}
    D = args.head_dim
    print(f"GPU: {torch.cuda.get_device_name()}; backward TFLOP/s at head dim {D}, 16k tokens per batch")
    print("| ablation | mask | seqlen | TFLOP/s | kept | ablated / kept |\n| --- | --- | --- | --- | --- | --- |")
    for causal in (False, True):
        for T in (1024, 4096, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            left, right = flash_attn._window(causal, None, T, T)
            out, lse = fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T))
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1) * 2.5
            ms = median_ms({name: (lambda m=m: m.backward(do, q, k, v, out, lse, D ** -0.5, left, right))
                            for name, m in modules.items()}, args.rounds)
            for name in args.names:
                print(f"| {name} | {'causal' if causal else 'full'} | {T} | {flops / ms[name] * 1e-9:.0f} | "
                      f"{flops / ms['kept'] * 1e-9:.0f} | {ms['kept'] / ms[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
