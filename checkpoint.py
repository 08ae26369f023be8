"""Checkpoints for exact resume: the policy as transformers saves it, plus optimizer, RNG and data state.

    <out_dir>/step_NNNNNN/   model + tokenizer (save_pretrained: transformers and vLLM load it)
                             state.pt: step, data cursor, optimizer, every rank's RNG state, config
    <out_dir>/latest         the name of the newest complete checkpoint

A checkpoint is written to a temporary directory and renamed, and `latest` is replaced the same
way, so a crash never leaves a half checkpoint behind a name. Under FSDP2 the full state is gathered
to rank 0, which alone writes.
"""

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as tdist


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"]), random.setstate(s["python"]), np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(out_dir, step, model, tok, opt, dist, extra, keep=2):
    """Write <out_dir>/step_NNNNNN atomically, point `latest` at it, keep the newest `keep`.
    `extra` (data cursor, config) goes into state.pt beside the optimizer and RNG states."""
    rngs = [None] * dist.world
    if dist.world > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, opt_sd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
        tdist.all_gather_object(rngs, rng_state())
    else:
        model_sd, opt_sd, rngs = model.state_dict(), opt.state_dict(), [rng_state()]
    if dist.master:
        final = os.path.join(out_dir, f"step_{step:06d}")
        tmp = final + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_sd)
        tok.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": opt_sd, "rng": rngs, "world": dist.world, **extra},
                   os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        old = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and ".tmp" not in d)
        for d in old[:-keep]:
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    if dist.world > 1:
        tdist.barrier()


def latest(out_dir):
    """The newest checkpoint's directory, or None when out_dir has none."""
    path = os.path.join(out_dir, "latest")
    if not os.path.exists(path):
        return None
    return os.path.join(out_dir, open(path).read().strip())


def load_state(path, model, opt, dist):
    """A checkpoint's state.pt into the optimizer and this rank's RNG (the model came from its
    directory); returns the state (step, cursor, config, ...) without the optimizer.

    Under FSDP2 rank 0 reads the full optimizer state and broadcasts it tensor by tensor into the
    shards; the file is memory-mapped, so the other ranks read only the small entries."""
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False, mmap=dist.world > 1)
    if state["world"] != dist.world:
        raise ValueError(f"checkpoint {path} was written by {state['world']} ranks; resume it with the same number")
    if dist.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state["optimizer"] if dist.master else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][dist.rank])
    return {k: v for k, v in state.items() if k != "optimizer"}
