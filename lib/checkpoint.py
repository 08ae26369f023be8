"""Checkpoints for exact resume, and the out_dir they live in (docs/CHECKPOINTS.md has the details).

    <out_dir>/step_NNNNNN/   the policy in --save_dtype, and the tokenizer (save_pretrained: what
                             transformers, vLLM and eval.py load); written by rank 0
        shards/              the training state in fp32: model + AdamW, torch.distributed.checkpoint,
                             one file per rank (__R_0.distcp), each written by its rank, in parallel
        state.pt             step, data cursor, every rank's RNG state, the number of ranks, config
    <out_dir>/latest         the name of the newest complete checkpoint
    <out_dir>/lock           held (flock) by the one run that owns out_dir

What is guaranteed: a checkpoint is written to a temporary directory and renamed, and `latest` is
replaced the same way, so a crash, a kill or a full disk never leaves a half checkpoint behind a
name; a failed write (on any rank) removes its partial files; non-finite weights are never saved;
pruning only removes checkpoints older than one just written; and a damaged newest checkpoint
falls back to the previous complete one. Resume reads the shards, not the exported policy, so it is
exact whatever --save_dtype; every rank reads its own shard (a resume builds the model on the meta
device and never holds it whole). One code path for one rank and for many.
"""

import copy
import errno
import fcntl
import glob
import os
import random
import re
import shutil
import signal
import sys
import warnings

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lib.data import one_line
from lib.parallel import all_sum, broadcast


class CheckpointError(Exception):
    """A problem with out_dir or a checkpoint; the message is one line that says what and where."""


class RankMismatch(CheckpointError):
    """A checkpoint written by another number of ranks: refused, not passed over as damage."""


# ----------------------------------------------------------------------------
# the out_dir: one owner, no leftovers


def claim(out_dir, resume, overwrite):
    """Make out_dir this run's: take its lock (a second run, or a stale lock of a live process, is
    refused; a dead process's flock is gone with it), remove leftovers of killed writes, and refuse
    a fresh run over an old one unless overwrite. Returns the open lock file (keep it open)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"--out_dir '{out_dir}' is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise CheckpointError(f"another run (pid {lock.read().strip() or '?'}) is using --out_dir '{out_dir}'; "
                              "wait for it to finish or choose another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))  # for the message a second run gets
    lock.flush()
    for leftover in glob.glob(os.path.join(out_dir, "step_*.tmp*")) + glob.glob(os.path.join(out_dir, "*.tmp")):
        _remove(leftover)
    old = steps(out_dir)
    if not resume and (old or _has_rows(os.path.join(out_dir, "metrics.jsonl"))):
        if not overwrite:
            what = f"checkpoints up to step {max(old)}" if old else "a metrics.jsonl"
            raise CheckpointError(f"--out_dir '{out_dir}' already holds a run ({what}); pass --resume to "
                                  "continue it or --overwrite to start over")
        for name in [f"step_{s:06d}" for s in old] + ["latest", "metrics.jsonl", "completions.jsonl"]:
            _remove(os.path.join(out_dir, name))
    return lock


def _remove(path):
    """A file or a directory tree, if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def _has_rows(path):
    return os.path.exists(path) and os.path.getsize(path) > 0


def steps(out_dir):
    """The steps of the checkpoint directories in out_dir (complete or not), ascending."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return sorted(int(m[1]) for n in names if (m := re.fullmatch(r"step_(\d+)", n)))


def candidates(out_dir):
    """(checkpoint directories to resume from, best first: the one `latest` names, then every other
    step_NNNNNN, newest first; a line saying what is wrong with `latest`, or None). Whether a
    checkpoint is readable is found by reading it."""
    out, problem, path = [], None, os.path.join(out_dir, "latest")
    try:
        name = open(path).read().strip()
        if re.fullmatch(r"step_\d+", name) and os.path.isdir(os.path.join(out_dir, name)):
            out.append(os.path.join(out_dir, name))
        else:
            problem = f"{path} names no checkpoint ({name[:40]!r})"
    except (OSError, UnicodeDecodeError) as e:
        problem = f"{path} is unreadable ({one_line(e)})"
    return out + [p for s in reversed(steps(out_dir)) if (p := os.path.join(out_dir, f"step_{s:06d}")) not in out], problem


def latest(out_dir):
    """The newest checkpoint directory that a model can be loaded from (eval.py's view), or None."""
    done = [p for p in candidates(out_dir)[0] if os.path.exists(os.path.join(p, "config.json"))]
    return done[0] if done else None


# ----------------------------------------------------------------------------
# saving


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def save_dtype(name, device):
    """--save_dtype as a torch dtype: auto is bf16 on a GPU (what vLLM serves) and fp32 on a CPU."""
    return DTYPES[name] if name in DTYPES else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def training_state(model, opt):
    """Model and optimizer as this rank holds them (its shards under FSDP2), keyed by parameter name:
    what torch.distributed.checkpoint writes and reads in place. A tied weight is kept under its first
    name only (lm_head.weight is embed_tokens.weight). Creates AdamW's state if it is empty."""
    seen, aliases = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases.add(name)
        seen.add(id(t))
    weights = {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, opt)}


def _dcp(fn, state, path, dist):
    """dcp.save or dcp.load on every rank; one process needs no process group (and no warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        fn(state, checkpoint_id=path, no_dist=dist.world == 1)


def export(model, dtype, dist):
    """The whole model in `dtype` on rank 0's CPU (an empty dict elsewhere), one tensor at a time, for
    save_pretrained: each is cast on its shard before the gather, so the traffic and rank 0's RAM are
    those of `dtype`. A tied weight is gathered once and named twice (save_pretrained drops the alias)."""
    out, done = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in done:
            x = t.detach().to(dtype) if t.is_floating_point() else t.detach()
            x = x.full_tensor() if hasattr(x, "full_tensor") else x  # every rank takes part
            done[id(t)] = x.cpu() if dist.master else None
        if dist.master:
            out[name] = done[id(t)]
    return out


def _causes(e):
    """The exceptions behind e: DCP gathers every rank's failure into one CheckpointException."""
    return [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]


def save(out_dir, step, model, tok, opt, dist, extra, dtype=torch.float32, keep=2):
    """Write <out_dir>/step_NNNNNN atomically, point `latest` at it, and remove checkpoints older
    than it beyond the newest `keep`. Every rank writes its shards of the training state; rank 0 then
    writes the policy in `dtype`, state.pt (with `extra`: data cursor, config) and renames. Raises
    CheckpointError on every rank, with nothing half-written left behind, for non-finite weights or a
    failed write on any rank (a full disk)."""
    bad = sum(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if all_sum(dist, float(bad)):  # every rank checks its own shards, and all agree
        raise CheckpointError(f"step {step}: the weights are not finite; not saved")
    final = os.path.join(out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"  # one name for all ranks; the out_dir's lock makes it this run's
    if dist.master:
        _remove(tmp)
    rngs = [None] * dist.world
    if dist.world > 1:  # also the barrier: no rank writes into tmp before rank 0 has cleared it
        tdist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    error = None
    try:
        _dcp(dcp.save, training_state(model, opt), os.path.join(tmp, "shards"), dist)  # a failure raises on all ranks
        weights = export(model, dtype, dist)
        if dist.master:
            model.save_pretrained(tmp, state_dict=weights)
            config = copy.deepcopy(model.config)
            config.dtype = str(dtype).split(".")[1]  # save_pretrained wrote the trainer's; loaders read this one
            config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            torch.save({"step": step, "rng": rngs, "world": dist.world, **extra}, os.path.join(tmp, "state.pt"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
                f.write(os.path.basename(final))
            os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        error = e
    message = None
    if dist.master and error is not None:
        _remove(tmp)
        _remove(os.path.join(out_dir, "latest.tmp"))
        causes = _causes(error)  # a full disk surfaces as OSError, or RuntimeError from torch.save's zip writer
        full = any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) or "unexpected pos" in str(c)
                   for c in causes)
        message = (f"step {step}: {'no space left on device' if full else one_line(causes[0])} writing {final} "
                   f"(partial files removed); the last good checkpoint is {latest(out_dir) or 'none'}")
    elif dist.master:
        older = [s for s in steps(out_dir) if s < step]
        for s in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(os.path.join(out_dir, f"step_{s:06d}"), ignore_errors=True)
    if message := broadcast(dist, message):
        raise CheckpointError(message)


# ----------------------------------------------------------------------------
# resuming


def verify(path):
    """Raise unless the checkpoint at `path` is whole, reading only headers: every file the shards'
    metadata names is there and long enough, and every exported weight file's header matches its size."""
    from safetensors import safe_open
    meta = dcp.FileSystemReader(os.path.join(path, "shards")).read_metadata()
    for info in meta.storage_data.values():
        file = os.path.join(path, "shards", info.relative_path)
        if not os.path.exists(file) or os.path.getsize(file) < info.offset + info.length:
            raise CheckpointError(f"shard file {info.relative_path} is missing or truncated")
    exported = glob.glob(os.path.join(path, "*.safetensors"))
    if not exported or not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError("the exported policy (config.json, *.safetensors) is missing")
    for file in exported:
        with safe_open(file, "pt"):  # a truncated file fails here ("file not fully covered")
            pass


def read_state(path, dist):
    """A checkpoint's state.pt, once the checkpoint is verified whole; raises CheckpointError (one
    line) when something is missing or unreadable, RankMismatch for another number of ranks."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        state["step"], state["cursor"], state["rng"], state["world"]  # noqa: B018 (all there?)
    except Exception as e:  # a truncated or garbled file can fail in many ways
        raise CheckpointError(f"{path}/state.pt is unreadable ({one_line(e)})") from None
    if state["world"] != dist.world:
        raise RankMismatch(f"--resume: {path} was written by {state['world']} rank(s), not {dist.world}: resume it with "
                           "as many (that would mix two experiments)")
    try:
        verify(path)
    except Exception as e:
        raise CheckpointError(f"{path} is incomplete ({one_line(e)})") from None
    return state


def find_resumable(out_dir, load, dist):
    """(path, model, tokenizer, state) of the newest checkpoint that reads back whole: `load(path)`
    gives (model, tokenizer). A damaged `latest` or checkpoint is passed over with a warning line
    each, down to the oldest; none readable raises CheckpointError."""
    paths, problem = candidates(out_dir)
    say = (lambda msg: print(f"train.py: warning: {msg}", file=sys.stderr)) if dist.master else (lambda msg: None)
    if problem and paths:
        say(f"{problem}; trying the newest checkpoint directory, {paths[0]}")
    for path in paths:
        try:
            state = read_state(path, dist)  # first: cheap, and a rank mismatch is no damage
            return (path, *load(path), state)
        except RankMismatch:
            raise
        except Exception as e:  # DataError from the loader, CheckpointError from read_state, or worse
            say(f"cannot resume from {path} ({one_line(e)[:300]}); trying the previous checkpoint")
    raise CheckpointError(f"--resume: no readable checkpoint in '{out_dir}'")


def load_state(path, state, model, opt, dist):
    """The checkpoint's shards into the wrapped model and the optimizer, in place (each rank reads
    its own), and this rank's RNG state. Raises CheckpointError (one line)."""
    try:
        sd = training_state(model, opt)
        _dcp(dcp.load, sd, os.path.join(path, "shards"), dist)
        set_model_state_dict(model, sd["model"], options=StateDictOptions(strict=False))  # the aliases are tied
        set_optimizer_state_dict(model, opt, sd["optimizer"])
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"--resume: cannot read the shards of {path} ({one_line(_causes(e)[0])})") from None
    set_rng_state(state["rng"][dist.rank])


# fields a resumed run may change (and says so); any other change would mix two experiments
MAY_CHANGE_ON_RESUME = {"lr", "lr_schedule", "warmup_steps", "weight_decay", "max_steps", "eval_every", "save_every",
                        "save_dtype", "dist_timeout_min",
                        "eval_problems", "out_dir", "resume", "overwrite", "report_to", "log_completions_every",
                        "progress", "rollout", "vllm_gpu_memory", "vllm_sleep", "tensor_parallel",
                        "grad_checkpointing", "chunk_size", "micro_batch", "micro_batch_tokens", "pack", "attn",
                        "recipe", "preflight", "nproc", "print_config", "plan"}



def check_resume(new: dict, old: dict, path: str) -> str:
    """A resumed run's config (`new`) against its checkpoint's (`old`): raises CheckpointError (one line)
    when a change would mix two experiments; returns the changes it applies, said in words ('' if none)."""
    mixed = [k for k in new if k not in MAY_CHANGE_ON_RESUME and k in old and old[k] != new[k]]
    if mixed:
        k = mixed[0]
        raise CheckpointError(f"--resume: {path} was trained with --{k} {old[k]}, not {new[k]}: that would mix two "
                              "experiments (use another --out_dir, or the same flag)")
    changed = [f"--{k} {new[k]} (was {old[k]})" for k in new if k in old and old[k] != new[k] and k != "resume"]
    scheduled = [s for s in ("gamma_schedule", "lr_schedule") if new[s] != "constant"]
    if "max_steps" in old and old["max_steps"] != new["max_steps"] and scheduled:
        changed.append(f"(the {' and '.join(scheduled)} now span the new --max_steps)")
    return ", ".join(changed)


# ----------------------------------------------------------------------------
# preemption


class Preemption:
    """While entered, SIGTERM (what cluster schedulers send before a kill) and SIGINT (Ctrl-C) ask
    the run to stop: `signum` is set, the loop finishes its step, writes a checkpoint and exits with
    128 + the signal's number. A second signal exits at once, without a checkpoint."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @staticmethod
    def name(signum):
        return signal.Signals(signum).name

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"train.py: {signal.Signals(signum).name} again: exiting now, without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
