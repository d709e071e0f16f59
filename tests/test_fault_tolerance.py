"""Nothing lost: kill -9, SIGTERM, corrupt checkpoints, NaNs, full disks, dead ranks, bad input."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import train
from util import (ELASTIC_ENV, ROOT, assert_same_run, final_params, free_port, losses, make_dataset, run_ok, run_train,
                  tiny_args)


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path


def popen_train(args, nproc=1, max_restarts=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                f"--max-restarts={max_restarts}"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ELASTIC_ENV}
    return subprocess.Popen(launcher + [os.path.join(ROOT, "train.py")] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)


def wait_for_step(out_dir, step, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(out_dir / "log.jsonl") and max(losses(out_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {timeout}s")


def test_kill9_at_random_points_then_resume_equals_uninterrupted(data):
    steps = dict(max_iters=120, checkpoint_interval=4, lr_decay_iters=120)
    ref = data / "ref"
    assert run_train(tiny_args(data, out_dir=str(ref), **steps)).returncode == 0
    out, rng = data / "killed", random.Random()
    for _ in range(4):  # kill -9 somewhere between start-up and the end of the run
        proc = popen_train(tiny_args(data, out_dir=str(out), init_from="resume", **steps))
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for ckpt in checkpoint.list_checkpoints(out):
            checkpoint.verify(ckpt)  # every complete checkpoint is intact
    r = run_train(tiny_args(data, out_dir=str(out), init_from="resume", **steps))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_run(out, ref, rtol=0, atol=0, param_atol=0)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


class Killed(BaseException):
    """Stands for a kill -9 in the middle of commit (nothing after it runs)."""


def save_fake(out, step, keep_last=2):
    checkpoint.write_files(checkpoint.temp_dir(out, step), {"model.pt": {"step": step}, "optimizer.pt": {"x": step}})
    return checkpoint.commit(out, step, keep_last)


def test_kill_while_pruning_never_lists_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    """commit deletes the checkpoints past keep_last file by file; a kill in the middle (here: after
    model.pt) must not leave a listed checkpoint with files missing (CI once saw exactly that in the
    random kill -9 test above), and the next start (clean_temp) removes the remains."""
    out = tmp_path / "out"
    for step in (4, 8):
        save_fake(out, step)

    def rmtree_killed(path, ignore_errors=False):  # model.pt gone, the manifest still there
        os.remove(os.path.join(path, "model.pt"))
        raise Killed

    real_rmtree = checkpoint.shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_killed)
    with pytest.raises(Killed):
        save_fake(out, 12)  # prunes step 4
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    listed = checkpoint.list_checkpoints(out)
    assert [os.path.basename(p) for p in listed] == ["ckpt_00000008", "ckpt_00000012"]
    for path in listed:
        checkpoint.verify(path)
    checkpoint.clean_temp(out)  # the half-deleted step 4 is not whole: removed, not restored
    assert sorted(os.listdir(out)) == ["ckpt_00000008", "ckpt_00000012"]


def test_kill_between_the_renames_of_a_resave_keeps_the_step(tmp_path, monkeypatch):
    """Saving a step again (preempted right after its save) retires the old folder, then renames the
    new one into place. A kill between the two renames leaves neither listed; the next start puts
    the retired (whole) one back, so the step's checkpoint is not lost."""
    out = tmp_path / "out"
    save_fake(out, 4, keep_last=1)
    real_rename = os.rename

    def rename_killed(src, dst):
        if os.path.basename(src).startswith(".tmp_") and not src.endswith(".retired") and \
                not os.path.basename(dst).startswith(".tmp_"):
            raise Killed  # the new folder's rename into place
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename_killed)
    with pytest.raises(Killed):
        save_fake(out, 4, keep_last=1)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert checkpoint.list_checkpoints(out) == []
    checkpoint.clean_temp(out)
    assert sorted(os.listdir(out)) == ["ckpt_00000004"]
    assert checkpoint.latest(out) == os.path.join(out, "ckpt_00000004")


def test_sigterm_under_torchrun_saves_and_resumes(data):
    out = data / "out"
    proc = popen_train(tiny_args(data, max_iters=100000, lr_decay_iters=100000), nproc=2)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert "stopped by signal at step" in text, text
    last = checkpoint.latest(out)
    step = checkpoint.load(last, "train_state.pt")["step"]
    assert step >= 3 and step == max(losses(out))
    r = run_train(tiny_args(data, init_from="resume", max_iters=step + 2, lr_decay_iters=100000), nproc=2)
    assert r.returncode == 0 and f"resuming at step {step}" in r.stdout, r.stdout + r.stderr
    assert max(losses(out)) == step + 2


def test_truncated_checkpoint_is_named_and_fallback_on_request(data):
    out = data / "out"
    assert run_train(tiny_args(data, max_iters=4, checkpoint_interval=2)).returncode == 0
    newest = checkpoint.latest(out)
    model_file = os.path.join(newest, "model.pt")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    r = run_train(tiny_args(data, max_iters=6, init_from="resume"))
    assert r.returncode == 2 and model_file in r.stderr and "resume_fallback" in r.stderr, r.stderr
    r = run_train(tiny_args(data, max_iters=6, init_from="resume", resume_fallback=True))
    assert r.returncode == 0 and "resuming at step 2" in r.stdout, r.stdout + r.stderr


def test_checkpoint_write_failure_keeps_previous_and_training_goes_on(data, monkeypatch, capsys):
    real, calls = checkpoint.write_files, {"n": 0}

    def failing(tmp, objects):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, objects)
    monkeypatch.setattr(checkpoint, "write_files", failing)
    train.train(train.load_config(tiny_args(data, max_iters=6, checkpoint_interval=2)))
    out = capsys.readouterr().out
    assert "checkpoint at step 4 failed; the previous checkpoint is intact" in out
    steps = [int(os.path.basename(p)[5:]) for p in checkpoint.list_checkpoints(data / "out")]
    assert steps == [2, 6]
    calls["n"] = 0
    cfg = train.load_config(tiny_args(data, out_dir=str(data / "o2"), max_iters=6, checkpoint_interval=2,
                                      checkpoint_errors_fatal=True))
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint at step 4 failed"):
        train.train(cfg)


def test_incompatible_checkpoint_and_bad_data_fail_with_exit_2(data):
    assert run_train(tiny_args(data, max_iters=2)).returncode == 0
    r = run_train(tiny_args(data, max_iters=4, init_from="resume", dim=64))
    assert r.returncode == 2 and "incompatible model: dim: checkpoint 32 vs config 64" in r.stderr, r.stderr
    with open(data / "data" / "synth" / "val.bin", "r+b") as f:
        f.write(b"GARBAGE!")
    r = run_train(tiny_args(data, out_dir=str(data / "o2")))
    assert r.returncode == 2 and "val.bin is not a prepare.py token file" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_train(tiny_args(data, tp=2))
    assert r.returncode == 2 and "world size 1 is not divisible by tp*pp = 2*1" in r.stderr, r.stderr


def test_killed_rank_ends_the_run(data):
    proc = popen_train(tiny_args(data, max_iters=100000, lr_decay_iters=100000, dist_timeout_s=30), nproc=2)
    wait_for_step(data / "out", 2, proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGKILL)
    t0 = time.time()
    text = proc.communicate(timeout=90)[0]
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "local_rank: 1" in text or "rank 1" in text, text[-3000:]


def test_killed_rank_restarts_and_resumes_under_init_from_auto(data):
    """torchrun --max-restarts=1 --init_from=auto: kill -9 of one rank makes torchrun restart
    both, which resume from the newest checkpoint; the job ends by itself with the losses of the
    uninterrupted run, exactly."""
    steps = dict(max_iters=60, checkpoint_interval=3, lr_decay_iters=60, init_from="auto")
    ref = data / "ref"
    run_ok(tiny_args(data, out_dir=str(ref), **steps), nproc=2)
    out = data / "out"
    proc = popen_train(tiny_args(data, **steps), nproc=2, max_restarts=1)
    wait_for_step(out, 4, proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGKILL)
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, text[-3000:]
    with open(out / "log.jsonl") as f:
        resumes = [r for r in map(json.loads, f) if "resumed_from" in r]
    assert len(resumes) == 1, resumes  # the kill came before the end, and one restart followed it
    r = resumes[0]
    assert r["init_from"] == "auto" and r["restart"] == 1 and r["step"] >= 3 and r["step"] % 3 == 0, r
    assert os.path.dirname(r["resumed_from"]) == str(out), r  # a checkpoint of this run (the newest at the kill)
    assert f"resuming at step {r['step']} from" in text and "automatic (init_from=auto), torchrun restart 1" in text
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in text  # set (ELASTIC_ENV): no warning
    assert_same_run(out, ref, rtol=0, atol=0, param_atol=0)


def test_restart_warning_names_the_torchrun_setting():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in train.restart_warning(shared)
    assert train.restart_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert train.restart_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
    assert train.restart_warning({}) is None  # not under torchrun


def test_init_from_auto_and_its_errors(data):
    """auto without a checkpoint starts as after auto: (scratch); with a corrupt newest one it
    resumes from the previous good one (no one is there to pass resume_fallback); a bad source
    is one clear error."""
    r = run_ok(tiny_args(data, max_iters=2, checkpoint_interval=1, init_from="auto"))
    assert "starting from scratch" in r.stdout and "resuming" not in r.stdout
    ref = data / "ref"
    run_ok(tiny_args(data, out_dir=str(ref), max_iters=2))
    assert_same_run(data / "out", ref, rtol=0, atol=0, param_atol=0)
    with open(os.path.join(checkpoint.latest(data / "out"), "model.pt"), "r+b") as f:
        f.truncate(100)
    r = run_ok(tiny_args(data, max_iters=3, checkpoint_interval=1, init_from="auto"))
    assert "warning: skipping" in r.stdout and "resuming at step 1 from" in r.stdout, r.stdout
    assert "automatic (init_from=auto), torchrun restart 0" in r.stdout
    r = run_train(tiny_args(data, max_iters=2, init_from="auto:resume"))
    assert r.returncode == 2 and "init_from='auto:resume' must be" in r.stderr and "auto:hf:<dir>" in r.stderr, r.stderr


# --------------------------------------------------------------------------- NaN on one rank only
def _nan_worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    original = train.forward_backward
    calls = {"n": 0}

    def patched(model, *a, **k):
        loss = original(model, *a, **k)
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:  # after the all-reduce: only rank 1 sees the NaN
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        return loss
    train.forward_backward = patched
    model = train.train(train.load_config(args))
    results[rank] = [p.detach().clone() for p in model.parameters()]


def test_nan_on_one_rank_skips_the_step_on_every_rank(data):
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_nan_worker, args=(2, port, tiny_args(data, max_iters=4), results), nprocs=2)
    assert '{"step": 2, "skipped": "non-finite gradient norm"' in open(data / "out" / "log.jsonl").read()
    for a, b in zip(results[0], results[1]):
        assert torch.isfinite(a).all() and torch.equal(a, b)  # both skipped: replicas still identical
    ref = data / "ref"
    assert run_train(tiny_args(data, out_dir=str(ref), max_iters=4)).returncode == 0
    assert any(not torch.equal(a, b) for a, b in zip(results[0], final_params(ref).values()))
