"""Checkpoints that survive crashes, and loading a model for sample.py / eval_ppl.py.

A checkpoint is a folder out_dir/ckpt_<step>/ of torch.save files plus manifest.json
(each file's size and sha256). It is written as a hidden temporary folder, every file
fsynced, then renamed into place: rename is atomic, so a kill -9 at any moment leaves
either the old set of checkpoints or the new one, never a half-written newest one. A checkpoint
being deleted (the oldest, past keep_checkpoints) is renamed out of the listing first, so none
is ever listed half-deleted either.

Files (save_training / load_training, for train.py): model.pt (the full, single-process
state dict and the model config: any layout loads it), optimizer.pt (AdamW's moments keyed
by parameter name; ZeRO adds each rank's shard as optim_rank<r>.pt), train_state.pt (step,
config, RNG, loss scaler; the data position is the step itself, since the batch of step t
depends only on seed and t). model.pt also records the tokenizer's identity (prepare.Tokenizer:
name and sha); an hf tokenizer's files (tokenizer.json, ...) are copied beside it, so sample.py,
eval_ppl.py and export need nothing but the checkpoint.

Safe to load: every file holds only tensors and plain Python values (dicts, lists, tuples, str,
numbers, None: configs as dataclasses.asdict, RNG states as tensors and ints), and load() reads it
with torch.load(weights_only=True), so a checkpoint someone shares cannot run code when sample.py,
eval_ppl.py or a resume opens it; a file that needs any other Python object is refused (see load).

Asynchronous (checkpoint_async=True, AsyncWriter): the state is copied to host memory and written by
a background thread while training goes on, with the same temporary folder, fsync, rename and
manifest; the agreement that every rank wrote runs on the main thread at the next save or at the end.

Export: `python checkpoint.py export out/x --to=DIR` writes any checkpoint (or out_dir's newest)
as a Hugging Face directory that transformers loads unchanged (see export).
"""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import torch

import parallel
import zero

PREFIX = "ckpt_"


class CheckpointError(RuntimeError):
    pass


# --------------------------------------------------------------------------- writing
def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(out_dir, step):
    """Where every rank writes its files for `step`; a name all ranks agree on."""
    return os.path.join(out_dir, f".tmp_{PREFIX}{step:08d}")


def write_files(tmp, objects):
    """torch.save each {name: object} into tmp and fsync it (called on every rank that has files).
    Test hook: CHECKPOINT_TEST_WRITE_DELAY_S=<seconds> sleeps after each file, so a test can kill
    the process in the middle of a write (tests/test_checkpoints.py); unset, it costs nothing."""
    os.makedirs(tmp, exist_ok=True)
    for name, obj in objects.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        time.sleep(float(os.environ.get("CHECKPOINT_TEST_WRITE_DELAY_S", 0)))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def commit(out_dir, step, keep_last=3):
    """Rank 0, after every rank wrote into temp_dir(out_dir, step): manifest, rename, prune."""
    tmp, final = temp_dir(out_dir, step), os.path.join(out_dir, f"{PREFIX}{step:08d}")
    files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": _sha256(os.path.join(tmp, n))}
             for n in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    replaced = _retire(final) if os.path.exists(final) else None  # same step saved again (e.g. preempted)
    os.rename(tmp, final)
    _fsync_dir(out_dir)
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(_retire(old), ignore_errors=True)
    return final


def _retire(path):
    """Rename a checkpoint out of the listing before deleting it (rmtree removes file after file: a
    kill -9 in the middle would otherwise leave a listed checkpoint with files missing). The new name
    is a temporary folder's, which clean_temp handles."""
    retired = os.path.join(os.path.dirname(path), f".tmp_{os.path.basename(path)}.retired")
    if os.path.exists(retired):  # left by an earlier crash
        shutil.rmtree(retired)
    os.rename(path, retired)
    return retired


def clean_temp(out_dir):
    """Remove temporary folders left by saves and deletions that a crash interrupted (call on rank 0
    at start). A retired checkpoint whose step has no checkpoint (a kill between commit's two renames)
    is renamed back if it is still whole."""
    for n in os.listdir(out_dir):
        if not n.startswith(".tmp_" + PREFIX):
            continue
        path = os.path.join(out_dir, n)
        if n.endswith(".retired"):
            final = os.path.join(out_dir, n[len(".tmp_"):-len(".retired")])
            if not os.path.exists(final) and _whole(path):
                os.rename(path, final)
                continue
        shutil.rmtree(path, ignore_errors=True)


def _whole(path):
    """Every file of the manifest there, at its size (rmtree removes whole files: a missing one shows
    that a deletion began)."""
    try:
        verify(path, check_hash=False)
        return True
    except CheckpointError:
        return False


def discard(out_dir, step):
    shutil.rmtree(temp_dir(out_dir, step), ignore_errors=True)


# --------------------------------------------------------------------------- reading
def list_checkpoints(out_dir):
    """Complete checkpoints (those with a manifest), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if n.startswith(PREFIX))
    return [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n, "manifest.json"))]


def verify(path, check_hash=True):
    """Raise CheckpointError naming the file if anything listed in the manifest is missing or changed."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({e})")
    for name, rec in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = os.path.getsize(file)
        if size != rec["bytes"]:
            raise CheckpointError(f"checkpoint file {file} has {size} bytes, the manifest says {rec['bytes']} "
                                  "(truncated or overwritten)")
        if check_hash and _sha256(file) != rec["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its sha256 in manifest.json (corrupt)")
    return manifest


def latest(out_dir, fallback=False):
    """Newest checkpoint that verifies. A corrupt newest one is an error unless fallback=True,
    in which case older ones are tried in turn. Returns None when out_dir has none."""
    errors = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}\nfix: pass --resume_fallback=True to resume from the previous "
                                      "checkpoint instead, or delete the broken folder")
            errors.append(str(e))
            print(f"warning: skipping {e}")
    if errors:
        raise CheckpointError("no intact checkpoint in " + out_dir + ":\n" + "\n".join(errors))
    return None


# Checkpoints written before RNG states were stored as tensors hold numpy's MT19937 state, a
# uint32 array: these globals rebuild exactly that (an array of an allowed dtype; its elements go
# through the same restricted unpickler), so older checkpoints still resume without running code.
_NUMPY_RNG_GLOBALS = [(np._core.multiarray._reconstruct, name + ".multiarray._reconstruct")
                      for name in ("numpy._core", "numpy.core")] + [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load(path, name, mmap=False):
    """torch.load(weights_only=True) of one checkpoint file: tensors and plain values only. A file
    that needs any other Python object (a pickled payload could run code) is refused, unread."""
    file = os.path.join(path, name)
    try:
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a pickle error names nothing useful; keep the message to one line
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"refusing to load checkpoint file {file}: it holds a pickled Python object ({found.group(1)}), "
                "not only tensors and plain values, and unpickling it could run code. Checkpoints of this "
                "repository never do; if you trust the file, re-save it once at your own risk with "
                "torch.load(..., weights_only=False) and only tensors/dicts/lists/numbers/str in it")
        raise CheckpointError(f"cannot read checkpoint file {file}: {str(e).strip().splitlines()[0]}")


def resolve(spec):
    """The checkpoint folder of a checkpoint folder or an out_dir (its newest checkpoint)."""
    path = spec if os.path.exists(os.path.join(spec, "manifest.json")) else latest(spec)
    if path is None:
        raise CheckpointError(f"no checkpoint in {spec}: train first (python train.py ...) or pass hf:<dir>")
    return path


def tokenizer_record(spec):
    """The tokenizer a model belongs to, {"name", "sha", "spec"} (spec: what prepare.get_tokenizer
    loads), or None when nothing says (an hf:<dir> without tokenizer.json). A checkpoint records
    the identity in model.pt (a bare name before identities existed) and, for hf tokenizers,
    holds the tokenizer files themselves."""
    if spec.startswith("hf:"):
        if not os.path.exists(os.path.join(spec[3:], "tokenizer.json")):
            return None
        from prepare import get_tokenizer
        return {**get_tokenizer(spec).identity(), "spec": spec}
    path = resolve(spec)
    blob = load(path, "model.pt", mmap=True)  # mmap: only the small "tokenizer" entry is read, not the weights
    return _record(path, blob.get("tokenizer"))


def _record(path, rec):
    if rec is None:
        return None
    rec = dict(rec) if isinstance(rec, dict) else {"name": rec, "sha": None}
    has_files = os.path.exists(os.path.join(path, "tokenizer.json"))
    return {**rec, "spec": "hf:" + path if has_files else rec["name"]}


def load_model(spec, device="cpu", **config_overrides):
    """A model from 'hf:<dir>', a checkpoint folder, or an out_dir (its newest checkpoint).
    Returns (model, tokenizer_record(spec))."""
    from model import Transformer, config_from_dict
    if spec.startswith("hf:"):
        return Transformer.from_hf(spec[3:], **config_overrides).to(device), tokenizer_record(spec)
    path = resolve(spec)
    blob = load(path, "model.pt")
    model = Transformer(config_from_dict({**blob["model_config"], **config_overrides}))
    state = dict(blob["state_dict"])
    if model.config.tie_embeddings:  # saved once, under its first name
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    model.load_state_dict(state)
    return model.to(device), _record(path, blob.get("tokenizer"))


# --------------------------------------------------------------------------- a training run's state (train.py)
def optimizer_state(model, optimizer):
    """AdamW state keyed by parameter name, so any layout can load it."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {"step": None, "exp_avg": {}, "exp_avg_sq": {}}
    for p, s in optimizer.state.items():
        state["step"] = float(s["step"])
        state["exp_avg"][names[id(p)]] = s["exp_avg"]
        state["exp_avg_sq"][names[id(p)]] = s["exp_avg_sq"]
    return state


def load_optimizer_state(model, optimizer, state):
    for n, p in model.named_parameters():
        if n in state["exp_avg"]:
            optimizer.state[p] = {"step": torch.tensor(state["step"]),
                                  "exp_avg": state["exp_avg"][n].to(p.device, p.dtype),
                                  "exp_avg_sq": state["exp_avg_sq"][n].to(p.device, p.dtype)}


def save_training(cfg, mesh, model, optimizer, scaler, step, tokenizer, writer=None):
    """Every rank contributes (gathers are collective); rank 0 writes the single-process files.
    With an AsyncWriter the files are written in the background (see AsyncWriter). Returns the
    seconds the training loop was blocked (the stall)."""
    t0 = time.time()
    tmp = temp_dir(cfg.out_dir, step)
    if isinstance(optimizer, zero.ZeroAdamW):  # full tensors gathered from its shards (same files) + optim_rank<r>.pt
        params, files = optimizer.checkpoint_files(model, mesh)
    else:
        params = parallel.gather_full(dict(model.named_parameters()), model, mesh)
        opt = optimizer_state(model, optimizer)
        opt["exp_avg"] = parallel.gather_full(opt["exp_avg"], model, mesh)
        opt["exp_avg_sq"] = parallel.gather_full(opt["exp_avg_sq"], model, mesh)
        files = {"optimizer.pt": opt} if mesh.is_main else {}
    if mesh.is_main:  # tokenizer: a prepare.Tokenizer, or an identity {"name", "sha"} when not loadable
        files["model.pt"] = {"model_config": dataclasses.asdict(model.config), "state_dict": params,
                             "tokenizer": tokenizer.identity() if hasattr(tokenizer, "identity") else tokenizer}
        files["train_state.pt"] = {"step": step, "config": dataclasses.asdict(cfg), "scaler": scaler.state_dict(),
                                   "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()}}
    device = next(model.parameters()).device
    if writer is not None:
        writer.submit(step, tmp, files, tokenizer if mesh.is_main else None, device)
        return time.time() - t0
    ok = _write(tmp, files, tokenizer if mesh.is_main else None, mesh.rank)
    if _agree(cfg, mesh, step, ok, device) and mesh.is_main:
        print(f"saved checkpoint {commit(cfg.out_dir, step, cfg.keep_checkpoints)}")
    return time.time() - t0


def _write(tmp, files, tokenizer, rank):
    """This rank's files into tmp; False (and a message) when the file system refused."""
    try:
        os.makedirs(tmp, exist_ok=True)
        if getattr(tokenizer, "files", None):  # an hf tokenizer: its files travel with the checkpoint
            tokenizer.save(tmp)
        write_files(tmp, files)
        return True
    except OSError as e:
        print(f"rank {rank}: checkpoint write failed: {e}")
        return False


def _agree(cfg, mesh, step, ok, device):
    """Did every rank write its files for `step`? A collective: main thread only. On failure rank 0
    drops the temporary folder and the run stops (checkpoint_errors_fatal) or goes on."""
    flag = torch.full((), float(ok), device=device)  # NCCL reduces device tensors only
    parallel.all_reduce(flag, _world(mesh), op=torch.distributed.ReduceOp.MIN)
    if flag.item():
        return True
    if mesh.is_main:
        discard(cfg.out_dir, step)
    msg = f"checkpoint at step {step} failed; the previous checkpoint is intact"
    if cfg.checkpoint_errors_fatal:  # every rank raises, so none waits for the others
        raise CheckpointError(msg)
    if mesh.is_main:
        print("warning: " + msg + " (training goes on; set checkpoint_errors_fatal=True to stop instead)")
    return False


def _numpy_rng_state():
    """numpy's global RNG state as plain values (its key array as an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}


def _set_numpy_rng_state(state):
    if isinstance(state, dict):  # older checkpoints hold numpy's own tuple
        state = (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)


class AsyncWriter:
    """The one checkpoint write in flight (checkpoint_async=True; one per rank, owned by train.train).
    submit() copies the state to host memory (pinned when CUDA is available, kept and reused by the
    next save, which has the same shapes) and starts a thread that writes and fsyncs this rank's
    files while training goes on. The thread runs no collective: one would race the training's on
    the same process group. So the all-ranks-wrote agreement runs on the main thread at a safe
    point, the next submit() or finish(), after joining the thread (at most one write in flight);
    rank 0 then commits the agreed step (manifest, rename, prune) at the start of the next write's
    thread, or in finish() at the end of the run. A kill -9 at any moment leaves the committed
    checkpoints as they were; the one being written is lost with its temporary folder."""

    def __init__(self, cfg, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.thread, self.step, self.ok, self.device = None, None, True, None  # the write in flight
        self.buffers = {}  # host copies by path in the state, reused from save to save

    def submit(self, step, tmp, files, tokenizer, device):
        agreed = self._settle()
        host = self._to_host(files, ())
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copies into pinned memory are non-blocking
        self.step, self.ok, self.device = step, True, device
        self.thread = threading.Thread(target=self._run, args=(agreed, tmp, host, tokenizer), name="checkpoint")
        self.thread.start()

    def finish(self):
        """Wait for the write in flight, agree on it and commit it (end of the run, SIGTERM included)."""
        agreed = self._settle()
        if agreed is not None and self.mesh.is_main:
            print(f"saved checkpoint {commit(self.cfg.out_dir, agreed, self.cfg.keep_checkpoints)}")

    def _settle(self):
        """Join the previous write and agree on it; its step when every rank wrote it, else None."""
        if self.thread is None:
            return None
        self.thread.join()
        self.thread = None
        return self.step if _agree(self.cfg, self.mesh, self.step, self.ok, self.device) else None

    def _run(self, agreed, tmp, files, tokenizer):
        try:
            if agreed is not None and self.mesh.is_main:
                print(f"saved checkpoint {commit(self.cfg.out_dir, agreed, self.cfg.keep_checkpoints)}")
            self.ok = _write(tmp, files, tokenizer, self.mesh.rank)
        except Exception as e:  # reported by the agreement at the next save, like a failed write
            print(f"rank {self.mesh.rank}: asynchronous checkpoint failed: {e!r}")
            self.ok = False

    def _to_host(self, obj, path):
        if torch.is_tensor(obj):
            buf = self.buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = self.buffers[path] = torch.empty(obj.shape, dtype=obj.dtype,
                                                       pin_memory=torch.cuda.is_available())
            return buf.copy_(obj.detach(), non_blocking=True)
        if isinstance(obj, dict):
            return {k: self._to_host(v, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._to_host(v, path + (i,)) for i, v in enumerate(obj))
        return obj  # plain values: ints, floats, str, None


def _world(mesh):
    return torch.distributed.group.WORLD if mesh.world > 1 else None


def load_training(cfg, mesh, model, optimizer, scaler, path):
    """Restore a run saved by save_training into this (possibly different) layout; returns the step."""
    from model import config_from_dict
    blob = load(path, "model.pt")
    saved = config_from_dict(blob["model_config"])
    mine = model.config
    diff = [f"{k}: checkpoint {getattr(saved, k)!r} vs config {getattr(mine, k)!r}"
            for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_dim", "tie_embeddings",
                      "rope_scaling")
            if getattr(saved, k) != getattr(mine, k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} is from an incompatible model: " + "; ".join(diff))
    local = parallel.shard_full(blob["state_dict"], model, mesh)
    if isinstance(optimizer, zero.ZeroAdamW):  # master weights from model.pt, moments from optim_rank<r>.pt or optimizer.pt
        optimizer.load_checkpoint(path, local, model, mesh)
    else:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(local[n])
        opt = load(path, "optimizer.pt") if os.path.exists(os.path.join(path, "optimizer.pt")) else None
        if opt is not None:
            opt["exp_avg"] = parallel.shard_full(opt["exp_avg"], model, mesh)
            opt["exp_avg_sq"] = parallel.shard_full(opt["exp_avg_sq"], model, mesh)
            load_optimizer_state(model, optimizer, opt)
    state = load(path, "train_state.pt")
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    _set_numpy_rng_state(state["rng"]["numpy"])
    return state["step"]


# --------------------------------------------------------------------------- export (python checkpoint.py export ...)
def export(spec, directory, dtype="float32"):
    """Write the model of `spec` (a checkpoint folder, an out_dir's newest checkpoint, or hf:<dir>)
    as a Hugging Face directory: config.json and generation_config.json with the tokenizer's
    bos/eos ids, model.safetensors, the tokenizer files and their identity (prepare.META_FILE),
    so that transformers' AutoModelForCausalLM, AutoTokenizer and pipeline load it unchanged."""
    from prepare import get_tokenizer
    model, rec = load_model(spec)
    if rec is None:
        raise CheckpointError(f"{spec} names no tokenizer, so the export could not be used; export a "
                              "checkpoint trained by train.py or an hf:<dir> with tokenizer.json")
    tok = get_tokenizer(rec["spec"])
    if tok.n_vocab > model.config.vocab_size:
        raise CheckpointError(f"tokenizer {tok.name} has {tok.n_vocab} ids but the model's vocab_size is "
                              f"{model.config.vocab_size}")
    if os.path.isdir(directory) and os.listdir(directory):
        raise CheckpointError(f"--to={directory} is not empty; pick a new folder (nothing is overwritten)")
    eos = tok.stop_ids[0] if len(tok.stop_ids) == 1 else list(tok.stop_ids)
    model.save_hf(directory, dtype=getattr(torch, dtype), bos_token_id=tok.bos, eos_token_id=eos)
    tok.save(directory)
    return directory


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="python checkpoint.py export out/x --to=DIR [--dtype=bfloat16]: "
                                "a training checkpoint as a Hugging Face model directory")
    p.add_argument("command", choices=["export"])
    p.add_argument("init_from", help="checkpoint folder, out_dir (its newest checkpoint) or hf:<dir>")
    p.add_argument("--to", required=True, help="the new Hugging Face directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    try:
        export(a.init_from, a.to, a.dtype)
    except (CheckpointError, OSError, ValueError) as e:  # prepare.DataError is a ValueError
        raise SystemExit(f"error: {e}")
    print(f"exported {a.init_from} to {a.to} (load it with transformers' AutoModelForCausalLM / "
          f"AutoTokenizer, or here with --init_from=hf:{a.to})")


if __name__ == "__main__":
    main()
