"""The paper's Figure 2 on the built-in task: HAPO vs GRPO vs LUFFY vs SRFT, several seeds.

    python scripts/experiment.py              # 4 methods x 3 seeds, 2 at a time; then the plot and table
    python scripts/experiment.py --report     # only redraw the plot and table from finished runs

Each run is `python train.py --method M --seed S ...` in its own process (one thread each), writing
<out>/<method>_s<seed>/metrics.jsonl; a finished run is not rerun, so an interrupted experiment
continues where it stopped. The plot needs matplotlib (`pip install matplotlib`); the table does not.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hapo import METHODS  # noqa: E402  (after the path: the project's modules live one level up)


def run_dir(out, method, seed):
    return os.path.join(out, f"{method}_s{seed}")


def read_metrics(path):
    try:
        return [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    except (OSError, json.JSONDecodeError):
        return []


def finished(path, steps):
    rows = read_metrics(path)
    return bool(rows) and rows[-1]["step"] >= steps and "eval/accuracy" in rows[-1]


def run_all(args):
    """Launch the runs that are not finished yet, `--jobs` at a time, with a progress line."""
    from tqdm import tqdm
    todo = [(m, s) for s in range(args.seeds) for m in args.methods if not finished(run_dir(args.out, m, s), args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running, bar = [], tqdm(total=len(todo) * args.steps, desc="experiment", unit="step", dynamic_ncols=True)
    done_steps = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            m, s = todo.pop(0)
            path = run_dir(args.out, m, s)
            os.makedirs(path, exist_ok=True)
            resume = ["--resume"] if os.path.exists(os.path.join(path, "latest")) else []
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--method", m, "--seed", str(s),
                   "--max_steps", str(args.steps), "--eval_every", str(args.eval_every), "--out_dir", path,
                   "--save_every", str(args.eval_every), "--no-progress", *resume, *args.train_args]
            log = open(os.path.join(path, "train.log"), "a")
            running.append(((m, s), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(2)
        for key, proc in list(running):
            rows = read_metrics(run_dir(args.out, *key))
            step = rows[-1]["step"] if rows else 0
            bar.update(step - done_steps.get(key, 0))
            done_steps[key] = step
            if proc.poll() is not None:
                running.remove((key, proc))
                if proc.returncode != 0:
                    sys.exit(f"experiment.py: error: {key[0]} seed {key[1]} failed (exit {proc.returncode}); "
                             f"see {run_dir(args.out, *key)}/train.log")
        bar.set_postfix_str(" ".join(f"{m}/s{s}" for (m, s), _ in running))
    bar.close()


# ----------------------------------------------------------------------------
# the report: per-method curves (mean over seeds) and the results table


def curves(rows, key):
    """(steps, values) of one metric from one run's metrics rows."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def summary(runs):
    """Per method: final accuracy mean/std, steps to half of the best accuracy, teacher use, collapse."""
    best = max((max(curves(rows, "eval/accuracy")[1]) for rs in runs.values() for rows in rs), default=0.0)
    table = {}
    for m, rs in runs.items():
        final = [curves(rows, "eval/accuracy")[1][-1] for rows in rs]
        start = [curves(rows, "eval/accuracy")[1][0] for rows in rs]
        reach = []
        for rows in rs:
            steps, acc = curves(rows, "eval/accuracy")
            hit = [s for s, a in zip(steps, acc) if a >= best / 2]
            reach.append(hit[0] if hit else None)
        teacher = [sum(r.get("train/teacher_injected", 0) for r in rows) for rows in rs]
        zero_var = [statistics.mean(curves(rows, "train/zero_var_frac")[1]) for rows in rs]
        table[m] = {"start_acc_mean": statistics.mean(start),
                    "final_acc_mean": statistics.mean(final), "final_acc_std": statistics.pstdev(final),
                    "steps_to_half_best": reach, "teacher_total": statistics.mean(teacher),
                    "zero_var_frac": statistics.mean(zero_var), "seeds": len(rs)}
    return best, table


def markdown(best, table):
    lines = [f"| method | held-out accuracy at step 0 | final held-out accuracy | steps to {best / 2:.3f} (half the best) "
             "| teacher samples | zero-variance groups |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m, t in table.items():
        reach = [r for r in t["steps_to_half_best"] if r is not None]
        reach_s = f"{statistics.mean(reach):.0f} ({len(reach)}/{t['seeds']} seeds)" if reach else f"never (0/{t['seeds']})"
        lines.append(f"| {m} | {t['start_acc_mean']:.3f} | {t['final_acc_mean']:.3f} +- {t['final_acc_std']:.3f} | {reach_s} | "
                     f"{t['teacher_total']:.0f} | {t['zero_var_frac']:.2f} |")
    return "\n".join(lines)


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("experiment.py: matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return
    panels = [("train/reward", "reward (teacher samples excluded)"), ("train/response_len", "response length (tokens)"),
              ("train/teacher_injected", "teacher samples injected per step"), ("eval/accuracy", "held-out accuracy")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, panels):
        for m, rs in runs.items():
            series = [curves(rows, key) for rows in rs]
            steps = series[0][0]
            n = min(len(v) for _, v in series)
            vals = [[v[i] for _, v in series] for i in range(n)]
            smooth = 1 if key == "eval/accuracy" else 10  # moving average over 10 steps for per-step metrics
            mean = [statistics.mean(x) for x in vals]
            lo = [min(x) for x in vals]
            hi = [max(x) for x in vals]
            ma = lambda xs: [statistics.mean(xs[max(0, i - smooth + 1):i + 1]) for i in range(len(xs))]
            ax.plot(steps[:n], ma(mean), label=m)
            ax.fill_between(steps[:n], ma(lo), ma(hi), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/experiment", help="one sub-directory per run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--report", action="store_true", help="skip training; plot and tabulate finished runs")
    p.add_argument("--png", default="", help="plot path (default: <out>/figure2.png)")
    args, args.train_args = p.parse_known_args(argv)  # anything else goes to train.py
    if not args.report:
        run_all(args)
    runs = {m: [read_metrics(run_dir(args.out, m, s)) for s in range(args.seeds)] for m in args.methods}
    runs = {m: [rows for rows in rs if rows] for m, rs in runs.items() if any(rs)}
    if not runs:
        sys.exit(f"experiment.py: error: no finished runs in {args.out}")
    best, table = summary(runs)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(markdown(best, table))
    plot(runs, args.png or os.path.join(args.out, "figure2.png"))
    return table


if __name__ == "__main__":
    main()
