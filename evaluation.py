"""Evaluation: sample k completions per problem, score them with reward.py, and summarise.

avg@k and pass@1 per benchmark (the paper's Table 1). train.py's in-loop evaluation and eval.py's
command both call `evaluate`, so they report the same numbers.
"""

import dataclasses
import os
import sys

import torch

import data
import task
from data import DataError
from reward import extract_boxed, reward

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
