"""prepare.Tokenizer on Hugging Face tokenizer directories of both families (byte-level BPE is
covered on SmolLM2 in test_published.py; here a SentencePiece-style Metaspace BPE with byte
fallback and BOS, as Llama 2 / TinyLlama), and the tokenizer.json export of tiktoken encodings,
each checked against transformers' AutoTokenizer: same ids, same text, exact bytes."""
import json
import os
import sysconfig

import numpy as np
import pytest
import tiktoken

import prepare
from prepare import DataError, get_tokenizer, same_tokenizer

TEXT = open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8").read()
ODD = [" leading space", "naïve café 🙂 中文 ÿ", "tabs\tand\nnew lines\n\n", "x"]
SPECIAL_TEXT = "<s> and </s> are ordinary text in a document"


def metaspace_dir(path, add_bos_token=True):
    """A Llama-2-style tokenizer.json: normalizer prepends "▁" and turns spaces into "▁", BPE with
    byte fallback (<0x00>..<0xFF>), <s> added by the post-processor, decoder that strips the
    dummy prefix; trained on LICENSE.txt."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(TEXT.split("\n\n"), trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                                                  show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    os.makedirs(path, exist_ok=True)
    t = json.loads(tk.to_str())  # the byte tokens are vocabulary, as in Llama's file, not added tokens
    t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] in ("<unk>", "<s>", "</s>")]
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(t, f)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
           "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                            "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


def test_metaspace_byte_fallback_tokenizer_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = metaspace_dir(tmp_path / "sp")
    tok, theirs = get_tokenizer(f"hf:{d}"), transformers.AutoTokenizer.from_pretrained(d)
    assert (tok.bos, tok.eos, tok.add_bos, tok.prefix_space) == (1, 2, True, True)
    assert tok.token_bytes[3 + 0x0A] == b"\n" and tok.token_bytes[1] == b""  # byte fallback, special
    for text in ODD + [TEXT[:2000]]:
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert [tok.bos] + ids == theirs(text)["input_ids"]  # documents start with BOS, as transformers'
        assert tok.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
        assert "".join(tok.decode_stream(ids, at_start=True)) == text  # streaming: same text
        doc = [tok.bos] + ids  # bits per byte: the dummy prefix "▁" is not in the text
        assert tok.count_bytes(np.array(doc[:-1]), np.array(doc[1:])) == len(text.encode())
    assert prepare.encode_docs(["a b", ""], tok)[0].tolist() == [1] + tok.encode("a b") + [2]
    # special-token text: ordinary text in documents, special only where asked (a typed prompt)
    assert 1 not in tok.encode(SPECIAL_TEXT) and tok.decode(tok.encode(SPECIAL_TEXT)) == SPECIAL_TEXT
    assert tok.encode(SPECIAL_TEXT, allow_special=True) == theirs(SPECIAL_TEXT, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=False) == "<s>[user] hi</s>[assistant]"


def test_bos_from_the_post_processor_and_a_saved_copy_keeps_identity(tmp_path):
    d = metaspace_dir(tmp_path / "sp", add_bos_token=None)  # no add_bos_token: the post-processor says
    tok = get_tokenizer(f"hf:{d}")
    assert tok.add_bos and tok.bos == 1 and tok.name == "hf:sp"
    tok.save(str(tmp_path / "copy"))
    copy = get_tokenizer(f"hf:{tmp_path / 'copy'}")
    assert copy.identity() == tok.identity() and (copy.bos, copy.eos, copy.add_bos) == (1, 2, True)
    # a changed vocabulary is a different tokenizer, whatever its name
    t = json.load(open(os.path.join(d, "tokenizer.json")))
    a, b = list(t["model"]["vocab"])[300:302]
    t["model"]["vocab"][a], t["model"]["vocab"][b] = t["model"]["vocab"][b], t["model"]["vocab"][a]
    os.makedirs(tmp_path / "other" / "sp")
    json.dump(t, open(tmp_path / "other" / "sp" / "tokenizer.json", "w"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, open(tmp_path / "other" / "sp" / "tokenizer_config.json", "w"))
    other = get_tokenizer(f"hf:{tmp_path / 'other' / 'sp'}")
    assert other.name == tok.name and not same_tokenizer(other.identity(), tok.identity())
    with pytest.raises(DataError, match="no chat template"):
        other.render_chat([{"role": "user", "content": "hi"}])


def test_missing_files_and_unknown_names_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json does not exist"):
        get_tokenizer(f"hf:{tmp_path}")
    with pytest.raises(DataError, match="hf:DIR"):
        get_tokenizer("llama")
    os.makedirs(tmp_path / "noeos")
    metaspace_dir(tmp_path / "noeos")
    json.dump({}, open(tmp_path / "noeos" / "tokenizer_config.json", "w"))
    with pytest.raises(DataError, match="no eos token id"):
        get_tokenizer(f"hf:{tmp_path / 'noeos'}")


def toy_encoding():
    """A GPT-2-style tiktoken encoding (GPT-2's regex, byte-level BPE ranks learned on LICENSE.txt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    u2b = {c: b for b, c in prepare._byte_to_unicode().items()}
    ranks = {bytes(u2b[c] for c in piece): i for piece, i in tk.get_vocab().items()}
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("toy", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})


@pytest.mark.parametrize("which", ["byte", "gpt2-style"])
def test_tiktoken_export_loads_in_transformers_with_the_same_ids(which, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = get_tokenizer("byte") if which == "byte" else prepare._tiktoken_tokenizer(toy_encoding())
    tok.save(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ODD + TEXT.split("\n")[:300]:
        assert theirs(text)["input_ids"] == tok.encode(text), text
        assert theirs.decode(tok.encode(text)) == text
    assert theirs.eos_token_id == tok.eos and theirs("<|endoftext|>")["input_ids"] == [tok.eos]
    assert get_tokenizer(f"hf:{tmp_path}").identity() == tok.identity()  # the same ids mean the same text


def test_token_file_header_records_identity_and_old_files_still_load(tmp_path):
    tok = get_tokenizer("byte")
    (tmp_path / "a.txt").write_text("one document\n\nanother\n", encoding="utf-8")
    out = prepare.prepare(name="x", source=str(tmp_path / "a.txt"), tokenizer="byte", data_dir=str(tmp_path),
                          sample_by="paragraph", val_fraction=0.5, num_proc=1, quiet=True)
    _, header = prepare.load_tokens(os.path.join(out, "train.bin"))
    assert header["tokenizer"] == "byte" and header["tokenizer_sha"] == tok.sha
    prepare.write_tokens(str(tmp_path / "old.bin"), [1, 2, 3], "byte", 257, 256)  # as before identities
    _, old = prepare.load_tokens(str(tmp_path / "old.bin"))
    assert "tokenizer_sha" not in old
    assert same_tokenizer({"name": old["tokenizer"], "sha": None}, tok.identity())  # by name
    assert not same_tokenizer({"name": "gpt2", "sha": None}, tok.identity())
