"""Perplexity of a model on a text file or a prepared token file, in nats, bits and bits per byte.

    python eval_ppl.py --init_from=out --text=book.txt
    python eval_ppl.py --init_from=out --dataset=pystdlib --split=val --json
    python eval_ppl.py --init_from=hf:/path/to/llama --tokenizer=gpt2 --text=a.txt --stride=512

Windows of --block_size tokens (default: the model's max_seq_len) are non-overlapping by
default; --stride smaller than the block slides them, so that every token after the first
window is scored with at least block_size - stride tokens of context. This is the loop of
the transformers perplexity guide (docs: perplexity.md), token for token.
"""
import argparse
import json
import math
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sample import DTYPES, autocast, default_device, check_vocab, get_encoding, load_checkpoint

# --------------------------------------------------------------------------- the math
# Book 8.1-8.4. Over the N scored tokens x_t, each predicted from the tokens before it:
#   NLL = -(1/N) sum_t ln p(x_t | x_<t)       mean negative log-likelihood, nats per token
#   H   = NLL / ln 2                          the same in bits per token (cross-entropy)
#   PPL = exp(NLL) = 2^H                      perplexity
#   bits per byte = N * H / B                 B = UTF-8 bytes of the scored tokens; unlike PPL it
#                                             does not depend on how the tokenizer cuts the text


def summarize(nll_sum, n_tokens, n_bytes):
    nll = nll_sum / n_tokens
    bits = nll / math.log(2)
    return {"nll_nats": nll, "nll_bits": bits, "ppl": math.exp(nll), "tokens": n_tokens, "bytes": n_bytes,
            "bits_per_byte": nll_sum / math.log(2) / n_bytes if n_bytes else None}


# --------------------------------------------------------------------------- windows
def windows(n_tokens, block_size, stride):
    """[(begin, end, n_context)]: the model reads tokens[begin:end-1] and is scored on predicting
    tokens[begin+1:end], except the first n_context of them, already scored by an earlier window
    (the guide's labels = -100). Windows start at 0, stride, 2*stride, ... as in the guide; the
    first token of the text, and with stride = block_size the first of each window, is context only."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        out.append((begin, end, max(prev_end - begin - 1, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_byte_lengths(enc):
    """UTF-8 bytes of each token id as decoded; special tokens (end-of-text) count 0."""
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    for i in range(enc.n_vocab):
        try:
            lengths[i] = 0 if i in special else len(enc.decode_single_token_bytes(i))
        except KeyError:  # an id in a gap of the vocabulary
            pass
    return lengths


@torch.no_grad()
def evaluate(model, tokens, block_size=None, stride=None, batch_size=8, token_bytes=None,
             ctx=nullcontext(), progress=True):
    """Sum of -ln p over the scored tokens of `tokens` (1-D ids), windows as above."""
    block_size = block_size or model.config.max_seq_len
    stride = stride or block_size
    n = len(tokens)
    if not 2 <= block_size <= model.config.max_seq_len:
        raise ValueError(f"block_size={block_size} must be in [2, max_seq_len={model.config.max_seq_len}]")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride={stride} must be in [1, block_size={block_size}]")
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n}")
    tokens = np.asarray(tokens)  # a memmap stays on disk: only the windows are read
    ids = lambda lo, hi: torch.from_numpy(tokens[lo:hi].astype(np.int64))
    device = next(model.parameters()).device
    wins = windows(n, block_size, stride)
    nll_sum, n_scored, n_bytes = 0.0, 0, 0
    bar = tqdm(total=len(wins), desc="windows", unit="win", disable=not progress, file=sys.stderr)
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        T = max(end - begin - 1 for begin, end, _ in group)
        x = torch.zeros(len(group), T, dtype=torch.long)  # (B, T); the last window may be shorter:
        y = torch.full((len(group), T), -1, dtype=torch.long)  # pad at the end (causal: harmless)
        for row, (begin, end, n_ctx) in enumerate(group):
            x[row, :end - begin - 1] = ids(begin, end - 1)
            y[row, n_ctx:end - begin - 1] = ids(begin + 1 + n_ctx, end)
        with ctx:
            logits, _ = model(x.to(device))  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-1,
                              reduction="sum")
        nll_sum += float(nll)
        scored = y[y >= 0]
        n_scored += scored.numel()
        if token_bytes is not None:
            n_bytes += int(token_bytes[scored.numpy()].sum())
        bar.update(len(group))
    bar.close()
    out = summarize(nll_sum, n_scored, n_bytes if token_bytes is not None else 0)
    out.update(windows=len(wins), block_size=block_size, stride=stride)
    return out


# --------------------------------------------------------------------------- main
def read_tokens(a, model_tokenizer, vocab_size):
    """(1-D token ids, tokenizer name) from --text, --tokens or --dataset/--split."""
    if a.text:
        name = model_tokenizer or a.tokenizer or "gpt2"
        try:
            with open(a.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read --text={a.text}: {e}")
        return np.array(get_encoding(name).encode_ordinary(text), dtype=np.int64), name
    from prepare import load_tokens
    path = a.tokens or f"{a.data_dir}/{a.dataset}/{a.split}.bin"
    try:
        tokens, header = load_tokens(path, expected_vocab_size=vocab_size)
    except ValueError as e:  # prepare.DataError names the file and the fix
        raise SystemExit(f"error: {e}")
    name = header.get("tokenizer")
    if model_tokenizer and name and name != model_tokenizer:
        raise SystemExit(f"error: {path} was tokenized with {name!r} but the model with {model_tokenizer!r}; "
                         f"prepare the data again with --tokenizer={model_tokenizer}")
    return tokens, model_tokenizer or name or a.tokenizer or "gpt2"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="out", help="out_dir, checkpoint folder, or hf:<dir> (default: out)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="a UTF-8 text file, tokenized here")
    src.add_argument("--tokens", help="a token file written by prepare.py (.bin)")
    src.add_argument("--dataset", help="shortcut for --tokens=<data_dir>/<dataset>/<split>.bin")
    p.add_argument("--split", default="val")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--block_size", type=int, default=None, help="window length (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: block_size, non-overlapping)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--tokenizer", default=None, help="for hf:<dir> models (default gpt2); a checkpoint names its own")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    a = p.parse_args(argv)
    if not (a.text or a.tokens or a.dataset):
        p.error("pass --text FILE, --tokens FILE.bin or --dataset NAME (with --split)")

    model, model_tokenizer = load_checkpoint(a.init_from, a.device)
    model.eval()
    tokens, name = read_tokens(a, model_tokenizer, model.config.vocab_size)
    enc = get_encoding(name)
    check_vocab(enc, model)
    if a.max_tokens:
        tokens = tokens[:a.max_tokens]
    try:
        r = evaluate(model, tokens, a.block_size, a.stride, a.batch_size, token_byte_lengths(enc),
                     autocast(a.device, a.dtype), progress=True)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    r.update(tokenizer=name, init_from=a.init_from, source=a.text or a.tokens or f"{a.dataset}/{a.split}")
    if a.json:
        print(json.dumps(r))
        return
    print(f"scored {r['tokens']} tokens ({r['bytes']} bytes) in {r['windows']} windows of "
          f"{r['block_size']} tokens, stride {r['stride']}")
    print(f"NLL = {r['nll_nats']:.4f} nats/token = {r['nll_bits']:.4f} bits/token")
    print(f"PPL = exp(NLL) = 2^H = {r['ppl']:.3f}")
    if r["bits_per_byte"] is not None:
        print(f"bits per byte = {r['bits_per_byte']:.4f}")


if __name__ == "__main__":
    main()
