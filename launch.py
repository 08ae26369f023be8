"""What train.py does once, before its first step: the policy, the data, the engine, the optimizer.

    run = launch.start(cfg, dist)   # cfg: train.Config; dist: parallel.Dist

The order matters and is the reason this is one function: the model's positions are checked against
the data actually kept (before anything large is allocated); the rollout engine is built before the
trainer's parameters and optimizer reach the GPU (vLLM sizes its KV cache from the memory it finds
free), and only once every rank has the weights on disk and the teachers' verdicts (a rank waiting in
vLLM's own startup groups times out after torch's default 30 minutes, in ours after --dist_timeout_min);
under torchrun the policy is sharded before it reaches the device and only rank 0 reads the
weights (parallel.wrap); a resumed run's shards fill the sharded model and optimizer in place.
Errors are one line (DataError, CheckpointError, ImportError, ValueError); train.py prints them.
"""

import dataclasses
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from lib import checkpoint
from lib import data
import hapo
from lib import parallel
import rollout
from lib.data import DataError
from eval import encode_prompts
from lib.models import check_family, check_positions, download, load_policy, position_overrides, resolve_model
from reward import reward


@dataclass
class Run:
    """Everything the loop reads that does not change from step to step (but the model's weights)."""
    model: torch.nn.Module  # the HF model (its parameters FSDP2 shards under torchrun)
    policy: torch.nn.Module  # parallel.Policy around it: what the loss runs through
    tok: object
    opt: torch.optim.Optimizer
    engine: object  # rollout.HFEngine or VLLMEngine
    problems: list  # data.Encoded training problems
    teacher_ok: list  # the teacher's reward per problem (1.0: it verifies)
    held: list  # held-out problems
    score: object  # (completion, answer) -> 0/1, with the --checker asked for
    step: int = 0  # the step to start from (a resumed run's)
    cursor: int = 0  # the data position to start from
    start_dir: str = None  # the checkpoint resumed from
    tp: int = 1  # vLLM tensor-parallel ranks that sample the same prompts
    dp_rank: int = 0  # this rank's share of the prompts, of dp_world
    dp_world: int = 1
    n: int = 8  # samples drawn per prompt (N, or N-1 where the teacher is the N-th)


def start(cfg, dist) -> Run:
    """The run train.py's loop steps through: seeds, policy, data, engine, sharding, optimizer, resume."""
    if dist.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # as torchrun sets it
        torch.set_num_threads(1)  # the thread count changes float sums, and with them the run (docs/RESULTS.md)
    torch.manual_seed(cfg.seed + dist.rank)
    random.seed(cfg.seed + dist.rank)
    np.random.seed(cfg.seed + dist.rank)
    load = lambda path: load_policy(path, dist, cfg.resume, cfg.attn, cfg.rope_theta,  # weights on rank 0
                                   cfg.max_positions)  # or in the shards
    if cfg.resume:
        start_dir, model, tok, state = checkpoint.find_resumable(cfg.out_dir, load, dist)
        if (applied := checkpoint.check_resume(dataclasses.asdict(cfg), state["config"], start_dir)) and dist.master:
            print(f"resume: applying {applied}")
    else:
        start_dir, state = None, None
        path = download(resolve_model(cfg.model), dist)  # a hub id: rank 0's download first, before any vLLM
        model, tok = load(path)
    score = lambda completion, answer: reward(completion, answer, cfg.checker)
    # rank 0 alone verifies the teachers (the 46k take ~3 minutes) and broadcasts its answer: a reward
    # deadline hit on one rank only must not make the ranks inject (or --method sft keep) different sets
    problems, teacher_ok, held, stats = data.training_set(cfg.data, cfg.eval_data, tok, cfg.max_prompt_tokens,
                                                          cfg.max_solution_tokens, cfg.eval_problems,
                                                          score if dist.master else None)
    teacher_ok = parallel.broadcast(dist, teacher_ok)
    if cfg.method == "sft":  # imitation of the verified teachers only: no method injects the others
        problems = [p for p, ok in zip(problems, teacher_ok) if ok >= 0.5]
        if not problems:
            raise DataError(f"--method sft: none of the {len(teacher_ok)} teacher solutions passes verification")
    # the longest sequences of the run, from the data kept, not from the flags (the built-in model's 512
    # positions are fewer than the default 1,024 + 64); vLLM's max_model_len is the rollouts' longest
    prompt_len = max(len(ids) for ids in [p.prompt_ids for p in problems] + encode_prompts(tok, held))
    rollout_len = prompt_len + cfg.max_new_tokens
    check_positions(model.config, {
        f"the longest prompt, {prompt_len}, + --max_new_tokens {cfg.max_new_tokens}": rollout_len,
        "the longest prompt and teacher solution": max(len(p.prompt_ids) + len(p.solution_ids) for p in problems)})
    check_family(model)  # the logits loss.py computes are the model's own
    kind, why = rollout.resolve_engine(cfg.rollout)
    if dist.master:
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        print(f"data: {json.dumps(stats)}; held-out problems: {len(held)}")
        print(f"rollout engine: {kind} ({why})")
    # the rollout engine first: vLLM must claim its GPU memory before the trainer does; under FSDP2
    # every rank would have to run the same forwards, so the HF engine samples from a full copy (on
    # the meta device until the trainer's weights are loaded, below)
    sampler = parallel.meta_copy(model) if dist.world > 1 and kind == "hf" else model
    engine = rollout.make_engine(kind, sampler, tok, start_dir or path, seed=cfg.seed,
                                 gpu_memory_utilization=cfg.vllm_gpu_memory, enable_sleep_mode=cfg.vllm_sleep,
                                 tensor_parallel_size=cfg.tensor_parallel, rank=dist.rank, world_size=dist.world,
                                 max_model_len=rollout_len,
                                 hf_overrides=position_overrides(model.config, cfg.rope_theta, cfg.max_positions))
    # the ranks of a vLLM tensor-parallel group sample the same prompts; rollouts and eval are split
    # over the dp_world groups (strided, so that mini-batch m of all ranks is the one-rank mini-batch m)
    tp = cfg.tensor_parallel if kind == "vllm" and dist.world > 1 else 1
    policy = parallel.wrap(model, dist, cfg.grad_checkpointing)  # on the device; FSDP2-sharded under torchrun
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=dist.device.type == "cuda")  # one kernel, no per-parameter temporaries
    if state:
        checkpoint.load_state(start_dir, state, model, opt, dist)
    if sampler is not model:  # the HF engine's full copy, gathered from the trainer's shards
        parallel.materialize(sampler, dist.device)
        engine.sync_weights(model)
    for group in opt.param_groups:
        group["weight_decay"] = cfg.weight_decay  # a resumed optimizer keeps its old one otherwise
    return Run(model, policy, tok, opt, engine, problems, teacher_ok, held, score,
               step=state["step"] if state else 0, cursor=state["cursor"] if state else 0, start_dir=start_dir,
               tp=tp, dp_rank=dist.rank // tp, dp_world=dist.world // tp,
               n=hapo.rollouts_per_group(cfg.method, cfg.group_size))
