"""Data, tensor and pipeline parallelism by hand, over plain torch.distributed groups.

Launch: torchrun --nproc_per_node=N train.py configs/<name>.py --tp=T --pp=P --zero=Z.
The world is a grid of ranks, rank = (dp_rank * pp + pp_rank) * tp + tp_rank, i.e.
arange(world).view(dp, pp, tp): tensor-parallel ranks are adjacent (same node, fast
links), then pipeline stages, then data-parallel replicas.

parallelize() applies the transforms to a built single-device model in a fixed order:
tensor parallelism (swap Linear/Embedding for sharded ones), pipeline parallelism (keep
this stage's layers), then data parallelism (gradient all-reduce hooks).
"""
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


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
    tp, pp = cfg.tp, cfg.pp
    grid = torch.arange(world).view(dp, pp, tp)
    d, p, t = (int(i) for i in (grid == rank).nonzero()[0])
    mesh = Mesh(world, rank, dp, pp, tp, d, p, t)
    # every rank must create every group, in the same order
    for name, lists in (("dp_group", grid.permute(1, 2, 0).reshape(-1, dp)),
                        ("pp_group", grid.permute(0, 2, 1).reshape(-1, pp)),
                        ("tp_group", grid.reshape(-1, tp)),
                        ("mp_group", grid.reshape(dp, -1))):
        for ranks in lists.tolist():
            group = dist.new_group(ranks)
            if rank in ranks:
                setattr(mesh, name, group)
                if name == "pp_group":
                    mesh.pp_ranks = ranks
    return mesh


def all_reduce(tensor, group, op=dist.ReduceOp.SUM):
    """In-place all-reduce that is a no-op without a group (one process)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# --------------------------------------------------------------------------- data parallelism
class GradBuckets:
    """Average gradients over the dp group (book 4.2.1), overlapping backward.

    Parameters are packed, in the reverse of their creation order (roughly the order
    backward produces their gradients), into buckets of about bucket_mb MB. A hook fires
    when a parameter's gradient is final; when every parameter of a bucket is ready, the
    bucket's flat gradient is all-reduced asynchronously while backward goes on. finish()
    waits for the handles and copies the averages back. While `sync` is False (the
    accumulation micro-steps) the hooks do nothing and gradients just accumulate locally."""

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
        self.flat = [None] * len(self.buckets)
        for p in (p for b in self.buckets for p in b):
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, p):
        if not self.sync:
            return
        i = self.bucket_of[id(p)]
        self.pending[i] += 1
        if self.pending[i] == len(self.buckets[i]):
            self.pending[i] = 0
            flat = torch.cat([q.grad.reshape(-1) for q in self.buckets[i]]).div_(self.world)
            self.flat[i] = flat
            self.handles.append(dist.all_reduce(flat, group=self.group, async_op=True))

    def finish(self):
        """Wait for every bucket and write the averaged gradients back into .grad."""
        if any(self.pending) or len(self.handles) != len(self.buckets):
            raise RuntimeError("data-parallel gradient sync incomplete: some parameters got no gradient "
                               "in the last micro-step (unused parameters are not supported)")
        for h in self.handles:
            h.wait()
        for bucket, flat in zip(self.buckets, self.flat):
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self.handles, self.flat = [], [None] * len(self.buckets)


def check_replicas_identical(model, group):
    """Parameters must start identical on every dp rank (same seed): checked, not assumed."""
    if group is None or dist.get_world_size(group) == 1:
        return
    local = torch.stack([p.detach().float().sum() for p in model.parameters()])
    ref = local.clone()
    dist.broadcast(ref, src=dist.get_global_rank(group, 0), group=group)
    if not torch.equal(local, ref):
        raise RuntimeError("data-parallel replicas start with different parameters; every rank must use the same seed")


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
    model.pipeline = Pipeline(mesh, cfg.pp_schedule, cfg.pp_virtual, mine, n_chunks,
                              (cfg.micro_batch_size, cfg.block_size, model.config.dim),
                              embed_group=_embedding_group(mesh) if model.config.tie_embeddings else None,
                              measure_idle=cfg.pp_measure_idle)


def _embedding_group(mesh):
    """The first and last stage of each pipeline (as Megatron does for tied embeddings).
    Every rank creates every group, in the same order."""
    grid = torch.arange(mesh.world).view(mesh.dp, mesh.pp, mesh.tp)
    mine = None
    for d in range(mesh.dp):
        for t in range(mesh.tp):
            ranks = [int(grid[d, 0, t]), int(grid[d, -1, t])]
            group = dist.new_group(ranks)
            if mesh.rank in ranks:
                mine = group
    return mine


# ---- schedules: plain functions, (m micro-batches, pp stages, this stage) -> list of actions
def gpipe_schedule(m, pp, stage):
    """GPipe (figure 4.7): every forward, then every backward; all m activations stay alive."""
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
    """Interleaved 1F1B (figure 4.8, bottom; Megatron-LM): the stage holds v chunks and runs
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


def schedule_for(pipe, m, forward_only=False):
    pp, stage = pipe.mesh.pp, pipe.mesh.pp_rank
    if pipe.schedule == "interleaved":
        actions = interleaved_schedule(m, pp, stage, pipe.virtual)
    elif pipe.schedule == "gpipe":
        actions = gpipe_schedule(m, pp, stage)
    else:
        actions = one_f_one_b_schedule(m, pp, stage)
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
def chunk_forward(model, pipe, g, x, y):
    """Chunk g: x is (B, T) token ids for chunk 0, else (B, T, dim) hidden states.
    Returns the (B, T, dim) output, or the mean token loss for the last chunk."""
    T = x.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    h = model.tok_embeddings(x) if g == 0 else x
    for i in pipe.layers[g]:
        h = model.layers[str(i)](h, cos, sin)
    if g < pipe.n_chunks - 1:
        return h
    return model.loss_fn(model.output(model.norm(h)), y)


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


def _wait(work, pipe):
    """Wait for a receive; with pp_measure_idle the wait is timed (a device sync first, so the
    time counts only idling, which costs speed: off by default)."""
    if not pipe.measure_idle:
        return work.wait()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    work.wait()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    pipe.idle_s += time.perf_counter() - t


def run_schedule(model, micro_batches, loss_scale, autocast, forward_only=False):
    """Run this rank's actions. Returns the sum of the micro-batch losses on the stage holding
    the last chunk, 0 elsewhere. Each action's sends are posted together with the next
    action's receive in one batch_isend_irecv: NCCL pairs a send with the neighbour's
    receive only inside one group, so neighbours that both send then receive cannot deadlock.
    Sends are waited for only at the end of the schedule: no device sync after each send."""
    pipe, m = model.pipeline, len(micro_batches)
    device, dtype = micro_batches[0][0].device, next(model.parameters()).dtype  # the residual stream's dtype
    total = torch.zeros((), device=device)
    saved = {}  # (mb, g) -> (input, output) kept for the backward: the live activations
    sends, in_flight = [], []
    pipe.peak_live = 0
    for kind, mb, g in schedule_for(pipe, m, forward_only):
        recv = _recv_op(pipe, kind, mb, g, m, device, dtype)
        if sends or recv:
            works = dist.batch_isend_irecv(sends + ([recv] if recv else []))
            in_flight += works[:len(sends)]
            if recv:
                _wait(works[-1], pipe)
        sends = []
        if kind == "F":
            x, y = micro_batches[mb]
            inp = recv.tensor.requires_grad_(not forward_only) if recv else x
            with autocast:
                out = chunk_forward(model, pipe, g, inp, y)
            if g == pipe.n_chunks - 1:
                total += out.detach().float()
            else:
                sends.append(dist.P2POp(dist.isend, out.detach().to(dtype), pipe.rank_of(g + 1), tag=_tag("F", mb, g + 1, m)))
            if not forward_only:
                saved[mb, g] = (inp, out)
                pipe.peak_live = max(pipe.peak_live, len(saved))
        else:
            inp, out = saved.pop((mb, g))
            if model.grad_sync is not None:  # dp: all-reduce a chunk's gradients in its last backward
                model.grad_sync.sync = mb == m - 1
            if g == pipe.n_chunks - 1:
                (out * (loss_scale / m)).backward()  # each micro loss is a token mean: 1/m of it
            else:
                torch.autograd.backward(out, grad_tensors=recv.tensor)
            if g > 0:
                sends.append(dist.P2POp(dist.isend, inp.grad, pipe.rank_of(g - 1), tag=_tag("B", mb, g, m)))
    if sends:
        in_flight += dist.batch_isend_irecv(sends)
    for w in in_flight:
        w.wait()
    return total


def pipeline_step(model, micro_batches, loss_scale, autocast):
    """forward_backward for pp > 1: the mean loss (on the last stage, 0 elsewhere), with
    gradients data-parallel averaged and a tied embedding's two copies summed."""
    pipe, t0 = model.pipeline, time.perf_counter()
    total = run_schedule(model, micro_batches, loss_scale, autocast)
    if model.grad_sync is not None:
        model.grad_sync.finish()
    if pipe.embed_group is not None:  # d loss / d W = embedding's part (first) + output head's part (last)
        w = model.tok_embeddings.weight if model.tok_embeddings is not None else model.output.weight
        all_reduce(w.grad, pipe.embed_group)
    pipe.total_s += time.perf_counter() - t0
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
def parallelize(model, mesh, cfg):
    """Tensor parallelism, then pipeline stages, then data-parallel gradient hooks.
    Returns the model; model.grad_sync is None without data parallelism."""
    model.grad_sync = None
    if mesh.pp > 1:  # pipeline: keep this rank's chunks of layers (after TP, before the DP hooks)
        pipeline_split(model, mesh, cfg)
    if mesh.dp > 1 and not cfg.zero:
        check_replicas_identical(model, mesh.dp_group)
        model.grad_sync = GradBuckets(list(model.parameters()), mesh.dp_group, cfg.dp_bucket_mb)
    return model


# --------------------------------------------------------------------------- whole-model helpers
def grad_norm(model, mesh):
    """Global L2 norm of the gradients of the whole model (a float32 0-dim tensor).
    Each parameter is counted once: a tensor-sharded one contributes its shard on
    every tp rank, a replicated one only on tp rank 0; stages add up over pp."""
    sq = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for p in model.parameters():
        if getattr(p, "pp_tied_copy", False):  # pipeline: the first stage counts the tied embedding
            continue
        if p.grad is not None and (getattr(p, "tp_dim", None) is not None or mesh.tp_rank == 0):
            sq += p.grad.float().pow(2).sum()
    return all_reduce(sq, mesh.mp_group).sqrt()


def gather_full(named, model, mesh):
    """{name: local tensor} on every rank -> {name: full single-process tensor} on rank 0
    (others get {}). Used for parameters and for per-parameter optimizer moments."""
    full = {k: v.detach().cpu() for k, v in named.items()}
    if mesh.pp > 1:  # pipeline: stage 0 merges the stages' dicts (names are single-process)
        full = gather_stages(full, model, mesh)
    return full


def shard_full(full, model, mesh):
    """{name: full tensor} -> {name: this rank's slice} for the parameters this rank holds."""
    params = dict(model.named_parameters())
    if "output.weight" in params and "output.weight" not in full and "tok_embeddings.weight" in full:
        full = {**full, "output.weight": full["tok_embeddings.weight"]}  # pipeline: last stage's tied copy
    return {k: v for k, v in full.items() if k in params}


def reduce_for_log(value, mesh):
    """Mean of a per-rank scalar (e.g. the loss) over the dp replicas, for logging only.
    Under pipeline parallelism the value lives on the last stage (zeros elsewhere)."""
    v = value.detach().float().clone()
    all_reduce(v, mesh.pp_group)  # pipeline: the last stage's value reaches every stage
    all_reduce(v, mesh.dp_group)
    return v / mesh.dp
