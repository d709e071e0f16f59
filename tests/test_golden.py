"""A golden loss curve (as torchtitan keeps): the first 20 losses of a fixed tiny fp32 CPU run.
Any change to the model, the data order, the initialisation, the schedule or the optimizer
that moves the numbers shows up here, even when every layout still agrees with the others.
If a change is meant to alter training, regenerate the curve and say why in the commit."""
import pytest

from util import losses, make_dataset, run_ok, tiny_args

GOLDEN = {1: 4.173533, 2: 4.145347, 3: 4.109649, 4: 4.035094, 5: 4.020475, 6: 3.956793, 7: 3.912522,
          8: 3.841177, 9: 3.851629, 10: 3.77872, 11: 3.80787, 12: 3.746774, 13: 3.780592, 14: 3.771348,
          15: 3.760527, 16: 3.665839, 17: 3.655934, 18: 3.72945, 19: 3.640759, 20: 3.689278}


def test_golden_loss_curve(tmp_path):
    make_dataset(tmp_path / "data")
    run_ok(tiny_args(tmp_path, max_iters=20, lr_decay_iters=20, learning_rate=3e-3))
    got = losses(tmp_path / "out")
    assert got.keys() == GOLDEN.keys()
    for step, want in GOLDEN.items():
        assert got[step] == pytest.approx(want, rel=1e-4, abs=1e-5), f"step {step}: {got[step]} vs golden {want}"
