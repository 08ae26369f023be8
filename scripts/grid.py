"""Choose each row's setting on a validation split: the table of a small grid, and its choice.

    python scripts/grid.py runs/grid_rows_builtin runs/grid_builtin   # one table per method, then the choices

A grid directory holds one sub-directory per setting, named for it (`lr1.5e-4`, `lr5e-5_sft0.5`),
each an `experiment.py --out` tree with `--seeds 1` and `--eval_data` a validation split (so the
choice never sees the reported held-out set): docs/RESULTS.md has the commands that make them. Per
method, every setting's validation accuracy at each evaluation, then the choice: the highest final
accuracy, but a method keeps its default setting (`--default`) unless another beats it by more than
`--margin` (0.05: about one standard error of the difference of two accuracies on 200 problems is
0.04), so that a row does not move on one seed's noise. GRPO from a base that solves nothing learns
nothing at any lr (every group fails, every gradient is 0, and AdamW without weight decay does not
move a weight on a zero gradient): all of its settings tie, and it keeps its default.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import experiment  # noqa: E402  scripts/experiment.py: a run's metrics (pipelines' stages joined) and wall time
from plot import curves  # noqa: E402


def order(name):
    """Settings in the table's order: by the number after `lr`, highest first, then by name."""
    head = name.split("_")[0]
    try:
        return (-float(head[2:]), name) if head.startswith("lr") else (0.0, name)
    except ValueError:
        return (0.0, name)


def settings(grids):
    """{method: {setting: (steps at each evaluation, accuracies, wall seconds, tail())}} over every grid
    directory, seed 0's finished run of each (one still going is left out); a setting named in two
    grids is an error."""
    found = {}
    for grid in grids:
        if not os.path.isdir(grid):
            sys.exit(f"grid.py: error: {grid} is not a directory")
        for name in sorted(os.listdir(grid), key=order):
            for m in experiment.ROWS:
                path = experiment.run_dir(os.path.join(grid, name), m, 0)
                rows = experiment.read_metrics(path, m) if os.path.isdir(path) else []
                steps, acc = curves(rows, "eval/accuracy")
                if not acc:
                    continue
                if name in found.setdefault(m, {}):
                    sys.exit(f"grid.py: error: setting {name} of {m} is in two of {grids}")
                last = experiment.stages(path, m, 0)[-1][2]  # experiment.py writes wall_s when a stage ends
                if os.path.exists(os.path.join(last, "wall_s")):
                    found[m][name] = (steps, acc, experiment.wall(path, m), tail(rows))
    return {m: runs for m, runs in found.items() if runs}


def tail(rows, n=10):
    """Mean reward and truncated share over the last n training steps ("-" for sft: no rollouts)."""
    last = [r for r in rows if "train/reward" in r][-n:]
    mean = lambda key: f"{sum(r.get(key, 0.0) for r in last) / len(last):.2f}" if last else "-"
    return mean("train/reward"), mean("train/truncated_frac")


def choose(runs, defaults, margin):
    """The setting a method keeps: its default unless another's final accuracy beats the default's by
    more than `margin`; then the best. A method that ran none of its defaults gets the best."""
    default = next((d for d in defaults if d in runs), None)
    best = max(runs, key=lambda s: runs[s][1][-1])
    if default is None:
        return best
    return best if runs[best][1][-1] > runs[default][1][-1] + margin else default


def table(found, defaults, margin):
    lines, chosen = [], {}
    for m, runs in found.items():
        chosen[m] = choose(runs, defaults, margin)
        lines += ["", f"**{m}**", "", "| setting | steps evaluated | validation accuracy at each | final | reward, "
                  "last 10 steps | truncated, last 10 | wall time (min) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, (steps, acc, wall, (reward, truncated)) in runs.items():
            lines.append(f"| {name}{' (chosen)' if name == chosen[m] else ''} | {steps[0]}-{steps[-1]} | "
                         f"{' / '.join(f'{a:.3f}' for a in acc)} | **{acc[-1]:.3f}** | {reward} | {truncated} | "
                         f"{f'{wall / 60:.1f}' if wall else '-'} |")
    lines += ["", "Chosen: " + ", ".join(f"{m} {s}" for m, s in chosen.items())]
    return "\n".join(lines).strip(), chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("grids", nargs="+", help="directories of settings, each an experiment.py --out tree")
    p.add_argument("--default", nargs="+", default=["lr5e-4", "lr5e-4_sft0.25"],
                   help="the untuned setting's name (the first one a method ran)")
    p.add_argument("--margin", type=float, default=0.05, help="how much a setting must beat the default by")
    args = p.parse_args(argv)
    found = settings(args.grids)
    if not found:
        sys.exit(f"grid.py: error: no finished run with an evaluation under {' '.join(args.grids)}")
    text, chosen = table(found, args.default, args.margin)
    print(text)
    return chosen


if __name__ == "__main__":
    main()
