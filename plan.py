"""What fits where: a memory model of every layout, a step-time model, and a planner.

  python plan.py configs/llama_7b.py --gpus=8 --gpu_mem_gib=80 [--gpu=h100|h200] [--top=12] [--key=value ...]

prints the feasible layouts (dp, tp, pp, schedule, virtual chunks, zero stage, micro-batch,
activation checkpointing) ranked by predicted step time, with the predicted peak memory of the
fullest rank and the pipeline bubble, and why the first one wins. --key=value overrides any
train.py config key (train.load_config). train.py calls check_run() at start: it prints the
run's own prediction and stops before any work when the layout cannot fit the GPU.

Everything is bytes per rank, in plain Python, one function per term:

  model states (book 4.2.4, fig. 4.16-4.17; zero.formula): parameters, gradients, optimizer
    torch.optim.AdamW (zero=0 without master_weights; float32 parameters)   4Phi + 4Phi + 8Phi
    zero.ZeroAdamW (master_weights or zero > 0), k bytes per parameter (2: bf16/fp16 with float32
    master weights; 4: float32), N = dp (zero=0: 1), each unit padded to N * zero.ALIGN elements:
      zero=0/1: k Phi + k Phi + 12 Phi/N;  zero=2: k Phi + (k + 12) Phi/N;  zero=3: (2k + 12) Phi/N
    Phi is this rank's share: its tensor-parallel slices of its pipeline stage's parameters.
  activations per layer and micro-batch: the tensors autograd saves in model.py's Block, counted
    as Korthikanti et al. (arXiv 2205.05198) count them for GPT (34sbh + 5as^2b); see
    layer_activation_bytes for this LLaMA (RMSNorm, RoPE, grouped-query attention, SwiGLU) and
    each activation_checkpointing mode.
  what a pipeline schedule keeps alive (parallel.py's schedules, Pipeline.peak_live), the
    logits and loss buffers, the batch, and the backward's phases (predict); the CUDA context,
    NCCL buffers and fragmentation as stated constants.

It models eager PyTorch (torch.compile's partitioner saves fewer tensors: an upper bound there).
tests/test_plan.py holds it on the CPU against the tensors (model states in 15 layouts on 4 gloo
ranks, to the byte; a Block's saved tensors in each mode, to the byte) and against a whole step's
peak (bench_memory.py --peak --device=cpu, within 3%); `python bench_memory.py --peak` on a GPU
compares it with torch.cuda.max_memory_allocated.
"""
import dataclasses
import sys

import parallel
import zero
from model import resolve_attn_impl

GiB = 2 ** 30
CKPT_MODES = ("none", "selective", "full")

# Memory that torch.cuda.max_memory_allocated does not see but the GPU must hold: the CUDA
# context and kernel images (~0.5-0.8 GiB on H100/H200 with torch 2.x), NCCL's channel buffers
# (~0.5 GiB per communicator set on one node), and the caching allocator's fragmentation.
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
NCCL_BYTES = int(0.5 * GiB)  # when world > 1
FRAGMENTATION = 0.05  # reserved above allocated, as a share of allocated

# The cost model's inputs: measured rates, not datasheet peaks. matmul: bf16 GEMM at LLM shapes
# (bench_train.py measured 794-805 TFLOP/s on an H200); attention: causal forward+backward
# (bench_attention.py, head dim 128, 2k tokens: ~400); hbm: memory bandwidth for the elementwise
# and optimizer passes; nvlink: all-reduce bus bandwidth inside a node; ib: per GPU between nodes.
GPUS = {
    "h100": dict(matmul_tflops=700, attn_tflops=350, hbm_gbs=3000, nvlink_gbs=360, ib_gbs=45, mem_gib=80),
    "h200": dict(matmul_tflops=800, attn_tflops=400, hbm_gbs=4300, nvlink_gbs=360, ib_gbs=45, mem_gib=141),
}
GPUS_PER_NODE = 8
OVERLAP = 0.8  # the most of a collective that hides behind compute (the rest contends for memory and SMs)
PCIE_GBS = 25  # zero_offload: gradients down, parameters up
CPU_ADAM_PARAMS_PER_S = 1e9  # zero_offload: AdamW on the host


@dataclasses.dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved (pp > 1)
    virtual: int = 1
    zero: int = 0
    micro_batch: int = 1
    ckpt: str = "none"  # activation_checkpointing
    sp: bool = False  # sequence_parallel
    offload: bool = False  # zero_offload


def layout_of(cfg, world):
    return Layout(world // (cfg.tp * cfg.pp), cfg.tp, cfg.pp, cfg.pp_schedule, cfg.pp_virtual, cfg.zero,
                  cfg.micro_batch_size, cfg.activation_checkpointing,
                  cfg.sequence_parallel and cfg.tp > 1, cfg.zero_offload and (cfg.zero > 0 or cfg.master_weights))


def with_layout(cfg, lay):
    return dataclasses.replace(cfg, tp=lay.tp, pp=lay.pp, pp_schedule=lay.schedule, pp_virtual=lay.virtual,
                               zero=lay.zero, micro_batch_size=lay.micro_batch, sequence_parallel=lay.sp,
                               zero_offload=lay.offload, activation_checkpointing=lay.ckpt)


def precision(cfg, cuda=True):
    """(p, a): bytes of a parameter element and of a compute (autocast) element. float32
    parameters (p = 4) unless the optimizer keeps float32 master weights of low-precision ones."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cuda else "float32")
    a = 4 if dtype == "float32" else 2
    return (a if cfg.master_weights else 4), a


# --------------------------------------------------------------------------- model states
def layer_numel(mc, tp):
    """(matrix elements, norm elements) of one layer on one tp rank (parallel.tensor_parallel:
    wq/wo by query heads, wk/wv by kv heads, a kv head held by tp / n_kv_heads ranks when fewer)."""
    hd, kv_shards = mc.head_dim, min(mc.n_kv_heads, tp)
    q = mc.n_heads * hd // tp
    kv = mc.n_kv_heads * hd // kv_shards
    return mc.dim * (2 * q + 2 * kv) + 3 * mc.dim * mc.ffn_dim // tp, 2 * mc.dim


def stage_layers(cfg, mc, pp, virtual, stage):
    """{chunk: layer count} of one pipeline stage (parallel.split_layers)."""
    if pp == 1:
        return {0: mc.n_layers}
    chunks = parallel.split_layers(mc.n_layers, pp * virtual, cfg.pp_first_layers, cfg.pp_last_layers)
    return {g: len(chunks[g]) for g in range(stage, pp * virtual, pp)}


def units(cfg, mc, lay, stage):
    """Element counts of this rank's parameter tensors in zero.make_units' order: one unit per
    parameter outside the layers (embedding on the first stage; final norm and output head on
    the last, the head a copy of a tied embedding when pp > 1), then one per layer."""
    first, last = stage == 0, stage == lay.pp - 1
    emb = mc.vocab_size * mc.dim // lay.tp
    root = [emb] if first else []
    if last:
        root.append(mc.dim)
        if not (mc.tie_embeddings and first):  # tied on one stage: one tensor
            root.append(emb)
    n_layers = sum(stage_layers(cfg, mc, lay.pp, lay.virtual, stage).values())
    return root + [sum(layer_numel(mc, lay.tp))] * n_layers


def padded(numel, n):
    """A unit's flat buffer: numel rounded up to n shards of zero.ALIGN elements each."""
    return n * zero.ALIGN * -(-numel // (zero.ALIGN * n))


def model_state_bytes(cfg, mc, lay, stage, cuda=True):
    """{params, grads, optimizer}: what this rank holds after a step (from finish() to
    zero_grad()), as zero.ZeroAdamW.memory / the tensors measure it."""
    p, a = precision(cfg, cuda)
    sizes = units(cfg, mc, lay, stage)
    if lay.zero == 0 and not cfg.master_weights:  # torch.optim.AdamW: float32 parameters, gradients, exp_avg, exp_avg_sq
        phi = sum(sizes)
        return {"params": 4 * phi, "grads": 4 * phi, "optimizer": 8 * phi}
    n = lay.dp if lay.zero else 1
    per_unit = [zero.formula(lay.zero, padded(s, n), n, p) for s in sizes]  # exact: padded = n * S
    return {key: int(sum(u[i] for u in per_unit)) for i, key in enumerate(("params", "grads", "optimizer"))}


# --------------------------------------------------------------------------- activations
def layer_activation_bytes(mc, b, s, tp, sp, p, a, ckpt, cuda=True):
    """Bytes one Block (model.py) keeps for its backward, for one micro-batch of b sequences of
    s tokens on one tp rank; p / a: bytes of the parameters (= the residual stream) and of the
    autocast compute dtype. Read off Block -> RMSNorm / Attention / FeedForward forward:

      each RMSNorm (2), on s' = s/tp tokens under sequence parallelism, else s:
        x.float() (pow and mul save it; x itself when the stream is float32)   4 b s' h
        x * rsqrt(...) cast to the stream dtype (the weight's mul saves it)     p b s' h
        rsqrt(mean(x^2) + eps)                                                  4 b s'
      linear inputs, full s: the attention norm's output for wq, wk, wv and the feed-forward's
        for w1, w3 (a b s h each, once; but autocast casts a float32 input separately for each
        consumer: 3 + 2 copies when p != a), the attention output for wo          a b s hq
      q and k after RoPE, v (RoPE's cos/sin are buffers)                       a b s (hq + 2 hkv)
        cuDNN SDPA takes no grouped k/v: on CUDA k, v are repeated to hq heads
      attention core: flash / SDPA keep the log-sum-exp, 4 b heads s (flash: s padded to 128);
        math keeps the probabilities, (a + 4) b heads s^2 on CUDA (autocast runs softmax in
        float32 and casts for the matmul; a on CPU), its q, k, v casts 3 a b s hq, a bool mask s^2
      SwiGLU: w1 x, w3 x, silu(w1 x), the product                               4 a b s f
      autocast's weight casts (p != a): each matmul saves its low-precision weight copy
                                                                                a * layer matrices
    Korthikanti's GPT count (34sbh + 5as^2b, fp16, 4h MLP, dropout) is the same bookkeeping.
    h: dim, hq = n_heads*head_dim, hkv = n_kv_heads*head_dim, f: ffn_dim (hq, hkv, f, heads per
    tp rank). Checkpointing (activation_checkpointing):
      selective  norms, RoPE + attention core, silu*mul recomputed: keeps each norm's input
                 p b s' h, the linear inputs, q, k, v before RoPE, w1 x and w3 x and the product
      full       keeps the block's input only, p b s' h"""
    h, hd = mc.dim, mc.head_dim
    heads = mc.n_heads // tp
    hq, hkv, f = heads * hd, max(mc.n_kv_heads // tp, 1) * hd, mc.ffn_dim // tp
    s_n = s // tp if sp else s
    if ckpt == "full":
        return p * b * s_n * h
    casts = a * layer_numel(mc, tp)[0] if p != a else 0
    linear_in = (5 if p != a else 2) * a * b * s * h + a * b * s * hq
    if ckpt == "selective":
        return 2 * p * b * s_n * h + linear_in + a * b * s * (hq + 2 * hkv) + 3 * a * b * s * f + casts
    norms = 2 * ((4 + p) * b * s_n * h + 4 * b * s_n)
    impl = resolve_attn_impl(mc.attn_impl, "cuda" if cuda else "cpu", s, head_dim=mc.head_dim)  # "auto": as run there
    if impl == "math":
        qkv = 3 * a * b * s * hq
        core = (a + (4 if cuda and a < 4 else 0)) * b * heads * s * s + s * s
    else:
        group = hq // hkv
        kv = hq if (impl == "sdpa" and cuda and group > 1) else hkv
        qkv = a * b * s * (hq + 2 * kv)
        t = 128 * -(-s // 128) if (impl == "flash" and cuda) else s
        core = 4 * b * heads * t
    return norms + linear_in + qkv + core + 4 * a * b * s * f + casts


def head_bytes(mc, b, s, tp, sp, p, a):
    """(kept, transient) of the last chunk's final norm, output head and loss for one micro-batch.
    Kept: the final RMSNorm (as a layer's), the output matrix's input, and the float32 log-
    probabilities (F.cross_entropy's log_softmax output; the vocab-parallel loss's softmax),
    4 b s V/tp, and autocast's copy of a float32 output matrix. Transient at the loss, beyond
    that, per b s V/tp: one process, forward: the logits (a), their float32 copy (4) and the
    log-softmax (4); backward: the log-softmax's output, its gradient and the input's gradient
    (12) -> max(a + 8, 12) - 4. Vocab-parallel (tp > 1): forward a + 8 (logits, float32 copy,
    exp), the backward works in place -> a + 4."""
    s_n = s // tp if sp else s
    bsv = b * s * mc.vocab_size // tp
    kept = (4 + p) * b * s_n * mc.dim + 4 * b * s_n + a * b * s * mc.dim + 4 * bsv
    kept += a * mc.vocab_size // tp * mc.dim if p != a else 0  # autocast's copy of the output matrix
    transient = (max(a + 8, 12) - 4) if tp == 1 else (a + 4)
    return kept, transient * bsv


def live_chunks(schedule, m, pp, virtual, stage):
    """Most (micro-batch, chunk) activations a stage holds at once: parallel.py's schedule run
    as Pipeline.peak_live counts it (GPipe m; 1F1B pp - stage; interleaved 2(pp - stage - 1) +
    (v - 1) pp + 1 chunks), as {chunk: count} at the moment the total peaks."""
    if pp == 1:
        return {0: 1}
    if schedule == "gpipe":
        actions = parallel.gpipe_schedule(m, pp, stage)
    elif schedule == "interleaved":
        actions = parallel.interleaved_schedule(m, pp, stage, virtual)
    else:
        actions = parallel.one_f_one_b_schedule(m, pp, stage)
    live, peak = {}, {}
    for kind, mb, g in actions:
        live[g] = live.get(g, 0) + (1 if kind == "F" else -1)
        total = sum(live.values())
        if total > sum(peak.values()):
            peak = dict(live)
    return peak


def predict(cfg, mc, lay, stage, cuda=True):
    """Peak bytes of one rank of `stage` (torch.cuda.max_memory_allocated's view), by term."""
    p, a = precision(cfg, cuda)
    b, s, tp = lay.micro_batch, cfg.block_size, lay.tp
    s_n = s // tp if lay.sp else s
    m = cfg.batch_size // (lay.micro_batch * lay.dp)
    states = model_state_bytes(cfg, mc, lay, stage, cuda)
    sizes = units(cfg, mc, lay, stage)
    phi = sum(sizes)
    n = lay.dp if lay.zero else 1
    last = stage == lay.pp - 1
    # gradients: persistent (GradBuckets' flat buffers at dp > 1; ZeRO-2/3's shards) or full-size
    # ones that autograd allocates in the backward (and keeps through the accumulation micro-steps)
    torch_adamw = lay.zero == 0 and not cfg.master_weights
    if torch_adamw:
        g_keep, g_full = (states["grads"], 0) if lay.dp > 1 else (0, states["grads"])
        end = g_full
    elif lay.zero <= 1:  # ZeroAdamW 0/1: p.grad, then the flat buffer (finish) and the reduce-scatter outputs
        g_keep, g_full = 0, p * phi
        end = states["grads"] + (states["grads"] // n if n > 1 else 0) + p * max(sizes)
    else:  # 2/3: the shards, plus each unit's flat copy and output held until finish()
        g_keep, g_full = states["grads"], p * phi
        end = sum(p * padded(u, n) for u in sizes) + states["grads"]
    params = states["params"]
    if lay.zero == 3:  # gathered while in use: root units through their backward, two layers at a time
        root = len(sizes) - sum(stage_layers(cfg, mc, lay.pp, lay.virtual, stage).values())
        params += p * sum(padded(u, n) for u in sizes[:root]) + p * 2 * padded(sizes[-1], n) * (len(sizes) > root)
    optimizer = 0 if lay.offload else states["optimizer"]
    # activations: each live (micro-batch, chunk) keeps its layers' saved tensors, a non-last chunk's
    # output and its received input (unless a saved tensor is that input already: the first norm's
    # float32 "copy" of a float32 input, or a checkpoint's input)
    live = live_chunks(lay.schedule, m, lay.pp, lay.virtual, stage)
    per_chunk = stage_layers(cfg, mc, lay.pp, lay.virtual, stage)
    layer = layer_activation_bytes(mc, b, s, tp, lay.sp, p, a, lay.ckpt, cuda)
    n_chunks = lay.pp * lay.virtual
    act = 0
    for g, count in live.items():
        buffers = p * b * s_n * mc.dim * ((g < n_chunks - 1) + (g > 0 and lay.ckpt == "none" and p < 4))
        act += count * (per_chunk[g] * layer + buffers)
    kept, transient = head_bytes(mc, b, s, tp, lay.sp, p, a)
    if not last:
        transient = 0
    else:
        act += live.get(n_chunks - 1 if lay.pp > 1 else 0, 1) * kept
    act += 8 * (cfg.batch_size // lay.dp) * (s + 1) + (8 * b * s if stage == 0 else 0)  # the batch; ids saved
    # the backward of the loss, then of each layer in turn, whose recomputation (checkpointing) briefly
    # holds the tensors `none` keeps; meanwhile the gradients fill in (all of them already when accumulating)
    none = layer_activation_bytes(mc, b, s, tp, lay.sp, p, a, "none", cuda)
    recompute = none - layer if lay.ckpt != "none" else 0
    accumulate = m > 1 or lay.pp > 1
    n_root = len(sizes) - sum(per_chunk.values())  # the loss's backward has filled the head's gradients
    head_grads = p * sum(sizes[:n_root]) if last and not (torch_adamw and lay.dp > 1) else 0
    dynamic = max(act + transient + (g_full if accumulate else 0),
                  act + recompute + (g_full if accumulate else head_grads), end)
    total = params + optimizer + g_keep + dynamic
    return {"total": total, "params": params, "grads": g_keep + (g_full if accumulate else end),
            "optimizer": optimizer, "activations": act + max(transient, recompute),
            "host_optimizer": states["optimizer"] if lay.offload else 0, "layer": layer, "live": sum(live.values())}


def peak(cfg, mc, lay, cuda=True):
    """(bytes, stage) of the fullest pipeline stage."""
    return max((predict(cfg, mc, lay, st, cuda)["total"], st) for st in range(lay.pp))


def fits(total, world, mem_bytes):
    """Whether a predicted peak fits a GPU of mem_bytes with the stated overheads."""
    return total * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES + (NCCL_BYTES if world > 1 else 0) <= mem_bytes


# --------------------------------------------------------------------------- step time
def step_time(cfg, mc, lay, gpu):
    """(seconds per optimizer step, {term: seconds}) from measured rates (GPUS) and bubble.
    Per stage and micro-batch: matmuls 2 FLOPs per weight per token forward and 4 backward
    (+2 again when full checkpointing recomputes the forward), attention 2 s hq per token
    forward (causal half of QK^T and AV), 2.5x that backward (+1x recomputed by selective and
    full), tensor-parallel all-reduces of a b s h bytes (2 forward, 2 backward, 2 more when full
    recomputes), ring all-reduce time 2 (n-1)/n bytes / bandwidth. The stage time is stretched by
    the bubble (parallel.bubble_fraction); the data-parallel sync and the optimizer pass follow."""
    p, a = precision(cfg, True)
    b, s, tp, dp = lay.micro_batch, cfg.block_size, lay.tp, lay.dp
    m = cfg.batch_size // (b * dp)
    tokens = b * s
    intra = lay.tp * lay.pp * lay.dp <= GPUS_PER_NODE
    link = gpu["nvlink_gbs"] * 1e9
    dp_link = link if intra else gpu["ib_gbs"] * 1e9
    matmul, attn = gpu["matmul_tflops"] * 1e12, gpu["attn_tflops"] * 1e12
    n_layers = max(sum(stage_layers(cfg, mc, lay.pp, lay.virtual, st).values()) for st in range(lay.pp))
    fwd_matmul = 2 * tokens * layer_numel(mc, tp)[0] * n_layers
    head = 2 * tokens * mc.dim * mc.vocab_size // tp  # the output head, on the last stage (and the embedding nowhere)
    hq = mc.n_heads * mc.head_dim // tp
    fwd_attn = 2 * tokens * s * hq * n_layers
    recompute_matmul = fwd_matmul if lay.ckpt == "full" else 0
    recompute_attn = fwd_attn if lay.ckpt != "none" else 0
    t = {"matmul": (3 * fwd_matmul + 3 * head + recompute_matmul) / matmul,
         "attention": (3.5 * fwd_attn + recompute_attn) / attn}
    if lay.ckpt == "selective":  # norms, RoPE, silu*mul read and written again: memory-bound
        t["recompute_elementwise"] = n_layers * 2 * (layer_activation_bytes(mc, b, s, tp, lay.sp, p, a, "none")
                                                     - layer_activation_bytes(mc, b, s, tp, lay.sp, p, a, "selective")) \
            / (gpu["hbm_gbs"] * 1e9)
    if tp > 1:
        n_ar = 4 + (2 if lay.ckpt == "full" else 0)
        t["tp_comm"] = n_layers * n_ar * 2 * (tp - 1) / tp * a * tokens * mc.dim / link
    if lay.pp > 1:
        s_n = s // tp if lay.sp else s
        t["pp_p2p"] = 2 * p * b * s_n * mc.dim / link
    per_mb = sum(t.values())
    bubble = parallel.bubble_fraction(lay.schedule, lay.pp, m, lay.virtual) if lay.pp > 1 else 0.0
    out = {k: v * m for k, v in t.items()}
    out["bubble"] = per_mb * m * bubble / (1 - bubble)
    # data parallelism: gradient bytes that cross the links per rank, and how much hides behind the backward
    phi = max(sum(units(cfg, mc, lay, st)) for st in range(lay.pp))
    g = p  # gradients travel in the parameters' dtype
    ring = (dp - 1) / dp
    def hidden(comm, compute):  # what overlapping with `compute` leaves of `comm` (OVERLAP of it at best)
        return comm - OVERLAP * min(comm, compute)
    backward = per_mb * 2 / 3  # the last micro-batch's backward, where the sync overlaps
    one = ring * g * phi / dp_link  # one reduce-scatter or all-gather of this rank's parameters' worth
    if dp > 1:
        if lay.zero == 0 and not cfg.master_weights:  # GradBuckets: all-reduced during the backward
            exposed = hidden(2 * one, backward)
        elif lay.zero <= 1:  # after the backward: ZeroAdamW's all-reduce (zero=0), or reduce-scatter + all-gather
            exposed = 2 * one
        elif lay.zero == 2:  # reduce-scatter during the backward, all-gather after the step
            exposed = hidden(one, backward) + one
        else:  # parameters gathered for every micro-batch's forward and backward (prefetched), reduce-scatter
            exposed = hidden((2 * m + 1) * one, per_mb * m)
        out["dp_comm"] = exposed
    shard = phi / (dp if lay.zero else 1)
    out["optimizer"] = 28 * shard / (gpu["hbm_gbs"] * 1e9)  # read 2+12 (4+4+8), write 12+2 (4+4+4) bytes
    if lay.offload:
        out["optimizer"] = 2 * p * shard / (PCIE_GBS * 1e9) + shard / CPU_ADAM_PARAMS_PER_S
    return sum(out.values()), out


# --------------------------------------------------------------------------- the planner
def candidates(cfg, mc, gpus):
    """Every layout of `gpus` ranks that parallel.check_layout accepts (and tensor_parallel:
    ffn_dim and, with sequence parallelism, block_size divisible by tp)."""
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            if gpus % (tp * pp) or tp > GPUS_PER_NODE or mc.ffn_dim % tp or (tp > 1 and cfg.block_size % tp):
                continue
            dp = gpus // (tp * pp)
            scheds = [("1f1b", 1)] if pp == 1 else [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)]
            for sched, v in scheds:
                for z in ((0, 1, 2, 3) if dp > 1 else (0,)):
                    for mb in (1, 2, 4, 8, 16):
                        for ck in CKPT_MODES:
                            lay = Layout(dp, tp, pp, sched, v, z, mb, ck, tp > 1)
                            try:
                                parallel.check_layout(gpus, tp, pp, with_layout(cfg, lay))
                            except parallel.LayoutError:
                                continue
                            yield lay


def describe(lay):
    sched = f"{lay.schedule}" + (f" v={lay.virtual}" if lay.schedule == "interleaved" else "") if lay.pp > 1 else "-"
    return (f"dp={lay.dp} tp={lay.tp}{' (sp)' if lay.sp else ''} pp={lay.pp} {sched} zero={lay.zero} "
            f"micro_batch={lay.micro_batch} activation_checkpointing={lay.ckpt}")


def plan(cfg, mc, gpus, mem_bytes, gpu):
    """[(step seconds, peak bytes, layout, terms, peak stage)] of the feasible layouts, fastest
    first (less memory breaks ties); the smallest infeasible peak (bytes, layout) and the fastest
    infeasible layout (a row), for the explanations."""
    rows, smallest, fastest_out = [], None, None
    for lay in candidates(cfg, mc, gpus):
        total, stage = peak(cfg, mc, lay)
        sec, terms = step_time(cfg, mc, lay, gpu)
        if fits(total, gpus, mem_bytes):
            rows.append((sec, total, lay, terms, stage))
            continue
        if smallest is None or total < smallest[0]:
            smallest = (total, lay)
        if fastest_out is None or sec < fastest_out[0]:
            fastest_out = (sec, total, lay, terms, stage)
    rows.sort(key=lambda r: (r[0], r[1]))
    return rows, smallest, fastest_out


def why(rows, fastest_out, cfg, gpus, mem_bytes):
    """A few sentences: what the winner's step is made of, the faster layouts that do not fit, and
    what the best layouts of another kind (tp, pp, zero, checkpointing) lose."""
    sec, total, lay, terms, _ = rows[0]
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(terms.items(), key=lambda kv: -kv[1]) if v >= 0.005 * sec)
    lines = [f"layout 1 wins: {cfg.batch_size * cfg.block_size / sec / gpus:,.0f} tokens/s per GPU, peak "
             f"{total / GiB:.1f} GiB; its {sec:.2f} s step is {parts}."]
    if fastest_out is not None and fastest_out[0] < sec:
        sec2, total2, lay2 = fastest_out[:3]
        lines.append(f"  faster but too big: {describe(lay2)}, {sec2:.2f} s, needs {total2 / GiB:.1f} GiB "
                     f"(+ overheads) of {mem_bytes / GiB:g}")
    seen = {(lay.tp, lay.pp, lay.zero, lay.ckpt)}
    for sec2, total2, lay2, terms2, _ in rows[1:]:
        key = (lay2.tp, lay2.pp, lay2.zero, lay2.ckpt)
        if key in seen:
            continue
        seen.add(key)
        worse = max(terms2, key=lambda k: terms2[k] - terms.get(k, 0.0))
        lines.append(f"  best with {', '.join(f'{n}={v}' for n, v, w in zip(('tp', 'pp', 'zero', 'checkpointing'), key, (lay.tp, lay.pp, lay.zero, lay.ckpt)) if v != w)}: "
                     f"{sec2 / sec - 1:+.1%} step time, mostly {worse} ({terms2[worse]:.2f} s against "
                     f"{terms.get(worse, 0.0):.2f} s), peak {total2 / GiB:.1f} GiB")
        if len(lines) >= 6:
            break
    return lines


def parse_args(argv):
    """plan.py's own options (--gpus, --gpu_mem_gib, --gpu, --top); everything else goes to
    train.load_config."""
    own = {"gpus": None, "gpu_mem_gib": None, "gpu": "h100", "top": "12"}
    rest = []
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in own:
            if not eq:
                raise SystemExit(f"error: write --{key}=value")
            own[key] = value
        else:
            rest.append(arg)
    if own["gpu"] not in GPUS:
        raise SystemExit(f"error: --gpu={own['gpu']!r} is not one of {list(GPUS)}")
    try:
        gpus = int(own["gpus"] or 0)
        mem = float(own["gpu_mem_gib"] or GPUS[own["gpu"]]["mem_gib"])
        top = int(own["top"])
    except ValueError:
        raise SystemExit(f"error: --gpus, --gpu_mem_gib and --top take numbers (got {own})")
    if gpus < 1 or mem <= 0:
        raise SystemExit(f"error: --gpus={own['gpus']} and --gpu_mem_gib={mem:g} must be positive "
                         "(e.g. --gpus=8 --gpu_mem_gib=80)")
    return gpus, mem, GPUS[own["gpu"]], top, rest


def main(argv):
    import train
    gpus, mem_gib, gpu, top, rest = parse_args(argv)
    try:
        cfg = train.load_config(rest)
        mc = train.model_config(cfg)
    except train.UserError as e:
        raise SystemExit(f"error: {e}")
    rows, smallest, fastest_out = plan(cfg, mc, gpus, int(mem_gib * GiB), gpu)
    n_params = sum(units(cfg, mc, Layout(1, 1, 1), 0))
    p, a = precision(cfg)
    print(f"{n_params / 1e9:.2f}B parameters ({'bf16 with float32 master weights' if p == 2 else 'float32'}, "
          f"{'bf16' if a == 2 else 'float32'} compute), {cfg.batch_size} x {cfg.block_size} tokens per step, {gpus} GPUs of "
          f"{mem_gib:g} GiB ({CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context, "
          + (f"{NCCL_BYTES / GiB:.2f} GiB NCCL, " if gpus > 1 else "")
          + f"{FRAGMENTATION:.0%} fragmentation reserved); rates: "
          + ", ".join(f"{k} {v}" for k, v in gpu.items() if k != "mem_gib"))
    if not rows:
        need = smallest[0] * (1 + FRAGMENTATION) + CUDA_CONTEXT_BYTES + (NCCL_BYTES if gpus > 1 else 0)
        raise SystemExit(f"error: no layout fits: the smallest, {describe(smallest[1])}, needs {smallest[0]:,} bytes "
                         f"({need / GiB:.1f} GiB with overheads) per GPU against {mem_gib:g} GiB; use more GPUs "
                         f"(--gpus) or larger ones"
                         + ("" if cfg.master_weights else ", bf16 parameters (--master_weights=True --dtype=bfloat16)")
                         + ", or a smaller block_size / model")
    head = f"{'#':>3} {'dp':>3} {'tp':>3} {'pp':>3} {'schedule':>14} {'zero':>4} {'mb':>3} {'ckpt':>9} " \
           f"{'peak GiB':>8} {'step s':>7} {'tok/s/GPU':>9} {'bubble':>6}"
    print(head)
    for i, (sec, total, lay, terms, stage) in enumerate(rows[:top]):
        m = cfg.batch_size // (lay.micro_batch * lay.dp)
        bubble = parallel.bubble_fraction(lay.schedule, lay.pp, m, lay.virtual) if lay.pp > 1 else 0.0
        sched = (lay.schedule + (f" v={lay.virtual}" if lay.schedule == "interleaved" else "")) if lay.pp > 1 else "-"
        print(f"{i + 1:>3} {lay.dp:>3} {lay.tp:>3} {lay.pp:>3} {sched:>14} {lay.zero:>4} {lay.micro_batch:>3} "
              f"{lay.ckpt:>9} {total / GiB:>8.1f} {sec:>7.2f} {cfg.batch_size * cfg.block_size / sec / gpus:>9,.0f} "
              f"{bubble:>6.1%}")
    print(f"{len(rows)} layouts fit" + (f"; the best {top} shown" if len(rows) > top else ""))
    for line in why(rows, fastest_out, cfg, gpus, int(mem_gib * GiB)):
        print(line)
    lay = rows[0][2]
    keys = (("tp", lay.tp), ("pp", lay.pp), ("pp_schedule", lay.schedule), ("pp_virtual", lay.virtual),
            ("zero", lay.zero), ("micro_batch_size", lay.micro_batch), ("sequence_parallel", lay.sp),
            ("activation_checkpointing", lay.ckpt))
    config = next((a for a in rest if not a.startswith("--")), "")
    print(f"run it: torchrun --nproc_per_node={min(gpus, GPUS_PER_NODE)} train.py {config} "
          + " ".join(f"--{k}={v}" for k, v in keys if getattr(cfg, k) != v)
          + (" (per node; --nnodes=" + str(gpus // GPUS_PER_NODE) + ")" if gpus > GPUS_PER_NODE else ""))


# --------------------------------------------------------------------------- train.py's check at start
class DoesNotFit(ValueError):
    """check_run's refusal: one line naming the bytes and the changes that would fit."""


def check_run(cfg, mc, mesh, device):
    """Called by train.py once the model is built, before the GPU holds anything. Returns the line
    it logs: this rank's predicted peak by term. On a CUDA device that the fullest rank of the
    layout (the same decision on every rank) cannot fit, raises DoesNotFit with the alternatives."""
    cuda = device.type == "cuda"
    lay = layout_of(cfg, mesh.world)
    terms = predict(cfg, mc, lay, mesh.pp_rank, cuda)
    total, stage = peak(cfg, mc, lay, cuda)
    line = (f"predicted peak memory {terms['total'] / GiB:.2f} GiB on this rank (eager PyTorch; parameters "
            f"{terms['params'] / GiB:.2f}, gradients {terms['grads'] / GiB:.2f}, optimizer {terms['optimizer'] / GiB:.2f}, "
            f"activations {terms['activations'] / GiB:.2f} for {terms['live']} live micro-batch chunk(s) with "
            f"activation_checkpointing={lay.ckpt!r})" + (f"; {total / GiB:.2f} GiB on stage {stage}" if lay.pp > 1 else ""))
    if not cuda:
        return line
    import torch
    props = torch.cuda.get_device_properties(device)
    mem = props.total_memory
    if fits(total, mesh.world, mem):
        return line + f" of {mem / GiB:.1f} GiB"
    changes = [(f"activation_checkpointing={ck!r}", dict(ckpt=ck)) for ck in ("selective", "full") if ck != lay.ckpt]
    if mesh.dp > 1:
        changes += [(f"zero={z}", dict(zero=z)) for z in (1, 2, 3) if z > lay.zero]
    changes += [(f"micro_batch_size={mb}", dict(micro_batch=mb)) for mb in range(lay.micro_batch - 1, 0, -1)
                if cfg.batch_size % (mb * mesh.dp) == 0]
    fixes = []
    for name, change in changes:
        t = peak(cfg, mc, dataclasses.replace(lay, **change), cuda)[0]
        if fits(t, mesh.world, mem) and not any(f.startswith(name.split("=")[0]) for f in fixes):
            fixes.append(f"{name} ({t / GiB:.1f} GiB)")
    hint = ("; set " + " or ".join(fixes)) if fixes else \
        "; no single change fits: python plan.py <config> --gpus=N --gpu_mem_gib=G finds a layout that does"
    raise DoesNotFit(f"the layout does not fit this GPU: {line}. The fullest rank needs {total:,} bytes plus "
                     f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context and {FRAGMENTATION:.0%} fragmentation, more "
                     f"than the {mem:,} bytes ({mem / GiB:.1f} GiB) of {device} ({props.name}){hint}")


if __name__ == "__main__":
    main(sys.argv[1:])
