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


# --------------------------------------------------------------------------- pipeline timeline
def read_trace(out_dir):
    """out_dir/pp_trace.json, written by train.py with --pp_trace=True (parallel.py's trace format:
    per traced step and stage, the step's length and its [kind, micro-batch, chunk, start, end]
    events in seconds from the step's start; kinds F, B, wait (a receive), drain (the end barrier))."""
    path = os.path.join(out_dir, "pp_trace.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; run train.py with pp > 1 and --pp_trace=True")
    with open(path) as f:
        return json.load(f)


def measured_idle(stage):
    """Share of a traced step that the stage spent waiting (receives and the end drain): the same
    intervals that pp_measure_idle sums."""
    waits = sum(t1 - t0 for kind, _, _, t0, t1 in stage["events"] if kind in ("wait", "drain"))
    return waits / stage["length"]


def planned_timeline(schedule, pp, m, v=1, t_forward=1.0, t_backward=2.0):
    """Each stage's actions as parallel.py orders them, placed in time by their dependencies alone
    (a forward of chunk g after chunk g-1's, a backward after chunk g+1's; no communication cost;
    a chunk's forward takes t_forward / v). Returns per stage [[kind, mb, chunk, start, end]]."""
    import parallel
    actions = [parallel.schedule_actions(schedule, m, pp, s, v) for s in range(pp)]
    n_chunks = pp * v
    done, free, out = {}, [0.0] * pp, [[] for _ in range(pp)]
    nxt = [0] * pp
    while any(nxt[s] < len(actions[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            if nxt[s] == len(actions[s]):
                continue
            kind, mb, g = actions[s][nxt[s]]
            dep = (kind, mb, g - 1) if kind == "F" and g > 0 else (kind, mb, g + 1) if kind == "B" and g < n_chunks - 1 else None
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done.get(dep, 0.0))
            end = start + (t_forward if kind == "F" else t_backward) / v
            done[kind, mb, g], free[s] = end, end
            out[s].append([kind, mb, g, start, end])
            nxt[s] += 1
            progressed = True
        assert progressed, "the schedule deadlocks"  # parallel.py's schedules never do
    return out


def make_timeline(trace, step_index=-1):
    """Two panels: the measured step (one lane per stage) and the planned schedule of the same
    (p, m, v). Colour = micro-batch, hatching = the stage's later chunks (interleaved), pale =
    forward, dark = backward, grey = waiting."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    pp, m, v = trace["pp"], trace["m"], trace["virtual"]
    step = trace["steps"][step_index]
    planned = planned_timeline(trace["schedule"], pp, m, v)
    fig, axes = plt.subplots(2, 1, figsize=(14, 2.0 + 1.1 * pp * 2))
    lanes = [("measured, step %d" % step["step"], [st["events"] for st in step["stages"]], 1e3, "ms"),
             ("planned (forward 1, backward 2 time units; no communication)", planned, 1.0, "time units")]
    for ax, (title, stages, scale, unit) in zip(axes, lanes):
        for s, events in enumerate(stages):
            for kind, mb, g, t0, t1 in events:
                if kind in ("wait", "drain"):
                    ax.broken_barh([(t0 * scale, (t1 - t0) * scale)], (s - 0.4, 0.8), color="0.85")
                    continue
                ax.broken_barh([(t0 * scale, (t1 - t0) * scale)], (s - 0.4, 0.8), facecolor=f"C{mb % 10}",
                               alpha=0.45 if kind == "F" else 0.95, edgecolor="black", linewidth=0.4,
                               hatch="//" if g // pp % 2 else None)
                ax.text((t0 + t1) / 2 * scale, s, f"{kind}{mb}", ha="center", va="center", fontsize=7)
        ax.set_yticks(range(pp))
        if scale == 1.0:
            idle = [1 - sum(e[4] - e[3] for e in ev) / max(e[4] for st in stages for e in st) for ev in stages]
        else:
            idle = [measured_idle(st) for st in step["stages"]]
        ax.set_yticklabels([f"stage {s}\nidle {idle[s]:.0%}" for s in range(pp)])
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(title)
        ax.autoscale()
    fig.legend(handles=[Patch(color=f"C{i}", label=f"micro-batch {i}") for i in range(min(m, 10))]
               + [Patch(color="0.85", label="waiting")], loc="upper right", fontsize=7, ncol=2)
    fig.suptitle(f"{trace['schedule']}: p={pp}, m={m}" + (f", v={v}" if v > 1 else "") + f" | formula idle "
                 f"(p-1)/({'v*' if v > 1 else ''}m+p-1) = {trace['formula_idle']:.1%} ({trace.get('device', '')})")
    fig.tight_layout()
    return fig


def timeline_main(out_dir, out):
    trace = read_trace(out_dir)
    if not trace["steps"]:
        raise SystemExit(f"error: {out_dir}/pp_trace.json has no traced step yet")
    for step in trace["steps"]:
        print(f"step {step['step']}: measured idle by stage "
              + " ".join(f"{measured_idle(st):.1%}" for st in step["stages"])
              + f" | formula {trace['formula_idle']:.1%}")
    fig = make_timeline(trace)
    out = out or os.path.join(out_dir, "timeline.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


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
        timeline_main(a.runs[0], a.out)
        return _show(matplotlib, plt, a.no_show)
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
    _show(matplotlib, plt, a.no_show)


def _show(matplotlib, plt, no_show):
    """A window too, where there is a display (matplotlib falls back to Agg where there is none)."""
    if not no_show and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        plt.show()


if __name__ == "__main__":
    main(sys.argv[1:])
