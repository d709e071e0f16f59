"""plan.py: the memory model against the bytes the tensors hold, and the planner's answers."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
import plan
import train
import zero
from model import ModelConfig, Transformer
from util import assert_same_run, free_port, make_dataset, run_ok, tiny_args

def tiny_cfg(tmp_path, **overrides):
    return train.load_config(tiny_args(tmp_path, **overrides))


def measured_state(model, optimizer):
    """{params, grads, optimizer} bytes from the tensors' storages (a view of one buffer counts once)."""
    if isinstance(optimizer, zero.ZeroAdamW):
        return optimizer.memory(model)
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    return {"params": zero.storage_bytes(list(model.parameters())),
            "grads": zero.storage_bytes([p.grad for p in model.parameters()]), "optimizer": zero.storage_bytes(state)}


def one_step(cfg, mesh, seed=0):
    """Build the model as train.train does, run one optimizer step. Returns the bytes this rank
    holds (before zero_grad, when the gradients exist), the prediction for its stage, and the
    step's loss, gradient norm and this rank's gradients (ZeroAdamW: its shards)."""
    torch.manual_seed(cfg.seed)
    model = parallel.parallelize(Transformer(train.model_config(cfg)), mesh, cfg, torch.device("cpu"))
    device, dtype, autocast = train.setup_device(cfg)
    optimizer = train.build_optimizer(model, cfg, mesh, device)
    seqs = torch.randint(0, cfg.vocab_size, (cfg.batch_size // mesh.dp, cfg.block_size + 1),
                         generator=torch.Generator().manual_seed(seed + mesh.dp_rank))
    mb = cfg.micro_batch_size
    micro = [(seqs[i:i + mb, :-1], seqs[i:i + mb, 1:]) for i in range(0, len(seqs), mb)]
    scaler = train.LossScaler(False)
    loss, norm = train.compute_gradients(cfg, mesh, model, model, optimizer, micro, scaler, autocast)
    grads = [g.clone() for g in optimizer._grad_views()] if isinstance(optimizer, zero.ZeroAdamW) else \
        [p.grad.clone() for p in model.parameters()]
    train.apply_update(cfg, model, optimizer, norm, scaler)
    got = measured_state(model, optimizer)
    want = plan.model_state_bytes(cfg, train.model_config(cfg), plan.layout_of(cfg, mesh.world), mesh.pp_rank,
                                  cuda=False)
    return got, want, (float(loss), float(norm), grads)


# (dp, tp, pp, extra config): every kind of layout the other tests run, at world 4; float32, or
# bf16 parameters with float32 master weights (zero.ZeroAdamW: zero=0 unsharded, 1-3 sharded)
BF16 = dict(master_weights=True, dtype="bfloat16")
LAYOUTS = [
    (4, 1, 1, {}), (4, 1, 1, BF16), (4, 1, 1, dict(zero=1, **BF16)), (4, 1, 1, dict(zero=2)),
    (4, 1, 1, dict(zero=3, **BF16)),
    (2, 2, 1, {}), (2, 2, 1, dict(zero=1, sequence_parallel=True)), (2, 2, 1, dict(zero=3, tie_embeddings=True)),
    (1, 4, 1, {}),  # 2 kv heads over 4 tp ranks
    (2, 1, 2, dict(pp_schedule="gpipe")), (2, 1, 2, dict(zero=1, **BF16)), (2, 1, 2, dict(zero=2, tie_embeddings=True)),
    (2, 1, 2, dict(zero=3, pp_schedule="interleaved", pp_virtual=2, **BF16)),
    (1, 2, 2, dict(tie_embeddings=True)), (1, 1, 4, dict(pp_schedule="gpipe")),
]


def _join(rank, world, port):
    """A spawned worker joins the gloo group of the test."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank, world, port, base, results):
    _join(rank, world, port)
    out = []
    for dp, tp, pp, extra in LAYOUTS:
        cfg = train.load_config(tiny_args(base, tp=tp, pp=pp, **extra))
        out.append(one_step(cfg, parallel.make_mesh(world, rank, dp, pp, tp))[:2])
    results[rank] = out
    dist.destroy_process_group()


def test_model_states_exact_in_every_layout(tmp_path):
    """Parameters, gradients and optimizer state of every rank, measured from the tensors after one
    step under 4 gloo ranks, equal plan.model_state_bytes to the byte (ZeRO's padding included)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(4, free_port(), tmp_path, results), nprocs=4)
    for rank in range(4):
        for (dp, tp, pp, extra), (got, want) in zip(LAYOUTS, results[rank]):
            assert got == want, (rank, dp, tp, pp, extra, got, want)
    # the layouts differ: a wrong stage, shard or padding rule would not cancel out
    assert len({str(results[0][i][1]) for i in range(len(LAYOUTS))}) > len(LAYOUTS) // 2


@pytest.mark.parametrize("extra", [{}, dict(master_weights=True, dtype="bfloat16"),
                                   dict(zero=1, master_weights=True, dtype="bfloat16")])
def test_model_states_exact_one_process(tmp_path, extra):
    cfg = tiny_cfg(tmp_path, **extra)
    got, want, _ = one_step(cfg, parallel.Mesh())
    assert got == want


# --------------------------------------------------------------------------- checkpointing: same step
CKPT_LAYOUTS = [  # (dp, tp, pp, extra): each kind of layout, at world 4
    (4, 1, 1, {}), (2, 2, 1, dict(sequence_parallel=True)), (1, 4, 1, {}),
    (2, 1, 2, dict(pp_schedule="gpipe")), (2, 1, 2, dict(pp_schedule="1f1b", tie_embeddings=True)),
    (1, 2, 2, dict(pp_schedule="interleaved", pp_virtual=2, sequence_parallel=True)),
    (4, 1, 1, dict(zero=1)), (4, 1, 1, dict(zero=2)), (2, 2, 1, dict(zero=3, sequence_parallel=True)),
    (2, 1, 2, dict(zero=3, pp_schedule="gpipe")),  # all forwards first, then every layer's recomputation
]


def _ckpt_worker(rank, world, port, base, results):
    _join(rank, world, port)
    out = []
    for dp, tp, pp, extra in CKPT_LAYOUTS:
        mesh = parallel.make_mesh(world, rank, dp, pp, tp)
        out.append([one_step(train.load_config(tiny_args(base, tp=tp, pp=pp, activation_checkpointing=ck, **extra)),
                             mesh, seed=rank)[2] for ck in plan.CKPT_MODES])
    results[rank] = out
    dist.destroy_process_group()


def test_checkpointing_gives_the_same_step_in_every_layout(tmp_path):
    """One float32 step under 4 gloo ranks with activation_checkpointing none, selective and full:
    the same loss, gradient norm and gradients on every rank (zero=3: its gathers again before the
    recomputation), in data, tensor (+ sequence) and pipeline parallelism (each schedule) and ZeRO."""
    results = mp.Manager().dict()
    mp.spawn(_ckpt_worker, args=(4, free_port(), tmp_path, results), nprocs=4)
    for rank in range(4):
        for layout, runs in zip(CKPT_LAYOUTS, results[rank]):
            (loss, norm, grads), others = runs[0], runs[1:]
            assert norm > 0 and len(grads) > 0
            for ck, (loss2, norm2, grads2) in zip(plan.CKPT_MODES[1:], others):
                assert loss2 == pytest.approx(loss, rel=1e-6) and norm2 == pytest.approx(norm, rel=1e-5), \
                    (rank, layout, ck, loss, loss2, norm, norm2)
                for g, g2 in zip(grads, grads2):
                    torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{rank} {layout} {ck}: {m}")


@pytest.mark.parametrize("nproc, extra", [
    (4, dict(activation_checkpointing="full", tp=2, sequence_parallel=True, zero=3)),
    pytest.param(4, dict(activation_checkpointing="selective", pp=2, pp_schedule="interleaved", pp_virtual=2, zero=1),
                 marks=pytest.mark.slow),
])
def test_train_with_checkpointing_matches_one_process(tmp_path, nproc, extra):
    """train.py runs under torchrun with checkpointing: the losses and parameters of a one-process
    run without it (util.assert_same_run)."""
    make_dataset(tmp_path / "data")
    run_ok(tiny_args(tmp_path, out_dir=str(tmp_path / "single")))
    r = run_ok(tiny_args(tmp_path, out_dir=str(tmp_path / "ckpt"), **extra), nproc)
    assert f"activation_checkpointing={extra['activation_checkpointing']!r}" in r.stdout  # train.py's memory line
    assert_same_run(tmp_path / "ckpt", tmp_path / "single")


# --------------------------------------------------------------------------- activations
@pytest.mark.parametrize("ckpt", plan.CKPT_MODES)
@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("param_dtype, autocast", [(torch.float32, False), (torch.float32, True),
                                                   (torch.bfloat16, True)])
def test_layer_activations_equal_saved_tensors(impl, param_dtype, autocast, ckpt):
    """One Block's saved tensors (autograd's pack hook, distinct storages, parameters and RoPE
    buffers left out) equal layer_activation_bytes on CPU, for float32, autocast over float32
    parameters (the weight and input casts) and bf16 parameters, grouped-query attention, in each
    activation_checkpointing mode (what a recomputed region keeps: its inputs)."""
    mc = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                     attn_impl=impl, max_seq_len=32, activation_checkpointing=ckpt)
    model = Transformer(mc).to(param_dtype)
    block, b, s = model.layers["0"], 3, 32
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t
    x = torch.randn(b, s, mc.dim, dtype=param_dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        block(x, model.rope_cos[:s], model.rope_sin[:s])
    p, a = (4 if param_dtype == torch.float32 else 2), (2 if autocast else 4)
    assert sum(saved.values()) == plan.layer_activation_bytes(mc, b, s, 1, False, p, a, ckpt, cuda=False)


def test_live_chunks_follow_the_schedules():
    """GPipe keeps all m micro-batches, 1F1B pp - stage, interleaved Megatron's count in chunks."""
    assert plan.live_chunks("gpipe", 8, 4, 1, 0) == {0: 8}
    assert [sum(plan.live_chunks("1f1b", 8, 4, 1, st).values()) for st in range(4)] == [4, 3, 2, 1]
    assert sum(plan.live_chunks("interleaved", 8, 4, 2, 0).values()) == 2 * 3 + 1 * 4 + 1
    assert plan.live_chunks("1f1b", 2, 4, 1, 0) == {0: 2}


def test_checkpointing_orders_memory(tmp_path):
    mc = train.model_config(tiny_cfg(tmp_path))
    sizes = [plan.layer_activation_bytes(mc, 8, 2048, 1, False, 2, 2, ck) for ck in plan.CKPT_MODES]
    assert sizes[0] > sizes[1] > sizes[2] == 2 * 8 * 2048 * mc.dim


# --------------------------------------------------------------------------- the planner
def test_planner_7b_on_8x80(capsys):
    plan.main(["configs/llama_7b.py", "--gpus=8", "--gpu_mem_gib=80"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("#")) + 1
    row = lines[first].split()
    assert row[0] == "1" and float(row[-4]) <= 80 - 1.25, out  # peak GiB within the budget
    assert "layout 1 wins" in out and "layouts fit" in out


def test_planner_refuses_what_cannot_fit(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["configs/llama_7b.py", "--gpus=1", "--gpu_mem_gib=24"])
    msg = str(e.value)
    assert msg.startswith("error: no layout fits") and "bytes" in msg and "24 GiB" in msg, msg


@pytest.mark.parametrize("argv, needle", [(["configs/llama_7b.py", "--gpus=0"], "must be positive"),
                                          (["configs/nope.py", "--gpus=8"], "not found"),
                                          (["configs/llama_7b.py", "--gpus=8", "--gpu=a100"], "--gpu='a100'"),
                                          (["configs/llama_7b.py", "--gpus=8", "--n_layer=3"], "n_layers")])
def test_planner_errors(argv, needle):
    with pytest.raises(SystemExit) as e:
        plan.main(argv)
    assert str(e.value).startswith("error:") and needle in str(e.value), str(e.value)


def test_check_run_prints_on_cpu_and_refuses_a_small_gpu(tmp_path, monkeypatch):
    cfg = train.load_config(["configs/llama_1b.py", "--micro_batch_size=8", "--batch_size=64"])
    mc = train.model_config(cfg)
    line = plan.check_run(cfg, mc, parallel.Mesh(), torch.device("cpu"))
    assert line.startswith("predicted peak memory")

    class Props:
        total_memory, name = 40 * 2 ** 30, "a 40 GiB GPU"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    with pytest.raises(plan.DoesNotFit) as e:
        plan.check_run(cfg, mc, parallel.Mesh(), torch.device("cuda"))
    msg = str(e.value)
    assert "does not fit" in msg and f"{40 * 2 ** 30:,}" in msg and "a 40 GiB GPU" in msg, msg
    assert "set activation_checkpointing='full' (" in msg and " or micro_batch_size=2 (" in msg, msg


# --------------------------------------------------------------------------- predicted against measured peak
def test_bench_memory_peak_smoke_on_cpu(capsys):
    """bench_memory.py --peak (the GPU table's script) on the CPU with the tiny shape: the step's peak,
    from the profiler's memory timeline, within 3% of plan.py's prediction in each checkpointing mode,
    with and without master weights (micro-batch 2: above the CPU optimizers' eager temporaries,
    which CUDA's fused / compiled AdamW do not have and the model leaves out)."""
    import bench_memory
    rows = bench_memory.main(["--peak", "--device=cpu", "--micro=2", "--steps=1"])
    assert len(rows) == 6 and {r["ckpt"] for r in rows} == set(plan.CKPT_MODES)
    for r in rows:
        assert r["predicted"] == pytest.approx(r["measured"], rel=0.03), r
    none, full = (next(r["measured"] for r in rows if r["ckpt"] == ck and r["master"]) for ck in ("none", "full"))
    assert full < 0.9 * none
    out = capsys.readouterr().out
    assert "| tiny | on | full | 2 x 128 |" in out and "largest prediction error" in out


@pytest.mark.parametrize("ckpt", plan.CKPT_MODES)
def test_zero3_recomputation_keeps_layer_by_layer_gathers(tmp_path, monkeypatch, ckpt):
    """zero=3 with checkpointing, one process: a layer's recomputation runs inside its module's
    forward hooks' reach (Block.forward), so the backward still holds at most two of the four layer
    units gathered (the one computing and the prefetched one), and none after the step."""
    cfg = tiny_cfg(tmp_path, zero=3, activation_checkpointing=ckpt, micro_batch_size=8)
    peak_gathered, gather = [0], zero.Unit.gather
    layer_units = []

    def counting_gather(unit, async_op=False):
        gather(unit, async_op)
        peak_gathered[0] = max(peak_gathered[0], sum(u.gathered for u in layer_units))
    monkeypatch.setattr(zero.Unit, "gather", counting_gather)
    torch.manual_seed(cfg.seed)
    model = parallel.parallelize(Transformer(train.model_config(cfg)), parallel.Mesh(), cfg, torch.device("cpu"))
    optimizer = train.build_optimizer(model, cfg, parallel.Mesh(), torch.device("cpu"))
    layer_units.extend(optimizer.units[-cfg.n_layers:])
    seqs = torch.randint(0, cfg.vocab_size, (8, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    train.forward_backward(model, [(seqs[:, :-1], seqs[:, 1:])], 1.0, train.setup_device(cfg)[2], model.grad_sync)
    optimizer.step()
    assert 1 <= peak_gathered[0] <= 2 and not any(u.gathered for u in optimizer.units), peak_gathered
