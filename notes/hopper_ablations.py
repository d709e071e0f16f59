"""Where the time of flash_attn_hopper's kernels goes: the shipped kernel against copies of it with one
part taken out (results wrong, timing only), interleaved round after round in one GPU process.

    python notes/hopper_ablations.py [--head-dim 64] [--names smalldq noexp ...]   # backward
    python notes/hopper_ablations.py --names halfkv fwdnoexp --head-dim 128          # forward (FORWARD)

Each ablation is a text substitution in flash_attn_hopper.py's source, compiled as a module of its own; a
substitution that no longer matches the source stops the script with the ablation's name. Measured
(notes/flash_attn_bench.md, 2026-12-04): at head dim 64, before K and V moved to registers, the dQ matmul
cut to 1/8 of its work bought 10-18%, more than its share of the FLOPs, while the warpgroups' meeting
point, the exp2s and the writer's reductions bought 0-7%: a step was bound by shared memory's bandwidth.
Later, half the L2 reads of the K/V stream (forward) or of Q and dO (backward) bought 8-14% at head dim
128 and 4-9% at 64 from 4k tokens, the forward's exp2s 0-6% at 128: the kernels wait on those streams.
Not on the L2's bandwidth alone: TMA multicast, which halves the L2 reads but not each SM's intake, bought
the forward 0-4% (notes/fwd_cluster.py, 2026-12-04).
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
    # backward: dQ reads dS^T without waiting for both warpgroups' halves of it (the meeting point gone)
    "nosync": [("        mbarrier.wait(ds_full.index(buf), phase)  # both warpgroups' dS^T of this step\n", ""),
               ("            mbarrier.wait(ds_full.index(pbuf), pphase)\n", "")],
    # backward: the dQ matmul on 16 keys instead of 128 (1/8 of its tensor-core work and shared-memory reads)
    "smalldq": [("warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_half, dq_zero,",
                 "warpgroup_mma(ds_smem.index(buf).slice(0, 16, dim=0).permute((1, 0)), "
                 "k_half.slice(0, 16, dim=0), dq_zero,"),
                ("dq_tok = warpgroup_mma(ds_smem.index(pbuf).permute((1, 0)), k_smem, dq_zero,",
                 "dq_tok = warpgroup_mma(ds_smem.index(pbuf).slice(0, 16, dim=0).permute((1, 0)), "
                 "k_smem.slice(0, 16, dim=0), dq_zero,")],
    # backward: P^T without its exp2s
    "noexp": [("p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))",
               "p_t = s_t * qk_scale - gl.expand_dims(lse, 0)")],
    # backward: the writer warp hands dQ's buffers back without adding them to global memory
    "noreduce": [("            _tma_reduce_add(desc_dq, [q_row + start_m, (h0 + g) * PARTS * PART_D + w * PART_D],\n"
                  "                            dq_smem.index(PARTS * buf + w))", "            pass")],
    # backward: the loader fetches Q and dO for every other step only (lse and delta still each step)
    "halfq": [("        mbarrier.expect(q_full.index(s), 2 * desc_q.block_type.nbytes + 2 * desc_lse.block_type.nbytes)\n"
               "        _tma_load(desc_q, [q_row + start_m, (h0 + g) * D], q_full.index(s), q_ring.index(s))\n"
               "        _tma_load(desc_do, [q_row + start_m, (h0 + g) * D], q_full.index(s), do_ring.index(s))\n",
               "        if j % 2 == 0:\n"
               "            mbarrier.expect(q_full.index(s), 2 * desc_q.block_type.nbytes + 2 * desc_lse.block_type.nbytes)\n"
               "            _tma_load(desc_q, [q_row + start_m, (h0 + g) * D], q_full.index(s), q_ring.index(s))\n"
               "            _tma_load(desc_do, [q_row + start_m, (h0 + g) * D], q_full.index(s), do_ring.index(s))\n"
               "        else:\n"
               "            mbarrier.expect(q_full.index(s), 2 * desc_lse.block_type.nbytes)\n")],
    # forward: the loader fetches K and V for every other key block only (the others reuse a stale slot):
    # half the L2 reads of the K/V stream
    "halfkv": [("            mbarrier.expect(k_full.index(s), desc_k.block_type.nbytes)\n"
                "            _tma_load(desc_k, [row, (h // GROUP) * D], k_full.index(s), k_ring.index(s))\n",
                "            if c % 2 == 0:\n"
                "                mbarrier.expect(k_full.index(s), desc_k.block_type.nbytes)\n"
                "                _tma_load(desc_k, [row, (h // GROUP) * D], k_full.index(s), k_ring.index(s))\n"
                "            else:\n"
                "                mbarrier.arrive(k_full.index(s), count=1)\n"),
               ("            mbarrier.expect(v_full.index(s), desc_v.block_type.nbytes)\n"
                "            _tma_load(desc_v, [row, (h // GROUP) * D], v_full.index(s), v_ring.index(s))\n",
                "            if c % 2 == 0:\n"
                "                mbarrier.expect(v_full.index(s), desc_v.block_type.nbytes)\n"
                "                _tma_load(desc_v, [row, (h // GROUP) * D], v_full.index(s), v_ring.index(s))\n"
                "            else:\n"
                "                mbarrier.arrive(v_full.index(s), count=1)\n")],
    # forward: P without its exp2s
    "fwdnoexp": [("    p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))",
                  "    p = qk * qk_scale - gl.expand_dims(m_new, 1)")],
}


FORWARD = {"halfkv", "fwdnoexp"}  # the ablations of the forward kernel; the others are the backward's


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
    p.add_argument("--names", nargs="+", default=[n for n in ABLATIONS if n not in FORWARD], choices=list(ABLATIONS))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    source = open(fh.__file__).read()
    modules = {"kept": fh, **{name: ablated(name, source) for name in args.names}}
    D = args.head_dim
    print(f"GPU: {torch.cuda.get_device_name()}; TFLOP/s at head dim {D}, 16k tokens per batch")
    print("| ablation | mask | seqlen | TFLOP/s | kept | ablated / kept |\n| --- | --- | --- | --- | --- | --- |")
    forward = set(args.names) <= FORWARD
    if not forward and set(args.names) & FORWARD:
        sys.exit("forward and backward ablations run apart: --names of one direction")
    for causal in (False, True):
        for T in (1024, 4096, 16384):
            B, H = 16384 // T, 2048 // D
            q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            left, right = flash_attn._window(causal, None, T, T)
            out, lse = fh.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T))
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1) * (1 if forward else 2.5)
            if forward:
                fns = {name: (lambda m=m: m.forward(q, k, v, causal, D ** -0.5, left, right, flash_attn._lse_len(T)))
                       for name, m in modules.items()}
            else:
                fns = {name: (lambda m=m: m.backward(do, q, k, v, out, lse, D ** -0.5, left, right))
                       for name, m in modules.items()}
            ms = median_ms(fns, args.rounds)
            for name in args.names:
                print(f"| {name} | {'causal' if causal else 'full'} | {T} | {flops / ms[name] * 1e-9:.0f} | "
                      f"{flops / ms['kept'] * 1e-9:.0f} | {ms['kept'] / ms[name]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
