"""flash_attn.py against a float64 reference: forward, lse and all three gradients.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy on the
CPU; fp16 and fp32, since bf16 is broken there); with one, the GPU tests run them in bf16/fp16
and check that model.py trains with attn_impl="flash" like "sdpa".
"""
import functools
import json
import os
import sys
import types
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # without it, conftest.py turns on Triton's interpreter
pytest.importorskip("triton", reason="flash_attn.py needs the triton package (pip install triton)")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flash_attn  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from flash_attn import attention_reference, flash_attn_func  # noqa: E402


def rel_err(a, b):
    """||a - b|| / ||b|| (denominator at least 1: gradients that are exactly 0 at seqlen 1)."""
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1.0)).item()


def compare(results, refs, tol):
    """(out, lse, dq, dk, dv) against the same from a float64 run: relative errors under tol, no nan,
    and +inf lse (rows that see no key) exactly where the reference has it."""
    assert not any(x.isnan().any() for x in (*results, *refs)), "nan"
    lse, ref_lse = results[1], refs[1]
    assert torch.equal(lse.isinf(), ref_lse.isinf()) and (lse[lse.isinf()] > 0).all(), "rows without keys differ"
    finite = [x.masked_fill(x.isinf(), 0.0) for x in (*results, *refs)]
    errs = {name: rel_err(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), finite[:5], finite[5:])}
    assert all(e < tol for e in errs.values()), f"errors over {tol}: {errs}"


def run(fn, q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) of fn = flash_attn_func or attention_reference."""
    out, lse = fn(q, k, v, **kw, **({"return_lse": True} if fn is flash_attn_func else {}))
    return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))


def leaves(*xs, dtype=None):
    """Detached copies (in dtype) that require grad: inputs of a separate autograd graph."""
    return [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def check_against_reference(B, T, Hq, Hkv, D, causal, window, dtype, device, tol, Tk=None, doc_ids=None):
    """Fresh random inputs; kernel vs the reference in float64 on the same (rounded) inputs.
    Tk: the keys' length if not T (masks aligned bottom-right); doc_ids: (B, T) document ids."""
    Tk = T if Tk is None else Tk
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Tk, Hkv, D, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn_like(q)
    kw = dict(causal=causal, window_size=window, doc_ids=doc_ids)
    results = run(flash_attn_func, q, k, v, dout, **kw)
    refs = run(attention_reference, *leaves(q, k, v, dtype=torch.float64), dout.double(), **kw)
    assert results[0].shape == q.shape and results[0].dtype == dtype and results[1].shape == (B, Hq, T)
    compare(results, refs, tol)
    return (q, k, v, dout), results


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


@cpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_interpreter_backward_reads_only_what_it_wrote(causal, monkeypatch):
    """Every float buffer from torch.empty or torch.empty_like starts as nan here, with query tiles of
    32 rows in the dQ kernel and 64 in the dK/dV kernel and a ragged T = 70 (tiles end at rows 96 and
    128): no nan reaches a result, so no kernel reads a row of lse, delta or the outputs that nothing
    wrote (0 * nan is nan in dS)."""
    monkeypatch.setattr(flash_attn, "FORCE_TILES", {"dq": (32, 32, 4, 1), "dkdv": (64, 32, 4, 1)})
    for name in ("empty", "empty_like"):
        def nan_filled(*args, _fresh=getattr(torch, name), **kw):
            x = _fresh(*args, **kw)
            return x.fill_(float("nan")) if x.is_floating_point() else x
        monkeypatch.setattr(torch, name, nan_filled)
    torch.manual_seed(0)
    check_against_reference(2, 70, 2, 1, 32, causal, None, dtype=torch.float32, device="cpu", tol=1e-4)


def check_qk_case(case, dtype, device, tol):
    """A (B, Tq, Tk, Hq, Hkv, D, causal, window) case of QK_CASES / GPU_QK_CASES, seeded by the case."""
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    B, Tq, Tk, Hq, Hkv, D, causal, window = case
    check_against_reference(B, Tq, Hq, Hkv, D, causal, window, dtype=dtype, device=device, tol=tol, Tk=Tk)


# (B, Tq, Tk, Hq, Hkv, D, causal, window): a KV cache's prefill and one decode step (Tq < Tk),
# and Tq > Tk, where the first queries see no key (out 0, lse +inf, zero gradients)
QK_CASES = [
    (1, 40, 150, 2, 1, 32, True, None),
    (1, 1, 100, 2, 1, 32, True, None),
    (2, 150, 60, 2, 2, 32, True, None),
    (1, 100, 37, 2, 1, 32, False, (10, 3)),
    (1, 33, 130, 4, 2, 64, False, None),
    (1, 70, 130, 2, 1, 32, True, (20, 0)),
]


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-4)], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", QK_CASES, ids=lambda c: "B{}-Tq{}-Tk{}-H{}/{}-D{}-causal{}-win{}".format(*c))
def test_interpreter_seqlen_q_ne_k(case, dtype, tol):
    check_qk_case(case, dtype, "cpu", tol)


@cpu_only
@pytest.mark.parametrize("head_dim", [8, 40, 72, 96])
def test_interpreter_odd_head_dims(head_dim):
    """Head dims that are no kernel width run zero-padded; scale 1/sqrt(real head dim)."""
    torch.manual_seed(head_dim)
    check_against_reference(2, 70, 2, 1, head_dim, True, None, dtype=torch.float32, device="cpu", tol=1e-4)


@cpu_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 1e-4)], ids=["fp16", "fp32"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, (30, 9))])
def test_interpreter_doc_mask(causal, window, dtype, tol):
    """Documents of length 1, one spanning tile boundaries, a row that is one document, grouped
    heads: the kernels against the float64 reference and against each document run alone."""
    torch.manual_seed(2)
    ids = doc_ids_of(DOC_LENGTHS)
    (q, k, v, dout), results = check_against_reference(3, 150, 4, 2, 32, causal, window, dtype=dtype, device="cpu",
                                                       tol=tol, doc_ids=ids)
    alone = per_document(attention_reference, *leaves(q, k, v, dtype=torch.float64), dout.double(), DOC_LENGTHS,
                         causal=causal, window_size=window)
    compare(results, alone, tol)
    # the same documents given as document_bounds (made once for all of a model's layers): the same results
    bounds = flash_attn.document_bounds(ids)
    for fn in (flash_attn_func, attention_reference):
        kw = dict(causal=causal, window_size=window)
        by_ids, by_bounds = (run(fn, q, k, v, dout, **kw, **docs)
                             for docs in ({"doc_ids": ids}, {"doc_bounds": bounds}))
        assert all(torch.equal(a, b) for a, b in zip(by_ids, by_bounds))


@cpu_only
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's row max over the nan document
@pytest.mark.parametrize("nan_doc", [0, 1])
def test_interpreter_skips_other_documents(nan_doc):
    """Tiles of other documents are never loaded: nan in one of two documents (tile-aligned at 64)
    stays out of the other's output and gradients, as it would not if those tiles were only masked
    (0 * nan = nan in P V)."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 128, 2, 16), torch.randn(1, 128, 1, 16), torch.randn(1, 128, 1, 16)
    bad, good = (slice(0, 64), slice(64, 128))[::1 - 2 * nan_doc]
    for x in (q, k, v):
        x[:, bad] = float("nan")
    q, k, v = leaves(q, k, v)
    dout = torch.randn_like(q)
    out, lse, dq, dk, dv = run(flash_attn_func, q, k, v, dout, causal=False, doc_ids=doc_ids_of([[64, 64]]))
    ref = run(attention_reference, *leaves(q[:, good], k[:, good], v[:, good], dtype=torch.float64),
              dout[:, good].double(), causal=False)
    compare((out[:, good], lse[..., good], dq[:, good], dk[:, good], dv[:, good]), ref, 1e-4)


@cpu_only
@pytest.mark.parametrize("window", [None, (20, 0)])
def test_interpreter_kv_cache_prefill(window):
    """The last n queries against all keys (a KV cache's prefill, n = 1: a decode step) are the
    last n rows of the full causal forward."""
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 100, 2, 32), torch.randn(1, 100, 1, 32), torch.randn(1, 100, 1, 32)
    full = flash_attn_func(q, k, v, causal=True, window_size=window)
    for n in (1, 37):
        assert rel_err(flash_attn_func(q[:, -n:], k, v, causal=True, window_size=window), full[:, -n:]) < 1e-5


@cpu_only
def test_interpreter_cast():
    """flash_attn._cast (flash_attn_hopper's dQ from float32 to q's dtype) equals .to over a length
    that is not a multiple of its block, and writes nothing past it; with PARTS it sums the parts of each
    row (the backward's dK, dV from partial sums: (B, T, parts x kv heads, D)) in order, then casts."""
    torch.manual_seed(5)
    src = torch.randn(3 * 64 + 5) * 100
    dst = torch.full((len(src) + 70, ), 7.0, dtype=torch.float16)
    flash_attn._run(flash_attn._cast, (triton.cdiv(len(src), 64), ), src, dst, len(src), 1, BLOCK=64)
    assert torch.equal(dst[:len(src)], src.half()) and (dst[len(src):] == 7).all()
    parts = torch.randn(2, 7, 3, 5, 4) * 100  # B, T, parts, kv heads, D
    dst = torch.full((2 * 7 * 5 * 4 + 70, ), 7.0, dtype=torch.float16)  # (the interpreter rounds bf16 otherwise)
    n = dst.numel() - 70
    flash_attn._run(flash_attn._cast, (triton.cdiv(n, 64), ), parts, dst, n, 5 * 4, BLOCK=64, PARTS=3)
    want = (parts[:, :, 0] + parts[:, :, 1] + parts[:, :, 2]).half().flatten()
    assert torch.equal(dst[:n], want) and (dst[n:] == 7).all()


def naive_attention(q, k, v, causal, window):
    """Row by row, float64: query i, at p = i + Tk - Tq, attends to keys j with p-left <= j <= p+right."""
    B, T, H, D = q.shape
    Tk = k.shape[1]
    group = H // k.shape[2]
    left, right = window if window is not None else (-1, -1)
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for i in range(T):
        p = i + Tk - T
        js = [j for j in range(Tk) if (left < 0 or j >= p - left)
              and (j <= p if causal else (right < 0 or j <= p + right))]
        for h in range(H * bool(js)):  # no key: out stays 0
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


@pytest.mark.parametrize("Tq,Tk,causal,window", [(7, 19, True, None), (19, 7, True, None), (19, 7, False, (3, 2)),
                                                  (5, 19, False, (4, 1)), (19, 7, False, None)])
def test_reference_seqlen_q_ne_k(Tq, Tk, causal, window):
    """Bottom-right alignment against the row-by-row loop; rows that see no key: out 0, lse +inf,
    zero gradients, and no nan anywhere."""
    torch.manual_seed(0)
    q, k, v = leaves(torch.randn(2, Tq, 4, 8), torch.randn(2, Tk, 2, 8), torch.randn(2, Tk, 2, 8))
    out, lse = attention_reference(q, k, v, causal=causal, window_size=window)
    assert rel_err(out, naive_attention(q, k, v, causal, window)) < 1e-6
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    empty = (out == 0).all(-1)  # (B, Tq, H)
    assert torch.equal(empty.transpose(1, 2), lse.isinf()) and (lse[lse.isinf()] > 0).all()
    right = 0 if causal else window[1] if window else float("inf")
    assert empty.any() == (Tq - Tk > right)  # the first query is at position Tk - Tq
    assert not any(x.isnan().any() for x in (dq, dk, dv)) and (dq[empty] == 0).all()


def doc_ids_of(lengths):
    """(B, T) int64 ids from each row's document lengths; ids repeat across non-adjacent runs
    (a document is a run, so run 0 and run 2 of id 0 are still two documents)."""
    return torch.stack([torch.cat([torch.full((n,), d % 2) for d, n in enumerate(row)]) for row in lengths])


def per_document(fn, q, k, v, dout, doc_lengths, **kw):
    """(out, lse, dq, dk, dv) with each document of each row run on its own and concatenated."""
    results = [[] for _ in range(5)]
    for b, row in enumerate(doc_lengths):
        t = 0
        for n in row:
            piece = run(fn, *leaves(q[b:b + 1, t:t + n], k[b:b + 1, t:t + n], v[b:b + 1, t:t + n]),
                        dout[b:b + 1, t:t + n], **kw)
            for r, x in zip(results, piece):
                r.append(x)
            t += n
    cat = [torch.cat(r, dim=2 if i == 1 else 1) for i, r in enumerate(results)]  # lse is (1, H, n)
    return [x.reshape(len(doc_lengths), -1, *x.shape[2:]) if i != 1 else
            x.reshape(x.shape[1], len(doc_lengths), -1).transpose(0, 1) for i, x in enumerate(cat)]


def testdocument_bounds():
    ids = torch.tensor([[7, 7, 3, 3, 3, 7], [1, 1, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5]])
    starts, ends = flash_attn.document_bounds(ids)
    assert flash_attn.document_bounds(ids).dtype == torch.int32
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6, [0, 1, 2, 3, 4, 5]]
    assert ends.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6, [1, 2, 3, 4, 5, 6]]
    assert flash_attn.document_bounds(ids[:, :1].int()).tolist() == [[[0]] * 3, [[1]] * 3]


DOC_LENGTHS = [[1, 1, 40, 1, 70, 37], [150], [20, 80, 1, 1, 48]]  # length 1; 20..100 spans tile boundaries


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (False, (9, 4))])
def test_reference_doc_mask_is_each_document_alone(causal, window):
    """The reference's document mask (no interpreter): each document run on its own, float64."""
    torch.manual_seed(1)
    lengths = [[1, 3, 1, 10, 5], [20], [12, 8]]
    q, k, v = leaves(torch.randn(3, 20, 4, 8).double(), torch.randn(3, 20, 2, 8).double(),
                     torch.randn(3, 20, 2, 8).double())
    dout = torch.randn_like(q)
    kw = dict(causal=causal, window_size=window)
    compare(run(attention_reference, q, k, v, dout, doc_ids=doc_ids_of(lengths), **kw),
            per_document(attention_reference, q, k, v, dout, lengths, **kw), 1e-12)


def test_cpu_fallback_is_the_reference(monkeypatch):
    """CPU tensors without the interpreter take the PyTorch path (model.py's "flash" on CPU)."""
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    q, k, v = torch.randn(1, 33, 4, 16), torch.randn(1, 33, 1, 16), torch.randn(1, 33, 1, 16)
    out = flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out, attention_reference(q, k, v, causal=True)[0])


def test_cpu_fallback_takes_the_new_masks(monkeypatch):
    """Documents, Tq != Tk and a padded head dim on the PyTorch path are the reference's."""
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    q, k, v = torch.randn(2, 12, 4, 24), torch.randn(2, 12, 2, 24), torch.randn(2, 12, 2, 24)
    ids = doc_ids_of([[5, 7], [1, 11]])
    assert torch.equal(flash_attn_func(q, k, v, doc_ids=ids), attention_reference(q, k, v, doc_ids=ids)[0])
    assert torch.equal(flash_attn_func(q[:, 8:], k, v), attention_reference(q[:, 8:], k, v)[0])


def test_bad_inputs_are_named():
    q = torch.randn(1, 8, 6, 16)
    with pytest.raises(ValueError, match="nheads=6"):
        flash_attn_func(q, torch.randn(1, 8, 4, 16), torch.randn(1, 8, 4, 16))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, q, q, window_size=5)
    with pytest.raises(ValueError, match="batch, seqlen"):
        flash_attn_func(q[0], q[0], q[0])
    for d in (12, 264, 4):
        x = torch.randn(1, 8, 2, d)
        with pytest.raises(ValueError, match=f"head dim {d} .*multiple of 8 from 8 to 256"):
            flash_attn_func(x, x, x)
    ids = torch.zeros(1, 8, dtype=torch.long)
    for bad in (ids[:, :7], ids.float(), ids[0], ids.bool(), [0] * 8):
        with pytest.raises(ValueError, match="doc_ids must be"):
            flash_attn_func(q, q, q, doc_ids=bad)
        with pytest.raises(ValueError, match="doc_ids must be"):
            attention_reference(q, q, q, doc_ids=bad)
    with pytest.raises(ValueError, match="seqlen_q == seqlen_k"):
        flash_attn_func(q[:, :4], q, q, doc_ids=ids[:, :4])
    bounds = flash_attn.document_bounds(ids)
    with pytest.raises(ValueError, match="not both"):
        flash_attn_func(q, q, q, doc_ids=ids, doc_bounds=bounds)
    for bad in (bounds.long(), bounds[:, :, :7], bounds[0], ids):
        with pytest.raises(ValueError, match=r"doc_bounds must be document_bounds\(doc_ids\): an int32 \(2, 1, 8\)"):
            flash_attn_func(q, q, q, doc_bounds=bad)
        with pytest.raises(ValueError, match="doc_bounds must be"):
            attention_reference(q, q, q, doc_bounds=bad)


# --------------------------------------------------------------------------- custom op, torch.compile
def op_targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@cpu_only
def test_compile_traces_the_custom_op():
    """torch.compile(fullgraph=True) of forward + backward: flash_attn::forward in the forward graph,
    flash_attn::backward in the backward graph (a graph break would raise under fullgraph; a plain
    autograd.Function or a Python-level fallback would leave the ops out), same numbers as eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = {"fw": [], "bw": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def loss_fn(q, k, v):
        out, lse = flash_attn_func(q, k, v, causal=True, window_size=(20, 0), return_lse=True)
        return (out.float() ** 2).sum() + lse.sum().detach()

    torch.manual_seed(0)
    q = torch.randn(2, 40, 4, 32, requires_grad=True)
    k, v = (torch.randn(2, 40, 2, 32, requires_grad=True) for _ in range(2))
    eager = loss_fn(q, k, v)
    grads = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True,
                                backend=aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw")))
    compiled = compiled_fn(q, k, v)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v))
    assert "flash_attn.forward.default" in set().union(*map(op_targets, graphs["fw"]))
    assert "flash_attn.backward.default" in set().union(*map(op_targets, graphs["bw"]))
    assert torch.equal(compiled, eager)
    assert all(torch.equal(a, b) for a, b in zip(compiled_grads, grads))


@cpu_only
def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: the fake functions agree with the kernels (shapes, dtypes, strides, with a
    non-contiguous input), the schema holds, the ops record no autograd of their own (_Attention
    differentiates them). Tq a multiple of 128: no lse padding rows, which the kernels leave unwritten
    (only their values would differ)."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 128, 16).transpose(1, 2).requires_grad_()  # (B, T, H, D), not contiguous
    k, v = (torch.randn(1, 128, 2, 16, requires_grad=True) for _ in range(2))
    args = (None, True, 0.25, 128, 0)
    torch.library.opcheck(torch.ops.flash_attn.forward.default, (q, k, v, *args))
    out, lse = torch.ops.flash_attn.forward(q, k, v, *args)
    assert out.is_contiguous() and lse.shape == (1, 4, 128) and lse.dtype == torch.float32
    torch.library.opcheck(torch.ops.flash_attn.backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *args))


def test_ops_carry_no_python_wrappers():
    """flash_attn::forward and ::backward are plain Library operators: not torch.library.custom_op (whose
    Python wrappers cost 110-200 us of host time per call on an H200 host), and autograd falls through
    them (no Python autograd kernel, ~10 us; nor the not-implemented fallback's grad_fn, which warns):
    flash_attn_func is differentiable through _Attention, in eager mode and compiled."""
    from torch._library.custom_ops import _maybe_get_opdef
    assert _maybe_get_opdef("flash_attn::forward") is None and _maybe_get_opdef("flash_attn::backward") is None
    q = torch.randn(1, 16, 2, 16, requires_grad=True)
    out, lse = torch.ops.flash_attn.forward(q, q, q, None, True, 0.25, 16, 0)
    grads = torch.ops.flash_attn.backward(torch.randn_like(q), q, q, q, out, lse, None, True, 0.25, 16, 0)
    assert not any(x.requires_grad for x in (out, lse, *grads))
    assert type(flash_attn_func(q, q, q).grad_fn).__name__ == "_AttentionBackward"


def test_dependent_launch_only_on_sm90(monkeypatch):
    """Programmatic dependent launch (launch_pdl, and the kernels' wait: GDC) on CUDA GPUs of compute
    capability 9 and later while flash_attn.PDL is set; never on the CPU or older GPUs."""
    capability = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(flash_attn, "_sm90", lambda index: capability[index] >= (9, 0))
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    on, off = dict(GDC=True, launch_pdl=True), dict(GDC=False, launch_pdl=False)
    assert flash_attn._dependent_launch(torch.device("cuda", 0)) == on
    assert flash_attn._dependent_launch(torch.device("cuda", 1)) == off
    assert flash_attn._dependent_launch(torch.device("cpu")) == off
    monkeypatch.setattr(flash_attn, "PDL", False)
    assert flash_attn._dependent_launch(torch.device("cuda", 0)) == off


def _tritons_wrapper(launcher):
    """Triton 3.6's wrap_handle_tensordesc: a closure over the C launcher, which _launcher calls itself."""
    def inner(*args):
        pytest.fail(f"Triton's descriptor wrapper ran, not {launcher} itself")
    return inner


@pytest.fixture
def fake_triton36(monkeypatch):
    """Triton 3.6's launch path faked on the CPU: .compiled, a compiled kernel (a descriptor, a pointer,
    a None, a float, a descriptor, an int, a constexpr) whose C launcher records its arguments in
    .c_calls and whose own runner records in .triton_calls; fill_tma_descriptor records in .fills
    and returns ("map", address, fill number); stream 77 on device 0; .desc(t), a descriptor over a
    (64, 32) bf16 tensor."""
    fills, c_calls, triton_calls = [], [], []

    def fill(*args):
        fills.append(args)
        return ("map", args[0], len(fills))
    monkeypatch.setattr(triton.runtime.driver, "_active", types.SimpleNamespace(
        utils=types.SimpleNamespace(fill_tma_descriptor=fill)))
    monkeypatch.setattr(flash_attn, "_stream", lambda device: 77)
    monkeypatch.setattr(flash_attn, "_device", lambda: 0)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    meta = dict(swizzle=3, elem_size=2, elem_type=10, block_size=[16, 32], fp4_padded=False)  # bf16: host dtype 9
    run = types.SimpleNamespace(launch=_tritons_wrapper(lambda *args: c_calls.append(args)), global_scratch_size=0,
                                profile_scratch_size=0, num_ctas=1, launch_cooperative_grid=False, launch_pdl=True)

    class Compiled:
        src = types.SimpleNamespace(signature={
            "desc_q": "tensordesc<bf16[16, 32]>", "Out": "*bf16", "Docs": "constexpr", "scale": "fp32",
            "desc_k": "tensordesc<bf16[16, 32]>", "T": "i32", "BLOCK": "constexpr"})
        metadata = types.SimpleNamespace(tensordesc_meta=[meta, meta])
        function, packed_metadata = 1234, (4, 1, 5000)

        def __getitem__(self, grid):
            return lambda *args: triton_calls.append((grid, args))
    compiled = Compiled()
    compiled.run = run
    desc = lambda t: flash_attn.TensorDescriptor(t, [64, 32], [32, 1], [16, 32])  # noqa: E731
    return types.SimpleNamespace(compiled=compiled, run=run, fills=fills, c_calls=c_calls, triton_calls=triton_calls,
                                 desc=desc)


def test_direct_launch_arguments(monkeypatch, fake_triton36):
    """flash_attn._launcher under Triton 3.6 (faked on the CPU): Triton's generated C launcher gets the
    grid, the current stream, the kernel's function, launch flags and metadata, no scratch or hooks,
    then every argument in signature order, a descriptor as its CUtensorMap (filled once per base
    address, shape and strides), shape and strides, a tensor as its address. With a launch hook set,
    Triton's own launch runs instead; under other releases, or with DIRECT_LAUNCH off, _launcher is
    Triton's own launch."""
    f = fake_triton36
    compiled, run, fills, c_calls, triton_calls, desc = f.compiled, f.run, f.fills, f.c_calls, f.triton_calls, f.desc
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    assert flash_attn._launcher(compiled, (3, 2, 1)).__name__ == "<lambda>"  # Triton's own (Compiled's runner)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    launch = flash_attn._launcher(compiled, (3, 2, 1))
    x, y, out = (torch.zeros(64, 32, dtype=torch.bfloat16) for _ in range(3))
    launch(desc(x), out, None, 0.5, desc(y), 64, 16)
    launch(desc(x), out, None, 0.5, desc(y), 64, 16)
    fixed = (3, 2, 1, 77, 1234, False, True, None, None, (4, 1, 5000), None, None, None)
    maps = [("map", t.data_ptr(), i) for i, t in ((2, x), (1, y))]  # the last descriptor is filled first
    expected = (*fixed, maps[0], 64, 32, 32, 1, out.data_ptr(), None, 0.5, maps[1], 64, 32, 32, 1, 64, 16)
    assert c_calls == [expected, expected] and triton_calls == []
    assert sorted(fills) == sorted((t.data_ptr(), 3, 2, 9, [16, 32], [64, 32], [32, 1], 0) for t in (x, y))
    triton.knobs.runtime.launch_enter_hook.add(print)
    try:
        launch(desc(x), out, None, 0.5, desc(y), 64, 16)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(print)
    assert len(c_calls) == 2 and len(triton_calls) == 1
    run.global_scratch_size = 128  # scratch memory: Triton's own launch
    assert flash_attn._launcher(compiled, (3, 2, 1)).__name__ == "<lambda>"
    run.global_scratch_size, run.launch = 0, lambda *args: None  # no C launcher in its closure: Triton's own
    assert flash_attn._launcher(compiled, (3, 2, 1)).__name__ == "<lambda>"
    run.launch = _tritons_wrapper(lambda *args: c_calls.append(args))
    assert flash_attn._launcher(compiled, (3, 2, 1)).__name__ == "launch"
    monkeypatch.setattr(flash_attn, "DIRECT_LAUNCH", False)
    assert flash_attn._launcher(compiled, (3, 2, 1)).__name__ == "<lambda>"


def test_replayed_call_launches_as_recorded(monkeypatch, fake_triton36):
    """flash_attn._replayed (the GPU's path; Triton 3.6 faked): a key's first call launches through
    Triton, its second (every launch direct) is recorded, and later calls on new tensors are replayed:
    without running the path, they allocate the outputs afresh and give the C launcher exactly what a
    direct launch of the same tensors gives (their addresses and CUtensorMaps; a kept buffer's address).
    A call whose output is not its allocation, whose input _prepare copies, or that gets one tensor
    twice is never replayed, nor one whose launches stay Triton's."""
    f = fake_triton36
    for name, value in (("_replayable", lambda x: True), ("_PLANS", {}), ("_COMPILED", {}), ("_KEPT_TENSORS", {})):
        monkeypatch.setattr(flash_attn, name, value)
    kept = torch.zeros(8, dtype=torch.bfloat16)
    flash_attn._KEPT_TENSORS[id(kept)] = kept

    class Kernel:  # a JIT function as _run sees it
        device_caches = {}
        params = [types.SimpleNamespace(name=name, default=None) for name in f.compiled.src.signature]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: f.compiled
    kernel, runs = Kernel(), []

    def path(x, y, docs, scale, out_is=None):
        runs.append(x)
        out = flash_attn._empty(x.shape, x.dtype, x.device)
        flash_attn._run(kernel, (3, 2), f.desc(x), out, None, scale, f.desc(y), 64, 16, key=(x.shape, y.shape))
        flash_attn._run(kernel, (3, 2), f.desc(out), kept, None, scale, f.desc(y), 64, 16, key=(x.shape, y.shape))
        return (out if out_is is None else out_is(out), )

    def fresh(n=2):
        return [torch.randn(64, 32).to(torch.bfloat16) for _ in range(n)]
    for call in range(4):
        x, y = fresh()
        f.c_calls.clear()
        (out, ) = flash_attn._replayed(path, (x, y, None), 2, (0.5, ))
        assert len(runs) == min(call + 1, 2) and out.shape == x.shape and out.dtype == x.dtype
        if call >= 2:  # replayed: the C launcher got what direct launches of these tensors give
            assert len(f.c_calls) == 2 and all(t is not out for t in runs)
            replayed = list(f.c_calls)
            launch, _ = next(iter(flash_attn._COMPILED.values()))
            launch(f.desc(x), out, None, 0.5, f.desc(y), 64, 16)
            launch(f.desc(out), kept, None, 0.5, f.desc(y), 64, 16)
            assert f.c_calls[2:] == replayed and replayed[1][18] == kept.data_ptr()
    assert len(f.triton_calls) == 0 and len(flash_attn._PLANS) == 1
    # never replayed (the path runs on every call, distinct new tensors last): an output that is a torch
    # op's or a kept buffer, an input that _prepare copies, one tensor passed twice
    transposed = lambda: [t.t().contiguous().t() for t in fresh()]  # noqa: E731
    for first, out_is in ((fresh, lambda out: out.clone()), (fresh, lambda out: kept), (transposed, None),
                          (lambda: fresh(1) * 2, None)):
        runs.clear()
        case = functools.partial(path, out_is=out_is)
        for inputs in (first(), first(), transposed() if first is transposed else fresh()):
            flash_attn._replayed(case, (*inputs, None), 2, (0.5, ))
        assert len(runs) == 3
    # and launches that stay Triton's own (another release): every call runs the path
    monkeypatch.setattr(flash_attn, "_COMPILED", {})
    monkeypatch.setattr(flash_attn, "_PLANS", {})
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    runs.clear()
    for _ in range(4):
        flash_attn._replayed(path, (*fresh(), None), 2, (0.5, ))
    assert len(runs) == 4 and len(f.triton_calls) == 2 * 4 - 1  # every launch but the first (a compile) is Triton's


def test_backward_fills_no_zeros_for_lse():
    """_Attention's backward gets None for lse's gradient (set_materialize_grads(False)): eager
    autograd otherwise fills a zero tensor of lse's shape per call, which nothing reads."""
    from torch.utils._python_dispatch import TorchDispatchMode
    calls = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.__name__)
            return func(*args, **(kwargs or {}))
    q = torch.randn(1, 16, 2, 16, requires_grad=True)
    out = flash_attn_func(q, q, q)
    with Ops():
        out.backward(torch.randn_like(out))
    fills = [c for c in calls if c.split(".")[0] in ("zeros", "zeros_like", "zero_", "fill_", "full")]
    assert calls and not fills, calls


def test_descriptors_of_a_shape_are_checked_once(monkeypatch):
    """flash_attn.descriptor: the first descriptor of a (class, dtype, shape, strides, block) goes through
    the class (its checks: a bad stride raises), later ones copy its fields with their own base."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    monkeypatch.setattr(flash_attn, "_DESCRIPTOR_FIELDS", {})
    x, y = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    made = [flash_attn.descriptor(TensorDescriptor, t, [128, 32], [32, 1], [16, 32]) for t in (x, y)]
    assert len(flash_attn._DESCRIPTOR_FIELDS) == 1
    for t, d in zip((x, y), made):
        assert type(d) is TensorDescriptor and vars(d) == vars(TensorDescriptor(t, [128, 32], [32, 1], [16, 32]))
    with pytest.raises(AssertionError, match="16-byte aligned"):
        flash_attn.descriptor(TensorDescriptor, x, [128, 32], [31, 1], [16, 32])


def test_launch_passes_the_callers_key_to_run(monkeypatch):
    """_launch on a GPU: the tile comes from the tuned choices (or the default), looked up once per
    key (_CHOICES) and again for a forced tile, and _run gets the caller's key, the call's shapes,
    never the tuned choice's key (which names no shapes: launches of other lengths would reuse a
    kernel specialized for the first one's integers)."""
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    monkeypatch.setattr(flash_attn, "AUTOTUNE", False)
    lookups = []
    monkeypatch.setattr(flash_attn, "_tuned_prefix", lambda device: lookups.append(1) or "a GPU")
    monkeypatch.setattr(flash_attn, "_CHOICES", {})
    monkeypatch.setattr(flash_attn, "FORCE_TILES", {})
    launches = []
    monkeypatch.setattr(flash_attn, "_run", lambda kernel, grid, *args, key=None, **kwargs:
                        launches.append((key, grid, kwargs["BLOCK_M"])))
    q = torch.randn(1, 64, 2, 32)
    default = flash_attn._space("dq", 32, 4)[0][0]
    for T in (64, 64, 48, "forced", 64):
        if T == "forced":
            flash_attn.FORCE_TILES["dq"], T = (16, 16, 4, 1), 64
        x = q[:, :T].contiguous()
        flash_attn._launch("dq", T, 2, [flash_attn._desc(x)] * 4, key=("shapes", T),
                           **flash_attn._common(x, True, None))
    bm = default[0]
    assert launches == [(("shapes", 64), (1, 2), bm), (("shapes", 64), (1, 2), bm), (("shapes", 48), (1, 2), bm),
                        (("shapes", 64), (4, 2), 16), (("shapes", 64), (4, 2), 16)]
    assert len(lookups) == 2  # 64 and 48; the forced tile needs none


def test_launch_cache_goes_through_the_jit_once_per_key(monkeypatch):
    """_run: the first launch of a key goes through kernel[grid] (Triton's JIT: binding, compiling);
    later ones launch the compiled kernel it returned, with every argument in signature order (the
    keyword ones filled in, defaults too). Anything the JIT specializes on makes a new key: dtype,
    16-byte alignment, a descriptor's block, an integer's value, True against 1; and the device. A
    caller's key= replaces the arguments' part of the key."""
    monkeypatch.setattr(flash_attn, "_COMPILED", {})
    monkeypatch.setattr(flash_attn, "DIRECT_LAUNCH", False)  # compiled[grid] (_launcher: its own test above)
    device = [0]
    monkeypatch.setattr(flash_attn, "_device", lambda: device[0])
    jit_calls, direct = [], []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: direct.append((grid, args))

    class Kernel:
        device_caches = {}  # a JITFunction's (the interpreter's kernels have none: no caching there)
        params = [types.SimpleNamespace(name=n, default=d) for n, d in
                  (("x", None), ("n", None), ("flag", None), ("BLOCK", None), ("EXTRA", 7))]

        def __getitem__(self, grid):
            return lambda *args, **kw: jit_calls.append((grid, args, kw)) or Compiled()

    kernel = Kernel()
    x = torch.zeros(64)
    run = lambda *args, **kw: flash_attn._run(kernel, (4, 2), *args, **kw)  # noqa: E731
    run(x, 5, True, BLOCK=16, num_warps=4)
    run(x, 5, True, BLOCK=16, num_warps=4)
    assert len(jit_calls) == 1 and direct == [((4, 2, 1), (x, 5, True, 16, 7))]
    for args, kw in [((x, 5, 1), {}), ((x, 6, True), {}), ((x.half(), 5, True), {}), ((x[1:], 5, True), {}),
                     ((x, 5, True), {"num_warps": 8}), ((x, 5, True), {"BLOCK": 32})]:
        run(*args, **{"BLOCK": 16, "num_warps": 4, **kw})
    assert len(jit_calls) == 7 and len(direct) == 1
    desc = lambda block: flash_attn.TensorDescriptor(x.view(8, 8), [8, 8], [8, 1], block)  # noqa: E731
    run(desc([4, 8]), 5, True, BLOCK=16)
    run(desc([4, 8]), 5, True, BLOCK=16)
    run(desc([8, 8]), 5, True, BLOCK=16)
    assert len(jit_calls) == 9 and len(direct) == 2
    device[0] = 1
    run(desc([8, 8]), 5, True, BLOCK=16)
    assert len(jit_calls) == 10 and len(direct) == 2
    # key=: the caller's values stand for the arguments' (which must follow from them)
    run(x, 5, True, BLOCK=16, key=("shapes", 1))
    run(x, 6, True, BLOCK=16, key=("shapes", 1))
    run(x, 5, True, BLOCK=16, key=("shapes", 2))
    assert len(jit_calls) == 12 and direct[-1] == ((4, 2, 1), (x, 6, True, 16, 7))


@cpu_only
def test_compiled_model_with_flash_matches_eager():
    """model.Transformer with attn_impl="flash" under torch.compile (inductor, as train.py --compile=True
    runs it; fullgraph: no graph break anywhere) gives eager's loss and gradients."""
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32, attn_impl="flash")
    model = Transformer(cfg)
    x, y = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    results = []
    for m in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = m(x, y)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (closs, cgrads) = results
    assert abs(closs.item() - loss.item()) < 1e-5 * loss.item()
    assert max(rel_err(a, b) for a, b in zip(cgrads, grads)) < 1e-4


# --------------------------------------------------------------------------- robustness
NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as without the package
import torch
torch.cuda.is_available = lambda: True  # as on a GPU machine: one line on stderr at import
import flash_attn
assert not flash_attn.HAVE_TRITON and not flash_attn.INTERPRET
torch.manual_seed(0)
q, k, v = torch.randn(1, 9, 4, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
out, lse = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(3, 0), return_lse=True)
ref, ref_lse = flash_attn.attention_reference(q, k, v, causal=True, window_size=(3, 0))
assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=32))
print("ok")
"""


def test_import_without_triton():
    """flash_attn imports without Triton (even with TRITON_INTERPRET=1 set), says so once where a GPU is
    seen, and computes with the reference; transformers, which looks for a package named flash_attn,
    still imports from the root."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    assert run.stderr.count("flash_attn: Triton is not installed") == 1, run.stderr[-3000:]


def fake_hopper_forward(q, k, v, causal, scale, left, right, T_pad):
    """A Hopper forward's output format: out and the log2-unit lse padded to T_pad with +inf."""
    out, lse = attention_reference(q, k, v, causal, scale, (left, right))
    lse2 = torch.full((*lse.shape[:2], T_pad), float("inf"))
    lse2[..., :lse.shape[-1]] = lse * flash_attn.math.log2(flash_attn.math.e)
    return out, lse2


@cpu_only
@pytest.mark.parametrize("fails", ["forward", "backward"])
def test_hopper_failure_falls_back_once(monkeypatch, capsys, fails):
    """An exception from the Hopper module's forward (or backward): the portable kernels take over for
    that call and every later one, with exactly one line on stderr over two calls."""
    calls = []

    def broken(*args):
        calls.append(fails)
        raise AttributeError("module 'gluon' has no attribute 'warpgroup_mma'\n(more compiler output)")

    fake = types.SimpleNamespace(supported=lambda q, direction: True, forward=fake_hopper_forward, backward=broken)
    setattr(fake, fails, broken)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 32, requires_grad=True) for _ in range(3))

    def run():
        out = flash_attn_func(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    monkeypatch.setattr(flash_attn, "HOPPER", True)
    monkeypatch.setattr(flash_attn, "_HOPPER_MODULE", False)  # the portable kernels only
    portable = run()
    monkeypatch.setattr(flash_attn, "_HOPPER_MODULE", fake)
    results = [run(), run()]
    err = capsys.readouterr().err
    assert calls == [fails] and flash_attn._HOPPER_MODULE is False
    assert err.count("\n") == 1 and "flash_attn: the Hopper kernels failed (AttributeError: module" in err, err
    for result in results:
        if fails == "forward":  # all portable
            assert all(torch.equal(a, b) for a, b in zip(result, portable))
        else:  # the fake's forward, then the portable backward on its lse
            assert all(rel_err(a, b) < 1e-4 for a, b in zip(result, portable))


def test_hopper_import_failure_falls_back_once(monkeypatch, capsys):
    """flash_attn_hopper that cannot be imported (a Triton without Gluon, a renamed symbol): one line on
    stderr, the portable kernels, and no second attempt."""
    monkeypatch.setattr(flash_attn, "_HOPPER_MODULE", None)
    monkeypatch.setattr(flash_attn, "HOPPER", True)
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    monkeypatch.setitem(sys.modules, "flash_attn_hopper", None)  # its import raises ImportError
    q = types.SimpleNamespace(is_cuda=True)
    assert flash_attn._hopper(q, "forward") is None and flash_attn._hopper(q, "backward") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Hopper kernels failed (ModuleNotFoundError" in err, err


# --------------------------------------------------------------------------- autotuning
@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16bit", "fp32"])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
def test_autotune_space_is_bounded(head_dim, elem_bytes):
    """Per kernel: a non-empty candidate list that fits (shared memory; registers for float32), at most 4
    configs, at most 2 for float32 or head dims >= 192 (whose compiles are slowest: a float32 head-dim-256
    backward once took 361 s on an H200); the autotuner's prune returns exactly it."""
    slow = elem_bytes == 4 or head_dim >= 192
    total = sum(len(flash_attn._space(which, head_dim, elem_bytes)) for which in ("fwd", "dkdv", "dq"))
    assert total <= (4 if elem_bytes == 4 and head_dim == 256 else 12), total  # compiles on a first fwd+bwd
    for which in ("fwd", "dkdv", "dq"):
        space = flash_attn._space(which, head_dim, elem_bytes)
        assert 1 <= len(space) <= (2 if slow else 4), (which, space)
        assert all(flash_attn._fits(which, tile, head_dim, elem_bytes) for tile, _ in space), (which, space)
        autotuner = flash_attn.KERNELS[which][1]
        pruned = autotuner.early_config_prune(autotuner.configs, {}, HEAD_DIM=head_dim,
                                              PRECISION="ieee" if elem_bytes == 4 else "tf32")
        assert [((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs)
                for c in pruned] == [(t, {"BLOCK_M": t[0], "BLOCK_N": t[1], **x}) for t, x in space]


@cpu_only
def test_tuned_choice_is_reused_by_the_next_process(monkeypatch, tmp_path):
    """The GPU's path of _launch, run in the interpreter: the first call autotunes and writes its choice
    to the JSON file; a new process (fresh memory) launches that choice without tuning again."""
    monkeypatch.setattr(flash_attn, "INTERPRET", False)
    monkeypatch.setattr(flash_attn, "AUTOTUNE", True)
    monkeypatch.setattr(flash_attn, "_TUNED", None)
    monkeypatch.setattr(flash_attn, "_tuned_path", lambda: str(tmp_path / "tuned.json"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "TestGPU")
    flash_attn._tuned_prefix.cache_clear()  # computed once per device and process
    autotuner = flash_attn.KERNELS["fwd"][1]
    runs = []
    monkeypatch.setitem(autotuner.__dict__, "do_bench", lambda fn, quantiles: (fn(), [1.0] * 3)[1])  # no GPU timer
    monkeypatch.setattr(autotuner, "cache", {})
    monkeypatch.setattr(autotuner, "run", lambda *a, _run=autotuner.run, **kw: runs.append(1) or _run(*a, **kw))
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 1, 16), torch.randn(1, 20, 1, 16)
    ref = attention_reference(q, k, v, causal=True)[0]
    assert rel_err(flash_attn._forward(q, k, v, None, True, 0.25, 20, 0)[0], ref) < 1e-5 and len(runs) == 1
    saved = json.loads((tmp_path / "tuned.json").read_text())
    assert len(saved) == 1 and next(iter(saved)).startswith("TestGPU|triton ")
    monkeypatch.setattr(flash_attn, "_TUNED", None)  # the next process
    assert rel_err(flash_attn._forward(q, k, v, None, True, 0.25, 20, 0)[0], ref) < 1e-5 and len(runs) == 1
    assert list(flash_attn._tuned().values())[0] in flash_attn._space("fwd", 16, 4)
    # documents are another kernel (HAS_DOCS): tuned and kept under their own key
    doc_ids = torch.tensor([[0] * 8 + [1] * 12])
    out = flash_attn._forward(q, k, v, flash_attn.document_bounds(doc_ids), True, 0.25, 20, 0)[0]
    assert rel_err(out, attention_reference(q, k, v, causal=True, doc_ids=doc_ids)[0]) < 1e-5 and len(runs) == 2
    assert len(json.loads((tmp_path / "tuned.json").read_text())) == 2


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
    # head dim 128, and 64 from 1k tokens, take flash_attn_hopper on a Hopper GPU: its own tiles, so its
    # own ragged cases
    (2, 300, 4, 4, 128, False, None),  # keys past T in the last key tile are the next sequence's
    (2, 1500, 4, 1, 128, True, (256, 0)),
    (3, 1, 2, 2, 128, True, None),
    (1, 4100, 2, 2, 128, True, None),
    (2, 2100, 4, 1, 64, True, (256, 0)),
    (1, 4100, 4, 2, 64, True, None),
    (1, 8200, 4, 2, 64, True, (2000, 0)),  # and 64's forward from 8k (tiles of 192 query rows)
    (1, 8300, 2, 2, 64, False, None),
    # more forward tiles than an H100/H200 has SMs (132): the persistent programs take several each
    (4, 2100, 8, 2, 128, True, (300, 0)),
    (4, 1500, 8, 4, 64, False, (200, 30)),
]


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-T{}-H{}/{}-D{}-causal{}-win{}".format(*c))
def test_gpu_matches_reference(case, dtype, tol):
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    check_against_reference(*case, dtype=dtype, device="cuda", tol=tol)


# seqlen_q != seqlen_k and odd head dims on the portable kernels (head dim 128 would be Hopper's with Tq == Tk)
GPU_QK_CASES = [
    (2, 300, 1000, 8, 2, 128, True, None),
    (1, 1000, 300, 4, 4, 64, True, None),
    (3, 1, 777, 4, 1, 128, True, None),
    (2, 500, 1200, 4, 2, 128, False, (100, 50)),
    (1, 600, 600, 4, 2, 40, True, None),
    (1, 600, 600, 4, 2, 200, True, (128, 0)),
]


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_QK_CASES, ids=lambda c: "B{}-Tq{}-Tk{}-H{}/{}-D{}-causal{}-win{}".format(*c))
def test_gpu_seqlen_q_ne_k_and_head_dims(case, dtype, tol):
    check_qk_case(case, dtype, "cuda", tol)


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal,window", [(True, None), (False, (200, 30))])
def test_gpu_doc_mask(head_dim, causal, window):
    """Random document lengths (some 1) in bf16: the reference and each document alone."""
    gen = torch.Generator().manual_seed(head_dim)
    lengths = []
    for _ in range(2):
        row, left = [], 1500
        while left:
            n = min(left, 1 if torch.rand((), generator=gen) < 0.2 else int(torch.randint(2, 400, (), generator=gen)))
            row.append(n)
            left -= n
        lengths.append(row)
    (q, k, v, dout), results = check_against_reference(2, 1500, 4, 2, head_dim, causal, window, dtype=torch.bfloat16,
                                                       device="cuda", tol=2e-2, doc_ids=doc_ids_of(lengths).cuda())
    alone = per_document(attention_reference, *leaves(q, k, v, dtype=torch.float64), dout.double(), lengths,
                         causal=causal, window_size=window)
    compare(results, alone, 2e-2)


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_cuda_graph_replay_equals_eager(head_dim):
    """The launch path under CUDA graphs: forward + backward captured once (after warm-up calls that
    compile and tune), then replayed on fresh inputs copied into the captured ones, equals eager on
    those inputs (no host-side state is baked in but shapes)."""
    torch.manual_seed(head_dim)
    shape_q, shape_kv = (2, 700, 4, head_dim), (2, 700, 2, head_dim)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)

    def step():
        out = flash_attn_func(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        fresh = [torch.randn_like(x) for x in (q, k, v, dout)]
        with torch.no_grad():
            for x, new in zip((q, k, v, dout), fresh):
                x.copy_(new)
        graph.replay()
        expected = step()
        # (out, dq, dk, dv); the Hopper kernels' dQ is a sum of atomic adds in any order
        assert all(rel_err(a, b) < 1e-2 if (i == 1 and head_dim == 128) else torch.equal(a, b)
                   for i, (a, b) in enumerate(zip(captured, expected)))


# (B, Tq, Tk, Hq, Hkv, D, causal, documents): every kernel of both paths once on an H100/H200 (Hopper
# forward + backward at 128 and at 64 from 1k tokens), the portable ones for a padded head dim,
# Tq != Tk, documents and head dim 64 below 1k
DIRECT_CASES = [(2, 1024, 1024, 4, 2, 128, True, False), (2, 1024, 1024, 4, 4, 64, False, False),
                (1, 2048, 2048, 4, 2, 64, True, False), (1, 600, 600, 4, 2, 40, True, False),
                (1, 300, 700, 4, 4, 64, True, False), (2, 700, 700, 4, 2, 64, True, True)]


@cuda_only
def test_gpu_direct_launch_equals_tritons(monkeypatch):
    """flash_attn._launcher: a kernel's first launch goes through Triton, later ones under Triton 3.6
    straight to its C launcher (other releases: Triton's launcher again), and from the third call of
    a shape the operators replay the recorded launches (_replayed: neither path runs).
    On fresh inputs at other addresses they give what Triton's launch gave; with a launch hook set the
    launches go through Triton's path, which calls the hook once per launch."""
    monkeypatch.setattr(flash_attn, "_COMPILED", {})
    monkeypatch.setattr(flash_attn, "_PLANS", {})
    monkeypatch.setattr(flash_attn, "AUTOTUNE", False)  # so the first call is the first launch
    runs = []
    for name in ("_forward", "_backward"):
        path = getattr(flash_attn, name)
        monkeypatch.setattr(flash_attn, name, lambda *args, path=path: runs.append(path) or path(*args))
    direct_launch = triton.__version__.startswith("3.6.")
    seen = []
    for B, Tq, Tk, Hq, Hkv, D, causal, docs in DIRECT_CASES:
        torch.manual_seed(D + Tq)
        inputs = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
                  for T, H in ((Tq, Hq), (Tk, Hkv), (Tk, Hkv), (Tq, Hq))]
        kw = dict(causal=causal, doc_ids=doc_ids_of([[100, 1, 250, 349]] * B).cuda() if docs else None)
        call = lambda: run(flash_attn_func, *leaves(*(x.clone() for x in inputs[:3])), inputs[3], **kw)  # noqa: E731
        runs.clear()
        first, direct, replayed = call(), call(), call()  # compiled; recorded; replayed (_replayed)
        assert len(runs) == (4 if direct_launch else 6), runs  # forward and backward (Hopper's too)
        triton.knobs.runtime.launch_enter_hook.add(seen.append)
        try:
            hooked = call()
        finally:
            triton.knobs.runtime.launch_enter_hook.remove(seen.append)
        assert len(seen) >= 2, "Triton's launch path did not run with a hook set"
        seen.clear()
        for again in (direct, replayed, hooked):  # the Hopper backward's dQ is a sum of atomic adds in any order
            assert all(torch.equal(a, b) or (i == 2 and rel_err(a, b) < 1e-2)
                       for i, (a, b) in enumerate(zip(first, again)))
    names = {launch.__name__ for launch, _ in flash_attn._COMPILED.values()}
    assert names == ({"launch"} if direct_launch else {"runner"}), names


@triton.jit
def _late_copy(src, dst, n, DELAY_NS: tl.constexpr, BLOCK: tl.constexpr):
    """dst = src after DELAY_NS of spinning, having let the next kernel launch at once (as a
    dependent launch): if that kernel reads dst without waiting for this one, it reads the old dst."""
    tl.extra.cuda.gdc_launch_dependents()
    start = tl.extra.cuda.globaltimer()
    while tl.extra.cuda.globaltimer() - start < DELAY_NS:
        pass
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@cuda_only
def test_gpu_dependent_launch_waits_for_inputs():
    """On sm_90+ every kernel is a dependent launch (flash_attn._dependent_launch): it may start
    before the kernel ahead of it ends. Each operator's first kernel runs right after a kernel that
    lets it start at once and writes its inputs 200 us later (nan until then): the results equal
    those on inputs written long before, on every kernel path."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    assert flash_attn._dependent_launch(torch.device("cuda"))["launch_pdl"]

    def late(*xs):
        """xs (of one dtype) rewritten by one _late_copy into a nan-filled buffer: views of it, in order."""
        flat = torch.cat([x.reshape(-1) for x in xs])
        buf = torch.full_like(flat, float("nan"))
        n = flat.numel()
        _late_copy[(triton.cdiv(n, 1024), )](flat, buf, n, DELAY_NS=200_000, BLOCK=1024)
        return [v.view_as(x) for v, x in zip(buf.split([x.numel() for x in xs]), xs)]

    for B, Tq, Tk, Hq, Hkv, D, causal, docs in DIRECT_CASES:
        torch.manual_seed(D + Tq)
        q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
                       for T, H in ((Tq, Hq), (Tk, Hkv), (Tk, Hkv), (Tq, Hq)))
        doc_range = flash_attn.document_bounds(doc_ids_of([[100, 1, 250, 349]] * B).cuda()) if docs else None
        args = (doc_range, causal, D ** -0.5, *flash_attn._window(causal, None, Tq, Tk))
        out, lse = torch.ops.flash_attn.forward(q, k, v, *args)
        grads = torch.ops.flash_attn.backward(do, q, k, v, out, lse, *args)
        torch.cuda.synchronize()
        late_out, late_lse = torch.ops.flash_attn.forward(*late(q, k, v), *args)
        late_grads = torch.ops.flash_attn.backward(*late(do, q, k, v, out), lse, *args)
        # (lse's rows past Tq are padding, never written)
        assert torch.equal(late_out, out) and torch.equal(late_lse[..., :Tq], lse[..., :Tq]), (B, Tq, Tk, D)
        # the Hopper backward's dQ is a sum of atomic adds in any order
        assert all(torch.equal(a, b) or (i == 0 and rel_err(a, b) < 1e-2)
                   for i, (a, b) in enumerate(zip(late_grads, grads))), (B, Tq, Tk, D)


@cuda_only
def test_gpu_compiled_reduce_overhead_model_matches_eager():
    """torch.compile(mode="reduce-overhead"): the model with attn_impl="flash" runs as CUDA graphs
    (cudagraph trees) and gives eager's losses and gradients over a few steps."""
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=512,
                      attn_impl="flash")
    model = Transformer(cfg).cuda()
    compiled = torch.compile(model, mode="reduce-overhead")
    for step in range(4):
        x, y = (torch.randint(0, 512, (4, 512), device="cuda") for _ in range(2))
        results = []
        for m in (model, compiled):
            model.zero_grad(set_to_none=True)
            torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(x, y)[1]
            loss.backward()
            results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        (loss, grads), (closs, cgrads) = results
        assert abs(closs - loss) < 1e-2 * loss, (step, closs, loss)
        assert max(rel_err(a, b) for a, b in zip(cgrads, grads)) < 5e-2, step


@cuda_only
def test_hopper_kernels_are_used_on_hopper():
    """On an sm_90 GPU, head dim 128 in bf16/fp16 goes to flash_attn_hopper both ways, head dim 64
    from 1k tokens, so the GPU cases above test them; other head dims and float32 keep the portable
    kernels."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    q = torch.empty(1, 2048, 2, 128, device="cuda", dtype=torch.bfloat16)
    for direction in ("forward", "backward"):
        assert flash_attn._hopper(q, direction) is not None and flash_attn._hopper(q[:, :8], direction) is not None
        assert flash_attn._hopper(q.float(), direction) is None and flash_attn._hopper(q[..., :32], direction) is None
    assert flash_attn._hopper(q[..., :64], "backward") is not None and flash_attn._hopper(q[..., :64], "forward")
    for direction in ("forward", "backward"):  # below 1k the portable kernels are faster
        assert flash_attn._hopper(q[:, :1024, :, :64], direction) is not None
        assert flash_attn._hopper(q[:, :1023, :, :64], direction) is None


def test_hopper_tile_order_takes_every_tile_once():
    """flash_attn_hopper's tile order (_tile_at, scalar code, run here as Python): each (block, head) once;
    the heads in groups of HEADS one after another, the leftover heads in the last group (so no group but
    a lone one has fewer than HEADS), within a group block by block over all of its heads."""
    import flash_attn_hopper as fh
    for n_heads, n_blocks, heads in ((64, 33, 7), (64, 32, 8), (48, 24, 20), (48, 24, 42), (24, 47, 5), (4, 10, 8),
                                     (13, 5, 4), (1, 7, 1), (9, 1, 3)):
        n_groups = max(1, n_heads // heads)
        sizes = [heads] * (n_groups - 1) + [n_heads - heads * (n_groups - 1)]
        want = [(b, first + i) for g, size in enumerate(sizes) for first in [g * heads]
                for b in range(n_blocks) for i in range(size)]
        got = [fh._tile_at.fn(t, n_heads * n_blocks, n_blocks, heads) for t in range(n_heads * n_blocks)]
        assert got == want, (n_heads, n_blocks, heads)
        assert sorted(got) == sorted((b, h) for b in range(n_blocks) for h in range(n_heads))


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_tile_order_changes_no_bit(head_dim):
    """flash_attn_hopper's forward with its tiles started in the shipped L2_GROUP_BYTES groups (here
    20 + 28 query heads at head dim 128, the leftover 8 in the last group; all 48 at once at 64), head by
    head, in groups of 10 (10 + 10 + 10 + 18) and all 48 heads at once: every order computes each tile the
    same way, so the outputs agree bit for bit, and they match the float64 reference."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    import flash_attn_hopper as fh
    T = 3000  # not a multiple of either tile's 128 or 192 rows
    q = torch.randn(3, T, 16, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(3, T, 8, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for causal in (True, False):
        left, right = flash_attn._window(causal, None, T, T)
        runs = [fh.forward(q, k, v, causal, head_dim ** -0.5, left, right, flash_attn._lse_len(T), l2_bytes=l2)
                for l2 in (fh.L2_GROUP_BYTES, 0, 5 * 4 * T * head_dim, 1 << 40)]  # 5 kv heads: 10 query heads
        for out, lse in runs[1:]:
            assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1]), causal
        ref, _ = flash_attn.attention_reference(q.double(), k.double(), v.double(), causal=causal)
        assert ((runs[0][0].double() - ref).norm() / ref.norm()).item() < 2e-2, causal


@cuda_only
def test_hopper_tile_counter_is_left_at_zero():
    """The persistent forward's tile counter is one zeroed int32 per device and stream that each launch
    leaves at zero (its last fetch resets it): calls of different tile counts in a row, on two streams,
    each equal the reference and leave their stream's counter at 0; while a CUDA graph is captured the
    counter is a fresh one, not a stream's."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    import flash_attn_hopper as fh
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
        with torch.cuda.stream(stream):
            for B, T, H, D in ((1, 1100, 2, 128), (3, 2000, 5, 64), (2, 8200, 1, 64), (1, 1024, 1, 128)):
                q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                left, right = flash_attn._window(True, None, T, T)
                out, _ = fh.forward(q, k, v, True, D ** -0.5, left, right, flash_attn._lse_len(T))
                ref, _ = flash_attn.attention_reference(q.double(), k.double(), v.double())
                assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-2, (B, T, H, D)
                assert fh._tile_counter(0).item() == 0
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        assert all(fh._tile_counter(0) is not c for c in fh._COUNTERS.values())


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_tile_order(head_dim, monkeypatch):
    """flash_attn_hopper's backward with its programs started in the shipped L2_GROUP_BYTES groups (here
    5 + 5 + 5 + 9 kv heads at head dim 128, 10 + 14 at 64), head by head, in groups of 3 kv heads and all
    24 at once: dK and dV (each written once by its own program) agree bit for bit; dQ, summed by TMA
    reductions in whatever order the programs reach them, to float32 rounding; and all match float64."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    import flash_attn_hopper as fh
    T, scale = 3000, head_dim ** -0.5
    q = torch.randn(3, T, 16, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(3, T, 8, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    backward = fh.backward
    for causal in (True, False):
        left, right = flash_attn._window(causal, None, T, T)
        out, lse = flash_attn._forward(q, k, v, None, causal, scale, left, right)
        runs = []
        for l2 in (fh.L2_GROUP_BYTES, 0, 3 * 4 * T * head_dim * 2, 1 << 40):  # 3 kv heads: their 6 query heads
            monkeypatch.setattr(fh, "backward", functools.partial(backward, l2_bytes=l2))
            runs.append(flash_attn._backward(do, q, k, v, out, lse, None, causal, scale, left, right))
        assert flash_attn._HOPPER_MODULE is fh  # the Hopper kernel ran, no fallback
        for dq, dk, dv in runs[1:]:
            assert torch.equal(dk, runs[0][1]) and torch.equal(dv, runs[0][2]), causal
            assert ((dq.float() - runs[0][0].float()).norm() / runs[0][0].float().norm()).item() < 1e-3, causal
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = flash_attn.attention_reference(*leaves, causal=causal)[0]
        for name, got, want in zip("qkv", runs[0], torch.autograd.grad(ref, leaves, do.double())):
            assert ((got.double() - want).norm() / want.norm()).item() < 2e-2, (causal, name)


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_split(head_dim):
    """flash_attn_hopper's backward with each key block's steps split over 2, 3 or 8 programs (float32
    partial dK, dV summed by _cast; at 8 some causal blocks have fewer steps than parts, so some parts are
    empty) matches the float64 reference and the unsplit backward, and gives the same bits on a second run.
    Through flash_attn_func, at a causal shape that _splits_for splits (two calls: the second replayed),
    the gradients match float64 too."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("not a Hopper GPU")
    import flash_attn_hopper as fh
    T, scale = 1100, head_dim ** -0.5  # 9 key blocks, the last ragged
    q = torch.randn(2, T, 6, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, T, 3, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    for causal in (True, False):
        left, right = flash_attn._window(causal, None, T, T)
        out, lse = flash_attn._forward(q, k, v, None, causal, scale, left, right)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        want = torch.autograd.grad(flash_attn.attention_reference(*leaves, causal=causal)[0], leaves, do.double())
        whole = fh.backward(do, q, k, v, out, lse, scale, left, right, splits=1)
        for splits in (1, 2, 3, 8):
            got = fh.backward(do, q, k, v, out, lse, scale, left, right, splits=splits)
            for name, g, w, u in zip("qkv", got, want, whole):
                assert ((g.double() - w).norm() / w.norm()).item() < 2e-2, (causal, splits, name)
                assert ((g.float() - u.float()).norm() / u.float().norm()).item() < 1e-2, (causal, splits, name)
            again = fh.backward(do, q, k, v, out, lse, scale, left, right, splits=splits)
            assert torch.equal(again[1], got[1]) and torch.equal(again[2], got[2]), (causal, splits)
    T = 3072  # 24 key blocks x 2 kv heads, 4 query heads each: 192 steps at the first block, two parts
    assert fh._splits_for(T // 128 * 2, 4 * T // 64, fh._sm_count(q.device.index)) == 2
    q = torch.randn(1, T, 8, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, T, 2, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(flash_attn.attention_reference(*leaves, causal=True)[0], leaves, do.double())
    for _ in range(2):
        got = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), do)
        for name, g, w in zip("qkv", got, want):
            assert ((g.double() - w).norm() / w.norm()).item() < 2e-2, name


def test_hopper_backward_splits_only_few_programs():
    """flash_attn_hopper._splits_for: as many waves as BWD_SPLIT_WAVES or more, or blocks shorter than two
    parts of BWD_MIN_STEPS, are not split; a single wave of programs with long blocks takes the most parts."""
    import flash_attn_hopper as fh
    sms, long = 132, 100 * fh.BWD_MIN_STEPS
    assert fh._splits_for(fh.BWD_SPLIT_WAVES * sms, long, sms) == 1
    assert fh._splits_for(fh.BWD_SPLIT_WAVES * sms // 2, long, sms) == 2
    assert fh._splits_for(sms, long, sms) == min(fh.BWD_MAX_SPLITS, fh.BWD_SPLIT_WAVES)
    assert fh._splits_for(sms, 2 * fh.BWD_MIN_STEPS - 1, sms) == 1
    assert fh._splits_for(sms, 3 * fh.BWD_MIN_STEPS, sms) == 3


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
PADDED_COMPILE = r"""
import sys
sys.path.insert(0, "notes")
import flash_attn, ptxas_regs
for which in ("fwd", "dkdv", "dq"):
    (bm, bn, w, s), variant = flash_attn._space(which, 128, 2)[0]
    for dim in (128, 96):  # 96: the 3D descriptors of a padded head dim
        consts = dict(HEAD_DIM=128, DIM=dim, IS_CAUSAL=True, PRECISION="tf32", HAS_DOCS=False, Docs=None,
                      BLOCK_M=bm, BLOCK_N=bn, **variant)
        regs, spills, smem, wgmma = ptxas_regs.compile_one(flash_attn.KERNELS[which][0], consts, bm, bn, 128, w, s)
        print(which, dim, smem, int(wgmma))
"""


def test_padded_head_dim_kernels_compile_for_sm90():
    """A head dim that is not a power of two (96, tiles of 128 columns) compiles for sm_90a without a
    GPU, with wgmma and the same shared memory as head dim 128: the 3D descriptors' tiles land in
    shared memory as the dots' operands (no detour through registers)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", PADDED_COMPILE], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.strip().splitlines()]
    by_kernel = {}
    for which, dim, smem, wgmma in lines:
        assert wgmma == "1", (which, dim)
        by_kernel.setdefault(which, set()).add(smem)
    assert len(by_kernel) == 3 and all(len(v) == 1 for v in by_kernel.values()), lines


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


# the most bytes of spill stores per thread that each shipped kernel (notes/hopper_variants.py's name for it)
# compiles to under Triton 3.6-3.9, the largest of the four releases; more is a change that costs registers
# (kept d64 long: 0 / 0 / 0 / 112 B under 3.6 / 3.7 / 3.8 / 3.9; bwd 128: 208 / 172 / 184 / 28 B, and split
# over programs 188 / 160 / 168 / 84 B; 148 under 3.6 before _tile_at's last group took the leftover heads and
# the steps could be split: ptxas allocates the same loop otherwise, timed within 2%)
SHIPPED_SPILLS = {"kept": 0, "kept d64": 0, "kept d64 long": 112, "bwd 128": 208, "bwd 64": 0, "bwd 128 split": 188,
                  "bwd 64 split": 0}


def test_hopper_notes_substitutions_match_the_kernels():
    """notes/hopper_ablations.py's ABLATIONS and notes/hopper_ab.py's CHANGES are text substitutions in
    flash_attn_hopper.py (a GPU script stops at one whose text is gone): each still finds its text, once
    applied after the ones before it. Read as literals, not imported (those scripts leave the interpreter)."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = open(os.path.join(root, "flash_attn_hopper.py")).read()
    for script, name in (("hopper_ablations.py", "ABLATIONS"), ("hopper_ab.py", "CHANGES")):
        tree = ast.parse(open(os.path.join(root, "notes", script)).read())
        table, = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == name for t in node.targets)]
        assert table, script
        for entry, substitutions in table.items():
            text = source
            for old, new in substitutions:
                assert old in text, f"notes/{script} {name}[{entry!r}] no longer matches: {old[:80]!r}"
                text = text.replace(old, new)


def test_hopper_kernels_compile_for_sm90():
    """flash_attn_hopper's shipped kernels (notes/hopper_variants.py --compile-only with their names: once
    per tile and direction, the tile orders being an argument) compile for sm_90a without a GPU (Triton +
    its bundled ptxas), fit in shared memory, keep their wgmma pipelined (ptxas serializes wgmma when
    registers run out) and spill no more than SHIPPED_SPILLS says. In a subprocess: the interpreter
    mode of this file cannot compile Gluon."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "notes/hopper_variants.py", "--compile-only", *SHIPPED_SPILLS], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "FAILED" not in run.stdout, (run.stdout[-3000:], run.stderr[-3000:])
    lines = {line.split(" D=")[0].strip(): line for line in run.stdout.strip().splitlines()}
    assert set(lines) == set(SHIPPED_SPILLS), lines
    for name, line in lines.items():
        smem = int(line.split("smem ")[1].split()[0])
        assert smem <= 227 * 1024 and line.endswith("pipelined"), line
        assert ", 1 grid dependency wait(s)," in line, line  # compiled as launched on Hopper (GDC)
        spill = int(line.split("spill stores ")[1].split()[0])
        assert spill <= SHIPPED_SPILLS[name], line


@pytest.mark.skipif(tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8),
                    reason="notes/fwd_cluster.py needs Triton 3.8's barriers shared by a cluster")
def test_cluster_forward_compiles_for_sm90():
    """notes/fwd_cluster.py (the forward in clusters of two CTAs sharing K/V by TMA multicast: measured,
    not shipped) still compiles for sm_90a as measured: in shared memory, no spills, K and V each copied
    by multicast (two 64-column boxes apiece), wgmma pipelined."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "notes/fwd_cluster.py", "--compile-only"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    line = run.stdout.strip().splitlines()[-1]
    assert int(line.split("smem ")[1].split()[0]) <= 227 * 1024, line
    assert "spill stores 0 B, 4 multicast copies, pipelined" in line, line
