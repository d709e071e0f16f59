"""Tokenise a text corpus into data/<name>/{train,val}.bin for train.py and eval_ppl.py.

    python prepare.py                                     # offline default: pystdlib, byte tokenizer
    python prepare.py --source=hf:roneneldan/TinyStories  # any Hugging Face dataset (gpt2 tokenizer)
    python prepare.py --source=hf:HuggingFaceFW/fineweb-edu:sample-10BT --streaming --max_docs=1000000
    python prepare.py --source=hf:Salesforce/wikitext:wikitext-103-raw-v1
    python prepare.py --source=corpus.txt --name=mine     # local .txt / .jsonl / .json / .parquet (globs too)
    python prepare.py --source=corpus.txt --name=mine --tokenizer=hf:path/to/SmolLM2  # a model's own tokenizer

Sources
  pystdlib          the Python standard library's own *.py files (sysconfig's "stdlib" path,
                    site-packages excluded), sorted, one document per file; needs no network.
  hf:NAME[:CONFIG]  datasets.load_dataset(NAME, CONFIG); --text_field names the text column,
                    --streaming reads large ones without downloading them whole.
  PATH or GLOB      local files through datasets' "text" / "json" / "parquet" loaders; a .txt
                    file is one document (--sample_by=line|paragraph splits it further; one above
                    MAX_DOC_BYTES is refused); with --streaming, .txt files are read by TextFiles.
Memory: tokens are appended to PATH.tmp chunk by chunk (the header, with the count, written last);
--streaming reads a hub dataset or local files a batch at a time, so memory does not grow with the
corpus; without it, datasets keeps the text and the ids in Arrow files on disk (memory-mapped).
Validation: the source's "validation" split when it has one, else a deterministic slice of the
documents: document i goes to val when floor((i+1)*f) > floor(i*f), f = --val_fraction
(f = 0.05: every 20th document).

Token stream: every document is followed by the end-of-text token (the tokenizer's eos), and
preceded by its bos when the tokenizer's family starts documents with one (Llama 2, Llama 3);
documents are simply concatenated, [bos] doc1 <eot> [bos] doc2 <eot> ...; empty ones are skipped.

File format of a .bin (one file can be validated alone, see load_tokens):
  bytes   0..7    magic b"LLAMATOK"
  bytes   8..11   int32 little-endian format version (1)
  bytes  12..255  JSON {"dtype", "tokenizer", "vocab_size", "num_tokens", "eot_token", "tokenizer_sha"},
                  zero padded (tokenizer_sha: the tokenizer's identity, see Tokenizer; older files lack it)
  bytes 256..     num_tokens token ids, uint16 when vocab_size <= 65536 else uint32, little-endian
meta.json next to them holds the same facts in readable form plus where the text came from.

Tokenizers (--tokenizer): byte (256 byte tokens + <|endoftext|> = 256, built locally), gpt2,
cl100k_base, o200k_base (tiktoken, downloaded once into TIKTOKEN_CACHE_DIR), or hf:DIR, a Hugging
Face model or tokenizer directory (tokenizer.json, read with the `tokenizers` package; its files are
copied to data/<name>/tokenizer/ so that checkpoints trained on the data carry them).
"""
import argparse
import codecs
import functools
import glob
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
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
MAX_DOC_BYTES = 64 << 20  # a larger .txt file is refused as one document: it is tokenised whole, ~30 bytes per byte
TEXT_CHUNK_CHARS = 10 << 20  # local .txt files are read this much at a time (datasets' chunksize too)


class DataError(ValueError):
    """Bad or missing data; the message says what is wrong and how to fix it (no traceback needed)."""


# --------------------------------------------------------------------------- tokenizers
# A spec names a tokenizer: byte | gpt2 | cl100k_base | o200k_base (tiktoken) | hf:DIR (a Hugging
# Face tokenizer directory, tokenizer.json read with the `tokenizers` package). Whatever its kind,
# get_tokenizer returns one Tokenizer. Its identity is its name plus `sha`, a hash of what each id
# means (the id -> bytes table and which ids are special): data, checkpoints and exports carry it,
# and two tokenizers with the same sha give every id the same text, so a model fits either.
META_FILE = "tokenizer_meta.json"  # written by Tokenizer.save: name, sha and the resolved bos/eos facts


class Tokenizer:
    """What the scripts need of a tokenizer, for tiktoken and Hugging Face ones alike.

    name        short name recorded in headers and checkpoints ("byte", "hf:SmolLM2-135M-Instruct")
    spec        what get_tokenizer was given (the directory for hf:)
    n_vocab     1 + the largest id
    eos         end-of-document id: appended to every document by prepare.py, stops sampling
    stop_ids    ids that end generation (eos and, for hf, generation_config's other eos ids)
    bos, add_bos  beginning-of-document id (or None) and whether documents start with it
    chat_template  Jinja2 source, or None
    token_bytes list of each id's bytes as it reads in text (special tokens and gaps: b"")
    prefix_space  the tokenizer adds a space before each text (SentencePiece's dummy prefix):
                the first token of a document then stands for one byte less than token_bytes says
    sha         first 16 hex digits of the identity hash (see tokenizer_sha)
    special     {id: text} of the special tokens
    backend     the tiktoken Encoding, or the tokenizers.Tokenizer of an hf directory
    files       {file name: path} of an hf directory's tokenizer files (empty for tiktoken)"""

    def __init__(self, name, spec, backend, token_bytes, special, eos, bos=None, add_bos=False,
                 stop_ids=None, chat_template=None, files=None):
        self.name, self.spec, self.backend = name, spec, backend
        self.token_bytes, self.special = token_bytes, special  # special: {id: text}
        self.n_vocab = len(token_bytes)
        self.eos, self.bos, self.add_bos = eos, bos, add_bos
        self.stop_ids = tuple(stop_ids or (eos,))
        self.chat_template, self.files = chat_template, files or {}
        self.sha = tokenizer_sha(token_bytes, special)
        self._tables = None  # byte_lengths(), computed on first use
        self.prefix_space = b"".join(token_bytes[i] for i in self.encode("a")) == b" a"

    def identity(self):
        return {"name": self.name, "sha": self.sha}

    def encode(self, text, allow_special=False):
        """text -> ids, no BOS/EOS added; special-token text is ordinary text unless allow_special."""
        return self.encode_batch([text], allow_special)[0]

    def encode_batch(self, texts, allow_special=False):
        if self.files:  # tokenizers: threaded batch; encode_special_tokens=True reads "<|x|>" as text
            self.backend.encode_special_tokens = not allow_special
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        if allow_special:
            return [self.backend.encode(t, allowed_special="all") for t in texts]
        if len(texts) == 1:
            return [self.backend.encode_ordinary(texts[0])]
        return list(_encode_pool().map(self.backend.encode_ordinary, texts))  # tiktoken frees the GIL

    def decode(self, ids):
        """ids -> text, special tokens left out; a leading dummy-prefix space is dropped (as
        transformers' decode does)."""
        return "".join(self.decode_stream(ids, at_start=True))

    def decode_stream(self, ids, at_start=False):
        """Yield text as ids come: an incremental UTF-8 decoder holds back partial characters (a
        byte-level or byte-fallback token can be part of one). at_start: ids begin a document."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        strip = at_start and self.prefix_space
        for i in ids:
            piece = self.token_bytes[i]
            if strip and piece:
                piece, strip = piece[1:] if piece[:1] == b" " else piece, False
            yield decoder.decode(piece)
        yield decoder.decode(b"", final=True)

    def byte_lengths(self):
        """(UTF-8 bytes of each id as an int64 array, whether each id's bytes start with a space)."""
        lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        return lengths, np.array([b[:1] == b" " for b in self.token_bytes])

    def count_bytes(self, prev, ids):
        """UTF-8 bytes of the text that tokens `ids` stand for, each following the token in `prev`
        (arrays of the same shape). A dummy-prefix space is not in the text: with prefix_space the
        first token of a document (after a 0-byte special token) counts one byte less."""
        if self._tables is None:
            self._tables = self.byte_lengths()
        lengths, lead = self._tables
        n = int(lengths[ids].sum())
        if self.prefix_space:
            n -= int((lead[ids] & (lengths[prev] == 0)).sum())
        return n

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template applied to messages, ending with the assistant's turn (transformers'
        apply_chat_template with add_generation_prompt=True; same Jinja2 settings); False: the
        conversation as it stands (fine-tuning data, finetune.py)."""
        if not self.chat_template:
            raise DataError(f"tokenizer {self.name} has no chat template (tokenizer_config.json "
                            "'chat_template' or chat_template.jinja); leave --chat out and write the prompt")
        import datetime
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise DataError(f"the chat template of {self.name} refused the messages: {msg}")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        tokens = {"bos_token": self.special.get(self.bos, ""), "eos_token": self.special.get(self.eos, "")}
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **tokens)

    def save(self, directory):
        """Tokenizer files that transformers.AutoTokenizer.from_pretrained(directory) loads with the
        same ids, plus META_FILE (identity and bos/eos). hf: the original files; tiktoken: an
        equivalent byte-level BPE tokenizer.json."""
        os.makedirs(directory, exist_ok=True)
        if self.files:
            for name, src in self.files.items():
                if os.path.abspath(src) != os.path.abspath(os.path.join(directory, name)):
                    shutil.copyfile(src, os.path.join(directory, name))
        else:
            _tiktoken_to_hf(self).save(os.path.join(directory, "tokenizer.json"))
            with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.special[self.eos],
                           "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}, f, indent=2)
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({**self.identity(), "eos": self.eos, "stop_ids": list(self.stop_ids), "bos": self.bos,
                       "add_bos": self.add_bos}, f, indent=2)


_POOL = [None, None]  # (pid, ThreadPoolExecutor) of _encode_pool


def _encode_pool():
    """One lasting pool of threads for tiktoken batches (re-made after a fork). tiktoken keeps a copy
    of its regex, with its growing match cache, per thread id it sees (up to 128); the fresh threads of
    encode_ordinary_batch's pool per call piled those up to ~700 MB preparing pystdlib."""
    if _POOL[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor
        _POOL[:] = [os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 1))]
    return _POOL[1]


def tokenizer_sha(token_bytes, special):
    """First 16 hex digits of sha256 over each id's bytes, special tokens marked as such."""
    h = hashlib.sha256()
    for i, b in enumerate(token_bytes):
        b = b"\x01" + special[i].encode() if i in special else b"\x00" + b
        h.update(struct.pack("<I", len(b)) + b)
    return h.hexdigest()[:16]


def same_tokenizer(a, b):
    """a, b: identity dicts ({"name", "sha"}) or bare names (older files). By sha when both have one."""
    a, b = [x if isinstance(x, dict) else {"name": x, "sha": None} for x in (a, b)]
    if a.get("sha") and b.get("sha"):
        return a["sha"] == b["sha"]
    return a.get("name") == b.get("name")


def describe(ident):
    """'hf:SmolLM2 (sha 0123...)' for messages."""
    if not isinstance(ident, dict):
        return repr(ident)
    return f"{ident.get('name')!r}" + (f" (sha {ident['sha']})" if ident.get("sha") else "")


@functools.lru_cache(maxsize=None)
def get_tokenizer(spec):
    """A Tokenizer by spec: byte, gpt2, cl100k_base, o200k_base or hf:DIR."""
    if spec.startswith("hf:"):
        return _hf_tokenizer(spec[3:])
    return _tiktoken_tokenizer(_tiktoken_encoding(spec))


def _tiktoken_encoding(name):
    if name == "byte":
        # every byte is its own token and there are no merges, so any pattern that covers all
        # of the text works; big pieces keep the regex cheap
        return tiktoken.Encoding(name="byte", pat_str=r"[\s\S]{1,4096}",
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={"<|endoftext|>": 256})
    if name not in TOKENIZERS:
        raise DataError(f"tokenizer={name!r} is not one of {TOKENIZERS} or hf:DIR (a Hugging Face "
                        "tokenizer directory with tokenizer.json)")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests' ConnectionError, a hash mismatch, ...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache else "TIKTOKEN_CACHE_DIR is not set"
        raise DataError(
            f"cannot load the tiktoken encoding {name!r} ({where}; no network?): {type(e).__name__}: "
            f"{str(e)[:200]}\nFix: on a machine with network run "
            f"`TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"`, "
            f"copy DIR here and set TIKTOKEN_CACHE_DIR=DIR; or use a model's own tokenizer, "
            f"--tokenizer=hf:DIR; or --tokenizer=byte for a model trained from scratch "
            f"(with any source, e.g. a local file or the offline --source=pystdlib).") from e


def _tiktoken_tokenizer(enc):
    special = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    table = []
    for i in range(enc.n_vocab):
        try:
            table.append(b"" if i in special else enc.decode_single_token_bytes(i))
        except KeyError:  # an id in a gap of the vocabulary
            table.append(b"")
    return Tokenizer(enc.name, enc.name, enc, table, special, eos=enc.eot_token)


@functools.lru_cache(maxsize=None)
def _byte_to_unicode():
    """GPT-2's byte-level alphabet: byte -> a printable character (tokenizer.json stores these)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return dict(zip(keep + extra, [chr(c) for c in keep] + [chr(256 + n) for n in range(len(extra))]))


def _hf_tokenizer(directory):
    """Tokenizer of a Hugging Face directory. bos/eos: generation_config.json, then config.json,
    then tokenizer_config.json / special_tokens_map.json; documents start with BOS when
    tokenizer_config says add_bos_token, else when tokenizer.json's post-processor adds it."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer=hf:{directory}: {path} does not exist. Fix: point hf: at a Hugging Face "
                        "model or tokenizer directory that has tokenizer.json (older models with only "
                        "tokenizer.model: save it once with transformers' AutoTokenizer.save_pretrained)")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise DataError("tokenizer=hf:... needs the `tokenizers` package: pip install tokenizers")
    tk = HFTokenizer.from_file(path)
    spec = json.loads(tk.to_str())
    if spec["model"].get("type") not in ("BPE", "Unigram"):
        raise DataError(f"{path}: a {spec['model'].get('type')} tokenizer; only BPE (byte-level or "
                        "SentencePiece-style, as Llama-family models use) and Unigram are supported")
    files = {n: os.path.join(directory, n) for n in ("tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja") if os.path.isfile(os.path.join(directory, n))}
    cfg = {}
    for n in ("special_tokens_map.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        try:
            with open(os.path.join(directory, n)) as f:
                cfg[n] = json.load(f)
        except OSError:
            cfg[n] = {}
        except ValueError as e:
            raise DataError(f"{os.path.join(directory, n)} is not valid JSON: {e}")
    vocab = tk.get_vocab(with_added_tokens=True)
    added = tk.get_added_tokens_decoder()
    special = {i: t.content for i, t in added.items() if t.special}
    table = [b""] * (max(vocab.values()) + 1)
    b2u = {c: b for b, c in _byte_to_unicode().items()}
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    for piece, i in vocab.items():
        if i in special:
            continue
        if i in added:
            table[i] = piece.encode()
        elif byte_level:
            table[i] = bytes(b2u[c] for c in piece) if all(c in b2u for c in piece) else piece.encode()
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
            table[i] = bytes([int(piece[3:5], 16)])
        else:  # SentencePiece / Metaspace: "▁" is a space
            table[i] = piece.replace("\u2581", " ").encode()

    def token_id(key):
        """An id from config files: an int, a list (the first is the document end), a token string,
        or {"content": ...}."""
        for n in ("generation_config.json", "config.json"):
            v = cfg[n].get(f"{key}_token_id")
            if v is not None:
                return v
        for n in ("tokenizer_config.json", "special_tokens_map.json"):
            v = cfg[n].get(f"{key}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if v is not None:
                if v not in vocab:
                    raise DataError(f"{directory}: {n} names {key}_token={v!r}, which is not in tokenizer.json")
                return vocab[v]
        return None
    meta = {}
    if os.path.isfile(os.path.join(directory, META_FILE)):  # written by Tokenizer.save: the facts as resolved
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
    eos = meta.get("stop_ids") or token_id("eos")
    if eos is None:
        raise DataError(f"{directory}: no eos token id in generation_config.json, config.json or "
                        "tokenizer_config.json. Fix: add \"eos_token\": \"<the end-of-text token>\" to "
                        "tokenizer_config.json")
    stop_ids = [eos] if isinstance(eos, int) else list(eos)
    bos = meta["bos"] if "bos" in meta else token_id("bos")
    bos = bos[0] if isinstance(bos, list) else bos
    if "add_bos" in meta:
        add_bos = meta["add_bos"]
    elif "add_bos_token" in cfg["tokenizer_config.json"]:
        add_bos = bool(cfg["tokenizer_config.json"]["add_bos_token"])
    else:  # the post-processor decides: does it put an id before the text?
        with_specials = tk.encode("a", add_special_tokens=True).ids
        add_bos = len(with_specials) > len(tk.encode("a", add_special_tokens=False).ids) and \
            with_specials[0] in special
        if add_bos:
            bos = with_specials[0]
    if add_bos and bos is None:
        raise DataError(f"{directory}: documents start with BOS (add_bos_token) but no bos token is named")
    template = cfg["tokenizer_config.json"].get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if template is None and "chat_template.jinja" in files:
        with open(files["chat_template.jinja"], encoding="utf-8") as f:
            template = f.read()
    name = meta.get("name") or "hf:" + os.path.basename(os.path.normpath(os.path.abspath(directory)))[:60]
    tok = Tokenizer(name, "hf:" + directory, tk, table, special, eos=stop_ids[0], bos=bos, add_bos=add_bos,
                    stop_ids=stop_ids, chat_template=template, files=files)
    if meta.get("sha") and meta["sha"] != tok.sha:
        raise DataError(f"{directory}: {META_FILE} says sha {meta['sha']} but tokenizer.json hashes to "
                        f"{tok.sha}: the files were changed; delete {META_FILE} or restore tokenizer.json")
    return tok


def _tiktoken_to_hf(tok):
    """A `tokenizers` byte-level BPE equal to a tiktoken encoding: the same pre-tokenizing regex,
    vocabulary (ranks are ids) and merges (each token's splits into two tokens of lower rank,
    in rank order, as transformers' TikTokenConverter does). ignore_merges: tiktoken takes a
    whole piece that is in the vocabulary as one token without merging."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    b2u = _byte_to_unicode()
    text = lambda b: "".join(b2u[x] for x in b)
    ranks = {b: i for i, b in enumerate(tok.token_bytes) if b and i not in tok.special}
    merges = []
    for b, r in ranks.items():
        for k in range(1, len(b)):
            left, right = ranks.get(b[:k]), ranks.get(b[k:])
            if left is not None and right is not None and left < r and right < r:
                merges.append((r, left, right, text(b[:k]), text(b[k:])))
    vocab = {text(b): r for b, r in ranks.items()}
    vocab.update({s: i for i, s in tok.special.items()})
    hf = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in sorted(merges)], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.backend._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special.values()])
    return hf


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def encode_docs(texts, tok):
    """list of str -> list of uint token arrays, [BOS] text EOS each; empty texts give []."""
    dtype = token_dtype(tok.n_vocab)
    ids = tok.encode_batch([t or "" for t in texts])
    head = [tok.bos] if tok.add_bos else []
    return [np.array(head + x + [tok.eos] if t else [], dtype=dtype) for t, x in zip(texts, ids)]


# --------------------------------------------------------------------------- .bin files
def _header(dtype, tokenizer_name, vocab_size, num_tokens, eot, tokenizer_sha=None):
    info = dict(dtype=np.dtype(dtype).name, tokenizer=tokenizer_name, vocab_size=int(vocab_size),
                num_tokens=int(num_tokens), eot_token=int(eot))
    if tokenizer_sha:  # absent in files written before it existed: those compare by name
        info["tokenizer_sha"] = tokenizer_sha
    blob = json.dumps(info).encode()
    room = HEADER_BYTES - len(MAGIC) - 4
    if len(blob) > room:
        raise DataError(f"header JSON is {len(blob)} bytes, more than {room}: shorten the tokenizer name")
    return MAGIC + struct.pack("<i", VERSION) + blob.ljust(room, b"\0")


class TokenFile:
    """Appends token chunks to PATH.tmp, then writes the header and renames it to PATH, so a
    half-written file never carries the final name."""

    def __init__(self, path, tokenizer_name, vocab_size, eot, tokenizer_sha=None):
        self.path, self.tokenizer_name, self.vocab_size, self.eot = path, tokenizer_name, vocab_size, eot
        self.tokenizer_sha = tokenizer_sha
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
        self.f.write(_header(self.dtype, self.tokenizer_name, self.vocab_size, self.num_tokens, self.eot,
                             self.tokenizer_sha))
        self.f.close()
        os.replace(self.path + ".tmp", self.path)
        return self.num_tokens


def write_tokens(path, tokens, tokenizer_name, vocab_size, eot, desc=None, quiet=True, tokenizer_sha=None):
    """Write a .bin from one 1-D array/list of ids or an iterable of such chunks; returns the count."""
    if isinstance(tokens, np.ndarray) or (isinstance(tokens, (list, tuple)) and
                                          (not tokens or isinstance(tokens[0], (int, np.integer)))):
        tokens = [tokens]
    out = TokenFile(path, tokenizer_name, vocab_size, eot, tokenizer_sha)
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
    outs = {s: TokenFile(os.path.join(out_dir, f"{s}.bin"), enc.name, enc.n_vocab, enc.eos, enc.sha)
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
    desc = f"local {loader} files {files if len(files) <= 10 else files[:10] + ['...']}"
    if loader == "text" and sample_by == "document":
        big = [f for f in files if os.path.getsize(f) > MAX_DOC_BYTES]
        if big:
            raise DataError(
                f"--source={source!r}: {big[0]} is {os.path.getsize(big[0]):,} bytes, one document with "
                f"--sample_by=document (a .txt file's default), and one document is tokenised whole in memory; "
                f"at most {MAX_DOC_BYTES:,} bytes.\nFix: --sample_by=paragraph (documents separated by a "
                f"blank line) or --sample_by=line, with --streaming for files larger than memory.")
    if loader == "text" and streaming:
        return {"train": TextFiles(files, sample_by)}, desc
    kwargs = dict(sample_by=sample_by) if loader == "text" else {}
    return datasets.load_dataset(loader, data_files={"train": files}, streaming=streaming, **kwargs), desc


class TextFiles:
    """Stream of {"text": document} from local .txt files, split exactly as datasets' "text" loader
    splits them (so --streaming gives the same tokens), reading TEXT_CHUNK_CHARS at a time: memory
    holds one chunk, not the file. (datasets' own streaming loader does this too at ~400 MB more.)"""
    column_names = ["text"]

    def __init__(self, files, sample_by):
        self.files, self.sample_by = files, sample_by

    def __iter__(self):
        for path in self.files:
            try:
                yield from ({"text": t} for t in self._docs(path))
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 ({e}); convert it, e.g. `iconv -f latin1 -t utf-8`")

    def _docs(self, path):
        with open(path, encoding="utf-8") as f:  # text mode: "\r\n" and "\r" read as "\n"
            if self.sample_by == "document":
                yield f.read()
                return
            rest = ""
            while chunk := f.read(TEXT_CHUNK_CHARS):
                chunk = rest + chunk + f.readline()  # end on a whole line
                if self.sample_by == "line":  # only "\n" splits (str.splitlines would split on more)
                    yield from (line.rstrip("\n") for line in io.StringIO(chunk).readlines())
                else:  # paragraph: the last piece may go on in the next chunk; empty ones are dropped
                    *paragraphs, rest = chunk.split("\n\n")
                    yield from (p for p in paragraphs if p)
            if rest:
                yield rest


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
        cols = getattr(ds, "column_names", None)  # None: no split, or a stream that does not know yet
        if cols is not None and text_field not in cols:
            raise DataError(f"{desc} ({s}) has columns {cols} but no {text_field!r}; pick one with --text_field")
        if ds is not None and max_docs:
            splits[s] = itertools.islice(ds, max_docs) if streaming else ds.select(range(min(max_docs, len(ds))))
    val_desc = "the source's validation split" if splits["val"] is not None else \
        f"documents i with floor((i+1)*{val_fraction}) > floor(i*{val_fraction}) of train"
    files = {s: TokenFile(os.path.join(out_dir, f"{s}.bin"), enc.name, enc.n_vocab, enc.eos, enc.sha)
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
    tokenizer None: byte for pystdlib, gpt2 otherwise; hf:DIR a model's own (its files are copied to
    NAME/tokenizer/, documents get its BOS when it adds one). max_docs: at most that many documents
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
    if enc.files:  # an hf tokenizer: train.py copies it into checkpoints from here
        enc.save(os.path.join(out_dir, "tokenizer"))
    meta = dict(name=name, source=source, source_description=desc, tokenizer=enc.name, tokenizer_sha=enc.sha,
                tokenizer_spec=tokenizer, bos_token=enc.bos if enc.add_bos else None,
                vocab_size=enc.n_vocab, eot_token=enc.eos, dtype=np.dtype(token_dtype(enc.n_vocab)).name,
                train_tokens=counts["train"], val_tokens=counts["val"], train_docs=docs["train"],
                val_docs=docs["val"], val_fraction=val_fraction, max_docs=max_docs, command=command,
                format=f"{HEADER_BYTES}-byte header ({MAGIC.decode()}, int32 version {VERSION}, JSON) "
                       f"then the token ids; documents are joined as [bos] doc1 <eot> [bos] doc2 <eot> ... "
                       f"(bos only when the tokenizer adds one)")
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if not quiet:
        for s in ("train", "val"):
            print(f"{os.path.join(out_dir, s + '.bin')}: {counts[s]:,} tokens from {docs[s]:,} documents")
        print(f"tokenizer {enc.name} (sha {enc.sha}, vocab_size {enc.n_vocab}, eos {enc.eos}, "
              f"bos {meta['bos_token']}, {meta['dtype']}); "
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
    p.add_argument("--tokenizer", help=f"one of {', '.join(TOKENIZERS)} or hf:DIR (a Hugging Face model or "
                   "tokenizer directory); default: byte for pystdlib, else gpt2")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--text_field", default="text", help="column holding the text (hf and json/parquet)")
    p.add_argument("--streaming", action="store_true", help="read the source a batch at a time: a large hf "
                   "dataset without downloading it whole, local files larger than memory")
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
