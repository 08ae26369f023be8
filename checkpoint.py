"""Checkpoints for exact resume, and the out_dir they live in.

    <out_dir>/step_NNNNNN/   model + tokenizer (save_pretrained: transformers and vLLM load it)
                             state.pt: step, data cursor, optimizer, every rank's RNG state, config
    <out_dir>/latest         the name of the newest complete checkpoint
    <out_dir>/lock           held (flock) by the one run that owns out_dir

What is guaranteed: a checkpoint is written to a temporary directory and renamed, and `latest` is
replaced the same way, so a crash, a kill or a full disk never leaves a half checkpoint behind a
name; a failed write removes its partial files; non-finite weights are never saved; pruning only
removes checkpoints older than one just written; and a damaged newest checkpoint falls back to the
previous complete one. Under FSDP2 the full state is gathered to rank 0, which alone writes.
"""

import errno
import fcntl
import glob
import os
import random
import re
import shutil
import signal
import sys

import numpy as np
import torch
import torch.distributed as tdist

from data import one_line
from parallel import all_sum, broadcast


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


def save(out_dir, step, model, tok, opt, dist, extra, keep=2):
    """Write <out_dir>/step_NNNNNN atomically, point `latest` at it, and remove checkpoints older
    than it beyond the newest `keep`. `extra` (data cursor, config) goes into state.pt with the
    optimizer and RNG states. Raises CheckpointError, with nothing half-written left behind, for
    non-finite weights or a failed write (a full disk)."""
    bad = sum(not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    if all_sum(dist, float(bad)):  # every rank checks its own shards, and all agree
        raise CheckpointError(f"step {step}: the weights are not finite; not saved")
    rngs = [None] * dist.world
    if dist.world > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, opt_sd = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
        tdist.all_gather_object(rngs, rng_state())
    else:
        model_sd, opt_sd, rngs = model.state_dict(), opt.state_dict(), [rng_state()]
    error = None
    if dist.master:
        final = os.path.join(out_dir, f"step_{step:06d}")
        tmp = final + f".tmp{os.getpid()}"
        try:
            model.save_pretrained(tmp, state_dict=model_sd)
            tok.save_pretrained(tmp)
            torch.save({"step": step, "optimizer": opt_sd, "rng": rngs, "world": dist.world, **extra},
                       os.path.join(tmp, "state.pt"))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
                f.write(os.path.basename(final))
            os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
        except Exception as e:  # a full disk surfaces as OSError, or RuntimeError from torch.save's zip writer
            _remove(tmp)
            _remove(os.path.join(out_dir, "latest.tmp"))
            full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "unexpected pos" in str(e)
            error = (f"step {step}: {'no space left on device' if full else one_line(e)} writing {final} "
                     f"(partial files removed); the last good checkpoint is {latest(out_dir) or 'none'}")
        else:
            older = [s for s in steps(out_dir) if s < step]
            for s in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(os.path.join(out_dir, f"step_{s:06d}"), ignore_errors=True)
    if error := broadcast(dist, error):
        raise CheckpointError(error)


# ----------------------------------------------------------------------------
# resuming


def read_state(path, dist):
    """A checkpoint's state.pt; raises CheckpointError (one line) when it is missing or unreadable.
    Under FSDP2 the file is memory-mapped, so ranks other than 0 read only the small entries."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False, mmap=dist.world > 1)
        state["step"], state["cursor"], state["rng"], state["optimizer"]  # noqa: B018 (all there?)
    except Exception as e:  # a truncated or garbled file can fail in many ways
        raise CheckpointError(f"{path}/state.pt is unreadable ({one_line(e)})") from None
    if state["world"] != dist.world:
        raise RankMismatch(f"--resume: {path} was written by {state['world']} rank(s), not {dist.world}: resume it with "
                           "as many (that would mix two experiments)")
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


def load_state(state, model, opt, dist):
    """state.pt's optimizer and this rank's RNG into the run (the model came from the checkpoint's
    directory). Under FSDP2 rank 0 holds the full optimizer state and broadcasts it into the shards."""
    if dist.world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state["optimizer"] if dist.master else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][dist.rank])


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
