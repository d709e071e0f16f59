"""Pictures of a run: training curves of one or more runs, and a pipeline's measured timeline.

    python plot.py out/tiny                          loss, lr, grad norm, tokens/s, memory -> out/tiny/plot.png
    python plot.py out/a out/b --smooth=0.9 --out=cmp.png      several runs overlaid and labelled
    python plot.py --timeline out/pp                 the pipeline trace of a run with --pp_trace=True

Reads out_dir/log.jsonl (train.py's machine-readable log), so it works on a run that is still
going. The last record of a step wins (a resumed run re-logs the steps after its checkpoint);
skipped steps (non-finite gradients) are marked on the loss panel. matplotlib is optional for
the rest of the repository and needed here only.
"""
import argparse
import json
import os
import sys


# --------------------------------------------------------------------------- reading logs
def read_log(out_dir):
    """{"train": {step: record}, "val": {step: val_loss}, "skipped": [steps]} from out_dir/log.jsonl."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; pass the out_dir of a train.py run")
    train, val, skipped = {}, {}, set()
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a crash, or the one being written now
                continue
            step = rec.get("step")
            if "skipped" in rec:
                skipped.add(step)
            elif "val_loss" in rec:
                val[step] = rec["val_loss"]
            elif "loss" in rec:
                train[step] = rec
                skipped.discard(step)  # re-run after a resume, and this time it stepped
    return {"train": dict(sorted(train.items())), "val": dict(sorted(val.items())), "skipped": sorted(skipped)}


def smoothed(values, weight):
    """Exponential moving average with bias correction (TensorBoard's smoothing); weight 0 = raw."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)) if weight else v)
    return out


# --------------------------------------------------------------------------- training curves
PANELS = [  # (title, log.jsonl field, y label)
    ("training loss", "loss", "loss"), ("loss against tokens", "loss", "loss"),
    ("learning rate", "lr", "lr"), ("gradient norm", "grad_norm", "global norm (before clipping)"),
    ("throughput", "tokens_per_s", "tokens/s"), ("memory", "peak_mem_gib", "peak GiB per GPU"),
]


def make_figure(runs, smooth=0.0):
    """runs: [(label, read_log(...))]. One line per run and panel (validation loss adds one
    dashed line per run to the first two panels); a panel no run has data for says so."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (title, field, ylabel) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("tokens" if title == "loss against tokens" else "step")
        ax.grid(alpha=0.3)
        drawn = False
        for i, (label, log) in enumerate(runs):
            color = f"C{i}"
            steps = [s for s, r in log["train"].items() if r.get(field) is not None]
            if title == "loss against tokens":  # the tokens seen by each step (logged since tokens were recorded)
                steps = [s for s in steps if "tokens" in log["train"][s]]
                xs = [log["train"][s]["tokens"] for s in steps]
            else:
                xs = steps
            ys = [log["train"][s][field] for s in steps]
            if not xs:
                continue
            drawn = True
            ax.plot(xs, smoothed(ys, smooth) if field == "loss" else ys, color=color, label=label)
            if field == "loss":
                per_token = {s: r["tokens"] / s for s, r in log["train"].items() if "tokens" in r and s}
                scale = next(iter(per_token.values()), None)
                val = log["val"]
                if val and (title == "training loss" or scale):
                    vx = list(val) if title == "training loss" else [s * scale for s in val]
                    ax.plot(vx, list(val.values()), "o--", color=color, label=f"{label} (validation)", markersize=3)
                if title == "training loss" and log["skipped"]:
                    ax.plot(log["skipped"], [min(ys)] * len(log["skipped"]), "x", color=color,
                            label=f"{label}: skipped steps")
        if drawn and field == "grad_norm":
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no '{field}' in the logs" + (" (GPU runs only)" if field == "peak_mem_gib" else ""),
                    ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(", ".join(label for label, _ in runs) + (f" (loss smoothed, EMA {smooth})" if smooth else ""))
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- main
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plot.py needs matplotlib, which the rest of the repository does not: "
                         "pip install matplotlib")
    import matplotlib.pyplot as plt
    return matplotlib, plt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="out_dir of each run (log.jsonl inside)")
    p.add_argument("--out", default=None, help="PNG path (default: plot.png, or timeline.png, in the first run's folder)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the loss curves, in [0, 1)")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: the folder names)")
    p.add_argument("--timeline", action="store_true", help="draw the pipeline trace of one run (--pp_trace=True)")
    p.add_argument("--no_show", action="store_true", help="only write the PNG, even where there is a display")
    a = p.parse_args(argv)
    if not 0 <= a.smooth < 1:
        raise SystemExit(f"error: --smooth={a.smooth} must be in [0, 1) (0 = raw, 0.9 = smooth)")
    matplotlib, plt = _pyplot()
    if a.timeline:
        if len(a.runs) != 1:
            raise SystemExit("error: --timeline takes one run")
        import timeline_plot  # noqa: F401  (defined below once the trace format exists)
    labels = a.labels.split(",") if a.labels else [os.path.basename(os.path.normpath(r)) for r in a.runs]
    if len(labels) != len(a.runs):
        raise SystemExit(f"error: --labels has {len(labels)} names for {len(a.runs)} runs")
    runs = [(label, read_log(r)) for label, r in zip(labels, a.runs)]
    if not any(log["train"] for _, log in runs):
        raise SystemExit(f"error: no logged training step yet in {', '.join(a.runs)}")
    fig = make_figure(runs, a.smooth)
    out = a.out or os.path.join(a.runs[0], "plot.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    if not a.no_show and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        plt.show()


if __name__ == "__main__":
    main(sys.argv[1:])
