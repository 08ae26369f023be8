"""Evaluation: avg@k and pass@1 per benchmark (the paper's Table 1), with training's engines and reward.

    python eval.py --model out/step_000500 --benchmarks data/valid.all.parquet --out_dir out/eval
    python eval.py --model tiny --benchmarks builtin --k 4 --max_new_tokens 48 --out_dir out/eval_tiny

--model is a hub id, a local save_pretrained directory, a training out_dir (its `latest`
checkpoint), or `tiny`. Each benchmark file is `.jsonl` (`problem`, `answer`) or LUFFY's parquet
layout (`prompt` messages, `reward_model.ground_truth`, `data_source`); a file is split into one
benchmark per `data_source` (the file's stem when there is none). Sampling follows the paper:
temperature 0.6, top-p 1.0, up to 8,192 new tokens, k = 32 samples per problem for sets under 100
problems (AIME, AMC) and 1 otherwise, unless --k says otherwise.

Writes DIR/samples.jsonl (one line per sample, appended as each batch of problems finishes) and
DIR/summary.json, and prints a markdown table. Rerunning the same command resumes: problems whose
k samples are already in samples.jsonl are not generated again and count in the summary.
train.py calls the same `evaluate` (below) for its in-loop evaluation, so both report the same numbers.
"""

import argparse
import dataclasses
import json
import os
import sys

import torch

from lib import data, task
from lib.data import DataError
from lib.models import check_positions, load_config, load_model, position_overrides, resolve_model
from reward import CHECKERS, check_checker, extract_boxed, reward

# ----------------------------------------------------------------------------
# metrics: pure functions of the 0/1 rewards, one list per problem


def avg_at_k(rewards: list[list[float]]) -> float:
    """avg@k: the mean reward over every sample of every problem (the paper's AIME column)."""
    flat = [r for per_problem in rewards for r in per_problem]
    return sum(flat) / len(flat) if flat else 0.0


def pass_at_1(rewards: list[list[float]]) -> float:
    """pass@1: the mean over problems of the fraction of correct samples, c_i / k_i.

    With k samples per problem this is the unbiased pass@1 estimator (Chen et al., 2021: pass@k
    = E[1 - C(k-c, m) / C(k, m)] with m = 1 is c / k), and it equals avg@k; with k = 1 it is
    plain accuracy. Both names are kept because the paper reports each column under its own.
    """
    rewards = [r for r in rewards if r]
    return sum(sum(r) / len(r) for r in rewards) / len(rewards) if rewards else 0.0


def default_k(n_problems: int) -> int:
    """The paper's protocol: avg@32 for AIME-sized sets (under 100 problems), else one sample."""
    return 32 if n_problems < 100 else 1


# ----------------------------------------------------------------------------
# the evaluation itself (train.py calls this too)


def evaluate(engine, tokenizer, problems, k=1, temperature=0.6, max_new_tokens=8192, top_p=1.0,
             seed=0, batch_prompts=64, on_sample=None, progress=False, checker="hapo") -> dict:
    """Sample k completions per problem, score each with reward.reward (Eq. 4), and summarise.

    Returns {"accuracy", "avg_at_k", "pass_at_1", "n_problems", "k", "samples"}; accuracy is the
    mean reward over all samples (= avg_at_k). `samples` holds one record per completion:
    benchmark (the problem's source), problem_id (index into `problems`), sample, answer,
    extracted (the last \\boxed{} content or None), reward, n_tokens, completion.
    `on_sample(records)` is called once per problem, with its k records, as each batch of
    `batch_prompts` problems finishes (eval.py appends them to samples.jsonl).

    Sampling runs on a forked torch RNG seeded with `seed`, so the caller's random streams are
    exactly as before: a training run that evaluates draws the same rollouts afterwards as one
    that does not, which exact resume relies on.
    """
    from tqdm import tqdm
    prompt_ids = encode_prompts(tokenizer, problems)
    records = []
    bar = tqdm(total=len(problems), unit="problem", disable=not progress or not problems,
               desc=(problems[0].source if problems else "") or "eval", dynamic_ncols=True)
    # manual_seed reseeds every GPU, so every GPU's state is saved and restored, not just this one's
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_prompts):
            chunk = range(start, min(start + batch_prompts, len(problems)))
            completions = engine.generate([prompt_ids[i] for i in chunk], k, max_new_tokens, temperature, top_p,
                                          seed=seed * 65537 + start * k)  # len(chunk) * k, grouped by prompt
            # (VLLMEngine seeds sample j of the chunk's prompt c seed + c * k + j: start * k keeps the chunks'
            # streams apart, one per sample of the whole evaluation)
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            for c, i in enumerate(chunk):
                group = [{"benchmark": problems[i].source, "problem_id": i, "sample": j,
                          "answer": problems[i].answer, "extracted": extract_boxed(texts[c * k + j]),
                          "reward": reward(texts[c * k + j], problems[i].answer, checker),
                          "n_tokens": len(completions[c * k + j]), "completion": texts[c * k + j]}
                         for j in range(k)]
                records += group
                if on_sample is not None:
                    on_sample(group)
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{avg_at_k([[r['reward'] for r in records]]):.3f}")
    bar.close()
    return {**summarize(records), "samples": records}


def summarize(records: list[dict]) -> dict:
    """accuracy, avg_at_k, pass_at_1, n_problems and k from per-sample records of one benchmark."""
    by_problem = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r["reward"])
    rewards = list(by_problem.values())
    acc = avg_at_k(rewards)
    return {"accuracy": acc, "avg_at_k": acc, "pass_at_1": pass_at_1(rewards),
            "n_problems": len(rewards), "k": max((len(r) for r in rewards), default=0)}


def load_benchmarks(paths: list[str]) -> dict[str, list[data.Problem]]:
    """{benchmark name: problems in file order}, a name per data_source, else the file's stem."""
    out, origin = {}, {}
    for path in paths:
        split = "eval" if task.is_builtin(path) else "test"  # files ignore the split
        problems, stats = data.load_problems(path, split, need_solution=False)
        skipped = {k: v for k, v in stats.items() if k.startswith("skipped") and v}
        if skipped:  # they would silently shrink the benchmark, so say so
            print(f"eval.py: warning: {path}: rows left out: {skipped}", file=sys.stderr)
        stem = os.path.splitext(os.path.basename(path))[0]
        for p in problems:
            name = p.source or stem
            if origin.setdefault(name, path) != path:
                raise DataError(f"benchmark '{name}' is in both {origin[name]} and {path}; "
                                "rename one of the files")
            out.setdefault(name, []).append(dataclasses.replace(p, source=name))
    return out


def encode_prompts(tokenizer, problems) -> list[list[int]]:
    """The token ids of each problem's rendered prompt, as the engines get them."""
    # add_special_tokens=False: a chat template writes its special tokens as text; no stray BOS.
    return [tokenizer(data.render_prompt(tokenizer, p.prompt), add_special_tokens=False)["input_ids"]
            for p in problems]


def drop_long_prompts(tokenizer, problems, limit):
    """(problems whose rendered prompt is at most `limit` tokens, how many were left out)."""
    kept = [p for p, ids in zip(problems, encode_prompts(tokenizer, problems)) if len(ids) <= limit]
    return kept, len(problems) - len(kept)


# ----------------------------------------------------------------------------
# the command line: benchmarks, model, resume, output


def fail(msg):
    """A user error: one line on stderr and exit code 2, never a traceback."""
    print(f"eval.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_samples(path: str) -> dict[tuple, dict]:
    """{(benchmark, problem_id, sample): record} from samples.jsonl; a line cut by a kill is
    skipped, and a later line for the same sample wins."""
    done = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            try:
                r = json.loads(line)
                done[(r["benchmark"], r["problem_id"], r["sample"])] = r
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def check_settings(out_dir: str, settings: dict):
    """Refuse to resume into samples drawn with other sampling settings; record them otherwise."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path) and os.path.exists(os.path.join(out_dir, "samples.jsonl")):
        old = json.load(open(path))
        diff = [f"{k} {old.get(k)!r} != {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            fail(f"{out_dir} holds samples drawn with other settings ({', '.join(diff)}); "
                 "use another --out_dir or delete its samples.jsonl")
    json.dump(settings, open(path, "w"), indent=1)


def markdown_table(summary: dict) -> str:
    rows = ["| benchmark | problems | k | avg@k (%) | pass@1 (%) |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {b} | {s['n_problems']} | {s['k']} | {100 * s['avg_at_k']:.1f} | "
             f"{100 * s['pass_at_1']:.1f} |" for b, s in summary.items()]
    return "\n".join(rows)


def parse_args(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the usage screen
            fail(f"{message} (see --help)")
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub id, local dir, training out_dir, or 'tiny'")
    p.add_argument("--benchmarks", nargs="+", required=True, help=".jsonl/.parquet files, or 'builtin'")
    p.add_argument("--out_dir", required=True, help="summary.json and samples.jsonl go here")
    p.add_argument("--k", type=int, help="samples per problem (default: 32 below 100 problems, else 1)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    p.add_argument("--rollout", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--batch_prompts", type=int, default=64, help="problems per generate() call")
    p.add_argument("--max_prompt_tokens", type=int, default=1024, help="longer prompts are left out (counted)")
    p.add_argument("--checker", default="hapo", choices=CHECKERS,
                   help="answer checker: reward.py's own, or math-verify's (as published tables were scored)")
    p.add_argument("--gpu_memory", type=float, default=0.85, help="fraction of GPU memory vLLM may take")
    p.add_argument("--max_positions", type=int, default=0, help=">0: override the model's max_position_embeddings")
    p.add_argument("--rope_theta", type=float, default=0.0, help=">0: override the model's RoPE base")
    args = p.parse_args(argv)
    if (args.k is not None and args.k < 1) or (args.limit is not None and args.limit < 1) or \
            min(args.max_new_tokens, args.batch_prompts, args.max_prompt_tokens) < 1:
        p.error("--k, --limit, --max_new_tokens, --batch_prompts and --max_prompt_tokens must be at least 1")
    if args.max_positions < 0 or args.rope_theta < 0:
        p.error("--max_positions and --rope_theta must be >= 0")
    try:
        check_checker(args.checker)
    except (ValueError, ImportError) as e:
        p.error(f"--checker: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # our own bars and log lines say enough
    from rollout import make_engine, resolve_engine
    try:
        kind, why = resolve_engine(args.rollout)
        model_path = resolve_model(args.model)
        benchmarks = load_benchmarks(args.benchmarks)
        positions = dict(rope_theta=args.rope_theta, max_positions=args.max_positions)
        config = load_config(model_path, **positions)
        model, tok = load_model(model_path, need_weights=kind != "vllm", **positions)
    except (DataError, ImportError) as err:
        fail(str(err))
    dropped = {}
    for name, problems in benchmarks.items():  # a prompt too long to sample would fail the whole run
        benchmarks[name], dropped[name] = drop_long_prompts(tok, problems, args.max_prompt_tokens)
        if dropped[name]:
            print(f"eval.py: warning: {name}: {dropped[name]} problem(s) with prompts over --max_prompt_tokens "
                  f"{args.max_prompt_tokens} left out", file=sys.stderr)
    # the longest sequence, from the prompts kept (as train.py does): vLLM's max_model_len too
    prompt_len = max((len(ids) for ps in benchmarks.values() for ids in encode_prompts(tok, ps[:args.limit])),
                     default=0)
    try:
        check_positions(config, {f"the longest prompt, {prompt_len}, + --max_new_tokens {args.max_new_tokens}":
                                 prompt_len + args.max_new_tokens})
    except DataError as err:
        fail(str(err))
    os.makedirs(args.out_dir, exist_ok=True)
    check_settings(args.out_dir, {"model": args.model if args.model == "tiny" else model_path,
                                  "temperature": args.temperature, "top_p": args.top_p,
                                  "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": args.max_prompt_tokens,
                                  "checker": args.checker, **{k: v for k, v in positions.items() if v}})
    print(f"rollout engine: {kind} ({why})")
    use_vllm = kind == "vllm"
    if model is not None and torch.cuda.is_available() and not use_vllm:
        model.to("cuda")
    try:
        engine = make_engine(args.rollout, model, tok, model_path, max_batch=64, seed=args.seed,
                             gpu_memory_utilization=args.gpu_memory, max_model_len=prompt_len + args.max_new_tokens,
                             hf_overrides=position_overrides(config, args.rope_theta, args.max_positions))
    except (ImportError, ValueError) as e:  # --rollout vllm without vllm, or vLLM's own refusal
        fail(str(e))

    # Resume: keep every finished problem's records, rewrite the file without the rest, append.
    samples_path = os.path.join(args.out_dir, "samples.jsonl")
    done, plan = read_samples(samples_path), {}
    for name, problems in benchmarks.items():
        k = args.k or default_k(len(problems))
        problems = problems[:args.limit]
        finished = [all(done.get((name, i, j), {}).get("answer") == p.answer for j in range(k))
                    for i, p in enumerate(problems)]
        plan[name] = (k, problems, finished)
    redo = {(b, i) for b, (_, _, fin) in plan.items() for i, f in enumerate(fin) if not f}
    with open(samples_path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for key, r in done.items() if key[:2] not in redo)
    os.replace(samples_path + ".tmp", samples_path)

    summary = {}
    with open(samples_path, "a", encoding="utf-8") as out:
        for name, (k, problems, finished) in plan.items():
            todo = [i for i, f in enumerate(finished) if not f]
            kept = [done[(name, i, j)] for i, f in enumerate(finished) if f for j in range(k)]
            if len(todo) < len(problems):
                print(f"{name}: {len(problems) - len(todo)} of {len(problems)} problems already in "
                      f"{samples_path}")
            new = []

            def write(group):  # problem_id: the index in `todo` -> the index in the benchmark
                group = [{**r, "problem_id": todo[r["problem_id"]]} for r in group]
                out.writelines(json.dumps(r) + "\n" for r in group)
                out.flush()
                new.extend(group)
            evaluate(engine, tok, [problems[i] for i in todo], k=k, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, top_p=args.top_p, seed=args.seed,
                     batch_prompts=args.batch_prompts, on_sample=write, progress=True, checker=args.checker)
            s = summarize(kept + new)
            summary[name] = {"n_problems": s["n_problems"], "k": k, "avg_at_k": s["avg_at_k"],
                             "pass_at_1": s["pass_at_1"], "dropped_long_prompt": dropped[name]}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown_table(summary))
    return summary


if __name__ == "__main__":
    main()
