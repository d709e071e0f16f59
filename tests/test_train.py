"""train.py on one process: config errors, resume, gradient accumulation, loss scaling, learning."""
import json
import math

import pytest
import torch

import train
from util import assert_same_run, final_params, losses, make_dataset, run_ok, run_train, tiny_args


@pytest.fixture
def data(tmp_path):
    make_dataset(tmp_path / "data")
    return tmp_path



@pytest.mark.parametrize("arg, message", [
    ("--learning_rat=0.1", "did you mean 'learning_rate'"),
    ("--max_iters=abc", "max_iters='abc': expected int"),
    ("--dim=30", "dim=30 is not divisible by n_heads=4"),
    ("--batch_size=7", "batch_size=7 is not divisible by micro_batch_size=2"),
    ("--pp_schedule=zigzag", "pp_schedule='zigzag' must be one of"),
    ("--vocab_size=32", "vocab_size >= 64"),
    ("--block_size=100000", "fewer than one block"),
])
def test_user_errors_exit_2_without_traceback(data, arg, message):
    r = run_train(tiny_args(data) + [arg])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_config_file_unknown_key(data, tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text("n_layer = 4\n")
    r = run_train([str(cfg)] + tiny_args(data))
    assert r.returncode == 2 and "unknown config key 'n_layer'; did you mean 'n_layers'?" in r.stderr, r.stderr


def test_config_types():
    cfg = train.load_config(["--learning_rate=1", "--compile=true", "--n_kv_heads=None", "--out_dir=x/y"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.compile is True and cfg.n_kv_heads is None and cfg.out_dir == "x/y"
    with pytest.raises(train.UserError, match="expected bool"):
        train.load_config(["--compile=3"])


def test_lr_schedule_does_not_depend_on_max_iters():
    a, b = train.load_config(["--max_iters=100"]), train.load_config(["--max_iters=5000"])
    assert [train.lr_at(a, s) for s in range(0, 3000, 7)] == [train.lr_at(b, s) for s in range(0, 3000, 7)]
    assert train.lr_at(a, a.lr_decay_iters + 10) == a.min_lr


def test_batch_depends_only_on_seed_and_step():
    cfg = train.load_config(["--batch_size=8", "--micro_batch_size=2"])
    o1, o2 = train.batch_offsets(cfg, 10_000, 5, "train"), train.batch_offsets(cfg, 10_000, 5, "train")
    assert (o1 == o2).all() and not (o1 == train.batch_offsets(cfg, 10_000, 6, "train")).all()


def test_resume_equals_uninterrupted(data):
    full, part = data / "full", data / "part"
    run_ok(tiny_args(data, out_dir=str(full), max_iters=6))
    run_ok(tiny_args(data, out_dir=str(part), max_iters=3))
    run_ok(tiny_args(data, out_dir=str(part), max_iters=6, init_from="resume"))
    assert_same_run(full, part, rtol=0, atol=0, param_atol=0)


def test_gradient_accumulation_same_global_batch(data):
    outs = []
    for mb in (1, 2, 8):
        out = data / f"mb{mb}"
        run_ok(tiny_args(data, out_dir=str(out), micro_batch_size=mb))
        outs.append(out)
    assert_same_run(outs[0], outs[2])
    assert_same_run(outs[1], outs[2])


def test_tiny_run_loss_falls(data):
    out = data / "learn"
    run_ok(tiny_args(data, out_dir=str(out), max_iters=60, learning_rate=1e-2, lr_decay_iters=60,
                     eval_interval=60))
    ls = losses(out)
    first, last = sum(ls[s] for s in (1, 2, 3)) / 3, sum(ls[s] for s in (58, 59, 60)) / 3
    assert first > math.log(64) - 0.5 and last < first - 1.5, (first, last)
    recs = [json.loads(l) for l in open(out / "log.jsonl")]
    assert any("val_loss" in r for r in recs)


def _inject(monkeypatch, value, at_calls):
    """Make forward_backward leave `value` in one gradient on the given calls (1-based)."""
    calls = {"n": 0}
    original = train.forward_backward

    def patched(model, *a, **k):
        loss = original(model, *a, **k)
        calls["n"] += 1
        if calls["n"] in at_calls:
            next(model.parameters()).grad.view(-1)[0] = value
        return loss
    monkeypatch.setattr(train, "forward_backward", patched)


def test_fp16_loss_scaling_recovers_from_overflow(data, monkeypatch, capsys):
    _inject(monkeypatch, float("inf"), {3})
    cfg = train.load_config(tiny_args(data, dtype="float16", max_iters=6))
    model = train.train(cfg)
    recs = {r["step"]: r for r in map(json.loads, open(data / "out" / "log.jsonl")) if "loss" in r}
    assert recs[2]["loss_scale"] == 2.0 ** 16 and recs[3]["loss_scale"] == 2.0 ** 15
    assert "non-finite gradient norm, step skipped, loss scale lowered to 32768" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert recs[6]["loss"] < recs[1]["loss"]


def test_nan_steps_stop_the_run_with_checkpoint_intact(data, monkeypatch):
    run_ok(tiny_args(data, max_iters=2, checkpoint_interval=2))
    before = final_params(data / "out")
    _inject(monkeypatch, float("nan"), set(range(1, 100)))
    cfg = train.load_config(tiny_args(data, max_iters=20, init_from="resume", max_bad_steps=3))
    with pytest.raises(train.UserError, match="3 consecutive steps with NaN/Inf"):
        train.train(cfg)
    after = final_params(data / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)
