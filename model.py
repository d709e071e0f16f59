"""One LLaMA decoder in plain PyTorch, single device, readable top to bottom.

Pre-norm blocks with RMSNorm (book formulas 2.30-2.31), SwiGLU feed-forward
(2.32-2.34), rotary position embedding (2.35-2.38) and grouped-query causal
attention. parallel.py and zero.py transform a model built here; nothing in
this file knows about process groups.
"""
import json
import math
import os
import sys
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

# attn_impl "flash" (and "auto" on CUDA); imported here, not inside forward, where torch.compile would
# trace the import itself. It imports without Triton too (HAVE_TRITON False: its PyTorch reference)
import flash_attn

ATTN_IMPLS = ("auto", "flash", "sdpa", "math")  # ModelConfig.attn_impl; resolve_attn_impl reads "auto"
CHECKPOINTING = ("none", "selective", "full")  # ModelConfig.activation_checkpointing
# rope_scaling types rope_tables implements, with the keys each needs (transformers' names)
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
# torch SDPA backends in order of preference: cuDNN's fused attention is the fastest on
# Hopper (1.5-1.8x the flash backend, README's attention table); the others take what it can't
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# --------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: Optional[int] = None  # None: = n_heads (multi-head); 1: multi-query
    head_dim: Optional[int] = None  # None: dim // n_heads; any even value otherwise (as transformers' Llama)
    vocab_size: int = 50304
    ffn_dim: Optional[int] = None  # None: LLaMA's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # None, or transformers' {"rope_type": "linear" | "llama3", ...}
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # "flash" (flash_attn.py's Triton kernels), "sdpa" (torch), "math" (reference); "auto": flash on CUDA
    # where it is the faster (packed documents, long sequences), else sdpa (resolve_attn_impl, per call)
    attn_impl: str = "auto"
    # what the backward recomputes instead of keeping (see recompute): "none"; "selective", the
    # norms, RoPE + attention core and SwiGLU's silu*mul (the matmul outputs are kept); "full", whole blocks
    activation_checkpointing: str = "none"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0 \
                and self.dim % self.n_heads == 0:
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:  # LLaMA: 2/3 of 4*dim, scaled, rounded up to multiple_of
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.ffn_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    def validate(self):
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                bad(f"{key}={getattr(self, key)!r} must be a positive integer")
        if self.head_dim is None:  # not set, and dim / n_heads is not a whole number
            bad(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "pick n_heads dividing dim (or set head_dim)")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            bad(f"head_dim={self.head_dim!r} must be a positive integer (or None for dim // n_heads)")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each kv head must serve a whole group of query heads")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} (dim/n_heads={self.dim}/{self.n_heads}={self.dim / self.n_heads:g} unless "
                "set) is odd; RoPE rotates pairs of channels, so it must be even")
        s = self.rope_scaling
        if s is not None:
            if not isinstance(s, dict) or s.get("rope_type") not in ROPE_SCALING_KEYS:
                bad(f"rope_scaling={s!r}: rope_type must be one of {list(ROPE_SCALING_KEYS)} "
                    "(or rope_scaling=None for plain RoPE)")
            need = ROPE_SCALING_KEYS[s["rope_type"]]
            if any(not isinstance(s.get(k), (int, float)) or s[k] <= 0 for k in need):
                bad(f"rope_scaling={s!r}: {s['rope_type']} needs positive numbers for {list(need)}")
            if s["rope_type"] == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
                bad(f"rope_scaling={s!r}: high_freq_factor must exceed low_freq_factor")
        if self.attn_impl not in ATTN_IMPLS:
            bad(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        if self.activation_checkpointing not in CHECKPOINTING:
            bad(f"activation_checkpointing={self.activation_checkpointing!r} is not one of {CHECKPOINTING}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            bad(f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be positive")


# --------------------------------------------------------------------------- layers
def recompute(fn, *args):
    """fn(*args) keeping only its inputs for the backward, which runs fn again for the tensors it
    needs (activation checkpointing; torch.utils.checkpoint, non-reentrant: autocast and RNG state
    are replayed). Without autograd recording, a plain call. plan.py counts what each mode keeps."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


class RMSNorm(nn.Module):
    """a_i / RMS(a) * g_i, RMS(a) = sqrt(mean(a^2) + eps) (2.30-2.31), statistics in float32.
    recompute (a block's norms under selective checkpointing): keep the input only, not its
    float32 copy and the normalized tensor."""

    def __init__(self, dim, eps, recompute=False):
        super().__init__()
        self.eps, self.recompute = eps, recompute
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return recompute(self.normalize, x) if self.recompute else self.normalize(x)

    def normalize(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim, max_seq_len, theta, scaling=None):
    """cos/sin of m*theta_i, theta_i = theta^(-2i/d) (2.38), both (max_seq_len, head_dim).
    scaling (ModelConfig.rope_scaling) slows the low frequencies for contexts longer than
    pre-training's, as transformers' modeling_rope_utils computes it:
      linear, position interpolation (arXiv 2306.15595): theta_i / factor, i.e. position m / factor;
      llama3, Llama 3.1 (arXiv 2407.21783; Meta's reference code apply_scaling): with
        r_i = L / (2 pi / theta_i) the rotations of frequency i over the original context
        L = original_max_position_embeddings and s_i = clamp((r_i - low_freq_factor) /
        (high_freq_factor - low_freq_factor), 0, 1): theta_i * (s_i + (1 - s_i) / factor),
        so short wavelengths (s_i = 1) are kept and long ones (s_i = 0) divided by factor.
    Neither type rescales cos/sin (transformers' attention_factor is 1.0 for both)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = scaling["rope_type"] if scaling else None
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        rotations = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        s = ((rotations - lo) / (hi - lo)).clamp(0.0, 1.0)
        inv_freq = inv_freq * (s + (1 - s) / scaling["factor"])
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # half-rotation layout, as in transformers
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, T, H, D); pairs channel i with i + D/2 and rotates each pair by m*theta_i.
    cos/sin: (T, D), or (B, T, D) when each row has its own positions (document masking)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# "auto" takes flash_attn.py from this many keys on at each head dim: where the compiled training step
# with it is at least as fast as with cuDNN's (README's training-step table: 134M at head dim 64 and 1k
# tokens, 1.1B at 128 and 2k), and its forward and backward together at least cuDNN's in the attention
# table; at other head dims and shorter sequences cuDNN stays the faster
FLASH_MIN_SEQ = {64: 1024, 128: 2048}


def resolve_attn_impl(impl, device, seqlen=0, docs=False, head_dim=128):
    """The attention that runs on device for ModelConfig.attn_impl; "flash", "sdpa" and "math" are
    themselves. "auto" takes flash_attn.py's Triton kernel on CUDA (with Triton installed,
    flash_attn.HAVE_TRITON) where it is measured at least as fast as torch's SDPA (cuDNN) in the
    compiled training step: packed documents (docs: SDPA needs a dense (T, T) mask, the kernel skips
    the tiles between documents; README's training-step table) and from FLASH_MIN_SEQ[head_dim] keys.
    Elsewhere SDPA: on the CPU, and on a GPU at other head dims and shorter sequences, where cuDNN's
    kernels are the faster. A checkpoint keeps "auto", not the choice."""
    if impl != "auto":
        return impl
    if torch.device(device).type != "cuda" or not flash_attn.HAVE_TRITON:
        return "sdpa"
    return "flash" if docs or seqlen >= FLASH_MIN_SEQ.get(head_dim, math.inf) else "sdpa"


def causal_attention(q, k, v, impl, q_offset=0, docs=None):
    """q: (B, T, Hq, D), k/v: (B, S, Hkv, D) with S = q_offset + T; returns (B, T, Hq, D).
    Query t attends to keys 0..q_offset+t. Hkv divides Hq (grouped-query attention).
    docs: None, or packed rows' document mask (no cache, S = T) in the form document_mask made
    for this impl: attention is then also limited to the query's document."""
    impl = resolve_attn_impl(impl, q.device, k.shape[1], docs is not None, q.shape[-1])
    T = q.shape[1]
    # flash: training, and prefill with a filled cache (a chat's next turn): Tq = T < Tk = S, the
    # causal mask aligned bottom-right (query t at position q_offset + t). Decoding one token goes
    # to SDPA, as for attn_impl="sdpa": one query row would leave the kernel's 64-128-row query
    # tiles nearly empty, for the cost of padding and copying the cache each step
    if impl == "flash" and (q_offset == 0 or T > 1):
        return flash_attn.flash_attn_func(q, k, v, causal=True, doc_bounds=docs)
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    S = k.shape[2]
    sdpa = impl in ("sdpa", "flash") and (docs is not None or q_offset == 0 or T == 1)  # flash here: decoding
    if sdpa and q.is_cuda and group > 1:  # cuDNN's kernel takes no grouped k/v, nor does the efficient one
        k, v, group = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), 1  # (a few MB)
    if sdpa and docs is None:
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=q_offset == 0 and T > 1,
                                                  enable_gqa=group > 1).transpose(1, 2)
    if sdpa:  # packed rows: the (B, 1, T, T) mask holds causality too; torch picks a kernel that takes one
        return F.scaled_dot_product_attention(q, k, v, attn_mask=docs, enable_gqa=group > 1).transpose(1, 2)
    allowed = docs if docs is not None else \
        torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + q_offset
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(v.dtype).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.attn_impl = cfg.attn_impl
        self.recompute = cfg.activation_checkpointing == "selective"  # RoPE and the attention core
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0, docs=None):
        B, T, _ = x.shape
        # -1 heads: tensor parallelism shrinks wq/wk/wv to the local heads
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.recompute and cache is None:  # keep q, k, v (the matmul outputs), not RoPE's and the kernel's
            y = recompute(self.core, q, k, v, cos, sin, None, 0, docs)
        else:
            y = self.core(q, k, v, cos, sin, cache, start_pos, docs)
        return self.wo(y.reshape(B, T, -1))

    def core(self, q, k, v, cos, sin, cache=None, start_pos=0, docs=None):
        """RoPE, then causal attention; with a cache, this step's k, v are written to it first."""
        B, T = q.shape[:2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # (B, max_len, Hkv, D) buffers, filled up to start_pos + T
            cache[0][:B, start_pos:start_pos + T] = k
            cache[1][:B, start_pos:start_pos + T] = v
            k, v = cache[0][:B, :start_pos + T], cache[1][:B, :start_pos + T]
        return causal_attention(q, k, v, self.attn_impl, q_offset=start_pos, docs=docs)


def swiglu(gate, up):
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (2.32-2.34); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.recompute = cfg.activation_checkpointing == "selective"  # silu * mul: keep w1 x and w3 x only

    def forward(self, x):
        gate, up = self.w1(x), self.w3(x)
        return self.w2(recompute(swiglu, gate, up) if self.recompute else swiglu(gate, up))


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), then + feed_forward(norm(.)). Full checkpointing keeps
    only the block's input and reruns the block in the backward: the recompute sits inside the
    module, so hooks on it (zero.py's stage-3 gathers) fire once per forward, not again for the
    recomputation (the before-backward gather has the parameters in place by then)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        selective = cfg.activation_checkpointing == "selective"
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, recompute=selective)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, recompute=selective)
        self.feed_forward = FeedForward(cfg)
        self.full_recompute = cfg.activation_checkpointing == "full"

    def forward(self, x, cos, sin, cache=None, start_pos=0, docs=None):
        if self.full_recompute and cache is None:
            return recompute(self.body, x, cos, sin, None, 0, docs)
        return self.body(x, cos, sin, cache, start_pos, docs)

    def body(self, x, cos, sin, cache=None, start_pos=0, docs=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos, docs)
        return x + self.feed_forward(self.ffn_norm(x))


def document_mask(doc_ids, impl):
    """(positions, docs) of packed rows: doc_ids (B, T), a document being a run of one id
    (flash_attn.document_bounds, the one definition). positions (B, T): each token's index within
    its document (RoPE restarts there). docs: the mask in the form causal_attention takes for impl
    (resolved), made once per forward for all layers: flash, flash_attn.document_bounds(doc_ids)
    (the kernel skips the tiles between documents); sdpa and math, a (B, 1, T, T) boolean, True
    where key j <= query i and j is in i's document."""
    T = doc_ids.shape[1]
    t = torch.arange(T, device=doc_ids.device)
    bounds = flash_attn.document_bounds(doc_ids)  # (2, B, T) int32: each token's document [start, end)
    start = bounds[0].long()
    if impl == "flash":
        return t - start, bounds
    return t - start, ((t[None, None, :] >= start[:, :, None]) & (t[None, None, :] <= t[None, :, None]))[:, None]


def cross_entropy(logits, targets):
    """Mean negative log-likelihood over targets != -1, computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


# --------------------------------------------------------------------------- model
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # a dict keyed by the global layer index keeps parameter names stable when
        # pipeline parallelism keeps only some layers on a rank
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.loss_fn = cross_entropy  # parallel.py swaps in the vocabulary-parallel loss
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """N(0, 0.02); the two projections that write into the residual stream get
        0.02/sqrt(2*n_layers) so the residual's variance does not grow with depth (GPT-2)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, 0.02)

    def forward(self, tokens, targets=None, cache=None, start_pos=0, doc_ids=None):
        """tokens: (B, T) ids, or (B, T, dim) hidden states on a later pipeline stage.
        Returns (logits, loss); loss is None without targets. Pipeline parallelism
        sets tok_embeddings / norm / output to None on stages that do not own them.
        doc_ids: None, or (B, T) ids of the document each token belongs to (several packed in a
        row, each a contiguous run): attention stays within a document and RoPE positions restart
        at each (document_mask), so each document is computed as if alone in its row."""
        T = tokens.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence end {start_pos + T} exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and start_pos + T > next(iter(cache.values()))[0].shape[1]:
            raise ValueError(f"sequence end {start_pos + T} exceeds the KV cache's "
                             f"{next(iter(cache.values()))[0].shape[1]} positions; pass new_kv_cache a larger max_len")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed training rows) cannot be combined with a KV cache")
        pieces = self.pieces(first=self.tok_embeddings is not None, last=self.output is not None)
        cos, sin, docs = self.layer_inputs(T, start_pos, doc_ids)
        h = self.run(tokens, cos, sin, pieces, cache, start_pos, docs)  # (B, T, vocab) logits, or (B, T, dim)
        return h, None if self.output is None or targets is None else self.loss_fn(h, targets)

    def pieces(self, layer_ids=None, first=True, last=True):
        """[(layer index or None, module)] in the order a forward calls them, written once: forward runs
        them all, parallel.chunk_forward a pipeline chunk's, zero.py's stage-3 prefetch follows them."""
        head = [(None, self.tok_embeddings)] if first else []
        tail = [(None, self.norm), (None, self.output)] if last else []
        return head + [(int(i), self.layers[str(i)]) for i in (self.layers if layer_ids is None else layer_ids)] + tail

    def layer_inputs(self, T, start_pos=0, doc_ids=None):
        """(cos, sin, docs): what travels down the layer loop (run) beside the hidden states, made once
        per forward (or pipeline chunk, from the same (B, T) doc_ids): the rotary tables of positions
        start_pos..start_pos+T-1, (T, head_dim); with doc_ids (packed rows) those of each token's
        position within its document, (B, T, head_dim), and docs, document_mask's mask for the
        attention that runs on doc_ids' device (None without doc_ids). T: the whole sequence, also
        where sequence parallelism holds T/tp of it (attention gathers the whole)."""
        if doc_ids is None:
            return self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T], None
        positions, docs = document_mask(doc_ids, resolve_attn_impl(self.config.attn_impl, doc_ids.device, T, docs=True))
        return self.rope_cos[positions], self.rope_sin[positions], docs

    def run(self, h, cos, sin, pieces, cache=None, start_pos=0, docs=None):
        """The one layer loop: token ids or hidden states in, logits or hidden states out. Each
        block gets (cos, sin, docs) of layer_inputs and its layer's cache entry."""
        for i, module in pieces:
            h = module(h) if i is None else module(h, cos, sin, None if cache is None else cache[i], start_pos, docs)
        return h

    def new_kv_cache(self, batch_size, dtype=None, device=None, max_len=None):
        """Per layer a (k, v) pair of (batch, max_len, n_kv_heads, head_dim) zeros; max_len
        (default max_seq_len) bounds the positions the cache can hold."""
        attn = next(iter(self.layers.values())).attention
        ref = attn.wk.weight
        shape = (batch_size, max_len or self.config.max_seq_len, ref.shape[0] // attn.head_dim, attn.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
        return {int(i): (make(), make()) for i in self.layers}

    def param_groups(self, weight_decay):
        """AdamW groups (nanoGPT's configure_optimizers): decay on matrices and embeddings, not norm
        weights. Frozen parameters (requires_grad False, e.g. LoRA's base weights) are in neither."""
        trained = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # ----------------------------------------------------------------------- accounting
    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        if non_embedding and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM's count): 6N for the weight matmuls (forward 2N,
        backward 4N, N without the input embedding) plus 12 * n_layers * dim * seq_len for
        QK^T and AV, not halved for the causal mask (arXiv 2204.02311, appendix B); dim there is
        the attention width n_heads * head_dim, which a Hugging Face config may set apart from dim."""
        c = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    # ----------------------------------------------------------------------- transformers interop
    @classmethod
    def from_hf(cls, directory, **overrides):
        """Build from a local Hugging Face Llama directory (config.json + safetensors or .bin).
        config.json is read by config_from_hf: what this file cannot compute exactly raises
        UnsupportedCheckpoint. overrides replace ModelConfig fields (max_seq_len, attn_impl)."""
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            hf = json.load(f)
        model = cls(config_from_hf(hf, path, **overrides))
        state = {_HF_TO_OURS(k): v for k, v in _read_hf_weights(directory).items()
                 if "rotary_emb" not in k}
        if model.config.tie_embeddings:
            state.setdefault("output.weight", state["tok_embeddings.weight"])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # missing weights or wrong shapes: torch's message spans lines
            raise UnsupportedCheckpoint(f"{directory}: the weights do not fit {path}: {' '.join(str(e).split())[:400]}")
        return model

    def save_hf(self, directory, dtype=torch.float32, bos_token_id=None, eos_token_id=None):
        """Write config.json, generation_config.json and model.safetensors (or pytorch_model.bin)
        that transformers loads. RoPE goes as top-level rope_theta + rope_scaling: transformers
        4.x reads that form and 5.x converts it to rope_parameters. Token ids that are None are
        written as null: left out, LlamaConfig would assume bos 1 and eos 2."""
        c = self.config
        os.makedirs(directory, exist_ok=True)
        hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c.dim,
                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                  num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, vocab_size=c.vocab_size,
                  intermediate_size=c.ffn_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                  rope_scaling=c.rope_scaling, max_position_embeddings=c.max_seq_len,
                  tie_word_embeddings=c.tie_embeddings, hidden_act="silu", attention_bias=False,
                  mlp_bias=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  torch_dtype=str(dtype).replace("torch.", ""))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        with open(os.path.join(directory, "generation_config.json"), "w") as f:  # GenerationConfig's file
            json.dump({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id))
                       if v is not None}, f, indent=2)
        state = {_OURS_TO_HF(k): v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        if c.tie_embeddings:
            del state["lm_head.weight"]
        try:
            from safetensors.torch import save_file
            save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        except ImportError:
            torch.save(state, os.path.join(directory, "pytorch_model.bin"))


# Parameter names: ours (Meta's LLaMA) <-> transformers' LlamaForCausalLM.
_NAME_PAIRS = [("tok_embeddings.", "model.embed_tokens."), ("output.", "lm_head."),
               ("norm.", "model.norm."), ("attention.wq.", "self_attn.q_proj."),
               ("attention.wk.", "self_attn.k_proj."), ("attention.wv.", "self_attn.v_proj."),
               ("attention.wo.", "self_attn.o_proj."), ("feed_forward.w1.", "mlp.gate_proj."),
               ("feed_forward.w3.", "mlp.up_proj."), ("feed_forward.w2.", "mlp.down_proj."),
               ("attention_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm.")]


def _OURS_TO_HF(name):
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        for ours, theirs in _NAME_PAIRS[3:]:
            rest = rest.replace(ours, theirs) if rest.startswith(ours) else rest
        return f"model.layers.{idx}.{rest}"
    for ours, theirs in _NAME_PAIRS[:3]:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(name)


def _HF_TO_OURS(name):
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        for ours, theirs in _NAME_PAIRS[3:]:
            rest = ours + rest[len(theirs):] if rest.startswith(theirs) else rest
        return f"layers.{idx}.{rest}"
    for ours, theirs in _NAME_PAIRS[:3]:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise UnsupportedCheckpoint(f"unexpected weight {name!r} in a Llama checkpoint (another architecture?); "
                                "model.py runs LlamaForCausalLM weights only")


def _read_hf_weights(directory):
    """All tensors of model.safetensors / pytorch_model.bin, sharded (with an index) or not."""
    files = sorted(os.listdir(directory))
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if f.endswith(".bin") and f.startswith("pytorch_model")]
    state = {}
    if st:
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(f"{directory} holds .safetensors weights; install them with `pip install safetensors`")
        for f in st:
            state.update(load_file(os.path.join(directory, f)))
    elif bins:
        for f in bins:
            state.update(torch.load(os.path.join(directory, f), map_location="cpu", weights_only=True))
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model*.bin in {directory}")
    return state


# --------------------------------------------------------------------------- Hugging Face config.json
class UnsupportedCheckpoint(ValueError):
    """A Hugging Face checkpoint asks for what this file does not compute; the message (one
    line) names the file, the key, its value and what to do."""


# Every config.json key is in one of three groups. A key in none is reported on stderr and
# ignored, as transformers' LlamaForCausalLM ignores keys that are no Llama setting.
# 1. read into ModelConfig by config_from_hf
_HF_READ = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "intermediate_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "rope_theta", "rope_scaling", "rope_parameters", "original_max_position_embeddings"}
# 2. math this file implements one way: key -> (accepted values, what another value means, fix)
_USE_TRANSFORMERS = "model.py implements Llama without it: run this checkpoint with transformers"
_HF_FIXED = {
    "model_type": (("llama",), "", ""),  # checked first, with its own message
    "hidden_act": (("silu", "swish"), "a gate activation other than SwiGLU's SiLU", _USE_TRANSFORMERS),
    "attention_bias": ((False,), "biases in the q/k/v/o projections", _USE_TRANSFORMERS),
    "mlp_bias": ((False,), "biases in the feed-forward projections", _USE_TRANSFORMERS),
    "sliding_window": ((None,), "sliding-window attention", _USE_TRANSFORMERS),
    "layer_types": ((None,), "attention that differs by layer", _USE_TRANSFORMERS),
    "partial_rotary_factor": ((1, None), "RoPE on part of each head", _USE_TRANSFORMERS),
    "attention_dropout": ((0,), "dropout on attention probabilities",
                          "model.py has no dropout: set it to 0.0 in config.json to train without it"),
    "quantization_config": ((None,), "quantized weights",
                            "dequantize (transformers), then save_pretrained without quantization_config"),
}
# 3. never change the logits: metadata, token ids, initialization, generation defaults
_HF_HARMLESS = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
                "use_cache", "initializer_range",
                "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
                "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
                # old transformers split the matmuls into pretraining_tp slices: the same products
                # summed in another order; transformers 5 ignores it
                "pretraining_tp",
                # SmolLM2's (nanotron) extras, which transformers ignores
                "rope_interleaved", "is_llama_config", "transformers.js_config"}
# model types that are often mistaken for Llama, and what differs
_NOT_LLAMA = {"mistral": "Mistral: sliding-window attention", "mixtral": "Mixtral: mixture-of-experts layers",
              "qwen2": "Qwen2: biases on q/k/v", "qwen3": "Qwen3: RMSNorm on q and k",
              "gemma": "Gemma: GeGLU, (1 + w) norm gains, scaled embeddings",
              "phi3": "Phi-3: fused q/k/v and gate/up weights"}


def config_from_hf(hf, path="config.json", **overrides):
    """ModelConfig from a transformers LlamaConfig dict (config.json at path), with transformers'
    defaults for absent keys; overrides replace fields. Raises UnsupportedCheckpoint for a value
    in _HF_FIXED other than the implemented one, a rope type other than default/linear/llama3,
    or a missing shape key; keys in no group (_HF_READ, _HF_FIXED, _HF_HARMLESS) get a note."""
    def refuse(msg):
        raise UnsupportedCheckpoint(f"{path}: {msg}")
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        refuse(f"model_type={model_type!r} is not Llama ({_NOT_LLAMA.get(model_type, 'another architecture')}); "
               "model.py runs model_type 'llama' only: use transformers for this checkpoint")
    for key, (accepted, what, fix) in _HF_FIXED.items():
        if key in hf and hf[key] not in accepted:
            refuse(f"{key}={hf[key]!r} ({what}) is not supported; {fix}")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in hf]
    if missing:
        refuse(f"missing {missing}: not a Llama config.json; pass a Hugging Face LlamaForCausalLM directory")
    unknown = sorted(set(hf) - _HF_READ - set(_HF_FIXED) - _HF_HARMLESS)
    if unknown:
        print(f"note: {path}: ignoring {unknown}: no Llama settings (transformers' Llama ignores them too)",
              file=sys.stderr)
    # RoPE: transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older files a top-level
    # rope_theta and rope_scaling {rope_type or type, ...}, which wins when both are present
    src = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(src) or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    partial = rope.pop("partial_rotary_factor", None)
    if partial not in (1, None):
        refuse(f"{src} partial_rotary_factor={partial!r} (RoPE on part of each head) is not supported; "
               f"{_USE_TRANSFORMERS}")
    scaling = None
    if kind != "default":
        if kind not in ROPE_SCALING_KEYS:
            refuse(f"{src} rope_type={kind!r} is not supported (implemented: default, {', '.join(ROPE_SCALING_KEYS)}); "
                   f"{_USE_TRANSFORMERS}")
        if kind == "llama3":  # transformers: a top-level value wins, then the rope dict's, then the context
            rope["original_max_position_embeddings"] = (hf.get("original_max_position_embeddings") or
                                                        rope.get("original_max_position_embeddings") or
                                                        hf.get("max_position_embeddings", 2048))
        need = ROPE_SCALING_KEYS[kind]
        if any(rope.get(k) is None for k in need):
            refuse(f"{src} rope_type={kind!r} needs {list(need)}, got {rope}; add the missing ones to it")
        if set(rope) - set(need):
            print(f"note: {path}: ignoring {src} keys {sorted(set(rope) - set(need))} ({kind} does not use them, "
                  "nor does transformers)", file=sys.stderr)
        scaling = {"rope_type": kind, **{k: rope[k] for k in need}}
    return ModelConfig(**{
        **dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
               n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
               head_dim=hf.get("head_dim") or None, vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"],
               norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
               max_seq_len=hf.get("max_position_embeddings", 2048),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False))),
        **overrides})


def config_from_dict(d):
    """ModelConfig from any dict that holds its keys (extra keys are ignored)."""
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})
