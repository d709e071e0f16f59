"""Perplexity of a model on a text file or a prepared token file, in nats, bits and bits per byte.

    python eval_ppl.py --init_from=out --text=book.txt
    python eval_ppl.py --init_from=out --dataset=pystdlib --split=val --json
    python eval_ppl.py --init_from=hf:/path/to/SmolLM2 --text=a.txt --block_size=512 --stride=256
    python eval_ppl.py --init_from=out          # the run's own validation split (its dataset/data_dir)

Windows of --block_size tokens (default: the model's max_seq_len) are non-overlapping by
default; --stride smaller than the block slides them, so that every token after the first
window is scored with at least block_size - stride tokens of context. This is the loop of
the transformers perplexity guide (docs: perplexity.md), token for token. The tokenizer is the
model's own (see sample.py); --text starts with BOS when the tokenizer's family adds one, as
the guide's tokenizer(text) call does.
"""
import argparse
import json
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sample import DTYPES, autocast, default_device, check_vocab, load_checkpoint, model_tokenizer

# --------------------------------------------------------------------------- the math
# Book 8.1-8.4. Over the N scored tokens x_t, each predicted from the tokens before it:
#   NLL = -(1/N) sum_t ln p(x_t | x_<t)       mean negative log-likelihood, nats per token
#   H   = NLL / ln 2                          the same in bits per token (cross-entropy)
#   PPL = exp(NLL) = 2^H                      perplexity
#   bits per byte = N * H / B                 B = UTF-8 bytes of the text of the scored tokens
#                                             (Tokenizer.count_bytes); unlike PPL it does not
#                                             depend on how the tokenizer cuts the text


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


@torch.no_grad()
def evaluate(model, tokens, block_size=None, stride=None, batch_size=8, count_bytes=None,
             ctx=nullcontext(), progress=True):
    """Sum of -ln p over the scored tokens of `tokens` (1-D ids), windows as above.
    count_bytes(prev, ids): bytes of text the scored ids stand for (Tokenizer.count_bytes)."""
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
        scored = y >= 0
        n_scored += int(scored.sum())
        if count_bytes is not None:  # x holds the token before each target
            n_bytes += count_bytes(x[scored].numpy(), y[scored].numpy())
        bar.update(len(group))
    bar.close()
    out = summarize(nll_sum, n_scored, n_bytes if count_bytes is not None else 0)
    out.update(windows=len(wins), block_size=block_size, stride=stride)
    return out


# --------------------------------------------------------------------------- main
def read_tokens(a, model_tok, vocab_size):
    """(1-D token ids, Tokenizer) from --text, --tokens or --dataset/--split; model_tok: the
    model's tokenizer record (checkpoint.load_model)."""
    if a.text:
        tok = model_tokenizer(a.init_from, model_tok, a.tokenizer)
        try:
            with open(a.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read --text={a.text}: {e}")
        head = [tok.bos] if tok.add_bos else []
        return np.array(head + tok.encode(text), dtype=np.int64), tok
    from prepare import describe, load_tokens, same_tokenizer
    path = a.tokens or os.path.join(a.data_dir, a.dataset, f"{a.split}.bin")
    try:
        tokens, header = load_tokens(path, expected_vocab_size=vocab_size)
    except ValueError as e:  # prepare.DataError names the file and the fix
        raise SystemExit(f"error: {e}")
    data_tok = {"name": header.get("tokenizer"), "sha": header.get("tokenizer_sha")}
    if model_tok is not None and not same_tokenizer(model_tok, data_tok):
        raise SystemExit(f"error: {path} was tokenized with {describe(data_tok)} but the model --init_from="
                         f"{a.init_from} with {describe(model_tok)}: its ids mean other text. Fix: prepare the "
                         f"data again with --tokenizer={model_tok['spec']}, or pass that model's tokens")
    if model_tok is None and a.tokenizer is None:  # the data's own tokenizer: its files, else its name
        folder = os.path.join(os.path.dirname(path), "tokenizer")
        spec = "hf:" + folder if os.path.exists(os.path.join(folder, "tokenizer.json")) else data_tok["name"]
        model_tok = {**data_tok, "spec": spec}
    tok = model_tokenizer(a.init_from, model_tok, a.tokenizer)
    if not same_tokenizer(tok.identity(), data_tok):
        raise SystemExit(f"error: {path} was tokenized with {describe(data_tok)}, not --tokenizer={a.tokenizer} "
                         f"({describe(tok.identity())}). Fix: leave --tokenizer out")
    return tokens, tok


def default_split(a):
    """--init_from=<a training run> with no data flag: its own dataset and data_dir (saved config)."""
    from checkpoint import CheckpointError, load, resolve
    if a.init_from.startswith("hf:"):
        raise SystemExit("error: pass --text FILE, --tokens FILE.bin or --dataset NAME (with --split); an "
                         "hf: model has no dataset of its own")
    try:
        cfg = load(resolve(a.init_from), "train_state.pt").get("config") or {}
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"error: cannot load --init_from={a.init_from}: {e}")
    if not cfg.get("dataset"):
        raise SystemExit(f"error: {a.init_from} records no dataset; pass --text, --tokens or --dataset")
    a.dataset, a.data_dir = cfg["dataset"], cfg.get("data_dir", a.data_dir)


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
    p.add_argument("--tokenizer", default=None, help="default and required to match: the model's own (needed "
                   "only for an hf:<dir> without tokenizer.json)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    a = p.parse_args(argv)
    if not (a.text or a.tokens or a.dataset):
        default_split(a)

    model, model_tok = load_checkpoint(a.init_from, a.device)
    model.eval()
    tokens, tok = read_tokens(a, model_tok, model.config.vocab_size)
    check_vocab(tok, model)
    if a.max_tokens:
        tokens = tokens[:a.max_tokens]
    try:
        r = evaluate(model, tokens, a.block_size, a.stride, a.batch_size, tok.count_bytes,
                     autocast(a.device, a.dtype), progress=True)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    r.update(tokenizer=tok.name, init_from=a.init_from, source=a.text or a.tokens or f"{a.dataset}/{a.split}")
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
