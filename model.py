"""One LLaMA decoder in plain PyTorch, single device, readable top to bottom.

Pre-norm blocks with RMSNorm (book formulas 2.30-2.31), SwiGLU feed-forward
(2.32-2.34), rotary position embedding (2.35-2.38) and grouped-query causal
attention. parallel.py and zero.py transform a model built here; nothing in
this file knows about process groups.
"""
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTN_IMPLS = ("flash", "sdpa", "math")
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
    vocab_size: int = 50304
    ffn_dim: Optional[int] = None  # None: LLaMA's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attn_impl: str = "sdpa"  # "flash" (flash_attn.py), "sdpa" (torch), "math" (reference)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:  # LLaMA: 2/3 of 4*dim, scaled, rounded up to multiple_of
            hidden = int(2 * 4 * self.dim / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.ffn_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def validate(self):
        def bad(msg):
            raise ValueError(f"ModelConfig: {msg}")
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                bad(f"{key}={getattr(self, key)!r} must be a positive integer")
        if self.dim % self.n_heads:
            bad(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; pick n_heads dividing dim")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each kv head must serve a whole group of query heads")
        if self.head_dim % 2:
            bad(f"head dimension dim/n_heads={self.dim}/{self.n_heads}={self.head_dim} is odd; "
                "RoPE rotates pairs of channels, so it must be even")
        if self.attn_impl not in ATTN_IMPLS:
            bad(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            bad(f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be positive")


# --------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """a_i / RMS(a) * g_i, RMS(a) = sqrt(mean(a^2) + eps) (2.30-2.31), statistics in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim, max_seq_len, theta):
    """cos/sin of m*theta_i, theta_i = theta^(-2i/d) (2.38), both (max_seq_len, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # half-rotation layout, as in transformers
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, T, H, D); pairs channel i with i + D/2 and rotates each pair by m*theta_i."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def causal_attention(q, k, v, impl, q_offset=0):
    """q: (B, T, Hq, D), k/v: (B, S, Hkv, D) with S = q_offset + T; returns (B, T, Hq, D).
    Query t attends to keys 0..q_offset+t. Hkv divides Hq (grouped-query attention)."""
    if impl == "flash" and q_offset == 0:
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, causal=True)
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    T, S = q.shape[2], k.shape[2]
    if impl == "sdpa" and (q_offset == 0 or T == 1):
        if q.is_cuda and group > 1:  # cuDNN's kernel takes no grouped k/v; repeating costs a few MB
            k, v, group = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), 1
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=q_offset == 0 and T > 1,
                                                  enable_gqa=group > 1).transpose(1, 2)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    allowed = torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + q_offset
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(v.dtype).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.attn_impl = cfg.attn_impl
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        # -1 heads: tensor parallelism shrinks wq/wk/wv to the local heads
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # (B, max_seq_len, Hkv, D) buffers, filled up to start_pos + T
            cache[0][:B, start_pos:start_pos + T] = k
            cache[1][:B, start_pos:start_pos + T] = v
            k, v = cache[0][:B, :start_pos + T], cache[1][:B, :start_pos + T]
        y = causal_attention(q, k, v, self.attn_impl, q_offset=start_pos)
        return self.wo(y.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (2.32-2.34); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


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
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
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

    def forward(self, tokens, targets=None, cache=None, start_pos=0):
        """tokens: (B, T) ids, or (B, T, dim) hidden states on a later pipeline stage.
        Returns (logits, loss); loss is None without targets. Pipeline parallelism
        sets tok_embeddings / norm / output to None on stages that do not own them."""
        T = tokens.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence end {start_pos + T} exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, dim)
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, None if cache is None else cache[int(name)], start_pos)
        if self.output is None:
            return h, None
        logits = self.output(self.norm(h))  # (B, T, vocab)
        loss = None if targets is None else self.loss_fn(logits, targets)
        return logits, loss

    def new_kv_cache(self, batch_size, dtype=None, device=None):
        """Per layer a (k, v) pair of (batch, max_seq_len, n_kv_heads, head_dim) zeros."""
        attn = next(iter(self.layers.values())).attention
        ref = attn.wk.weight
        shape = (batch_size, self.config.max_seq_len, ref.shape[0] // attn.head_dim, attn.head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
        return {int(i): (make(), make()) for i in self.layers}

    # ----------------------------------------------------------------------- accounting
    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
        if non_embedding and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (PaLM's count): 6N for the weight matmuls (forward 2N,
        backward 4N, N without the input embedding) plus 12 * n_layers * dim * seq_len for
        QK^T and AV, not halved for the causal mask (arXiv 2204.02311, appendix B)."""
        c = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layers * c.dim * seq_len

    # ----------------------------------------------------------------------- transformers interop
    @classmethod
    def from_hf(cls, directory, **overrides):
        """Build from a local Hugging Face Llama directory (config.json + safetensors or .bin)."""
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        cfg = ModelConfig(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"], norm_eps=hf["rms_norm_eps"],
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **overrides)
        model = cls(cfg)
        state = {_HF_TO_OURS(k): v for k, v in _read_hf_weights(directory).items()
                 if "rotary_emb" not in k}
        if cfg.tie_embeddings:
            state.setdefault("output.weight", state["tok_embeddings.weight"])
        model.load_state_dict(state, strict=True)
        return model

    def save_hf(self, directory, dtype=torch.float32):
        """Write config.json + model.safetensors (or pytorch_model.bin) that transformers loads."""
        c = self.config
        os.makedirs(directory, exist_ok=True)
        hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c.dim,
                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                  num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                  intermediate_size=c.ffn_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                  max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
                  hidden_act="silu", attention_bias=False, mlp_bias=False,
                  torch_dtype=str(dtype).replace("torch.", ""))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
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
    raise KeyError(f"unexpected weight {name!r} in a Llama checkpoint")


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


def config_from_dict(d):
    """ModelConfig from any dict that holds its keys (extra keys are ignored)."""
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})
