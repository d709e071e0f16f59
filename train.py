"""Train a LLaMA.

  python train.py configs/tiny.py --max_iters=200          one process (CPU or one GPU)
  torchrun --nproc_per_node=8 train.py configs/llama_1b.py --tp=2 --pp=2 --zero=1

Any key of Config below can be set in the config file (plain Python) or as --key=value.
The batch of step t depends only on (seed, t, position in the global batch), so every
parallel layout of the same config trains the same model.
"""
import ast
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import parallel
import plan
import zero
from model import Transformer, config_from_dict


# --------------------------------------------------------------------------- config
@dataclass
class Config:
    # data and output
    out_dir: str = "out"
    dataset: str = "pystdlib"  # data/<dataset>/{train,val}.bin; the offline pystdlib is prepared on first use
    data_dir: str = "data"
    init_from: str = "scratch"  # scratch | resume (newest checkpoint in out_dir) | hf:<dir> (its shape, weights, tokenizer)
    #   | auto | auto:hf:<dir>: resume if out_dir has a checkpoint, else start as after "auto:" (scratch); for restarts
    resume_fallback: bool = False  # resume from an older checkpoint if the newest is corrupt (always on under auto)
    # batch: batch_size sequences per optimizer step, micro_batch_size per forward on one rank
    block_size: int = 256
    # document masking: a row of block_size tokens spans several documents of the data; each token
    # attends within its own document only and RoPE positions restart at each (README, Training)
    doc_mask: bool = False
    batch_size: int = 32
    micro_batch_size: int = 8
    # AdamW with linear warmup then cosine decay to min_lr at lr_decay_iters
    max_iters: int = 2000
    learning_rate: float = 6e-4
    min_lr: float = 6e-5
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    # logging, evaluation and checkpoints
    log_interval: int = 10
    eval_interval: int = 250
    eval_iters: int = 20
    checkpoint_interval: int = 500
    keep_checkpoints: int = 3
    checkpoint_errors_fatal: bool = False  # a failed checkpoint write stops the run
    checkpoint_async: bool = False  # write checkpoints in a background thread from a host copy (checkpoint.AsyncWriter)
    max_bad_steps: int = 5  # consecutive NaN/Inf steps (bf16/fp32) before the run stops
    # system
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bfloat16 on GPUs that have it, else float32) | float32 | bfloat16 | float16
    compile: bool = False
    master_weights: bool = False  # bf16/fp16 parameters and gradients, float32 master weights in the optimizer (zero.py)
    dist_timeout_s: int = 600
    # model (see model.ModelConfig); max_seq_len is block_size
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = None
    vocab_size: int = 50304
    ffn_dim: int = None
    multiple_of: int = 256
    ffn_dim_multiplier: float = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    attn_impl: str = "auto"  # auto | flash | sdpa | math (model.ModelConfig, resolve_attn_impl)
    activation_checkpointing: str = "none"  # none | selective | full: recompute in the backward instead of keeping
    # parallelism (parallel.py, zero.py)
    tp: int = 1
    sequence_parallel: bool = False  # tp > 1: norms and residuals on T/tp tokens per rank (parallel.py)
    pp: int = 1
    zero: int = 0  # ZeRO stage: where the optimizer state, gradients and parameters live, not their precision
    zero_offload: bool = False  # zero>0: keep the float32 master weights and AdamW moments in CPU memory
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved
    pp_virtual: int = 1  # model chunks per pipeline rank (interleaved)
    pp_first_layers: int = 0  # layers of the first pipeline chunk (it also holds the embedding); 0: balanced
    pp_last_layers: int = 0  # layers of the last chunk (it also holds the output head); 0: balanced
    pp_measure_idle: bool = False  # log each stage's measured idle share (syncs the device: slower)
    pp_trace: bool = False  # time every pipeline action of a few steps into out_dir/pp_trace.json (plot.py --timeline)
    dp_bucket_mb: float = 25.0
    peak_tflops: float = 0.0  # dense bf16 TFLOP/s of one GPU, for MFU; 0: looked up by device name (PEAK_TFLOPS)
    # trackers (RunLog): the fields of log.jsonl, from rank 0; off by default, never required
    wandb: bool = False
    wandb_project: str = "llama-from-scratch"
    wandb_run_name: str = ""  # "": the out_dir's name
    tensorboard: bool = False  # event files in out_dir/tensorboard


class UserError(Exception):
    """A mistake in the config, data or launch: printed as one message, exit code 2."""


def _typed(key, value, default):
    """Check value against the type of the key's default (None defaults take int/float/None)."""
    kind = type(default) if default is not None else (int, float, type(None))
    if isinstance(value, bool) and kind is not bool and kind != (int, float, type(None)):
        raise UserError(f"config key {key}={value!r}: expected {type(default).__name__}, got a bool")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "a number or None"
        raise UserError(f"config key {key}={value!r}: expected {want}, got {type(value).__name__}")
    return value


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see Config in train.py for the keys"
    return UserError(f"unknown config key {key!r}{hint}")


def load_config(argv, config_class=Config):
    """Config from `[config.py] [--key=value ...]`: the file is plain Python whose top-level
    names are config keys; command-line values are Python literals (or bare strings).
    config_class: Config or a dataclass extending it with a stage's own keys (finetune.py)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg!r} not found")
            scope = {}
            exec(compile(open(arg).read(), arg, "exec"), scope)
            for k, v in scope.items():
                if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                    continue
                if k not in defaults:
                    raise _unknown(k, list(defaults))
                values[k] = v
        else:
            key, eq, raw = arg[2:].partition("=")
            if key in ("help", "h"):
                print(__doc__ + "\nKeys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
                sys.exit(0)
            if not eq:
                raise UserError(f"argument {arg!r}: write --{key}=value")
            if key not in defaults:
                raise _unknown(key, list(defaults))
            try:
                values[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                values[key] = {"true": True, "false": False}.get(raw.lower(), raw)
    cfg = config_class(**{k: _typed(k, v, defaults[k]) for k, v in values.items()})
    for key, choices in (("pp_schedule", ("gpipe", "1f1b", "interleaved")), ("zero", (0, 1, 2, 3)),
                         ("dtype", ("auto", "float32", "bfloat16", "float16")), ("device", ("auto", "cpu", "cuda"))):
        if getattr(cfg, key) not in choices:
            raise UserError(f"config key {key}={getattr(cfg, key)!r} must be one of {choices}")
    for key in ("block_size", "batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_iters",
                "checkpoint_interval", "max_bad_steps"):
        if getattr(cfg, key) < 1:
            raise UserError(f"config key {key}={getattr(cfg, key)} must be >= 1")
    for key in ("max_iters", "peak_tflops"):
        if getattr(cfg, key) < 0:
            raise UserError(f"config key {key}={getattr(cfg, key)} must be >= 0")
    if cfg.pp_trace and cfg.pp < 2:
        raise UserError(f"pp_trace=True records the pipeline schedule: it needs pp >= 2 (got pp={cfg.pp})")
    if cfg.batch_size % cfg.micro_batch_size:
        raise UserError(f"batch_size={cfg.batch_size} is not divisible by micro_batch_size={cfg.micro_batch_size}")
    return cfg


# dense bf16 tensor-core datasheet TFLOP/s; the first whose words occur in torch.cuda.get_device_name() wins
PEAK_TFLOPS = [("h100 pcie", 756), ("h100 nvl", 835), ("h200 nvl", 835), ("h100", 989), ("h200", 989),
               ("gh200", 989), ("b200", 2250), ("a100", 312), ("l40s", 362), ("l40", 181), ("l4", 121),
               ("a10", 125), ("rtx 4090", 165)]


def peak_flops(device_name, override=0.0):
    """Peak FLOP/s of one device for MFU: override (TFLOP/s) if set, else PEAK_TFLOPS; None if unknown."""
    name = f" {device_name.lower().replace('-', ' ')} "  # "NVIDIA A100-SXM4-80GB" has the word a100, not a10
    return override * 1e12 if override else next((t * 1e12 for k, t in PEAK_TFLOPS if f" {k} " in name), None)


def model_config(cfg):
    try:
        return config_from_dict({**dataclasses.asdict(cfg), "max_seq_len": cfg.block_size})
    except ValueError as e:
        raise UserError(str(e))


# --------------------------------------------------------------------------- data
def open_split(cfg, split, vocab_size):
    from prepare import DataError, load_tokens, prepare
    path = os.path.join(cfg.data_dir, cfg.dataset, f"{split}.bin")
    if cfg.dataset == "pystdlib":  # the offline default: prepared on first use, one command to a first run
        if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(path):
            prepare(name="pystdlib", data_dir=cfg.data_dir)  # one writer
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # on every rank, whatever it saw: the others wait for the writer
    if not os.path.exists(path):
        raise UserError(f"{path} not found; run: python prepare.py --name={cfg.dataset} --source=... "
                        "(on several nodes, data_dir must be on a shared file system or prepared on each)")
    try:
        tokens, header = load_tokens(path, expected_vocab_size=vocab_size)
    except DataError as e:
        raise UserError(str(e))
    if len(tokens) < cfg.block_size + 2:
        raise UserError(f"{path} has {len(tokens)} tokens, fewer than one block (block_size={cfg.block_size}) "
                        "plus one; use a smaller block_size or more data")
    return tokens, header


def data_eot(cfg, header):
    """The end-of-text id that doc_mask splits documents at: the token files' header records it."""
    eot = header.get("eot_token")
    if not isinstance(eot, int) or not 0 <= eot < header.get("vocab_size", eot + 1):
        path = os.path.join(cfg.data_dir, cfg.dataset, "train.bin")
        raise UserError(f"doc_mask=True needs the end-of-text token id of the data, but {path}'s header has "
                        f"eot_token={eot!r}; prepare the data again with prepare.py (which records it), "
                        "or set doc_mask=False")
    return eot


def read_hf_config(init_from):
    """config.json of init_from=hf:<dir> (the model's shape comes from it, not from this Config)."""
    path = os.path.join(init_from[3:], "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"init_from={init_from}: cannot read {path} ({e}); point hf: at a Hugging Face "
                        "Llama directory (config.json, model.safetensors, tokenizer.json)")


def data_tokenizer(cfg, header):
    """What checkpoints record as the run's tokenizer: the data's Tokenizer when its files are at
    data/<dataset>/tokenizer/ (prepare.py puts hf tokenizers there), else the header's identity."""
    from prepare import DataError, get_tokenizer, same_tokenizer
    ident = {"name": header.get("tokenizer"), "sha": header.get("tokenizer_sha")}
    folder = os.path.join(cfg.data_dir, cfg.dataset, "tokenizer")
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        try:
            tok = get_tokenizer("hf:" + folder)
        except DataError as e:
            raise UserError(str(e))
        if same_tokenizer(tok.identity(), ident):
            return tok
    return ident


def init_source(cfg):
    """(where a fresh start takes its weights: 'scratch' or 'hf:<dir>', the checkpoint to resume
    or None). resume and auto take the newest checkpoint in out_dir; without one, resume starts
    from scratch and auto:<source> from its source. auto also passes over a corrupt newest
    checkpoint to the previous good one (resume_fallback): a restart has no one to ask."""
    auto = cfg.init_from == "auto" or cfg.init_from.startswith("auto:")
    fresh = (cfg.init_from[5:] or "scratch") if auto else {"resume": "scratch"}.get(cfg.init_from, cfg.init_from)
    if fresh != "scratch" and not fresh.startswith("hf:"):
        raise UserError(f"init_from={cfg.init_from!r} must be 'scratch', 'resume', 'hf:<dir>', 'auto' "
                        "or 'auto:hf:<dir>'")
    if not auto and cfg.init_from != "resume":
        return fresh, None
    return fresh, checkpoint.latest(cfg.out_dir, fallback=cfg.resume_fallback or auto)


def resume_record(cfg, step, path):
    """The log.jsonl record of a resume: from which checkpoint and step, when, and whether it was
    automatic (init_from=auto) and which torchrun restart (TORCHELASTIC_RESTART_COUNT: the failures
    that rank 0's torchrun agent has restarted after; an agent restarting for another node's failure
    does not count it, and a requeued Slurm job starts again at 0)."""
    return {"step": step, "resumed_from": path, "init_from": cfg.init_from,
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def restart_warning(env):
    """A warning when torchrun (env: a worker's environment) may restart the workers with its
    rendezvous store shared with them: the store keeps the previous attempt's addresses, so the
    restarted ranks fail to connect (pytorch/pytorch#135712). None when restarts can work."""
    if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: torchrun --max-restarts: a restart will likely fail to connect; launch torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (slurm/train.sbatch sets it)")
    return None


def resumed_model_config(cfg, mcfg, path):
    """The model to resume into. A run started from hf:<dir> took its shape from the directory,
    not from the config's model keys: when those keys are as the run saved them, the checkpoint's
    model config is the run's. Keys changed since are left to load_training to refuse."""
    runtime = {"attn_impl", "max_seq_len", "activation_checkpointing"}  # how to compute, not which model
    keys = {f.name for f in dataclasses.fields(Config)} & set(dataclasses.asdict(mcfg)) - runtime
    saved_cfg = checkpoint.load(path, "train_state.pt").get("config", {})
    if any(saved_cfg.get(k) != getattr(cfg, k) for k in keys):
        return mcfg
    saved = checkpoint.load(path, "model.pt", mmap=True)  # mmap: only the small model_config entry is read
    return config_from_dict({**saved["model_config"], "attn_impl": cfg.attn_impl,
                             "activation_checkpointing": cfg.activation_checkpointing,
                             "max_seq_len": max(cfg.block_size, saved["model_config"]["max_seq_len"])})


def check_tokenizer(cfg, header, model_tok, source):
    """Refuse data tokenized with another tokenizer than the model's (model_tok: a record from
    checkpoint.tokenizer_record, None when the model names none). Returns model_tok."""
    from prepare import describe, same_tokenizer
    data_tok = {"name": header.get("tokenizer"), "sha": header.get("tokenizer_sha")}
    if model_tok is not None and not same_tokenizer(model_tok, data_tok):
        spec = model_tok.get("spec") or model_tok["name"]
        raise UserError(f"dataset {cfg.dataset!r} ({os.path.join(cfg.data_dir, cfg.dataset)}) was tokenized with "
                        f"{describe(data_tok)} but the model {source} uses {describe(model_tok)}: its token ids "
                        f"would mean other text. Fix: python prepare.py --source=<your text> "
                        f"--name={cfg.dataset} --tokenizer={spec}")
    return model_tok


def batch_offsets(cfg, n_tokens, step, split):
    """Start offsets of the global batch of `step`: a function of (seed, split, step) only."""
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, step])
    return rng.integers(0, n_tokens - cfg.block_size - 1, size=cfg.batch_size)


def get_micro_batches(cfg, tokens, step, split, mesh, device, eot=None):
    """This dp rank's contiguous share of the global batch, as (x, y) micro-batches, or with
    cfg.doc_mask (x, y, doc_ids) (document_ids; eot: the data's end-of-text id)."""
    offsets = batch_offsets(cfg, len(tokens), step, split)
    per_rank = cfg.batch_size // mesh.dp
    mine = offsets[mesh.dp_rank * per_rank:(mesh.dp_rank + 1) * per_rank]
    seqs = torch.from_numpy(np.stack([tokens[o:o + cfg.block_size + 1].astype(np.int64) for o in mine]))
    if device.type == "cuda":
        seqs = seqs.pin_memory().to(device, non_blocking=True)
    mb = cfg.micro_batch_size
    batches = [(seqs[i:i + mb, :-1], seqs[i:i + mb, 1:]) for i in range(0, per_rank, mb)]
    return [(x, y, document_ids(x, eot)) for x, y in batches] if cfg.doc_mask else batches


def document_ids(x, eot):
    """(B, T) document ids of rows cut from [bos] doc1 <eot> [bos] doc2 <eot> ... (prepare.py): a new
    document starts right after each eot, which stays with the document it ends (so the model still
    learns to emit it); the exclusive cumulative count of eots, on x's device."""
    ends = (x == eot).int()
    return ends.cumsum(1) - ends


# --------------------------------------------------------------------------- optimization
def lr_at(cfg, step):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr (max_iters plays no part)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def build_optimizer(model, cfg, mesh, device):
    """torch's AdamW, or zero.py's (sharded when zero > 0; low-precision parameters when master_weights)."""
    dtype = setup_device(cfg)[1]
    if cfg.zero or cfg.master_weights:
        try:
            return zero.build_optimizer(model, cfg, mesh, getattr(torch, dtype) if cfg.master_weights else torch.float32)
        except ValueError as e:
            raise UserError(str(e))
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                             betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


class LossScaler:
    """fp16 dynamic loss scaling (book 4.2.4): multiply the loss by S so small gradients
    survive fp16; on overflow skip the step and halve S, after `growth_interval` good
    steps double it. Disabled (S = 1) for bf16 and fp32."""

    def __init__(self, enabled, scale=2.0 ** 16, growth_interval=1000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, scale if enabled else 1.0, growth_interval, 0

    def update(self, overflow):
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, d):
        self.scale, self.good_steps = d["scale"], d["good_steps"]


def forward_backward(model, micro_batches, loss_scale, autocast, grad_sync):
    """Gradient accumulation on one pipeline stage: the mean loss of the micro-batches.
    Each micro-batch loss is a mean over its tokens, so each backward gets 1/len of it.
    Gradients sync across dp only in the last micro-step (grad_sync.sync). A micro-batch is
    (x, y), or (x, y, doc_ids) for rows packed with several documents (Transformer.forward)."""
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y, *doc) in enumerate(micro_batches):
        grad_sync.sync = i == len(micro_batches) - 1
        with autocast:
            # not `_, loss`: the name would keep the logits alive through the backward
            loss = model(x, y, doc_ids=doc[0] if doc else None)[1]
        (loss * (loss_scale / len(micro_batches))).backward()
        total += loss.detach()
    grad_sync.finish()
    return total / len(micro_batches)


def compute_gradients(cfg, mesh, model, fwd_bwd, optimizer, micro_batches, scaler, autocast):
    """Forward and backward over one step's micro-batches. Returns the mean loss (a device
    tensor: no host sync) and the global norm of the unscaled gradients."""
    if mesh.pp > 1:  # the pipeline schedule runs the same micro-batches over the stages
        loss = parallel.pipeline_step(model, micro_batches, scaler.scale, autocast)
    else:
        loss = forward_backward(fwd_bwd, micro_batches, scaler.scale, autocast, model.grad_sync)
    if isinstance(optimizer, zero.ZeroAdamW):  # a shard of the gradients; step() unscales them in float32
        return loss, optimizer.grad_norm() / scaler.scale
    if scaler.enabled:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scaler.scale)
    return loss, parallel.grad_norm(model, mesh)


def apply_update(cfg, model, optimizer, norm, scaler):
    """Scale the gradients by min(1, grad_clip / norm) (global-norm clipping) and step AdamW."""
    coef = torch.clamp(cfg.grad_clip / (norm + 1e-6), max=1.0) if cfg.grad_clip > 0 else 1.0
    if isinstance(optimizer, zero.ZeroAdamW):
        optimizer.step(grad_scale=coef / scaler.scale)
        return
    if cfg.grad_clip > 0 and optimizer.defaults.get("fused"):
        # fused AdamW divides every gradient by optimizer.grad_scale inside its one kernel (the attribute
        # torch's GradScaler sets for it): the clip without a pass of its own over the gradients
        optimizer.grad_scale = 1.0 / coef
    elif cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.grad_clip, norm)
    optimizer.step()


# --------------------------------------------------------------------------- the run
class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")


def setup_device(cfg):
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' but no CUDA GPU is visible; use --device=cpu")
    device = torch.device("cuda", torch.cuda.current_device()) if want_cuda else torch.device("cpu")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if want_cuda and torch.cuda.is_bf16_supported() else "float32"
    if cfg.master_weights and dtype == "float32":
        raise UserError(f"master_weights=True keeps float32 master weights of bfloat16/float16 parameters, but dtype="
                        f"{cfg.dtype!r} means float32 here; set --dtype=bfloat16 (or float16) or drop master_weights")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)
    return device, dtype, autocast


def evaluate(cfg, model, mesh, batches, device, autocast):
    """Mean validation loss over eval_iters fixed batches (the same batches every evaluation);
    batches(step, split) gives a step's micro-batches (see train)."""
    from tqdm import tqdm
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for i in tqdm(range(cfg.eval_iters), desc="eval", leave=False, disable=not mesh.is_main):
            micro = batches(i, "val")
            if mesh.pp > 1:  # through the pipeline: the loss sum is on the last stage, 0 elsewhere
                total += parallel.pipeline_forward(model, micro, autocast)
                continue
            for x, y, *doc in micro:
                with autocast:
                    total += model(x, y, doc_ids=doc[0] if doc else None)[1].float()
    model.train()
    n = cfg.eval_iters * (cfg.batch_size // mesh.dp // cfg.micro_batch_size)
    return parallel.reduce_for_log(total / n, mesh).item()


class RunLog:
    """The run's records, written by rank 0 only: out_dir/log.jsonl (one JSON object per line: a
    logged step, a validation loss, a skipped step or a
    checkpoint's stall {"step", "checkpoint_stall_s", "checkpoint_async"}) and, when switched on, the trackers, which
    get the same numeric fields at the same steps (lists such as pp_idle as name/0, name/1, ...).
    wandb=True: wandb_project / wandb_run_name; WANDB_MODE=offline is honoured by wandb itself, and
    a resumed run continues the same wandb run (its id is kept in out_dir/wandb_id). Steps that a
    resume logs again are dropped by wandb (its steps only grow) but kept in log.jsonl and
    TensorBoard. tensorboard=True: event files in out_dir/tensorboard."""

    def __init__(self, cfg):
        os.makedirs(cfg.out_dir, exist_ok=True)
        checkpoint.clean_temp(cfg.out_dir)  # temporary folders of saves that a crash interrupted
        path = os.path.join(cfg.out_dir, "log.jsonl")
        self.file = open(path, "a")
        if self.file.tell() > 0:  # a line cut short by a crash is ended, so it stays one bad line
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self.file.write("\n")
        self.trackers = [open_tracker(cfg, kind) for kind in ("wandb", "tensorboard") if getattr(cfg, kind)]

    def write(self, rec):
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        scalars = {}
        for k, v in rec.items():
            for name, x in ([(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(k, v)]):
                if isinstance(x, (int, float)) and not isinstance(x, bool) and k != "step":
                    scalars[name] = x
        for log_scalars, _ in self.trackers:
            log_scalars(scalars, rec["step"])

    def close(self):
        self.file.close()
        for _, close in self.trackers:
            close()


def open_tracker(cfg, kind):
    """(log(scalars, step), close()) for wandb or TensorBoard; a missing package is a UserError."""
    try:
        if kind == "wandb":
            import wandb
        else:
            from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"{kind}=True needs the {kind} package: pip install {kind} (or leave {kind} off)")
    if kind == "tensorboard":
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        def log(scalars, step):
            for name, x in scalars.items():
                writer.add_scalar(name, x, step)
            writer.flush()
        return log, writer.close
    id_file = os.path.join(cfg.out_dir, "wandb_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else wandb.util.generate_id()
    with open(id_file, "w") as f:
        f.write(run_id)
    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or os.path.basename(os.path.abspath(cfg.out_dir)),
                     id=run_id, resume="allow", dir=cfg.out_dir, config=dataclasses.asdict(cfg))
    return (lambda scalars, step: run.log(scalars, step=step)), run.finish


PP_TRACE_STEPS = 3


def record_trace(trace, stages, step, cfg, mesh, m, device):
    """Add one traced step (parallel.pipeline_trace) to out_dir/pp_trace.json; rank 0 writes it,
    whole each time (write, then rename), so plot.py --timeline can read it during the run."""
    if trace is None:
        trace = {"schedule": cfg.pp_schedule, "pp": mesh.pp, "m": m, "virtual": cfg.pp_virtual,
                 "formula_idle": parallel.bubble_fraction(cfg.pp_schedule, mesh.pp, m, cfg.pp_virtual),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, gloo",
                 "steps": []}
    trace["steps"].append({"step": step, "stages": stages})
    if mesh.is_main:
        path = os.path.join(cfg.out_dir, "pp_trace.json")
        with open(path + ".tmp", "w") as f:
            json.dump(trace, f)
        os.replace(path + ".tmp", path)
    return trace


def train(cfg, data=None, adapt=None):
    """The training loop of every stage. Pre-training reads data/<dataset>/{train,val}.bin. A later
    stage (finetune.py) passes its own data: an object with micro_batches(cfg, step, split, mesh,
    device) -> [(x, y), ...] (a function of (seed, split, step) only, like get_micro_batches;
    targets -1 are ignored) and tokenizer (a prepare.Tokenizer, saved with the checkpoints); and
    adapt(model, mesh, device, dtype) -> model, applied to this rank's part of the model after
    tp/pp cut it, before it moves to the device (parallel.parallelize; e.g. LoRA: new parameters,
    frozen ones; the optimizer gets those with requires_grad). Returns the trained model."""
    mesh = parallel.init_distributed(cfg)
    device, dtype, autocast = setup_device(cfg)
    runlog = RunLog(cfg) if mesh.is_main else None  # before any work: a missing tracker package stops here
    mcfg = model_config(cfg)
    source, resume_path = init_source(cfg)
    if resume_path is not None:
        mcfg, source = resumed_model_config(cfg, mcfg, resume_path), "resume"
    elif cfg.init_from != source and mesh.is_main:
        print(f"no checkpoint in {cfg.out_dir}: starting from {source}")
    hf_config = read_hf_config(source) if source.startswith("hf:") else None
    vocab_size = hf_config["vocab_size"] if hf_config else mcfg.vocab_size
    if data is not None:  # the stage's own data, tokenized with the model's tokenizer
        if cfg.doc_mask:
            raise UserError("doc_mask=True splits pre-training token files at their end-of-text tokens; this "
                            "stage brings its own rows: leave doc_mask off (finetune.py: pack=True masks documents)")
        tokenizer = data.tokenizer
        batches = lambda step, split: data.micro_batches(cfg, step, split, mesh, device)
    else:
        train_data, header = open_split(cfg, "train", vocab_size)
        val_data, _ = open_split(cfg, "val", vocab_size)
        tokenizer = data_tokenizer(cfg, header)
        eot = data_eot(cfg, header) if cfg.doc_mask else None
        batches = lambda step, split: get_micro_batches(cfg, train_data if split == "train" else val_data,
                                                        step, split, mesh, device, eot)
    if data is None and resume_path is not None:
        check_tokenizer(cfg, header, checkpoint.tokenizer_record(resume_path), resume_path)
    elif data is None and hf_config:
        rec = check_tokenizer(cfg, header, checkpoint.tokenizer_record(source), source)
        if rec:  # the model's tokenizer, so checkpoints carry its files
            from prepare import get_tokenizer
            tokenizer = get_tokenizer(source)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if hf_config:
        try:
            # the published context length stays the model's (checkpoints, export); block_size may exceed it
            max_seq_len = max(cfg.block_size, hf_config.get("max_position_embeddings") or 0)
            model = Transformer.from_hf(source[3:], max_seq_len=max_seq_len, attn_impl=cfg.attn_impl,
                                        activation_checkpointing=cfg.activation_checkpointing)
        except (OSError, ValueError) as e:  # model.UnsupportedCheckpoint names the key and the fix
            raise UserError(f"init_from={source}: {e}")
    else:
        model = Transformer(mcfg)
    n_params = model.num_params()
    flops_per_token = model.flops_per_token(cfg.block_size)
    try:  # before the GPU holds anything
        memory = plan.check_run(cfg, model.config, mesh, device)
    except plan.DoesNotFit as e:
        raise UserError(str(e))
    model = parallel.parallelize(model, mesh, cfg, device,  # built on the CPU, sliced, adapted, then moved
                                 adapt=None if adapt is None else (lambda m: adapt(m, mesh, device, dtype)))
    optimizer = build_optimizer(model, cfg, mesh, device)
    scaler = LossScaler(enabled=dtype == "float16")
    step = checkpoint.load_training(cfg, mesh, model, optimizer, scaler, resume_path) if resume_path else 0
    # pp_trace: the PP_TRACE_STEPS steps after this run's first (which warms up), in out_dir/pp_trace.json
    trace_steps, trace = range(step + 2, step + 2 + PP_TRACE_STEPS) if cfg.pp_trace else (), None
    fwd_bwd = torch.compile(model) if cfg.compile and mesh.pp == 1 else model

    log = print if mesh.is_main else (lambda *a, **k: None)
    grad_accum = cfg.batch_size // mesh.dp // cfg.micro_batch_size
    log(f"model {n_params / 1e6:.2f}M parameters | world {mesh.world} = dp {mesh.dp} x pp {mesh.pp} x tp {mesh.tp}"
        f" | {grad_accum} micro-batches of {cfg.micro_batch_size} per rank | {device} {dtype}"
        + (" parameters, float32 master weights" if cfg.master_weights else ""))
    warning = restart_warning(os.environ)
    if warning:
        log(warning)
    if resume_path:
        rec = resume_record(cfg, step, resume_path)
        log(f"resuming at step {step} from {resume_path} | {rec['time']}" + (
            f" | automatic (init_from={cfg.init_from}), torchrun restart {rec['restart']}"
            if cfg.init_from.startswith("auto") else ""))
        if runlog:
            runlog.write(rec)
    if mesh.pp > 1:
        bubble = parallel.bubble_fraction(cfg.pp_schedule, mesh.pp, grad_accum, cfg.pp_virtual)
        log(f"pipeline: {cfg.pp_schedule} schedule, {mesh.pp} stages x {cfg.pp_virtual} chunks, {grad_accum} "
            f"micro-batches | theoretical bubble {bubble:.1%} of each step"
            + (" | torch.compile is not applied under pp > 1" if cfg.compile else ""))
    log(memory)
    preempt = Preemption()
    # checkpoint_async: the write in flight; a run ending in an error leaves it to its (non-daemon)
    # thread to finish writing, uncommitted, and the committed checkpoints as they were
    writer = checkpoint.AsyncWriter(cfg, mesh) if cfg.checkpoint_async else None
    bad_steps, t0, tokens_seen = 0, time.time(), 0
    loss_sum, n_summed = torch.zeros((), device=device), 0  # over the applied steps since the last log line
    world_group = torch.distributed.group.WORLD if mesh.world > 1 else None
    if device.type == "cuda":  # MFU = 6N + 12LdT FLOPs per token (model.flops_per_token) x tokens/s / peak
        gpu = torch.cuda.get_device_name(device)
        peak = peak_flops(gpu, cfg.peak_tflops)
        log(f"MFU against {peak / 1e12:g} TFLOP/s per GPU ("
            + ("--peak_tflops)" if cfg.peak_tflops else f"{gpu}: dense bf16 datasheet)") if peak else
            f"MFU unavailable: {gpu} is not in train.PEAK_TFLOPS; set --peak_tflops=<its dense bf16 TFLOP/s>")

    while step < cfg.max_iters:
        lr = lr_at(cfg, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = batches(step, "train")
        traced = step + 1 in trace_steps
        if traced:
            model.pipeline.trace = []
        loss, norm = compute_gradients(cfg, mesh, model, fwd_bwd, optimizer, micro, scaler, autocast)
        if traced:
            trace = record_trace(trace, parallel.pipeline_trace(model), step + 1, cfg, mesh, grad_accum, device)
            model.pipeline.trace = None
        # one small collective and one host sync per step: every rank agrees on skip/stop
        flags = torch.stack([(~torch.isfinite(norm)).float(), torch.tensor(float(preempt.requested), device=device)])
        parallel.all_reduce(flags, world_group, op=torch.distributed.ReduceOp.MAX)
        bad, stop = flags.tolist()
        if bad:
            bad_steps += 1
            scaler.update(overflow=True)
            if runlog:
                runlog.write({"step": step + 1, "skipped": "non-finite gradient norm", "loss_scale": scaler.scale})
            log(f"step {step + 1}: non-finite gradient norm, step skipped"
                + (f", loss scale lowered to {scaler.scale:g}" if scaler.enabled else f" ({bad_steps}/{cfg.max_bad_steps})"))
            if not scaler.enabled and bad_steps >= cfg.max_bad_steps:
                raise UserError(f"{bad_steps} consecutive steps with NaN/Inf gradients at step {step + 1}; "
                                f"the last good checkpoint in {cfg.out_dir} is intact. Lower learning_rate or check the data")
        else:
            bad_steps, n_summed = 0, n_summed + 1
            loss_sum += loss
            apply_update(cfg, model, optimizer, norm, scaler)
            scaler.update(overflow=False)
        optimizer.zero_grad(set_to_none=model.grad_sync.set_to_none)
        step += 1
        tokens_seen += cfg.batch_size * cfg.block_size

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            mean_loss = parallel.reduce_for_log(loss_sum / max(n_summed, 1), mesh).item()  # every rank agrees on n
            tok_s = tokens_seen / (time.time() - t0)
            rec = {"step": step, **({"loss": mean_loss} if n_summed else {}), "lr": lr, "grad_norm": float(norm),
                   "tokens_per_s": tok_s, "loss_scale": scaler.scale, "tokens": step * cfg.batch_size * cfg.block_size}
            line = (f"step {step:6d} | loss " + (f"{mean_loss:.4f}" if n_summed else "n/a (every step skipped)")
                    + f" | lr {lr:.2e} | grad norm {rec['grad_norm']:.3f} | {tok_s:,.0f} tok/s")
            loss_sum, n_summed = loss_sum.zero_(), 0
            if device.type == "cuda":
                if peak:
                    rec["mfu"] = flops_per_token * tok_s / (peak * mesh.world)
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                line += (f" | MFU {100 * rec['mfu']:.1f}%" if peak else "") + f" | mem {rec['peak_mem_gib']:.1f} GiB"
            if cfg.pp_measure_idle and mesh.pp > 1:
                rec["pp_idle"] = parallel.pipeline_idle(model)
                line += " | idle by stage " + " ".join(f"{f:.0%}" for f in rec["pp_idle"])
            log(line)
            t0, tokens_seen = time.time(), 0
            if runlog:
                runlog.write(rec)
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            val_loss = evaluate(cfg, fwd_bwd, mesh, batches, device, autocast)
            log(f"step {step:6d} | val loss {val_loss:.4f}")
            if runlog:
                runlog.write({"step": step, "val_loss": val_loss})
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_iters or stop:
            stall = checkpoint.save_training(cfg, mesh, model, optimizer, scaler, step, tokenizer, writer)
            log(f"step {step:6d} | checkpoint stalled training {stall:.2f}s"
                + (" (written in the background)" if writer else ""))
            if runlog:
                runlog.write({"step": step, "checkpoint_stall_s": stall, "checkpoint_async": bool(writer)})
        if step % cfg.eval_interval == 0 or step % cfg.checkpoint_interval == 0:
            t0, tokens_seen = time.time(), 0  # tokens/s counts training steps only
        if stop:
            log(f"stopped by signal at step {step}; resume with --init_from=resume")
            break
    if writer:  # the last write in flight (the final or the SIGTERM checkpoint) is finished before exit
        writer.finish()
    if runlog:
        runlog.close()
    return model


def main(argv):
    run_main(lambda: train(load_config(argv)))


def run_main(run):
    """run() with the command-line contract of train.py and finetune.py: a mistake is one line
    and exit code 2, a dead peer exit code 1, and the process group is always torn down."""
    from prepare import DataError
    try:
        run()
    except (UserError, DataError, parallel.LayoutError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except torch.distributed.DistError as e:  # a peer died or timed out (dist_timeout_s)
        rank = os.environ.get("RANK", "0")
        print(f"rank {rank}: a collective failed, most likely because another rank died or hung "
              f"(torchrun's summary names it): {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
