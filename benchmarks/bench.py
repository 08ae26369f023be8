"""Benchmark: this project's training step against TRL's GRPOTrainer on the same work, in one run.

    pip install -r benchmarks/requirements.txt   # TRL and datasets: only this file needs them
    python benchmarks/bench.py                   # ~8 minutes on 2 CPU cores; prints the tables
    python benchmarks/bench.py --json bench.json # and writes them as JSON

Three measurements, each side in its own process (so peak memory, VmHWM, is its own), one torch
thread each, in lockstep: a step of each side in turn, the other waiting, so load from other
programs and drift hit both alike.

1. fixed: the whole loop on the built-in tiny Qwen2 (random weights): 16 prompts x 8 completions of
   exactly `new_tokens` tokens (EOS is never produced on either side), reward, advantages, one AdamW
   update. Ours with --method grpo, TRL's GRPOTrainer, ours with --method hapo; our step is the
   train.py stages called one by one through their public functions, each timed (the profile).
2. realistic: the training step alone on recorded batches with a real run's length spread: per
   prompt 8 trajectories, the policy's long-tailed (log-normal) and one teacher row per group 2-3x
   longer than the group's median, as HAPO injects them. The same rows, advantages and tokens on both
   sides; ours sorts rows by length and cuts micro-batches under a token budget (--micro_batch_tokens),
   TRL pads every micro-batch to the batch's longest prompt and completion, as its trainer does.
   Reported: training tokens/s (real tokens), peak memory, padding waste (padded / real tokens - 1).
3. log-prob memory: forward + backward of per-token log-probs over Qwen's 151,936-token vocabulary:
   a naive log_softmax, the checkpointed chunks this project used before, and loss.hidden_logprobs.
"""

import dataclasses
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


@dataclass
class Args:
    steps: int = 20  # fixed: optimizer steps per run
    warmup: int = 3  # first steps of each run left out of the medians
    prompts: int = 16  # prompts per step
    group: int = 8  # completions per prompt
    new_tokens: int = 48  # fixed: tokens per completion on both sides
    micro_batch: int = 64  # fixed: completions per forward/backward (TRL: per_device_train_batch_size)
    lr: float = 1e-3  # AdamW learning rate, constant
    real_steps: int = 4  # realistic: recorded batches (the first is warm-up)
    real_median: int = 120  # realistic: median policy response length (log-normal, sigma 0.8)
    real_max: int = 768  # realistic: longest policy response (max_new_tokens)
    real_budget: int = 8192  # realistic: our --micro_batch_tokens
    real_pack: int = 0  # realistic: 1 adds our --pack (on a CPU, sdpa masks a packed row densely: quadratic)
    real_trl_micro: int = 16  # realistic: TRL's per_device_train_batch_size
    lp_tokens: int = 1024  # log-prob memory: B*T positions (B = 2)
    lp_chunk: int = 256  # ... positions per chunk of logits
    json: str = ""  # also write the results here
    child: str = ""  # internal: the one run this process does
    model_dir: str = ""  # internal: where the tiny models were saved
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
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


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


def step_cfg(a, **kw):
    """The train.Config fields update.optimize reads, at the benchmark's settings."""
    import train
    return dataclasses.replace(train.Config(), lr=a.lr, micro_batch=a.micro_batch, max_new_tokens=a.new_tokens, **kw)


# ----------------------------------------------------------------------------
# 1. fixed: the whole loop


def run_ours_fixed(a, method, turns):
    """train.py's stages through their public functions, each timed; EOS is never produced."""
    import torch
    from types import SimpleNamespace
    import hapo
    import update
    from lib import data
    from lib.models import load_model
    from lib.parallel import Dist, Policy
    from reward import reward
    from rollout import HFEngine

    model, tok = load_model(os.path.join(a.model_dir, "fixed"), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # else generate() would fill the engine's "no EOS" from it
    engine = HFEngine(model, SimpleNamespace(eos_token_id=None, pad_token_id=tok.pad_token_id))  # no EOS to stop on
    problems, teacher_ok, _, _ = data.training_set("builtin", "", tok, 1024, 8192, 1, reward)
    cfg, dist, policy = step_cfg(a, method=method), Dist(), Policy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    n, steps = hapo.rollouts_per_group(method, a.group), []
    clock = lambda: time.perf_counter()
    for step in range(a.steps):
        turns.take()
        t, s = {}, clock()
        idx = data.batch_indices(len(problems), step * a.prompts, a.prompts, 0)
        completions = engine.generate([problems[i].prompt_ids for i in idx], n, a.new_tokens, 1.0)
        t["rollout"] = clock() - s
        assert all(len(c) == a.new_tokens for c in completions), "a completion stopped early"
        s = clock()
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        groups = [hapo.Group(problems[i].prompt_ids, completions[g * n:(g + 1) * n],
                             [reward(x, problems[i].answer) for x in texts[g * n:(g + 1) * n]],
                             problems[i].solution_ids, teacher_ok[i]) for g, i in enumerate(idx)]
        t["reward"], s = clock() - s, clock()
        opened, conf = hapo.gate_groups(groups, method, 0.8)
        trained = hapo.inject(groups, opened, method)
        batch = hapo.pack(trained, hapo.advantages(trained), tok.pad_token_id)
        t["gate, SSI, advantages, pack"], s = clock() - s, clock()
        update.optimize(policy, opt, batch, cfg, dist, lr=a.lr)
        t["loss, backward, optimizer"], s = clock() - s, clock()
        engine.sync_weights(model)
        t["weight sync"] = clock() - s
        steps.append({"step_s": sum(t.values()), "stages": t, "tokens": sum(map(len, completions))})
        if step + 1 < a.steps:
            turns.give()
    report({"steps": steps[a.warmup:], "threads": torch.get_num_threads()})  # and exit, holding the turn


# ----------------------------------------------------------------------------
# 2. realistic: recorded batches with a real length spread, the training step alone


def recorded_batches(a):
    """The same list of groups in every process: prompts of 20-60 tokens; per prompt 7 policy rows of
    log-normal length (median real_median, capped at real_max) and one teacher row 2-3x the group's
    median; rewards 1 for the teacher and 1 in 4 of the rest."""
    import hapo
    rng, out = random.Random(1234), []
    tokens = lambda k: [rng.randrange(1, 257) for _ in range(k)]
    for _ in range(a.real_steps):
        groups = []
        for _ in range(a.prompts):
            lengths = [min(a.real_max, max(4, int(rng.lognormvariate(math.log(a.real_median), 0.8))))
                       for _ in range(a.group - 1)]
            teacher = int(statistics.median(lengths) * rng.uniform(2, 3))
            rows, rewards = [tokens(k) for k in lengths] + [tokens(teacher)], [float(rng.random() < 0.25)
                                                                             for _ in lengths] + [1.0]
            groups.append(hapo.Group(tokens(rng.randrange(20, 61)), rows, rewards, teacher_at=a.group - 1))
        out.append(groups)
    return out


def run_ours_realistic(a, turns):
    import torch
    import hapo, update
    from lib.models import load_model
    from lib.parallel import Dist, Policy
    model, _ = load_model(os.path.join(a.model_dir, "realistic"), dtype=torch.float32)
    cfg = step_cfg(a, micro_batch_tokens=a.real_budget, pack=bool(a.real_pack))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    steps, batches = [], recorded_batches(a)
    for b, groups in enumerate(batches):
        turns.take()
        t = time.perf_counter()
        batch = hapo.pack(groups, hapo.advantages(groups), 0)
        update.optimize(Policy(model), opt, batch, cfg, Dist(), lr=a.lr)
        steps.append({"step_s": time.perf_counter() - t, "tokens": int(batch.attention_mask.sum()),
                      "processed": sum(mb.input_ids.numel() for mb in update.micro_batches(batch, cfg)[0])})
        if b + 1 < len(batches):
            turns.give()
    report({"steps": steps[1:]})  # and exit, holding the turn


# ----------------------------------------------------------------------------
# 3. log-prob memory at Qwen's vocabulary


def run_logprobs(a, kind):
    """Peak memory and time of forward + backward over [B, T, V] = [2, lp_tokens / 2, 151936], H = 64."""
    import torch
    from torch.utils.checkpoint import checkpoint
    from loss import hidden_logprobs

    def chunk(h, w, t):  # the previous implementation: each chunk's logits recomputed by autograd
        z = (h @ w.t()).float()
        return z.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)
    torch.manual_seed(0)
    B, T, V = 2, a.lp_tokens // 2, 151936
    hidden = torch.randn(B, T, 64, requires_grad=True)  # [B, T, H]
    weight = (0.02 * torch.randn(V, 64)).requires_grad_()  # [V, H]
    targets = torch.randint(V, (B, T))  # [B, T]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: only the forward+backward below counts
    base, t0 = peak_rss_mb(), time.perf_counter()
    if kind == "naive":
        logp = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    elif kind == "checkpointed":
        flat, tgt = hidden.reshape(B * T, 64), targets.reshape(B * T)
        logp = torch.cat([checkpoint(chunk, flat[i:i + a.lp_chunk], weight, tgt[i:i + a.lp_chunk], use_reentrant=False)
                          for i in range(0, B * T, a.lp_chunk)])
    else:
        logp = hidden_logprobs(hidden, weight, targets, a.lp_chunk)
    logp.sum().backward()
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, pass_fds=(go[0], done[1]), text=True)
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


def lockstep(a, kinds, steps):
    """Runs of `kinds`, one step each in turn (rotated order); returns {kind: result}."""
    runs, results, t0 = [start(a, kind, in_lockstep=True) for kind in kinds], {}, time.time()
    try:
        for turn in range(-1, steps):  # turn -1: until every run has started up
            for run in runs[turn % len(runs):] + runs[:turn % len(runs)]:
                if run["kind"] in results:
                    continue
                if turn >= 0:
                    os.write(run["go"], b".")
                if os.read(run["done"], 1) != b".":  # it exited: after its last step, or it failed
                    results[run["kind"]] = finish(run)
            if turn >= 0:
                print(f"{'/'.join(kinds)}: step {turn + 1}/{steps} of each run ({time.time() - t0:.0f}s)", flush=True)
        return results
    finally:  # on a failure, stop the others
        for run in runs:
            if run["proc"].poll() is None:
                run["proc"].kill()


def summary(result, tokens=None):
    steps = [s["step_s"] for s in result["steps"]]
    median = statistics.median(steps)
    tokens = tokens or statistics.mean(s["tokens"] for s in result["steps"])
    out = {"step_s": median, "tokens_per_s": tokens / median, "peak_rss_mb": result["peak_rss_mb"],
           "steps_s": [round(s, 3) for s in steps]}
    if "processed" in result["steps"][0]:
        out["padding_waste"] = statistics.mean(s["processed"] / s["tokens"] - 1 for s in result["steps"])
    return out


def main(a):
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        sys.exit("bench.py: TRL is not installed: pip install -r benchmarks/requirements.txt")
    from lib import tiny
    from transformers.utils import logging
    logging.disable_progress_bar()
    t0, load, tmp = time.time(), [os.getloadavg()[0]], tempfile.TemporaryDirectory(prefix="bench_")
    a.model_dir = tmp.name
    tok = tiny.make_tokenizer()
    for name, kw in (("fixed", {}), ("realistic", {"max_position_embeddings": 4096})):
        tiny.make_model(tok, **kw).save_pretrained(os.path.join(tmp.name, name))
        tok.save_pretrained(os.path.join(tmp.name, name))
    fixed = lockstep(a, ("ours:grpo", "trl", "ours:hapo"), a.steps)
    real = lockstep(a, ("real:ours", "real:trl"), a.real_steps)
    mem = {k: finish(start(a, f"logprobs:{k}", in_lockstep=False)) for k in ("naive", "checkpointed", "fused")}
    load.append(os.getloadavg()[0])
    work = a.prompts * a.group * a.new_tokens
    ours, trl, hapo = (summary(fixed[k], work) for k in ("ours:grpo", "trl", "ours:hapo"))
    profile = {m: {k: statistics.median(s["stages"][k] for s in fixed[f"ours:{m}"]["steps"])
                   for k in fixed[f"ours:{m}"]["steps"][0]["stages"]} for m in ("grpo", "hapo")}
    r_ours, r_trl = summary(real["real:ours"]), summary(real["real:trl"])
    res = {"ours": ours, "trl": trl, "hapo": hapo, "ratio_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
           "ratio_peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"], "hapo_overhead": hapo["step_s"] / ours["step_s"] - 1,
           "profile": profile,
           "realistic": {"ours": r_ours, "trl": r_trl, "ratio_tokens_per_s": r_ours["tokens_per_s"] / r_trl["tokens_per_s"],
                         "ratio_peak_rss": r_ours["peak_rss_mb"] / r_trl["peak_rss_mb"]},
           "logprob_memory": {k: {"extra_mb": v["extra_mb"], "seconds": v["seconds"]} for k, v in mem.items()},
           "load_average": load, "cpus": os.cpu_count(), "seconds": time.time() - t0,
           "settings": {k: v for k, v in dataclasses.asdict(a).items() if k not in ("child", "model_dir", "turns", "json")}}
    print_tables(res, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")


def print_tables(r, a):
    print(f"\nfixed: {a.prompts} prompts x {a.group} completions x {a.new_tokens} tokens per step, one torch thread "
          f"per run; medians over steps {a.warmup + 1}-{a.steps}")
    print(f"{'system':22s} {'step s':>7s} {'tokens/s':>9s} {'peak RSS MB':>12s}")
    for name, s in (("ours (--method grpo)", r["ours"]), ("TRL GRPOTrainer", r["trl"]), ("ours (--method hapo)", r["hapo"])):
        print(f"{name:22s} {s['step_s']:7.3f} {s['tokens_per_s']:9.0f} {s['peak_rss_mb']:12.0f}")
    print(f"ours/TRL: tokens/s x{r['ratio_tokens_per_s']:.2f}, peak RSS x{r['ratio_peak_rss']:.2f}; "
          f"HAPO step over GRPO step: {100 * r['hapo_overhead']:+.1f}%")
    print("where our step goes (median seconds)")
    for stage, g in r["profile"]["grpo"].items():
        print(f"  {stage:30s} grpo {g:6.3f}   hapo {r['profile']['hapo'][stage]:6.3f}")
    q = r["realistic"]
    print(f"\nrealistic: the training step on {a.real_steps - 1} recorded batches (median policy row {a.real_median}, "
          f"teacher rows 2-3x), ours --micro_batch_tokens {a.real_budget}{' --pack' * a.real_pack}, TRL micro-batches "
          f"of {a.real_trl_micro}")
    print(f"{'system':22s} {'step s':>7s} {'tokens/s':>9s} {'peak RSS MB':>12s} {'padding waste':>14s}")
    for name, s in (("ours", q["ours"]), ("TRL", q["trl"])):
        print(f"{name:22s} {s['step_s']:7.3f} {s['tokens_per_s']:9.0f} {s['peak_rss_mb']:12.0f} "
              f"{100 * s['padding_waste']:13.0f}%")
    print(f"ours/TRL: tokens/s x{q['ratio_tokens_per_s']:.2f}, peak RSS x{q['ratio_peak_rss']:.2f}")
    m = r["logprob_memory"]
    print(f"\nlog-probs over [2, {a.lp_tokens // 2}, 151936], forward + backward, peak RSS above the inputs: "
          + ", ".join(f"{k} {v['extra_mb']:.0f} MB ({v['seconds']:.1f} s)" for k, v in m.items()))
    if max(r["load_average"]) > r["cpus"]:
        print(f"note: load average up to {max(r['load_average']):.1f} on {r['cpus']} CPUs: other programs shared the "
              "machine; the lockstep shares their load out evenly, but every figure is noisier")


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if not args.child:
        main(args)
    elif args.child == "trl":
        from bench_trl import run_trl_fixed  # TRL's side, in a file of its own
        run_trl_fixed(args, Turns(args.turns))
    elif args.child.startswith("ours:"):
        run_ours_fixed(args, args.child[5:], Turns(args.turns))
    elif args.child == "real:ours":
        run_ours_realistic(args, Turns(args.turns))
    elif args.child == "real:trl":
        from bench_trl import run_trl_realistic
        run_trl_realistic(args, Turns(args.turns))
    else:
        run_logprobs(args, args.child.split(":")[1])
