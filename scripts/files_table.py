"""Print the README's files table and reading path with today's line counts (the README's test checks both).

    python scripts/files_table.py            # print them
    python scripts/files_table.py --write    # and put them into README.md in place of the old ones
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHAT = {  # path -> what it holds; the order is the README's: the method at the root, then lib/
    "gate.py": "Eqs. 5-7 and Algorithm 1: confidence, gamma(t), the gate, SSI; Eq. 11's bound",
    "loss.py": "Eq. 2 advantages; fused chunked log-probs and entropy (never a [B, T, V] tensor); Eqs. 3, 8, 9",
    "hapo.py": "one HAPO step on groups: gate -> SSI (or LUFFY's N-1 + teacher) -> advantages -> batch -> loss; the methods",
    "update.py": "the update of a step: micro-batches by count or token budget, packing, pi_old, AdamW, non-finite guard",
    "train.py": "the config dataclass and the loop, numbered as Figure 1: rollout -> ... -> checkpoint",
    "launch.py": "what train.py does once before its first step: policy, data, positions, engine, FSDP2, optimizer, resume",
    "rollout.py": "the engines' contract and the HF engine (transformers `generate`, sampler log-probs)",
    "reward.py": "Eq. 4: the last `\\boxed{}`, normalised and compared; structure, labels, units, choice letters; checkers",
    "eval.py": "avg@k and pass@1, `evaluate` (train.py's too), and the command: the paper's Table 1, resumable",
    "test_hapo.py": "the suite's entry point: tier 1 by hand here, the rest from tests/",
    "conftest.py": "the suite's two speeds: `--all` adds tier 3 (the tests marked slow)",
    "lib/": "the machinery the loop calls, flat; it never imports from the root",
    "lib/data.py": "problems from `.jsonl`/`.parquet` (flat or OpenR1 layout), hub ids, the built-in task; tokens",
    "lib/task.py": "the built-in task: column sums, its teacher, the pairs the base model never saw",
    "lib/tiny.py": "the built-in model: byte-level tokenizer, tiny Qwen2, its pretraining (`python -m lib.tiny` rebuilds)",
    "lib/models.py": "loading a policy: hub id, local dir, training out_dir, or `tiny` (train.py and eval.py)",
    "lib/parallel.py": "distributed state as a value, metric reduction, FSDP2",
    "lib/checkpoint.py": "atomic sharded checkpoints (every rank writes its shard) + the save_pretrained export, exact resume, fallback, the out_dir lock, preemption",
    "lib/recipes.py": "the laptop and paper recipes, chosen by the model; the command line into the Config",
    "lib/plan.py": "will a run fit: memory per GPU, per node and on disk from config.json alone (`--plan`)",
    "lib/preflight.py": "before any weight is read: does the run fit this machine, and if not, what would",
    "lib/vllm_engine.py": "vLLM in the training process: in-place weight reload (tied heads), versions, CPU settings",
    "lib/weight_sync.py": "the trainer's weights as (checkpoint name, full tensor), one at a time, FSDP2 included",
    "lib/tracking.py": "metrics.jsonl, completions.jsonl, torn-line repair, optional trackers",
    "lib/latex.py": "the reward's TeX reader: fractions, matrices, Unicode, sets, inequalities, scientific notation, closed forms",
    "lib/symbolic.py": "the reward's sympy (and math-verify) in worker processes under a hard deadline",
    "lib/tiny_base/": "the shipped base model (3.2 MB) and its build record",
    "tests/": "the tiers' modules, the reward's case tables, child-process drivers, the 7B/1.5B configs (no weights)",
    "scripts/": "experiment.py (Figure 2, several seeds), plot.py (a picture of any run), grid.py (a setting per row, chosen on validation), probe.py, files_table.py",
    "benchmarks/": "bench.py (against TRL; its TRL side in bench_trl.py), rollout_speed.py, gpu_check.py, their requirements",
    "docs/": "ALGORITHM.md, RESULTS.md, EVIDENCE.md, BENCH.md, TESTING.md, REWARD.md, VLLM.md, SCALE.md, CHECKPOINTS.md, MODELS.md, figures",
}


def lines(path):
    full = os.path.join(ROOT, path)
    if os.path.isdir(full):
        return ""
    return str(sum(1 for _ in open(full)))


def table():
    return "\n".join(f"| `{p}` | {lines(p)} | {w} |" for p, w in WHAT.items())


def reading_path():
    """The README's reading order: the algorithm, its loss, one step on groups, the loop."""
    n = {p: lines(p) for p in ("gate.py", "loss.py", "hapo.py", "update.py", "train.py")}
    return (f"`gate.py` ({n['gate.py']} lines) -> `loss.py` ({n['loss.py']}) -> `hapo.py` ({n['hapo.py']}) -> "
            f"`train.py` ({n['train.py']}), with `update.py` ({n['update.py']}) for the loop's steps 6-7")


if __name__ == "__main__":
    missing = [p for p in WHAT if not os.path.exists(os.path.join(ROOT, p))]
    unlisted = sorted(f for d in ("", "lib") for f in (os.path.join(d, n) for n in os.listdir(os.path.join(ROOT, d)))
                      if f.endswith(".py") and f not in WHAT and f != os.path.join("lib", "__init__.py"))
    if missing or unlisted:
        sys.exit(f"files_table.py: missing {missing}, not in the table {unlisted}")
    print(table())
    print()
    print(reading_path())
    if "--write" in sys.argv[1:]:
        path = os.path.join(ROOT, "README.md")
        old = open(path).read().split("\n")
        rows = [i for i, line in enumerate(old) if line.startswith("| `") and line.count("|") == 4]
        path_line = [i for i, line in enumerate(old) if line.startswith("`gate.py` (")]
        for i in path_line:  # above the table: its index holds
            old[i] = reading_path() + "."
        new = old[:rows[0]] + table().split("\n") + old[rows[-1] + 1:]
        open(path, "w").write("\n".join(new))
