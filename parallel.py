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


# --------------------------------------------------------------------------- apply, in a fixed order
def parallelize(model, mesh, cfg):
    """Tensor parallelism, then pipeline stages, then data-parallel gradient hooks.
    Returns the model; model.grad_sync is None without data parallelism."""
    model.grad_sync = None
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
        if p.grad is not None and (getattr(p, "tp_dim", None) is not None or mesh.tp_rank == 0):
            sq += p.grad.float().pow(2).sum()
    return all_reduce(sq, mesh.mp_group).sqrt()


def gather_full(named, model, mesh):
    """{name: local tensor} on every rank -> {name: full single-process tensor} on rank 0
    (others get {}). Used for parameters and for per-parameter optimizer moments."""
    return {k: v.detach().cpu() for k, v in named.items()}


def shard_full(full, model, mesh):
    """{name: full tensor} -> {name: this rank's slice} for the parameters this rank holds."""
    params = dict(model.named_parameters())
    return {k: v for k, v in full.items() if k in params}


def reduce_for_log(value, mesh):
    """Mean of a per-rank scalar (e.g. the loss) over the dp replicas, for logging only."""
    v = value.detach().float().clone()
    all_reduce(v, mesh.dp_group)
    return v / mesh.dp
