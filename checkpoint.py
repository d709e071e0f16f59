"""Checkpoints that survive crashes, and loading a model for sample.py / eval_ppl.py.

A checkpoint is a folder out_dir/ckpt_<step>/ of torch.save files plus manifest.json
(each file's size and sha256). It is written as a hidden temporary folder, every file
fsynced, then renamed into place: rename is atomic, so a kill -9 at any moment leaves
either the old set of checkpoints or the new one, never a half-written newest one.

Files: model.pt (full, single-process state dict with the model config: any layout
loads it), optimizer.pt (per-parameter-name AdamW state, or optim_rank<r>.pt when ZeRO
shards it), train_state.pt (step, config, RNG, loss scaler; the data position is the
step itself, since the batch of step t depends only on seed and t).
"""
import hashlib
import json
import os
import shutil

import torch

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
    """torch.save each {name: object} into tmp and fsync it (called on every rank that has files)."""
    os.makedirs(tmp, exist_ok=True)
    for name, obj in objects.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


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
    if os.path.exists(final):  # same step saved again (e.g. preempted right after a save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(out_dir)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temp(out_dir):
    """Remove temporary folders left by saves that a crash interrupted (call on rank 0 at start)."""
    for n in os.listdir(out_dir):
        if n.startswith(".tmp_" + PREFIX):
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)


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


def load(path, name):
    try:
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=False)
    except Exception as e:  # a pickle error names nothing useful
        raise CheckpointError(f"cannot read checkpoint file {os.path.join(path, name)}: {e}")


def load_model(spec, device="cpu", **config_overrides):
    """A model from 'hf:<dir>', a checkpoint folder, or an out_dir (its newest checkpoint).
    Returns (model, tokenizer name or None)."""
    from model import Transformer, config_from_dict
    if spec.startswith("hf:"):
        return Transformer.from_hf(spec[3:], **config_overrides).to(device), None
    path = spec if os.path.exists(os.path.join(spec, "manifest.json")) else latest(spec)
    if path is None:
        raise CheckpointError(f"no checkpoint in {spec}: train first (python train.py ...) or pass hf:<dir>")
    blob = load(path, "model.pt")
    model = Transformer(config_from_dict({**blob["model_config"], **config_overrides}))
    state = dict(blob["state_dict"])
    if model.config.tie_embeddings:  # saved once, under its first name
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    model.load_state_dict(state)
    return model.to(device), blob.get("tokenizer")
