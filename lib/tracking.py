"""What a run writes as it goes: metrics.jsonl (the record), completions.jsonl, and optional trackers.

    <out_dir>/metrics.jsonl      one JSON object per step; step 0 is the evaluation before training
    <out_dir>/completions.jsonl  a few prompts, completions, rewards and teacher flags now and then

metrics.jsonl is the record a plot or a resumed run reads. `--report_to tensorboard|wandb|trackio`
mirrors it to a tracker, imported only when asked for. Only rank 0 writes.
"""

import json
import os

TRACKERS = ("none", "tensorboard", "wandb", "trackio")


def check_trackers(names):
    """One line naming the package to install when a tracker is asked for but missing; else None."""
    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
    for name in names:
        if name not in TRACKERS:
            return f"--report_to: unknown tracker '{name}'; choose from {', '.join(TRACKERS)}"
        if name != "none":
            import importlib.util
            if importlib.util.find_spec(packages[name]) is None:
                return f"--report_to {name} needs the {packages[name]} package: pip install {packages[name]}"
    return None


def read_jsonl(path):
    """The complete lines of a JSON-lines file; a torn last line (a kill or a full disk mid-write) is
    left out. Returns (rows, whether anything was left out)."""
    rows, torn = [], False
    if os.path.exists(path):
        for line in open(path, encoding="utf-8", errors="replace"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn = True
    return rows, torn


def rewrite_jsonl(path, rows):
    """Replace a JSON-lines file through a temporary file and a rename: never edited in place."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Log:
    """metrics.jsonl, completions.jsonl and the trackers of one run (rank 0 only; the others no-op).

    On resume, rows logged after the checkpoint's step are dropped from both files (they are about
    to be logged again), and a torn last line is repaired; the files are rewritten, not edited.
    """

    def __init__(self, out_dir, master, report_to=("none",), resume_step=None, config=None):
        self.master = master
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.completions_path = os.path.join(out_dir, "completions.jsonl")
        self.trackers = []
        self.notes = []  # what resuming repaired (printed as it happens)
        if not master:
            return
        for path in (self.metrics_path, self.completions_path):
            if resume_step is None:
                open(path, "w").close()
                continue
            rows, torn = read_jsonl(path)
            keep = [r for r in rows if r.get("step", 0) <= resume_step]
            if torn or len(keep) != len(rows) or not os.path.exists(path):
                rewrite_jsonl(path, keep)
            if torn:
                self.notes.append(f"{path}: dropped a torn last line")
                print(f"resume: {self.notes[-1]}")
        for name in report_to:
            if name != "none":
                self.trackers.append(_open_tracker(name, out_dir, config or {}))

    def metrics(self, row):
        if self.master:
            _append(self.metrics_path, row)
            for t in self.trackers:
                t(row)

    def completions(self, rows):
        if self.master and rows:
            for r in rows:
                _append(self.completions_path, r)

    def close(self):
        for t in self.trackers:
            getattr(t, "close", lambda: None)()


def _append(path, row):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _open_tracker(name, out_dir, config):
    """A callable row -> None that logs the row's numbers at its step, with a close() if needed."""
    numbers = lambda row: {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

        def log(row):
            for k, v in numbers(row).items():
                writer.add_scalar(k, v, row["step"])
            writer.flush()
        log.close = writer.close
        return log
    if name == "wandb":
        import wandb
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hapo"), config=config, dir=out_dir)
        log = lambda row: run.log(numbers(row), step=row["step"])
        log.close = run.finish
        return log
    import trackio
    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "hapo"), config=config)
    log = lambda row: trackio.log(numbers(row), step=row["step"])
    log.close = trackio.finish
    return log


def line(row):
    """The terminal's line for a step's metrics row: the fields the row has (sft's has no rollouts)."""
    fields = [("reward", "train/reward", ".3f"), ("len", "train/response_len", "5.1f"),
              ("teacher", "train/teacher_injected", "3.0f"), ("gate", "train/gate_open_frac", ".2f"),
              ("zero-var", "train/zero_var_frac", ".2f"), ("loss", "train/loss", "+.4f")]
    parts = [f"step {row['step']:4d}"] + [f"{name} {row[k]:{fmt}}" for name, k, fmt in fields if k in row]
    parts.append(f"{row['time/step_s']:.2f}s" + (f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""))
    return " | ".join(parts)


def train_samples(groups, tokenizer, step):
    """completions.jsonl rows for a few training groups: each trajectory's text, reward and whether it
    is the injected teacher."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return [{"step": step, "prompt": decode(g.prompt_ids), "completion": decode(r), "reward": g.rewards[k],
             "teacher": k == g.teacher_at} for g in groups for k, r in enumerate(g.responses)]
