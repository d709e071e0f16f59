"""Document masking in pre-training (train.py doc_mask=True): a packed row computes what its
documents compute alone (losses and gradients; attn_impl math, sdpa and flash), every layout
(dp with ZeRO, tp with sequence parallelism, pp) trains as one process does, and data without an
end-of-text id is refused."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from util import VOCAB, assert_same_run, losses, run_ok, tiny_args

import train  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from prepare import write_tokens  # noqa: E402

EOT = VOCAB - 1


def doc_stream(n, rng, mean_len=6):
    """n tokens of documents laid out as prepare.py writes them: text (here motif tokens), then EOT;
    lengths 1 (EOT alone) to 2 * mean_len - 1."""
    out = []
    while len(out) < n:
        length = int(rng.integers(1, 2 * mean_len))
        out += list(rng.integers(0, EOT, size=length - 1)) + [EOT]
    return np.array(out[:n])


def write_docs(data_dir, name="docs", seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    for split, n in (("train", 20000), ("val", 4000)):
        write_tokens(os.path.join(data_dir, name, f"{split}.bin"), doc_stream(n, rng), "byte", VOCAB, EOT)
    return data_dir


# --------------------------------------------------------------------------- a packed row == its documents
@pytest.mark.parametrize("impl", ["math", "sdpa", "flash"])
def test_packed_row_equals_each_document_alone(impl, monkeypatch):
    """train.get_micro_batches' doc ids for a row of four documents (one of length 1, the last cut by
    the row's end): the summed token losses and their gradients equal those of each document run
    alone from position 0. The EOT belongs to the document it ends (its target, the next token,
    is still trained, from inside that document). The document bounds are computed once per forward,
    not once per layer."""
    import flash_attn
    bounds_calls, bounds = [], flash_attn.document_bounds
    monkeypatch.setattr(flash_attn, "document_bounds", lambda ids: bounds_calls.append(1) or bounds(ids))
    lengths = [6, 1, 9]  # then a document the row cuts: T = 20 tokens, 21 with the last target
    rng = np.random.default_rng(3)
    tokens = np.concatenate([np.append(rng.integers(0, EOT, size=n - 1), EOT) for n in lengths]
                            + [rng.integers(0, EOT, size=6)])  # block + 2: offset 0
    cfg = train.Config(block_size=20, batch_size=1, micro_batch_size=1, doc_mask=True)
    mesh = SimpleNamespace(dp=1, dp_rank=0)
    (x, y, doc_ids), = train.get_micro_batches(cfg, tokens, 0, "train", mesh, torch.device("cpu"), EOT)
    assert torch.equal(x[0], torch.from_numpy(tokens[:20])) and torch.equal(y[0], torch.from_numpy(tokens[1:21]))
    assert doc_ids[0].tolist() == [0] * 6 + [1] + [2] * 9 + [3] * 4

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                    multiple_of=16, max_seq_len=32, attn_impl=impl))
    packed_loss = model(x, y, doc_ids=doc_ids)[1] * 20  # the mean over 20 targets, as a sum
    assert len(bounds_calls) == 1  # two layers
    packed_loss.backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone_loss, start = 0.0, 0
    for n in lengths + [4]:
        loss = model(x[:, start:start + n], y[:, start:start + n])[1] * n
        loss.backward()
        alone_loss, start = alone_loss + loss.item(), start + n
    assert abs(packed_loss.item() - alone_loss) < 1e-5 * alone_loss
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # without the mask the row is one document: the test can fail
        assert abs(model(x, y)[1].item() * 20 - alone_loss) > 1e-3 * alone_loss


def test_data_without_eot_refused():
    cfg = train.Config(doc_mask=True, data_dir="d", dataset="x")
    for header in ({"vocab_size": 64}, {"eot_token": -1, "vocab_size": 64}, {"eot_token": 64, "vocab_size": 64}):
        with pytest.raises(train.UserError, match=r"doc_mask=True .* eot_token=.*set doc_mask=False"):
            train.data_eot(cfg, header)
    assert train.data_eot(cfg, {"eot_token": 63, "vocab_size": 64}) == 63


# --------------------------------------------------------------------------- layouts == one process
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with doc_mask=True (validation too), and one without, which must differ."""
    base = tmp_path_factory.mktemp("docmask")
    write_docs(str(base / "data"))
    args = dict(dataset="docs", eval_interval=2)
    run_ok(tiny_args(base, out_dir=str(base / "single"), doc_mask=True, **args))
    run_ok(tiny_args(base, out_dir=str(base / "unmasked"), **args))
    for key in ("loss", "val_loss"):
        masked, unmasked = losses(str(base / "single"), key), losses(str(base / "unmasked"), key)
        assert all(abs(masked[s] - unmasked[s]) > 1e-4 for s in masked), (key, masked, unmasked)
    return base


@pytest.mark.parametrize("layout", [dict(zero=2), dict(tp=2, sequence_parallel=True), dict(pp=2)],
                         ids=["dp2-zero2", "tp2-sp", "pp2"])
def test_doc_mask_layouts_equal_one_process(single, layout):
    out = single / "-".join(f"{k}{v}" for k, v in layout.items())
    run_ok(tiny_args(single, out_dir=str(out), dataset="docs", eval_interval=2, doc_mask=True, **layout), nproc=2)
    assert_same_run(str(out), str(single / "single"))
    ref, got = losses(str(single / "single"), "val_loss"), losses(str(out), "val_loss")
    assert ref.keys() == got.keys() and all(abs(ref[s] - got[s]) < 1e-5 * ref[s] for s in ref), (ref, got)


def test_compiled_flash_with_doc_ids_matches_eager():
    """train.py --compile=True --doc_mask=True with attn_impl="flash": the whole forward, document
    masks included, traces with no graph break (fullgraph) and gives eager's loss and gradients."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                    multiple_of=16, max_seq_len=32, attn_impl="flash"))
    x = torch.from_numpy(doc_stream(2 * 24, np.random.default_rng(0), mean_len=5)).view(2, 24)
    y, doc_ids = torch.roll(x, -1, 1), train.document_ids(x, EOT)
    assert doc_ids.max() >= 2
    results = []
    for m in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad(set_to_none=True)
        loss = m(x, y, doc_ids=doc_ids)[1]
        loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters()]))
    (loss, grads), (closs, cgrads) = results
    assert abs(closs - loss) < 1e-5 * loss
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
