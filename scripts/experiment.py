"""The paper's Figure 2 and Table 1 on the built-in task: HAPO vs GRPO, LUFFY, SRFT, SFT and SFT-then-GRPO.

    python scripts/experiment.py                    # 6 methods x 3 seeds, 2 at a time; then the plot and table
    python scripts/experiment.py --report           # only redraw the plot and table from finished runs
    python scripts/experiment.py --preset evidence  # the Theorem 4.2 experiment of docs/EVIDENCE.md

Each run is `python train.py --method M --seed S ...` in its own process (one thread each), writing
<out>/<method>_s<seed>/metrics.jsonl; a finished run is not rerun, so an interrupted experiment
continues where it stopped. sft-then-grpo is a pipeline of two such runs in sub-directories of its
own (1_sft, then 2_grpo with `--model` the first's out_dir and a fresh optimizer); its SFT stage's
steps count in its budget: a quarter SFT, the rest GRPO at lr 1.5e-4 (50 + 150 of 200 steps), the
setting chosen on a validation split (docs/RESULTS.md; the evidence preset's: half and half, 150 +
150 of 300); `--sft_share` and `--then_args '--lr 5e-4'` (the second stage's own train.py flags)
give another, here the untuned one. Arguments this script does not know go to
train.py; `--eval_data builtin:val` scores on a validation split, to choose such settings without
the reported held-out set (docs/RESULTS.md). `--part_eval NAME=SPEC` also scores each run's last
checkpoint on SPEC's eval split with eval.py (kept in <run>/eval_NAME, so it is not redone either).
Each run's wall time goes to <run>/wall_s, and into the table. The table goes to <out>/table.md
and stdout, the figure (scripts/plot.py's panels) to <out>/figure2.png (needs matplotlib: `pip
install matplotlib`; the table does not).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]
from hapo import METHODS  # noqa: E402  (after the path: the project's modules live one level up)
import plot  # noqa: E402  scripts/plot.py: reading metrics.jsonl and drawing the panels
from plot import curves  # noqa: E402

# SFT-then-RL, the paper's two-stage baseline: train.py --method sft, then RL from its out_dir
PIPELINES = {"sft-then-grpo": ("sft", "grpo")}
# Its setting, chosen on a validation split by scripts/grid.py (docs/RESULTS.md): a quarter of the steps
# SFT, then GRPO at lr 1.5e-4; at train.py's 5e-4, chosen for RL from the base, it stalled after the SFT.
SFT_SHARE = 0.25  # of a pipeline's steps, for its first stage
THEN_ARGS = "--lr 1.5e-4"  # train.py flags for its second stage only
ROWS = [*METHODS, *PIPELINES]

# Named experiments: flags that reproduce a write-up's numbers with one command (docs/EVIDENCE.md).
# evidence: the built-in task with a teacher that is right but adds a recap after its answer, run
# long enough for HAPO's gate to close; the last checkpoints are also scored on the three-digit sums
# below 1000 that the base model solves (did imitating the teacher cost a skill the policy had?).
# Its SFT-then-GRPO setting was chosen on its own validation split (docs/EVIDENCE.md): half SFT.
PRESETS = {
    "evidence": {"out": "runs/evidence", "steps": 300, "eval_every": 25, "part_eval": ["easy=builtin:easy=1"],
                 "sft_share": 0.5, "then_args": THEN_ARGS,
                 "train_args": ["--data", "builtin:recap", "--max_new_tokens", "128"]},
}


def run_dir(out, method, seed):
    return os.path.join(out, f"{method}_s{seed}")


def stages(path, method, steps, share=SFT_SHARE):
    """The train.py runs of one row: [(--method, --max_steps, --out_dir, --model or None)], in order."""
    if method not in PIPELINES:
        return [(method, steps, path, None)]
    first, then = PIPELINES[method]
    n = min(max(1, round(steps * share)), steps - 1)
    one, two = os.path.join(path, f"1_{first}"), os.path.join(path, f"2_{then}")
    return [(first, n, one, None), (then, steps - n, two, one)]


def read_metrics(path, method=None):
    """A run's metrics rows; a pipeline's stages as one run, each stage's steps after the one before
    (a later stage's step 0 evaluates the checkpoint its predecessor ended on: left out)."""
    if method in PIPELINES:
        rows = []
        for _, _, part, _ in stages(path, method, 0):
            at = rows[-1]["step"] if rows else 0
            rows += [{**r, "step": r["step"] + at} for r in read_metrics(part) if not (rows and r["step"] == 0)]
        return rows
    return plot.read_metrics(path)


def finished(path, steps, method=None):
    rows = read_metrics(path, method)
    return bool(rows) and rows[-1]["step"] >= steps and "eval/accuracy" in rows[-1]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # each child process on one core


def pool(todo, jobs, start, error, tick=None, wait=2.0, done=None):
    """Run the items of `todo`, `jobs` at a time: start(item) returns its Popen, tick(running) is
    called after each wait (progress), done(item) after each child that succeeds, and a child that
    fails ends the experiment with error(item, proc)."""
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            item = todo.pop(0)
            running.append((item, start(item)))
        time.sleep(wait)
        if tick:
            tick(running)
        for item, proc in [r for r in running if r[1].poll() is not None]:
            running.remove((item, proc))
            if proc.returncode != 0:
                sys.exit(error(item, proc))
            if done:
                done(item)


def add_wall(path, seconds):
    """Add a stage's wall time to <path>/wall_s (a resumed run's sessions add up)."""
    total = wall(path) + seconds  # read before the file is opened for writing
    with open(os.path.join(path, "wall_s"), "w") as f:
        f.write(f"{total:.1f}\n")


def wall(path, method=None):
    """Seconds a run took, its stages' sum (0.0 where none was recorded)."""
    paths = [part for _, _, part, _ in stages(path, method, 0)] if method in PIPELINES else [path]
    total = 0.0
    for p in paths:
        try:
            total += float(open(os.path.join(p, "wall_s")).read())
        except (OSError, ValueError):
            pass
    return total


def run_all(args):
    """Launch the runs that are not finished yet, `--jobs` at a time, with a progress line: every
    row's first (or only) stage, then the pipelines' second stages."""
    from tqdm import tqdm
    todo = []  # (stage index, row, seed, train.py's --method, --max_steps, --out_dir, --model or None)
    for s in range(args.seeds):
        for m in args.methods:
            for k, (method, steps, path, model) in enumerate(stages(run_dir(args.out, m, s), m, args.steps, args.sft_share)):
                if not finished(path, steps):
                    todo.append((k, m, s, method, steps, path, model))
    bar, done_steps = tqdm(total=sum(key[4] for key in todo), desc="experiment", unit="step", dynamic_ncols=True), {}
    started = {}  # out_dir -> when its process started: each stage's wall time goes to <out_dir>/wall_s

    def start(key):
        _, _, s, method, steps, path, model = key
        os.makedirs(path, exist_ok=True)
        resume = ["--resume"] if os.path.exists(os.path.join(path, "latest")) else []
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--method", method, "--seed", str(s),
               "--max_steps", str(steps), "--eval_every", str(args.eval_every), "--out_dir", path,
               "--save_every", str(args.eval_every), "--no-progress", *resume, *args.train_args,
               *(["--model", model, *args.then_args.split()] if model else [])]  # after the pass-through flags: these win
        with open(os.path.join(path, "train.log"), "a") as log:  # the child keeps its own copy of the handle
            started[path] = time.time()
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ONE_THREAD)

    def done(key):
        add_wall(key[5], time.time() - started[key[5]])

    def tick(running):
        for key, _ in running:
            rows = read_metrics(key[5])
            step = rows[-1]["step"] if rows else 0
            bar.update(step - done_steps.get(key, 0))
            done_steps[key] = step
        bar.set_postfix_str(" ".join(f"{key[1]}/s{key[2]}" for key, _ in running))

    for k in (0, 1):  # a second stage starts from its first stage's last checkpoint
        pool([key for key in todo if key[0] == k], args.jobs, start, tick=tick, done=done,
             error=lambda key, proc: f"experiment.py: error: {key[1]} seed {key[2]} failed (exit {proc.returncode}); "
                                     f"see {key[5]}/train.log")
    bar.close()


def run_part_evals(args):
    """eval.py on each run's last checkpoint, per `--part_eval NAME=SPEC`, `--jobs` at a time.

    Held-out accuracy split by kind of prompt (say, the easy and the hard share of a mixed task):
    train.py logs one number for the whole held-out set. eval.py resumes its own output, and a part
    with a summary.json is not rerun."""
    todo = []
    for s in range(args.seeds):
        for m in args.methods:
            path = run_dir(args.out, m, s)
            last = stages(path, m, args.steps)[-1][2]  # the out_dir of its last stage
            for name, spec in parse_parts(args.part_eval):
                where = os.path.join(path, f"eval_{name}")
                if finished(path, args.steps, m) and not os.path.exists(os.path.join(where, "summary.json")):
                    todo.append([sys.executable, os.path.join(ROOT, "eval.py"), "--model", last, "--benchmarks", spec,
                                 "--out_dir", where, "--max_new_tokens", str(train_flag(args, "max_new_tokens", 64)),
                                 "--temperature", "0.6", "--k", "1", "--rollout", "hf"])  # train.py's held-out protocol
    pool(todo, args.jobs, wait=1.0,
         start=lambda cmd: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ONE_THREAD, text=True),
         error=lambda cmd, proc: f"experiment.py: error: eval.py failed: {proc.stderr.read().strip()[-400:]}")


def parse_parts(items):
    """["hard=builtin", ...] -> [("hard", "builtin"), ...]."""
    parts = [item.partition("=")[::2] for item in items]
    bad = [i for i, (n, s) in zip(items, parts) if not n or not s or not n.isidentifier()]
    if bad:
        sys.exit(f"experiment.py: error: --part_eval takes NAME=SPEC, got {bad[0]!r}")
    return parts


def train_flag(args, name, default):
    """The value of train.py's --name among the pass-through arguments (the last one wins)."""
    value = default
    for i, a in enumerate(args.train_args):
        if a == f"--{name}" and i + 1 < len(args.train_args):
            value = args.train_args[i + 1]
        elif a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return type(default)(value)


def teacher_length(args):
    """Mean length in tokens of the teacher solutions of the training set, EOS included (what SSI
    injects), or None when the data cannot be read here: the reference line of the length panel."""
    try:
        from lib import data
        from lib.models import load_model, resolve_model
        _, tok = load_model(resolve_model(train_flag(args, "model", "tiny")), need_weights=False)
        problems, _ = data.load_problems(train_flag(args, "data", "builtin"), "train")
        enc, _ = data.encode(tok, problems[:500], None, None)
        return statistics.mean(len(e.solution_ids) for e in enc)
    except Exception as e:  # the table and the plot do not need it
        print(f"experiment.py: no teacher length ({type(e).__name__}: {e})", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------
# the report: per-method curves (mean over seeds) and the results table

FIGURE2 = [("train/reward", "reward (teacher samples excluded)"), ("train/response_len", "response length (tokens)"),
           ("train/teacher_injected", "teacher samples injected per step"), ("eval/accuracy", "held-out accuracy")]


def teacher_signal(row, method):
    """Teacher samples that got a gradient this step. LUFFY's shaped loss is -A f(p): in a group whose
    N-1 sampled rollouts all succeeded the teacher's advantage, and so its gradient, is 0, and those
    are the only zero-variance groups it has (every group holds a verified teacher). HAPO injects
    only where S <= 6, so a group with its teacher always has a failure left; SRFT's -log p is
    not weighted by the advantage."""
    injected = row.get("train/teacher_injected", 0)
    return injected * (1 - row["train/zero_var_frac"]) if method == "luffy" else injected


def window_mean(rs, key, first, window, method=None):
    """Mean over seeds of a per-step metric over the first (or last) `window` training steps that
    logged it (sft logs no rollout metric: None)."""
    per_seed = []
    for rows in rs:
        need = "train/teacher_injected" if key == "teacher_signal" else key
        steps = [r for r in rows if r["step"] > 0 and need in r]
        part = steps[:window] if first else steps[-window:]
        vals = [teacher_signal(r, method) if key == "teacher_signal" else r[key] for r in part]
        if vals:
            per_seed.append(statistics.mean(vals))
    return statistics.mean(per_seed) if per_seed else None


def peak(rs, key, smooth=10):
    """The highest `smooth`-step moving average of a per-step metric's mean over seeds (None if never logged)."""
    series = [curves(rows, key)[1] for rows in rs]
    n = min(len(v) for v in series)
    if n == 0:
        return None
    mean = [statistics.mean(v[i] for v in series) for i in range(n)]
    return max(statistics.mean(mean[i:i + smooth]) for i in range(max(n - smooth + 1, 1)))


def summary(runs, parts=(), out="", window=20, best=None):
    """Per method: accuracy (start, final mean/std, steps to half the best), response length and
    teacher use over the first and last `window` steps, collapse, and per-part final accuracy. `best`
    defaults to the best accuracy of these runs (give the other rows' when tabulating a few methods)."""
    if best is None:
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
        zero_var = [statistics.mean(v) for v in (curves(rows, "train/zero_var_frac")[1] for rows in rs) if v]
        table[m] = {"start_acc_mean": statistics.mean(start),
                    "final_acc_mean": statistics.mean(final), "final_acc_std": statistics.pstdev(final),
                    "final_acc": final, "steps_to_half_best": reach, "teacher_total": statistics.mean(teacher),
                    "zero_var_frac": statistics.mean(zero_var) if zero_var else None, "seeds": len(rs),
                    "window": window, "wall_s": [wall(run_dir(out, m, s), m) for s in range(len(rs))]}
        for key, name in (("train/response_len", "len"), ("train/teacher_injected", "teacher"),
                          ("teacher_signal", "teacher_signal"), ("train/reward", "reward")):
            table[m][f"{name}_start"] = window_mean(rs, key, True, window, m)
            table[m][f"{name}_end"] = window_mean(rs, key, False, window, m)
        table[m]["len_peak"] = peak(rs, "train/response_len")
        for name, _ in parts:
            accs = [json.load(open(p))["builtin"]["avg_at_k"] if os.path.exists(p) else None
                    for p in (os.path.join(run_dir(out, m, s), f"eval_{name}", "summary.json") for s in range(len(rs)))]
            accs = [a for a in accs if a is not None]
            if accs:
                table[m][f"final_{name}_mean"] = statistics.mean(accs)
                table[m][f"final_{name}_std"] = statistics.pstdev(accs)
    return best, table


def markdown(best, table, parts=(), teacher_len=None):
    """The results table: one row per method."""
    w = next(iter(table.values()))["window"] if table else 20
    part_heads = [f"final, {name} prompts" for name, _ in parts]
    heads = ["method", "held-out accuracy at step 0", "final held-out accuracy", *part_heads,
             f"steps to {best / 2:.3f} (half the best)", f"response length, first {w} / peak / last {w} steps",
             f"teacher samples per step, first / last {w}", f"of which with a gradient, last {w}",
             "teacher samples in all", "zero-variance groups", "wall time per run (min)"]
    lines = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # "-": not logged (sft has no rollouts)
    for m, t in table.items():
        reach = [r for r in t["steps_to_half_best"] if r is not None]
        reach_s = f"{statistics.mean(reach):.0f} ({len(reach)}/{t['seeds']} seeds)" if reach else f"never (0/{t['seeds']})"
        part_cells = [f"{t[f'final_{n}_mean']:.3f} +- {t[f'final_{n}_std']:.3f}" if f"final_{n}_mean" in t else "-"
                      for n, _ in parts]
        cells = [m, f"{t['start_acc_mean']:.3f}", f"{t['final_acc_mean']:.3f} +- {t['final_acc_std']:.3f}", *part_cells,
                 reach_s, f"{f(t['len_start'])} / {f(t['len_peak'])} / {f(t['len_end'])}",
                 f"{f(t['teacher_start'])} / {f(t['teacher_end'])}", f(t["teacher_signal_end"]),
                 f(t["teacher_total"], ".0f"), f(t["zero_var_frac"], ".2f"),
                 ", ".join(f"{w / 60:.1f}" if w else "-" for w in t["wall_s"])]  # "-": not recorded
        lines.append("| " + " | ".join(cells) + " |")
    if teacher_len is not None:
        lines.append(f"\nThe teacher's solutions average {teacher_len:.1f} tokens (EOS included).")
    return "\n".join(lines)


def legend(method, walls):
    """A row's label in the figure, with each run's wall time: `hapo (4.1, 3.9, 4.0 min)`."""
    known = [f"{w / 60:.1f}" for w in walls if w]
    return f"{method} ({', '.join(known)} min)" if known else method


def parse_args(argv=None):
    """The command line, a preset's values as its defaults, and train.py's pass-through flags in args.train_args."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named experiment: its defaults, then the flags given")
    p.add_argument("--out", default="runs/experiment", help="one sub-directory per run")
    p.add_argument("--methods", nargs="+", default=ROWS, choices=ROWS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--part_eval", nargs="*", default=[], metavar="NAME=SPEC",
                   help="also score each run's last checkpoint on SPEC's eval split (eval.py)")
    p.add_argument("--sft_share", type=float, default=SFT_SHARE, help="a pipeline's share of --steps for its SFT stage")
    p.add_argument("--then_args", default=THEN_ARGS, help="train.py flags for a pipeline's second stage only "
                                                          "(default: %(default)s; '--lr 5e-4': the untuned row)")
    p.add_argument("--window", type=int, default=20, help="steps averaged for the first/last columns")
    p.add_argument("--report", action="store_true", help="skip training; plot and tabulate finished runs")
    p.add_argument("--best", type=float, help="the accuracy whose half 'steps to half the best' counts to "
                                              "(default: the best of these runs; the other rows' when running a few)")
    p.add_argument("--png", default="", help="plot path (default: <out>/figure2.png)")
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = p.parse_known_args(argv)[0].preset
    if preset:  # the preset's values become defaults, so flags given on the command line still win
        spec = PRESETS[preset]
        p.set_defaults(**{k: v for k, v in spec.items() if k != "train_args"})
        args, rest = p.parse_known_args(argv)
        args.train_args = spec["train_args"] + rest  # after the preset's, so train.py takes these
    else:
        args, args.train_args = p.parse_known_args(argv)  # anything else goes to train.py
    if args.steps < 2 and any(m in PIPELINES for m in args.methods):
        sys.exit("experiment.py: error: a pipeline (sft-then-grpo) needs --steps of at least 2, one for each stage")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.report:
        run_all(args)
        run_part_evals(args)
    runs = {m: [read_metrics(run_dir(args.out, m, s), m) for s in range(args.seeds)] for m in args.methods}
    runs = {m: [rows for rows in rs if rows] for m, rs in runs.items() if any(rs)}
    if not runs:
        sys.exit(f"experiment.py: error: no finished runs in {args.out}")
    parts = parse_parts(args.part_eval)
    best, table = summary(runs, parts, args.out, args.window, args.best)
    teacher_len = teacher_length(args)
    for t in table.values():
        t["teacher_len"] = teacher_len
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    text = markdown(best, table, parts, teacher_len)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    plot.figure({legend(m, table[m]["wall_s"]): rs for m, rs in runs.items()}, args.png or os.path.join(args.out, "figure2.png"), FIGURE2,
                cols=4, prog="experiment.py",
                hlines={"train/response_len": (teacher_len, "teacher")} if teacher_len is not None else None)
    return table


if __name__ == "__main__":
    main()
