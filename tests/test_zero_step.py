"""ZeroAdamW.step's fused update (zero.adamw_update_) against torch.optim.AdamW, in one process."""
from types import SimpleNamespace

import pytest
import torch

import parallel
import train
import zero
from model import ModelConfig, Transformer

LR, WD, BETAS = 1e-2, 0.1, (0.9, 0.95)


def _models(dtype, stage):
    torch.manual_seed(0)
    mcfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16)
    ref = Transformer(mcfg)
    model = Transformer(mcfg)
    model.load_state_dict(ref.state_dict())
    cfg = SimpleNamespace(zero=stage, learning_rate=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD)
    opt = zero.ZeroAdamW(model, cfg, parallel.Mesh(), dtype)
    ref_opt = torch.optim.AdamW(ref.param_groups(WD), lr=LR, betas=BETAS)  # decay on matrices only
    return ref, ref_opt, model, opt


def _set_grads(ref, opt, scale, gen):
    """Random gradients into the optimizer's (low-precision) gradient shards; the reference gets
    the same values, upcast and multiplied by scale in float32 (what step(grad_scale) does)."""
    named = {n: torch.randn(p.shape, generator=gen) for n, p in ref.named_parameters()}
    for u, g in zip(opt.units, opt._grad_views()):
        g.copy_(u.shard(u.flatten(named)))
    for u, g in zip(opt.units, opt._grad_views()):
        for n, o, shape in zip(u.names, u.offsets, u.shapes):
            dict(ref.named_parameters())[n].grad = g[o:o + shape.numel()].view(shape).float() * scale


@pytest.mark.parametrize("dtype, stage", [(torch.float32, 1), (torch.float32, 2), (torch.float32, 3),
                                          (torch.bfloat16, 1), (torch.bfloat16, 2)])
def test_step_matches_torch_adamw(dtype, stage):
    """Four steps with weight decay on the matrices only, grad_scale != 1 (a 0-dim tensor, then a
    float) and a changing learning rate. The master weights and moments equal torch's AdamW
    (float32, single-tensor) to float32 rounding: eager on CPU runs the same operations in the
    same order, so they agree bit for bit; the tolerance only leaves room for another kernel.
    With bf16 the tolerance is the same: the gradients are rounded to bf16 before the step and
    the reference is fed those very values, so the only bf16 rounding left is the parameter
    copy, which must equal the float32 master weights rounded to bf16 exactly."""
    ref, ref_opt, model, opt = _models(dtype, stage)
    gen = torch.Generator().manual_seed(1)
    for t, scale in enumerate([torch.tensor(0.3), torch.tensor(1.7), 0.5, 1.0]):
        lr = LR * (1 + t) / 4
        opt.param_groups[0]["lr"] = lr
        for g in ref_opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        model.grad_sync.finish()  # what train.py's backward ends with (stage 1: the buffers come back)
        _set_grads(ref, opt, scale, gen)
        opt.step(grad_scale=scale)
        ref_opt.step()
    master, m, v = opt._by_name(opt.master), opt._by_name(opt.exp_avg), opt._by_name(opt.exp_avg_sq)
    for n, p in ref.named_parameters():
        state = ref_opt.state[p]
        torch.testing.assert_close(master[n], p.detach(), rtol=1e-6, atol=1e-7, msg=lambda s: f"{n}: {s}")
        torch.testing.assert_close(m[n], state["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(v[n], state["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    if stage == 3:
        for u in opt.units:
            u.gather()
    for n, p in model.named_parameters():
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach(), master[n].to(dtype), rtol=0, atol=0)
    weights = [n for n, p in ref.named_parameters() if p.dim() >= 2]
    assert weights and len(weights) < len(list(ref.parameters()))  # both kinds of range were exercised


@pytest.mark.parametrize("stage", [None, 0, 1, 2, 3])
def test_weight_decay_on_matrices_not_norm_weights(stage):
    """One step with zero gradients: Adam's update is 0, so what moves is the decay alone. Matrices
    and the embedding shrink by exactly (1 - lr*wd), norm weights stay. stage None: train.py's
    torch AdamW; 0-3: ZeroAdamW (0: master weights without sharding)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16, multiple_of=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = train.load_config([f"--zero={stage or 0}", f"--learning_rate={LR}", f"--weight_decay={WD}", "--device=cpu"])
    if stage is None:
        opt = train.build_optimizer(model, cfg, parallel.Mesh(), torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    else:
        opt = zero.ZeroAdamW(model, cfg, parallel.Mesh(), torch.float32)
        opt.zero_grad(set_to_none=False)
        model.grad_sync.finish()
    opt.step()
    if stage == 3:
        for u in opt.units:
            u.gather()
    norms = [n for n in before if n.endswith("norm.weight")]
    assert norms and len(norms) < len(before)
    for n, p in model.named_parameters():
        want = before[n] if n in norms else before[n] * (1 - LR * WD)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=lambda s: f"{n}: {s}")


def test_grad_norm_is_the_norm_of_the_shards():
    ref, _, model, opt = _models(torch.bfloat16, 1)
    model.grad_sync.finish()
    _set_grads(ref, opt, 1.0, torch.Generator().manual_seed(2))
    want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).norm()
    torch.testing.assert_close(opt.grad_norm(), want, rtol=1e-6, atol=0)
    assert opt.grad_norm().dtype == torch.float32


def test_stage1_frees_gradient_buffers_between_steps():
    """zero_grad(set_to_none=True) at stage 1 releases the flat gradient buffers until finish():
    the next backward's gradients (autograd allocates them) land in the refilled buffer, and a
    parameter without a gradient reads zeros there, not the last step's values."""
    ref, _, model, opt = _models(torch.float32, 1)
    assert all(u.grad.untyped_storage().nbytes() == 0 for u in opt.units)  # none before the first backward
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    model(x, x)[1].backward()
    model.grad_sync.finish()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(u.grad.untyped_storage().nbytes() == 0 for u in opt.units)
    assert all(p.grad is None for p in model.parameters())
    model.layers["0"].attention.wq.weight.requires_grad_(False)  # one parameter gets no gradient
    model(x, x)[1].backward()
    model.grad_sync.finish()
    ref.load_state_dict(model.state_dict())
    ref.layers["0"].attention.wq.weight.requires_grad_(False)
    ref(x, x)[1].backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        want = torch.zeros_like(p) if q.grad is None else q.grad
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7, msg=lambda s: f"{n}: {s}")
    for u, g in zip(opt.units, opt._grad_views()):
        assert g.data_ptr() == u.grad.data_ptr() and u.grad.untyped_storage().nbytes() == u.padded * 4
        assert not u.grad[u.numel:].any()
    opt.zero_grad(set_to_none=False)  # in place: the buffers stay, zeroed
    assert all(u.grad.untyped_storage().nbytes() > 0 and not u.grad.any() for u in opt.units)


@pytest.mark.slow
def test_compiled_update_matches_eager_without_recompiles():
    """What the GPU runs (torch.compile, dynamic shapes), here on the CPU: units of several
    (ALIGN-multiple) sizes at aligned offsets, decaying none, part or all of their shard, and a
    new learning rate every step, reuse a few graphs; the result is the eager update's up to
    float32 rounding (the compiled kernel may fuse multiply-adds)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    A = zero.ALIGN
    sizes, n_decays = [10 * A, 3 * A, 31 * A, A, 7 * A], [4 * A + 3, 0, 31 * A, A - 5, 7 * A - 1]
    n, gen = sum(sizes), torch.Generator().manual_seed(3)
    master = torch.randn(n, generator=gen)
    state = [master, torch.zeros(n), torch.zeros(n), master.to(torch.bfloat16)]
    eager = [t.clone() for t in state]
    grad = torch.randn(n, generator=gen).to(torch.bfloat16)
    update = zero.compiled_adamw_update()
    for t in range(1, 4):
        b1, b2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
        a = 0
        for size, n_decay in zip(sizes, n_decays):
            args = (torch.tensor(0.5 + 0.1 * t), n_decay, torch.tensor([1 - LR * t * WD, LR * t / b1, b2 ** 0.5]),
                    *BETAS, 1e-8)
            for fn, (w, m, v, p) in ((update, state), (zero.adamw_update_, eager)):
                fn(p[a:a + size], grad[a:a + size], w[a:a + size], m[a:a + size], v[a:a + size], *args)
            a += size
    assert counters["stats"]["unique_graphs"] <= 3  # n_decay 0 and n_decay == size may get their own
    for got, want in zip(state[:3], eager[:3]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state[3].float(), eager[3].float(), rtol=2 ** -8, atol=0)
