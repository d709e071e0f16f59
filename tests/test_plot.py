"""plot.py on the logs of real short CPU runs (curves counted from the figure object), and the
trackers of train.RunLog with stub writers (no network)."""
import glob
import json
import math
import os
import shutil
import sys
import types

import pytest
import torch

import parallel
import plot
import train
from util import make_dataset, run_ok, tiny_args


def _train_with_nan_at(args, bad_call):
    """train.train in this process; the gradients of the bad_call-th forward_backward become NaN."""
    original, calls = train.forward_backward, {"n": 0}

    def patched(model, *a, **k):
        loss = original(model, *a, **k)
        calls["n"] += 1
        if calls["n"] == bad_call:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        return loss
    train.forward_backward = patched
    try:
        train.train(train.load_config(args))
    finally:
        train.forward_backward = original

def test_plot_resumed_run_with_a_skipped_step(tmp_path):
    make_dataset(tmp_path / "data")
    base = dict(eval_interval=3, checkpoint_interval=4)
    _train_with_nan_at(tiny_args(tmp_path, max_iters=6, **base), bad_call=3)  # step 3 skipped
    shutil.rmtree(sorted(glob.glob(str(tmp_path / "out" / "ckpt_*")))[-1])  # resume from step 4: 5, 6 re-logged
    _train_with_nan_at(tiny_args(tmp_path, max_iters=8, init_from="resume", **base), bad_call=0)
    log = plot.read_log(str(tmp_path / "out"))
    assert list(log["train"]) == [1, 2, 4, 5, 6, 7, 8] and log["skipped"] == [3]
    assert list(log["val"]) == [3, 6, 8]
    assert all(log["train"][s]["tokens"] == s * 8 * 16 for s in log["train"])  # batch 8 x block 16

    other = tmp_path / "other"
    train.train(train.load_config(tiny_args(tmp_path, out_dir=str(other), max_iters=5, eval_interval=5)))
    fig = plot.make_figure([("a", log), ("b", plot.read_log(str(other)))], smooth=0.5)
    titles = {ax.get_title(): ax for ax in fig.axes}
    loss_lines = titles["training loss"].get_lines()
    # per run: training loss + validation; run a also its skipped-step markers
    assert [ln.get_label() for ln in loss_lines] == ["a", "a (validation)", "a: skipped steps", "b", "b (validation)"]
    assert list(loss_lines[0].get_xdata()) == [1, 2, 4, 5, 6, 7, 8]  # no gap but the skipped step itself
    assert all(torch.isfinite(torch.tensor(ln.get_ydata(), dtype=torch.float64)).all() for ln in loss_lines)
    assert len(titles["loss against tokens"].get_lines()) == 4
    for name in ("learning rate", "gradient norm", "throughput"):
        assert [ln.get_label() for ln in titles[name].get_lines()] == ["a", "b"]
    assert not titles["memory"].get_lines()  # CPU runs log no GPU memory: the panel says so

    plot.main([str(tmp_path / "out"), str(other), "--no_show", "--out", str(tmp_path / "p.png")])
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

def test_plot_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="log.jsonl not found"):
        plot.main([str(tmp_path), "--no_show"])
    os.makedirs(tmp_path / "r")
    open(tmp_path / "r" / "log.jsonl", "w").write('{"step": 1, "lo')  # a run that has just started
    with pytest.raises(SystemExit, match="no logged training step yet"):
        plot.main([str(tmp_path / "r"), "--no_show"])
    with pytest.raises(SystemExit, match="smooth"):
        plot.main([str(tmp_path / "r"), "--smooth=1.5"])


# --------------------------------------------------------------------------- trackers
class _StubWandb(types.ModuleType):
    """wandb's surface that train.RunLog uses, recording instead of sending."""

    def __init__(self):
        super().__init__("wandb")
        self.logged, self.init_kwargs, self.finished = [], None, False
        self.util = types.SimpleNamespace(generate_id=lambda: "stub0001")

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return types.SimpleNamespace(log=lambda scalars, step: self.logged.append((step, dict(scalars))),
                                     finish=lambda: setattr(self, "finished", True))


class _StubWriter:
    written = []

    def __init__(self, log_dir):
        self.log_dir = log_dir

    def add_scalar(self, name, value, step):
        _StubWriter.written.append((step, name, value))

    def flush(self):
        pass

    def close(self):
        pass


def test_trackers_log_the_fields_of_log_jsonl(tmp_path, monkeypatch):
    make_dataset(tmp_path / "data")
    stub = _StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_StubWriter))
    _StubWriter.written = []
    args = tiny_args(tmp_path, max_iters=4, eval_interval=2, wandb=True, tensorboard=True, wandb_project="p")
    _train_with_nan_at(args, bad_call=2)  # a skipped step is a record too
    recs = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # flags are not curves
    want = [(r["step"], {k: v for k, v in r.items() if k != "step" and number(v)}) for r in recs]
    # step 2: skipped, its (loss-less) log line, val; step 4: log line, val, the final checkpoint's stall
    assert [step for step, _ in want] == [1, 2, 2, 2, 3, 4, 4, 4]
    assert len(stub.logged) == len(want)
    for (step, got), (want_step, fields) in zip(stub.logged, want):
        assert step == want_step and got.keys() == fields.keys()
        assert all(got[k] == fields[k] or (math.isnan(got[k]) and math.isnan(fields[k])) for k in got)
    assert stub.init_kwargs["project"] == "p" and stub.init_kwargs["id"] == "stub0001" and stub.finished
    assert open(tmp_path / "out" / "wandb_id").read() == "stub0001"  # a resume continues the same run
    tb = {}
    for step, name, value in _StubWriter.written:
        tb.setdefault(step, {})[name] = value
    for step, fields in want:
        assert all(tb[step][k] == v or math.isnan(v) for k, v in fields.items())


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path / "data")
    for kind, module in (("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # its import raises ImportError
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(tmp_path, **{kind: True}))
        assert e.value.code == 2
        assert f"{kind}=True needs the {kind} package: pip install {kind}" in capsys.readouterr().err


# --------------------------------------------------------------------------- the pipeline timeline
@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_pipeline_trace_follows_the_plan_and_matches_measured_idle(tmp_path, schedule, virtual):
    make_dataset(tmp_path / "data")
    run_ok(tiny_args(tmp_path, pp=2, pp_schedule=schedule, pp_virtual=virtual, max_iters=5, pp_trace=True,
                     pp_measure_idle=True), nproc=2)  # batch 8 / micro-batch 2: m = 4
    trace = plot.read_trace(str(tmp_path / "out"))
    assert (trace["pp"], trace["m"], trace["virtual"]) == (2, 4, virtual)
    assert [s["step"] for s in trace["steps"]] == [2, 3, 4]  # the first step warms up
    logged = {r["step"]: r["pp_idle"] for r in map(json.loads, open(tmp_path / "out" / "log.jsonl"))
              if "pp_idle" in r}
    for step in trace["steps"]:
        for stage, events in enumerate(step["stages"]):
            actions = [(k, mb, g) for k, mb, g, _, _ in events["events"] if k in ("F", "B")]
            assert actions == parallel.schedule_actions(schedule, 4, 2, stage, virtual)  # each once, in order
            starts = [t0 for *_, t0, _ in events["events"]]
            assert starts == sorted(starts) and all(t0 <= t1 <= events["length"] for *_, t0, t1 in events["events"])
            # the trace's waits are the intervals pp_measure_idle sums (log_interval=1: one step each)
            assert plot.measured_idle(events) == pytest.approx(logged[step["step"]][stage], abs=1e-9)
    fig = plot.make_timeline(trace)
    measured, planned = fig.axes[:2]
    n_bars = lambda ax: len(ax.collections)
    assert n_bars(planned) == 2 * 2 * 4 * virtual  # F and B of every micro-batch and chunk, on each stage
    assert n_bars(measured) == sum(len(st["events"]) for st in trace["steps"][-1]["stages"])
    plot.main(["--timeline", str(tmp_path / "out"), "--no_show"])
    assert os.path.getsize(tmp_path / "out" / "timeline.png") > 10_000


def test_planned_timeline_idle_is_the_bubble_formula():
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        for pp, m in ((2, 4), (4, 8)):
            lanes = plot.planned_timeline(schedule, pp, m, v)
            end = max(e[4] for lane in lanes for e in lane)
            for lane in lanes:
                idle = 1 - sum(e[4] - e[3] for e in lane) / end
                assert idle == pytest.approx(parallel.bubble_fraction(schedule, pp, m, v)), (schedule, pp, m)


def test_pp_trace_needs_a_pipeline():
    with pytest.raises(train.UserError, match="pp_trace=True .* needs pp >= 2"):
        train.load_config(["--pp_trace=True"])
