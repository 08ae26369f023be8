"""HAPO training: the loop of the paper's Figure 1, on CPU, one GPU, or several under torchrun.

    python train.py                                   # built-in tiny model and task, CPU, minutes
    python train.py --method grpo                     # the same run without a teacher
    python train.py --method sft --out_dir out/sft    # imitation alone; then RL from it, a fresh optimizer:
    python train.py --method grpo --model out/sft --out_dir out/sft-grpo   # SFT-then-RL
    python train.py --model Qwen/Qwen2.5-Math-7B      # the paper's run: its recipe, every GPU of the node
    torchrun --nnodes 2 --nproc_per_node 8 ... train.py --model ...   # several nodes: FSDP2, vLLM per rank

Each step: rollout -> reward -> confidence and gate -> SSI -> advantages -> loss -> optimizer step
-> weight sync -> log -> checkpoint. The algorithm itself lives in gate.py, loss.py and hapo.py.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import hapo
import update
from lib import checkpoint, data, parallel, plan, preflight, recipes, task, tiny, tracking
from lib.checkpoint import CheckpointError
from lib.data import DataError
from gate import SCHEDULES, threshold
from reward import CHECKERS, check_checker
from rollout import resolve_engine, truncated


@dataclass
class Config:
    """HAPO training; the defaults are the laptop recipe, and any other model's are the paper's (lib/recipes.py)."""
    model: str = tiny.TINY  # hub id, local dir, or "tiny" (the shipped built-in base model)
    recipe: str = "auto"  # auto | laptop | paper: auto gives the built-in model the laptop's, any other the paper's
    data: str = task.BUILTIN  # "builtin", a .jsonl/.parquet file, or a hub data set id
    eval_data: str = ""  # held-out problems (same formats); default: the eval split of "builtin"
    method: str = "hapo"  # hapo | grpo | luffy | srft | sft (hapo.py's table)
    gamma: float = 0.8  # confidence threshold: inject the teacher when c_i < gamma(t)
    gamma_schedule: str = "constant"  # constant | sigmoid | step, from gamma to gamma_end
    gamma_end: float = 0.5  # gamma(t) at the end of training for the sigmoid and step schedules
    group_size: int = 8  # N rollouts per prompt (luffy and srft: N-1 sampled plus the teacher)
    batch_prompts: int = 16  # M prompts per rollout batch (global, over all ranks)
    mini_batches: int = 1  # optimizer steps per rollout batch (LUFFY: 2); >1 computes pi_old
    micro_batch: int = 64  # trajectories per forward/backward (gradient accumulation)
    micro_batch_tokens: int = 0  # >0: micro-batches by token budget instead, rows sorted by length
    pack: bool = False  # with micro_batch_tokens: pack each micro-batch into one row, no padding
    lr: float = 5e-4  # AdamW peak learning rate
    lr_schedule: str = "constant"  # constant | linear | cosine decay after the warm-up (paper: constant)
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps
    weight_decay: float = 0.0  # AdamW weight decay (LUFFY's script: 0.01)
    grad_clip: float = 1.0  # max global grad norm
    clip_eps: float = 0.2  # PPO clip range of Eq. 3
    clip_on_policy: bool = True  # Eq. 3's clip (LUFFY's script: off, loss_remove_clip=True)
    adv_std: bool = True  # divide advantages by the group's std, Eq. 2 (LUFFY's script: off)
    loss_norm: str = "token_mean"  # token_mean (Eq. 8) | constant: / (trajectories x max_new_tokens), LUFFY's
    shaping_gamma: float = 0.1  # LUFFY's f(p) = p / (p + shaping_gamma)
    entropy_coef: float = 0.0  # entropy bonus on the token mean of the policy's entropy (LUFFY: 0.001)
    mask_truncated: bool = False  # leave completions that hit max_new_tokens without EOS out of the loss
    is_correction: bool = False  # weight on-policy tokens by the rollout correction pi_old / pi_sampler
    is_level: str = "token"  # token | sequence: the ratio per token or per trajectory (product of its tokens')
    is_mode: str = "truncate"  # truncate: min(ratio, is_cap) (TIS) | mask: 0 where ratio > is_cap
    is_cap: float = 2.0  # the threshold of that importance ratio
    checker: str = "hapo"  # the reward's answer checker: hapo (reward.py's) | math_verify (published tables)
    max_new_tokens: int = 64  # rollout length limit
    max_prompt_tokens: int = 1024  # longer prompts are dropped (counted)
    max_solution_tokens: int = 8192  # longer teacher solutions are dropped (counted)
    temperature: float = 1.0  # rollout temperature; the trainer's log-probs are of logits / T
    eval_temperature: float = 0.6  # held-out evaluation temperature (paper: 0.6)
    eval_every: int = 20  # evaluate every this many steps (and before the first, and at the end)
    eval_problems: int = 200  # held-out problems per evaluation (0: all)
    max_steps: int = 200  # rollout batches, one optimizer step each (more with --mini_batches)
    out_dir: str = "out"  # metrics.jsonl, completions.jsonl and checkpoints go here
    save_every: int = 50  # checkpoint every this many steps (and at the end)
    save_dtype: str = "auto"  # the exported policy's dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    dist_timeout_min: float = 60.0  # minutes a rank waits in a collective (a slow save) before torchrun aborts
    seed: int = 0  # everything random derives from it (per rank: seed + rank)
    resume: bool = False  # continue from the last good checkpoint in out_dir
    overwrite: bool = False  # start over in an out_dir that holds a run (deletes its checkpoints)
    report_to: str = "none"  # none | tensorboard | wandb | trackio (comma-separated); metrics.jsonl always
    log_completions_every: int = 20  # append a few samples to completions.jsonl every this many steps (0: off)
    rollout: str = "auto"  # auto | hf | vllm: auto picks vLLM when CUDA and vllm are present
    vllm_gpu_memory: float = 0.35  # fraction of GPU memory vLLM may take when colocated
    vllm_sleep: bool = False  # put vLLM to sleep (level 2: weights and KV cache dropped) during the training step
    tensor_parallel: int = 1  # vLLM tensor parallel size under torchrun
    grad_checkpointing: bool = False  # recompute activations in the backward pass (saves memory)
    max_positions: int = 0  # >0: override the model's max_position_embeddings (trainer and vLLM alike)
    rope_theta: float = 0.0  # >0: override the model's RoPE base (LUFFY's 16k Qwen2.5-Math-7B: 40000)
    chunk_size: int = 1024  # positions per chunk of full-vocabulary logits
    attn: str = "sdpa"  # attention: sdpa | eager | flash_attention_2/3 (their varlen kernels make --pack pay off)
    progress: bool = True  # tqdm bar
    plan: str = ""  # [NODESx]GPUSxGIB (8x80, 2x8x80): print whether this run fits, from config.json alone, and exit
    preflight: bool = True  # before any weight is read, stop in one line if the run does not fit this machine
    nproc: int = 0  # ranks to start on this node without torchrun (0: one per visible GPU; 1: one process)
    print_config: bool = False  # print the resolved config as one JSON object and exit (no weights, data or GPU)


CHOICES = {"method": sorted(hapo.METHODS), "recipe": ("auto", "laptop", "paper"), "gamma_schedule": SCHEDULES,
           "lr_schedule": ("constant", "linear", "cosine"), "loss_norm": ("token_mean", "constant"),
           "rollout": ("auto", "hf", "vllm"), "checker": CHECKERS,
           "attn": ("sdpa", "eager", "flash_attention_2", "flash_attention_3"), "save_dtype": ("auto", "bf16", "fp32"),
           "is_level": ("token", "sequence"), "is_mode": ("truncate", "mask")}


def problems_with(cfg, world):
    """Every flag's bounds, in one place (choices are argparse's): the first violated one's message, or None."""
    checks = [(0 < cfg.gamma <= 1 and 0 < cfg.gamma_end <= 1, "--gamma and --gamma_end must be in (0, 1]"),
              (cfg.group_size >= 2, "--group_size must be at least 2 (advantages need a group)"),
              (cfg.batch_prompts >= 1 and cfg.max_steps >= 0, "--batch_prompts must be >= 1 and --max_steps >= 0"),
              (cfg.mini_batches >= 1 and cfg.micro_batch >= 1, "--mini_batches and --micro_batch must be >= 1"),
              (cfg.micro_batch_tokens >= 0 and (cfg.micro_batch_tokens or not cfg.pack),
               "--micro_batch_tokens must be >= 0, and --pack needs it"),
              (cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.warmup_steps >= 0,
               "--lr must be > 0, --weight_decay and --warmup_steps >= 0"),
              (cfg.grad_clip > 0, "--grad_clip must be > 0 (a negative one would turn clipping into ascent)"),
              (cfg.clip_eps > 0 and cfg.shaping_gamma > 0 and cfg.entropy_coef >= 0 and cfg.is_cap >= 1,
               "--clip_eps and --shaping_gamma must be > 0, --entropy_coef >= 0, --is_cap >= 1"),
              (min(cfg.max_new_tokens, cfg.max_prompt_tokens, cfg.max_solution_tokens, cfg.chunk_size) >= 1,
               "--max_new_tokens, --max_prompt_tokens, --max_solution_tokens and --chunk_size must be >= 1"),
              (cfg.max_positions >= 0 and cfg.rope_theta >= 0, "--max_positions and --rope_theta must be >= 0"),
              (cfg.temperature > 0, "--temperature must be > 0 (the trainer's log-probs are of logits / T)"),
              (cfg.eval_temperature >= 0, "--eval_temperature must be >= 0 (0: greedy)"),
              (cfg.eval_every >= 1 and cfg.save_every >= 1, "--eval_every and --save_every must be >= 1"),
              (cfg.dist_timeout_min > 0 and cfg.nproc >= 0, "--dist_timeout_min must be > 0 and --nproc >= 0"),
              (cfg.eval_problems >= 0 and cfg.log_completions_every >= 0,
               "--eval_problems and --log_completions_every must be >= 0"),
              (0 < cfg.vllm_gpu_memory <= 1 and cfg.tensor_parallel >= 1,
               "--vllm_gpu_memory must be in (0, 1] and --tensor_parallel >= 1"),
              (not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other"),
              (not (cfg.overwrite and os.path.abspath(cfg.model) == os.path.abspath(cfg.out_dir)),
               "--overwrite would delete the checkpoints --model loads from: give this run another --out_dir"),
              (not os.path.isfile(cfg.out_dir), f"--out_dir '{cfg.out_dir}' is a file, not a directory"),
              (cfg.batch_prompts % (world * cfg.mini_batches) == 0,  # whole groups, as many on every rank
               f"--batch_prompts must be divisible by {world} rank(s) x {cfg.mini_batches} mini-batch(es)"),
              (world == 1 or world % cfg.tensor_parallel == 0, f"--tensor_parallel must divide the {world} ranks")]
    try:
        check_checker(cfg.checker)
    except (ValueError, ImportError) as e:
        checks.append((False, f"--checker: {e}"))
    return next((msg for ok, msg in checks if not ok), None) or tracking.check_trackers(cfg.report_to.split(","))


def fail(msg, dist, code=2, kind="error: "):
    """A user error: one line on stderr (once, not once per rank) and exit code 2, never a traceback."""
    if dist.master:
        print(f"train.py: {kind}{msg}", file=sys.stderr, flush=True)
    parallel.close(dist)  # exit cleanly, not with an abort from gloo's threads
    sys.exit(code)


def parse_args(argv, dist):
    """The command line into a Config under its recipe (lib/recipes.py), checked: (config, the recipe's line)."""
    error = lambda msg: fail(msg, dist)
    cfg, note = recipes.parse(Config, argv, error, CHOICES)
    try:  # the ranks are those of the hardware a plan names, or those this run will start
        world = plan.parse_hardware(cfg.plan).world if cfg.plan else parallel.ranks_to_start(cfg.nproc) or dist.world
    except ValueError as e:
        error(f"{e} (see --help)")
    if msg := problems_with(cfg, world):
        error(f"{msg} (see --help)")
    return cfg, note


# ----------------------------------------------------------------------------
# the loop


def main(argv=None):
    argv, here = sys.argv[1:] if argv is None else list(argv), parallel.from_env()
    cfg, note = parse_args(argv, here)
    if cfg.print_config:  # the recipe's values under the flags given; nothing is read
        return print(json.dumps(dataclasses.asdict(cfg)))
    parallel.configure_allocator()  # before anything asks CUDA a question
    ranks = parallel.ranks_to_start(cfg.nproc)  # 0 under torchrun, which started this process
    if cfg.plan or cfg.preflight:  # config.json alone, before any weight, data or process group (lib/preflight.py)
        try:
            engine = cfg.rollout if cfg.plan else resolve_engine(cfg.rollout)[0]  # a plan is for GPUs elsewhere
            verdict = preflight.run(cfg, ranks or here.world, argv, engine, here.master)
        except (DataError, ImportError, ValueError) as e:
            fail(str(e), here)
        if cfg.plan:
            return
        if verdict:
            fail(f"{verdict} (--no-preflight: go on anyway)", here)
    if ranks > 1:  # one rank per GPU (or --nproc), started as torchrun would start them
        print(f"train.py: starting {ranks} ranks on this node (torchrun --standalone --nproc_per_node {ranks}); "
              "--nproc 1 runs one process", flush=True)
        sys.exit(parallel.spawn(ranks, os.path.abspath(__file__), argv))
    import launch  # here: the loading machinery's imports take seconds, which a refusal above need not wait for
    dist = parallel.init(cfg.dist_timeout_min)
    if dist.master:
        print(note, flush=True)
    import transformers
    transformers.utils.logging.disable_progress_bar()  # our own bars and log lines say enough
    from tqdm import tqdm
    from eval import evaluate

    lock, error = None, None
    if dist.master:  # rank 0 owns the out_dir; every rank learns whether it may start
        try:
            lock = checkpoint.claim(cfg.out_dir, cfg.resume, cfg.overwrite)
        except CheckpointError as e:
            error = str(e)
    if error := parallel.broadcast(dist, error):
        fail(error, dist)
    try:  # the policy, the data, the engine, FSDP2, the optimizer, a resumed state (launch.py)
        run = launch.start(cfg, dist)
    except (DataError, CheckpointError, ImportError, ValueError) as e:
        fail(str(e), dist)
    model, tok, engine, problems, held, n = run.model, run.tok, run.engine, run.problems, run.held, run.n
    step, cursor, opt = run.step, run.cursor, run.opt
    log = tracking.Log(cfg.out_dir, dist.master, cfg.report_to.split(","), step if run.start_dir else None,
                       dataclasses.asdict(cfg))
    bad_steps, last_saved = 0, run.start_dir

    def run_eval(at):
        if not held:
            return {}, []
        part = held[run.dp_rank::run.dp_world]  # each dp rank its own problems and seed (rank 0: one process's)
        r = evaluate(engine, tok, part, k=1, temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                     seed=cfg.seed + 7919 * at + 1000003 * run.dp_rank, checker=cfg.checker)
        acc = parallel.all_sum(dist, r["accuracy"] * len(part)) / run.tp / len(held)
        return {"eval/accuracy": acc}, [{"step": at, "eval": True, **s} for s in r["samples"][:4]]

    def save(at):
        try:
            checkpoint.save(cfg.out_dir, at, model, tok, opt, dist,
                            {"cursor": cursor, "config": dataclasses.asdict(cfg)},
                            checkpoint.save_dtype(cfg.save_dtype, dist.device))
        except CheckpointError as e:
            fail(str(e), dist, code=1)
        return os.path.join(cfg.out_dir, f"step_{at:06d}")

    with checkpoint.Preemption() as stop:  # SIGTERM, Ctrl-C: finish the step, checkpoint, exit
        if step == 0:
            row, samples = run_eval(0)
            log.metrics({"step": 0, **row, **parallel.peak_memory(dist)})  # the start's peak (vLLM's profiling)
            log.completions(samples)
        bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps,
                   disable=not (dist.master and cfg.progress), desc=cfg.method, dynamic_ncols=True)
        for step in bar:
            t0 = time.time()
            # 1. rollout: n samples for each of this rank's prompts (rollout.py)
            idx = data.batch_indices(len(problems), cursor, cfg.batch_prompts, cfg.seed)[run.dp_rank::run.dp_world]
            cursor += cfg.batch_prompts
            if cfg.method == "sft":  # 1-5. no rollouts: each prompt's verified teacher alone is the batch
                trained, adv = hapo.teacher_only([problems[i] for i in idx][dist.rank % run.tp::run.tp])
                logged = hapo.teacher_metrics(trained)
            else:
                seed = ((cfg.seed * 1000003 + step) * 1009 + run.dp_rank) * len(idx) * n  # one per sample
                completions, logps = engine.generate([problems[i].prompt_ids for i in idx], n, cfg.max_new_tokens,
                                                     cfg.temperature, logprobs=True, seed=seed)  # and their log-probs
                mine = [(i, completions[g * n:(g + 1) * n], logps[g * n:(g + 1) * n])
                        for g, i in enumerate(idx)][dist.rank % run.tp::run.tp]
                # 2. reward: 1 when the last boxed answer equals the gold one (Eq. 4, reward.py)
                groups = []
                for i, resp, lp in mine:
                    texts = tok.batch_decode(resp, skip_special_tokens=True)
                    cut = [truncated(r, tok.eos_token_id) for r in resp]  # no EOS: max_new_tokens or max_model_len
                    rewards = [run.score(t, problems[i].answer) for t in texts]
                    groups.append(hapo.Group(problems[i].prompt_ids, resp, rewards, problems[i].solution_ids,
                                             run.teacher_ok[i], truncated=cut, sampler_logp=lp))
                # 3. confidence c = (1+S)/(2+N) and the gate c < gamma(t) (Eqs. 5-6, Algorithm 1)
                gamma = threshold(step / max(cfg.max_steps - 1, 1), cfg.gamma, cfg.gamma_schedule, cfg.gamma_end)
                opened, conf = hapo.gate_groups(groups, cfg.method, gamma)  # [M], [M]
                # 4. SSI: in each opened group the worst rollout becomes the verified teacher (Eq. 7)
                trained = hapo.inject(groups, opened, cfg.method)
                # 5. advantages, on the groups after SSI (Eq. 2)
                adv = hapo.advantages(trained, cfg.adv_std)  # [M, N]
                logged = hapo.metrics(groups, trained, opened, conf)
                logged[1]["train/gamma"] = gamma
            if cfg.vllm_sleep:  # vLLM hands its memory back to the trainer, weights and all: a sync
                engine.sleep(level=2)  # always comes first when it next samples (sft: before it evaluates)
            # 6-7. loss (Eqs. 8-9) over the packed batch, and the optimizer step (update.py)
            batch = hapo.pack(trained, adv, tok.pad_token_id, cfg.mask_truncated).to(dist.device)
            result = update.optimize(run.policy, opt, batch, cfg, dist, lr=update.lr_at(step, cfg))
            # 8. weight sync into the rollout engine (sft's samples only to evaluate)
            evaluating = (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps
            if cfg.method != "sft" or evaluating:
                engine.sync_weights(model)
            # 9. log
            row = {"step": step + 1, **parallel.reduce_metrics(dist, *logged), **result,
                   "train/lr": opt.param_groups[0]["lr"]}
            row["time/step_s"] = dt = time.time() - t0
            if cfg.method != "sft":  # sft generates nothing
                gen_tokens = parallel.all_sum(dist, float(sum(len(r) for _, resp, _ in mine for r in resp)))
                row["time/tokens_per_s"] = gen_tokens / dt
            samples = []
            if evaluating:
                evaluated, samples = run_eval(step + 1)
                row.update(evaluated)
            if cfg.log_completions_every and (step + 1) % cfg.log_completions_every == 0:
                samples = tracking.train_samples(trained[:2], tok, step + 1) + samples
            log.metrics({**row, **parallel.peak_memory(dist)})  # the step's peak, its evaluation's included
            log.completions(samples)
            if dist.master:
                bar.write(tracking.line(row))
            # 10. checkpoint, and the two ways a run stops early: non-finite updates, or a signal
            bad_steps = bad_steps + 1 if result["train/skipped_updates"] == cfg.mini_batches else 0
            if bad_steps >= 3:
                fail(f"step {step + 1}: the loss or gradient was not finite for {bad_steps} steps in a row (updates "
                     f"skipped); the last good checkpoint is {last_saved or 'none'}: lower --lr and --resume", dist, 1)
            signum = int(parallel.all_max(dist, float(stop.signum or 0)))  # every rank stops at the same step
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or signum:
                last_saved = save(step + 1)
            if signum:
                fail(f"stopped by {stop.name(signum)} after step {step + 1}; checkpoint {last_saved}; continue with "
                     "--resume", dist, 128 + signum, kind="")
    log.close()
    parallel.close(dist)
    if lock:
        lock.close()


if __name__ == "__main__":
    main()
