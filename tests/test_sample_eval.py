"""sample.py and eval_ppl.py on a tiny byte-tokenizer checkpoint (CPU, float32).

Sampling: greedy is deterministic and equals the argmax of a full forward re-run at every
step; top_k=1 / tiny top_p equal greedy; top-k and top-p keep the right tokens; generation
stops at the end-of-text token and at max_seq_len. Perplexity: eval_ppl's NLL equals a
direct log-softmax computation on the same windows, and its sliding-window result equals
the transformers perplexity guide's loop run on LlamaForCausalLM with the same weights.
"""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import tiktoken
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval_ppl  # noqa: E402
import sample  # noqa: E402
from checkpoint import commit, temp_dir, write_files  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from prepare import _tiktoken_tokenizer, get_tokenizer, write_tokens  # noqa: E402

MAX_LEN = 64
TEXT = ("The quick brown fox jumps over the lazy dog. Perplexity is the exponential of the mean "
        "negative log-likelihood; the thin thread of the theory, na\u00efve caf\u00e9 \u00fcber "
        "\u4e2d\u6587 \U0001F600, then the end.\n") * 2


def run(script, *args):
    """Run a script; stdout/stderr decoded as UTF-8 without newline translation (tokens may be '\\r')."""
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, timeout=180,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A committed checkpoint of a tiny model whose vocabulary (264) pads the byte tokenizer's 257,
    with weights large enough that its distributions are peaked (no near-ties for argmax)."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, ffn_dim=128,
                      max_seq_len=MAX_LEN, attn_impl="math")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    out = tmp_path_factory.mktemp("out")
    write_files(temp_dir(out, 7), {"model.pt": {"model_config": asdict(cfg), "state_dict": model.state_dict(),
                                                "tokenizer": "byte"}})
    commit(out, 7)
    return str(out), model


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer("byte")


def greedy_by_full_forward(model, prompt, n, vocab_limit):
    """Reference: re-run the whole sequence each step, no cache, argmax over real tokens."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0][0, -1, :vocab_limit]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


# --------------------------------------------------------------------------- sampling
def test_checkpoint_loads_with_its_tokenizer(ckpt, enc):
    out, model = ckpt
    loaded, tok = sample.load(out, "cpu")
    assert tok.name == "byte" and tok.eos == 256
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_greedy_is_deterministic_and_equals_full_forward_argmax(ckpt, enc):
    _, model = ckpt
    prompt = enc.encode("The quick")
    a = list(sample.generate(model, prompt, 40, temperature=0, eot=None, vocab_limit=enc.n_vocab))
    b = list(sample.generate(model, prompt, 40, temperature=0, eot=None, vocab_limit=enc.n_vocab))
    assert a == b and len(a) == 40
    assert a == greedy_by_full_forward(model, prompt, 40, enc.n_vocab)
    assert max(a) < enc.n_vocab  # padding ids of the embedding table are never produced


def test_top_k_1_and_tiny_top_p_equal_greedy(ckpt, enc):
    _, model = ckpt
    prompt = enc.encode("Perplexity")
    greedy = list(sample.generate(model, prompt, 30, temperature=0, vocab_limit=enc.n_vocab))
    g = torch.Generator().manual_seed(3)
    assert list(sample.generate(model, prompt, 30, temperature=1.0, top_k=1, generator=g,
                                vocab_limit=enc.n_vocab)) == greedy
    assert list(sample.generate(model, prompt, 30, temperature=1.0, top_p=1e-6, generator=g,
                                vocab_limit=enc.n_vocab)) == greedy


def test_same_seed_same_sample(ckpt, enc):
    _, model = ckpt
    prompt = enc.encode("the")
    draw = lambda seed: list(sample.generate(model, prompt, 40, temperature=1.5, top_k=50,
                                             generator=torch.Generator().manual_seed(seed)))
    assert draw(5) == draw(5)
    assert draw(5) != draw(6)  # temperature 1.5 over 50 tokens: 40 identical draws is ~impossible


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3, 0.0])  # ranks: 1, 3, 2, 0
    logits = probs.clamp_min(1e-12).log()
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: np.bincount([sample.sample_next(logits, generator=g, **kw) for _ in range(4000)],
                                    minlength=5) / 4000
    f = draw(top_k=2)  # {1, 3} renormalized: 0.625, 0.375
    assert f[[0, 2, 4]].sum() == 0 and abs(f[1] - 0.625) < 0.04
    f = draw(top_p=0.75)  # 0.5 < 0.75 <= 0.8: the two most likely, same as top_k=2
    assert f[[0, 2, 4]].sum() == 0 and abs(f[1] - 0.625) < 0.04
    f = draw(top_p=0.85)  # needs 0.5 + 0.3 + 0.15
    assert f[[0, 4]].sum() == 0 and abs(f[2] - 0.15 / 0.95) < 0.04
    f = draw()  # plain sampling follows the probabilities
    assert np.abs(f - probs.numpy()).max() < 0.04
    f = draw(temperature=0.5)  # p^2, renormalized
    assert np.abs(f - (probs ** 2 / (probs ** 2).sum()).numpy()).max() < 0.04


def test_stops_at_end_of_text(ckpt, enc):
    _, model = ckpt
    prompt = enc.encode("The quick")
    greedy = list(sample.generate(model, prompt, 30, temperature=0, vocab_limit=enc.n_vocab))
    k = 5
    stop = greedy[k]  # pretend this token is end-of-text: generation ends before its first appearance
    first = greedy.index(stop)
    assert list(sample.generate(model, prompt, 30, temperature=0, eot=stop, vocab_limit=enc.n_vocab)) \
        == greedy[:first]


def test_stops_at_max_seq_len_with_a_message(ckpt, enc, capsys):
    _, model = ckpt
    prompt = list(enc.encode(TEXT))[:MAX_LEN - 4]
    out = list(sample.generate(model, prompt, 20, temperature=0, vocab_limit=enc.n_vocab))
    assert len(out) == 4
    assert "max_seq_len=64" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_seq_len is 64"):
        list(sample.generate(model, list(enc.encode(TEXT))[:MAX_LEN], 5, temperature=0))


def test_stream_decodes_split_utf8(enc):
    import io
    buf = io.StringIO()
    ids = enc.encode("caf\u00e9 \U0001F600")  # byte tokens split both characters
    assert sample.stream(iter(ids), enc, out=buf) == ids
    assert buf.getvalue() == "caf\u00e9 \U0001F600"


def test_sample_cli_greedy_deterministic_and_streams_text(ckpt, enc, tmp_path, capsys):
    out, model = ckpt
    (tmp_path / "prompt.txt").write_text("The quick", encoding="utf-8")
    args = ["--init_from", out, "--start", f"FILE:{tmp_path / 'prompt.txt'}", "--max_new_tokens", "20",
            "--temperature", "0", "--num_samples", "2", "--device", "cpu"]
    r1 = run("sample.py", *args)  # once as a real command line, then in-process (faster)
    sample.main(args)
    assert capsys.readouterr().out == r1.stdout
    expected = enc.decode(greedy_by_full_forward(model, enc.encode("The quick"), 20, enc.n_vocab))
    first, second = r1.stdout.split("\n" + "-" * 40 + "\n")
    assert first == second.rstrip("\n") == "The quick" + expected
    # the same weights as a Hugging Face directory (--init_from=hf:, --tokenizer) give the same text
    model.save_hf(tmp_path / "hf")
    sample.main(["--init_from", f"hf:{tmp_path / 'hf'}", "--tokenizer", "byte"] + args[2:])
    assert capsys.readouterr().out == r1.stdout
    # sampled runs: the seed fixes the text
    args = ["--init_from", out, "--start", "the", "--max_new_tokens", "20", "--temperature", "1.0",
            "--top_p", "0.9", "--seed", "11", "--device", "cpu"]
    sample.main(args)
    a = capsys.readouterr().out
    sample.main(args)
    assert capsys.readouterr().out == a


def test_sample_cli_with_flash_attention(ckpt, enc, capsys):
    """--attn_impl=flash: the prompt's prefill through flash_attn_func (Triton's interpreter on the
    CPU), decoding through SDPA; the same greedy text as the checkpoint's math attention."""
    out, model = ckpt
    args = ["--init_from", out, "--start", "The quick", "--max_new_tokens", "4", "--temperature", "0", "--device", "cpu"]
    sample.main(args + ["--attn_impl", "flash"])
    assert capsys.readouterr().out == "The quick" + enc.decode(greedy_by_full_forward(model, enc.encode("The quick"),
                                                                                      4, enc.n_vocab)) + "\n"


@pytest.mark.parametrize("flag, value", [("--top_p", "1.5"), ("--temperature", "-1"), ("--top_k", "0")])
def test_sample_cli_rejects_bad_arguments(ckpt, flag, value):
    with pytest.raises(SystemExit, match=f"{flag}={value}"):
        sample.main(["--init_from", ckpt[0], flag, value])


# --------------------------------------------------------------------------- perplexity
def direct_nll(model, tokens, wins):
    """Sum of -log_softmax at each scored target, one window at a time, no batching."""
    total, n = 0.0, 0
    with torch.no_grad():
        for begin, end, n_ctx in wins:
            x = torch.tensor(tokens[begin:end - 1])[None]
            logp = model(x)[0][0].double().log_softmax(-1)  # (T, V)
            targets = torch.tensor(tokens[begin + 1:end])
            total -= logp[torch.arange(len(targets)), targets][n_ctx:].sum().item()
            n += len(targets) - n_ctx
    return total, n


def merge_encoding():
    """A byte-level BPE with three merges, so tokens are 1-3 bytes and bits per byte != bits per token."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({b"th": 256, b"the": 257, b"he": 258})
    return _tiktoken_tokenizer(tiktoken.Encoding("merges", pat_str=r"[\s\S]{1,4096}", mergeable_ranks=ranks,
                                                 special_tokens={"<|endoftext|>": 259}))


def test_windows_cover_each_token_once():
    n = 103
    for block, stride in [(32, 32), (32, 8), (32, 31), (10, 1)]:
        wins = eval_ppl.windows(n, block, stride)
        scored = [t for b, e, c in wins for t in range(b + 1 + c, e)]
        assert len(scored) == len(set(scored))
        assert all(e - b <= block for b, e, _ in wins) and wins[-1][1] == n
        if stride < block:  # sliding: everything after the first token, once
            assert scored == list(range(1, n))
        else:  # non-overlapping (the guide's): the first token of each window is context only
            assert scored == [t for t in range(n) if t % block]


@pytest.mark.parametrize("block, stride", [(32, None), (32, 12), (64, 64)])
def test_eval_nll_equals_direct_computation(ckpt, block, stride):
    _, model = ckpt
    enc = merge_encoding()
    tokens = enc.encode(TEXT)
    r = eval_ppl.evaluate(model, tokens, block, stride, batch_size=3, count_bytes=enc.count_bytes, progress=False)
    wins = eval_ppl.windows(len(tokens), block, stride or block)
    nll_sum, n = direct_nll(model, tokens, wins)
    assert r["tokens"] == n and r["windows"] == len(wins)
    assert abs(r["nll_nats"] - nll_sum / n) < 1e-5 * nll_sum / n
    assert math.isclose(r["nll_bits"], r["nll_nats"] / math.log(2), rel_tol=1e-12)
    assert math.isclose(r["ppl"], math.exp(r["nll_nats"]), rel_tol=1e-12)
    assert math.isclose(r["ppl"], 2 ** r["nll_bits"], rel_tol=1e-9)  # PPL = exp(NLL) = 2^H
    # bytes: the text's UTF-8 bytes minus those of the tokens that were context only
    scored = {t for b, e, c in wins for t in range(b + 1 + c, e)}
    unscored_bytes = sum(len(enc.token_bytes[tokens[i]]) for i in range(len(tokens)) if i not in scored)
    assert r["bytes"] == len(TEXT.encode("utf-8")) - unscored_bytes
    assert len(tokens) < r["bytes"]  # the merges make some tokens longer than a byte
    assert math.isclose(r["bits_per_byte"], nll_sum / math.log(2) / r["bytes"], rel_tol=1e-5)
    # batching (with a shorter last window padded) changes nothing
    r1 = eval_ppl.evaluate(model, tokens, block, stride, batch_size=1, count_bytes=enc.count_bytes, progress=False)
    assert math.isclose(r1["nll_nats"], r["nll_nats"], rel_tol=1e-6)


@pytest.mark.parametrize("stride", [8, 32])
def test_sliding_window_equals_transformers_guide_loop(ckpt, tmp_path, stride):
    """The loop of the transformers perplexity guide, on LlamaForCausalLM with our weights.
    One difference, on purpose: the guide weights each window's mean loss by
    num_valid_tokens - 1 ('internal label shift'), but once a window has context (labels
    start with -100) the shift drops no valid label, so its real count is num_valid_tokens.
    We count the labels the loss actually averaged over, which gives the exact per-token mean;
    with stride = max_length (no context) both counts agree."""
    transformers = pytest.importorskip("transformers")
    _, model = ckpt
    model.save_hf(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                       dtype=torch.float32).eval()
    enc = get_tokenizer("byte")
    input_ids = torch.tensor([enc.encode(TEXT[:200])])
    max_length, seq_len = 32, input_ids.size(1)

    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf(ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()  # the guide: num_valid - batch_size
        if stride == max_length:
            assert num_loss_tokens == (target_ids != -100).sum().item() - 1
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    guide_nll = nll_sum / n_tokens

    r = eval_ppl.evaluate(model, input_ids[0].numpy(), max_length, stride, batch_size=4, progress=False)
    assert r["tokens"] == n_tokens
    assert abs(r["nll_nats"] - guide_nll) / guide_nll < 1e-5
    assert abs(r["ppl"] - math.exp(guide_nll)) / math.exp(guide_nll) < 1e-5


def eval_main(capsys, *args):
    eval_ppl.main([*args, "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_cli_json_on_text_and_token_file(ckpt, enc, tmp_path, capsys):
    out, model = ckpt
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    r = run("eval_ppl.py", "--init_from", out, "--text", str(tmp_path / "t.txt"), "--block_size", "32",
            "--stride", "16", "--json", "--device", "cpu")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = enc.encode(TEXT)
    ref = eval_ppl.evaluate(model, tokens, 32, 16, progress=False)
    assert got["tokens"] == ref["tokens"] == len(tokens) - 1
    assert math.isclose(got["nll_nats"], ref["nll_nats"], rel_tol=1e-6)
    assert got["bytes"] == len(TEXT.encode("utf-8")) - 1  # byte tokens: every scored token is a byte
    assert math.isclose(got["bits_per_byte"], got["nll_bits"], rel_tol=1e-9)
    assert got["tokenizer"] == "byte" and "windows" in r.stderr  # the tqdm bar
    # a prepared token file, two documents with end-of-text after each (0 bytes), and the
    # data/<dataset>/<split>.bin shortcut to the same file
    docs = [enc.encode(TEXT[:150]) + [enc.eos], enc.encode(TEXT[150:]) + [enc.eos]]
    ids = docs[0] + docs[1]
    write_tokens(str(tmp_path / "data" / "mini" / "val.bin"), ids, "byte", enc.n_vocab, enc.eos)
    got = eval_main(capsys, "--init_from", out, "--tokens", str(tmp_path / "data" / "mini" / "val.bin"),
                    "--block_size", "64")
    ref = eval_ppl.evaluate(model, ids, 64, None, progress=False)
    assert got["tokens"] == ref["tokens"] and math.isclose(got["nll_nats"], ref["nll_nats"], rel_tol=1e-6)
    scored = [ids[t] for b, e, c in eval_ppl.windows(len(ids), 64, 64) for t in range(b + 1 + c, e)]
    assert got["bytes"] == sum(1 for t in scored if t != enc.eos)
    got2 = eval_main(capsys, "--init_from", out, "--dataset", "mini", "--split", "val", "--data_dir",
                     str(tmp_path / "data"), "--block_size", "64")
    assert got2["nll_nats"] == got["nll_nats"]
    got3 = eval_main(capsys, "--init_from", out, "--dataset", "mini", "--data_dir", str(tmp_path / "data"),
                     "--block_size", "64", "--max_tokens", "100")
    assert got3["tokens"] == 100 - 2  # windows [0, 64) and [64, 100), first token of each unscored


def test_eval_rejects_bad_windows_and_offline_tokenizer(ckpt, tmp_path):
    out, model = ckpt
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(SystemExit, match="block_size=128.*max_seq_len=64"):
        eval_ppl.main(["--init_from", out, "--text", str(tmp_path / "t.txt"), "--block_size", "128"])
    with pytest.raises(ValueError, match="stride=40"):
        eval_ppl.evaluate(model, list(range(100)), 32, 40, progress=False)
    with pytest.raises(SystemExit, match="no checkpoint in"):
        eval_ppl.main(["--init_from", str(tmp_path / "empty"), "--text", str(tmp_path / "t.txt")])
    with pytest.raises(SystemExit, match="missing.bin does not exist"):
        eval_ppl.main(["--init_from", out, "--tokens", str(tmp_path / "missing.bin")])
    # an hf: model with a tokenizer whose files tiktoken cannot fetch offline: say so
    model.save_hf(tmp_path / "hf")
    try:
        get_tokenizer("cl100k_base")
        pytest.skip("cl100k_base is cached here, so the offline error cannot be shown")
    except ValueError:
        pass
    with pytest.raises(SystemExit, match="cl100k_base.*TIKTOKEN_CACHE_DIR"):
        eval_ppl.main(["--init_from", f"hf:{tmp_path / 'hf'}", "--tokenizer", "cl100k_base",
                       "--text", str(tmp_path / "t.txt")])


def test_chat_without_template_and_data_of_another_tokenizer_refused(ckpt, tmp_path):
    out, _ = ckpt
    with pytest.raises(SystemExit, match="--chat: tokenizer byte has no chat template"):
        sample.main(["--init_from", out, "--chat", "--start", "hi", "--max_new_tokens", "1"])
    # a token file whose header names another tokenizer (it once crashed with an IndexError)
    other = merge_encoding()
    path = str(tmp_path / "merges.bin")
    write_tokens(path, other.encode(TEXT), other.name, other.n_vocab, other.eos, tokenizer_sha=other.sha)
    with pytest.raises(SystemExit, match="merges.bin was tokenized with 'merges'.*'byte'.*--tokenizer=byte"):
        eval_ppl.main(["--init_from", out, "--tokens", path])
    # --tokenizer that is not the checkpoint's
    with pytest.raises(SystemExit, match="--tokenizer=cl100k_base|cl100k_base.*TIKTOKEN_CACHE_DIR"):
        sample.main(["--init_from", out, "--tokenizer", "cl100k_base"])
    # no data flag: the run's own validation split, from the config it saved (this one saved none)
    with pytest.raises(SystemExit, match="train_state.pt"):
        eval_ppl.main(["--init_from", out])
