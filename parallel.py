"""Data, tensor and pipeline parallelism by hand, over plain torch.distributed groups.

Launch: torchrun --nproc_per_node=N train.py configs/<name>.py --tp=T --pp=P --zero=Z.
The world is a grid of ranks, rank = (dp_rank * pp + pp_rank) * tp + tp_rank, i.e.
arange(world).view(dp, pp, tp): tensor-parallel ranks are adjacent (same node, fast
links), then pipeline stages, then data-parallel replicas.

parallelize() applies the transforms to a built single-device model in a fixed order:
tensor parallelism (swap Linear/Embedding for sharded ones), pipeline parallelism (keep
this stage's layers), the move to the GPU, then data parallelism (gradient all-reduce
hooks). ZeRO (zero.py) replaces the data-parallel hooks with its own sharded ones.

Sections: the mesh | data parallelism | tensor parallelism | pipeline parallelism |
parallelize | whole-model helpers (gradient norm, gathering full tensors for checkpoints).
"""
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm


# --------------------------------------------------------------------------- the mesh
@dataclass
class Mesh:
    world: int = 1
    rank: int = 0
    dp: int = 1
    pp: int = 1
    tp: int = 1
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    dp_group: object = None  # the ranks holding the same model shard (same pp_rank, tp_rank)
    pp_group: object = None  # the stages of one pipeline (same dp_rank, tp_rank)
    tp_group: object = None  # the ranks splitting one stage's matrices (same dp_rank, pp_rank)
    mp_group: object = None  # the tp*pp ranks that together hold one model replica
    pp_ranks: list = field(default_factory=list)  # global ranks of my pipeline, by stage

    @property
    def is_main(self):
        return self.rank == 0


class LayoutError(ValueError):
    pass


def check_layout(world, tp, pp, cfg):
    """Fail before any work when the layout does not divide, naming the numbers."""
    def bad(msg):
        raise LayoutError(f"{msg}")
    if tp < 1 or pp < 1:
        bad(f"tp={tp} and pp={pp} must be >= 1")
    if world % (tp * pp):
        bad(f"world size {world} is not divisible by tp*pp = {tp}*{pp}; launch a multiple of {tp * pp} processes")
    dp = world // (tp * pp)
    n_kv = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % tp:
        bad(f"n_heads={cfg.n_heads} is not divisible by tp={tp}")
    if n_kv % tp and tp % n_kv:
        bad(f"n_kv_heads={n_kv} and tp={tp}: one must divide the other")
    if cfg.vocab_size % tp:
        bad(f"vocab_size={cfg.vocab_size} is not divisible by tp={tp}; round vocab_size up to a multiple of {tp}")
    chunks = pp * getattr(cfg, "pp_virtual", 1)
    if cfg.n_layers < chunks:
        bad(f"n_layers={cfg.n_layers} is fewer than pp*pp_virtual = {pp}*{getattr(cfg, 'pp_virtual', 1)} pipeline chunks")
    if cfg.batch_size % (cfg.micro_batch_size * dp):
        bad(f"batch_size={cfg.batch_size} is not divisible by micro_batch_size*dp = {cfg.micro_batch_size}*{dp}; "
            f"pick batch_size a multiple of {cfg.micro_batch_size * dp}")
    if pp > 1:
        check_pipeline(cfg, pp, cfg.batch_size // (cfg.micro_batch_size * dp))
    return dp


def init_distributed(cfg):
    """One process: a trivial mesh. Under torchrun: the process groups of the dp x pp x tp grid."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_layout(world, cfg.tp, cfg.pp, cfg)
    if world == 1:
        return Mesh()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.dist_timeout_s),
                            device_id=torch.device("cuda", local_rank) if cuda else None)
    return make_mesh(world, rank, dp, cfg.pp, cfg.tp)


def make_mesh(world, rank, dp, pp, tp):
    """This rank's Mesh of the dp x pp x tp grid, with its process groups (every rank calls it)."""
    grid = torch.arange(world).view(dp, pp, tp)
    d, p, t = (int(i) for i in (grid == rank).nonzero()[0])
    mesh = Mesh(world, rank, dp, pp, tp, d, p, t, pp_ranks=grid[d, :, t].tolist())
    for name, lists in (("dp_group", grid.permute(1, 2, 0).reshape(-1, dp)),
                        ("pp_group", grid.permute(0, 2, 1).reshape(-1, pp)),
                        ("tp_group", grid.reshape(-1, tp)),
                        ("mp_group", grid.reshape(dp, -1))):
        setattr(mesh, name, new_groups(lists.tolist(), rank))
    return mesh


def new_groups(rank_lists, rank):
    """A process group per list of ranks; returns the one holding `rank` (None if none). Every
    rank must create every group, in the same order, even the groups it is not in."""
    groups = [(dist.new_group(list(ranks)), ranks) for ranks in rank_lists]
    return next((group for group, ranks in groups if rank in ranks), None)


def all_reduce(tensor, group, op=dist.ReduceOp.SUM):
    """In-place all-reduce that is a no-op without a group (one process)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group):
    return 1 if group is None else dist.get_world_size(group)


def mean_op(tensor, group):
    """(tensor, op) for a mean over the group. NCCL averages inside the reduction (ReduceOp.AVG),
    saving a pass over the buffer; gloo has no AVG, so the tensor is divided by N first."""
    if dist.get_backend(group) == "nccl":
        return tensor, dist.ReduceOp.AVG
    return tensor.div_(_size(group)), dist.ReduceOp.SUM


def reduce_scatter_flat(out, inp, group, async_op=False, mean=False):
    """out (S,...) = the sum (mean) over ranks of slice `rank` (along dim 0) of inp (N*S,...)."""
    if _size(group) == 1:
        out.copy_(inp)
        return None
    inp, op = mean_op(inp, group) if mean else (inp, dist.ReduceOp.SUM)
    return _reduce_scatter(out, inp, op=op, group=group, async_op=async_op)


def all_gather_flat(out, inp, group, async_op=False):
    """out (N*S,...) = every rank's inp (S,...) concatenated along dim 0, in rank order."""
    if _size(group) == 1:
        out.copy_(inp)
        return None
    return _all_gather(out, inp, group=group, async_op=async_op)


# --------------------------------------------------------------------------- data parallelism
class NoSync:
    """model.grad_sync without data parallelism: nothing to average (the protocol: see parallelize)."""
    sync, set_to_none = True, True

    def finish(self):
        pass

    def reduced_grad(self, p):
        return p.grad


class GradBuckets:
    """Average gradients over the dp group (book 4.2.1), overlapping backward.

    Parameters are packed, in the reverse of their creation order (roughly the order
    backward produces their gradients), into buckets of about bucket_mb MB. Each bucket is
    one flat buffer and the parameters' .grad are views into it, so autograd accumulates
    straight into the buffer and nothing is copied (torch DDP's gradient_as_bucket_view). A
    hook fires when a parameter's gradient is final; when every parameter of a bucket is
    ready, the bucket is averaged in place by an asynchronous all-reduce while backward goes
    on, and finish() waits for them. While `sync` is False (the accumulation micro-steps)
    the hooks do nothing and gradients just accumulate locally. Zero the gradients in place
    (set_to_none False) to keep the views; a gradient autograd allocated anew (after
    set_to_none) is copied into its bucket and re-pointed at it, so both are correct."""
    set_to_none = False

    def __init__(self, params, group, bucket_mb=25.0):
        self.group, self.world = group, dist.get_world_size(group)
        self.sync, self.handles = True, []
        self.buckets, bucket, size = [], [], 0
        for p in reversed([p for p in params if p.requires_grad]):
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_mb * 2 ** 20:
                self.buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            self.buckets.append(bucket)
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.pending = [0] * len(self.buckets)
        self.flat = [torch.zeros(sum(q.numel() for q in b), dtype=b[0].dtype, device=b[0].device)
                     for b in self.buckets]
        self.views = {}  # id(p) -> p's slice of its bucket, shaped like p
        for flat, b in zip(self.flat, self.buckets):
            offset = 0
            for q in b:
                self.views[id(q)] = q.grad = flat[offset:offset + q.numel()].view_as(q)
                offset += q.numel()
                q.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, p):
        if not self.sync:
            return
        view = self.views[id(p)]
        if p.grad.data_ptr() != view.data_ptr():  # allocated anew after zero_grad(set_to_none=True)
            view.copy_(p.grad)
            p.grad = view
        i = self.bucket_of[id(p)]
        self.pending[i] += 1
        if self.pending[i] == len(self.buckets[i]):
            self.pending[i] = 0
            flat, op = mean_op(self.flat[i], self.group)
            self.handles.append(dist.all_reduce(flat, op=op, group=self.group, async_op=True))

    def reduced_grad(self, p):
        """After finish(): p's dp-mean gradient (the full one: nothing is sharded here)."""
        return p.grad

    def finish(self):
        """Wait for every bucket's all-reduce: the .grad views then hold the averages."""
        if any(self.pending) or len(self.handles) != len(self.buckets):
            raise RuntimeError("data-parallel gradient sync incomplete: some parameters got no gradient "
                               "in the last micro-step (unused parameters are not supported)")
        for h in self.handles:
            h.wait()
        self.handles = []


def check_replicas_identical(model, group):
    """Parameters must start identical on every dp rank (same seed): checked, not assumed."""
    if group is None or dist.get_world_size(group) == 1:
        return
    local = torch.stack([p.detach().float().sum() for p in model.parameters()])
    ref = local.clone()
    dist.broadcast(ref, src=dist.get_global_rank(group, 0), group=group)
    if not torch.equal(local, ref):
        raise RuntimeError("data-parallel replicas start with different parameters; every rank must use the same seed")


# --------------------------------------------------------------------------- tensor parallelism
# Megatron-LM (arXiv 1909.08053; book 4.2.2): inside a block, the first matrix of each sublayer is split by
# columns (4.2: wq/wk/wv by heads, SwiGLU's gate w1 and up w3 by hidden units), the second
# by rows (4.3: wo, down w2). The column-split output is exactly the row-split input, so a
# sublayer needs one all-reduce forward (after the row-parallel matrix, Megatron's g) and
# one backward (where the replicated input enters the sublayer, Megatron's f).
# Parameters are sliced from the full, seeded single-device model, so tp=T trains the same
# model as tp=1 with the same seed.

def _all_gather_cat(x, group, dim):
    """Concatenate every rank's x along dim (all ranks hold equal shapes)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


class CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the input gradient over the tp ranks
    (each rank's heads / hidden units contribute part of dL/dx)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """Megatron's g, f's conjugate: all-reduce forward (sum the partial products X_i A_i of a
    row-parallel matrix, or the partial embeddings); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# Sequence parallelism (Korthikanti et al., arXiv 2205.05198): between the sublayers, the residual
# stream, the norms and the residual adds work on T/tp tokens per rank, (B, T/tp, dim).
# f becomes an all-gather over the sequence (backward: reduce-scatter) and g a
# reduce-scatter (backward: all-gather): the same bytes as one all-reduce, but the
# activations outside attention/ffn take 1/tp of the memory.


def _seq_first(x):
    return x.transpose(0, 1).contiguous()  # (B, T, d) -> (T, B, d): collectives split dim 0


def _gather_seq(x, group):
    """(B, T/tp, d) on each rank -> (B, T, d), rank order along T."""
    x = _seq_first(x)
    out = x.new_empty((x.shape[0] * dist.get_world_size(group),) + x.shape[1:])
    all_gather_flat(out, x, group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x, group):
    """(B, T, d) partial sums on each rank -> (B, T/tp, d): the sum, this rank's tokens."""
    x = _seq_first(x)
    out = x.new_empty((x.shape[0] // dist.get_world_size(group),) + x.shape[1:])
    reduce_scatter_flat(out, x, group)
    return out.transpose(0, 1)


class GatherSeqToTP(torch.autograd.Function):
    """Sequence-parallel f: all-gather the tokens forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class ScatterSeqFromTP(torch.autograd.Function):
    """Sequence-parallel g: reduce-scatter the tokens forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def enter_tp(x, group, sequence_parallel):
    return (GatherSeqToTP if sequence_parallel else CopyToTP).apply(x, group)


def leave_tp(x, group, sequence_parallel):
    return (ScatterSeqFromTP if sequence_parallel else ReduceFromTP).apply(x, group)


class NormEnterTP(RMSNorm):
    """RMSNorm, then f: the one place where the replicated stream enters a tensor-parallel
    region, shared by wq, wk, wv (or w1, w3; or the vocab-parallel output), so backward
    all-reduces dL/dx once per sublayer, as Megatron's fused QKV matrix does."""

    def __init__(self, norm, group, sequence_parallel):
        nn.Module.__init__(self)
        self.eps, self.weight, self.recompute = norm.eps, norm.weight, norm.recompute
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        return enter_tp(super().forward(x), self.group, self.sequence_parallel)


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i (4.2): this rank's output features; the output stays split. Its input
    has passed f already (NormEnterTP)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight  # (out / tp, in)

    def forward(self, x):
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i A_i (4.3): X_i is this rank's share of the features (a column-parallel
    output), g sums the partial products (sequence parallel: and scatters the tokens)."""

    def __init__(self, weight, group, sequence_parallel):
        super().__init__()
        self.weight = weight  # (out, in / tp)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        return leave_tp(F.linear(x, self.weight), self.group, self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V/tp) of the table (book figure 4.9): ids outside give zero
    vectors, and one all-reduce sums the ranks' partial lookups into the full embedding."""

    def __init__(self, weight, start, group, sequence_parallel):
        super().__init__()
        self.weight, self.start = weight, start  # (V / tp, dim)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, dim)
        return leave_tp(h.masked_fill(outside[..., None], 0.0), self.group, self.sequence_parallel)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over targets != -1 from vocab-sharded logits, never gathering them
    (book 4.4-4.5): log sum_j e^{x_j} - x_target = log(sum_p sum_{j on p} e^{x_j - m}) + m
    - x_target with m = max_p max_k x_k. Three small all-reduces of one number per token:
    the max, the sum of exponentials and the target logit (found on one rank, 0 elsewhere)."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        x = logits.float().flatten(0, 1)  # (N, V/tp)
        t = targets.flatten()  # (N,)
        m = all_reduce(x.max(-1).values, group, op=dist.ReduceOp.MAX)  # (4.5)
        e = (x - m[:, None]).exp_()
        sum_e = all_reduce(e.sum(-1), group)  # the denominator of (4.4)
        local = t - start
        mine = (local >= 0) & (local < x.shape[1])
        local = local.clamp(0, x.shape[1] - 1)
        x_t = all_reduce(torch.where(mine, x.gather(1, local[:, None])[:, 0] - m, 0.0), group)
        valid = t != -1
        n = valid.sum().clamp(min=1)
        loss = ((sum_e.log() - x_t) * valid).sum() / n
        ctx.save_for_backward(e.div_(sum_e[:, None]), local, mine, valid, n)  # e is now softmax
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        # d loss / d x_j = (softmax_j - [j == target]) / n for each counted token
        softmax, local, mine, valid, n = ctx.saved_tensors
        g = softmax.scatter_add_(1, local[:, None], -mine[:, None].to(softmax.dtype))  # in place
        g.mul_((valid / n * grad)[:, None])
        return g.view(ctx.shape).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits, targets, start, group):
    return VocabParallelCrossEntropy.apply(logits, targets, start, group)


def gather_logits(local_logits, mesh):
    """(B, T, V/tp) vocab-sharded logits -> (B, T, V) on every tp rank, e.g. for sampling."""
    if mesh.tp == 1:
        return local_logits
    return _all_gather_cat(local_logits, mesh.tp_group, dim=-1)


def _sum_grad_over(p, group):
    """A parameter whose copies get partial gradients (a kv head shared by several tp ranks,
    a norm weight under sequence parallelism): sum them in backward. Megatron does this
    once per step; here it is once per micro-batch, simpler and equally exact."""
    p.register_hook(lambda grad: all_reduce(grad.clone(), group))


def _shard(p, dim, mesh, shards=None):
    """The slice of full parameter p that this tp rank holds, tagged for grad_norm/gather."""
    shards = shards or mesh.tp
    local = nn.Parameter(p.detach().chunk(shards, dim)[mesh.tp_rank * shards // mesh.tp].clone())
    local.tp_dim, local.tp_shards = dim, shards
    return local


def tensor_parallel(model, mesh, cfg):
    """Swap the model's matrices for tp-sharded ones in place; names stay the single-process ones."""
    c, tp, group = model.config, mesh.tp, mesh.tp_group
    sp = cfg.sequence_parallel
    if c.ffn_dim % tp:
        raise LayoutError(f"ffn_dim={c.ffn_dim} is not divisible by tp={tp}; set ffn_dim (or multiple_of) "
                          f"to a multiple of {tp}")
    if sp and cfg.block_size % tp:
        raise LayoutError(f"sequence_parallel splits each sequence over tp ranks: block_size={cfg.block_size} "
                          f"must be divisible by tp={tp}")
    kv_shards = min(c.n_kv_heads, tp)  # n_kv_heads < tp: tp / n_kv_heads ranks share a kv head
    share = tp // kv_shards  # the consecutive ranks (a tp group is tp consecutive ranks) holding one kv head
    kv_group = new_groups([range(r, r + share) for r in range(0, mesh.world, share)], mesh.rank) if share > 1 else None
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        block.attention_norm = NormEnterTP(block.attention_norm, group, sp)
        block.ffn_norm = NormEnterTP(block.ffn_norm, group, sp)
        attn.wq = ColumnParallelLinear(_shard(attn.wq.weight, 0, mesh))  # this rank's q heads
        attn.wk = ColumnParallelLinear(_shard(attn.wk.weight, 0, mesh, kv_shards))  # and their kv heads
        attn.wv = ColumnParallelLinear(_shard(attn.wv.weight, 0, mesh, kv_shards))
        attn.wo = RowParallelLinear(_shard(attn.wo.weight, 1, mesh), group, sp)
        ffn.w1 = ColumnParallelLinear(_shard(ffn.w1.weight, 0, mesh))
        ffn.w3 = ColumnParallelLinear(_shard(ffn.w3.weight, 0, mesh))
        ffn.w2 = RowParallelLinear(_shard(ffn.w2.weight, 1, mesh), group, sp)
        if kv_group is not None:
            _sum_grad_over(attn.wk.weight, kv_group)
            _sum_grad_over(attn.wv.weight, kv_group)
        if sp:
            _sum_grad_over(block.attention_norm.weight, group)
            _sum_grad_over(block.ffn_norm.weight, group)
    start = mesh.tp_rank * c.vocab_size // tp
    emb = _shard(model.tok_embeddings.weight, 0, mesh)
    model.tok_embeddings = VocabParallelEmbedding(emb, start, group, sp)
    model.norm = NormEnterTP(model.norm, group, sp)
    if sp:
        _sum_grad_over(model.norm.weight, group)
    # the output's logits stay vocab-sharded, (B, T, V/tp); tied embeddings share the slice
    model.output = ColumnParallelLinear(emb if c.tie_embeddings else _shard(model.output.weight, 0, mesh))
    model.loss_fn = partial(vocab_parallel_cross_entropy, start=start, group=group)
    return model


# --------------------------------------------------------------------------- pipeline parallelism
# Book 4.2.2, figures 4.6-4.8. The layers are cut into n_chunks = pp * pp_virtual chunks in
# model order; chunk g lives on stage g % pp, so with pp_virtual = 1 stage s holds chunk s,
# and with pp_virtual = v stage s holds the non-adjacent chunks s, s + pp, ... (interleaved).
# The embedding belongs to chunk 0, the final norm, output head and loss to the last chunk.
# Each rank keeps ONE model whose other layers are deleted, so parameter names, the optimizer,
# grad_norm and checkpoints work as in one process; a chunk's forward walks its own layers.
#
# A step runs the gradient-accumulation micro-batches through a schedule: a list, per rank,
# of actions ("F" or "B", micro-batch, chunk). Activations go forward and their gradients
# backward between neighbouring stages by point-to-point messages of a shape known in advance,
# (micro_batch_size, block_size, dim), so no handshake is needed.

def split_layers(n_layers, n_chunks, first=0, last=0):
    """Layer indices of each pipeline chunk, in model order. Balanced, except that first /
    last (when > 0) fix the layer counts of the first and last chunk, which also carry the
    embedding and the output head; the other chunks share the rest evenly."""
    if n_layers < n_chunks:
        raise LayoutError(f"n_layers={n_layers} is fewer than the {n_chunks} pipeline chunks (pp*pp_virtual); "
                          f"lower pp or pp_virtual")
    fixed = {}
    if n_chunks > 1 and first:
        fixed[0] = first
    if n_chunks > 1 and last:
        fixed[n_chunks - 1] = last
    rest, free = n_layers - sum(fixed.values()), n_chunks - len(fixed)
    if rest < free or (free == 0 and rest != 0):
        raise LayoutError(f"pp_first_layers={first} and pp_last_layers={last} leave {rest} of n_layers={n_layers} "
                          f"layers for the other {free} pipeline chunks; each chunk needs at least one layer"
                          + (" and all layers must be placed" if free == 0 else ""))
    sizes, k = [], 0
    for g in range(n_chunks):
        if g in fixed:
            sizes.append(fixed[g])
        else:
            sizes.append(rest // free + (k < rest % free))  # the remainder goes to the earliest free chunks
            k += 1
    starts = [sum(sizes[:g]) for g in range(n_chunks)]
    return [list(range(s, s + n)) for s, n in zip(starts, sizes)]


@dataclass
class Pipeline:
    """What a rank needs to run its chunks: model.pipeline after pipeline_split()."""
    mesh: Mesh
    schedule: str  # gpipe | 1f1b | interleaved
    virtual: int  # chunks per rank
    layers: dict  # global chunk index -> its layer indices (this rank's chunks only)
    n_chunks: int
    shape: tuple  # (micro_batch_size, block_size, dim) of the activations between stages
    embed_group: object = None  # first + last stage of my pipeline, to sum a tied embedding's gradient
    measure_idle: bool = False
    peak_live: int = 0  # most (micro-batch, chunk) activations held for backward at once, last step
    idle_s: float = 0.0  # time waiting on receives (pp_measure_idle), since the last report
    total_s: float = 0.0
    # pp_trace: None, or this step's [kind, micro-batch, chunk, start, end] (seconds from the step's
    # start; kinds F, B, wait, drain), with the step's length in trace_length (pipeline_trace)
    trace: list = None
    trace_t0: float = 0.0
    trace_length: float = 0.0
    connected: bool = False  # _connect_neighbours has run

    def rank_of(self, g):
        return self.mesh.pp_ranks[g % self.mesh.pp]


def pipeline_split(model, mesh, cfg):
    """Delete the layers of other stages; the embedding stays on the first stage, norm and
    output on the last. A tied output matrix lives on both ends (marked pp_tied_copy on the last)."""
    n_chunks = mesh.pp * cfg.pp_virtual
    layers = split_layers(model.config.n_layers, n_chunks, cfg.pp_first_layers, cfg.pp_last_layers)
    mine = {g: layers[g] for g in range(mesh.pp_rank, n_chunks, mesh.pp)}
    keep = {str(i) for ids in mine.values() for i in ids}
    for name in list(model.layers):
        if name not in keep:
            del model.layers[name]
    first, last = 0 in mine, n_chunks - 1 in mine
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = model.output = None
    elif model.config.tie_embeddings:
        model.output.weight.pp_tied_copy = True  # the first stage's copy is the one counted and saved
    tokens = cfg.block_size // mesh.tp if cfg.sequence_parallel else cfg.block_size  # per message
    grid = torch.arange(mesh.world).view(mesh.dp, mesh.pp, mesh.tp)  # tied: a group of each pipeline's two ends (Megatron)
    ends = [[int(grid[d, 0, t]), int(grid[d, -1, t])] for d in range(mesh.dp) for t in range(mesh.tp)]
    model.pipeline = Pipeline(mesh, cfg.pp_schedule, cfg.pp_virtual, mine, n_chunks,
                              (cfg.micro_batch_size, tokens, model.config.dim),
                              embed_group=new_groups(ends, mesh.rank) if model.config.tie_embeddings else None,
                              measure_idle=cfg.pp_measure_idle)


# ---- schedules: plain functions, (m micro-batches, pp stages, this stage) -> list of actions
def gpipe_schedule(m, pp, stage):
    """GPipe (arXiv 1811.06965; figure 4.7): every forward, then every backward; all m activations stay alive."""
    return [("F", i, stage) for i in range(m)] + [("B", i, stage) for i in range(m)]


def one_f_one_b_schedule(m, pp, stage):
    """1F1B (figure 4.8, top): pp - stage - 1 warm-up forwards, then one forward and one
    backward in turn, then the remaining backwards. A backward frees its activations, so at
    most pp micro-batches are alive on the first stage instead of m."""
    warmup = min(pp - stage - 1, m)
    actions = [("F", i, stage) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [("F", warmup + i, stage), ("B", i, stage)]
    return actions + [("B", i, stage) for i in range(m - warmup, m)]


def interleaved_schedule(m, pp, stage, v):
    """Interleaved 1F1B (figure 4.8, bottom; Megatron-LM, arXiv 2104.04473): the stage holds v chunks and runs
    micro-batches in groups of pp through chunk 0, then the same group through chunk 1, ...
    (backward: the chunks in reverse). Needs m to be a multiple of pp."""
    def action(kind, k):  # the k-th forward / backward of this stage
        group, pos = divmod(k, pp * v)
        chunk = pos // pp if kind == "F" else v - 1 - pos // pp
        return kind, group * pp + pos % pp, chunk * pp + stage
    total = m * v
    warmup = min((pp - stage - 1) * 2 + (v - 1) * pp, total)
    actions = [action("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [action("F", warmup + k), action("B", k)]
    return actions + [action("B", k) for k in range(total - warmup, total)]


def schedule_actions(schedule, m, pp, stage, v=1):
    """The actions of one stage by schedule name (plot.py draws the plan of every stage from it)."""
    if schedule == "interleaved":
        return interleaved_schedule(m, pp, stage, v)
    return gpipe_schedule(m, pp, stage) if schedule == "gpipe" else one_f_one_b_schedule(m, pp, stage)


def schedule_for(pipe, m, forward_only=False):
    actions = schedule_actions(pipe.schedule, m, pipe.mesh.pp, pipe.mesh.pp_rank, pipe.virtual)
    return [a for a in actions if a[0] == "F"] if forward_only else actions


def bubble_fraction(schedule, pp, m, v=1):
    """Theoretical idle share of a step. GPipe and 1F1B: each stage waits (p-1) micro-batch
    slots to fill and drain the pipe around its m slots of work: (p-1)/(m+p-1). Interleaved:
    a slot is one chunk (1/v of a stage), so the fill/drain costs (p-1)/v of a micro-batch and
    the share is (p-1)/(v*m+p-1) (Megatron-LM: bubble/ideal time = (p-1)/(v*m))."""
    v = v if schedule == "interleaved" else 1
    return (pp - 1) / (v * m + pp - 1)


def check_pipeline(cfg, pp, m):
    """Layouts a schedule cannot run, named with their numbers."""
    if cfg.pp_schedule == "interleaved":
        if cfg.pp_virtual < 2:
            raise LayoutError(f"pp_schedule='interleaved' needs pp_virtual >= 2 chunks per stage (got {cfg.pp_virtual})")
        if m % pp:
            raise LayoutError(f"pp_schedule='interleaved' needs the micro-batches per step to be a multiple of pp: "
                              f"batch_size/(micro_batch_size*dp) = {m} micro-batches, pp={pp}")
    elif cfg.pp_virtual != 1:
        raise LayoutError(f"pp_virtual={cfg.pp_virtual} needs pp_schedule='interleaved' (got {cfg.pp_schedule!r})")


# ---- running a schedule
def chunk_forward(model, pipe, g, x, y, doc_ids=None):
    """Chunk g: x is (B, T) token ids for chunk 0, else (B, T, dim) hidden states (B, T/tp, dim)
    under sequence parallelism); doc_ids: the micro-batch's (B, T) document ids of packed rows, which
    every stage has (each builds its chunk's masks from them), or None. Returns the chunk's output,
    or the mean token loss for the last."""
    T, last = y.shape[1], g == pipe.n_chunks - 1  # T: the full sequence, which the rotary tables span
    cos, sin, docs = model.layer_inputs(T, 0, doc_ids)
    out = model.run(x, cos, sin, model.pieces(pipe.layers[g], g == 0, last), docs=docs)
    return model.loss_fn(out, y) if last else out


def _tag(kind, mb, g, m):
    """A distinct message tag per (direction, micro-batch, chunk) so the receiver matches
    exactly (gloo uses tags; NCCL ignores them and relies on the same posting order)."""
    return (2 * g + (kind == "B")) * m + mb


def _recv_op(pipe, kind, mb, g, m, device, dtype):
    """The receive an action needs first (None if it has its input): a forward of chunk g > 0
    takes activations from chunk g-1; a backward of a non-last chunk the gradient from g+1."""
    if (kind == "F" and g == 0) or (kind == "B" and g == pipe.n_chunks - 1):
        return None
    peer = pipe.rank_of(g - 1 if kind == "F" else g + 1)
    buf = torch.empty(pipe.shape, device=device, dtype=dtype)
    return dist.P2POp(dist.irecv, buf, peer, tag=_tag(kind, mb, g if kind == "F" else g + 1, m))


def _wait(work, pipe, timed, event):
    """Wait for a receive; with pp_measure_idle or pp_trace the wait is timed, which costs speed
    (off by default)."""
    if not timed:
        return work.wait()
    _timed_wait(pipe, work.wait, event)


def _sync_compute():
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def _timed_wait(pipe, wait, event):
    """Add the time wait() blocks to the stage's idle time (and to the trace as event = [kind, mb,
    chunk]). On CUDA the compute stream is drained first (not the whole device: NCCL runs on its
    own stream, and a device-wide sync would swallow the very wait we time); after wait() a second
    sync of the compute stream ends when the data has arrived."""
    _sync_compute()
    t = time.perf_counter()
    wait()
    _sync_compute()
    t_end = time.perf_counter()
    pipe.idle_s += t_end - t
    if pipe.trace is not None:
        pipe.trace.append(event + [t - pipe.trace_t0, t_end - pipe.trace_t0])


def _connect_neighbours(pipe, device):
    """One exchange with both neighbours (the ring: interleaving sends from the last stage to the
    first) in a single batch. NCCL connects a pair of ranks for one direction lazily, at the first
    batch that uses it, and that setup blocks the host until the peer's matching batch runs. GPipe's
    first backward receive on stage s is batched with its last forward send ([send a_m, recv g_1]),
    while stage s+1 sends g_1 only after it has a_m: without this exchange, a deadlock on NCCL."""
    prev, nxt = pipe.rank_of(pipe.mesh.pp_rank - 1), pipe.rank_of(pipe.mesh.pp_rank + 1)
    bufs = [torch.zeros(1, device=device) for _ in range(4)]
    ops = [dist.P2POp(dist.isend, bufs[0], nxt), dist.P2POp(dist.irecv, bufs[1], prev),
           dist.P2POp(dist.isend, bufs[2], prev), dist.P2POp(dist.irecv, bufs[3], nxt)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    pipe.connected = True


def run_schedule(model, micro_batches, loss_scale, autocast, forward_only=False):
    """Run this rank's actions. Returns the sum of the micro-batch losses on the stage holding
    the last chunk, 0 elsewhere. Each action's sends are posted with the next action's receive
    in one batch_isend_irecv, [..] below (1F1B, p=2, m=3, as a run logs it; a_i activations,
    g_i their gradients):
      stage 0:  F0  [send a0] F1  [send a1, recv g0] B0  F2  [send a2, recv g1] B1  [recv g2] B2
      stage 1:  [recv a0] F0  B0  [send g0, recv a1] F1  B1  [send g1, recv a2] F2  B2  [send g2]
    NCCL pairs a send with the neighbour's receive only inside one batch, and the k-th batches of
    the two stages meet: a1 goes out in the batch that waits for g0 and g0 in the one that waits
    for a1, so neither stage blocks the other. Sends are waited for only at the end of the
    schedule (no device sync after each send); finished ones are dropped on the way."""
    pipe, m = model.pipeline, len(micro_batches)
    device, dtype = micro_batches[0][0].device, next(model.parameters()).dtype  # the residual stream's dtype
    if not pipe.connected:
        _connect_neighbours(pipe, device)
    total = torch.zeros((), device=device)
    saved = {}  # (mb, g) -> (input, output) kept for the backward: the live activations
    sends, in_flight = [], []
    pipe.peak_live = 0
    for kind, mb, g in schedule_for(pipe, m, forward_only):
        recv = _recv_op(pipe, kind, mb, g, m, device, dtype)
        if sends or recv:
            works = dist.batch_isend_irecv(sends + ([recv] if recv else []))
            # a send's Work holds its tensor: keep only the unfinished ones, or every activation and
            # gradient this stage sends (m of each) stays allocated until the schedule ends. (NCCL;
            # gloo reports a send complete only at wait(), so on the CPU they all still stay.)
            in_flight = [w for w in in_flight if not w.is_completed()] + works[:len(sends)]
            if recv:  # timed in training steps only
                _wait(works[-1], pipe, (pipe.measure_idle or pipe.trace is not None) and not forward_only,
                      ["wait", mb, g])
        sends = []
        t_action = time.perf_counter()
        if kind == "F":
            x, y, *doc = micro_batches[mb]  # (x, y) or (x, y, doc_ids), as train.forward_backward takes
            inp = recv.tensor.requires_grad_(not forward_only) if recv else x
            with autocast:
                out = chunk_forward(model, pipe, g, inp, y, doc[0] if doc else None)
            if g == pipe.n_chunks - 1:
                total += out.detach().float()
            else:
                # contiguous: a sequence-parallel output is a slice of the sequence (P2P sends need dense memory)
                sends.append(dist.P2POp(dist.isend, out.detach().to(dtype).contiguous(), pipe.rank_of(g + 1),
                                        tag=_tag("F", mb, g + 1, m)))
            if not forward_only:
                saved[mb, g] = (inp, out)
                pipe.peak_live = max(pipe.peak_live, len(saved))
        else:
            inp, out = saved.pop((mb, g))
            model.grad_sync.sync = mb == m - 1  # dp: all-reduce a chunk's gradients in its last backward
            if g == pipe.n_chunks - 1:
                (out * (loss_scale / m)).backward()  # each micro loss is a token mean: 1/m of it
            else:
                torch.autograd.backward(out, grad_tensors=recv.tensor)
            if g > 0:
                sends.append(dist.P2POp(dist.isend, inp.grad.contiguous(), pipe.rank_of(g - 1), tag=_tag("B", mb, g, m)))
        if pipe.trace is not None and not forward_only:
            _sync_compute()
            pipe.trace.append([kind, mb, g, t_action - pipe.trace_t0, time.perf_counter() - pipe.trace_t0])
    if sends:
        in_flight += dist.batch_isend_irecv(sends)
    for w in in_flight:
        w.wait()
    return total


def pipeline_step(model, micro_batches, loss_scale, autocast):
    """forward_backward for pp > 1: the mean loss (on the last stage, 0 elsewhere), with
    gradients data-parallel averaged and a tied embedding's two copies summed."""
    pipe = model.pipeline
    if pipe.trace is not None:  # the stages start a traced step together, so their clocks line up
        _sync_compute()
        dist.barrier(group=pipe.mesh.pp_group)
        pipe.trace.clear()
    t0 = pipe.trace_t0 = time.perf_counter()
    total = run_schedule(model, micro_batches, loss_scale, autocast)
    if pipe.measure_idle or pipe.trace is not None:  # the drain: a stage done early waits for the others
        _timed_wait(pipe, lambda: dist.barrier(group=pipe.mesh.pp_group), ["drain", -1, -1])
    model.grad_sync.finish()
    if pipe.embed_group is not None:  # d loss / d W = embedding's part (first) + output head's part (last)
        w = model.tok_embeddings.weight if model.tok_embeddings is not None else model.output.weight
        # after the dp sync: w.grad, or under ZeRO this rank's dp shard of it, the only part kept
        all_reduce(model.grad_sync.reduced_grad(w), pipe.embed_group)
    pipe.trace_length = time.perf_counter() - t0
    pipe.total_s += pipe.trace_length
    return total / len(micro_batches)


def pipeline_forward(model, micro_batches, autocast):
    """Evaluation through the pipeline: the summed micro-batch losses on the last stage, 0 elsewhere."""
    return run_schedule(model, micro_batches, 1.0, autocast, forward_only=True)


def pipeline_idle(model):
    """Measured idle share of each stage since the last call, as a list by stage (collective
    over the pipeline; call it at log steps only, it syncs the host)."""
    pipe = model.pipeline
    parts = [None] * pipe.mesh.pp
    dist.all_gather_object(parts, (pipe.idle_s, pipe.total_s), group=pipe.mesh.pp_group)
    pipe.idle_s = pipe.total_s = 0.0
    return [idle / max(total, 1e-9) for idle, total in parts]


def pipeline_trace(model):
    """The traced step of every stage, by stage: {"length": s, "events": [[kind, mb, chunk, start,
    end], ...]} (collective over the pipeline; plot.py --timeline draws it)."""
    pipe = model.pipeline
    parts = [None] * pipe.mesh.pp
    dist.all_gather_object(parts, {"length": pipe.trace_length, "events": pipe.trace}, group=pipe.mesh.pp_group)
    return parts


def gather_stages(full, model, mesh):
    """Stage 0 collects the stages' {name: tensor} dicts (on dp rank 0; the others return {}).
    A tied output matrix is left out: the first stage's tok_embeddings.weight is the one saved."""
    if mesh.dp_rank != 0 or mesh.tp_rank != 0:
        return {}
    tied = {n for n, p in model.named_parameters() if getattr(p, "pp_tied_copy", False)}
    full = {k: v for k, v in full.items() if k not in tied}
    parts = [None] * mesh.pp if mesh.pp_rank == 0 else None
    dist.gather_object(full, parts, dst=mesh.pp_ranks[0], group=mesh.pp_group)
    return {k: v for part in parts for k, v in part.items()} if mesh.pp_rank == 0 else {}


# --------------------------------------------------------------------------- apply, in a fixed order
# What other files set on a model.py Transformer, in one place (model.py itself sets loss_fn only):
#   model.loss_fn    (logits, targets) -> mean loss: model.cross_entropy, or tensor_parallel's vocab-parallel one
#   model.pipeline   Pipeline (pipeline_split, pp > 1; absent otherwise): read by the schedule and zero.py
#   model.grad_sync  the dp gradient sync: set here (NoSync, or GradBuckets when dp > 1), replaced by
#                    zero.ZeroAdamW (zero.GradShards). Each one has, in the order a step uses them:
#                      sync             False in accumulation micro-steps; True before a step's last backward
#                      finish()         after that backward: the dp-mean gradients are in place
#                      reduced_grad(p)  then: p's dp-mean gradient (p.grad, or ZeRO's shard of it)
#                      set_to_none      after the optimizer step: optimizer.zero_grad(set_to_none=...)
#   p.tp_dim         on a tensor-parallel slice (_shard), read by grad_norm, gather_full, shard_full:
#   p.tp_shards      the full tensor is split along dim tp_dim in tp_shards equal slices (default tp),
#                    tp rank r holds slice r * tp_shards // tp (n_kv_heads < tp: tp / n_kv_heads ranks
#                    share a kv head's wk/wv slice). Absent: the full tensor, the same on every tp rank
#   p.pp_tied_copy   on the last stage's copy of a tied embedding (pipeline_split): norm and saves skip it
def parallelize(model, mesh, cfg, device=None, adapt=None):
    """The transforms in the order of the module docstring; tp and pp cut the model where it was
    built (e.g. the CPU), so only this rank's part reaches `device`. adapt(model) -> model, if
    given, runs on this rank's cut model before it moves and data parallelism hooks its
    parameters (finetune.py's LoRA: adapters split as their tp-sharded base matrices). Returns the model."""
    model.grad_sync = NoSync()
    if mesh.tp > 1:  # tp=1: no transform at all, so f and g cost nothing
        tensor_parallel(model, mesh, cfg)
    if mesh.pp > 1:  # pipeline: keep this rank's chunks of layers (after TP, before the DP hooks)
        pipeline_split(model, mesh, cfg)
    if adapt is not None:
        model = adapt(model)
    if device is not None:
        model.to(device)
    if mesh.dp > 1 and not (cfg.zero or getattr(cfg, "master_weights", False)):  # else zero.ZeroAdamW syncs
        check_replicas_identical(model, mesh.dp_group)
        model.grad_sync = GradBuckets(list(model.parameters()), mesh.dp_group, cfg.dp_bucket_mb)
    return model


# --------------------------------------------------------------------------- whole-model helpers
def counted_in_norm(p, mesh):
    """Whether this rank adds p to the global gradient norm, so that each distinct tensor
    counts once: a tp-replicated one on tp rank 0, a tp-sharded one on the first tp rank
    holding each distinct slice (see tp_dim / tp_shards), a pipeline's tied copy of the
    embedding nowhere (the first stage counts it). Stages add up over pp."""
    if getattr(p, "pp_tied_copy", False):
        return False
    if getattr(p, "tp_dim", None) is None:
        return mesh.tp_rank == 0
    return mesh.tp_rank % (mesh.tp // p.tp_shards) == 0


def grad_norm(model, mesh):
    """Global L2 norm of the gradients of the whole model (a float32 0-dim tensor)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and counted_in_norm(p, mesh)]
    return all_reduce(sum_of_squares(grads, next(model.parameters()).device), mesh.mp_group).sqrt()


def sum_of_squares(tensors, device):
    """Sum of the squares of all elements (float32 0-dim): one multi-tensor norm kernel with
    float32 accumulation, no float32 copies of low-precision tensors, no host sync."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


def _gather_tp(named, model, mesh):
    """{name: local slice} -> {name: this stage's full tensor} on every tp rank."""
    params = dict(model.named_parameters())
    out = {}
    for k, v in named.items():
        p = params[k]
        if getattr(p, "tp_dim", None) is not None:
            parts = _all_gather_cat(v.detach(), mesh.tp_group, dim=p.tp_dim).chunk(mesh.tp, p.tp_dim)
            v = torch.cat(parts[::mesh.tp // p.tp_shards], p.tp_dim)  # replicated kv: once each
        out[k] = v
    return out


def _shard_tp(full, params, mesh):
    """{name: full tensor} -> {name: this tp rank's slice} (identity for tp_dim None)."""
    out = {}
    for k, v in full.items():
        dim = getattr(params[k], "tp_dim", None)
        out[k] = v if dim is None else v.chunk(params[k].tp_shards, dim)[mesh.tp_rank * params[k].tp_shards // mesh.tp]
    return out


def gather_full(named, model, mesh):
    """{name: local tensor} on every rank -> {name: full single-process tensor} on rank 0
    (others get {}). Used for parameters and for per-parameter optimizer moments."""
    if mesh.tp > 1:  # tensor parallelism: full tensors on every tp rank of the stage
        named = _gather_tp(named, model, mesh)
    full = {k: v.detach().cpu() for k, v in named.items()}
    if mesh.pp > 1:  # pipeline: stage 0 merges the stages' dicts (names are single-process)
        full = gather_stages(full, model, mesh)
    return full


def shard_full(full, model, mesh):
    """{name: full tensor} -> {name: this rank's slice} for the parameters this rank holds."""
    params = dict(model.named_parameters())
    if "output.weight" in params and "output.weight" not in full and "tok_embeddings.weight" in full:
        full = {**full, "output.weight": full["tok_embeddings.weight"]}  # pipeline: last stage's tied copy
    mine = {k: v for k, v in full.items() if k in params}
    return _shard_tp(mine, params, mesh) if mesh.tp > 1 else mine


def reduce_for_log(value, mesh):
    """Mean of a per-rank scalar (e.g. the loss) over the dp replicas, for logging only.
    Under pipeline parallelism the value lives on the last stage (zeros elsewhere)."""
    v = value.detach().float().clone()
    all_reduce(v, mesh.pp_group)  # pipeline: the last stage's value reaches every stage
    all_reduce(v, mesh.dp_group)
    return v / mesh.dp
