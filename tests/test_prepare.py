"""prepare.py: .bin format and its checks, the byte tokenizer, pystdlib and local-file sources."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402
from prepare import DataError, get_tokenizer, load_tokens, write_tokens  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 256


def split_docs(tokens, eot=EOT):
    """doc1 <eot> doc2 <eot> ... -> [doc1, doc2, ...]; asserts the stream ends with <eot>."""
    tokens = np.asarray(tokens)
    assert len(tokens) == 0 or tokens[-1] == eot
    ends = np.flatnonzero(tokens == eot)
    return [tokens[a + 1 if i else 0:b] for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


def byte_ids(text):
    return list(text.encode("utf-8"))


# --------------------------------------------------------------------------- .bin format
@pytest.mark.parametrize("vocab_size,dtype", [(257, np.uint16), (65536, np.uint16), (100277, np.uint32)])
def test_write_load_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, vocab_size, size=n) for n in (5, 0, 1000, 17)]
    path = str(tmp_path / "x.bin")
    n = write_tokens(path, iter(chunks), "tok", vocab_size, eot=vocab_size - 1)
    tokens, header = load_tokens(path, expected_vocab_size=vocab_size)
    assert n == 1022 == len(tokens)
    assert tokens.dtype == dtype and tokens.ndim == 1
    np.testing.assert_array_equal(tokens, np.concatenate(chunks))
    assert header == dict(dtype=np.dtype(dtype).name, tokenizer="tok", vocab_size=vocab_size,
                          num_tokens=1022, eot_token=vocab_size - 1)
    # layout: 256-byte header, magic, int32 version, then raw little-endian ids
    raw = open(path, "rb").read()
    assert raw[:8] == b"LLAMATOK" and int.from_bytes(raw[8:12], "little") == 1
    assert len(raw) == 256 + 1022 * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(np.frombuffer(raw[256:], dtype=np.dtype(dtype).newbyteorder("<")), tokens)
    assert not os.path.exists(path + ".tmp")


def test_write_flat_list_and_empty(tmp_path):
    write_tokens(str(tmp_path / "a.bin"), [1, 2, 3], "byte", 257, 256)
    assert load_tokens(str(tmp_path / "a.bin"))[0].tolist() == [1, 2, 3]
    write_tokens(str(tmp_path / "e.bin"), [], "byte", 257, 256)
    tokens, header = load_tokens(str(tmp_path / "e.bin"))
    assert len(tokens) == 0 and header["num_tokens"] == 0


def test_write_rejects_out_of_vocab_ids(tmp_path):
    with pytest.raises(DataError, match="257"):
        write_tokens(str(tmp_path / "a.bin"), [1, 257], "byte", 257, 256)


def test_wrong_magic_rejected(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"NOTATOKF" + b"\0" * 300)
    with pytest.raises(DataError) as e:
        load_tokens(str(path))
    assert str(path) in str(e.value) and "LLAMATOK" in str(e.value) and "prepare.py" in str(e.value)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokens(str(tmp_path / "nope" / "train.bin"))


def test_truncated_file_rejected(tmp_path):
    path = str(tmp_path / "ds" / "train.bin")
    write_tokens(path, np.arange(1000) % 257, "byte", 257, 256)
    with open(tmp_path / "ds" / "meta.json", "w") as f:
        json.dump({"command": "python prepare.py --name=ds --source=pystdlib"}, f)
    with open(path, "r+b") as f:
        f.truncate(256 + 2 * 600)
    with pytest.raises(DataError) as e:
        load_tokens(path)
    msg = str(e.value)
    assert path in msg and "1456" in msg and "2256" in msg  # actual and expected bytes
    assert "python prepare.py --name=ds --source=pystdlib" in msg  # the fix, from meta.json


def test_bad_version_rejected(tmp_path):
    path = str(tmp_path / "a.bin")
    write_tokens(path, [1, 2], "byte", 257, 256)
    raw = bytearray(open(path, "rb").read())
    raw[8:12] = (7).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    with pytest.raises(DataError, match="version 7"):
        load_tokens(path)


def test_too_large_vocabulary_rejected(tmp_path):
    path = str(tmp_path / "a.bin")
    write_tokens(path, [1, 50000], "gpt2", 50257, 50256)
    assert load_tokens(path, expected_vocab_size=50304)[1]["vocab_size"] == 50257
    with pytest.raises(DataError) as e:
        load_tokens(path, expected_vocab_size=32000)
    msg = str(e.value)
    assert "50257" in msg and "32000" in msg and "vocab_size >= 50257" in msg and path in msg
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_lossless():
    enc = get_tokenizer("byte")
    assert enc.n_vocab == 257 and enc.eos == EOT and enc.bos is None and not enc.add_bos
    texts = ["", "hello world\n", "héllo wörld 🙂 世界 \x00\t\r\n" * 50, "a" * 10000 + " b",
             "".join(chr(c) for c in range(1, 0x3000, 7)), "<|endoftext|> stays text",
             "e\u0301 combining, \U0001F468\u200D\U0001F469 zwj, \ufeff bom"]
    for text in texts:
        ids = enc.encode(text)
        assert ids == byte_ids(text)  # one token per UTF-8 byte
        assert enc.decode(ids) == text
    assert enc.decode([104, 105, EOT]) == "hi"  # special tokens are left out
    assert enc.encode("<|endoftext|>", allow_special=True) == [EOT]


def test_encode_docs_appends_eot_and_skips_empty():
    enc = get_tokenizer("byte")
    out = prepare.encode_docs(["ab", "", None, "ç"], enc)
    assert [x.tolist() for x in out] == [[97, 98, EOT], [], [], [195, 167, EOT]]
    assert out[0].dtype == np.uint16


def test_unknown_tokenizer_rejected():
    with pytest.raises(DataError, match="sentencepiece"):
        get_tokenizer("sentencepiece")


def test_offline_tiktoken_error_says_what_to_do(monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(prepare.tiktoken, "get_encoding", offline)
    get_tokenizer.cache_clear()
    try:
        with pytest.raises(DataError) as e:
            get_tokenizer("cl100k_base")
    finally:
        get_tokenizer.cache_clear()
    msg = str(e.value)
    assert "cl100k_base" in msg and "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer=byte" in msg


# --------------------------------------------------------------------------- pystdlib
def test_is_val_every_20th():
    assert [i for i in range(100) if prepare.is_val(i, 0.05)] == [19, 39, 59, 79, 99]
    assert sum(prepare.is_val(i, 0.3) for i in range(1000)) == 300


def test_pystdlib_files_sorted_no_site_packages():
    files = prepare.pystdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f for f in files)
    assert files == prepare.pystdlib_files()
    assert os.path.join(prepare.sysconfig.get_paths()["stdlib"], "os.py") in files


def test_pystdlib_prepare(tmp_path):
    out = prepare.prepare(data_dir=str(tmp_path / "a"), max_docs=45, quiet=True)
    assert out == str(tmp_path / "a" / "pystdlib")
    train, h_train = load_tokens(os.path.join(out, "train.bin"), expected_vocab_size=257)
    val, h_val = load_tokens(os.path.join(out, "val.bin"), expected_vocab_size=257)
    assert h_train["tokenizer"] == "byte" and h_train["eot_token"] == EOT and h_train["dtype"] == "uint16"
    # every file is one document followed by <eot>; files 19 and 39 (every 20th) go to val
    files = prepare.pystdlib_files()[:45]
    expect = {"train": [], "val": []}
    for i, f in enumerate(files):
        text = open(f, "rb").read().decode("utf-8", errors="replace")
        expect["val" if i in (19, 39) else "train"].append(byte_ids(text))
    assert [d.tolist() for d in split_docs(train)] == expect["train"]
    assert [d.tolist() for d in split_docs(val)] == expect["val"]
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["train_docs"] == 43 and meta["val_docs"] == 2 and meta["train_tokens"] == len(train)
    assert meta["vocab_size"] == 257 and "standard library" in meta["source_description"]
    # deterministic: a second run writes identical bytes
    out2 = prepare.prepare(data_dir=str(tmp_path / "b"), max_docs=45, quiet=True)
    for s in ("train.bin", "val.bin"):
        assert open(os.path.join(out, s), "rb").read() == open(os.path.join(out2, s), "rb").read()


def test_bad_arguments_rejected(tmp_path):
    with pytest.raises(DataError, match="val_fraction=1.5"):
        prepare.prepare(data_dir=str(tmp_path), val_fraction=1.5)
    with pytest.raises(DataError, match="no such file"):
        prepare.prepare(source=str(tmp_path / "missing.txt"), tokenizer="byte", data_dir=str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"\.csv"):
        prepare.prepare(source=str(tmp_path / "x.csv"), tokenizer="byte", data_dir=str(tmp_path))


def test_default_names():
    assert prepare.default_name("pystdlib") == "pystdlib"
    assert prepare.default_name("hf:roneneldan/TinyStories") == "TinyStories"
    assert prepare.default_name("hf:HuggingFaceFW/fineweb-edu:sample-10BT") == "fineweb-edu-sample-10BT"
    assert prepare.default_name("/x/y/shakespeare.txt") == "shakespeare"


# --------------------------------------------------------------------------- local files via datasets
def test_local_txt_files(tmp_path):
    texts = ["First file.\nTwo lines.\n", "Ünïcödé 🙂\n\nparagraph two\n", "third\n", "", "fifth"]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    out = prepare.prepare(name="txt", source=str(tmp_path / "doc*.txt"), tokenizer="byte",
                          data_dir=str(tmp_path / "data"), val_fraction=0.5, num_proc=1, quiet=True)
    train, _ = load_tokens(os.path.join(out, "train.bin"))
    val, _ = load_tokens(os.path.join(out, "val.bin"))
    # one document per file, in sorted order; i = 1, 3 go to val (f = 0.5); the empty file has no <eot>
    assert [d.tolist() for d in split_docs(train)] == [byte_ids(texts[0]), byte_ids(texts[2]), byte_ids(texts[4])]
    assert [d.tolist() for d in split_docs(val)] == [byte_ids(texts[1])]


def test_local_txt_by_line(tmp_path):
    (tmp_path / "lines.txt").write_text("a\nbb\nccc\ndddd\n")
    out = prepare.prepare(source=str(tmp_path / "lines.txt"), tokenizer="byte", data_dir=str(tmp_path),
                          val_fraction=0.25, sample_by="line", num_proc=1, quiet=True)
    assert out == str(tmp_path / "lines")
    assert load_tokens(os.path.join(out, "train.bin"))[0].tolist() == byte_ids("a") + [EOT] + byte_ids("bb") + \
        [EOT] + byte_ids("ccc") + [EOT]
    assert load_tokens(os.path.join(out, "val.bin"))[0].tolist() == byte_ids("dddd") + [EOT]


@pytest.mark.parametrize("streaming,num_proc", [(False, 2), (True, 1)])
def test_local_jsonl(tmp_path, streaming, num_proc):
    enc = get_tokenizer("byte")
    docs = [f"story {i}: " + "once upon a time ⏳ " * (i % 5) for i in range(60)]
    with open(tmp_path / "stories.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "story": d}) + "\n")
    out = prepare.prepare(name="js", source=str(tmp_path / "stories.jsonl"), tokenizer="byte",
                          text_field="story", data_dir=str(tmp_path / "data"), num_proc=num_proc,
                          streaming=streaming, quiet=True)
    expect = {"train": [], "val": []}
    for i, d in enumerate(docs):
        expect["val" if (i + 1) % 20 == 0 else "train"] += enc.encode(d) + [enc.eos]
    for s in ("train", "val"):
        tokens, header = load_tokens(os.path.join(out, f"{s}.bin"), expected_vocab_size=257)
        assert tokens.tolist() == expect[s]
        assert header["num_tokens"] == len(expect[s])
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["train_docs"] == 57 and meta["val_docs"] == 3
    assert "--text_field=story" in meta["command"]


def test_local_jsonl_wrong_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"'content'.*--text_field"):
        prepare.prepare(source=str(tmp_path / "a.jsonl"), tokenizer="byte", data_dir=str(tmp_path), quiet=True)


def test_local_parquet_with_max_docs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = [f"row {i} ✓" for i in range(30)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "t.parquet")
    out = prepare.prepare(source=str(tmp_path / "t.parquet"), tokenizer="byte", data_dir=str(tmp_path),
                          max_docs=21, num_proc=1, quiet=True)
    train, _ = load_tokens(os.path.join(out, "train.bin"))
    val, _ = load_tokens(os.path.join(out, "val.bin"))
    assert [bytes(d.astype(np.uint8)).decode() for d in split_docs(train)] == docs[:19] + docs[20:21]
    assert [bytes(d.astype(np.uint8)).decode() for d in split_docs(val)] == [docs[19]]


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_source_uses_validation_split(monkeypatch, tmp_path, streaming):
    """hf:NAME:CONFIG goes to datasets.load_dataset(NAME, CONFIG); its validation split becomes val."""
    datasets = pytest.importorskip("datasets")
    train_docs, val_docs = [f"train story {i}" for i in range(25)], ["val one", "", "val two"]
    calls = []

    def fake_load_dataset(name, config=None, streaming=False):
        calls.append((name, config, streaming))
        dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": train_docs}),
                                    "validation": datasets.Dataset.from_dict({"story": val_docs})})
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dsd.items()}) \
            if streaming else dsd
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = prepare.prepare(source="hf:someone/Stories:small", tokenizer="byte", text_field="story",
                          data_dir=str(tmp_path), streaming=streaming, num_proc=1, quiet=True)
    assert calls == [("someone/Stories", "small", streaming)] and out == str(tmp_path / "Stories-small")
    expect = lambda docs: [t for d in docs if d for t in byte_ids(d) + [EOT]]
    assert load_tokens(os.path.join(out, "train.bin"))[0].tolist() == expect(train_docs)  # no carving
    assert load_tokens(os.path.join(out, "val.bin"))[0].tolist() == expect(val_docs)


def test_unreachable_hf_dataset_error(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        prepare.prepare(source="hf:roneneldan/TinyStories", tokenizer="byte", data_dir=str(tmp_path))
    msg = str(e.value)
    assert "roneneldan/TinyStories" in msg and "pystdlib" in msg and "local file" in msg


# --------------------------------------------------------------------------- bounded memory
def peak_rss_mb(args, cwd):
    """Peak resident memory (MB) of `python prepare.py ARGS`, measured by a fresh parent whose only
    child it is (RUSAGE_CHILDREN of this process would include earlier subprocesses)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr[-2000:])")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, os.path.join(ROOT, "prepare.py"), *args],
                         capture_output=True, text=True, cwd=cwd, check=True).stdout
    rc, kb = out.split("\n")[0].split()
    assert rc == "0", out
    return int(kb) / 1024  # Linux: kilobytes


TRICKY = ("first line\r\nsecond\r\n\r\nthird\rstill 3?\n\n\n\nafter a gap \u00fc\u2028same line\n"
          "  \n\nspaces above\n\n\n\n\n" + "long line of text " * 20 + "\n\nno newline at the end")


@pytest.mark.parametrize("sample_by", ["line", "paragraph", "document"])
def test_text_files_split_like_datasets(tmp_path, monkeypatch, sample_by):
    """TextFiles (the --streaming reader of local .txt files) yields the documents of datasets'
    "text" loader, whatever its chunk size: 7 characters here, datasets' 10 MB there."""
    datasets = pytest.importorskip("datasets")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "c.txt")]
    for f, t in zip(files, [TRICKY, "", "\n\nlast\n"]):
        with open(f, "w", encoding="utf-8", newline="") as fh:
            fh.write(t)
    monkeypatch.setattr(prepare, "TEXT_CHUNK_CHARS", 7)
    ours = [ex["text"] for ex in prepare.TextFiles(files, sample_by)]
    theirs = datasets.load_dataset("text", data_files={"train": files}, sample_by=sample_by,
                                   cache_dir=str(tmp_path / "cache"))["train"]["text"]
    assert ours == theirs and len(ours) > 2


@pytest.mark.parametrize("sample_by", ["line", "paragraph"])
def test_txt_streaming_equals_in_memory(tmp_path, monkeypatch, sample_by):
    """--streaming on a local .txt file writes, byte for byte and with the same header, the files of
    the non-streaming (datasets) path and of tokenising all documents in memory at once."""
    (tmp_path / "c.txt").write_text((TRICKY + "\n\n") * 30, encoding="utf-8")
    monkeypatch.setattr(prepare, "TEXT_CHUNK_CHARS", 100)  # many chunks
    run = lambda d, streaming: prepare.prepare(name="c", source=str(tmp_path / "c.txt"), tokenizer="byte",
                                               data_dir=str(tmp_path / d), streaming=streaming,
                                               sample_by=sample_by, val_fraction=0.3, num_proc=1, quiet=True)
    streamed, arrow = run("s", True), run("a", False)
    docs = [ex["text"] for ex in prepare.TextFiles([str(tmp_path / "c.txt")], sample_by)]
    ids = prepare.encode_docs(docs, get_tokenizer("byte"))
    for s in ("train", "val"):
        path = str(tmp_path / f"{s}.bin")
        write_tokens(path, np.concatenate([x for i, x in enumerate(ids) if prepare.is_val(i, 0.3) == (s == "val")]),
                     "byte", 257, EOT, tokenizer_sha=get_tokenizer("byte").sha)
        raw = open(os.path.join(streamed, f"{s}.bin"), "rb").read()
        assert len(raw) > 256 + 100
        assert raw == open(os.path.join(arrow, f"{s}.bin"), "rb").read() == open(path, "rb").read()
    meta = [json.load(open(os.path.join(d, "meta.json"))) for d in (streamed, arrow)]
    assert meta[0]["train_docs"] == meta[1]["train_docs"] == len(docs) - meta[0]["val_docs"]


def test_txt_streaming_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """Python's peak allocations while streaming a ~6 MB .txt file stay below the size of the
    corpus' token array: tokens go to the file chunk by chunk and the file is read in chunks (holding
    all tokens, or the file's lines, at once would exceed it)."""
    import tracemalloc
    para = "paragraph {} of the streamed corpus: " + "a line of words to tokenise\n" * 20 + "\n"
    (tmp_path / "big.txt").write_text("".join(para.format(i) for i in range(10_000)))
    monkeypatch.setattr(prepare, "TEXT_CHUNK_CHARS", 1 << 18)
    pytest.importorskip("datasets")  # imported before tracing: its modules are not corpus data
    get_tokenizer("byte").encode_batch(["warm", "up"])  # the thread pool and tiktoken's caches
    tracemalloc.start()
    try:
        out = prepare.prepare(name="big", source=str(tmp_path / "big.txt"), tokenizer="byte", streaming=True,
                              sample_by="paragraph", data_dir=str(tmp_path), quiet=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    n = sum(load_tokens(os.path.join(out, f"{s}.bin"))[1]["num_tokens"] for s in ("train", "val"))
    print(peak, n)
    assert n > 5_000_000 and peak < 2 * n, (peak, n)  # 2 * n: the bytes of all tokens as uint16


def test_one_huge_txt_document_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_DOC_BYTES", 1000)
    (tmp_path / "huge.txt").write_text("x" * 2000)
    with pytest.raises(DataError, match=r"(?s)huge.txt is 2,000 bytes.*--sample_by=document.*1,000 bytes.*Fix: --sample_by=paragraph.*--streaming"):
        prepare.prepare(source=str(tmp_path / "huge.txt"), tokenizer="byte", data_dir=str(tmp_path), quiet=True)
    out = prepare.prepare(source=str(tmp_path / "huge.txt"), tokenizer="byte", data_dir=str(tmp_path),
                          sample_by="line", streaming=True, val_fraction=0.5, quiet=True)
    assert load_tokens(os.path.join(out, "train.bin"))[1]["num_tokens"] == 2001
    (tmp_path / "latin.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8.*iconv"):
        prepare.prepare(source=str(tmp_path / "latin.txt"), tokenizer="byte", data_dir=str(tmp_path),
                        streaming=True, quiet=True)


def test_pystdlib_peak_memory(tmp_path):
    """Preparing all of pystdlib stays small (745 MB before one lasting thread pool: tiktoken kept a
    regex cache per thread of a fresh pool per call)."""
    assert peak_rss_mb(["--quiet", "--data_dir=d"], tmp_path) < 250


@pytest.mark.slow
def test_multi_gb_txt_streaming_peak_memory(tmp_path):
    """prepare.py --streaming on a 2 GB .txt file: peak memory a few hundred MB, all tokens written."""
    para = "A paragraph of the generated corpus, line after line of the same words.\n" * 20 + "\n"
    block = para * 1000
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(2_000_000_000 // len(block) + 1):
            f.write(block)
    n_para = (2_000_000_000 // len(block) + 1) * 1000
    peak = peak_rss_mb(["--source=big.txt", "--tokenizer=byte", "--streaming", "--sample_by=paragraph",
                        "--quiet", "--data_dir=d"], tmp_path)
    n = sum(load_tokens(str(tmp_path / "d" / "big" / f"{s}.bin"))[1]["num_tokens"] for s in ("train", "val"))
    assert n == n_para * (len(para) - 2 + 1)  # each paragraph without its "\n\n", plus <eot>
    print(f"prepare.py --streaming on a {os.path.getsize(tmp_path / 'big.txt'):,}-byte .txt: peak RSS {peak:.0f} MB")
    assert peak < 400, peak


# --------------------------------------------------------------------------- command line
def test_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    r = run("--help")
    assert r.returncode == 0 and "Tokenise a text corpus" in r.stdout
    r = run("--max_docs=3", "--val_fraction=0.5", "--data_dir=d")
    assert r.returncode == 0, r.stderr
    assert "d/pystdlib/train.bin" in r.stdout and "tokens" in r.stdout
    assert load_tokens(str(tmp_path / "d" / "pystdlib" / "val.bin"))[1]["num_tokens"] > 0
    r = run("--source=nope.txt", "--tokenizer=byte")
    assert r.returncode == 1 and "error: --source='nope.txt'" in r.stderr and "Traceback" not in r.stderr
