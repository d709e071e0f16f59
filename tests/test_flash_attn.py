"""flash_attn.py against a float64 reference: forward, lse and all three gradients.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy on the
CPU; fp16 and fp32, since bf16 is broken there); with one, the GPU tests run them in bf16/fp16
and check that model.py trains with attn_impl="flash" like "sdpa".
"""
import os
import sys
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # without it, conftest.py turns on Triton's interpreter
pytest.importorskip("triton", reason="flash_attn.py needs the triton package (pip install triton)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flash_attn  # noqa: E402
from flash_attn import attention_reference, flash_attn_func  # noqa: E402


def rel_err(a, b):
    """||a - b|| / ||b|| (denominator at least 1: gradients that are exactly 0 at seqlen 1)."""
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1.0)).item()


def check_against_reference(B, T, Hq, Hkv, D, causal, window, dtype, device, tol):
    """Fresh random inputs; kernel vs the reference in float64 on the same (rounded) inputs."""
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, window_size=window)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())

    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, Hq, T)
    errs = {"out": rel_err(out, ref), "lse": rel_err(lse, ref_lse)}
    errs.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert all(e < tol for e in errs.values()), f"errors over {tol}: {errs}"


# --------------------------------------------------------------------------- CPU (interpreter)
# (B, T, Hq, Hkv, D, causal, window): ragged lengths, grouped/multi-query, windows, head dims 32-128
CPU_CASES = [
    (2, 1, 2, 1, 32, True, None),
    (2, 17, 4, 2, 64, True, None),
    (1, 100, 2, 2, 128, False, None),
    (1, 257, 4, 1, 32, True, None),
    (1, 257, 2, 1, 64, False, None),
    (1, 257, 2, 2, 32, True, (48, 0)),
    (1, 130, 2, 1, 32, False, (20, 7)),
    (2, 100, 2, 2, 64, True, (-1, -1)),
    (2, 70, 2, 1, 32, False, None),  # batch > 1: keys past T in a key tile are the next sequence's
]
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on CPU-only machines; GPU tests cover CUDA")


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-4)], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "B{}-T{}-H{}/{}-D{}-causal{}-win{}".format(*c))
def test_interpreter_matches_reference(case, dtype, tol):
    assert flash_attn.INTERPRET, "TRITON_INTERPRET=1 was not in effect: the kernels would not run"
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    check_against_reference(*case, dtype=dtype, device="cpu", tol=tol)


def naive_attention(q, k, v, causal, window):
    """Row by row, float64: query i attends to keys j with i-left <= j <= i+right."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    left, right = window if window is not None else (-1, -1)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for i in range(T):
        js = [j for j in range(T) if (left < 0 or j >= i - left)
              and (j <= i if causal else (right < 0 or j <= i + right))]
        for h in range(H):
            s = torch.einsum("bd,bnd->bn", q[:, i, h].double(), k[:, js, h // group].double()) / D ** 0.5
            out[:, i, h] = torch.einsum("bn,bnd->bd", s.softmax(-1), v[:, js, h // group].double())
    return out


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (5, 0)), (False, (3, 6))])
def test_reference_masks(causal, window):
    """The reference itself (which the kernel tests trust) against a row-by-row loop."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 19, 4, 8), torch.randn(2, 19, 2, 8), torch.randn(2, 19, 2, 8)
    out, _ = attention_reference(q, k, v, causal=causal, window_size=window)
    assert rel_err(out, naive_attention(q, k, v, causal, window)) < 1e-6


def test_cpu_fallback_is_the_reference(monkeypatch):
    """CPU tensors without the interpreter take the PyTorch path (model.py's "flash" on CPU)."""
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    q, k, v = torch.randn(1, 33, 4, 16), torch.randn(1, 33, 1, 16), torch.randn(1, 33, 1, 16)
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, attention_reference(q, k, v, causal=True)[0])


def test_bad_inputs_are_named():
    q = torch.randn(1, 8, 6, 16)
    with pytest.raises(ValueError, match="nheads=6"):
        flash_attn_func(q, torch.randn(1, 8, 4, 16), torch.randn(1, 8, 4, 16))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, q, q, window_size=5)
    with pytest.raises(ValueError, match="batch, seqlen"):
        flash_attn_func(q[0], q[0], q[0])


# --------------------------------------------------------------------------- GPU
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
GPU_CASES = [
    (2, 1000, 8, 2, 128, True, None),
    (1, 2065, 4, 4, 64, False, None),
    (2, 1500, 4, 1, 64, True, (256, 0)),
    (1, 777, 4, 2, 128, False, (100, 50)),
    (2, 513, 4, 4, 32, True, None),
    (1, 300, 2, 1, 256, True, None),
    (3, 1, 2, 2, 64, True, None),
    # head dim 128 takes flash_attn_hopper on a Hopper GPU: its own tiles, so its own ragged cases
    (2, 300, 4, 4, 128, False, None),  # keys past T in the last key tile are the next sequence's
    (2, 1500, 4, 1, 128, True, (256, 0)),
    (3, 1, 2, 2, 128, True, None),
    (1, 4100, 2, 2, 128, True, None),
]


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-T{}-H{}/{}-D{}-causal{}-win{}".format(*c))
def test_gpu_matches_reference(case, dtype, tol):
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    check_against_reference(*case, dtype=dtype, device="cuda", tol=tol)


@cuda_only
def test_hopper_kernels_are_used_on_hopper():
    """On an sm_90 GPU, head dim 128 in bf16/fp16 goes to flash_attn_hopper (so the GPU cases
    above test it); other head dims and float32 keep the portable kernels."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    q = torch.empty(1, 8, 2, 128, device="cuda", dtype=torch.bfloat16)
    assert flash_attn._hopper(q) is not None
    assert flash_attn._hopper(q.float()) is None and flash_attn._hopper(q[..., :64]) is None


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_model_trains_like_sdpa(head_dim):
    """Same init, same batches, bf16 autocast: "flash" follows "sdpa" as closely as "math" (float32
    attention) does, i.e. to bf16 noise (which training amplifies over the steps)."""
    from model import ModelConfig, Transformer
    losses = {}
    for impl in ("sdpa", "math", "flash"):
        torch.manual_seed(0)
        cfg = ModelConfig(dim=4 * head_dim, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512,
                          max_seq_len=256, attn_impl=impl)
        model = Transformer(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 512, (8, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        losses[impl] = []
        for _ in range(20):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    sdpa, math_, flash = (torch.tensor(losses[k]) for k in ("sdpa", "math", "flash"))
    for k in losses:
        print(f"{k:5s}", " ".join(f"{x:.4f}" for x in losses[k][::4]))
    noise = (math_ - sdpa).abs().max().item()
    assert sdpa[-1] < sdpa[0] - 0.5, "the model did not learn"
    assert (flash - sdpa).abs().max().item() <= max(2 * noise, 0.02), f"flash {flash.tolist()} sdpa {sdpa.tolist()}"


# --------------------------------------------------------------------------- Hopper kernels, compiled on any machine
HOPPER_COMPILE = r"""
import re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
import flash_attn_hopper as fh

def desc(dtype, block):
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{gl.NVMMASharedLayout.get_default_for(block, getattr(gl, {'bf16': 'bfloat16', 'fp32': 'float32'}[dtype]))!r}>"

def compile(fn, sig, consts):
    for name in fn.arg_names:
        sig.setdefault(name, "constexpr" if name in consts else "i32")
    k = triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=fh.COMPILE_OPTIONS)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    # the ptxas Triton itself runs for sm_90 (3.9 moved it from its CUDA 12 ptxas to its CUDA 13 one)
    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", f.name + ".o"],
                         capture_output=True, text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes spill stores", log).group(1)
    print(fn.__name__, "smem", k.metadata.shared, "spill", spill, "serialized" if "serialized" in log else "pipelined")

D = fh.HEAD_DIM
bm, bn, st = fh.FWD_TILE
compile(fh._fwd_kernel, {"desc_q": desc("bf16", [bm // 2, D]), "desc_k": desc("bf16", [bn, D]),
                         "desc_v": desc("bf16", [bn, D]), "Out": "*bf16", "Lse": "*fp32", "softmax_scale": "fp32"},
        dict(IS_CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, STAGES=st))
bm, bn, st = fh.BWD_TILE
compile(fh._bwd_kernel, {"desc_q": desc("bf16", [bm, D]), "desc_k": desc("bf16", [bn, D]),
                         "desc_v": desc("bf16", [bn, D]), "desc_do": desc("bf16", [bm, D]),
                         "desc_dq": desc("fp32", [bm, D // 2]), "desc_lse": desc("fp32", [bm]),
                         "desc_delta": desc("fp32", [bm]), "dK": "*bf16", "dV": "*bf16", "softmax_scale": "fp32"},
        dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=st))
"""


def test_hopper_import_names_a_missing_gluon_feature(monkeypatch):
    """A Triton whose Gluon lacks what flash_attn_hopper calls (here: no TMA load under either of
    its names) fails the import with one line that says what, so flash_attn falls back."""
    import importlib
    from triton.experimental.gluon.language.nvidia.hopper import tma
    for name in ("async_load", "async_copy_global_to_shared"):
        monkeypatch.delattr(tma, name, raising=False)
    monkeypatch.delitem(sys.modules, "flash_attn_hopper", raising=False)
    with pytest.raises(ImportError, match=r"^Triton \S+ lacks tma\.async_load; flash_attn_hopper is tested with"):
        importlib.import_module("flash_attn_hopper")


def test_hopper_kernels_compile_for_sm90():
    """flash_attn_hopper's kernels compile for sm_90a without a GPU (Triton + its bundled ptxas),
    fit in shared memory, and keep their wgmma pipelined (ptxas serializes wgmma when registers
    run out). In a subprocess: the interpreter mode of this file cannot compile Gluon."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict((line.split()[0], line.split()[1:]) for line in run.stdout.strip().splitlines())
    for name in ("_fwd_kernel", "_bwd_kernel"):
        smem, pipelined = int(lines[name][1]), lines[name][4]
        assert smem <= 227 * 1024 and pipelined == "pipelined", (name, lines[name])
    assert int(lines["_fwd_kernel"][3]) == 0, lines["_fwd_kernel"]
