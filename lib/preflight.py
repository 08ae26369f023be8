"""Before any weight is read: will this run fit the machine it is on? If not, one line naming what would.

    python train.py --model Qwen/Qwen2.5-Math-7B     # on one 80 GB GPU:
    train.py: error: does not fit: 186.6 GiB per GPU of 79.2; fits: torchrun --nproc_per_node 8 train.py ...

plan.py's arithmetic on config.json, for the hardware the run really has: the ranks it will start,
each GPU's memory as CUDA reports it (an H100 "80GB" is 79.2 GiB), or on a CPU the host's RAM, which
every rank shares. What would fit is searched in this order: more ranks on this node, then the
largest --micro_batch_tokens or --vllm_gpu_memory that fit (plan.headroom), then a node with more
GPUs of this size, then several such nodes. `--no-preflight` skips all of it.
"""

import dataclasses
import os
import sys

from lib import plan
from lib.data import DataError
from lib.plan import GiB, Hardware

CPU_RANK_HOST_GIB = 1.0  # one CPU rank's python, torch and transformers (train.py's RSS is ~0.7 GiB)
GPUS_PER_NODE = 8  # the node size suggested when this one has too few GPUs
SEVERAL_NODES = [(k, GPUS_PER_NODE) for k in (2, 4, 8)]  # (nodes, GPUs each) tried past one node


def host_ram_gib():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def hardware(nproc, cuda):
    """The Hardware this run will have: torchrun's ranks if it started us, else `nproc` on this node;
    each GPU's memory as CUDA reports it, or on a CPU the host's RAM (all ranks share it)."""
    world = int(os.environ.get("WORLD_SIZE", nproc))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda:
        import torch
        gib = torch.cuda.get_device_properties(0).total_memory / GiB
    else:
        gib = host_ram_gib()
    return Hardware(max(1, world // per_node), per_node, gib)


def cpu_need(config, cfg, world):
    """Host RAM (bytes) of `world` CPU ranks: each its trainer, its HF engine and its process."""
    p = plan.plan(config, dataclasses.replace(cfg, rollout="hf"), Hardware(1, world, 1e9), cuda=False)
    return world * (p["trainer"]["peak"] + p["vllm"]["total"] + CPU_RANK_HOST_GIB * GiB)


def smallest_fit(config, cfg, gib, shapes):
    """The first (Hardware, plan) of `shapes` [(nodes, gpus)] on which the run fits, or None."""
    for nodes, gpus in shapes:
        hw = Hardware(nodes, gpus, gib)
        if cfg.batch_prompts % (hw.world * cfg.mini_batches) == 0:  # whole groups on every rank
            p = plan.plan(config, cfg, hw)
            if p["fits"]:
                return hw, p
    return None


def torchrun_line(hw, p, command):
    where = f"torchrun --nnodes {hw.nodes} --nproc_per_node {hw.gpus}" if hw.nodes > 1 else \
        f"torchrun --nproc_per_node {hw.gpus}"
    return f"{where} {command} ({p['per_gpu'] / GiB:.1f} GiB; --plan {plan.plan_name(hw)})"


def check(config, cfg, hw, cuda, gpus_here, command):
    """None when the run fits `hw`, else the one line that says by how much and what would fit.
    `gpus_here`: the GPUs this node has; `command`: the run's own command line, for the suggestion."""
    if not cuda:
        need = cpu_need(config, cfg, hw.world)
        if need <= plan.FRAGMENTATION * hw.gib * GiB:
            return None
        on_gpus = dataclasses.replace(cfg, rollout="vllm")  # what --rollout auto takes on a GPU node with vLLM
        gpu = smallest_fit(config, on_gpus, 80.0, [(1, n) for n in (1, 2, 4, GPUS_PER_NODE)] + SEVERAL_NODES)
        where = f"a GPU node: {torchrun_line(*gpu, command)}" if gpu else "no GPU node of up to 8 x 8 x 80 GiB"
        return (f"does not fit: the run needs {need / GiB:,.1f} GiB of host RAM ({hw.world} CPU rank(s)), this "
                f"machine has {hw.gib:.1f} GiB; fits: {where}")
    p = plan.plan(config, cfg, hw)
    if p["fits"]:
        return None
    if cfg.rollout == "hf" and plan.plan(config, dataclasses.replace(cfg, rollout="vllm"), hw)["fits"]:
        return (f"does not fit: {p['per_gpu'] / GiB:.1f} GiB per GPU of {hw.gib:.1f} with the HF engine (a full "
                "fp32 KV cache of every rollout); fits: vLLM, pip install vllm (README), then the same command")
    more_here = smallest_fit(config, cfg, hw.gib, [(1, n) for n in range(hw.gpus + 1, gpus_here + 1)]) \
        if hw.nodes == 1 else None
    if more_here:
        fits = torchrun_line(*more_here, command)
    else:
        memory, tokens = plan.headroom(config, cfg, hw)
        flag = (f"--micro_batch_tokens {tokens}" if tokens and tokens < (cfg.micro_batch_tokens or 1 << 30) else
                f"--vllm_gpu_memory {memory:g}" if memory and cfg.rollout != "hf" else None)
        bigger = None if flag else smallest_fit(
            config, cfg, hw.gib, [(1, n) for n in range(hw.gpus + 1, GPUS_PER_NODE + 1)] + SEVERAL_NODES)
        if flag:
            fits = f"{command} {flag} (--plan {plan.plan_name(hw)} shows the rest)"
        elif bigger:
            hw_, _ = bigger
            fits = torchrun_line(*bigger, command) + (f" on a node of {hw_.gpus} such GPUs" if hw_.nodes == 1 else
                                                      f" on {hw_.nodes} nodes of {hw_.gpus} such GPUs")
        else:
            fits = "nothing up to 8 nodes of 8 such GPUs: see --plan"
    return f"does not fit: {p['per_gpu'] / GiB:.1f} GiB per GPU of {hw.gib:.1f}; fits: {fits}"


def run(cfg, world, argv, engine, master=True):
    """train.py's --plan (the table on rank 0; returns None) or its pre-flight for `world` ranks and the
    resolved rollout `engine` (None when the run fits, else the line). Reads config.json alone; a model
    whose config cannot be read is planned not at all: --plan raises DataError in one line, the pre-flight
    says it skipped and lets the model's loading report why."""
    import torch
    from lib.models import load_config, resolve_model
    path = resolve_model(cfg.model)
    if cfg.plan:
        try:
            if master:  # under torchrun, one table
                plan.main(cfg, path)
            return None
        except (OSError, ValueError) as e:  # no config.json here nor in the hub cache
            why = str(e).splitlines()[0][:200]
            raise DataError(f"--plan: could not read the config.json of '{cfg.model}' ({why}); give a local "
                            "directory or download it first (hf download MODEL config.json)") from None
    try:
        config = load_config(path, cfg.rope_theta, cfg.max_positions)
    except DataError as e:  # no config.json to be had (no network?): loading the model will say why, in its words
        if master:
            print(f"train.py: pre-flight skipped: {e}", file=sys.stderr, flush=True)
        return None
    cuda = torch.cuda.is_available()
    return check(config, dataclasses.replace(cfg, rollout=engine), hardware(world, cuda), cuda,
                 torch.cuda.device_count() if cuda else 0, " ".join(["train.py", *argv]))
