"""Megatron tensor parallelism (gloo, CPU): the same model as one process, one all-reduce
per sublayer, a vocabulary-parallel loss equal to torch's, and layout-free checkpoints."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from util import assert_same_run, free_port, make_dataset, run_ok, tiny_args

MHA = dict(n_kv_heads=4)  # the tiny default is grouped-query: 4 q heads, 2 kv heads
# (util.assert_same_run explains its parameter tolerance; gradients themselves are compared
# at 1e-5 relative in test_gradients_gather_shard_and_norm.)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("tp")
    make_dataset(base / "data")
    return base



def reference(base, **model):
    """The one-process run of a model variant (computed once per variant)."""
    out = base / ("single_" + "_".join(f"{k}{v}" for k, v in sorted(model.items())))
    if not out.exists():
        run_ok(tiny_args(base, out_dir=str(out), **model))
    return out


# --------------------------------------------------------------------------- whole runs equal one process
@pytest.mark.parametrize("tp, model", [
    (2, {}),  # grouped-query, untied: 1 kv head per rank
    (4, dict(tie_embeddings=True)),  # 2 kv heads over 4 ranks: each kv head replicated on 2 ranks
    pytest.param(2, dict(MHA, tie_embeddings=True), marks=pytest.mark.slow),  # MHA by default: gradient test
    pytest.param(4, MHA, marks=pytest.mark.slow),
    pytest.param(4, {}, marks=pytest.mark.slow),
    pytest.param(2, dict(tie_embeddings=True), marks=pytest.mark.slow),
])
def test_tp_matches_one_process(base, tp, model):
    out = base / ("tp%d_%s" % (tp, "_".join(f"{k}{v}" for k, v in sorted(model.items()))))
    r = run_ok(tiny_args(base, out_dir=str(out), tp=tp, **model), nproc=tp)
    assert f"tp {tp}" in r.stdout
    assert_same_run(out, reference(base, **model))


def test_dp2_tp2_matches_one_process(base):
    """The dp mean divides by dp = 2, not by the world (4): that would halve the logged grad_norm."""
    out = base / "dp2_tp2"
    r = run_ok(tiny_args(base, out_dir=str(out), tp=2), nproc=4)
    assert "dp 2 x pp 1 x tp 2" in r.stdout
    assert_same_run(out, reference(base))


@pytest.mark.parametrize("tp, nproc", [(2, 2), pytest.param(4, 4, marks=pytest.mark.slow)])
def test_sequence_parallel_matches_one_process(base, tp, nproc):
    out = base / f"sp_tp{tp}"
    run_ok(tiny_args(base, out_dir=str(out), tp=tp, sequence_parallel=True), nproc=nproc)
    assert_same_run(out, reference(base))


@pytest.mark.parametrize("tp_save, tp_resume", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_resume_with_another_tp(base, tp_save, tp_resume):
    """Save after 2 steps with one tp, go on to 4 with the other: as if uninterrupted."""
    out = base / f"resume_{tp_save}_{tp_resume}"
    run_ok(tiny_args(base, out_dir=str(out), tp=tp_save, max_iters=2), nproc=tp_save)
    run_ok(tiny_args(base, out_dir=str(out), tp=tp_resume, init_from="resume"), nproc=tp_resume)
    assert_same_run(out, reference(base))


def test_layout_errors_are_clear():
    import parallel
    from model import ModelConfig, Transformer
    mesh = parallel.Mesh(world=2, rank=0, tp=2)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, ffn_dim=33, max_seq_len=16))
    with pytest.raises(parallel.LayoutError, match="ffn_dim=33 is not divisible by tp=2"):
        parallel.parallelize(model, mesh, SimpleNamespace(sequence_parallel=False, block_size=16, zero=0))
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, ffn_dim=32, max_seq_len=16))
    with pytest.raises(parallel.LayoutError, match="block_size=15 must be divisible by tp=2"):
        parallel.parallelize(model, mesh, SimpleNamespace(sequence_parallel=True, block_size=15, zero=0))


# --------------------------------------------------------------------------- in-process checks

def _spawn(fn, world, *args):
    results = mp.Manager().dict()
    mp.spawn(_init_and_run, args=(world, free_port(), fn, results, args), nprocs=world)
    return dict(results)


def _init_and_run(rank, world, port, fn, results, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results[rank] = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _tp_mesh(rank, world):
    import parallel
    return parallel.Mesh(world, rank, 1, 1, world, 0, 0, rank, tp_group=dist.group.WORLD,
                         mp_group=dist.group.WORLD)


def _vocab_ce_worker(rank, world, scale):
    import parallel
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 64, generator=g, dtype=torch.float64).float() * scale
    targets = torch.randint(0, 64, (3, 5), generator=g)
    targets[0, :3] = -1  # ignored
    targets[2, 4] = -1
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=-1)
    ref.backward()
    mesh = _tp_mesh(rank, world)
    v = 64 // world
    local = logits[..., rank * v:(rank + 1) * v].clone().requires_grad_()
    loss = parallel.vocab_parallel_cross_entropy(local, targets, rank * v, mesh.tp_group)
    loss.backward()
    gathered = parallel.gather_logits(local.detach(), mesh)
    return dict(loss=(loss.item(), ref.item()), grad=(local.grad - full.grad[..., rank * v:(rank + 1) * v]).abs().max().item(),
                gathered=torch.equal(gathered, logits))


def _grad_worker(rank, world, cases):
    """One forward/backward of the tp model vs the single-device one built from the same seed."""
    import parallel
    from model import ModelConfig, Transformer
    mesh = _tp_mesh(rank, world)
    out = {}
    for model_kw, sp in cases:
        cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16, multiple_of=16, **model_kw)
        torch.manual_seed(0)
        ref = Transformer(cfg)
        torch.manual_seed(0)
        model = parallel.parallelize(Transformer(cfg), mesh, SimpleNamespace(sequence_parallel=sp, block_size=16, zero=0))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randint(0, 64, (3, 16), generator=g), torch.randint(0, 64, (3, 16), generator=g)
        y[0, :5] = -1
        ref_loss, loss = ref(x, y)[1], model(x, y)[1]
        ref_loss.backward()
        loss.backward()
        grads = parallel.gather_full({n: p.grad for n, p in model.named_parameters()}, model, mesh)
        params = parallel.gather_full(dict(model.named_parameters()), model, mesh)
        resharded = parallel.shard_full(params, model, mesh)
        r = dict(loss=(loss.item(), ref_loss.item()), names=sorted(grads) == sorted(n for n, _ in ref.named_parameters()),
                 norm=(parallel.grad_norm(model, mesh).item(), torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()),
                 same_init=all(torch.equal(params[n], p) for n, p in ref.named_parameters()),
                 reshard=all(torch.equal(resharded[n], p) for n, p in model.named_parameters()),
                 grad_err={n: ((grads[n] - p.grad).norm() / p.grad.norm()).item() for n, p in ref.named_parameters()})
        out[str(model_kw), sp] = r
    return out


GRAD_CASES = [(dict(n_kv_heads=2), False), (dict(n_kv_heads=1), False), (dict(n_kv_heads=4, tie_embeddings=True), False),
              (dict(n_kv_heads=2), True), (dict(n_kv_heads=1, head_dim=12), False)]  # head_dim != dim / n_heads


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gradients_gather_shard_and_norm(world):
    """Same initial model as tp=1, gradients within 1e-5 (n_kv_heads=1 < tp: a kv head shared
    by ranks), gather_full/shard_full round-trip, grad_norm counts each parameter once."""
    for rank, res in _spawn(_grad_worker, world, GRAD_CASES).items():
        for case, r in res.items():
            assert r["names"] and r["same_init"] and r["reshard"], (rank, case)
            assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6 * r["loss"][1], (rank, case, r["loss"])
            assert abs(r["norm"][0] - r["norm"][1]) <= 1e-5 * r["norm"][1], (rank, case, r["norm"])
            bad = {n: e for n, e in r["grad_err"].items() if not e <= 1e-5}
            assert not bad, (rank, case, bad)


@pytest.mark.parametrize("world, scale", [(2, 4.0), (2, 400.0), pytest.param(4, 4.0, marks=pytest.mark.slow)])
def test_vocab_parallel_cross_entropy_equals_torch(world, scale):
    """scale 400: logits up to ~1000, where e^x overflows float32 unless the max is subtracted (4.5)."""
    for rank, r in _spawn(_vocab_ce_worker, world, scale).items():
        ours, ref = r["loss"]
        assert abs(ours - ref) <= 1e-6 * abs(ref), (rank, ours, ref)
        assert r["grad"] <= 1e-7, (rank, r["grad"])
        assert r["gathered"], rank


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
               "reduce_scatter_tensor", "broadcast", "all_to_all", "reduce", "gather", "scatter")


def _count_worker(rank, world, cases):
    """Collectives issued by one forward and one backward, per (n_layers, n_kv_heads, sp)."""
    import parallel
    from model import ModelConfig, Transformer
    counts = {}
    phase = ["forward"]
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[phase[0]][name] = counts[phase[0]].get(name, 0) + 1
            return fn(*a, **k)
        return wrapped
    wrapped = {name: counting(name, fn) for name, fn in originals.items()}
    for name, fn in wrapped.items():
        setattr(dist, name, fn)
    for attr, value in list(vars(parallel).items()):  # names parallel bound to dist functions
        for name, fn in originals.items():
            if value is fn:
                setattr(parallel, attr, wrapped[name])
    out = {}
    for n_layers, n_kv_heads, sp in cases:
        torch.manual_seed(0)
        cfg = ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=64,
                          max_seq_len=16, multiple_of=16)
        model = parallel.parallelize(Transformer(cfg), _tp_mesh(rank, world),
                                     SimpleNamespace(sequence_parallel=sp, block_size=16, zero=0))
        x = torch.randint(0, 64, (2, 16))
        counts.update(forward={}, backward={})
        phase[0] = "forward"
        loss = model(x, x)[1]
        phase[0] = "backward"
        loss.backward()
        out[n_layers, n_kv_heads, sp] = dict(counts)
    return out


COUNT_CASES = [(2, False), (1, False), (2, True)]  # (n_kv_heads, sequence_parallel) at tp=2


@pytest.fixture(scope="module")
def collective_counts():
    cases = [(n, kv, sp) for kv, sp in COUNT_CASES for n in (1, 2)]
    return _spawn(_count_worker, 2, cases)[0]


@pytest.mark.parametrize("n_kv_heads, sp", COUNT_CASES)
def test_collectives_per_block(collective_counts, n_kv_heads, sp):
    """Per block: forward one all-reduce after attention and one after the feed-forward,
    backward their mirror (f); a kv head shared by ranks (n_kv_heads=1 < tp=2) adds its
    wk/wv gradient sums. Outside the blocks: the embedding's all-reduce, the loss's three
    (max, sum of exponentials, target logit), and f after the final norm in backward.
    Counted as (2 blocks) - (1 block), so any extra collective in a block shows up."""
    one, two = collective_counts[1, n_kv_heads, sp], collective_counts[2, n_kv_heads, sp]
    nonzero = lambda d: {k: v for k, v in d.items() if v}
    block = {phase: nonzero({k: two[phase].get(k, 0) - one[phase].get(k, 0) for k in two[phase]}) for phase in two}
    rest = {phase: nonzero({k: one[phase][k] - block[phase].get(k, 0) for k in one[phase]}) for phase in one}
    if not sp:
        assert block["forward"] == {"all_reduce": 2}, block
        assert block["backward"] == {"all_reduce": 2 + (2 if n_kv_heads < 2 else 0)}, block
        assert rest["forward"] == {"all_reduce": 4}, rest
        assert rest["backward"] == {"all_reduce": 1}, rest
    else:  # all-reduce = reduce-scatter + all-gather; norm weights see T/tp tokens: sum their gradients
        gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
        scatter = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
        assert block["forward"] == {gather: 2, scatter: 2}, block
        assert block["backward"] == {gather: 2, scatter: 2, "all_reduce": 2}, block
        assert rest["forward"] == {scatter: 1, gather: 1, "all_reduce": 3}, rest
        assert rest["backward"] == {gather: 1, scatter: 1, "all_reduce": 1}, rest
