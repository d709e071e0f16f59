"""train.py on one process: config errors, resume, gradient accumulation, loss scaling, learning."""
import functools
import json
import math

import pytest
import torch

import train
from util import assert_same_run, final_params, losses, make_dataset, run_ok, run_train, tiny_args


FORWARD_BACKWARD = train.forward_backward  # the real one, which _inject wraps


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


def test_lr_schedule_values():
    """Warm-up (s + 1) / (warmup_iters + 1) of the peak, so step 0 already trains; the peak at
    warmup_iters; half-way between peak and min_lr at the middle of the decay; min_lr from lr_decay_iters."""
    cfg = train.load_config(["--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=4", "--lr_decay_iters=14"])
    want = {0: 2e-4, 3: 8e-4, 4: 1e-3, 9: 5.5e-4, 14: 1e-4, 15: 1e-4, 1000: 1e-4}
    assert {s: train.lr_at(cfg, s) for s in want} == pytest.approx(want, rel=1e-12)
    assert train.lr_at(cfg, 13) > cfg.min_lr


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA A10G", None), ("Tesla T4", None)])
def test_peak_flops_by_device_name(name, tflops):
    assert train.peak_flops(name) == (tflops and tflops * 1e12)
    assert train.peak_flops(name, 100.0) == 100e12  # --peak_tflops overrides the table


def test_fused_adamw_clips_inside_its_step(monkeypatch):
    """apply_update with torch's fused AdamW (CUDA's default; fused on the CPU here) folds the global-norm
    clip into the optimizer's kernel (optimizer.grad_scale): the same parameters as clipping the
    gradients first, over steps whose norms are above and below grad_clip; and not those of no clip."""
    torch.manual_seed(0)
    shapes, clip = [(40, 24), (24,), (7, 5)], 1.0
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * scale for s in shapes] for scale in (3.0, 0.01, 1.5)]  # norms ~20, ~0.07, ~10

    def run(mode):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        model = torch.nn.ParameterList(params)
        opt = torch.optim.AdamW(params, lr=0.05, fused=mode == "fused")
        cfg = train.Config(grad_clip=clip if mode != "no clip" else 0.0)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in step_grads]))
            train.apply_update(cfg, model, opt, norm, train.LossScaler(False))
        return torch.cat([p.detach().flatten() for p in params])

    foreach, unclipped = run("foreach"), run("no clip")
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", None)  # fused: no pass of its own
    fused = run("fused")
    torch.testing.assert_close(fused, foreach, rtol=1e-6, atol=1e-6)
    assert (fused - unclipped).abs().max() > 1e-3


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


def _inject(monkeypatch, value, at_calls, loss_too=False):
    """Make forward_backward leave `value` in one gradient (and the loss if loss_too) on the
    given calls (1-based, counted from this call)."""
    calls = {"n": 0}

    def patched(model, *a, **k):
        loss = FORWARD_BACKWARD(model, *a, **k)
        calls["n"] += 1
        if calls["n"] in at_calls:
            next(model.parameters()).grad.view(-1)[0] = value
            loss = loss + value if loss_too else loss
        return loss
    monkeypatch.setattr(train, "forward_backward", patched)


def test_logged_loss_is_the_mean_of_the_steps_since_the_last_line(data):
    """A resume at step 3 with log_interval=4: the step-4 line averages step 4 alone, step 8's
    steps 5-8, each equal to the mean of an uninterrupted log_interval=1 run's losses."""
    ref, out = data / "ref", data / "out"
    train.train(train.load_config(tiny_args(data, out_dir=str(ref), max_iters=8)))
    train.train(train.load_config(tiny_args(data, out_dir=str(out), max_iters=3, log_interval=4)))
    train.train(train.load_config(tiny_args(data, out_dir=str(out), max_iters=8, log_interval=4,
                                            init_from="resume")))
    per_step, logged = losses(ref), losses(out)
    assert sorted(logged) == [3, 4, 8]
    for step, first in ((3, 1), (4, 4), (8, 5)):
        want = sum(per_step[s] for s in range(first, step + 1)) / (step + 1 - first)
        assert logged[step] == pytest.approx(want, rel=1e-6), (step, logged[step], want)


def test_skipped_step_is_left_out_of_the_logged_loss(data, monkeypatch, capsys):
    """A NaN loss and gradient at step 2 skip it: the step-4 line averages steps 1, 3, 4 and
    a line whose steps were all skipped has no loss."""
    ref, out = data / "ref", data / "out"
    _inject(monkeypatch, float("nan"), {2}, loss_too=True)
    train.train(train.load_config(tiny_args(data, out_dir=str(ref), max_iters=4)))
    _inject(monkeypatch, float("nan"), {2}, loss_too=True)
    train.train(train.load_config(tiny_args(data, out_dir=str(out), max_iters=4, log_interval=4)))
    per_step, logged = losses(ref), losses(out)
    assert sorted(per_step) == [1, 3, 4] and "step      2 | loss n/a (every step skipped)" in capsys.readouterr().out
    assert logged[4] == pytest.approx((per_step[1] + per_step[3] + per_step[4]) / 3, rel=1e-6)


def test_fp16_loss_scaling_recovers_from_overflow(data, monkeypatch, capsys):
    _inject(monkeypatch, float("inf"), {3})
    cfg = train.load_config(tiny_args(data, dtype="float16", max_iters=6))
    model = train.train(cfg)
    recs = {r["step"]: r for r in map(json.loads, open(data / "out" / "log.jsonl")) if "lr" in r}
    assert recs[2]["loss_scale"] == 2.0 ** 16 and recs[3]["loss_scale"] == 2.0 ** 15
    assert "non-finite gradient norm, step skipped, loss scale lowered to 32768" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert recs[6]["loss"] < recs[1]["loss"]


def test_fp16_resume_restores_the_loss_scale(data, monkeypatch):
    """fp16 from a loss scale of 2^22 (test only): steps 1 and 2 overflow on their own and halve it
    to 2^20. Saved at step 3 and resumed, the run goes on with 2^20 and the same losses as the
    uninterrupted run (a resume from 2^22 or 2^16 would log another scale, or overflow again)."""
    monkeypatch.setattr(train, "LossScaler", functools.partial(train.LossScaler, scale=2.0 ** 22))
    ref, out = data / "ref", data / "out"
    for out_dir, kw in ((ref, {}), (out, dict(max_iters=3)), (out, dict(init_from="resume"))):
        train.train(train.load_config(tiny_args(data, out_dir=str(out_dir), dtype="float16", **{"max_iters": 6, **kw})))
    scales = losses(out, "loss_scale")
    assert scales == losses(ref, "loss_scale") and scales[1] == 2.0 ** 21 and scales[6] == 2.0 ** 20, scales
    assert sorted(losses(out)) == [3, 4, 5, 6]  # 1 and 2 skipped
    assert_same_run(out, ref, rtol=0, atol=0, param_atol=0)


def test_nan_steps_stop_the_run_with_checkpoint_intact(data, monkeypatch):
    run_ok(tiny_args(data, max_iters=2, checkpoint_interval=2))
    before = final_params(data / "out")
    _inject(monkeypatch, float("nan"), set(range(1, 100)))
    cfg = train.load_config(tiny_args(data, max_iters=20, init_from="resume", max_bad_steps=3))
    with pytest.raises(train.UserError, match="3 consecutive steps with NaN/Inf"):
        train.train(cfg)
    after = final_params(data / "out")
    assert all(torch.equal(before[k], after[k]) for k in before)
