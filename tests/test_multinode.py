"""Several nodes, simulated on one machine (CPU, gloo, loopback): two torchrun agents meeting at
a c10d rendezvous, and slurm/train.sbatch under hand-set Slurm variables, train dp2 x tp2 as
one process does, with each tensor-parallel group inside one node."""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from util import ELASTIC_ENV, ROOT, assert_same_run, free_port, make_dataset, run_ok, tiny_args

NODE = ["--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d"]  # the README's command, 2 processes a node


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    make_dataset(base / "data")
    run_ok(tiny_args(base, out_dir=str(base / "single")))
    return base


def finish(procs, timeout=300):
    """Wait for every process; returns their outputs, after checking that all succeeded."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, "\n\n".join(outs)[-6000:]
    return outs


def test_two_torchrun_agents_train_dp2_tp2_as_one_process(base):
    out, dump, port = base / "agents", base / "ranks", free_port()
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_DUMP_DIR": str(dump)}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *NODE, "--rdzv_id=sim",
                               f"--rdzv_endpoint=127.0.0.1:{port}", os.path.join(ROOT, "tests", "rank_dump.py"),
                               *tiny_args(base, out_dir=str(out), tp=2)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
             for _ in range(2)]
    outs = finish(procs)
    assert "world 4 = dp 2 x pp 1 x tp 2" in "".join(outs), outs
    ranks = [json.load(open(f)) for f in glob.glob(str(dump / "*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
    node = {r["rank"]: r["node"] for r in ranks}
    assert sorted(node.values()) == [0, 0, 1, 1]  # two nodes of two processes
    for r in ranks:  # torchrun's ranks are node-major, so the grid's tp rows are the nodes
        assert len(r["tp_group"]) == 2 and {node[q] for q in r["tp_group"]} == {r["node"]}, ranks
    assert_same_run(out, base / "single")


def slurm_job(tmp_path, args):
    """slurm/train.sbatch started as sbatch would run it on two nodes of two GPUs each, with a
    fake srun (one task per node, each a torchrun agent here) and a fake scontrol (the node
    list's hostnames: loopback)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\n'
        'while [[ $1 == -* ]]; do shift; done  # srun options: one task per node here\n'
        'pids=()\n'
        'for ((i = 0; i < SLURM_NNODES; i++)); do\n'
        '  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!)\n'
        'done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n'
        '[[ "$1 $2 $3" == "show hostnames sim[1-2]" ]] || { echo "scontrol: unexpected $*" >&2; exit 1; }\n'
        'echo 127.0.0.1; sleep 0.5; echo 127.0.0.2\n')  # a reader that stops at line 1 gets SIGPIPE'd
    for f in ("srun", "scontrol"):
        os.chmod(bin_dir / f, 0o755)
    path = f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # fakes, then torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path,
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "sim[1-2]",
           "SLURM_GPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": ROOT, "RDZV_PORT": str(free_port())}
    return subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "train.sbatch"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)


def test_slurm_script_on_two_simulated_nodes(base, tmp_path):
    config = tmp_path / "dp2_tp2.py"
    config.write_text("tp = 2\n")  # a config file, passed through to train.py before the overrides
    out = base / "slurm"
    text = finish([slurm_job(tmp_path, [str(config), *tiny_args(base, out_dir=str(out))])])[0]
    assert "world 4 = dp 2 x pp 1 x tp 2" in text, text[-4000:]
    assert "no checkpoint in" in text and "starting from scratch" in text  # --init_from=auto, nothing to resume
    assert_same_run(out, base / "single")


def descendants(pid):
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(k) for k in kids] + [d for k in kids for d in descendants(k)]


@pytest.mark.slow
def test_slurm_job_restarts_a_killed_rank_by_itself(base, tmp_path):
    """kill -9 of one rank of the two-node Slurm job: both torchrun agents restart their
    processes, which resume from the newest checkpoint, exactly as the uninterrupted run."""
    from test_fault_tolerance import wait_for_step
    steps = dict(max_iters=40, checkpoint_interval=3, lr_decay_iters=40, tp=2)
    ref, out = base / "restart_ref", base / "restart"
    run_ok(tiny_args(base, out_dir=str(ref), **steps), nproc=4, env=ELASTIC_ENV)
    proc = slurm_job(tmp_path, tiny_args(base, out_dir=str(out), **steps))
    wait_for_step(out, 5, proc, timeout=120)
    workers = [p for p in descendants(proc.pid) if not descendants(p)]  # the leaves: train.py processes
    assert len(workers) == 4, workers
    os.kill(workers[-1], signal.SIGKILL)
    text = finish([proc])[0]
    assert "resuming at step" in text and "automatic (init_from=auto)" in text, text[-4000:]
    assert_same_run(out, ref, rtol=0, atol=0, param_atol=0)
