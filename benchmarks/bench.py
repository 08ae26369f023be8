"""Benchmark: this project's loop against TRL's GRPOTrainer on the same work, in one run.

    pip install -r requirements-bench.txt   # TRL and datasets: only this file needs them
    python bench.py                         # ~3 minutes on 2 CPU cores; prints the table
    python bench.py --json bench.json       # and writes it as JSON

Three runs train the built-in tiny Qwen2 (randomly initialised, saved to a temporary directory and
loaded from there) on the built-in task's prompts: ours with --method grpo, TRL's GRPOTrainer, and
ours with --method hapo. Equal work: 16 prompts x 8 completions per step, each exactly `new_tokens`
long (both sides suppress EOS with `min_new_tokens`), two micro-batches of 64, one AdamW update per
step at the same constant learning rate, no KL term, fp32, the same reward function, one torch
thread each (two threads on two shared cores stall whenever another program holds one of them).
Each run is its own process, so its peak resident memory (VmHWM) is its own. The runs go in
lockstep: a step of each in turn, in rotated order, the others waiting, so load from other programs
and drift hit all three alike. A step is clocked from when its run gets the turn to the end of its
weight sync (ours) or optimizer step (TRL); medians leave out each run's first `warmup` steps.
Also: the stages of our step (the README's profile), and the peak memory of per-token log-probs
over a Qwen-sized vocabulary, chunked (loss.hidden_logprobs) against a naive log_softmax.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("ours:grpo", "trl", "ours:hapo")
STAGES = ("rollout", "reward", "gate, SSI, advantages, pack", "old log-probs", "loss forward", "loss backward",
          "grad clip", "optimizer", "weight sync")  # of our step, in train.py's order


@dataclass
class Args:
    steps: int = 30  # optimizer steps per run
    warmup: int = 3  # first steps of each run left out of the medians
    prompts: int = 16  # prompts per step
    group: int = 8  # completions per prompt
    new_tokens: int = 48  # tokens per completion, fixed on both sides
    micro_batch: int = 64  # completions per forward/backward (TRL: per_device_train_batch_size)
    lr: float = 1e-3  # AdamW learning rate, constant
    threads: int = 1  # torch threads per run
    lp_tokens: int = 2048  # log-prob memory check: B*T positions (B = 2)
    lp_hidden: int = 64  # ... hidden size
    lp_vocab: int = 151936  # ... vocabulary (Qwen2.5's)
    lp_chunk: int = 256  # ... positions per chunk of logits
    json: str = ""  # also write the results here
    child: str = ""  # internal: the one run this process does
    model_dir: str = ""  # internal: where the tiny model was saved
    turns: str = ""  # internal: "read_fd,write_fd" of the lockstep pipes


def parse_args(argv):
    args, it = Args(), iter(argv)
    for flag in it:
        if flag in ("-h", "--help"):
            sys.exit(print(__doc__, "options (the fields of Args in bench.py):", *Args.__dataclass_fields__))
        name = flag[2:]
        if not flag.startswith("--") or name not in Args.__dataclass_fields__:
            sys.exit(f"bench.py: unknown argument {flag} (the fields of Args in bench.py are the options)")
        setattr(args, name, type(getattr(args, name))(next(it)))
    return args


def peak_rss_mb():
    """This process's peak resident set size (VmHWM), in MB."""
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))


def report(result):  # a child's answer: one line of its stdout
    print("RESULT " + json.dumps({**result, "peak_rss_mb": peak_rss_mb()}), flush=True)


class Turns:
    """A run's side of the lockstep: take() blocks until the driver hands it the turn, give() hands it back."""

    def __init__(self, spec):
        self.fds, self.started = tuple(map(int, spec.split(","))) if spec else None, False

    def take(self):
        if self.fds and not self.started:  # the first give() says: started up, idle
            self.started = True
            self.give()
        if self.fds and os.read(self.fds[0], 1) != b".":
            sys.exit("bench.py: the driver is gone")

    def give(self):
        if self.fds:
            os.write(self.fds[1], b".")


# ----------------------------------------------------------------------------
# the runs, each in its own process


def run_ours(a, method, turns):
    """train.py's own main(), with EOS suppressed, in lockstep, each stage of the step timed."""
    import torch
    import rollout
    import train

    config = rollout.HFEngine._config
    def fixed_length(self, max_new_tokens, temperature, top_p):
        cfg = config(self, max_new_tokens, temperature, top_p)
        cfg.min_new_tokens = max_new_tokens  # the same work as TRL: no completion stops early
        return cfg
    rollout.HFEngine._config = fixed_length

    steps = []  # per training step: its seconds, and seconds per stage
    def timed(stage, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if steps:  # not before the first rollout (the teachers are scored at load time)
                steps[-1][stage] = steps[-1].get(stage, 0.0) + time.perf_counter() - t0
            return out
        return wrapper
    generate, sync = rollout.HFEngine.generate, rollout.HFEngine.sync_weights
    def step_start(self, prompts, n, *rest, **kwargs):  # stage 1, where a step starts
        if n != a.group:  # held-out evaluation, outside the step
            return generate(self, prompts, n, *rest, **kwargs)
        turns.take()
        steps.append({"step_s": time.perf_counter()})
        return timed("rollout", generate)(self, prompts, n, *rest, **kwargs)
    def step_end(self, model):  # stage 8, the last of the step's work; a log line follows
        timed("weight sync", sync)(self, model)
        steps[-1]["step_s"] = time.perf_counter() - steps[-1]["step_s"]
        if len(steps) < a.steps:  # after the last step, the run keeps the turn until it exits
            turns.give()
    rollout.HFEngine.generate, rollout.HFEngine.sync_weights = step_start, step_end
    train.reward = timed("reward", train.reward)
    train.build_batch = timed("gate, SSI, advantages, pack", train.build_batch)
    train.sequence_logprobs = timed("old log-probs", train.sequence_logprobs)
    train.batch_loss = timed("loss forward", train.batch_loss)
    torch.Tensor.backward = timed("loss backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = timed("grad clip", torch.nn.utils.clip_grad_norm_)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step)

    out = os.path.join(os.path.dirname(a.model_dir), f"out_{method}")
    train.main(["--model", a.model_dir, "--method", method, "--max_steps", str(a.steps), "--out_dir", out,
                "--group_size", str(a.group), "--batch_prompts", str(a.prompts), "--micro_batch", str(a.micro_batch),
                "--max_new_tokens", str(a.new_tokens), "--lr", str(a.lr), "--rollout", "hf",
                "--eval_problems", "1", "--save_every", str(10**9), "--no-progress"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    for s, row in zip(steps, rows):
        s["completion_len"] = row["train/response_len"]
    report({"steps": steps[a.warmup:], "threads": torch.get_num_threads()})  # and exit, holding the turn


def run_trl(a, turns):
    """TRL's GRPOTrainer with our reward, our prompts and the same settings; a callback clocks the steps."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import data
    from reward import reward

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    problems, _ = data.load_problems("builtin", "train")
    prompts = datasets.Dataset.from_dict({"prompt": [data.render_prompt(tok, p.prompt) for p in problems],
                                          "answer": [p.answer for p in problems]})
    lengths, steps = [], []

    def correct(completions, answer, completion_ids, **_):
        lengths.extend(len(c) for c in completion_ids)
        return [reward(c, ans) for c, ans in zip(completions, answer)]

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            turns.take()
            steps.append({"step_s": time.perf_counter()})

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1]["step_s"] = time.perf_counter() - steps[-1]["step_s"]
            steps[-1]["completion_len"] = statistics.mean(lengths[-a.prompts * a.group:])
            if state.global_step < a.steps:
                turns.give()
                self.on_train_begin()

    cfg = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(a.model_dir), "out_trl"), max_steps=a.steps, seed=0,
        per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=a.prompts * a.group // a.micro_batch,
        num_generations=a.group, max_completion_length=a.new_tokens,
        generation_kwargs={"min_new_tokens": a.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=a.lr, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dapo", num_iterations=1,
        bf16=False, gradient_checkpointing=False, use_vllm=False, use_cpu=True,
        report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True)
    GRPOTrainer(model=model, reward_funcs=correct, args=cfg, train_dataset=prompts, processing_class=tok,
                callbacks=[Clock()]).train()
    report({"steps": steps[a.warmup:], "threads": torch.get_num_threads()})  # and exit, holding the turn


def run_logprobs(a, kind):
    """Peak memory of per-token log-probs, forward and backward, over [B, T, V] = [2, lp_tokens / 2, lp_vocab]."""
    import torch
    from loss import hidden_logprobs

    torch.manual_seed(0)
    B, T = 2, a.lp_tokens // 2
    hidden = torch.randn(B, T, a.lp_hidden, requires_grad=True)  # [B, T, H]
    weight = (0.02 * torch.randn(a.lp_vocab, a.lp_hidden)).requires_grad_()  # [V, H]
    targets = torch.randint(a.lp_vocab, (B, T))  # [B, T]
    advantages = torch.randn(B, 1)  # [B, 1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: only the forward+backward below counts
    base, t0 = peak_rss_mb(), time.perf_counter()
    if kind == "chunked":
        logp = hidden_logprobs(hidden, weight, targets, a.lp_chunk)  # [B, T]
    else:
        logp = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    (-(advantages * logp).mean()).backward()
    report({"extra_mb": peak_rss_mb() - base, "seconds": time.perf_counter() - t0})


# ----------------------------------------------------------------------------
# the driver


def start(a, kind, in_lockstep):
    """Start `python bench.py --child KIND`; its output goes to files (a full pipe would block it)."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", kind, "--model_dir", a.model_dir]
    argv += [x for f in dataclasses.fields(Args) if f.name not in ("child", "json", "model_dir", "turns")
             for x in (f"--{f.name}", str(getattr(a, f.name)))]
    go, done = os.pipe(), os.pipe()
    if in_lockstep:
        argv += ["--turns", f"{go[0]},{done[1]}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, cwd=HERE, env=env, stdout=out, stderr=err, pass_fds=(go[0], done[1]), text=True)
    os.close(go[0]), os.close(done[1])  # so that a run's exit reads as end-of-file
    return {"kind": kind, "proc": proc, "out": out, "err": err, "go": go[1], "done": done[0]}


def finish(run):
    """Wait for a run and return its RESULT; if it failed, exit with the end of its stderr."""
    run["proc"].wait()
    run["out"].seek(0), run["err"].seek(0)
    results = [line[7:] for line in run["out"] if line.startswith("RESULT ")]
    if run["proc"].returncode != 0 or not results:
        sys.exit(f"bench.py: the {run['kind']} run failed:\n{run['err'].read()[-3000:]}")
    return json.loads(results[-1])


def lockstep(a):
    """The three runs, one step each in turn; returns {kind: result}."""
    runs, results, t0 = [start(a, kind, in_lockstep=True) for kind in RUNS], {}, time.time()
    try:
        for turn in range(-1, a.steps):  # turn -1: until every run has started up
            for run in runs[turn % 3:] + runs[:turn % 3]:  # rotated: no run always follows the same one
                if run["kind"] in results:
                    continue
                if turn >= 0:
                    os.write(run["go"], b".")
                if os.read(run["done"], 1) != b".":  # it exited: after its last step, or it failed
                    results[run["kind"]] = finish(run)
            if turn >= 0:
                print(f"step {turn + 1}/{a.steps} of each run done ({time.time() - t0:.0f}s)", flush=True)
        return results
    finally:  # on a failure, stop the others
        for run in runs:
            if run["proc"].poll() is None:
                run["proc"].kill()


def summary(result, a):
    steps = [s["step_s"] for s in result["steps"]]
    median = statistics.median(steps)
    return {"step_s": median, "tokens_per_s": a.prompts * a.group * a.new_tokens / median,
            "peak_rss_mb": result["peak_rss_mb"], "torch_threads": result["threads"],
            "completion_len": statistics.mean(s["completion_len"] for s in result["steps"]),
            "steps_s": [round(s, 3) for s in steps]}


def main(a):
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        sys.exit("bench.py: TRL is not installed: pip install -r requirements-bench.txt")
    import tiny
    t0, load, tmp = time.time(), [os.getloadavg()[0]], tempfile.TemporaryDirectory(prefix="bench_")
    a.model_dir = os.path.join(tmp.name, "tiny")  # the runs write their outputs next to it
    tok = tiny.make_tokenizer()
    tiny.make_model(tok).save_pretrained(a.model_dir), tok.save_pretrained(a.model_dir)
    runs = lockstep(a)
    load.append(os.getloadavg()[0])
    ours, trl, hapo = summary(runs["ours:grpo"], a), summary(runs["trl"], a), summary(runs["ours:hapo"], a)
    profile = {}  # stage medians, like the steps': robust to a step slowed by another program
    for m in ("grpo", "hapo"):
        steps = runs[f"ours:{m}"]["steps"]
        profile[m] = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in STAGES}
        profile[m]["other (decode, ...)"] = statistics.median(s["step_s"] - sum(s.get(k, 0.0) for k in STAGES)
                                                              for s in steps)
    mem = {kind: finish(start(a, f"logprobs:{kind}", in_lockstep=False)) for kind in ("naive", "chunked")}
    res = {"ours": ours, "trl": trl, "hapo": hapo, "ratio_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
           "ratio_peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"],
           "hapo_overhead": hapo["step_s"] / ours["step_s"] - 1,
           "profile": profile, "load_average": load, "cpus": os.cpu_count(), "seconds": time.time() - t0,
           "logprob_memory": {"naive_mb": mem["naive"]["extra_mb"], "chunked_mb": mem["chunked"]["extra_mb"],
                              "naive_s": mem["naive"]["seconds"], "chunked_s": mem["chunked"]["seconds"],
                              "one_chunk_mb": a.lp_chunk * a.lp_vocab * 4 / 2**20,
                              "all_logits_mb": a.lp_tokens * a.lp_vocab * 4 / 2**20},
           "settings": {k: v for k, v in dataclasses.asdict(a).items()
                        if k not in ("child", "model_dir", "turns", "json")}}
    print_table(res, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")


def print_table(r, a):
    print(f"\n{a.prompts} prompts x {a.group} completions x {a.new_tokens} tokens per step, {a.threads} torch "
          f"thread(s) per run; medians over steps {a.warmup + 1}-{a.steps} of each run")
    print(f"{'system':22s} {'step s':>7s} {'tokens/s':>9s} {'peak RSS MB':>12s} {'completion len':>15s}")
    for name, s in (("ours (--method grpo)", r["ours"]), ("TRL GRPOTrainer", r["trl"]),
                    ("ours (--method hapo)", r["hapo"])):
        print(f"{name:22s} {s['step_s']:7.3f} {s['tokens_per_s']:9.0f} {s['peak_rss_mb']:12.0f} "
              f"{s['completion_len']:15.1f}")
    print(f"ours/TRL: tokens/s x{r['ratio_tokens_per_s']:.2f}, peak RSS x{r['ratio_peak_rss']:.2f}; "
          f"HAPO step over GRPO step: {100 * r['hapo_overhead']:+.1f}%")
    if max(r["load_average"]) > r["cpus"]:
        print(f"note: load average up to {max(r['load_average']):.1f} on {r['cpus']} CPUs: other programs shared "
              "the machine; the lockstep shares their load out evenly, but every figure is noisier")
    print("\nwhere our step goes (seconds, median over the measured steps)")
    total = sum(r["profile"]["grpo"].values())
    for stage, g in r["profile"]["grpo"].items():
        print(f"  {stage:30s} grpo {g:6.3f} ({100 * g / total:4.1f}%)   hapo {r['profile']['hapo'][stage]:6.3f}")
    m = r["logprob_memory"]
    print(f"\nlog-probs over [2, {a.lp_tokens // 2}, {a.lp_vocab}] (H = {a.lp_hidden}), forward + backward, peak RSS "
          f"above the inputs: naive log_softmax {m['naive_mb']:.0f} MB ({m['naive_s']:.1f}s), chunked "
          f"({a.lp_chunk} positions) {m['chunked_mb']:.0f} MB ({m['chunked_s']:.1f}s); one chunk of fp32 logits "
          f"{m['one_chunk_mb']:.0f} MB, all of them {m['all_logits_mb']:.0f} MB")


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    sys.path.insert(0, HERE)
    if not args.child:
        main(args)
    elif args.child == "trl":
        run_trl(args, Turns(args.turns))
    elif args.child.startswith("ours:"):
        run_ours(args, args.child[5:], Turns(args.turns))
    else:
        run_logprobs(args, args.child.split(":")[1])
