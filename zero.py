"""ZeRO (arXiv 1910.02054): a sharded mixed-precision AdamW over the data-parallel group (book 4.2.4).

  torchrun --nproc_per_node=8 train.py configs/llama_1b.py --zero=1|2|3 [--master_weights=True]
  python bench_memory.py [--dp=1,2,4]      measured bytes per rank next to the formulas below

With master_weights=True (figure 4.16) the model computes with low-precision (bf16/fp16) parameters
and gradients (k = 2 bytes each), while AdamW keeps float32 master weights and both moments: 12
bytes per parameter. Without it the parameters stay float32 (k = 4) under autocast, as in train.py's
zero=0 path, so the zero stage changes only where the bytes live. With Phi parameters and N
data-parallel ranks, bytes per rank are (book, fig. 4.17, with k = 2):

  zero=0  plain data parallelism         k*Phi + k*Phi + 12*Phi        = 2Phi + 2Phi + 12Phi
  zero=1  P_os:     optimizer sharded    k*Phi + k*Phi + 12*Phi/N      = 4Phi + 12Phi/N
  zero=2  P_os+g:   gradients too        k*Phi + (k + 12)*Phi/N        = 2Phi + 14Phi/N
  zero=3  P_os+g+p: parameters too       (2k + 12)*Phi/N               = 16Phi/N

Layout: the parameters are grouped into units (one per parameter outside the layers:
embedding, final norm, output head; then one per transformer layer). Each unit is one flat
buffer padded to a multiple of N*ALIGN, and dp rank r owns the contiguous slice [r*S, (r+1)*S)
of every unit (zero=0, master weights without sharding: N = 1, every rank owns it all). The
rank's float32 master weights and moments are its slices of all units, concatenated, and the
AdamW update (one fused pass per unit, adamw_update_) runs on that shard only. What each stage
changes:

  zero=0: GradShards.finish all-reduces each unit's full gradient (Unit.collect_grad's buffer).
  zero=1: GradShards.finish reduce-scatters it instead (every rank gets the mean gradient of
          its slice); ZeroAdamW.step all-gathers the updated parameters.
  zero=2: GradShards._on_grad_ready reduce-scatters a unit's gradients as soon as backward has
          produced them (overlapping the rest of backward) and drops the full gradients.
  zero=3: only the slice of the parameters is kept too (Unit.gather / Unit.free): a unit is
          all-gathered right before its forward and again before its backward, prefetching the
          next, by hooks on the modules (install_gather_hooks), not on model.forward, so a
          pipeline schedule's chunks and interleaved micro-batches work.

With tensor/pipeline parallelism each rank shards its own (tp/pp-local) parameters within its
dp group. A pipeline's tied embedding (first and last stage) is sharded alike on both stages,
so its two gradient contributions are summed shard by shard after the reduce-scatter.
Checkpoints: per-name full tensors in the zero=0 format (model.pt, optimizer.pt: any layout,
zero stage or dp size resumes) plus each rank's shard file optim_rank<r>.pt, loaded directly
when the layout is unchanged.
"""
import os

import torch
import torch.distributed as dist

import parallel
from parallel import _size, all_gather_flat, reduce_scatter_flat  # one process: copies


def gather_to_first(inp, group):
    """The concatenation of every rank's inp on the group's first rank (None elsewhere)."""
    if _size(group) == 1:
        return inp
    first = dist.get_global_rank(group, 0)
    parts = [torch.empty_like(inp) for _ in range(_size(group))] if dist.get_rank() == first else None
    dist.gather(inp, parts, dst=first, group=group)
    return torch.cat(parts) if parts is not None else None


# --------------------------------------------------------------------------- units: flat, padded, sharded
ALIGN = 64  # elements (128 bytes of bf16)


class Unit:
    """Parameters stored as one flat buffer `full` of `padded` = N*S elements; rank r owns
    full[r*S:(r+1)*S] (zero=0: N = 1). The parameters in `decayed` (model.param_groups' rule) come
    first, so weight decay is one range of the flat buffer."""

    def __init__(self, named_params, mesh, dtype, stage, decayed):
        named_params = sorted(named_params, key=lambda np_: id(np_[1]) not in decayed)  # stable: decayed first
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [p.shape for p in self.params]
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        self.numel, self.n_decay = offset, sum(p.numel() for p in self.params if id(p) in decayed)
        # shard size ceil(numel / N), rounded up to ALIGN elements: every shard, and every slice of
        # the optimizer state, starts aligned, so one compiled update kernel serves all units
        n, rank = (mesh.dp, mesh.dp_rank) if stage else (1, 0)
        self.S = ALIGN * -(-self.numel // (ALIGN * n))
        self.padded, self.start = self.S * n, self.S * rank
        self.n_decay_shard = min(max(self.n_decay - self.start, 0), self.S)  # matrices first: a prefix of the shard
        self.group, self.stage, self.ready, self.handle = mesh.dp_group, stage, 0, None
        device = self.params[0].device
        flat32 = torch.zeros(self.padded, dtype=torch.float32, device=device)
        for p, o in zip(self.params, self.offsets):
            flat32[o:o + p.numel()] = p.detach().reshape(-1)
        self.master_init = self.shard(flat32).clone()  # float32, before rounding to `dtype`
        self.full = flat32.to(dtype)
        with torch.no_grad():
            for p, o, shape in zip(self.params, self.offsets, self.shapes):
                p.data = self.full[o:o + shape.numel()].view(shape)  # parameters are views of `full`
        self.grad = None  # stages 0-1: the full flat gradient (N*S,) from finish() to zero_grad(), p.grad views of it
        if stage <= 1:
            self.grad = torch.empty_like(self.full)
            self.release_grad()  # collect_grad() allocates it after the first backward
        self.param_shard = self.shard(self.full)  # stages 1-2: a view; stage 3: its own (S,) buffer
        self.gathered = True
        if stage == 3:
            self.param_shard = self.param_shard.clone()
            self.free()

    def shard(self, flat):
        return flat[self.start:self.start + self.S]

    def flatten(self, named):
        """{name: tensor} -> this unit's padded float32 flat buffer (on the CPU)."""
        flat = torch.zeros(self.padded)
        for n, o, shape in zip(self.names, self.offsets, self.shapes):
            flat[o:o + shape.numel()] = named[n].reshape(-1)
        return flat

    def ranges(self, keep):
        """[(a, b)] in shard coordinates covering the parameters p with keep(p)."""
        out = []
        for p, o in zip(self.params, self.offsets):
            a, b = max(o, self.start) - self.start, min(o + p.numel(), self.start + self.S) - self.start
            if keep(p) and a < b:
                out.append((a, b))
        return out

    # stage 3: gather / free the low-precision parameters. Freeing resizes the storage to 0
    # bytes and gathering refills the same storage, so the parameter views and the views
    # autograd saved for backward (e.g. weight.t()) stay valid without re-pointing anything.
    def gather(self, async_op=False):
        if not self.gathered:
            self.full.untyped_storage().resize_(self.padded * self.full.element_size())
            self.handle = all_gather_flat(self.full, self.param_shard, self.group, async_op=async_op)
            self.gathered = True
        if not async_op:
            self.wait()

    def wait(self):
        if self.handle is not None:
            self.handle.wait()
            self.handle = None

    def free(self):
        if self.stage == 3 and self.gathered:
            self.wait()
            self.full.untyped_storage().resize_(0)
            self.gathered = False

    # stages 0-1: the flat gradient lives from the end of the backward to zero_grad(), not through
    # the forward, where activations peak (2 bytes per parameter less there)
    def collect_grad(self):
        """Make p.grad views of `grad`: allocate it if released, copy in the gradients autograd
        allocated (one copy per step), zeros for a parameter that got none."""
        released = self.grad.untyped_storage().nbytes() == 0
        if released:
            self.grad.untyped_storage().resize_(self.padded * self.grad.element_size())
            self.grad[self.numel:].zero_()  # the padding
        for p, o, shape in zip(self.params, self.offsets, self.shapes):
            view = self.grad[o:o + shape.numel()].view(shape)
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            elif p.grad is None and released:
                view.zero_()
            p.grad = view

    def release_grad(self):
        self.grad.untyped_storage().resize_(0)
        for p in self.params:
            p.grad = None


def make_units(model, mesh, dtype, stage):
    """One unit per parameter outside model.layers (embedding, final norm, output head: the
    "root"), then one unit per layer. A root parameter gets a unit of its own so that its shard
    boundaries depend only on its size: a pipeline's two copies of a tied embedding (first and
    last stage) then shard alike over dp, and their gradient shards can be summed. Frozen
    parameters (requires_grad False: LoRA's base weights) are in no unit: the optimizer holds
    nothing of them, and they stay whole on every rank in their own dtype."""
    in_layers = {id(p) for layer in model.layers.values() for p in layer.parameters()}
    root = [(n, p) for n, p in model.named_parameters() if id(p) not in in_layers and p.requires_grad]
    decayed = {id(p) for group in model.param_groups(1.0) if group["weight_decay"] for p in group["params"]}
    units = [Unit([named], mesh, dtype, stage, decayed) for named in root]
    for key, layer in model.layers.items():
        trained = [(n, p) for n, p in layer.named_parameters(prefix=f"layers.{key}") if p.requires_grad]
        if trained:
            units.append(Unit(trained, mesh, dtype, stage, decayed))
    return units


# --------------------------------------------------------------------------- gradients: model.grad_sync
class GradShards:
    """model.grad_sync for ZeroAdamW (the protocol: see parallel.parallelize).

    stages 0-1: nothing during backward; finish() all-reduces (0) or reduce-scatters (1) each
    unit's flat gradient.
    stages 2-3: a hook counts a unit's gradients; when all are there (in a sync micro-step)
    the unit's gradient is reduce-scattered asynchronously, added to this rank's shard, and
    the full gradients are dropped. In the no-sync micro-steps gradients accumulate locally
    at full size, as DeepSpeed does: exact, but the full gradients (k*Phi bytes) live through
    the accumulation. Reducing every micro-step instead would keep only k*Phi/N but cost one
    reduce-scatter per micro-batch. Stage 3 also frees a unit's parameters after its backward."""

    set_to_none = True  # stages 0-1 release the flat gradient buffers until the next finish()

    def __init__(self, units, stage, group, grad_shards):
        self.units, self.stage, self.group, self.dp = units, stage, group, _size(group)
        self.sync, self.pending = True, []
        if stage >= 2:
            for unit, shard in zip(units, grad_shards):
                unit.grad_shard = shard
                for p in unit.params:
                    p.register_post_accumulate_grad_hook(lambda p, unit=unit: self._on_grad_ready(unit))

    def _on_grad_ready(self, unit):
        unit.ready += 1
        if unit.ready < len(unit.params):
            return
        unit.ready = 0  # every parameter of the unit has its gradient for this backward
        if self.sync:
            pad = unit.padded - unit.numel
            flat = torch.cat([p.grad.reshape(-1) for p in unit.params] + [unit.full.new_zeros(pad)])
            out = torch.empty_like(unit.grad_shard)
            handle = reduce_scatter_flat(out, flat, self.group, async_op=True, mean=True)
            self.pending.append((handle, out, unit.grad_shard, flat))
            for p in unit.params:
                p.grad = None
        unit.free()  # stage 3: the unit's backward is over

    def finish(self):
        if self.stage <= 1:
            for unit in self.units:
                unit.collect_grad()
                if self.dp == 1:
                    continue  # one rank: its gradient is already the mean and its own shard (no divide, no copies)
                if self.stage == 0:  # unsharded: every rank averages the whole flat gradient in place
                    flat, op = parallel.mean_op(unit.grad, self.group)
                    self.pending.append((dist.all_reduce(flat, op=op, group=self.group, async_op=True), None, None, None))
                    continue
                out = torch.empty_like(unit.shard(unit.grad))
                self.pending.append((reduce_scatter_flat(out, unit.grad, self.group, async_op=True, mean=True),
                                     out, unit.shard(unit.grad), None))
        elif any(u.ready for u in self.units):
            raise RuntimeError("ZeRO gradient sync incomplete: some parameters got no gradient in the last "
                               "micro-step (unused parameters are not supported)")
        for handle, out, dest, _ in self.pending:
            if handle is not None:
                handle.wait()
            if self.stage == 1:
                dest.copy_(out)
            elif self.stage > 1:
                dest.add_(out)  # stages 2-3 accumulate: correct even if every micro-step syncs
        self.pending = []

    def reduced_grad(self, p):
        """After finish(): this rank's shard of the dp-mean gradient of a root parameter p (alone in
        its unit), where the optimizer reads it. parallel.pipeline_step sums a tied embedding's
        two copies here: both stages shard the matrix alike over dp, and summing the shards
        equals reduce-scattering the summed full gradients (sum and reduce-scatter commute),
        which stages 2-3 could not do, having dropped the full gradient."""
        (unit,) = [u for u in self.units if len(u.params) == 1 and u.params[0] is p]
        return unit.shard(unit.grad) if self.stage <= 1 else unit.grad_shard


# --------------------------------------------------------------------------- stage 3: gather hooks
def forward_runs(model):
    """The modules holding parameters, in the order a forward calls them (model.pieces): the whole
    model, or under pipeline parallelism each of this stage's chunks (parallel.chunk_forward)."""
    pipe = getattr(model, "pipeline", None)
    if pipe is None:
        return [[m for _, m in model.pieces()]]
    return [[m for _, m in model.pieces(ids, g == 0, g == pipe.n_chunks - 1)] for g, ids in pipe.layers.items()]


def install_gather_hooks(model, units):
    """Stage 3: a module all-gathers its unit right before its forward; a hook on its output
    gathers it again when backward reaches the module, and GradShards frees it after the unit's
    backward. A layer frees its unit right after its forward; the embedding, final norm and
    output head (root units, their backward comes soon) keep theirs until their backward, as
    FSDP keeps its root's. Since every use gathers (a no-op when the unit is still there), the
    parameters are present in any order of forwards and backwards: a pipeline schedule runs
    several micro-batches' forwards before their backwards (GPipe: all of them), so one
    micro-batch's backward frees a root unit that the next one's backward needs again.
    Prefetch: within a run (forward_runs) a forward starts the gather of the next module's
    unit and a backward that of the previous module's. That module is always the very next one
    used, so a prefetched copy never outlives the forward or backward that started it (it
    would go stale at the optimizer step)."""
    unit_of = {id(p): u for u in units for p in u.params}
    layers = {id(layer) for layer in model.layers.values()}

    def module_unit(module):  # a layer, or a one-parameter root module; None when all of it is frozen
        units = {unit_of[id(p)] for p in module.parameters() if id(p) in unit_of}
        return units.pop() if units else None

    def hooks(unit, is_root, next_unit, prev_unit):
        def before_backward(grad):
            unit.gather()
            if prev_unit is not None:
                prev_unit.gather(async_op=True)

        def before_forward(module, args):
            unit.gather()
            if next_unit is not None:
                next_unit.gather(async_op=True)

        def after_forward(module, args, output):
            training = torch.is_grad_enabled() and output.requires_grad
            if not (is_root and training):
                unit.free()
            if training:
                output.register_hook(before_backward)
        return before_forward, after_forward

    for run in forward_runs(model):
        run_units = [module_unit(m) for m in run]
        for i, module in enumerate(run):
            if run_units[i] is None:  # frozen: nothing to gather
                continue
            is_root = id(module) not in layers
            before, after = hooks(run_units[i], is_root, run_units[i + 1] if i + 1 < len(run) else None,
                                  run_units[i - 1] if i > 0 else None)
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)


# --------------------------------------------------------------------------- the fused AdamW update
def adamw_update_(param, grad, master, exp_avg, exp_avg_sq, grad_scale, n_decay, step, beta1, beta2, eps):
    """AdamW on one unit's shard, in place, as torch.optim.AdamW (single-tensor) computes it:

      g = grad * grad_scale                       in float32 (grad: low precision)
      master[:n_decay] *= decay                   decay = 1 - lr * weight_decay, matrices only
      m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2
      master -= step_size * m / (sqrt(v) / bias2_sqrt + eps)     step_size = lr / (1 - beta1^t)
      param = master                              rounded to the parameters' precision

    step = (decay, step_size, bias2_sqrt), a float32 tensor: numbers that change every step enter
    as tensors (torch.compile would specialize on Python floats and recompile each step).
    Compiled, this is two kernels reading 2 + 12 (+ 4 for the decay) bytes and writing 12 + 2
    (+ 4) per element with bf16 parameters and gradients."""
    decay, step_size, bias2_sqrt = step[0], step[1], step[2]
    g = grad.to(master.dtype) * grad_scale
    master[:n_decay].mul_(decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
    master.add_(exp_avg * -step_size / denom)  # addcdiv_(exp_avg, denom, value=-step_size), traceable
    param.copy_(master)


_compiled_update = None


def compiled_adamw_update():
    """adamw_update_ under torch.compile, built once: dynamic shapes, so units of every size share
    a few kernels (not fullgraph: a variant past dynamo's recompile limit runs eagerly, not fails)."""
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(adamw_update_, dynamic=True)
    return _compiled_update


# --------------------------------------------------------------------------- the optimizer
class ZeroAdamW:
    """AdamW (torch.optim.AdamW's math: decoupled weight decay on matrices only, bias
    corrections, eps outside the square root) on this rank's float32 shard of every unit."""

    def __init__(self, model, cfg, mesh, dtype):
        self.stage, self.mesh = cfg.zero, mesh
        self.group = mesh.dp_group if self.stage else None  # the sharding group (zero=0: no sharding)
        self.betas, self.eps, self.weight_decay = (cfg.beta1, cfg.beta2), 1e-8, cfg.weight_decay
        self.param_groups = [{"lr": cfg.learning_rate}]  # train.py sets the learning rate here
        self.step_count = 0
        self.units = make_units(model, mesh, dtype, cfg.zero)
        self.shard_offsets = [0]
        for u in self.units:
            self.shard_offsets.append(self.shard_offsets[-1] + u.S)
        device = self.units[0].full.device
        self.state_device = torch.device("cpu") if getattr(cfg, "zero_offload", False) else device  # ZeRO-Offload
        # this rank's float32 state: master weights, exp_avg, exp_avg_sq, each (sum of S,)
        self.master = torch.cat([u.master_init for u in self.units]).to(self.state_device)
        for u in self.units:
            del u.master_init
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.master), torch.zeros_like(self.master)
        self.norm_ranges = self._unit_ranges(lambda p: parallel.counted_in_norm(p, mesh))
        self.update = compiled_adamw_update() if self.state_device.type == "cuda" else adamw_update_
        self.grad_shards = None  # stages 2-3: this rank's gradient shard of every unit, (sum of S,)
        if self.stage >= 2:
            self.grad_shards = torch.zeros(self.shard_offsets[-1], dtype=dtype, device=device)
        model.grad_sync = GradShards(self.units, self.stage, mesh.dp_group, self._views(self.grad_shards))
        if self.stage == 3:
            install_gather_hooks(model, self.units)

    def _views(self, flat):
        return [None if flat is None else flat[a:b] for a, b in zip(self.shard_offsets, self.shard_offsets[1:])]

    def _grad_views(self):
        """This rank's gradient shard of every unit (mean over dp, low precision), one view per unit."""
        if self.stage <= 1:
            return [u.shard(u.grad) for u in self.units]
        return self._views(self.grad_shards)

    def _unit_ranges(self, keep):
        """[(unit index, a, b)] in the unit's shard coordinates covering the parameters with keep(p), merged."""
        out = []
        for i, u in enumerate(self.units):
            for a, b in u.ranges(keep):
                if out and out[-1][0] == i and out[-1][2] == a:
                    out[-1] = (i, out[-1][1], b)
                else:
                    out.append((i, a, b))
        return out

    def grad_norm(self):
        """Global L2 norm: squares summed over this shard, then over dp, then over tp/pp."""
        grads = self._grad_views()
        sq = parallel.sum_of_squares([grads[i][a:b] for i, a, b in self.norm_ranges], self.units[0].full.device)
        parallel.all_reduce(sq, self.group)
        return parallel.all_reduce(sq, self.mesh.mp_group).sqrt()

    @torch.no_grad()
    def step(self, grad_scale=1.0):
        """One AdamW step on the shard; grad_scale (clip coefficient / loss scale, a float or a
        0-dim tensor) multiplies the gradient in float32. One fused pass per unit
        (adamw_update_) writes the master weights, moments and low-precision parameter shard.
        Then the new parameters reach every rank (stages 1-2; zero=0 and dp = 1 hold them all)."""
        lr, (beta1, beta2) = self.param_groups[0]["lr"], self.betas
        self.step_count += 1
        bias1, bias2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
        step = torch.tensor([1 - lr * self.weight_decay, lr / bias1, bias2 ** 0.5])  # (decay, step size, sqrt(bias2))
        step = step.to(self.state_device, non_blocking=True)  # 12 bytes, queued: no host sync
        offload = self.state_device != self.units[0].full.device
        if offload and torch.is_tensor(grad_scale):
            grad_scale = grad_scale.to(self.state_device)
        for u, g, w, m, v in zip(self.units, self._grad_views(), *map(self._views, (self.master, self.exp_avg,
                                                                                    self.exp_avg_sq))):
            if offload:  # ZeRO-Offload: the low-precision gradient goes to the CPU, the parameters come back
                g = g.to(self.state_device)
            self.update(u.param_shard, g, w, m, v, grad_scale, u.n_decay_shard, step, beta1, beta2, self.eps)
        for u in self.units:
            u.free()  # stage 3: a copy still gathered (normally none is) would now be stale
        if self.stage < 3 and _size(self.group) > 1:  # stage 3 gathers on demand; dp = 1: param_shard is `full`
            handles = [all_gather_flat(u.full, u.param_shard.clone(), self.group, async_op=True) for u in self.units]
            for h in handles:
                if h is not None:
                    h.wait()

    def zero_grad(self, set_to_none=True):
        """Stages 0-1: release the flat gradient buffers (set_to_none) or zero them in place.
        Stages 2-3: drop p.grad (their gradient shards are zeroed and reused)."""
        for u in self.units:
            if self.stage <= 1 and set_to_none:
                u.release_grad()
            elif self.stage <= 1:
                u.collect_grad()  # allocated again if released
                u.grad.zero_()
            else:
                for p in u.params:
                    p.grad = None
        if self.grad_shards is not None:
            self.grad_shards.zero_()

    # ----------------------------------------------------------------------- checkpoints
    def _by_name(self, flat):
        """This rank's shards (sum of S,) -> {name: full tp/pp-local tensor} on dp rank 0 ({} elsewhere)."""
        out = {}
        for u, shard in zip(self.units, self._views(flat)):
            full = gather_to_first(shard.to(u.full.device), self.group)
            if full is not None:
                for n, o, shape in zip(u.names, u.offsets, u.shapes):
                    out[n] = full[o:o + shape.numel()].view(shape).cpu()
        return out

    def layout(self):
        return {"dp": self.mesh.dp, "tp": self.mesh.tp, "pp": self.mesh.pp,
                "units": [list(zip(u.names, u.offsets, [tuple(s) for s in u.shapes])) for u in self.units]}

    def checkpoint_files(self, model, mesh):
        """(full float32 parameters by name on rank 0, {file: object} this rank writes).
        Every rank writes optim_rank<r>.pt (its shard, with the layout it needs); rank 0 also
        writes optimizer.pt in the zero=0 format. Only dp rank 0 takes part in the per-name
        gathers across tp/pp (the other replicas would only repeat them)."""
        master, m, v = self._by_name(self.master), self._by_name(self.exp_avg), self._by_name(self.exp_avg_sq)
        params, files = {}, {}
        if mesh.dp_rank == 0:
            frozen = {n: p.detach().float() for n, p in model.named_parameters() if not p.requires_grad}
            params = parallel.gather_full({**frozen, **master}, model, mesh)
            opt = {"step": float(self.step_count), "exp_avg": parallel.gather_full(m, model, mesh),
                   "exp_avg_sq": parallel.gather_full(v, model, mesh)}
            if mesh.is_main:
                files["optimizer.pt"] = opt
        files[f"optim_rank{mesh.rank}.pt"] = {
            "layout": self.layout(), "ranks": (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank), "zero": self.stage,
            "step": float(self.step_count), "master": self.master.cpu(), "exp_avg": self.exp_avg.cpu(),
            "exp_avg_sq": self.exp_avg_sq.cpu()}
        return params, files

    @torch.no_grad()
    def load_checkpoint(self, path, local_params, model, mesh):
        """Parameters from model.pt (local_params: this rank's tp/pp slices by name); moments from
        this rank's shard file if it was written by the same layout, else from optimizer.pt."""
        for u, shard in zip(self.units, self._views(self.master)):
            flat = u.flatten(local_params)
            shard.copy_(u.shard(flat))
            u.param_shard.copy_(shard)
            u.free()  # stage 3: drop a stale gathered copy
            if self.stage < 3:
                u.full.copy_(flat)
        for n, p in model.named_parameters():
            if not p.requires_grad:  # in no unit
                p.copy_(local_params[n])
        source = self._load_moments(path, model, mesh)
        if mesh.is_main:
            where = {"shard": "optim_rank<r>.pt, same layout", "full": "optimizer.pt, re-sharded"}.get(source, "")
            print(f"ZeRO resume: parameters from model.pt, AdamW moments from {source} ({where})")
        return source

    def _load_moments(self, path, model, mesh):
        import checkpoint
        mine = os.path.join(path, f"optim_rank{mesh.rank}.pt")
        blob = checkpoint.load(path, f"optim_rank{mesh.rank}.pt") if os.path.exists(mine) else None
        if blob is not None and blob["layout"] == self.layout() \
                and blob["ranks"] == (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank):
            self.exp_avg.copy_(blob["exp_avg"])
            self.exp_avg_sq.copy_(blob["exp_avg_sq"])
            self.step_count = int(blob["step"])
            return "shard"
        if not os.path.exists(os.path.join(path, "optimizer.pt")):
            return "nowhere: no optimizer.pt, AdamW starts fresh"
        opt = checkpoint.load(path, "optimizer.pt")
        for key, dest in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            local = parallel.shard_full(opt[key], model, mesh)
            for u, shard in zip(self.units, self._views(dest)):
                shard.copy_(u.shard(u.flatten(local)))
        self.step_count = int(opt["step"] or 0)
        return "full"

    # ----------------------------------------------------------------------- memory
    def memory(self, model):
        """Bytes this rank holds, measured from the tensors' storages (views of one buffer count once)."""
        params = [p for p in model.parameters()] + [u.param_shard for u in self.units]
        if self.stage <= 1:  # the flat buffers at their allocated size: they live from finish() to zero_grad()
            grad_bytes = sum(u.padded * u.grad.element_size() for u in self.units)
        else:
            grad_bytes = storage_bytes([p.grad for p in model.parameters()] + [self.grad_shards])
        return {"params": storage_bytes(params), "grads": grad_bytes,
                "optimizer": storage_bytes([self.master, self.exp_avg, self.exp_avg_sq])}


def storage_bytes(tensors):
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[(s.data_ptr(), s.nbytes())] = s.nbytes()  # a freed (stage 3) storage has 0 bytes
    return sum(storages.values())


def formula(stage, phi, n, k):
    """(params, grads, optimizer) bytes per rank by the book's formulas, k bytes per parameter
    and gradient element (2 with master weights)."""
    return {0: (k * phi, k * phi, 12 * phi),
            1: (k * phi, k * phi, 12 * phi / n),
            2: (k * phi, k * phi / n, 12 * phi / n),
            3: (k * phi / n, k * phi / n, 12 * phi / n)}[stage]


def memory_report(stage, measured, phi, n, k):
    """One line per term: measured bytes next to the formula."""
    names = {0: "2Phi+2Phi+12Phi", 1: "4Phi+12Phi/N", 2: "2Phi+14Phi/N", 3: "16Phi/N"}
    want = formula(stage, phi, n, k)
    parts = [f"{key} {measured[key] / 2 ** 20:.2f} MiB (formula {w / 2 ** 20:.2f})"
             for key, w in zip(("params", "grads", "optimizer"), want)]
    total = sum(measured.values())
    return (f"zero={stage} N={n} Phi={phi:,}: " + ", ".join(parts)
            + f" | total {total / 2 ** 20:.2f} MiB, book {names[stage]} = {sum(want) / 2 ** 20:.2f} MiB")


# --------------------------------------------------------------------------- entry point from train.py
def build_optimizer(model, cfg, mesh, dtype=torch.float32):
    """Called by train.build_optimizer when cfg.zero or cfg.master_weights: converts the model's
    parameters to `dtype` (low precision with master weights), builds ZeroAdamW, which sets model.grad_sync."""
    if cfg.compile and cfg.zero == 3:
        raise ValueError("zero=3 with compile=True: the gather/free hooks are not traceable; use --compile=False")
    parallel.check_replicas_identical(model, mesh.dp_group)
    phi = sum(p.numel() for p in model.parameters())
    optimizer = ZeroAdamW(model, cfg, mesh, dtype)
    if mesh.is_main:
        k = torch.empty((), dtype=dtype).element_size()
        where = " (optimizer state offloaded to CPU)" if optimizer.state_device.type == "cpu" \
            and optimizer.units[0].full.device.type != "cpu" else ""
        print("memory per rank: " + memory_report(cfg.zero, optimizer.memory(model), phi, mesh.dp, k) + where)
    return optimizer
