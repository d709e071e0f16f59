"""ZeRO stages 1-3 (zero.py) on CPU with gloo train the same model as one process with torch's AdamW."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint
import parallel
import train
import zero
from util import assert_same_run, final_params, free_port, losses, make_dataset, run_ok, run_train, tiny_args

CLIP = 0.5  # below the tiny model's gradient norms (~0.9), so clipping is active in every step


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference: zero=0, torch.optim.AdamW, 2 micro-steps of accumulation."""
    base = tmp_path_factory.mktemp("zero")
    make_dataset(base / "data")
    r = run_train(tiny_args(base, out_dir=str(base / "single"), grad_clip=CLIP))
    assert r.returncode == 0, r.stderr
    return base



# --------------------------------------------------------------------------- same trajectory as one process
@pytest.mark.parametrize("stage, nproc", [(1, 2), (2, 2), (3, 2), (3, 4),
                                          pytest.param(1, 4, marks=pytest.mark.slow),
                                          pytest.param(2, 4, marks=pytest.mark.slow)])
def test_zero_matches_one_process(single, stage, nproc):
    """Per rank 4 (dp=2) or 2 (dp=4) sequences in micro-batches of 2 or 1: two accumulation micro-steps."""
    out = single / f"zero{stage}_dp{nproc}"
    micro = 2 if nproc == 2 else 1
    r = run_ok(tiny_args(single, out_dir=str(out), zero=stage, grad_clip=CLIP, micro_batch_size=micro), nproc)
    assert f"dp {nproc}" in r.stdout and f"memory per rank: zero={stage} N={nproc}" in r.stdout
    assert_same_run(out, single / "single")
    ckpt = checkpoint.latest(str(out))
    assert {f for f in os.listdir(ckpt) if f.startswith("optim")} == \
        {"optimizer.pt"} | {f"optim_rank{r}.pt" for r in range(nproc)}


def test_zero2_without_clipping_matches_one_process(single):
    """grad_clip=0: nothing rescales the gradients, so a sum for a mean in the reduce-scatter
    shows in the logged gradient norm (and clipping can't hide it)."""
    ref, out = single / "single_noclip", single / "zero2_dp2_noclip"
    run_ok(tiny_args(single, out_dir=str(ref), grad_clip=0.0))
    run_ok(tiny_args(single, out_dir=str(out), zero=2, grad_clip=0.0), 2)
    assert_same_run(out, ref)


def test_zero3_one_process(single):
    """dp=1: a degenerate shard (the whole model), still through every hook."""
    out = single / "zero3_dp1"
    run_ok(tiny_args(single, out_dir=str(out), zero=3, grad_clip=CLIP), 1)
    assert_same_run(out, single / "single")


@pytest.mark.parametrize("before, after, files", [
    ((4, 3, 1), (2, 1, 2), "full"),  # another dp size and stage: from optimizer.pt
    pytest.param((2, 3, 2), (2, 2, 2), "shard", marks=pytest.mark.slow),  # same layout: optim_rank<r>.pt
])
def test_resume_with_another_stage_and_dp(single, before, after, files):
    """Save at step 2 under (dp, zero, micro_batch_size) `before`, resume under `after`: losses continue."""
    out = single / f"resume_{files}"
    (n0, z0, mb0), (n1, z1, mb1) = before, after
    run_ok(tiny_args(single, out_dir=str(out), zero=z0, grad_clip=CLIP, micro_batch_size=mb0, max_iters=2), n0)
    r = run_ok(tiny_args(single, out_dir=str(out), zero=z1, grad_clip=CLIP, micro_batch_size=mb1,
                         init_from="resume"), n1)
    assert "resuming at step 2" in r.stdout and f"moments from {files}" in r.stdout, r.stdout
    assert_same_run(out, single / "single")


def test_load_picks_shard_file_or_full_state(single, monkeypatch):
    """In one process: the same layout loads optim_rank0.pt, another dp size falls back to optimizer.pt,
    and both give the moments of the saved run."""
    out = single / "zero3_dp1"  # written by test_zero3_one_process (dp=1) -- or written here
    if checkpoint.latest(str(out)) is None:
        run_ok(tiny_args(single, out_dir=str(out), zero=3, grad_clip=CLIP), 1)
    path = checkpoint.latest(str(out))
    full = checkpoint.load(path, "optimizer.pt")
    cfg = train.load_config(tiny_args(single, zero=2))
    from model import Transformer
    model = Transformer(train.model_config(cfg))
    opt = zero.ZeroAdamW(model, cfg, parallel.Mesh(), torch.float32)
    local = checkpoint.load(path, "model.pt")["state_dict"]
    assert opt.load_checkpoint(path, local, model, parallel.Mesh()) == "shard"
    by_name = opt._by_name(opt.exp_avg_sq)
    for k, v in full["exp_avg_sq"].items():
        torch.testing.assert_close(by_name[k], v, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), local[n], rtol=0, atol=0)
    monkeypatch.setattr(opt, "layout", lambda: {"dp": 99})  # as if another dp size
    opt.exp_avg_sq.zero_()
    assert opt.load_checkpoint(path, local, model, parallel.Mesh()) == "full"
    by_name = opt._by_name(opt.exp_avg_sq)
    for k, v in full["exp_avg_sq"].items():
        torch.testing.assert_close(by_name[k], v, rtol=0, atol=0)
    assert opt.step_count == 4


# --------------------------------------------------------------------------- tensor / pipeline parallelism
def test_zero2_with_tp2_matches_one_process(single):
    out = single / "zero2_tp2"
    run_ok(tiny_args(single, out_dir=str(out), zero=2, tp=2, grad_clip=CLIP), 4)  # dp=2 x tp=2
    assert_same_run(out, single / "single")


def test_zero1_with_pp2_matches_one_process(single):
    out = single / "zero1_pp2"
    run_ok(tiny_args(single, out_dir=str(out), zero=1, pp=2, grad_clip=CLIP), 4)  # dp=2 x pp=2
    assert_same_run(out, single / "single")


def test_zero2_with_pp2_matches_one_process(single):
    out = single / "zero2_pp2"
    run_ok(tiny_args(single, out_dir=str(out), zero=2, pp=2, grad_clip=CLIP), 4)  # dp=2 x pp=2
    assert_same_run(out, single / "single")


@pytest.fixture(scope="module")
def single_tied(single):
    """The one-process reference with tie_embeddings=True."""
    out = single / "single_tied"
    run_ok(tiny_args(single, out_dir=str(out), grad_clip=CLIP, tie_embeddings=True), 1)
    return out


ZERO_PP = [  # (stage, nproc, extra): nproc 2 is dp=1 x pp=2, 4 is dp=2 x pp=2
    (3, 2, dict(pp_schedule="1f1b")),
    (3, 4, dict(pp_schedule="gpipe")),  # all forwards first: a root unit freed by one backward is re-gathered
    (2, 4, dict(tie_embeddings=True)),  # the tied matrix's gradient shards summed over first + last stage
    (3, 2, dict(tie_embeddings=True, pp_schedule="interleaved", pp_virtual=2)),
    pytest.param(3, 4, dict(tie_embeddings=True), marks=pytest.mark.slow),
    pytest.param(1, 4, dict(tie_embeddings=True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("stage, nproc, extra", ZERO_PP,
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_zero_with_pp2_matches_one_process(single, single_tied, stage, nproc, extra):
    """zero=3 under every pipeline schedule and zero=2/3 with a tied embedding across the stages."""
    tied = extra.get("tie_embeddings", False)
    out = single / f"zero{stage}_pp2_n{nproc}_{'_'.join(f'{k}{v}' for k, v in extra.items())}"
    run_ok(tiny_args(single, out_dir=str(out), zero=stage, pp=2, grad_clip=CLIP, **extra), nproc)
    assert_same_run(out, single_tied if tied else single / "single")
    if tied:
        assert "output.weight" not in final_params(out)


@pytest.mark.parametrize("after, nproc, files", [
    (2, 4, "full"),  # zero=2 on dp=2 x pp=2: the moments re-sharded from optimizer.pt
    pytest.param(3, 2, "shard", marks=pytest.mark.slow),  # the same layout: each rank's optim_rank<r>.pt
])
def test_resume_zero3_pp2_tied(single, single_tied, after, nproc, files):
    """Saved at step 2 by zero=3 on dp=1 x pp=2 with a tied embedding (optimizer.pt keeps the first
    stage's copy only), resumed by zero=`after` on `nproc` ranks: the same run as one process."""
    out = single / f"resume_zero3_pp2_tied_{files}"
    run_ok(tiny_args(single, out_dir=str(out), zero=3, pp=2, tie_embeddings=True, grad_clip=CLIP, max_iters=2), 2)
    r = run_ok(tiny_args(single, out_dir=str(out), zero=after, pp=2, tie_embeddings=True, grad_clip=CLIP,
                         init_from="resume"), nproc)
    assert "resuming at step 2" in r.stdout and f"moments from {files}" in r.stdout, r.stdout
    assert_same_run(out, single_tied)


def _pp_gather_worker(rank, world, port, results):
    """zero=3 on dp=1 x pp=2, one GPipe step of 4 micro-batches, 4 layers per stage: the most layer
    units gathered at once, and which units are still gathered after the step."""
    from types import SimpleNamespace
    from contextlib import nullcontext

    from model import ModelConfig, Transformer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=8, n_heads=4, vocab_size=64, max_seq_len=16, multiple_of=16))
    mesh = parallel.Mesh(world=world, rank=rank, pp=world, pp_rank=rank, pp_group=dist.group.WORLD,
                         mp_group=dist.group.WORLD, pp_ranks=list(range(world)))
    cfg = SimpleNamespace(zero=3, learning_rate=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1,
                          sequence_parallel=False, pp_schedule="gpipe", pp_virtual=1, pp_first_layers=0,
                          pp_last_layers=0, micro_batch_size=2, block_size=16, pp_measure_idle=False)
    model = parallel.parallelize(model, mesh, cfg)
    opt = zero.ZeroAdamW(model, cfg, mesh, torch.float32)
    layers, peak, gather = opt.units[-len(model.layers):], [0], zero.Unit.gather

    def counting_gather(unit, async_op=False):
        gather(unit, async_op)
        peak[0] = max(peak[0], sum(u.gathered for u in layers))
    zero.Unit.gather = counting_gather  # this spawned process only
    seqs = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    parallel.pipeline_step(model, [(seqs[i:i + 2, :-1], seqs[i:i + 2, 1:]) for i in range(0, 8, 2)], 1.0,
                           nullcontext())
    results[rank] = (peak[0], len(layers), [u.gathered for u in opt.units])
    dist.destroy_process_group()


def test_zero3_pp_gathers_layer_by_layer():
    """Under a pipeline schedule zero=3 still holds at most two of a stage's four layers gathered at
    a time (the one computing and the prefetched one; without the free after forward it would be
    all four), and nothing stays gathered after the step: the ZeRO-3 memory saving, which matching
    losses alone would not show."""
    results = mp.Manager().dict()
    mp.spawn(_pp_gather_worker, args=(2, free_port(), results), nprocs=2)
    for rank in range(2):
        peak, n_layers, gathered = results[rank]
        assert n_layers == 4 and 1 <= peak <= 2 and not any(gathered), results[rank]


# --------------------------------------------------------------------------- mixed precision
@pytest.fixture(scope="module")
def single_master(single):
    """The one-process reference of the master_weights runs: zero=0, bf16 parameters, float32 master weights."""
    out = single / "single_master"
    r = run_ok(tiny_args(single, out_dir=str(out), grad_clip=CLIP, dtype="bfloat16", master_weights=True), 1)
    assert "bfloat16 parameters, float32 master weights" in r.stdout and "memory per rank: zero=0 N=1" in r.stdout
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_master_weights_dp2_matches_one_process(single, single_master, stage):
    """master_weights=True on dp=2, unsharded (zero=0: finish() all-reduces) or zero=2, against one
    process with the same key: ZeRO changes where the bytes live, so the runs agree up to bf16
    rounding of the summation order, and all follow the fp32 run's losses to bf16 accuracy."""
    out, fp32 = single / f"master_zero{stage}_dp2", single / "single"
    run_ok(tiny_args(single, out_dir=str(out), zero=stage, grad_clip=CLIP, dtype="bfloat16", master_weights=True), 2)
    l1, l2, l32 = losses(single_master), losses(out), losses(fp32)
    assert all(abs(l2[s] - l1[s]) < 5e-3 * l1[s] and abs(l1[s] - l32[s]) < 0.02 * l32[s] for s in l32), (l1, l2, l32)
    p1, p2, p32 = final_params(single_master), final_params(out), final_params(fp32)
    assert all(p1[k].dtype == p2[k].dtype == torch.float32 for k in p1)  # checkpoints hold the float32 master weights
    assert all((p2[k] - p1[k]).abs().max() < 5e-3 and (p1[k] - p32[k]).abs().max() < 2e-2 for k in p1)


def test_master_weights_need_low_precision():
    for dtype in ("float32", "auto"):  # auto is float32 on the CPU
        cfg = train.load_config(["--master_weights=True", f"--dtype={dtype}", "--device=cpu"])
        with pytest.raises(train.UserError, match=f"master_weights=True .* dtype='{dtype}' means float32 here"):
            train.setup_device(cfg)


def test_fp16_overflow_skips_step_and_lowers_scale(single, monkeypatch, capsys):
    """An inf in the gradient shard: the step is skipped, the loss scale halves, training goes on."""
    original = train.forward_backward
    calls = {"n": 0}

    def patched(model, micro, scale, autocast, grad_sync):
        loss = original(model, micro, scale, autocast, grad_sync)
        calls["n"] += 1
        if calls["n"] == 3:
            grad_sync.units[1].grad_shard[0] = float("inf")
        return loss
    monkeypatch.setattr(train, "forward_backward", patched)
    out = single / "zero2_fp16"
    model = train.train(train.load_config(tiny_args(single, out_dir=str(out), zero=2, dtype="float16", max_iters=6,
                                                    master_weights=True)))
    recs = {r["step"]: r for r in map(json.loads, open(out / "log.jsonl")) if "lr" in r}
    assert recs[2]["loss_scale"] == 2.0 ** 16 and recs[3]["loss_scale"] == 2.0 ** 15
    assert "non-finite gradient norm, step skipped, loss scale lowered to 32768" in capsys.readouterr().out
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters())
    assert recs[6]["loss"] < recs[1]["loss"]


# --------------------------------------------------------------------------- memory report
def test_memory_report_matches_formulas():
    """Bytes measured from the tensors after one bf16 step (bench_memory.py), for dp = 1, 2, 4 and
    every stage, equal the bytes of the padded units counted here by hand: 2 bytes per parameter
    and gradient element, 12 per optimizer element, sharded as each stage says. Up to that padding
    they are the book's 2Phi+2Phi+12Phi, 4Phi+12Phi/N, 2Phi+14Phi/N and 16Phi/N (zero.formula)."""
    import bench_memory
    measured = bench_memory.measure(dps=(1, 2, 4))
    assert sorted(measured) == [(dp, stage) for dp in (1, 2, 4) for stage in range(4)]
    from model import ModelConfig, Transformer
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=16, multiple_of=16))
    sizes = [model.tok_embeddings.weight.numel(), model.norm.weight.numel(), model.output.weight.numel()]
    sizes += [sum(p.numel() for p in layer.parameters()) for layer in model.layers.values()]
    for (dp, stage), (got, phi) in measured.items():
        n = dp if stage else 1
        shard = sum(-(-size // (zero.ALIGN * n)) * zero.ALIGN for size in sizes)  # per rank, every unit padded
        full = shard * n
        want = {"params": 2 * (shard if stage == 3 else full), "grads": 2 * (shard if stage >= 2 else full),
                "optimizer": 12 * shard}
        assert got == want, (dp, stage, got, want)
        book = zero.formula(stage, phi, dp, k=2)
        assert all(w <= got[key] < w + 14 * len(sizes) * zero.ALIGN * dp for key, w in zip(want, book))
    got, phi = measured[(4, 3)]
    report = zero.memory_report(3, got, phi, 4, 2)
    assert f"params {got['params'] / 2 ** 20:.2f} MiB (formula {2 * phi / 4 / 2 ** 20:.2f})" in report, report
    assert f"total {sum(got.values()) / 2 ** 20:.2f} MiB, book 16Phi/N = {16 * phi / 4 / 2 ** 20:.2f} MiB" in report


# --------------------------------------------------------------------------- overflow agreed by all ranks

def _norm_worker(rank, world, port, results):
    from types import SimpleNamespace

    from model import ModelConfig, Transformer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16, multiple_of=16))
    reference = [p.detach().clone() for p in model.parameters()]
    mesh = parallel.Mesh(world=world, rank=rank, dp=world, dp_rank=rank, dp_group=dist.group.WORLD)
    cfg = SimpleNamespace(zero=2, learning_rate=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    opt = zero.ZeroAdamW(model, cfg, mesh, torch.float32)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(x, x)[1].backward()
    model.grad_sync.finish()
    finite = opt.grad_norm().item()
    if rank == 1:
        opt.grad_shards[0] = float("inf")  # only rank 1's shard overflows
    results[rank] = (finite, opt.grad_norm().item(),
                     [torch.equal(p, q) for p, q in zip(model.parameters(), reference)])
    dist.destroy_process_group()


def test_overflow_on_one_rank_is_seen_by_all():
    results = mp.Manager().dict()
    mp.spawn(_norm_worker, args=(2, free_port(), results), nprocs=2)
    assert results[0][0] == results[1][0] and results[0][0] > 0
    assert results[0][1] == results[1][1] == float("inf")
    assert all(results[0][2]) and all(results[1][2])  # sharding kept the initial parameters


# --------------------------------------------------------------------------- the GPU benchmark's CPU path
@pytest.mark.slow
def test_bench_parallel_runs_on_cpu(tmp_path):
    """bench_parallel.py (meant for GPUs) on 2 CPU ranks with gloo: every mode trains the same losses."""
    import subprocess
    import sys
    from util import ROOT
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "bench_parallel.py"), "--device=cpu", "--dim=64", "--n_layers=2",
                        "--n_heads=4", "--n_kv_heads=2", "--vocab_size=256", "--seq=32", "--steps=2", "--accum=2",
                        "--warmup=1", f"--out={out}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.load(open(out))["results"]
    assert [x["mode"] for x in results] == ["ddp", "dp", "torch_zero", "zero1", "zero2", "zero3", "fsdp2"]
    for x in results:  # torch_zero puts decay on every tensor: same first loss, close last loss
        assert x["first_loss"] == pytest.approx(results[0]["first_loss"], rel=1e-3)
        assert x["last_loss"] == pytest.approx(results[0]["last_loss"], rel=1e-2)
