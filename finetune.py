"""Supervised fine-tuning (the book's chapter 5: instruction data 5.4, LoRA 5.5) on train.py's loop.

  python finetune.py configs/sft_smollm2.py --init_from=hf:DIR --data=chat.jsonl
  torchrun --nproc_per_node=2 finetune.py configs/sft_smollm2.py --init_from=hf:DIR --data=chat.jsonl
  python sample.py --init_from=hf:out/sft_smollm2/hf --chat --start="..."     the result

This file owns only what fine-tuning adds; the loop, the layouts, the optimizer and the
checkpoints are train.py's (train.train(cfg, data, adapt)):
  SFTData   JSON lines, each {"messages": [{"role", "content"}, ...]} or {"prompt", "response"
            [, "system"]}, rendered with the tokenizer's chat template (BUILTIN_TEMPLATE when it
            has none); targets are the next tokens of the assistant turns only, -1 elsewhere
            (model.cross_entropy ignores -1), one conversation per row padded to block_size, or
            (pack=True) several per row with document masking (model.document_mask).
  LoRA      W x + (alpha/r) B A x on the target projections, W frozen (arXiv 2106.09685).
  export    at the end: out_dir/hf, a Hugging Face directory with the adapters merged into W;
            with LoRA also out_dir/adapter, the adapters alone in PEFT's format.
"""
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import parallel
import train
from model import _OURS_TO_HF, Transformer, config_from_dict
from prepare import DataError, get_tokenizer, is_val

# transformers' projection names (PEFT's target_modules) -> ours
LORA_TARGETS = {"q": ("attention", "wq", "q_proj"), "k": ("attention", "wk", "k_proj"),
                "v": ("attention", "wv", "v_proj"), "o": ("attention", "wo", "o_proj"),
                "gate": ("feed_forward", "w1", "gate_proj"), "up": ("feed_forward", "w3", "up_proj"),
                "down": ("feed_forward", "w2", "down_proj")}
# ChatML, for tokenizers without a chat template; each turn ends with the tokenizer's eos token,
# so the model learns to stop. Used for training only (sample.py --chat needs the tokenizer's own).
BUILTIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class FinetuneConfig(train.Config):
    data: str = ""  # JSON lines of conversations (see the module docstring)
    val_fraction: float = 0.05  # every 1/val_fraction-th conversation is held out for the validation loss
    pack: bool = False  # several conversations per row, each attending only to itself (document masking)
    tokenizer: str = ""  # "": the model's (init_from=hf:<dir>); a get_tokenizer spec for a model from scratch
    lora_rank: int = 0  # r; 0: full fine-tuning
    lora_alpha: float = 16.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_targets: str = "q,k,v,o,gate,up,down"  # comma-separated, of LORA_TARGETS


def load_config(argv):
    cfg = train.load_config(argv, FinetuneConfig)
    if not cfg.data:
        raise train.UserError("config key data is empty: pass --data=FILE.jsonl (JSON lines with "
                              "'messages' or 'prompt'/'response')")
    if not 0 < cfg.val_fraction < 1:
        raise train.UserError(f"config key val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.lora_rank < 0 or not 0 <= cfg.lora_dropout < 1:
        raise train.UserError(f"lora_rank={cfg.lora_rank} must be >= 0 and lora_dropout={cfg.lora_dropout} in [0, 1)")
    bad = [t for t in lora_targets(cfg) if t not in LORA_TARGETS]
    if bad or not lora_targets(cfg):
        raise train.UserError(f"config key lora_targets={cfg.lora_targets!r}: {bad or 'empty'}; pick from "
                              f"{','.join(LORA_TARGETS)}")
    return cfg


def lora_targets(cfg):
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


# --------------------------------------------------------------------------- data
def read_conversations(path):
    """[(line number, messages)] of a JSON-lines file; a bad line is a DataError naming it."""
    if not os.path.isfile(path):
        raise DataError(f"data={path!r}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not JSON ({e})")
            if isinstance(rec, dict) and "messages" in rec:
                msgs = rec["messages"]
            elif isinstance(rec, dict) and "prompt" in rec and "response" in rec:
                msgs = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + \
                       [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
            else:
                raise DataError(f"{where}: expected an object with 'messages' or with 'prompt' and 'response', "
                                f"got {line.strip()[:80]!r}")
            if not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise DataError(f"{where}: messages must be a list of {{'role': str, 'content': str}}")
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{where}: no assistant message: nothing to learn from this conversation")
            out.append((n, [{"role": m["role"], "content": m["content"]} for m in msgs]))
    if not out:
        raise DataError(f"data={path!r} holds no conversations")
    return out


def tokenize_conversation(tok, messages, where):
    """(ids, assistant) int64 arrays: the rendered conversation's tokens and a mask of those that
    belong to assistant turns (their content and the template's end of turn). Each assistant turn
    starts where the template's generation prompt for the preceding messages ends, so the
    prompt is tokenized exactly as sample.py --chat tokenizes it; the turn ends where the
    conversation rendered up to it ends. Pieces are tokenized separately and concatenated."""
    full = tok.render_chat(messages, add_generation_prompt=False)
    cuts, spans = [0], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tok.render_chat(messages[:i], add_generation_prompt=True)
        end = tok.render_chat(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and cuts[-1] <= len(start) < len(end)):
            raise DataError(f"{where}: the chat template of {tok.name} does not render this conversation "
                            "turn by turn (a prefix renders differently); mark assistant spans needs that")
        cuts += [len(start), len(end)]
        spans.append(len(cuts) - 2)  # piece index of this assistant turn
    cuts.append(len(full))
    ids, mask = [], []
    for j in range(len(cuts) - 1):
        piece = tok.encode(full[cuts[j]:cuts[j + 1]], allow_special=True) if cuts[j + 1] > cuts[j] else []
        ids += piece
        mask += [j in spans] * len(piece)
    if tok.add_bos and tok.bos is not None:
        ids, mask = [tok.bos] + ids, [False] + mask
    return np.array(ids, dtype=np.int64), np.array(mask, dtype=bool)


class SFTData:
    """The fine-tuning data of a run, tokenized in memory: per split a list of (x, y, doc) rows of
    at most block_size tokens (y: the next token where it is an assistant token, else -1; doc: each
    token's conversation within the row). pack=False: one conversation per row; pack=True: the
    conversations in file order, as many per row as fit whole. The batch of step t is drawn from
    (seed, split, t) alone, as train.batch_offsets does, so every layout sees the same rows.
    Conversations longer than block_size + 1 tokens are cut; one left with no assistant target
    is dropped (both counted in the log)."""

    def __init__(self, cfg, tokenizer, vocab_size):
        self.tokenizer = tokenizer
        if tokenizer.chat_template is None:  # documented: BUILTIN_TEMPLATE, with eos ending each turn
            tokenizer.chat_template = BUILTIN_TEMPLATE
        self.pad = tokenizer.eos
        self.rows = {"train": [], "val": []}
        cut = dropped = 0
        for i, (n, msgs) in enumerate(read_conversations(cfg.data)):
            ids, mask = tokenize_conversation(tokenizer, msgs, f"{cfg.data}, line {n}")
            if ids.max() >= vocab_size:
                raise DataError(f"{cfg.data}, line {n}: token id {ids.max()} >= the model's vocab_size {vocab_size}")
            cut += len(ids) > cfg.block_size + 1
            ids, mask = ids[:cfg.block_size + 1], mask[:cfg.block_size + 1]
            y = np.where(mask[1:], ids[1:], -1)
            if (y < 0).all():
                dropped += 1
                continue
            self.rows["val" if is_val(i, cfg.val_fraction) else "train"].append((ids[:-1], y))
        self.pack = cfg.pack
        for split, convs in self.rows.items():
            rows = []
            for x, y in convs:
                if cfg.pack and rows and len(rows[-1][0]) + len(x) <= cfg.block_size:
                    px, py, pd = rows[-1]
                    rows[-1] = (np.concatenate([px, x]), np.concatenate([py, y]),
                                np.concatenate([pd, np.full(len(x), pd[-1] + 1)]))
                else:
                    rows.append((x, y, np.zeros(len(x), dtype=np.int64)))
            self.rows[split] = rows
        for split, rows in self.rows.items():
            if not rows:
                raise DataError(f"data={cfg.data!r}: no {split} conversation with an assistant token within "
                                f"block_size={cfg.block_size} (val_fraction={cfg.val_fraction}); add data or "
                                "raise block_size / val_fraction")
        self.summary = (f"data {cfg.data}: {len(self.rows['train'])} train / {len(self.rows['val'])} val "
                        f"{'packed rows' if cfg.pack else 'conversations'}, {cut} cut to block_size={cfg.block_size}, {dropped} dropped "
                        f"(no assistant token left) | chat template: "
                        f"{'built-in' if tokenizer.chat_template is BUILTIN_TEMPLATE else tokenizer.name}")

    def micro_batches(self, cfg, step, split, mesh, device):
        """This dp rank's contiguous share of the step's global batch, as (x, y) micro-batches, or
        (x, y, doc_ids) when packed (padding is a document of its own: doc id block_size)."""
        rows = self.rows[split]
        rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, step])
        pick = rng.integers(0, len(rows), size=cfg.batch_size)
        per_rank = cfg.batch_size // mesh.dp
        x = np.full((per_rank, cfg.block_size), self.pad, dtype=np.int64)
        y = np.full((per_rank, cfg.block_size), -1, dtype=np.int64)
        doc = np.full((per_rank, cfg.block_size), cfg.block_size, dtype=np.int64)
        for r, k in enumerate(pick[mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank]):
            n = len(rows[k][0])
            x[r, :n], y[r, :n], doc[r, :n] = rows[k]
        x, y, doc = (torch.from_numpy(a).to(device) for a in (x, y, doc))
        mb = cfg.micro_batch_size
        return [(x[i:i + mb], y[i:i + mb]) + ((doc[i:i + mb],) if self.pack else ())
                for i in range(0, per_rank, mb)]


# --------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x) (arXiv 2106.09685, eq. 3), W (out, in) frozen, A (r, in)
    Kaiming-uniform as PEFT initializes it (from its own generator, seeded by the projection's
    name: every layout draws the same A), B (out, r) zero, so training starts at the base model.
    `weight` is the base Linear's own parameter: its name, and so checkpoints and exports, stay.
    Under tensor parallelism each adapter is split as its base matrix (parallel.py, 4.2-4.3):
      column-parallel W_i (rows): B_i its rows, A whole; A's gradient is a partial sum on each rank
        (from B_i only), summed over tp;
      row-parallel W_i (columns): A_i its columns, B whole; B A_i x_i joins W_i x_i before the one
        all-reduce (g), so sum_i B A_i x_i = B A x; B's gradient is partial on each rank, summed."""

    def __init__(self, base, r, alpha, dropout, seed, mesh=None):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        column, row = isinstance(base, parallel.ColumnParallelLinear), isinstance(base, parallel.RowParallelLinear)
        out_dim = base.weight.shape[0] * (base.weight.tp_shards if column else 1)
        in_dim = base.weight.shape[1] * (mesh.tp if row else 1)
        A = torch.empty(r, in_dim, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        B = torch.zeros(out_dim, r, dtype=torch.float32)
        self.lora_A = parallel._shard(A, 1, mesh) if row else nn.Parameter(A)
        self.lora_B = parallel._shard(B, 0, mesh, base.weight.tp_shards) if column else nn.Parameter(B)
        if column:
            parallel._sum_grad_over(self.lora_A, mesh.tp_group)
        if row:
            parallel._sum_grad_over(self.lora_B, mesh.tp_group)
        self.leave_tp = (base.group, base.sequence_parallel) if row else None
        self.scale, self.dropout = alpha / r, nn.Dropout(dropout)

    def forward(self, x):
        y = F.linear(x, self.weight) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return parallel.leave_tp(y, *self.leave_tp) if self.leave_tp else y

    def merged_weight(self):
        """W + (alpha / r) B A, in W's dtype: the same map with the adapter folded in (export)."""
        return (self.weight.float() + self.scale * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype)


def add_lora(model, cfg, mesh=None):
    """Freeze every parameter and put LoRALinear on the target projections of every layer this
    rank holds (mesh: the tp layout, when parallel.tensor_parallel has split the model)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for key, layer in model.layers.items():
        for t in lora_targets(cfg):
            parent, name, _ = LORA_TARGETS[t]
            owner = getattr(layer, parent)
            seed = cfg.seed * 1_000_003 + zlib.crc32(f"layers.{key}.{parent}.{name}".encode())
            setattr(owner, name, LoRALinear(getattr(owner, name), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                            seed, mesh))
    return model


def lora_modules(model):
    """{our name of the projection ('layers.0.attention.wq'): LoRALinear}."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def make_adapt(cfg, log):
    """train.train's adapt: LoRA when lora_rank > 0 (frozen matrices stored in bf16 when the run
    computes in bf16 on a GPU), and the parameter and optimizer memory in the log."""
    def adapt(model, mesh, device, dtype):
        total = model.num_params()
        if cfg.lora_rank:
            kv = {"k", "v"} & set(lora_targets(cfg))
            if kv and model.config.n_kv_heads < mesh.tp:
                raise train.UserError(f"lora_targets={cfg.lora_targets!r} with tp={mesh.tp} > n_kv_heads="
                                      f"{model.config.n_kv_heads}: LoRA on kv heads that several tp ranks share is not "
                                      f"implemented; drop {sorted(kv)} from lora_targets or use tp <= n_kv_heads")
            add_lora(model, cfg, mesh)
            if dtype == "bfloat16" and device.type == "cuda":  # autocast computes in bf16 anyway
                tied = model.tok_embeddings.weight
                for p in model.parameters():
                    if not p.requires_grad and p.dim() >= 2 and p is not tied:
                        p.data = p.data.to(torch.bfloat16)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # this rank's
        per = 8 + 4 * cfg.master_weights  # AdamW's two float32 moments (+ a float32 master copy)
        log(f"fine-tuning {'LoRA r=%d on %s' % (cfg.lora_rank, cfg.lora_targets) if cfg.lora_rank else 'all parameters'}"
            f": {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) | optimizer state "
            f"{per * trainable / 2 ** 20:,.1f} MiB (full fine-tuning: {per * total / 2 ** 20:,.1f} MiB)")
        return model
    return adapt


# --------------------------------------------------------------------------- export
def load_finetuned(path, cfg):
    """The fine-tuned model of checkpoint folder `path` on the CPU in float32, LoRA modules in place."""
    blob = checkpoint.load(path, "model.pt")
    model = Transformer(config_from_dict(blob["model_config"]))
    if cfg.lora_rank:
        add_lora(model, cfg)
    state = dict(blob["state_dict"])
    if model.config.tie_embeddings:
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def merge_lora(model):
    """Fold every adapter into its base weight, putting plain nn.Linear back: a normal model."""
    for name, m in lora_modules(model).items():
        parent, attr = name.rsplit(".", 1)
        plain = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=False)
        plain.weight = nn.Parameter(m.merged_weight().detach(), requires_grad=False)
        setattr(model.get_submodule(parent), attr, plain)
    return model


def save_peft(model, cfg, directory):
    """The adapters alone as PEFT writes them: adapter_config.json and adapter_model.safetensors with
    keys base_model.model.<transformers' name>.lora_A.weight (PEFT drops the adapter name)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    state = {}
    for name, m in lora_modules(model).items():
        hf = "base_model.model." + _OURS_TO_HF(name + ".weight")[:-len("weight")]
        state[hf + "lora_A.weight"] = m.lora_A.detach().float().contiguous()
        state[hf + "lora_B.weight"] = m.lora_B.detach().float().contiguous()
    save_file(state, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    base = os.path.abspath(cfg.init_from[3:]) if cfg.init_from.startswith("hf:") else None
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted(LORA_TARGETS[t][2] for t in lora_targets(cfg)),
              "base_model_name_or_path": base, "inference_mode": True, "init_lora_weights": True,
              "modules_to_save": None, "use_rslora": False, "use_dora": False}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export(cfg, tokenizer):
    """out_dir/hf from the run's last checkpoint (any layout saved it whole): the merged model and the
    tokenizer, a normal Hugging Face directory; with LoRA also out_dir/adapter (PEFT)."""
    path = checkpoint.latest(cfg.out_dir)
    model = load_finetuned(path, cfg)
    if cfg.lora_rank:
        save_peft(model, cfg, os.path.join(cfg.out_dir, "adapter"))
        merge_lora(model)
    directory = os.path.join(cfg.out_dir, "hf")
    eos = tokenizer.stop_ids[0] if len(tokenizer.stop_ids) == 1 else list(tokenizer.stop_ids)
    model.save_hf(directory, bos_token_id=tokenizer.bos, eos_token_id=eos)
    if tokenizer.chat_template is not BUILTIN_TEMPLATE:
        tokenizer.save(directory)
    return directory


# --------------------------------------------------------------------------- the run
def finetune(cfg):
    """train.train on the conversations of cfg.data; then, on rank 0, the export. Returns the model."""
    main = int(os.environ.get("RANK", "0")) == 0
    log = print if main else (lambda *a, **k: None)
    spec = cfg.tokenizer or (cfg.init_from if cfg.init_from.startswith("hf:") else "")
    if not spec:
        raise train.UserError(f"init_from={cfg.init_from!r} names no tokenizer: fine-tune an hf:<dir> model or "
                              "set --tokenizer (e.g. byte, or hf:<dir>)")
    tokenizer = get_tokenizer(spec)
    vocab = train.read_hf_config(cfg.init_from)["vocab_size"] if cfg.init_from.startswith("hf:") else cfg.vocab_size
    data = SFTData(cfg, tokenizer, vocab)
    log(data.summary)
    model = train.train(cfg, data, make_adapt(cfg, log))
    if main:
        log(f"exported to {export(cfg, tokenizer)}" + (f" and {cfg.out_dir}/adapter (PEFT)" if cfg.lora_rank else ""))
    return model


def main(argv):
    train.run_main(lambda: finetune(load_config(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
