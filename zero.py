"""ZeRO: a sharded mixed-precision AdamW over the data-parallel group (book 4.2.4, fig. 4.16-4.17).

  torchrun --nproc_per_node=8 train.py configs/llama_1b.py --zero=1|2|3 [--zero_offload=True]
  python zero.py --report [--dp=1,2,4] [--dim=256 ...]      measured bytes next to the book's formulas

Mixed precision as figure 4.16: the model computes with low-precision (bf16/fp16) parameters
and gradients (k = 2 bytes each; 4 in fp32 runs), while AdamW keeps float32 master weights
and both moments: 12 bytes per parameter. With Phi parameters and N data-parallel ranks,
bytes per rank are (book, with k = 2):

  zero=0  plain data parallelism         k*Phi + k*Phi + 12*Phi        = 2Phi + 2Phi + 12Phi
  zero=1  P_os:     optimizer sharded    k*Phi + k*Phi + 12*Phi/N      = 4Phi + 12Phi/N
  zero=2  P_os+g:   gradients too        k*Phi + (k + 12)*Phi/N        = 2Phi + 14Phi/N
  zero=3  P_os+g+p: parameters too       (2k + 12)*Phi/N               = 16Phi/N

Layout: the parameters are grouped into units (one per parameter outside the layers:
embedding, final norm, output head; then one per transformer layer). Each unit is one flat
buffer padded to a multiple of N*ALIGN, and dp rank r owns the contiguous slice [r*S, (r+1)*S)
of every unit. The rank's float32 master weights and moments are its slices of all units,
concatenated, and the AdamW update (one fused pass per unit) runs on that shard only:

  stage 1: backward fills full gradients; finish() reduce-scatters each unit (every rank
           gets the mean gradient of its slice), step() updates the slice, then the updated
           parameters are all-gathered.
  stage 2: as soon as backward has produced a unit's gradients, a hook reduce-scatters them
           asynchronously (overlapping the rest of backward) and drops the full gradients.
  stage 3: only the slice of the parameters is kept too; a unit is all-gathered right before
           its forward and again before its backward (the next unit's gather is started
           while the current one computes) and freed after use. Hooks on the modules, not on
           model.forward, so a pipeline schedule's chunks and interleaved micro-batches work.

With tensor/pipeline parallelism each rank shards its own (tp/pp-local) parameters within its
dp group. A pipeline's tied embedding (first and last stage) is sharded alike on both stages,
so its two gradient contributions are summed shard by shard after the reduce-scatter.
Checkpoints: per-name full tensors in the zero=0 format (model.pt, optimizer.pt: any layout,
zero stage or dp size resumes) plus each rank's shard file optim_rank<r>.pt, loaded directly
when the layout is unchanged.
"""
import os
import sys

import torch
import torch.distributed as dist

import parallel


# --------------------------------------------------------------------------- collectives (one process: copies)
from parallel import _size, all_gather_flat as all_gather, reduce_scatter_flat as reduce_scatter  # noqa: E402


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
    full[r*S:(r+1)*S]. Matrices come first, so weight decay is one range of the flat buffer."""

    def __init__(self, named_params, mesh, dtype, stage):
        named_params = sorted(named_params, key=lambda np_: np_[1].dim() < 2)  # stable: matrices first
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [p.shape for p in self.params]
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        self.numel, self.n_decay = offset, sum(p.numel() for p in self.params if p.dim() >= 2)
        # shard size ceil(numel / N), rounded up to ALIGN elements: every shard, and every slice of
        # the optimizer state, starts aligned, so one compiled update kernel serves all units
        self.S = ALIGN * -(-self.numel // (ALIGN * mesh.dp))
        self.padded, self.start = self.S * mesh.dp, self.S * mesh.dp_rank
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
        self.grad = None  # stage 1: the full flat gradient (N*S,) from finish() to zero_grad(), p.grad views of it
        if stage == 1:
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
            self.handle = all_gather(self.full, self.param_shard, self.group, async_op=async_op)
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

    # stage 1: the flat gradient lives from the end of the backward to zero_grad(), not through
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
    last stage) then shard alike over dp, and their gradient shards can be summed."""
    in_layers = {id(p) for layer in model.layers.values() for p in layer.parameters()}
    root = [(n, p) for n, p in model.named_parameters() if id(p) not in in_layers]
    units = [Unit([named], mesh, dtype, stage) for named in root]
    for key, layer in model.layers.items():
        units.append(Unit(list(layer.named_parameters(prefix=f"layers.{key}")), mesh, dtype, stage))
    return units


# --------------------------------------------------------------------------- gradients: model.grad_sync
class GradShards:
    """model.grad_sync for ZeRO, with GradBuckets' interface: `sync` (False in the gradient-
    accumulation micro-steps) and finish() after the last backward.

    stage 1: nothing during backward; finish() reduce-scatters each unit's flat gradient.
    stages 2-3: a hook counts a unit's gradients; when all are there (in a sync micro-step)
    the unit's gradient is reduce-scattered asynchronously, added to this rank's shard, and
    the full gradients are dropped. In the no-sync micro-steps gradients accumulate locally
    at full size, as DeepSpeed does: exact, but the full gradients (k*Phi bytes) live through
    the accumulation. Reducing every micro-step instead would keep only k*Phi/N but cost one
    reduce-scatter per micro-batch. Stage 3 also frees a unit's parameters after its backward."""

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
            handle = reduce_scatter(out, flat, self.group, async_op=True, mean=True)
            self.pending.append((handle, out, unit.grad_shard, flat))
            for p in unit.params:
                p.grad = None
        unit.free()  # stage 3: the unit's backward is over

    def finish(self):
        if self.stage == 1:
            for unit in self.units:
                unit.collect_grad()
                if self.dp == 1:
                    continue  # one rank: its gradient is already the mean and its own shard (no divide, no copies)
                out = torch.empty_like(unit.shard(unit.grad))
                self.pending.append((reduce_scatter(out, unit.grad, self.group, async_op=True, mean=True),
                                     out, unit.shard(unit.grad), None))
        elif any(u.ready for u in self.units):
            raise RuntimeError("ZeRO gradient sync incomplete: some parameters got no gradient in the last "
                               "micro-step (unused parameters are not supported)")
        for handle, out, dest, _ in self.pending:
            if handle is not None:
                handle.wait()
            if self.stage == 1:
                dest.copy_(out)
            else:
                dest.add_(out)  # stages 2-3 accumulate: correct even if every micro-step syncs
        self.pending = []

    def reduced_grad(self, p):
        """After finish(): this rank's shard of the dp-mean gradient of a root parameter p (alone in
        its unit), where the optimizer reads it. parallel.pipeline_step sums a tied embedding's
        two copies here: both stages shard the matrix alike over dp, and summing the shards
        equals reduce-scattering the summed full gradients (sum and reduce-scatter commute),
        which stages 2-3 could not do, having dropped the full gradient."""
        (unit,) = [u for u in self.units if len(u.params) == 1 and u.params[0] is p]
        return unit.shard(unit.grad) if self.stage == 1 else unit.grad_shard


# --------------------------------------------------------------------------- stage 3: gather hooks
def forward_runs(model):
    """The modules holding parameters, in the order a forward calls them one after another:
    the whole model (Transformer.forward), or under pipeline parallelism each of this stage's
    chunks (parallel.chunk_forward): the embedding (first chunk), layers, final norm and
    output head (last chunk). Must follow those two forwards."""
    pipe = getattr(model, "pipeline", None)
    chunks = pipe.layers.items() if pipe is not None else [(0, [int(k) for k in model.layers])]
    last = pipe.n_chunks - 1 if pipe is not None else 0
    runs = []
    for g, ids in chunks:
        run = [model.tok_embeddings] if g == 0 else []
        run += [model.layers[str(i)] for i in ids]
        runs.append(run + ([model.norm, model.output] if g == last else []))
    return runs


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

    def module_unit(module):
        (unit,) = {unit_of[id(p)] for p in module.parameters()}  # a layer, or a one-parameter root module
        return unit

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
        self.stage, self.mesh, self.group = cfg.zero, mesh, mesh.dp_group
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
        compile_step = self.state_device.type == "cuda" and os.environ.get("ZERO_COMPILE_STEP", "1") != "0"
        self.update = compiled_adamw_update() if compile_step else adamw_update_
        self.grad_shards = None  # stages 2-3: this rank's gradient shard of every unit, (sum of S,)
        if self.stage >= 2:
            self.grad_shards = torch.zeros(self.shard_offsets[-1], dtype=dtype, device=device)
        model.grad_sync = GradShards(self.units, self.stage, self.group, self._views(self.grad_shards))
        if self.stage == 3:
            install_gather_hooks(model, self.units)

    def _views(self, flat):
        return [None if flat is None else flat[a:b] for a, b in zip(self.shard_offsets, self.shard_offsets[1:])]

    def _grad_views(self):
        """This rank's gradient shard of every unit (mean over dp, low precision), one view per unit."""
        if self.stage == 1:
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
        Then the new parameters reach every rank (stages 1-2; nothing to gather when dp = 1)."""
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
            handles = [all_gather(u.full, u.param_shard.clone(), self.group, async_op=True) for u in self.units]
            for h in handles:
                if h is not None:
                    h.wait()

    def zero_grad(self, set_to_none=True):
        """Stage 1: release the flat gradient buffers (set_to_none) or zero them in place.
        Stages 2-3: drop p.grad (their gradient shards are zeroed and reused)."""
        for u in self.units:
            if self.stage == 1 and set_to_none:
                u.release_grad()
            elif self.stage == 1:
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
            params = parallel.gather_full(master, model, mesh)
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
        if self.stage == 1:  # the flat buffers at their allocated size: they live from finish() to zero_grad()
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


def torch_adamw_memory(model, optimizer):
    """The same measurement for train.py's zero=0 path (torch.optim.AdamW)."""
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    return {"params": storage_bytes(list(model.parameters())),
            "grads": storage_bytes([p.grad for p in model.parameters()]), "optimizer": storage_bytes(state)}


def formula(stage, phi, n, k):
    """(params, grads, optimizer) bytes per rank by the book's formulas, k bytes per
    low-precision element. zero=0 is train.py's path: float32 parameters under autocast and
    torch's AdamW (no separate master copy): 4Phi + 4Phi + 8Phi, the same 16Phi as 2Phi+2Phi+12Phi."""
    return {0: (4 * phi, 4 * phi, 8 * phi),
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
    """Called by train.build_optimizer when cfg.zero: converts the model's parameters to the
    low-precision `dtype`, builds the sharded AdamW and sets model.grad_sync."""
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


# --------------------------------------------------------------------------- python zero.py --report
def _report_worker(rank, world, port, args, results):
    """For each dp size (the first dp ranks of the job) and stage: build the model, run one
    training step and measure the bytes rank 0 holds."""
    from types import SimpleNamespace

    import train
    from model import ModelConfig, Transformer
    if world > 1:
        torch.set_num_threads(1)  # world processes share the CPU cores
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = {dp: dist.new_group(list(range(dp))) if dp > 1 else None for dp in args["dps"]}  # all ranks create all
    dtype = getattr(torch, args["dtype"])
    mcfg = ModelConfig(dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
                       vocab_size=args["vocab_size"], max_seq_len=16, multiple_of=16)
    cfg = SimpleNamespace(learning_rate=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1)
    out = {}
    for dp in args["dps"]:
        if rank >= dp:
            continue
        mesh = parallel.Mesh(world=dp, rank=rank, dp=dp, dp_rank=rank, dp_group=groups[dp])
        for stage in args["stages"]:
            torch.manual_seed(0)
            model = Transformer(mcfg)
            x = torch.randint(0, mcfg.vocab_size, (2, 16))
            if stage == 0:  # train.py's zero=0 path: float32 parameters, torch's AdamW
                opt = torch.optim.AdamW(train.param_groups(model, 0.1), lr=1e-3)
                model(x, x)[1].backward()
                opt.step()
                measured = torch_adamw_memory(model, opt)
            else:
                cfg.zero = stage
                opt = ZeroAdamW(model, cfg, mesh, dtype)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = model(x, x)[1]
                loss.backward()
                model.grad_sync.finish()
                opt.step(grad_scale=1.0 / opt.grad_norm())
                measured = opt.memory(model)
            out[(dp, stage)] = (measured, model.num_params())
    if rank == 0:
        results.update(out)
    if world > 1:
        dist.destroy_process_group()


def measure(dps=(1, 2, 4), stages=(0, 1, 2, 3), dtype="bfloat16", dim=64, n_layers=2, n_heads=4, vocab_size=128):
    """{(dp, stage): (measured bytes of rank 0, Phi)} from one CPU/gloo job of max(dps) ranks."""
    import socket

    import torch.multiprocessing as mp
    args = dict(dps=list(dps), stages=list(stages), dtype=dtype, dim=dim, n_layers=n_layers, n_heads=n_heads,
                vocab_size=vocab_size)
    world = max(dps)
    if world == 1:
        results = {}
        _report_worker(0, 1, 0, args, results)
        return results
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_report_worker, args=(world, port, args, results), nprocs=world)
    return dict(results)


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if "--report" not in argv:
        print(__doc__)
        return
    dps = [int(d) for d in opts.get("dp", "1,2,4").split(",")]
    dtype = opts.get("dtype", "bfloat16")
    kw = {k: int(opts[k]) for k in ("dim", "n_layers", "n_heads", "vocab_size") if k in opts}
    kw.setdefault("dim", 256)
    kw.setdefault("n_layers", 4)
    kw.setdefault("vocab_size", 1024)
    k = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    print(f"bytes per rank, {dtype} compute (k = {k}), measured from the tensors after one step on CPU/gloo")
    for (dp, stage), (measured, phi) in sorted(measure(dps, dtype=dtype, **kw).items()):
        print(memory_report(stage, measured, phi, dp, k))


if __name__ == "__main__":
    main(sys.argv[1:])
