"""Generate text from a trained model (or a local Hugging Face Llama) with the KV cache.

    python sample.py --init_from=out --start="Once upon a time" --num_samples=3
    python sample.py --init_from=hf:/path/to/SmolLM2 --start=FILE:prompt.txt
    python sample.py --init_from=hf:/path/to/SmolLM2 --chat --start="What is 2+2?"
    python sample.py --temperature=0            # greedy: the same text every run

The tokenizer is the model's own: the one a checkpoint was trained with (its files travel in
the checkpoint), or an hf:<dir>'s tokenizer.json; --tokenizer must name the same one (or serve a
directory that has none). Tokens are printed as they are produced. Generation stops at an
end-of-text token (eos; for hf, any of generation_config's eos ids), after --max_new_tokens, or
when the sequence reaches the model's max_seq_len.
"""
import argparse
import sys
import time
from contextlib import nullcontext

import torch

from model import ATTN_IMPLS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- loading (shared with eval_ppl.py)
def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device, dtype):
    """Weights stay float32; matmuls run in dtype under autocast (float32: no autocast)."""
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype={dtype!r} is not one of {list(DTYPES)}")
    if DTYPES[dtype] == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def get_encoding(spec):
    """prepare.get_tokenizer (a prepare.Tokenizer); offline, its error says how to get the files."""
    from prepare import get_tokenizer
    try:
        return get_tokenizer(spec)
    except ValueError as e:  # prepare.DataError: unknown name, missing files, BPE files not downloadable
        raise SystemExit(f"error: {e}")


def load_checkpoint(init_from, device, **config_overrides):
    """checkpoint.load_model, with a one-line error instead of a traceback."""
    from checkpoint import CheckpointError, load_model
    try:
        return load_model(init_from, device, **config_overrides)
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load --init_from={init_from}: {e}")


def model_tokenizer(init_from, model_tok, flag=None):
    """The Tokenizer to use with a model whose tokenizer record (checkpoint.load_model) is
    model_tok: the model's own; --tokenizer (flag) must be the same one, and is needed only
    when the model names none (an hf:<dir> without tokenizer.json)."""
    from prepare import describe, same_tokenizer
    if flag is None and model_tok is None:
        raise SystemExit(f"error: --init_from={init_from} has no tokenizer (no tokenizer.json there). Fix: "
                         f"pass the one it was trained with, --tokenizer=hf:DIR (a directory with "
                         f"tokenizer.json) or byte / gpt2 / cl100k_base / o200k_base")
    tok = get_encoding(flag or model_tok["spec"])
    if model_tok is not None and not same_tokenizer(tok.identity(), model_tok):
        what = f"--tokenizer={flag}" if flag else f"the tokenizer files at {model_tok['spec']}"
        raise SystemExit(f"error: {what} is {describe(tok.identity())} but the model --init_from={init_from} "
                         f"was trained with {describe(model_tok)}: its token ids mean other text. Fix: leave "
                         f"--tokenizer out (the model's own tokenizer is the default)")
    return tok


def load(init_from, device, tokenizer=None, **config_overrides):
    """(model in eval mode, its prepare.Tokenizer); see model_tokenizer. config_overrides: ModelConfig
    fields that change how it computes, not what (attn_impl)."""
    model, model_tok = load_checkpoint(init_from, device, **config_overrides)
    tok = model_tokenizer(init_from, model_tok, tokenizer)
    check_vocab(tok, model)
    return model.eval(), tok


def check_vocab(tok, model):
    if tok.n_vocab > model.config.vocab_size:
        raise SystemExit(f"error: tokenizer {tok.name!r} has {tok.n_vocab} tokens but the model's vocab_size "
                         f"is {model.config.vocab_size}: it is not the model's tokenizer. Fix: pass the "
                         f"--tokenizer the model was trained with")


# --------------------------------------------------------------------------- sampling
def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (V,) float32 -> one token id. temperature 0 is greedy (argmax).
    Order as in transformers: temperature, then top-k, then top-p (nucleus)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability sums to >= top_p
        probs, order = logits.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = order[before >= top_p]  # the most likely token has before = 0, so it always stays
        logits = logits.index_fill(0, drop, float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot=None,
             generator=None, vocab_limit=None, ctx=nullcontext(), cache_dtype=None, stats=None):
    """Yield up to max_new_tokens ids after the prompt (list of ids), one at a time.
    The prompt is run once to fill the KV cache (prefill); each new token then costs one
    forward of a single position at start_pos = its index. Stops before yielding eot.
    vocab_limit: ids >= it (padding of the embedding table) are never sampled.
    stats: a dict that gets prompt_tokens, new_tokens, prefill_s (prompt forward + first
    sample) and decode_s, decode_steps (the later forwards), time inside this function only."""
    max_len = model.config.max_seq_len
    if not prompt:
        raise ValueError("empty prompt: pass at least one token (sample.py starts from end-of-text)")
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the model's max_seq_len is {max_len}; "
                         "shorten --start")
    if len(prompt) + max_new_tokens > max_len:
        print(f"\n[note: max_new_tokens={max_new_tokens} cropped to {max_len - len(prompt)}: "
              f"the prompt ({len(prompt)} tokens) plus new tokens may not exceed max_seq_len={max_len}]",
              file=sys.stderr)
        max_new_tokens = max_len - len(prompt)
    device = next(model.parameters()).device
    # the cache holds the positions this call can reach, not the model's whole context
    cache = model.new_kv_cache(1, dtype=cache_dtype, max_len=len(prompt) + max_new_tokens)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T) first, then (1, 1)
    pos = 0
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(prompt), new_tokens=0, prefill_s=0.0, decode_s=0.0, decode_steps=0)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        with ctx:
            logits, _ = model(tokens, cache=cache, start_pos=pos)  # (1, T, V)
        logits = logits[0, -1].float()
        if vocab_limit is not None:
            logits[vocab_limit:] = float("-inf")
        nxt = sample_next(logits.cpu(), temperature, top_k, top_p, generator)  # .cpu() waits for the device
        if step == 0:
            stats["prefill_s"] = time.perf_counter() - t0
        else:
            stats["decode_s"] += time.perf_counter() - t0
            stats["decode_steps"] += 1
        if nxt == eot or (isinstance(eot, tuple) and nxt in eot):  # eot: an id or a tuple of stop ids
            return
        stats["new_tokens"] += 1
        yield nxt
        pos += tokens.shape[1]
        tokens = torch.tensor([[nxt]], dtype=torch.long, device=device)


def throughput(stats):
    """One line from generate()'s stats."""
    rate = stats["decode_steps"] / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    return (f"[{stats['prompt_tokens']} prompt tokens, {stats['new_tokens']} new | prefill "
            f"{stats['prefill_s'] * 1e3:.1f} ms | decode {rate:.1f} tokens/s]")


def stream(token_ids, tok, out=None, at_start=False):
    """Print tokens as they come (Tokenizer.decode_stream holds back partial UTF-8 characters:
    a byte-level token can be half of one). Returns the ids."""
    out = out or sys.stdout
    ids = []

    def consumed():
        for t in token_ids:
            ids.append(t)
            yield t
    for piece in tok.decode_stream(consumed(), at_start):
        out.write(piece)
        out.flush()
    return ids


# --------------------------------------------------------------------------- main
def read_start(start):
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    return start


def check_args(a):
    if a.temperature < 0:
        raise SystemExit(f"--temperature={a.temperature} must be >= 0 (0 = greedy)")
    if a.top_k is not None and a.top_k < 1:
        raise SystemExit(f"--top_k={a.top_k} must be >= 1 (leave it out for no top-k)")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise SystemExit(f"--top_p={a.top_p} must be in (0, 1]")
    if a.num_samples < 1 or a.max_new_tokens < 0:
        raise SystemExit(f"--num_samples={a.num_samples} must be >= 1 and --max_new_tokens={a.max_new_tokens} >= 0")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="out", help="out_dir, checkpoint folder, or hf:<dir> (default: out)")
    p.add_argument("--start", default="", help="prompt text, or FILE:path; empty = start of a document")
    p.add_argument("--chat", action="store_true", help="--start is a user message: apply the tokenizer's chat "
                   "template (with the assistant's turn opened) and print the reply")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (deterministic)")
    p.add_argument("--top_k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus: smallest set with probability >= p")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokenizer", default=None, help="byte | gpt2 | cl100k_base | o200k_base | hf:DIR; default "
                   "and required to match: the model's own (needed only for an hf:<dir> without tokenizer.json)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--attn_impl", default=None, choices=ATTN_IMPLS, help="attention (model.ModelConfig.attn_impl); "
                   "default: the model's (a checkpoint's own, auto for hf:<dir>)")
    a = p.parse_args(argv)
    check_args(a)

    model, enc = load(a.init_from, a.device, a.tokenizer,
                      **({"attn_impl": a.attn_impl} if a.attn_impl else {}))
    ctx = autocast(a.device, a.dtype)
    cache_dtype = None if a.dtype == "float32" else DTYPES[a.dtype]  # k/v come out of autocast in dtype
    text = read_start(a.start)
    if a.chat:
        try:
            prompt = enc.encode(enc.render_chat([{"role": "user", "content": text}]), allow_special=True)
        except ValueError as e:  # prepare.DataError: no template, or the template refused
            raise SystemExit(f"error: --chat: {e}")
        text = ""  # print only the reply
    else:  # a document: [BOS] text, or just its start (BOS, else the previous document's end)
        head = [enc.bos] if enc.add_bos else []
        prompt = head + enc.encode(text, allow_special=True) if text else head or [enc.eos]
    gen = torch.Generator().manual_seed(a.seed)  # sampling runs on CPU: same seed, same text on any device
    for i in range(a.num_samples):
        sys.stdout.write(text)
        stats = {}
        stream(generate(model, prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, enc.stop_ids,
                        gen, enc.n_vocab, ctx, cache_dtype, stats), enc,
               at_start=not text and not a.chat)
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(throughput(stats), file=sys.stderr)
        sys.stdout.write("-" * 40 + "\n" if i < a.num_samples - 1 else "")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
