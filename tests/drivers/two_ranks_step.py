"""Stages 3-7 of train.py on fixed groups, in one process or under torchrun; writes every step's metrics.

    python tests/drivers/two_ranks_step.py OUT.json [MODEL_DIR SETTING,SETTING]
    torchrun --nproc_per_node 2 tests/drivers/two_ranks_step.py OUT.json [MODEL_DIR SETTING,SETTING]

MODEL_DIR (default: the built-in model) is any saved causal LM whose tokenizer is the built-in one
(tests/test_families.py's Qwen3 and Llama); the settings default to all of SETTINGS.

Each rank takes its strided share of the same global groups, as train.py shards prompts, so two
ranks must reproduce one process: the loss, the gradient norm and every metric reduced over ranks.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lib import data  # noqa: E402
import hapo  # noqa: E402
from lib import parallel  # noqa: E402
from lib import tiny  # noqa: E402
import train  # noqa: E402
import update  # noqa: E402

SETTINGS = {  # uneven micro-batches; two optimizer mini-batches (pi_old frozen); token budgets, packed.
    # Activation checkpointing is left out: under gloo on 2 busy cores a rank aborted at teardown in 2 of ~8 runs.
    "micro": ["--micro_batch", "3"],
    "mini": ["--micro_batch", "3", "--mini_batches", "2"],
    "packed": ["--micro_batch_tokens", "120", "--pack", "--mini_batches", "2", "--entropy_coef", "0.01"],
    # rank 0's rows are long, rank 1's short: under a token budget rank 0 cuts more micro-batches, and
    # luffy's group whose teacher fails its check has N-1 rows. The ranks must still pair their collectives.
    "uneven": ["--micro_batch_tokens", "150", "--method", "luffy"],
}
dist = parallel.init()
tok = tiny.make_tokenizer()
problems, _ = data.encode(tok, data.builtin_task(n_train=12, n_eval=1)[0], None, None)


def global_groups(step, n=4, uneven=False):
    """The whole rollout batch of a step: 4 prompts x n rollouts, each rollout either the teacher's
    own solution (reward 1) or random bytes (reward 0), from a generator seeded by the step. uneven:
    the even prompts' (rank 0's) junk is 40-80 tokens, the odd ones' 1-5, and the first teacher fails."""
    g = torch.Generator().manual_seed(1000 + step)
    groups = []
    for k, p in enumerate(problems[4 * step:4 * step + 4]):
        right = (torch.rand(n, generator=g) < 0.3).tolist()
        lo, hi = ((40, 80) if k % 2 == 0 else (1, 5)) if uneven else (1, 20)
        junk = [torch.randint(1, 257, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
        groups.append(hapo.Group(p.prompt_ids, [list(p.solution_ids) if r else j for r, j in zip(right, junk)],
                                 [float(r) for r in right], p.solution_ids, 0.0 if uneven and k == 0 else 1.0))
    return groups


model_dir = sys.argv[2] if len(sys.argv) > 2 else None
chosen = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SETTINGS)


def new_model():
    if model_dir is None:
        return tiny.make_model(tok)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


out = {}
for name, extra in ((k, SETTINGS[k]) for k in chosen):
    cfg, _ = train.parse_args(["--batch_prompts", "4", "--group_size", "4", "--lr", "1e-2", *extra], dist)
    policy = parallel.Policy(new_model().to(dist.device))
    if dist.world > 1:
        parallel.shard(policy, dist)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = []
    for step in range(3):
        n = hapo.rollouts_per_group(cfg.method, cfg.group_size)
        groups = global_groups(step, n, name == "uneven")[dist.rank::dist.world]  # this rank's, as train.py shards
        opened, conf = hapo.gate_groups(groups, cfg.method, 0.8)
        trained = hapo.inject(groups, opened, cfg.method)
        batch = hapo.pack(trained, hapo.advantages(trained), tok.pad_token_id).to(dist.device)
        result = update.optimize(policy, opt, batch, cfg, dist, lr=cfg.lr)
        rows.append({**parallel.reduce_metrics(dist, *hapo.metrics(groups, trained, opened, conf)), **result})
    out[name] = rows
if dist.master:
    json.dump(out, open(sys.argv[1], "w"))
parallel.close(dist)
