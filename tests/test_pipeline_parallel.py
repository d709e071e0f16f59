"""Pipeline parallelism (GPipe, 1F1B, interleaved 1F1B; gloo, CPU) trains the same model as one process.

Three layers of tests: the schedules as pure lists (every action once, no deadlock, the bubble
of a timed simulation equals the printed formula); one spawned 4-rank job that runs a pipeline
step for each schedule and layout and compares loss, gradients and live activations with one
process; and whole train.py runs (per-step losses and final parameters at 1e-5, resume under
a different pp, evaluation, tied embeddings, dp x pp, dp x pp x tp)."""
import json
import os
import types
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint
import parallel
from util import assert_same_run, final_params, free_port, make_dataset, run_ok, run_train, tiny_args


# --------------------------------------------------------------------------- schedules as lists
def simulate(actions_by_stage, n_chunks, tf=1.0, tb=2.0):
    """Run the stages' action lists with async sends and blocking receives: a forward of chunk
    g waits for the forward of g-1, a backward for the backward of g+1. Returns each stage's
    idle share of the makespan; fails on a deadlock (some stage can never go on)."""
    done, ptr = {}, [0] * len(actions_by_stage)
    free, busy = [0.0] * len(actions_by_stage), [0.0] * len(actions_by_stage)
    progress = True
    while progress:
        progress = False
        for s, acts in enumerate(actions_by_stage):
            while ptr[s] < len(acts):
                kind, mb, g = acts[ptr[s]]
                dep = ("F", mb, g - 1) if kind == "F" and g > 0 else \
                      ("B", mb, g + 1) if kind == "B" and g < n_chunks - 1 else None
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done[dep] if dep else 0.0)
                dt = tf if kind == "F" else tb
                done[kind, mb, g] = free[s] = start + dt
                busy[s] += dt
                ptr[s] += 1
                progress = True
    assert ptr == [len(a) for a in actions_by_stage], f"deadlock at {ptr}"
    end = max(free)
    return [(end - b) / end for b in busy]


def schedules(name, m, pp, v):
    if name == "gpipe":
        return [parallel.gpipe_schedule(m, pp, s) for s in range(pp)]
    if name == "1f1b":
        return [parallel.one_f_one_b_schedule(m, pp, s) for s in range(pp)]
    return [parallel.interleaved_schedule(m, pp, s, v) for s in range(pp)]


def peak_live(actions):
    live = peak = 0
    for kind, _, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name, v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)])
@pytest.mark.parametrize("pp, m", [(2, 2), (2, 4), (4, 4), (4, 8), (4, 12), (3, 6)])
def test_schedule_complete_deadlock_free_and_bubble_matches_formula(name, v, pp, m):
    acts = schedules(name, m, pp, v)
    for s, a in enumerate(acts):  # each (micro-batch, own chunk) forwarded and backwarded exactly once
        own = {(mb, g) for mb in range(m) for g in range(s, pp * v, pp)}
        assert sorted((mb, g) for k, mb, g in a if k == "F") == sorted(own)
        assert sorted((mb, g) for k, mb, g in a if k == "B") == sorted(own)
    idle = simulate(acts, pp * v, tf=1.0 / v, tb=2.0 / v)  # a chunk is 1/v of a stage's work
    expected = parallel.bubble_fraction(name, pp, m, v)
    assert all(abs(i - expected) < 1e-9 for i in idle), (idle, expected)


@pytest.mark.parametrize("pp, m", [(2, 8), (4, 8), (4, 16)])
def test_1f1b_bounds_live_activations_gpipe_does_not(pp, m):
    assert peak_live(parallel.gpipe_schedule(m, pp, 0)) == m
    assert [peak_live(parallel.one_f_one_b_schedule(m, pp, s)) for s in range(pp)] == list(range(pp, 0, -1))


def test_split_layers_balanced_uneven_and_errors():
    assert parallel.split_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parallel.split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert parallel.split_layers(8, 4, first=1, last=1) == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert parallel.split_layers(4, 2, first=1) == [[0], [1, 2, 3]]
    with pytest.raises(parallel.LayoutError, match="n_layers=3 is fewer than the 4 pipeline chunks"):
        parallel.split_layers(3, 4)
    with pytest.raises(parallel.LayoutError, match="pp_first_layers=3 and pp_last_layers=3 leave 0 of n_layers=6"):
        parallel.split_layers(6, 3, first=3, last=3)


def _cfg(**kw):
    base = dict(n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, batch_size=8, micro_batch_size=2,
                pp_schedule="1f1b", pp_virtual=1)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("world, tp, pp, kw, message", [
    (4, 1, 4, dict(n_layers=4, pp_virtual=2, pp_schedule="interleaved"),
     "n_layers=4 is fewer than pp*pp_virtual = 4*2"),
    (4, 1, 2, dict(pp_virtual=2, pp_schedule="interleaved"),  # dp 2: 8 / (2*2) = 2 micro-batches, fine
     None),
    (2, 1, 2, dict(pp_virtual=2, pp_schedule="interleaved", batch_size=6),
     "micro-batches per step to be a multiple of pp: batch_size/(micro_batch_size*dp) = 3 micro-batches, pp=2"),
    (2, 1, 2, dict(pp_schedule="interleaved"), "needs pp_virtual >= 2"),
    (2, 1, 2, dict(pp_virtual=2), "pp_virtual=2 needs pp_schedule='interleaved'"),
    (3, 1, 2, dict(), "world size 3 is not divisible by tp*pp = 1*2"),
])
def test_impossible_layouts_name_the_numbers(world, tp, pp, kw, message):
    cfg = _cfg(**kw)
    if message is None:
        parallel.check_layout(world, tp, pp, cfg)
        return
    with pytest.raises(parallel.LayoutError, match=message.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        parallel.check_layout(world, tp, pp, cfg)


# --------------------------------------------------------------------------- one pipeline step, in process

WORLD = 4
CASES = [  # (pp, schedule, pp_virtual, n_layers, tie_embeddings) on 4 ranks: dp = 4 / pp
    (2, "gpipe", 1, 4, False), (2, "1f1b", 1, 4, False), (2, "interleaved", 2, 4, False),
    (4, "gpipe", 1, 4, False), (4, "1f1b", 1, 4, False), (4, "interleaved", 2, 8, False),
    (2, "1f1b", 1, 4, True), (4, "interleaved", 2, 8, True),
]
M = 8  # micro-batches of the global batch (2 sequences each); dp rank d takes a contiguous share


def _step_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from model import ModelConfig, Transformer
    out = {}
    for case in CASES:
        pp, schedule, v, n_layers, tied = case
        mesh = parallel.make_mesh(world, rank, world // pp, pp, 1)
        mcfg = ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=64,
                           multiple_of=16, max_seq_len=16, tie_embeddings=tied)
        torch.manual_seed(0)
        ref = Transformer(mcfg)
        g = torch.Generator().manual_seed(1)
        seqs = torch.randint(0, 64, (2 * M, 17), generator=g)
        batches = [(seqs[i:i + 2, :-1], seqs[i:i + 2, 1:]) for i in range(0, 2 * M, 2)]
        ref_loss = sum(ref(x, y)[1] for x, y in batches) / M
        ref_loss.backward()
        model = Transformer(mcfg)
        model.load_state_dict(ref.state_dict())
        cfg = types.SimpleNamespace(sequence_parallel=False, pp_schedule=schedule, pp_virtual=v, pp_first_layers=0, pp_last_layers=0,
                                    micro_batch_size=2, block_size=16, pp_measure_idle=False, zero=0,
                                    dp_bucket_mb=25.0)
        model = parallel.parallelize(model, mesh, cfg)
        per_rank = M // mesh.dp
        mine = batches[mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank]
        batches_posted = []  # (op, peer) of every batch_isend_irecv this rank posts
        post = dist.batch_isend_irecv
        dist.batch_isend_irecv = lambda ops: batches_posted.append({(o.op.__name__, o.peer) for o in ops}) or post(ops)
        try:
            loss = parallel.pipeline_step(model, mine, 1.0, nullcontext())
        finally:
            dist.batch_isend_irecv = post
        pipe = model.pipeline
        prev, nxt = pipe.rank_of(mesh.pp_rank - 1), pipe.rank_of(mesh.pp_rank + 1)
        connects_first = batches_posted[0] == {("isend", nxt), ("irecv", prev), ("isend", prev), ("irecv", nxt)}
        connects = [None] * mesh.pp
        dist.all_gather_object(connects, connects_first, group=mesh.pp_group)
        logged = parallel.reduce_for_log(loss, mesh).item()
        grads = parallel.gather_full({n: p.grad for n, p in model.named_parameters()}, model, mesh)
        norm = parallel.grad_norm(model, mesh).item()
        peaks = [None] * mesh.pp
        dist.all_gather_object(peaks, model.pipeline.peak_live, group=mesh.pp_group)
        if rank == 0:
            ref_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters())).item()
            out[case] = dict(loss=(logged, ref_loss.item()), norm=(norm, ref_norm), peaks=peaks, connects=connects,
                             grads={n: (grads.get(n), p.grad) for n, p in ref.named_parameters()})
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def step_results():
    results = mp.Manager().dict()
    mp.spawn(_step_worker, args=(WORLD, free_port(), results), nprocs=WORLD)
    return dict(results)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"dp{WORLD // c[0]}-pp{c[0]}-{c[1]}-v{c[2]}" + ("-tied" if c[4] else ""))
def test_pipeline_step_equals_one_process(step_results, case):
    """Loss, every gradient (tied embedding summed over first and last stage, counted once)
    and the global gradient norm equal one process's gradient accumulation over M micro-batches."""
    r = step_results[case]
    assert abs(r["loss"][0] - r["loss"][1]) <= 1e-6 * abs(r["loss"][1]), r["loss"]
    assert abs(r["norm"][0] - r["norm"][1]) <= 1e-5 * r["norm"][1], r["norm"]
    for name, (ours, ref) in r["grads"].items():
        assert ours is not None, f"{name} missing from the gathered gradients"
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_live_activations_first_stage(step_results):
    """Counted on the real run (the schedule's peak_live): on the first stage 1F1B holds at most
    pp micro-batches' activations at once, GPipe all of them (8 at pp=4, 4 per dp rank at pp=2)."""
    assert step_results[(4, "gpipe", 1, 4, False)]["peaks"] == [M] * 4
    assert step_results[(4, "1f1b", 1, 4, False)]["peaks"] == [4, 3, 2, 1]
    assert step_results[(2, "gpipe", 1, 4, False)]["peaks"] == [M // 2] * 2
    assert step_results[(2, "1f1b", 1, 4, False)]["peaks"] == [2, 1]


def test_first_batch_connects_both_neighbours(step_results):
    """Every stage's first batch_isend_irecv sends to and receives from both neighbours (the ring).
    NCCL connects each direction of a pair lazily, blocking the host until the peer's matching
    batch runs; GPipe's [send a_m, recv g_1] on stage 0 then deadlocked on 2 H200s, as stage 1
    sends g_1 only after a_m arrived. gloo cannot show that hang; this checks the cure is in place."""
    for case, r in step_results.items():
        assert r["connects"] == [True] * case[0], (case, r["connects"])


# --------------------------------------------------------------------------- whole runs of train.py
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    base = tmp_path_factory.mktemp("pp")
    make_dataset(base / "data")
    r = run_train(tiny_args(base, out_dir=str(base / "single"), eval_interval=2))
    assert r.returncode == 0, r.stderr
    return base



@pytest.mark.parametrize("pp, schedule, extra", [
    (4, "gpipe", {}),
    (2, "interleaved", dict(pp_virtual=2)),
    pytest.param(2, "1f1b", {}, marks=pytest.mark.slow),  # also run by the tied and dp x pp tests
    pytest.param(2, "gpipe", {}, marks=pytest.mark.slow),
    pytest.param(4, "1f1b", {}, marks=pytest.mark.slow),
    pytest.param(4, "1f1b", dict(pp_first_layers=1, pp_last_layers=1, n_layers=6), marks=pytest.mark.slow),
])
def test_pp_run_matches_one_process(single, pp, schedule, extra):
    """Per-step losses (logged from the last stage), validation loss through the pipeline and
    the final checkpoint, which a single process loads, equal one process."""
    ref = single / "single"
    if "n_layers" in extra:
        ref = single / "single6"
        if not ref.exists():
            run_ok(tiny_args(single, out_dir=str(ref), eval_interval=2, n_layers=6), 1)
    out = single / f"pp{pp}_{schedule}_{len(extra)}"
    r = run_ok(tiny_args(single, out_dir=str(out), pp=pp, pp_schedule=schedule, eval_interval=2, **extra), pp)
    bubble = parallel.bubble_fraction(schedule, pp, 4, extra.get("pp_virtual", 1))
    assert f"theoretical bubble {bubble:.1%}" in r.stdout, r.stdout
    assert_same_run(out, ref)
    val = lambda d: [l for l in open(d / "log.jsonl") if "val_loss" in l]
    assert val(out) and len(val(out)) == len(val(ref))
    for a, b in zip(val(out), val(ref)):
        assert abs(json.loads(a)["val_loss"] - json.loads(b)["val_loss"]) <= 1e-5 * json.loads(b)["val_loss"], (a, b)
    model, _ = checkpoint.load_model(str(out))  # one process loads a pipeline checkpoint (strictly)
    torch.testing.assert_close(model.layers[str(len(model.layers) - 1)].feed_forward.w2.weight,
                               final_params(ref)[f"layers.{len(model.layers) - 1}.feed_forward.w2.weight"])


def test_dp2_pp2_with_idle_measurement(single):
    out = single / "dp2_pp2"
    r = run_ok(tiny_args(single, out_dir=str(out), pp=2, eval_interval=2, pp_measure_idle=True), 4)
    assert "dp 2 x pp 2" in r.stdout and "idle by stage" in r.stdout, r.stdout
    recs = [json.loads(l) for l in open(out / "log.jsonl")]
    idle = [rec["pp_idle"] for rec in recs if "pp_idle" in rec]
    assert len(idle) == 4 and all(len(i) == 2 and all(0 <= f < 1 for f in i) for i in idle)
    assert_same_run(out, single / "single")


def test_tied_embeddings_pp2(single):
    """Output head and embedding share one matrix, held by the first and the last stage: their
    gradients are summed, it is counted once in the gradient norm and saved once."""
    ref, out = single / "single_tied", single / "pp2_tied"
    run_ok(tiny_args(single, out_dir=str(ref), tie_embeddings=True), 1)
    run_ok(tiny_args(single, out_dir=str(out), tie_embeddings=True, pp=2), 2)
    assert_same_run(out, ref)
    assert "output.weight" not in final_params(out)
    norms = lambda d: [json.loads(l)["grad_norm"] for l in open(d / "log.jsonl") if "grad_norm" in l]
    assert norms(out) == pytest.approx(norms(ref), rel=1e-5)


def test_resume_under_a_different_pp(single):
    """Two steps at pp=2 (uneven: 1 + 3 layers, GPipe), resumed at pp=4 (1F1B): the same run."""
    out = single / "resume"
    run_ok(tiny_args(single, out_dir=str(out), pp=2, pp_schedule="gpipe", pp_first_layers=1,
                     max_iters=2, checkpoint_interval=2), 2)
    run_ok(tiny_args(single, out_dir=str(out), pp=4, init_from="resume", eval_interval=2), 4)
    assert_same_run(out, single / "single")


def test_pp2_tp2_sequence_parallel_matches_one_process(single):
    """Sequence parallelism hands each stage's output to the next as a slice of the sequence."""
    out = single / "pp2_tp2_sp"
    run_ok(tiny_args(single, out_dir=str(out), tp=2, pp=2, sequence_parallel=True, eval_interval=2), 4)
    assert_same_run(out, single / "single")


def test_3d_dp2_pp2_tp2_matches_one_process(single):
    out = single / "3d"
    r = run_ok(tiny_args(single, out_dir=str(out), tp=2, pp=2, eval_interval=2), 8)
    assert "dp 2 x pp 2 x tp 2" in r.stdout, r.stdout
    assert_same_run(out, single / "single")
