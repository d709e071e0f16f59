"""Tokenise a text corpus into data/<name>/{train,val}.bin for train.py and eval_ppl.py.

    python prepare.py                                     # offline default: pystdlib, byte tokenizer
    python prepare.py --source=hf:roneneldan/TinyStories  # any Hugging Face dataset (gpt2 tokenizer)
    python prepare.py --source=hf:HuggingFaceFW/fineweb-edu:sample-10BT --streaming --max_docs=1000000
    python prepare.py --source=hf:Salesforce/wikitext:wikitext-103-raw-v1
    python prepare.py --source=corpus.txt --name=mine     # local .txt / .jsonl / .json / .parquet (globs too)

Sources
  pystdlib          the Python standard library's own *.py files (sysconfig's "stdlib" path,
                    site-packages excluded), sorted, one document per file; needs no network.
  hf:NAME[:CONFIG]  datasets.load_dataset(NAME, CONFIG); --text_field names the text column,
                    --streaming reads large ones without downloading them whole.
  PATH or GLOB      local files through datasets' "text" / "json" / "parquet" loaders; a .txt
                    file is one document (--sample_by=line|paragraph splits it further).
Validation: the source's "validation" split when it has one, else a deterministic slice of the
documents: document i goes to val when floor((i+1)*f) > floor(i*f), f = --val_fraction
(f = 0.05: every 20th document).

Token stream: every document is followed by the end-of-text token, and documents are simply
concatenated, doc1 <eot> doc2 <eot> ...; empty documents are skipped.

File format of a .bin (one file can be validated alone, see load_tokens):
  bytes   0..7    magic b"LLAMATOK"
  bytes   8..11   int32 little-endian format version (1)
  bytes  12..255  JSON {"dtype", "tokenizer", "vocab_size", "num_tokens", "eot_token"}, zero padded
  bytes 256..     num_tokens token ids, uint16 when vocab_size <= 65536 else uint32, little-endian
meta.json next to them holds the same facts in readable form plus where the text came from.

Tokenizers (tiktoken): byte (256 byte tokens + <|endoftext|> = 256, built locally), gpt2,
cl100k_base, o200k_base (downloaded once into TIKTOKEN_CACHE_DIR).
"""
import argparse
import functools
import glob
import json
import math
import os
import re
import shlex
import struct
import sys
import sysconfig

import numpy as np
import tiktoken
from tqdm import tqdm

MAGIC = b"LLAMATOK"
VERSION = 1
HEADER_BYTES = 256
TOKENIZERS = ("byte", "gpt2", "cl100k_base", "o200k_base")
LOCAL_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it (no traceback needed)."""


# --------------------------------------------------------------------------- tokenizers
@functools.lru_cache(maxsize=None)
def get_tokenizer(name):
    """A tiktoken Encoding by name: byte, gpt2, cl100k_base or o200k_base."""
    if name == "byte":
        # every byte is its own token and there are no merges, so any pattern that covers all
        # of the text works; big pieces keep the regex cheap
        return tiktoken.Encoding(name="byte", pat_str=r"[\s\S]{1,4096}",
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    if name not in TOKENIZERS:
        raise DataError(f"tokenizer={name!r} is not one of {TOKENIZERS}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError, a hash mismatch, ...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise DataError(
            f"cannot load the tiktoken encoding {name!r} ({where}; no network?): {type(e).__name__}: "
            f"{str(e)[:200]}\nFix: on a machine with network run "
            f"`TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"`, "
            f"copy DIR here and set TIKTOKEN_CACHE_DIR=DIR; or use --tokenizer=byte "
            f"(with any source, e.g. a local file or the offline --source=pystdlib).") from e


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def encode_docs(texts, enc):
    """list of str -> list of uint token arrays, each ending in <eot>; empty texts give []."""
    dtype = token_dtype(enc.n_vocab)
    ids = enc.encode_ordinary_batch([t or "" for t in texts])  # threaded inside tiktoken
    return [np.array(x + [enc.eot_token] if t else [], dtype=dtype) for t, x in zip(texts, ids)]


# --------------------------------------------------------------------------- .bin files
def _header(dtype, tokenizer_name, vocab_size, num_tokens, eot):
    info = dict(dtype=np.dtype(dtype).name, tokenizer=tokenizer_name, vocab_size=int(vocab_size),
                num_tokens=int(num_tokens), eot_token=int(eot))
    blob = json.dumps(info).encode()
    room = HEADER_BYTES - len(MAGIC) - 4
    if len(blob) > room:
        raise DataError(f"header JSON is {len(blob)} bytes, more than {room}: shorten the tokenizer name")
    return MAGIC + struct.pack("<i", VERSION) + blob.ljust(room, b"\0")


class TokenFile:
    """Appends token chunks to PATH.tmp, then writes the header and renames it to PATH, so a
    half-written file never carries the final name."""

    def __init__(self, path, tokenizer_name, vocab_size, eot):
        self.path, self.tokenizer_name, self.vocab_size, self.eot = path, tokenizer_name, vocab_size, eot
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path + ".tmp", "wb")
        self.f.write(b"\0" * HEADER_BYTES)  # placeholder until the count is known

    def append(self, tokens):
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"{self.path}: token id {int(tokens.max())} (or {int(tokens.min())}) is "
                            f"outside [0, vocab_size={self.vocab_size})")
        self.f.write(tokens.astype(self.dtype).astype(np.dtype(self.dtype).newbyteorder("<")).tobytes())
        self.num_tokens += tokens.size
        return tokens.size

    def close(self):
        self.f.seek(0)
        self.f.write(_header(self.dtype, self.tokenizer_name, self.vocab_size, self.num_tokens, self.eot))
        self.f.close()
        os.replace(self.path + ".tmp", self.path)
        return self.num_tokens


def write_tokens(path, tokens, tokenizer_name, vocab_size, eot, desc=None, quiet=True):
    """Write a .bin from one 1-D array/list of ids or an iterable of such chunks; returns the count."""
    if isinstance(tokens, np.ndarray) or (isinstance(tokens, (list, tuple)) and
                                          (not tokens or isinstance(tokens[0], (int, np.integer)))):
        tokens = [tokens]
    out = TokenFile(path, tokenizer_name, vocab_size, eot)
    with tqdm(desc=desc or os.path.basename(path), unit="tok", unit_scale=True, disable=quiet) as bar:
        for chunk in tokens:
            bar.update(out.append(chunk))
    return out.close()


def load_tokens(path, expected_vocab_size=None):
    """(1-D read-only memmap of token ids, header dict) after checking the file against its header."""
    fix = _fix_hint(path)
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist.\nFix: {fix}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not a prepare.py token file (it does not start with {MAGIC!r}).\nFix: {fix}")
    version = struct.unpack("<i", head[8:12])[0]
    if version != VERSION:
        raise DataError(f"{path} has format version {version}; this prepare.py reads version {VERSION}.\nFix: {fix}")
    try:
        header = json.loads(head[12:].rstrip(b"\0"))
        dtype, n = np.dtype(header["dtype"]), int(header["num_tokens"])
        vocab_size = int(header["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} has a damaged header ({e}).\nFix: {fix}") from e
    if dtype not in (np.uint16, np.uint32):
        raise DataError(f"{path}: dtype {dtype} in the header is not uint16 or uint32.\nFix: {fix}")
    expected = HEADER_BYTES + n * dtype.itemsize
    if size != expected:
        raise DataError(f"{path} is {size} bytes but its header promises {n} {dtype} tokens = {expected} "
                        f"bytes (truncated or still being written?).\nFix: {fix}")
    if expected_vocab_size is not None and vocab_size > expected_vocab_size:
        raise DataError(
            f"{path} was tokenised with {header['tokenizer']} (vocab_size {vocab_size}) but the model's "
            f"vocab_size is {expected_vocab_size}.\nFix: set vocab_size >= {vocab_size} in the config, "
            f"or re-prepare the data with a tokenizer of at most {expected_vocab_size} tokens.")
    if n == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=dtype.newbyteorder("<")), header
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(n,)), header


def _fix_hint(path):
    """'re-run <the command that made this dataset>', from meta.json when it is there."""
    meta = os.path.join(os.path.dirname(path) or ".", "meta.json")
    try:
        with open(meta) as f:
            return f"re-run `{json.load(f)['command']}`"
    except (OSError, ValueError, KeyError):
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"re-run prepare.py for this dataset, e.g. `python prepare.py --name={name} --source=...`"


# --------------------------------------------------------------------------- sources
def is_val(i, val_fraction):
    """Document i goes to val when the running count floor(i * f) steps up (f=0.05: every 20th)."""
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)


def pystdlib_files():
    """Sorted paths of the standard library's *.py files, site-packages left out (deterministic
    for a given Python build)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        found += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return [os.path.join(root, f) for f in sorted(found, key=lambda p: p.replace(os.sep, "/"))]


def _prepare_pystdlib(out_dir, enc, tokenizer, val_fraction, max_docs, quiet):
    files = pystdlib_files()[:max_docs]
    if not files:
        raise DataError(f"no *.py files under {sysconfig.get_paths()['stdlib']}; use a local file as --source")
    outs = {s: TokenFile(os.path.join(out_dir, f"{s}.bin"), tokenizer, enc.n_vocab, enc.eot_token)
            for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    for i, path in enumerate(tqdm(files, desc="pystdlib", unit="file", disable=quiet)):
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")  # a few test files are latin-1
        split = "val" if is_val(i, val_fraction) else "train"
        docs[split] += 1
        outs[split].append(encode_docs([text], enc)[0])
    counts = {s: out.close() for s, out in outs.items()}
    desc = (f"Python {sys.version.split()[0]} standard library sources under "
            f"{sysconfig.get_paths()['stdlib']} (*.py, site-packages excluded, sorted by path, "
            f"one document per file{f', first {max_docs} files' if max_docs else ''})")
    return counts, docs, desc


def _load_source(source, streaming, sample_by):
    """(DatasetDict-like of splits, description) for hf:NAME[:CONFIG] or local files."""
    import datasets  # lazily: the GPU machine only reads prepared .bin files
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        try:
            dsd = datasets.load_dataset(name, config or None, streaming=streaming)
        except OSError as e:  # ConnectionError, not found, offline mode
            raise DataError(
                f"cannot load the Hugging Face dataset {name!r}{f' (config {config!r})' if config else ''}: "
                f"{type(e).__name__}: {str(e)[:300]}\nFix: check the name and the network; without network "
                f"use a local file (--source=path/to/data.txt|.jsonl|.parquet) or the offline corpus "
                f"--source=pystdlib.") from e
        return dsd, f"Hugging Face dataset {name}" + (f", config {config}" if config else "")
    files = sorted(glob.glob(os.path.expanduser(source)))
    if not files:
        raise DataError(f"--source={source!r}: no such file (and not 'pystdlib' or 'hf:NAME[:CONFIG]').")
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in LOCAL_LOADERS:
        raise DataError(f"--source={source!r} matches files ending in {sorted(exts)}; use one kind of "
                        f"{sorted(LOCAL_LOADERS)}")
    loader = LOCAL_LOADERS[exts.pop()]
    kwargs = dict(sample_by=sample_by) if loader == "text" else {}
    dsd = datasets.load_dataset(loader, data_files={"train": files}, streaming=streaming, **kwargs)
    return dsd, f"local {loader} files {files if len(files) <= 10 else files[:10] + ['...']}"


def _tokenize_batch(batch, text_field, tokenizer):
    return {"ids": encode_docs(batch[text_field], get_tokenizer(tokenizer))}


def _batched(iterable, n):
    batch = []
    for x in iterable:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _arrow_chunks(ds, batch_size=10_000):
    """Token chunks of a tokenised (non-streaming) Dataset, straight from Arrow."""
    import pyarrow.compute as pc
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        yield pc.list_flatten(batch["ids"]).to_numpy()


def _prepare_datasets(out_dir, enc, tokenizer, source, text_field, streaming, num_proc,
                      val_fraction, max_docs, sample_by, quiet):
    dsd, desc = _load_source(source, streaming, sample_by)
    if "train" not in dsd:
        raise DataError(f"{desc} has splits {list(dsd)} but no 'train' split")
    splits = {"train": dsd["train"], "val": dsd.get("validation")}
    for s, ds in splits.items():
        cols = None if ds is None else ds.column_names  # None: a stream that does not know yet
        if cols is not None and text_field not in cols:
            raise DataError(f"{desc} ({s}) has columns {cols} but no {text_field!r}; pick one with --text_field")
        if ds is not None and max_docs:
            splits[s] = ds.take(max_docs) if streaming else ds.select(range(min(max_docs, len(ds))))
    val_desc = "the source's validation split" if splits["val"] is not None else \
        f"documents i with floor((i+1)*{val_fraction}) > floor(i*{val_fraction}) of train"
    files = {s: TokenFile(os.path.join(out_dir, f"{s}.bin"), tokenizer, enc.n_vocab, enc.eot_token)
             for s in ("train", "val")}
    docs = {"train": 0, "val": 0}
    if streaming:  # one pass over each stream; tiktoken threads each batch of texts
        carve = splits["val"] is None
        for s, ds in splits.items():
            if ds is None:
                continue
            i = 0
            for texts in tqdm(_batched((ex[text_field] for ex in ds), 1024), desc=f"{s} (streaming)",
                              unit="batch", disable=quiet):
                for ids in encode_docs(texts, enc):
                    dest = ("val" if is_val(i, val_fraction) else "train") if carve else s
                    files[dest].append(ids)
                    docs[dest] += 1
                    i += 1
    else:  # split by index, then tokenise in num_proc processes and copy the ids out of Arrow
        if splits["val"] is None:
            i = np.arange(len(splits["train"]))  # is_val, vectorised (same float64 arithmetic)
            mask = np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)
            splits = {"train": splits["train"].select(np.flatnonzero(~mask)),
                      "val": splits["train"].select(np.flatnonzero(mask))}
        for s, ds in splits.items():
            docs[s] = len(ds)
            ids = ds.map(_tokenize_batch, batched=True, num_proc=num_proc if num_proc > 1 else None,
                         remove_columns=ds.column_names, desc=f"tokenizing {s}",
                         fn_kwargs=dict(text_field=text_field, tokenizer=tokenizer))
            for chunk in tqdm(_arrow_chunks(ids), desc=f"writing {s}", unit="batch", disable=quiet):
                files[s].append(chunk)
    counts = {s: f.close() for s, f in files.items()}
    return counts, docs, f"{desc}; text field {text_field!r}; validation: {val_desc}"


# --------------------------------------------------------------------------- prepare
def default_name(source):
    """pystdlib -> pystdlib, hf:roneneldan/TinyStories -> TinyStories, ~/x/shakespeare.txt -> shakespeare."""
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        base = name.rstrip("/").split("/")[-1] + (f"-{config}" if config else "")
    else:
        base = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    return re.sub(r"[^\w.-]+", "_", base).strip("._") or "data"


def prepare(name=None, source="pystdlib", tokenizer=None, data_dir="data", text_field="text",
            num_proc=None, streaming=False, val_fraction=0.05, max_docs=None, sample_by="document",
            quiet=False):
    """Tokenise SOURCE into DATA_DIR/NAME/{train,val}.bin + meta.json and return that folder.
    tokenizer None: byte for pystdlib, gpt2 otherwise. max_docs: at most that many documents
    (files for pystdlib) from each split of the source, for quick runs and tests."""
    name = name or default_name(source)
    tokenizer = tokenizer or ("byte" if source == "pystdlib" else "gpt2")
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.05)")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"max_docs={max_docs} must be a positive number of documents (or None for all)")
    if sample_by not in ("document", "paragraph", "line"):
        raise DataError(f"sample_by={sample_by!r} must be document, paragraph or line")
    enc = get_tokenizer(tokenizer)
    out_dir = os.path.join(data_dir, name)
    if source == "pystdlib":
        counts, docs, desc = _prepare_pystdlib(out_dir, enc, tokenizer, val_fraction, max_docs, quiet)
    else:
        import datasets
        bars_on = datasets.is_progress_bar_enabled()
        if quiet:
            datasets.disable_progress_bars()
        try:
            counts, docs, desc = _prepare_datasets(out_dir, enc, tokenizer, source, text_field, streaming,
                                                   num_proc, val_fraction, max_docs, sample_by, quiet)
        finally:
            if bars_on:
                datasets.enable_progress_bars()
    command = _command(name, source, tokenizer, data_dir, text_field, streaming, val_fraction,
                       max_docs, sample_by)
    meta = dict(name=name, source=source, source_description=desc, tokenizer=tokenizer,
                vocab_size=enc.n_vocab, eot_token=enc.eot_token, dtype=np.dtype(token_dtype(enc.n_vocab)).name,
                train_tokens=counts["train"], val_tokens=counts["val"], train_docs=docs["train"],
                val_docs=docs["val"], val_fraction=val_fraction, max_docs=max_docs, command=command,
                format=f"{HEADER_BYTES}-byte header ({MAGIC.decode()}, int32 version {VERSION}, JSON) "
                       f"then the token ids; documents are joined as doc1 <eot> doc2 <eot> ...")
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if not quiet:
        for s in ("train", "val"):
            print(f"{os.path.join(out_dir, s + '.bin')}: {counts[s]:,} tokens from {docs[s]:,} documents")
        print(f"tokenizer {tokenizer} (vocab_size {enc.n_vocab}, eot {enc.eot_token}, {meta['dtype']}); "
              f"{os.path.join(out_dir, 'meta.json')}")
    if counts["train"] == 0 or counts["val"] == 0:
        print(f"warning: {out_dir} has an empty split (train {counts['train']}, val {counts['val']} tokens); "
              f"use more documents or a larger --val_fraction", file=sys.stderr)
    return out_dir


def _command(name, source, tokenizer, data_dir, text_field, streaming, val_fraction, max_docs, sample_by):
    """The prepare.py command line that rebuilds this dataset (stored in meta.json, quoted in errors)."""
    args = [f"--name={name}", f"--source={source}", f"--tokenizer={tokenizer}"]
    if data_dir != "data":
        args.append(f"--data_dir={data_dir}")
    if source != "pystdlib" and text_field != "text":
        args.append(f"--text_field={text_field}")
    if streaming:
        args.append("--streaming")
    if val_fraction != 0.05:
        args.append(f"--val_fraction={val_fraction}")
    if max_docs:
        args.append(f"--max_docs={max_docs}")
    if sample_by != "document":
        args.append(f"--sample_by={sample_by}")
    return " ".join(["python prepare.py"] + [shlex.quote(a) for a in args])


# --------------------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="dataset folder under --data_dir (default: from --source)")
    p.add_argument("--source", default="pystdlib", help="pystdlib | hf:NAME[:CONFIG] | local file or glob")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="default: byte for pystdlib, else gpt2")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--text_field", default="text", help="column holding the text (hf and json/parquet)")
    p.add_argument("--streaming", action="store_true", help="stream a large hf dataset instead of downloading it")
    p.add_argument("--num_proc", type=int, default=None, help="tokenising processes (default: min(8, cores))")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of documents for val when "
                   "the source has no validation split")
    p.add_argument("--max_docs", type=int, default=None, help="use at most this many documents per split")
    p.add_argument("--sample_by", default="document", choices=("document", "paragraph", "line"),
                   help="what one document is in a .txt file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        prepare(**vars(args))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
