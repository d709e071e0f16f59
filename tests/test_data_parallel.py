"""Hand-written data parallelism (gloo, CPU) trains the same model as one process."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from util import assert_same_run, free_port, make_dataset, run_train, tiny_args


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference run every layout is compared with."""
    base = tmp_path_factory.mktemp("dp")
    make_dataset(base / "data")
    r = run_train(tiny_args(base, out_dir=str(base / "single")))
    assert r.returncode == 0, r.stderr
    return base


@pytest.mark.parametrize("nproc, micro", [(2, 2), (2, 1), (4, 2)])
def test_dp_matches_one_process(single, nproc, micro):
    """dp=2 with 2 and 4 micro-steps of accumulation, dp=4 with one (batch 8 = 4 ranks x 2)."""
    out = single / f"dp{nproc}_mb{micro}"
    r = run_train(tiny_args(single, out_dir=str(out), micro_batch_size=micro), nproc=nproc)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"world {nproc} = dp {nproc} x pp 1 x tp 1" in r.stdout
    assert_same_run(out, single / "single")


def test_dp_single_small_buckets(single):
    """Many tiny buckets (a few KB each) still give the same model."""
    out = single / "dp2_buckets"
    r = run_train(tiny_args(single, out_dir=str(out), dp_bucket_mb=0.002), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(out, single / "single")


# --------------------------------------------------------------------------- against torch DDP

def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import parallel
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16)
    ours, ref = Transformer(cfg), Transformer(cfg)
    ref.load_state_dict(ours.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(ref, bucket_cap_mb=0.01)
    buckets = parallel.GradBuckets(list(ours.parameters()), dist.group.WORLD, bucket_mb=0.01)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randint(0, 64, (3, 16), generator=g)
    bucket_ptrs = [p.grad.data_ptr() for p in ours.parameters()]  # .grad starts as views into the buckets
    for micro in range(2):  # accumulate two micro-steps; sync on the last only
        buckets.sync = micro == 1
        ours(x, x)[1].backward()
        # autograd accumulated in place: the gradients are still the bucket views (no copies)
        assert [p.grad.data_ptr() for p in ours.parameters()] == bucket_ptrs
        if micro == 0:
            with ddp.no_sync():
                ddp(x, x)[1].backward()
        else:
            ddp(x, x)[1].backward()
    buckets.finish()
    diffs = [(n, (p.grad - q.grad).abs().max().item(), q.grad.abs().max().item())
             for (n, p), q in zip(ours.named_parameters(), ref.parameters())]
    # a step whose gradients were set to None first (zero_grad(set_to_none=True)): autograd
    # allocates new ones, which the hooks copy into the buckets and re-point at them
    for model in (ours, ref):
        model.zero_grad(set_to_none=True)
    x2 = torch.randint(0, 64, (3, 16), generator=g)
    ours(x2, x2)[1].backward()
    ddp(x2, x2)[1].backward()
    buckets.finish()
    assert [p.grad.data_ptr() for p in ours.parameters()] == bucket_ptrs
    diffs += [(n + " (after set_to_none)", (p.grad - q.grad).abs().max().item(), q.grad.abs().max().item())
              for (n, p), q in zip(ours.named_parameters(), ref.parameters())]
    results[rank] = diffs
    dist.destroy_process_group()


def test_bucketed_all_reduce_equals_ddp():
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, free_port(), results), nprocs=2)
    for rank in range(2):
        for name, diff, scale in results[rank]:
            assert diff <= 1e-6 * max(1.0, scale), f"rank {rank} {name}: {diff}"
