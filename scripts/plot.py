"""A picture of any run: reward, held-out accuracy, teacher samples, the gate, length and truncation.

    python scripts/plot.py out                          # writes out/curves.png
    python scripts/plot.py out/hapo out/grpo --smooth 1 # several runs in one figure, each labelled by its out_dir

Reads each out_dir's metrics.jsonl, also while the run is still going (a torn last line is skipped)
and after a resume (should a step be logged twice, the later row wins). Per-step panels are a moving
average over --smooth steps; held-out accuracy is drawn as logged. A missing or empty out_dir is one
line and exit 2. Needs matplotlib (`pip install matplotlib`). scripts/experiment.py draws Figure 2
with the same code (figure()): one line per method, the mean over seeds, shaded from lowest to highest.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib.tracking import read_jsonl  # noqa: E402  (after the path: lib/ lives one level up)

PANELS = [("train/reward", "reward (teacher samples excluded)"), ("eval/accuracy", "held-out accuracy"),
          ("train/teacher_injected", "teacher samples injected per step"),
          ("train/gate_open_frac", "gate open (share of groups)"), ("train/response_len", "response length (tokens)"),
          ("train/truncated_frac", "truncated (share of samples)")]
SHARES = {"train/reward", "eval/accuracy", "train/gate_open_frac", "train/truncated_frac"}  # drawn on [0, 1]


def read_metrics(path):
    """The rows of <path>/metrics.jsonl in step order, one per step ([] if there is none). The last
    line of a run still writing may be torn: skipped. A resumed run redoes the steps after its
    checkpoint; train.py drops their first rows when it resumes, but a copy taken in between (or an
    older run's file) holds both, and the later row is the one the run went on from."""
    by_step = {r["step"]: r for r in read_jsonl(os.path.join(path, "metrics.jsonl"))[0]
               if isinstance(r, dict) and "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def curves(rows, key):
    """(steps, values) of one metric from one run's metrics rows."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def moving_average(xs, n):
    return [statistics.mean(xs[max(0, i - n + 1):i + 1]) for i in range(len(xs))]


def panel(ax, runs, key, smooth):
    """One metric of every run on one axis: {label: [rows of each seed]} -> one line per label (the
    mean over its seeds, shaded from the lowest to the highest), one colour per label in every panel.
    Returns whether anything was drawn (sft logs no rollout metric)."""
    drawn = False
    for i, (label, rs) in enumerate(runs.items()):
        series = [curves(rows, key) for rows in rs]
        n = min(len(v) for _, v in series)
        if n == 0:
            continue
        steps = series[0][0][:n]
        vals = [[v[j] for _, v in series] for j in range(n)]
        ma = lambda xs: moving_average(xs, 1 if key == "eval/accuracy" else smooth)  # evals are sparse
        ax.plot(steps, ma([statistics.mean(x) for x in vals]), label=label, color=f"C{i}",
                marker="o" if key == "eval/accuracy" else None, markersize=3)
        if len(rs) > 1:
            ax.fill_between(steps, ma([min(x) for x in vals]), ma([max(x) for x in vals]), alpha=0.2, color=f"C{i}")
        drawn = True
    return drawn


def figure(runs, path, panels=PANELS, smooth=10, hlines=None, cols=3, prog="plot.py"):
    """Draw `panels` [(key, title)] of `runs` {label: [rows, ...]} into the PNG at `path`; `hlines`
    {key: (y, label)} adds a reference line. Returns the titles of the figure's panels, or None
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{prog}: matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return None
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, (key, title) in zip(axes, panels):
        if not panel(ax, runs, key, smooth):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        if key in SHARES:
            ax.set_ylim(-0.03, 1.03)  # a share near 0 or 1 reads as such, not as a zoomed-in wiggle
        if key in (hlines or {}):
            y, label = hlines[key]
            ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
            ax.legend(loc="center right", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax in axes[len(panels):]:
        ax.remove()
    keys = [k for k, _ in panels]
    axes[keys.index("eval/accuracy") if "eval/accuracy" in keys else 0].legend(fontsize=8)  # the panel every run has
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    titles = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    print(f"wrote {path}")
    return titles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="train.py --out_dir of each run")
    p.add_argument("--png", default="", help="where to write (default: <first OUT_DIR>/curves.png)")
    p.add_argument("--smooth", type=int, default=10, help="moving average over this many steps (1: none)")
    args = p.parse_args(argv)
    runs = {}
    for out in args.out_dirs:
        if not os.path.isfile(os.path.join(out, "metrics.jsonl")):
            _fail(f"{out} has no metrics.jsonl (is it a train.py --out_dir?)")
        rows = read_metrics(out)
        if not rows:
            _fail(f"{out}/metrics.jsonl has no step logged yet")
        runs[os.path.normpath(out)] = [rows]
    titles = figure(runs, args.png or os.path.join(args.out_dirs[0], "curves.png"), smooth=max(args.smooth, 1))
    if titles is None:
        sys.exit(1)
    return titles


def _fail(message):
    print(f"plot.py: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
