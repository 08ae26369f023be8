"""Rollout speed of the two engines on the built-in tiny model: generated tokens per second.

    python benchmarks/rollout_speed.py                        # HF, and vLLM (fp32 and bf16) if installed
    python benchmarks/rollout_speed.py --engines hf vllm --dtypes bfloat16

One train.py-sized rollout batch (its defaults): 16 prompts of the built-in task x 8 samples x up to
64 new tokens at temperature 1. Each engine gets one warm-up call, then the best of --repeats timed
calls is reported (engine start-up is printed apart), per second of wall time and per second of this
process's CPU time: on a machine shared with other jobs the wall-clock figure swings by 2x between
runs, the CPU-time one much less. docs/VLLM.md records what this printed.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lib import data  # noqa: E402
from lib.models import load_model, resolve_model  # noqa: E402
from rollout import HFEngine, VLLMEngine  # noqa: E402
from lib.vllm_engine import installed_vllm_version  # noqa: E402


def timed(engine, prompts, args):
    """(best tokens per wall second, best tokens per CPU second, tokens of a call) over args.repeats
    calls, after one warm-up call."""
    engine.generate(prompts, args.n, args.max_new_tokens, 1.0)
    wall, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = sum(len(c) for c in engine.generate(prompts, args.n, args.max_new_tokens, 1.0))
        wall.append(tokens / (time.perf_counter() - t0))
        cpu.append(tokens / (time.process_time() - c0))
    return max(wall), max(cpu), tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="vLLM's dtypes")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    path = resolve_model("tiny")
    model, tok = load_model(path, dtype=torch.float32)
    problems = data.builtin_task(n_train=args.prompts, n_eval=1)[0]
    prompts = [e.prompt_ids for e in data.encode(tok, problems, None, None)[0]]
    print(f"{len(prompts)} prompts x {args.n} samples x <= {args.max_new_tokens} tokens, temperature 1, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    if "hf" in args.engines:
        torch.manual_seed(0)
        rows.append(("hf (transformers generate, fp32)", 0.0, *timed(HFEngine(model, tok), prompts, args)))
    if "vllm" in args.engines and installed_vllm_version():
        for dtype in args.dtypes:
            t0 = time.perf_counter()
            engine = VLLMEngine(path, tok, dtype=dtype, seed=0)
            rows.append((f"vllm {installed_vllm_version()} ({dtype})", time.perf_counter() - t0, *timed(engine, prompts, args)))
            del engine
    print("| engine | start-up (s) | tokens / wall s | tokens / CPU s | tokens per call |\n|---|---:|---:|---:|---:|")
    for name, start, wall, cpu, tokens in rows:
        print(f"| {name} | {start:.1f} | {wall:.0f} | {cpu:.0f} | {tokens} |")


if __name__ == "__main__":
    main()
