"""finetune.py: the chat data and its loss mask, LoRA (B = 0, merge, PEFT's format loaded by peft,
only adapters change), every layout against one process, and LoRA learning a task SmolLM2-135M
does not solve."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from util import ROOT, assert_same_run, final_params

import finetune  # noqa: E402
import prepare  # noqa: E402
import parallel  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16)


def write_chat(path, n=64, seed=0):
    """Additions in both accepted forms, a third of them with a system message."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(v) for v in rng.integers(0, 10, 2))
            if i % 2:
                f.write(json.dumps({"prompt": f"{a}+{b}", "response": str(a + b)}) + "\n")
            else:
                sys_msg = [{"role": "system", "content": "sum"}] if i % 3 == 0 else []
                f.write(json.dumps({"messages": sys_msg + [{"role": "user", "content": f"{a}+{b}"},
                                                           {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return str(path)


def args(tmp_path, **kw):
    cfg = dict(out_dir=str(tmp_path / "out"), data=str(tmp_path / "chat.jsonl"), tokenizer="byte", device="cpu",
               dtype="float32", **TINY, block_size=64, batch_size=8, micro_batch_size=2, max_iters=4,
               learning_rate=1e-2, min_lr=1e-3, warmup_iters=1, lr_decay_iters=8, log_interval=1,
               eval_interval=1000, eval_iters=2, checkpoint_interval=1000, seed=3)
    cfg.update(kw)
    return [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in cfg.items()]


def run_finetune(argv, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    r = subprocess.run(launcher + [os.path.join(ROOT, "finetune.py")] + argv, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    return r


def ok(argv, nproc=1):
    r = run_finetune(argv, nproc)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def data(tmp_path):
    write_chat(tmp_path / "chat.jsonl")
    return tmp_path


# --------------------------------------------------------------------------- data and the loss mask
def test_assistant_mask_smollm2(smollm2_dir):
    """The mask covers the assistant's content and the template's end of turn, nothing else; the
    prompt's tokens are those sample.py --chat feeds the model."""
    tok = prepare.get_tokenizer(f"hf:{smollm2_dir}")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4+4?"},
            {"role": "assistant", "content": "8"}]
    ids, mask = finetune.tokenize_conversation(tok, msgs, "test")
    text = lambda ids: b"".join(tok.special[i].encode() if i in tok.special else tok.token_bytes[i]
                                for i in ids.tolist()).decode()  # special tokens as written
    assert text(ids) == tok.render_chat(msgs, add_generation_prompt=False)
    assert text(ids[mask]) == "5<|im_end|>\n8<|im_end|>\n"
    first = tok.encode(tok.render_chat(msgs[:2]), allow_special=True)  # what sample.py --chat would feed
    assert ids[:len(first)].tolist() == first and not mask[:len(first)].any() and mask[len(first)]


def test_loss_only_on_assistant_tokens(data):
    """The masked loss and its gradients equal those of the assistant positions alone (the others
    dropped); prompt and system positions get exactly zero gradient on their logits."""
    cfg = finetune.load_config(args(data))
    sft = finetune.SFTData(cfg, prepare.get_tokenizer("byte"), 320)
    (x, y), = sft.micro_batches(cfg, 0, "train", SimpleNamespace(dp=1, dp_rank=0), torch.device("cpu"))[:1]
    assert (y == -1).any() and (y >= 0).any()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, max_seq_len=64))
    logits, loss = model(x, y)
    logits.retain_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert (logits.grad[y == -1] == 0).all() and (logits.grad[y >= 0] != 0).any()
    model.zero_grad()
    logits = model(x)[0]
    keep = y >= 0
    dropped = torch.nn.functional.cross_entropy(logits[keep], y[keep])  # only the assistant positions
    dropped.backward()
    torch.testing.assert_close(loss, dropped)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    # what the mask keeps: the answers' bytes, the eos that ends the turn and the template's newline
    text = [bytes(t for t in y[r][y[r] >= 0].tolist() if t < 256).decode() for r in range(len(y))]
    assert all(t[:-1].isdigit() and t[-1] == "\n" for t in text), text
    assert all((y[r] == 256).sum() == 1 for r in range(len(y)))


@pytest.mark.parametrize("line, expect", [
    ("{not json", "line 2: not JSON"),
    ('{"text": "hi"}', "line 2: expected an object with 'messages' or with 'prompt' and 'response'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
    ('{"messages": [{"role": "user"}]}', "line 2: messages must be a list of"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, expect):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    r = run_finetune(args(tmp_path, max_iters=1))
    assert r.returncode == 2 and f"error: {path}, {expect}" in r.stderr and "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- LoRA
def tiny_lora(cfg_kw=None):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, max_seq_len=64)).eval()
    cfg = finetune.load_config(["--data=x", "--lora_rank=4", "--lora_alpha=8", *(cfg_kw or [])])
    return model, cfg


def test_lora_starts_at_the_base_and_merges_exactly():
    model, cfg = tiny_lora()
    x = torch.randint(0, 320, (2, 16))
    base = model(x)[0].detach()
    finetune.add_lora(model, cfg)
    torch.testing.assert_close(model(x)[0], base, rtol=0, atol=0)  # B = 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"layers.{i}.{m}.{w}.lora_{ab}" for i in range(2) for m, w in
         [("attention", "wq"), ("attention", "wk"), ("attention", "wv"), ("attention", "wo"),
          ("feed_forward", "w1"), ("feed_forward", "w2"), ("feed_forward", "w3")] for ab in "AB"}
    with torch.no_grad():
        for m in finetune.lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
    adapted = model(x)[0].detach()
    assert (adapted - base).abs().max() > 1e-2
    finetune.merge_lora(model)
    assert not finetune.lora_modules(model)
    torch.testing.assert_close(model(x)[0], adapted, rtol=1e-5, atol=1e-5)


def tiny_hf(tmp_path):
    torch.manual_seed(1)
    d = str(tmp_path / "base")
    Transformer(ModelConfig(**TINY, max_seq_len=64)).save_hf(d)
    return d


def test_lora_run_peft_and_export(data):
    """A LoRA run changes only adapters; peft loads its adapter directory onto transformers' base model
    with our logits; the exported merged directory gives the same logits in transformers."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_hf(data)
    r = ok(args(data, init_from=f"hf:{base}", lora_rank=4, lora_alpha=8.0, lora_targets="q,v,o,gate,down",
                lora_dropout=0.1))
    assert "trainable of" in r.stdout and "optimizer state" in r.stdout
    after = final_params(str(data / "out"))
    before = Transformer.from_hf(base).state_dict()
    for k, v in after.items():
        if "lora_" in k:
            continue
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in after.items())
    cfg = finetune.load_config(args(data, init_from=f"hf:{base}", lora_rank=4, lora_alpha=8.0,
                                    lora_targets="q,v,o,gate,down"))
    import checkpoint
    ours = finetune.load_finetuned(checkpoint.latest(cfg.out_dir), cfg).eval()
    x = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        want = ours(x)[0]
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        adapter = peft.PeftModel.from_pretrained(hf_base, str(data / "out" / "adapter")).eval()
        torch.testing.assert_close(adapter(x).logits, want, rtol=1e-4, atol=1e-4)
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(data / "out" / "hf"), dtype=torch.float32)
        torch.testing.assert_close(merged.eval()(x).logits, want, rtol=1e-4, atol=1e-4)
    conf = json.load(open(data / "out" / "adapter" / "adapter_config.json"))
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0 and \
        sorted(conf["target_modules"]) == ["down_proj", "gate_proj", "o_proj", "q_proj", "v_proj"]


def test_lora_refuses_shared_kv_heads_under_tp(data):
    r = run_finetune(args(data, lora_rank=4, n_kv_heads=1, tp=2), nproc=2)
    assert r.returncode != 0 and "error: lora_targets=" in r.stderr and "LoRA on kv heads that several tp ranks share" in r.stderr, r.stderr  # torchrun exits 1 when a rank exits 2


# --------------------------------------------------------------------------- layouts
SLOW = pytest.mark.slow  # the stage between two that run by default


@pytest.mark.parametrize("extra", [dict(lora_rank=4), dict(), pytest.param(dict(zero=1), marks=SLOW), dict(zero=3),
                                   dict(lora_rank=4, zero=1), pytest.param(dict(lora_rank=4, zero=2), marks=SLOW),
                                   dict(lora_rank=4, zero=3), dict(lora_rank=4, pp=2, pack=True, block_size=160),
                                   dict(lora_rank=4, tp=2), dict(lora_rank=4, tp=2, sequence_parallel=True, zero=1),
                                   dict(tp=2, sequence_parallel=True, pack=True, block_size=160)],
                         ids=["lora-dp2", "full-dp2", "full-zero1", "full-zero3", "lora-zero1", "lora-zero2",
                              "lora-zero3", "lora-pp2-packed", "lora-tp2", "lora-tp2-sp-zero1", "full-tp2-sp-packed"])
def test_layout_equals_one_process(data, extra):
    ref = ok(args(data, out_dir=str(data / "ref"), **{**extra, "zero": 0, "tp": 1, "pp": 1}))  # one process
    ok(args(data, out_dir=str(data / "dp2"), **extra), nproc=2)
    assert_same_run(str(data / "dp2"), str(data / "ref"))
    assert "val loss" in ref.stdout


# --------------------------------------------------------------------------- packing with document masking
@pytest.mark.parametrize("impl, ck", [("math", "none"), ("math", "full"), ("sdpa", "none"), ("sdpa", "full"),
                                      ("flash", "none")])
def test_packed_rows_equal_one_conversation_per_row(impl, ck):
    """Three documents packed in one row (plus padding) give each document's logits, and the summed
    loss the same gradients, as the documents alone in rows of their own."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, max_seq_len=32, attn_impl=impl, activation_checkpointing=ck))
    docs = [torch.randint(0, 320, (n,)) for n in (7, 12, 5)]
    targets = [torch.where(torch.rand(len(d)) < 0.5, torch.randint(0, 320, (len(d),)), -1) for d in docs]
    x = torch.cat(docs + [torch.zeros(4, dtype=torch.long)])[None]  # 24 + 4 padding tokens
    y = torch.cat(targets + [torch.full((4,), -1)])[None]
    doc_ids = torch.tensor([0] * 7 + [1] * 12 + [2] * 5 + [9] * 4)[None]
    logits = model(x, doc_ids=doc_ids)[0]
    sum_loss = lambda lg, t: torch.nn.functional.cross_entropy(lg.flatten(0, 1), t.flatten(), ignore_index=-1,
                                                               reduction="sum")
    sum_loss(logits, y).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    start = 0
    for d, t in zip(docs, targets):
        alone = model(d[None])[0]
        torch.testing.assert_close(logits[0, start:start + len(d)], alone[0], rtol=1e-5, atol=1e-5)
        sum_loss(alone, t[None]).backward()
        start += len(d)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    # without the document mask the second document sees the first: the test can fail
    assert not torch.allclose(model(x)[0][0, 7:19], model(docs[1][None])[0][0], atol=1e-3)


def test_pack_run_dp2_equals_one_process(data):
    """pack=True trains through train.py's loop (x, y, doc_ids micro-batches), under dp=2 as in one process."""
    r = ok(args(data, out_dir=str(data / "ref"), pack=True, lora_rank=4, block_size=160))
    assert "25 train / 1 val packed rows" in r.stdout  # 61 and 3 conversations: packing happened
    ok(args(data, out_dir=str(data / "dp2"), pack=True, lora_rank=4, block_size=160), nproc=2)
    assert_same_run(str(data / "dp2"), str(data / "ref"))


# --------------------------------------------------------------------------- a real model learns a task
CODES = {"zorblat": "crimson", "quimbex": "falcon", "drellix": "granite", "vostrel": "lantern",
         "pliskar": "meadow", "thrunge": "copper", "weskolm": "harbor", "grafnix": "violet"}


def masked_loss_and_accuracy(model, data, tok):
    """Mean loss on the assistant tokens of the held-out rows, and the share of them whose greedy
    answer (up to the end of turn) is exactly right."""
    total, n, right = 0.0, 0, 0
    with torch.no_grad():
        for x, y, _ in data.rows["val"]:
            x, y = torch.from_numpy(x)[None], torch.from_numpy(y)[None]
            logits = model(x)[0]
            keep = y >= 0
            total += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            n += int(keep.sum())
            start = int(keep[0].nonzero()[0])  # the prompt ends here; generate greedily from it
            ids = x[:, :start + 1]
            for _ in range(6):
                nxt = model(ids)[0][0, -1].argmax()
                if int(nxt) in tok.stop_ids:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
            want = tok.decode([t for t in y[keep].tolist() if t not in tok.stop_ids]).strip()
            right += tok.decode(ids[0, start + 1:].tolist()).strip() == want
    return total / n, right / len(data.rows["val"])


def test_lora_learns_code_words_smollm2(smollm2_dir, tmp_path, capsys):
    """50 LoRA steps on SmolLM2-135M-Instruct: made-up code words -> answers, asked one way in training
    and another in the held-out split. The held-out response loss falls by >= 30% and the exact-match
    accuracy rises (the base model cannot know the words)."""
    path = tmp_path / "codes.jsonl"
    ask = ["What does the code word {} mean?", "Decode {}.", "Code word {}: what is it?", "Translate the code word {}."]
    held = "Tell me the meaning of the code word {}."
    with open(path, "w") as f:
        for i in range(160):
            word = list(CODES)[i % len(CODES)]
            q = held if prepare.is_val(i, 0.05) else ask[(i // len(CODES)) % len(ask)]
            f.write(json.dumps({"system": "Decode.", "prompt": q.format(word), "response": CODES[word]}) + "\n")
    cfg = finetune.load_config(["configs/sft_smollm2.py", f"--init_from=hf:{smollm2_dir}", f"--data={path}",
                                f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--dtype=float32", "--block_size=40",
                                "--batch_size=4", "--micro_batch_size=4", "--max_iters=50", "--warmup_iters=5",
                                "--lr_decay_iters=50", "--learning_rate=2e-3", "--min_lr=2e-4", "--lora_rank=8",
                                "--lora_alpha=16", "--lora_dropout=0.0", "--eval_iters=1", "--eval_interval=1000",
                                "--checkpoint_interval=1000", "--log_interval=10"])
    tok = prepare.get_tokenizer(f"hf:{smollm2_dir}")
    data = finetune.SFTData(cfg, tok, 49152)
    assert len(data.rows["val"]) == 8 and "0 cut" in data.summary  # short rows: ~90 s on two CPU cores
    base = Transformer.from_hf(smollm2_dir).eval()
    loss0, acc0 = masked_loss_and_accuracy(base, data, tok)
    finetune.finetune(cfg)
    tuned = Transformer.from_hf(str(tmp_path / "out" / "hf")).eval()
    loss1, acc1 = masked_loss_and_accuracy(tuned, data, tok)
    print(f"held-out response loss {loss0:.3f} -> {loss1:.3f}, exact match {acc0:.0%} -> {acc1:.0%}")
    assert loss1 <= 0.7 * loss0 and acc1 > acc0, (loss0, loss1, acc0, acc1)
    import sample  # the exported directory chats with its own template (and the default system prompt)
    capsys.readouterr()
    sample.main(["--init_from", f"hf:{tmp_path / 'out' / 'hf'}", "--chat", "--start", held.format("zorblat"),
                 "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("crimson")


def test_bench_finetune_smoke(capsys):
    """bench_finetune.py's four rows on the tiny shape: each trains only what it should."""
    import bench_finetune
    rows = {r["name"]: r for r in bench_finetune.main(["--shape=tiny", "--steps=1"])}
    assert set(rows) == {"ours_lora", "hf_lora", "ours_full", "hf_full"}
    assert rows["ours_lora"]["trainable"] == rows["hf_lora"]["trainable"] < rows["ours_full"]["trainable"]
    assert rows["ours_full"]["trainable"] == rows["hf_full"]["trainable"]
    assert all(r["tokens_per_s"] > 0 for r in rows.values())


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_optimizer_holds_only_the_adapters(stage):
    """ZeroAdamW's units, master weights and moments cover the LoRA parameters alone; the frozen
    base stays whole and unchanged by a step."""
    import train
    import zero
    model, cfg = tiny_lora()
    finetune.add_lora(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    zcfg = train.load_config([f"--zero={stage}", "--device=cpu"])
    opt = zero.ZeroAdamW(model, zcfg, parallel.Mesh(), torch.float32)
    names = {n for u in opt.units for n in u.names}
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == adapters and opt.master.numel() == opt.exp_avg.numel() < 2 * sum(
        p.numel() for n, p in model.named_parameters() if n in adapters) + 64 * len(opt.units)
    model.train()
    model(torch.randint(0, 320, (2, 16)), torch.randint(0, 320, (2, 16)))[1].backward()
    model.grad_sync.finish()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p.detach(), frozen[n], rtol=0, atol=0)
