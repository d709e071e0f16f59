"""Shared helpers for the tests: a synthetic dataset, tiny configs, runs of train.py."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
from prepare import write_tokens  # noqa: E402

VOCAB = 64
# torchrun's environment for --max-restarts: torch's rendezvous store, shared with the workers by
# default, keeps the addresses of the previous attempt's ranks, so a restart fails to connect
# (pytorch/pytorch#135712); slurm/train.sbatch and the README set it too
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def make_dataset(data_dir, name="synth", n_train=20000, n_val=4000, seed=0):
    """Tokens with structure to learn (noisy repeats of short motifs) in data_dir/name."""
    rng = np.random.default_rng(seed)
    motifs = rng.integers(0, VOCAB - 1, size=(16, 8))
    def stream(n):
        picks = motifs[rng.integers(0, len(motifs), size=n // 8 + 1)].reshape(-1)[:n]
        noise = rng.random(n) < 0.1
        return np.where(noise, rng.integers(0, VOCAB - 1, size=n), picks)
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        write_tokens(os.path.join(data_dir, name, f"{split}.bin"), stream(n), "byte", VOCAB, VOCAB - 1)
    return data_dir


def tiny_args(tmp_path, **overrides):
    """--key=value arguments for a tiny fp32 CPU run on the synthetic dataset."""
    cfg = dict(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), dataset="synth",
               device="cpu", dtype="float32", dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
               vocab_size=VOCAB, multiple_of=16, block_size=16, batch_size=8, micro_batch_size=2,
               max_iters=4, learning_rate=1e-3, min_lr=1e-4, warmup_iters=2, lr_decay_iters=8,
               log_interval=1, eval_interval=1000, eval_iters=2, checkpoint_interval=1000, seed=7)
    cfg.update(overrides)
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in cfg.items()]


def run_train(args, nproc=1, timeout=300, env=None):
    """train.py in a subprocess (torchrun when nproc > 1); returns the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(launcher + [os.path.join(ROOT, "train.py")] + args, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def run_ok(args, nproc=1, **kw):
    """run_train that must succeed; its output is shown when it does not."""
    r = run_train(args, nproc=nproc, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def free_port():
    """A free TCP port on loopback for a torch.multiprocessing rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out_dir, key="loss"):
    """{step: loss} (or another key's value) from out_dir/log.jsonl (the last record of a step
    wins, as after a resume)."""
    out = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by kill -9
                continue
            if key in rec:
                out[rec["step"]] = rec[key]
    return out


def final_params(out_dir):
    return checkpoint.load(checkpoint.latest(out_dir), "model.pt")["state_dict"]


def assert_same_run(out_a, out_b, rtol=1e-5, atol=1e-6, param_atol=1e-5):
    """Per-step losses and gradient norms to fp32 tolerance, then the final parameters. The norms
    catch a uniform gradient scale (a sum for a mean) that clipping and Adam would hide from the
    losses. Parameters get param_atol:
    Adam divides each gradient by its own running size, so an element whose gradient is near
    zero turns float32 summation-order noise into a step of up to lr (1e-3 here); one process
    with micro_batch_size 1 vs 2 already differs by ~3e-6 there. A wrong slice, a missing or
    double reduction moves parameters by ~lr per step, far above 1e-5."""
    for key in ("loss", "grad_norm"):
        la, lb = losses(out_a, key), losses(out_b, key)
        assert la.keys() == lb.keys(), (key, la, lb)
        for step in la:  # inf == inf, and nan vs nan passes (the norm of a skipped step)
            a, b = la[step], lb[step]
            assert a == b or abs(a - b) <= atol + rtol * abs(b) or a != a and b != b, f"{key}, step {step}: {a} vs {b}"
    pa, pb = final_params(out_a), final_params(out_b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=max(atol, param_atol), msg=lambda m: f"{k}: {m}")
