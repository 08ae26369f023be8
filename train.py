"""HAPO training: the loop of the paper's Figure 1, on CPU, one GPU, or several under torchrun.

    python train.py                                   # built-in tiny model and task, CPU, minutes
    python train.py --method grpo                     # the same run without a teacher
    python train.py --model Qwen/Qwen2.5-Math-7B --data Elliott/Openr1-Math-46k-8192 ...  # README
    torchrun --nproc_per_node 8 train.py ...          # FSDP2, one vLLM engine per rank

Each step: rollout -> reward -> confidence and gate -> SSI -> advantages -> loss -> optimizer step
-> weight sync -> log -> checkpoint. The algorithm itself lives in gate.py, loss.py and hapo.py.
"""

import argparse
import copy
import dataclasses
import inspect
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import data
import hapo
import parallel
import task
import tiny
import update
from data import DataError
from gate import SCHEDULES, threshold
from reward import reward


@dataclass
class Config:
    model: str = tiny.TINY  # hub id, local dir, or "tiny" (the shipped built-in base model)
    data: str = task.BUILTIN  # "builtin", a .jsonl/.parquet file, or a hub data set id
    eval_data: str = ""  # held-out problems (same formats); default: the eval split of "builtin"
    method: str = "hapo"  # hapo | grpo | luffy | srft (hapo.py's table)
    gamma: float = 0.8  # confidence threshold: inject the teacher when c_i < gamma(t)
    gamma_schedule: str = "constant"  # constant | sigmoid | step, from gamma to gamma_end
    gamma_end: float = 0.5  # gamma(t) at the end of training for the sigmoid and step schedules
    group_size: int = 8  # N rollouts per prompt
    batch_prompts: int = 16  # M prompts per rollout batch (global, over all ranks)
    mini_batches: int = 1  # optimizer steps per rollout batch (LUFFY: 2); >1 computes pi_old
    micro_batch: int = 64  # trajectories per forward/backward (gradient accumulation)
    lr: float = 5e-4  # AdamW learning rate, constant (the tiny model; the 7B recipe: 1e-6)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global grad norm
    clip_eps: float = 0.2  # PPO clip range of Eq. 3
    shaping_gamma: float = 0.1  # LUFFY's f(p) = p / (p + shaping_gamma)
    max_new_tokens: int = 64  # rollout length limit
    max_prompt_tokens: int = 1024  # longer prompts are dropped (counted)
    max_solution_tokens: int = 8192  # longer teacher solutions are dropped (counted)
    temperature: float = 1.0  # rollout temperature
    eval_temperature: float = 0.6  # held-out evaluation temperature (paper: 0.6)
    eval_every: int = 20  # evaluate every this many steps (and before the first, and at the end)
    eval_problems: int = 200  # held-out problems per evaluation (0: all)
    max_steps: int = 200  # rollout batches, one optimizer step each (more with --mini_batches)
    out_dir: str = "out"  # metrics.jsonl and checkpoints go here
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    seed: int = 0  # everything random derives from it (per rank: seed + rank)
    resume: bool = False  # continue from the last checkpoint in out_dir
    rollout: str = "auto"  # auto | hf | vllm: auto picks vLLM when CUDA and vllm are present
    vllm_gpu_memory: float = 0.35  # fraction of GPU memory vLLM may take when colocated
    vllm_sleep: bool = False  # put vLLM to sleep (level 1) during the training step
    tensor_parallel: int = 1  # vLLM tensor parallel size under torchrun
    grad_checkpointing: bool = False  # recompute activations in the backward pass (saves memory)
    chunk_size: int = 1024  # positions per chunk of full-vocabulary logits
    progress: bool = True  # tqdm bar


def fail(msg, dist):
    """A user error: one line on stderr (once, not once per rank) and exit code 2, never a traceback."""
    if dist.master:
        print(f"train.py: error: {msg}", file=sys.stderr)
    parallel.close(dist)  # exit cleanly, not with an abort from gloo's threads
    sys.exit(2)


def parse_args(argv, dist):
    """The command line into a Config (one flag per field, help from the field's comment), checked."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the usage screen
            fail(f"{message} (see --help)", dist)
    docs = dict(re.findall(r"^\s+(\w+): \w+ = .*?# (.*)$", inspect.getsource(Config), re.M))
    p = Parser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
        p.add_argument(f"--{f.name}", default=f.default, help=docs.get(f.name), **kind)
    cfg = Config(**vars(p.parse_args(argv)))
    world = dist.world
    checks = [(cfg.method in hapo.METHODS, f"--method must be one of {sorted(hapo.METHODS)}"),
              (cfg.gamma_schedule in SCHEDULES, f"--gamma_schedule must be one of {SCHEDULES}"),
              (cfg.rollout in ("auto", "hf", "vllm"), "--rollout must be auto, hf or vllm"),
              (cfg.group_size >= 2, "--group_size must be at least 2 (advantages need a group)"),
              (cfg.batch_prompts >= 1 and cfg.max_steps >= 0, "--batch_prompts and --max_steps must be positive"),
              (cfg.mini_batches >= 1 and cfg.micro_batch >= 1, "--mini_batches and --micro_batch must be >= 1"),
              (cfg.batch_prompts % world == 0, f"--batch_prompts must be divisible by the {world} ranks"),
              (world == 1 or cfg.batch_prompts % (world * cfg.mini_batches) == 0,  # same mini-batches as 1 rank
               f"--batch_prompts must be divisible by {world} ranks x {cfg.mini_batches} mini-batches"),
              (world == 1 or world % cfg.tensor_parallel == 0, f"--tensor_parallel must divide the {world} ranks")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    return cfg


# ----------------------------------------------------------------------------
# data


def load_data(cfg, tok):
    """Train and held-out problems, tokenised; the teacher of each problem scored once (Eq. 4)."""
    train, stats = data.load_problems(cfg.data, "train")
    held_spec = cfg.eval_data or (cfg.data if cfg.data.startswith(task.BUILTIN) else "")
    held = data.load_problems(held_spec, "eval", need_solution=False)[0] if held_spec else []
    enc, enc_stats = data.encode(tok, train, cfg.max_prompt_tokens, cfg.max_solution_tokens)
    teacher_ok = [reward(e.solution, e.answer) for e in enc]
    stats = {**stats, **enc_stats, "teacher_unverified": sum(r < 0.5 for r in teacher_ok)}
    return enc, teacher_ok, held[:cfg.eval_problems or None], stats


def prompt_batch(n_problems, cursor, size, seed):
    """Indices of the next `size` problems: a fresh permutation each epoch, position = cursor."""
    orders, out = {}, []  # one permutation per epoch the batch touches, not one per index
    for c in range(cursor, cursor + size):
        epoch, i = divmod(c, n_problems)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(orders[epoch][i]))
    return out


# ----------------------------------------------------------------------------
# the loop


def main(argv=None):
    cfg = parse_args(argv, parallel.from_env())
    dist = parallel.init()
    import transformers
    transformers.utils.logging.disable_progress_bar()  # our own bars and log lines say enough
    from tqdm import tqdm
    from evaluation import evaluate
    from models import load_model, resolve_model
    from rollout import make_engine, resolve_engine

    start_dir = checkpoint.latest(cfg.out_dir) if cfg.resume else None
    if cfg.resume and start_dir is None:
        fail(f"--resume: no checkpoint in '{cfg.out_dir}' (no '{os.path.join(cfg.out_dir, 'latest')}' file)", dist)
    torch.manual_seed(cfg.seed + dist.rank), random.seed(cfg.seed + dist.rank), np.random.seed(cfg.seed + dist.rank)
    try:
        model_path = start_dir or resolve_model(cfg.model)
        model, tok = load_model(model_path, dtype=torch.float32)
        problems, teacher_ok, held, stats = load_data(cfg, tok)
        kind, why = resolve_engine(cfg.rollout)
    except (DataError, ImportError) as e:
        fail(str(e), dist)
    if dist.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        print(f"data: {json.dumps(stats)}; held-out problems: {len(held)}")
        print(f"rollout engine: {kind} ({why})")
    # the rollout engine first: vLLM must claim its GPU memory before the trainer does; under FSDP2
    # every rank would have to run the same forwards, so the HF engine samples from a full copy
    sampler = copy.deepcopy(model).to(dist.device) if dist.world > 1 and kind == "hf" else model
    engine = make_engine(kind, sampler, tok, model_path, gpu_memory_utilization=cfg.vllm_gpu_memory, seed=cfg.seed,
                         enable_sleep_mode=cfg.vllm_sleep, tensor_parallel_size=cfg.tensor_parallel,
                         rank=dist.rank, world_size=dist.world)
    # the ranks of a vLLM tensor-parallel group sample the same prompts; rollouts and eval are split
    # over the dp_world groups (strided, so that mini-batch m of all ranks is the one-rank mini-batch m)
    tp = cfg.tensor_parallel if kind == "vllm" and dist.world > 1 else 1
    dp_rank, dp_world, N = dist.rank // tp, dist.world // tp, cfg.group_size
    model.to(dist.device)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant, which FSDP2 composes with
    policy = parallel.Policy(model)
    if dist.world > 1:
        parallel.shard(policy, dist)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    step, cursor = 0, 0
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if start_dir:
        try:
            state = checkpoint.load_state(start_dir, model, opt, dist)
        except ValueError as e:
            fail(str(e), dist)
        step, cursor = state["step"], state["cursor"]
        if dist.master and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
            keep = [l for l in open(metrics_path) if json.loads(l)["step"] <= step]
            open(metrics_path, "w").writelines(keep)
    elif dist.master:
        open(metrics_path, "w").close()

    def log(row):
        if dist.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(at):
        if not held:
            return {}
        part = held[dp_rank::dp_world]
        r = evaluate(engine, tok, part, k=1, temperature=cfg.eval_temperature,
                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919 * at)
        return {"eval/accuracy": parallel.all_sum(dist, r["accuracy"] * len(part)) / tp / len(held)}

    if step == 0:
        log({"step": 0, **run_eval(0)})
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps,
               disable=not (dist.master and cfg.progress), desc=cfg.method, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        # 1. rollout: N samples for each of this rank's prompts (rollout.py)
        idx = prompt_batch(len(problems), cursor, cfg.batch_prompts, cfg.seed)[dp_rank::dp_world]
        cursor += cfg.batch_prompts
        completions = engine.generate([problems[i].prompt_ids for i in idx], N, cfg.max_new_tokens, cfg.temperature)
        if cfg.vllm_sleep:
            engine.sleep()  # level 1: vLLM hands its memory back to the trainer
        mine = [(i, completions[g * N:(g + 1) * N]) for g, i in enumerate(idx)][dist.rank % tp::tp]
        # 2. reward: 1 when the last boxed answer equals the gold one (Eq. 4, reward.py)
        groups = [hapo.Group(problems[i].prompt_ids, resp,
                             [reward(t, problems[i].answer) for t in tok.batch_decode(resp, skip_special_tokens=True)],
                             problems[i].solution_ids, teacher_ok[i]) for i, resp in mine]
        # 3. confidence c = (1+S)/(2+N) and the gate c < gamma(t) (Eqs. 5-6, Algorithm 1)
        gamma = threshold(step / max(cfg.max_steps - 1, 1), cfg.gamma, cfg.gamma_schedule, cfg.gamma_end)
        opened, conf = hapo.gate_groups(groups, cfg.method, gamma)  # [M], [M]
        # 4. SSI: in each opened group the worst rollout becomes the verified teacher (Eq. 7)
        trained = hapo.inject(groups, opened)
        # 5. advantages, on the groups after SSI (Eq. 2)
        adv = hapo.advantages(trained)  # [M, N]
        # 6-7. loss (Eqs. 8-9) over the packed batch, and the optimizer step (update.py)
        batch = hapo.pack(trained, adv, tok.pad_token_id).to(dist.device)
        loss, grad_norm = update.optimize(policy, opt, batch, cfg, dist)
        # 8. weight sync into the rollout engine
        engine.sync_weights(model)
        # 9. log
        row = {"step": step + 1, **parallel.reduce_metrics(dist, *hapo.metrics(groups, trained, opened, conf)),
               "train/gamma": gamma, "train/loss": loss, "train/grad_norm": grad_norm}
        gen_tokens = parallel.all_sum(dist, float(sum(len(r) for _, resp in mine for r in resp)))
        dt = time.time() - t0
        row.update({"time/step_s": dt, "time/tokens_per_s": gen_tokens / dt})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row.update(run_eval(step + 1))
        log(row)
        if dist.master:
            acc = f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
            bar.write(f"step {step + 1:4d} | reward {row['train/reward']:.3f} | len {row['train/response_len']:5.1f} | "
                      f"teacher {row['train/teacher_injected']:3.0f} | gate {row['train/gate_open_frac']:.2f} | "
                      f"zero-var {row['train/zero_var_frac']:.2f} | loss {loss:+.4f} | {dt:.2f}s{acc}")
        # 10. checkpoint
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            checkpoint.save(cfg.out_dir, step + 1, model, tok, opt, dist,
                            {"cursor": cursor, "config": dataclasses.asdict(cfg)})
    parallel.close(dist)


if __name__ == "__main__":
    main()
