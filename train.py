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
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import tiny
from data import DataError
from gate import SCHEDULES, threshold
from hapo import METHODS, Group, batch_loss, build_batch
from loss import sequence_logprobs
from reward import reward


@dataclass
class Config:
    model: str = tiny.TINY  # hub id or local dir; "tiny" builds the built-in model in code
    data: str = tiny.BUILTIN  # "builtin", a .jsonl/.parquet file, or a hub data set id
    eval_data: str = ""  # held-out problems (same formats); default: the eval split of "builtin"
    method: str = "hapo"  # hapo | grpo | luffy | srft (SPEC.md's table)
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


def parse_args(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the usage screen; once, not once per rank
            if master:
                print(f"train.py: error: {message} (see --help)", file=sys.stderr)
            sys.exit(2)
    p = Parser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default)
    cfg = Config(**vars(p.parse_args(argv)))
    checks = [(cfg.method in METHODS, f"--method must be one of {sorted(METHODS)}"),
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
# distributed: a dozen lines plus FSDP2; nothing changes when not under torchrun

rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def setup_distributed():
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def all_sum(x):
    """Sum a float (or tensor) over ranks; identity in one process."""
    if world == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t.item() if t.dim() == 0 else t


class Policy(torch.nn.Module):
    """FSDP2's root module: policy(fn, *args) = fn(model, *args). FSDP2 gathers the root's parameters
    (embeddings, final norm, LM head) around the root's forward, but loss.sequence_logprobs calls
    model.model and reads the LM head itself: the LM's forward never runs, so this one wraps the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def shard_model(policy):
    """FSDP2: fully_shard each decoder layer, then the root; bf16 compute with fp32 gradients on GPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else {}
    for layer in policy.model.model.layers:
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(**bf16))
    # the root's inputs are the batch (advantages, old log-probs): keep them fp32
    fully_shard(policy, mp_policy=MixedPrecisionPolicy(**bf16, cast_forward_inputs=False))


# ----------------------------------------------------------------------------
# model, data, checkpoints


def fail(msg):
    """A user error: one line on stderr and exit code 2, never a traceback."""
    if master:
        print(f"train.py: error: {msg}", file=sys.stderr)
    if dist.is_initialized():  # exit cleanly, not with an abort from gloo's threads
        dist.destroy_process_group()
    sys.exit(2)


def load_data(cfg, tok):
    """Train and held-out problems, tokenised; the teacher of each problem scored once (Eq. 4)."""
    train, stats = data.load_problems(cfg.data, "train")
    held_spec = cfg.eval_data or (cfg.data if cfg.data.startswith(tiny.BUILTIN) else "")
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


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"]), random.setstate(s["python"]), np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(cfg, model, tok, opt, step, cursor, keep=2):
    """<out_dir>/step_NNNNNN: save_pretrained policy + tokenizer, and state.pt for exact resume.

    Written to a temporary directory and renamed, so a crash never leaves a half checkpoint; then
    <out_dir>/latest is replaced atomically. Under FSDP2 the full state is gathered to rank 0.
    """
    rngs = [None] * world
    if world > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, opt_sd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
        dist.all_gather_object(rngs, rng_state())
    else:
        model_sd, opt_sd, rngs = model.state_dict(), opt.state_dict(), [rng_state()]
    if master:
        final = os.path.join(cfg.out_dir, f"step_{step:06d}")
        tmp = final + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_sd)
        tok.save_pretrained(tmp)
        torch.save({"step": step, "cursor": cursor, "optimizer": opt_sd, "rng": rngs, "world": world,
                    "config": dataclasses.asdict(cfg)}, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(cfg.out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(cfg.out_dir, "latest.tmp"), os.path.join(cfg.out_dir, "latest"))
        old = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("step_") and ".tmp" not in d)
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(cfg.out_dir, d), ignore_errors=True)
    if world > 1:
        dist.barrier()


def latest_checkpoint(out_dir):
    path = os.path.join(out_dir, "latest")
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint in '{out_dir}' (no '{path}' file)")
    return os.path.join(out_dir, open(path).read().strip())


def load_state(start_dir, model, opt):
    """A checkpoint's optimizer and RNG state (the model came from its directory) -> (step, cursor).

    Under FSDP2 rank 0 reads the full optimizer state and broadcasts it tensor by tensor into the
    shards; the file is memory-mapped, so the other ranks read only the small entries."""
    state = torch.load(os.path.join(start_dir, "state.pt"), weights_only=False, mmap=world > 1)
    if state["world"] != world:
        fail(f"checkpoint was written by {state['world']} ranks; resume it with the same number")
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state["optimizer"] if master else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][rank])
    return state["step"], state["cursor"]


# ----------------------------------------------------------------------------
# the trainer's side of a step: the policy, its update, the metrics


def make_policy(model, cfg):
    """The trained policy (FSDP2-sharded under torchrun) and its AdamW."""
    model.to(device)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant, which FSDP2 composes with
    policy = Policy(model)
    if world > 1:
        shard_model(policy)
    return policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimize(policy, opt, batch, cfg, num_tokens):
    """Mini-batch updates over the batch, each with micro-batches under the global token count.

    Returns (loss, grad_norm) of the last update. Losses are scaled by the world size because FSDP2
    averages gradients over ranks while Eq. 8 wants their sum over the global normaliser.
    """
    B = len(batch)
    if cfg.mini_batches > 1:  # several updates per batch: freeze pi_theta_old first
        with torch.no_grad():
            batch.old_logp = torch.cat([policy(sequence_logprobs, batch.input_ids[i:i + cfg.micro_batch],
                                               batch.attention_mask[i:i + cfg.micro_batch], cfg.chunk_size)
                                        for i in range(0, B, cfg.micro_batch)])
    per = math.ceil(B / cfg.mini_batches)
    for m in range(0, B, per):
        mini = batch.slice(m, m + per)
        mini_tokens = all_sum(float(mini.num_tokens())) if cfg.mini_batches > 1 else num_tokens
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, len(mini), cfg.micro_batch):
            micro = mini.slice(i, i + cfg.micro_batch)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda" and world == 1):
                loss = policy(batch_loss, micro, cfg.method, mini_tokens, cfg.clip_eps, cfg.shaping_gamma,
                              cfg.chunk_size)
            (loss * world).backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already reduced over ranks
            grad_norm = grad_norm.full_tensor()
        opt.step()
    return all_sum(total), float(grad_norm)


def update(policy, opt, groups, cfg, gamma, pad_id):
    """Stages 3-7 on this rank's groups; returns the step's metrics, reduced over ranks."""
    # 3-6. confidence, gate, SSI, advantages (hapo.py), packed for the trainer
    batch, m = build_batch(groups, cfg.method, gamma, pad_id)
    if world > 1:  # counts are summed over ranks, means averaged (every rank holds as many groups)
        total = all_sum(torch.tensor(list(m.values()), dtype=torch.float64))  # [len(m)]: one all_reduce
        m = {k: v.item() / (1 if k in ("train/teacher_injected", "train/teacher_failed") else world)
             for k, v in zip(m, total)}
    for f in ("input_ids", "attention_mask", "loss_mask", "advantages", "teacher"):
        setattr(batch, f, getattr(batch, f).to(device))
    num_tokens = all_sum(float(batch.num_tokens()))  # Eq. 8's normaliser: all tokens on all ranks
    # 7. loss and optimizer step
    policy.train()
    loss, grad_norm = optimize(policy, opt, batch, cfg, num_tokens)
    return {**m, "train/gamma": gamma, "train/loss": loss, "train/grad_norm": grad_norm}


# ----------------------------------------------------------------------------
# the loop


def main(argv=None):
    cfg = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # our own bars and log lines say enough
    setup_distributed()
    from eval import evaluate, load_model, resolve_model
    from rollout import make_engine, resolve_engine
    from tqdm import tqdm

    start_dir = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    torch.manual_seed(cfg.seed + rank), random.seed(cfg.seed + rank), np.random.seed(cfg.seed + rank)
    try:
        model, tok = load_model(resolve_model(start_dir or cfg.model), dtype=torch.float32)
        problems, teacher_ok, held, stats = load_data(cfg, tok)
    except DataError as e:
        fail(str(e))
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        print(f"data: {json.dumps(stats)}; held-out problems: {len(held)}")
    # the rollout engine first: vLLM must claim its GPU memory before the trainer does
    try:
        kind, _ = resolve_engine(cfg.rollout)
    except ImportError as e:
        fail(str(e))
    model_path = start_dir or cfg.model
    if kind == "vllm" and cfg.model == tiny.TINY and start_dir is None:  # vLLM loads from disk
        model_path = os.path.join(cfg.out_dir, "tiny_init")
        if master:
            model.save_pretrained(model_path), tok.save_pretrained(model_path)
        if world > 1:
            dist.barrier()
    # under FSDP2 every rank would have to run the same forwards: HF samples from a full copy
    sampler = copy.deepcopy(model).to(device) if world > 1 and kind == "hf" else model
    engine = make_engine(cfg.rollout, sampler, tok, model_path, gpu_memory_utilization=cfg.vllm_gpu_memory,
                         seed=cfg.seed, enable_sleep_mode=cfg.vllm_sleep, tensor_parallel_size=cfg.tensor_parallel)
    # the ranks of a vLLM tensor-parallel group sample the same prompts; rollouts and eval are split
    # over the dp_world groups (strided, so that mini-batch m of all ranks is the one-rank mini-batch m)
    tp = cfg.tensor_parallel if kind == "vllm" and world > 1 else 1
    dp_rank, dp_world = rank // tp, world // tp
    policy, opt = make_policy(model, cfg)

    step, cursor = 0, 0
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if start_dir:
        step, cursor = load_state(start_dir, model, opt)
        if master and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
            keep = [l for l in open(metrics_path) if json.loads(l)["step"] <= step]
            open(metrics_path, "w").writelines(keep)
    elif master:
        open(metrics_path, "w").close()

    def log(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(at):
        if not held:
            return {}
        part = held[dp_rank::dp_world]
        r = evaluate(engine, tok, part, k=1, temperature=cfg.eval_temperature,
                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919 * at)
        return {"eval/accuracy": all_sum(r["accuracy"] * len(part)) / tp / len(held)}

    if step == 0:
        log({"step": 0, **run_eval(0)})
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, disable=not (master and cfg.progress),
               desc=cfg.method, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        # 1. rollout: N samples for each of this rank's prompts
        idx = prompt_batch(len(problems), cursor, cfg.batch_prompts, cfg.seed)[dp_rank::dp_world]
        cursor += cfg.batch_prompts
        completions = engine.generate([problems[i].prompt_ids for i in idx], cfg.group_size,
                                      cfg.max_new_tokens, cfg.temperature)
        if cfg.vllm_sleep:
            engine.sleep()  # level 1: vLLM hands its memory back to the trainer
        N = cfg.group_size
        mine = [(i, completions[g * N:(g + 1) * N]) for g, i in enumerate(idx)][rank % tp::tp]
        # 2. reward (Eq. 4)
        groups = []
        for i, resp in mine:
            rew = [reward(t, problems[i].answer) for t in tok.batch_decode(resp, skip_special_tokens=True)]
            groups.append(Group(problems[i].prompt_ids, resp, rew, problems[i].solution_ids, teacher_ok[i]))
        # 3-7. confidence and gate, SSI, advantages, loss, optimizer step
        gamma = threshold(step / max(cfg.max_steps - 1, 1), cfg.gamma, cfg.gamma_schedule, cfg.gamma_end)
        m = update(policy, opt, groups, cfg, gamma, tok.pad_token_id)
        # 8. weight sync into the rollout engine
        engine.sync_weights(model)
        # log, evaluate, checkpoint
        gen_tokens = all_sum(float(sum(len(r) for _, resp in mine for r in resp)))
        dt = time.time() - t0
        row = {"step": step + 1, **m, "time/step_s": dt, "time/tokens_per_s": gen_tokens / dt}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            row.update(run_eval(step + 1))
        log(row)
        if master:
            acc = f" | eval {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""
            bar.write(f"step {step + 1:4d} | reward {m['train/reward']:.3f} | len {m['train/response_len']:5.1f} | "
                      f"teacher {m['train/teacher_injected']:3.0f} | gate {m['train/gate_open_frac']:.2f} | "
                      f"zero-var {m['train/zero_var_frac']:.2f} | loss {m['train/loss']:+.4f} | {dt:.2f}s{acc}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(cfg, model, tok, opt, step + 1, cursor)
    if world > 1:
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
