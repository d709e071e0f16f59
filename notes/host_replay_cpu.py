"""The operators' Python per call on a CPU, no GPU needed: flash_attn's portable forward and backward
paths against their replays (flash_attn._replayed), at bench_train.py's 134M shape (16 x 1024 tokens,
12 heads of 64). Triton 3.6's launch is faked (each kernel "compiles" to a fake whose C launcher does
nothing), so the numbers are the Python around the launches, without the driver's launch itself;
run it under Triton 3.6 (the direct launch's release). A GPU host's numbers differ; the ratio is the
point.

    PYTHONPATH=<triton 3.6> python notes/host_replay_cpu.py [--calls 2000]
"""
import argparse
import os
import sys
import time
import types

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as jit  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

import flash_attn  # noqa: E402


def kind(value, constexpr):
    """The signature entry Triton's JIT would give an argument."""
    if constexpr or value is None or isinstance(value, bool):
        return "constexpr"
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<bf16[{', '.join(map(str, value.block_shape))}]>"
    return "*bf16" if isinstance(value, torch.Tensor) else "fp32" if isinstance(value, float) else "i32"


def fake_compile(self, *args, grid, warmup, **kwargs):
    """JITFunction.run: a compiled kernel as Triton 3.6 gives it, with a C launcher that does nothing."""
    values = {**dict(zip(self.arg_names, args)), **kwargs}
    signature = {p.name: kind(values.get(p.name, p.default), p.is_constexpr) for p in self.params}
    metas = [dict(swizzle=3, elem_size=2, elem_type=10, block_size=list(values[name].block_shape), fp4_padded=False)
             for name, k in signature.items() if k.startswith("tensordesc")]

    def launcher(*c_args):
        pass

    def wrap_handle_tensordesc(*c_args):  # Triton's wrapper: a closure over `launcher`, as _launcher reads it
        launcher(*c_args)
    return Compiled(src=types.SimpleNamespace(signature=signature), function=1, packed_metadata=(4, 1, 0),
                    metadata=types.SimpleNamespace(tensordesc_meta=metas),
                    run=types.SimpleNamespace(launch=wrap_handle_tensordesc, global_scratch_size=0,
                                              profile_scratch_size=0, num_ctas=1, launch_cooperative_grid=False,
                                              launch_pdl=False))


class Compiled(types.SimpleNamespace):
    def __getitem__(self, grid):  # Triton's own runner (first launches): nothing
        return lambda *args: None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    assert triton.__version__.startswith("3.6."), "run under Triton 3.6 (PYTHONPATH), the direct launch's release"
    jit.JITFunction.run = fake_compile
    triton.runtime.driver._active = types.SimpleNamespace(
        utils=types.SimpleNamespace(fill_tma_descriptor=lambda *a: ("map", a[0])))
    flash_attn._stream, flash_attn._device = (lambda device: 77), (lambda: 0)
    flash_attn.AUTOTUNE, flash_attn._tuned_prefix = False, (lambda device: "cpu")
    B, T, H, D = 16, 1024, 12, 64
    q, k, v, do = (torch.randn(B, T, H, D).to(torch.bfloat16) for _ in range(4))
    out, lse = q.clone(), torch.zeros(B, H, T)
    statics = (None, True, D ** -0.5, T, 0)
    calls = {"forward (portable, one launch)": lambda: flash_attn._forward_impl(q, k, v, *statics),
             "backward (portable, three launches)": lambda: flash_attn._backward_impl(do, q, k, v, out, lse, *statics)}
    for replay in (True, False, True, False):
        flash_attn._replayable = lambda x: replay  # (a CPU tensor is never replayable otherwise)
        for name, call in calls.items():
            for _ in range(5):
                call()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            print(f"{name}, {'replayed' if replay else 'its path'}: "
                  f"{(time.perf_counter() - t0) / args.calls * 1e6:.1f} us per call")
    assert all(flash_attn._PLANS.values()), "a call was not replayable"


if __name__ == "__main__":
    main()
