"""Safe checkpoints (loading never runs code) and asynchronous checkpoints (checkpoint_async=True)."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import checkpoint
import train
from util import ROOT, assert_same_run, losses, make_dataset, run_ok, run_train, tiny_args


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path


def run_inproc(data, **kw):
    train.train(train.load_config(tiny_args(data, **kw)))


def rehash(ckpt):
    """Rewrite ckpt's manifest for its current files, as someone sharing a crafted checkpoint would."""
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    for name in manifest["files"]:
        file = os.path.join(ckpt, name)
        manifest["files"][name] = {"bytes": os.path.getsize(file), "sha256": checkpoint._sha256(file)}
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump(manifest, f)


# --------------------------------------------------------------------------- safe checkpoints
@pytest.mark.parametrize("zero", [0, 1])
def test_every_checkpoint_file_loads_with_weights_only(data, zero):
    run_inproc(data, max_iters=2, zero=zero)
    files = glob.glob(str(data / "out" / "ckpt_*" / "*.pt"))
    assert {os.path.basename(f) for f in files} >= {"model.pt", "optimizer.pt", "train_state.pt"} \
        | ({"optim_rank0.pt"} if zero else set())
    for f in files:
        torch.load(f, map_location="cpu", weights_only=True)  # no allow-list: tensors and plain values only


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name", ["train_state.pt", "model.pt"])
def test_pickled_payload_is_refused_and_does_not_run(data, name):
    run_inproc(data, max_iters=2)
    ckpt, marker = checkpoint.latest(data / "out"), data / "pwned"
    torch.save({"step": 2, "config": {}, "evil": Payload(marker)}, os.path.join(ckpt, name))
    rehash(ckpt)  # the manifest matches: only loading can catch it
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(ckpt, name)
    msg = str(e.value)
    assert "refusing to load checkpoint file " + os.path.join(ckpt, name) in msg and "\n" not in msg, msg
    assert "posix.system" in msg and "weights_only=False" in msg, msg
    # the entry points: a resume (train.py) and sample.py fail with the one line, the payload unrun
    r = run_train(tiny_args(data, max_iters=4, init_from="resume"))
    assert r.returncode == 2 and "refusing to load checkpoint file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if name == "model.pt":  # what sample.py reads
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--init_from={ckpt}",
                            "--max_new_tokens=2"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode != 0 and "refusing to load checkpoint file" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
    torch.load(os.path.join(ckpt, name), weights_only=False)  # the test can fail: unchecked, it runs
    assert marker.exists()


def test_older_checkpoint_with_numpy_rng_state_still_resumes(data):
    run_inproc(data, max_iters=2)
    ckpt = checkpoint.latest(data / "out")
    state = checkpoint.load(ckpt, "train_state.pt")
    np.random.seed(3)
    state["rng"]["numpy"] = np.random.get_state()  # the format before RNG states were plain values
    torch.save(state, os.path.join(ckpt, "train_state.pt"))
    rehash(ckpt)
    np.random.seed(0)
    run_inproc(data, max_iters=3, init_from="resume")
    np.random.seed(3)
    expect = np.random.get_state()[1]
    checkpoint._set_numpy_rng_state(checkpoint.load(ckpt, "train_state.pt")["rng"]["numpy"])
    assert (np.random.get_state()[1] == expect).all()


# --------------------------------------------------------------------------- asynchronous checkpoints
def assert_identical(x, y, where):
    """Same structure, same plain values, tensors equal bit for bit (dtype and shape included)."""
    assert type(x) is type(y) or torch.is_tensor(x) and torch.is_tensor(y), (where, type(x), type(y))
    if torch.is_tensor(x):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_identical(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y)):
            assert_identical(a, b, f"{where}/{i}")
    else:
        assert x == y, (where, x, y)


@pytest.mark.parametrize("zero", [0, 1])
def test_async_checkpoint_equals_sync_bit_for_bit(data, zero):
    steps = dict(max_iters=4, checkpoint_interval=2, zero=zero)
    for mode in (False, True):
        run_inproc(data, out_dir=str(data / f"async{mode}"), checkpoint_async=mode, **steps)
    for step in (2, 4):
        a, b = (data / f"async{m}" / f"ckpt_{step:08d}" for m in (False, True))
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        for f in os.listdir(a):
            if f.endswith(".pt"):
                x, y = checkpoint.load(a, f), checkpoint.load(b, f)
                if f == "train_state.pt":  # the config differs in checkpoint_async and out_dir only
                    assert {k for k in x["config"] if x["config"][k] != y["config"][k]} == {"checkpoint_async", "out_dir"}
                    x["config"] = y["config"] = None
                assert_identical(x, y, f"{step}/{f}")
    for mode in (False, True):  # resumed, both continue identically
        run_inproc(data, out_dir=str(data / f"async{mode}"), init_from="resume", **{**steps, "max_iters": 6})
    assert_same_run(data / "asyncTrue", data / "asyncFalse", rtol=0, atol=0, param_atol=0)


def test_async_checkpoint_equals_sync_on_two_zero_ranks(data):
    """The all-ranks-wrote agreement on the main thread, with each rank's optim_rank<r>.pt written in the background."""
    steps = dict(max_iters=4, checkpoint_interval=2, zero=2)
    for mode in (False, True):
        run_ok(tiny_args(data, out_dir=str(data / f"async{mode}"), checkpoint_async=mode, **steps), nproc=2)
    for f in ("model.pt", "optimizer.pt", "optim_rank0.pt", "optim_rank1.pt"):
        a, b = (checkpoint.load(data / f"async{m}" / "ckpt_00000002", f) for m in (False, True))
        assert_identical(a, b, f)
    assert_same_run(data / "asyncTrue", data / "asyncFalse", rtol=0, atol=0, param_atol=0)


def test_async_at_most_one_write_in_flight_and_stall_logged(data, monkeypatch):
    real, spans, lock = checkpoint.write_files, [], threading.Lock()

    def slow(tmp, objects):
        t0 = time.time()
        time.sleep(0.2)
        real(tmp, objects)
        with lock:
            spans.append((t0, time.time(), threading.current_thread() is not threading.main_thread()))
    monkeypatch.setattr(checkpoint, "write_files", slow)
    run_inproc(data, max_iters=4, checkpoint_interval=1, checkpoint_async=True, keep_checkpoints=2)
    assert len(spans) == 4 and all(bg for _, _, bg in spans)  # written by the background thread
    spans.sort()
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:])), spans  # never two at once
    stalls = losses(data / "out", "checkpoint_stall_s")
    assert sorted(stalls) == [1, 2, 3, 4] and losses(data / "out", "checkpoint_async") == {s: True for s in stalls}
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(data / "out")] == ["ckpt_00000003", "ckpt_00000004"]
    assert not [n for n in os.listdir(data / "out") if n.startswith(".tmp")]  # the last one finished before exit


def test_async_write_failure_is_reported_at_the_next_save(data, monkeypatch, capsys):
    real, calls = checkpoint.write_files, {"n": 0}

    def failing(tmp, objects):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(tmp, objects)
    monkeypatch.setattr(checkpoint, "write_files", failing)
    run_inproc(data, max_iters=6, checkpoint_interval=2, checkpoint_async=True)
    assert "checkpoint at step 4 failed; the previous checkpoint is intact" in capsys.readouterr().out
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(data / "out")] == ["ckpt_00000002", "ckpt_00000006"]
    assert not [n for n in os.listdir(data / "out") if n.startswith(".tmp")]


def test_kill9_during_async_write_keeps_previous_checkpoint(data):
    steps = dict(max_iters=8, checkpoint_interval=2, lr_decay_iters=8, checkpoint_async=True)
    run_ok(tiny_args(data, out_dir=str(data / "ref"), **steps))
    out = data / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + tiny_args(data, **steps),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CHECKPOINT_TEST_WRITE_DELAY_S": "0.5"})
    tmp, deadline = out / ".tmp_ckpt_00000004", time.time() + 120
    while not (checkpoint.list_checkpoints(out) and tmp.exists() and os.listdir(tmp)):  # step 4 half written
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.exists() and len(os.listdir(tmp)) < 3  # killed in the middle of the background write
    assert checkpoint.latest(out) == str(out / "ckpt_00000002")  # the previous one, intact
    r = run_ok(tiny_args(data, init_from="resume", **steps))
    assert "resuming at step 2" in r.stdout, r.stdout
    assert_same_run(out, data / "ref", rtol=0, atol=0, param_atol=0)


def test_sigterm_finishes_the_async_write_before_exit(data):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")]
                            + tiny_args(data, max_iters=100000, lr_decay_iters=100000, checkpoint_interval=2,
                                        checkpoint_async=True),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CHECKPOINT_TEST_WRITE_DELAY_S": "0.3"})
    deadline = time.time() + 120
    while not (os.path.exists(data / "out" / "log.jsonl") and max(losses(data / "out"), default=0) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopped by signal at step" in text, text
    step = int(text.split("stopped by signal at step ")[1].split(";")[0])
    assert checkpoint.latest(data / "out") == str(data / "out" / f"ckpt_{step:08d}")
    assert checkpoint.load(checkpoint.latest(data / "out"), "train_state.pt")["step"] == step
