"""Tier 3: what a run survives. Each test is a fault an operator causes: a learning rate that makes
the loss non-finite, SIGTERM and Ctrl-C, a reused out_dir, two runs at once, a full disk, damaged
checkpoints, a changed config on resume, bad flags, an oversized prompt, leftovers of killed writes.
A run must lose at most one step and never the last good checkpoint.

train.py runs in this process (train_here) unless the process boundary is the point: a signal, and
the out_dir lock held by another process. One uninterrupted 6-step run and one 2-step run serve the
whole module."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lib import checkpoint
from tests.helpers import ROOT, TRAIN_SMALL, metrics, train_here

FAST = TRAIN_SMALL + ["--eval_every", "100", "--log_completions_every", "0"]


def _one_line(r, words, code=2):
    """The run ended with `code` and said one line on stderr, containing each of `words`, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip() and "warning" not in line]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _finite(ckpt):
    from transformers import AutoModelForCausalLM
    return all(torch.isfinite(p).all() for p in AutoModelForCausalLM.from_pretrained(ckpt).parameters())


@pytest.mark.slow
def test_non_finite_updates_are_skipped_then_the_run_stops_naming_the_last_good_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    r = train_here(capsys, *FAST, "--lr", "1e3", "--max_steps", "12", "--save_every", "1", "--out_dir", out)
    line = _one_line(r, ["not finite for 3 steps in a row", "last good checkpoint is", "step_"], code=1)
    rows = metrics(out)[1:]
    assert any(row["train/skipped_updates"] for row in rows) and len(rows) < 12
    ckpts = [d for d in os.listdir(out) if d.startswith("step_")]
    assert ckpts and all(_finite(os.path.join(out, d)) for d in ckpts)  # never a non-finite model
    assert os.path.join(out, open(os.path.join(out, "latest")).read().strip()) in line
    r = train_here(capsys, *FAST, "--lr", "1e-4", "--max_steps", str(len(rows) + 1), "--out_dir", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]


def _start(out, *extra):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--out_dir", out, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for_step(out, step, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        try:
            if len(open(os.path.join(out, "metrics.jsonl")).read().splitlines()) > step:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {out}: {proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() else ''}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of a 6-step run that nothing stops: what a stopped-and-resumed run must log."""
    import train
    out = str(tmp_path_factory.mktemp("uninterrupted") / "a")
    train.main(FAST + ["--max_steps", "6", "--save_every", "100", "--out_dir", out])
    return metrics(out)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished 2-step run with a checkpoint at each step; tests change a copy (finished_run)."""
    import train
    out = str(tmp_path_factory.mktemp("two_steps") / "run")
    train.main(FAST + ["--max_steps", "2", "--save_every", "1", "--out_dir", out])
    return out


@pytest.fixture
def finished_run(two_step_run, tmp_path):
    """This test's copy of the 2-step run."""
    return shutil.copytree(two_step_run, str(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, sig, uninterrupted, capsys):
    b = str(tmp_path / "b")
    proc = _start(b, "--max_steps", "6", "--save_every", "100")
    _wait_for_step(b, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = _one_line(r, [f"stopped by {sig.name}", "checkpoint", "--resume"], code=128 + sig)
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert 2 <= stopped < 6 and open(os.path.join(b, "latest")).read() == f"step_{stopped:06d}"
    r = train_here(capsys, *FAST, "--max_steps", "6", "--save_every", "100", "--out_dir", b, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    mb = metrics(b)
    assert [r["step"] for r in mb] == list(range(7))
    for ra, rb in zip(uninterrupted, mb):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-9), ra["step"]


@pytest.mark.slow
def test_a_fresh_run_refuses_an_out_dir_that_holds_a_run(finished_run, capsys):
    out = finished_run  # a finished 2-step run, --save_every 1
    before = open(os.path.join(out, "metrics.jsonl")).read()
    _one_line(train_here(capsys, *FAST, "--max_steps", "2", "--out_dir", out),
              ["already holds a run", "--resume", "--overwrite"])
    assert open(os.path.join(out, "metrics.jsonl")).read() == before  # nothing truncated
    r = train_here(capsys, *FAST, "--max_steps", "1", "--out_dir", out, "--overwrite")
    assert r.returncode == 0 and sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000001"]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """Name-sorted pruning once deleted a new step_000002 beside an old run's step 4 and 6."""
    from lib import tiny
    from lib.parallel import Dist
    out = tmp_path / "run"
    for old in ("step_000004", "step_000006"):
        (out / old).mkdir(parents=True)
    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(str(out), 2, model, tok, opt, Dist(), {"cursor": 0, "config": {}})
    assert sorted(os.listdir(out)) == ["latest", "step_000002", "step_000004", "step_000006"]
    checkpoint.save(str(out), 3, model, tok, opt, Dist(), {"cursor": 0, "config": {}})
    assert sorted(os.listdir(out)) == ["latest", "step_000002", "step_000003", "step_000004", "step_000006"]
    checkpoint.save(str(out), 7, model, tok, opt, Dist(), {"cursor": 0, "config": {}})
    assert sorted(os.listdir(out)) == ["latest", "step_000006", "step_000007"]
    assert open(out / "latest").read() == "step_000007"
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match="not finite"):
        checkpoint.save(str(out), 8, model, tok, opt, Dist(), {"cursor": 0, "config": {}})
    assert sorted(os.listdir(out)) == ["latest", "step_000006", "step_000007"]


@pytest.mark.slow
def test_a_second_run_in_the_same_out_dir_is_refused_and_a_stale_lock_is_not(tmp_path, capsys):
    out = str(tmp_path / "run")
    first = _start(out, "--max_steps", "40")  # another process holds the lock
    try:
        _wait_for_step(out, 1, first)
        _one_line(train_here(capsys, *FAST, "--max_steps", "2", "--out_dir", out, "--resume"),
                  ["another run", f"pid {first.pid}", "--out_dir"])
    finally:
        first.kill()
        first.wait()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "lock").write_text("99999999")  # a dead process's: its flock died with it
    assert train_here(capsys, *FAST, "--max_steps", "1", "--out_dir", str(tmp_path / "other")).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB, mounted when this process may mount (as root in CI)."""
    mounted = []

    def make(mb):
        path = tmp_path / f"disk{mb}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()[:100]})")
        mounted.append(path)
        return str(path)
    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial_files(small_disk, capsys):
    # a checkpoint of the tiny model is ~14 MB: the exported weights (3.3 MB) and the shards (weights 3.3 MB,
    # AdamW's two moments 6.6 MB); the third is written before the first is pruned: 35 MB hold two
    for mb, saved in ((3, 0), (35, 2)):
        out = small_disk(mb)
        r = train_here(capsys, *FAST, "--max_steps", "6", "--save_every", "1", "--out_dir", out)
        _one_line(r, ["no space left on device", "partial files removed", "last good checkpoint"], code=1)
        left = sorted(os.listdir(out))
        assert not [d for d in left if ".tmp" in d], left
        assert len([d for d in left if d.startswith("step_")]) == saved, left
        if saved:  # the previous checkpoint is intact and resumable
            latest = open(os.path.join(out, "latest")).read()
            assert _finite(os.path.join(out, latest))
            shutil.rmtree(os.path.join(out, sorted(d for d in left if d.startswith("step_"))[0]))  # room again
            r = train_here(capsys, *FAST, "--max_steps", str(int(latest[5:]) + 1), "--save_every", "100",
                           "--out_dir", out, "--resume")
            assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_to_the_previous_complete_one(tmp_path, capsys):
    from lib.models import load_model
    from lib.parallel import Dist
    base = str(tmp_path / "base")
    assert train_here(capsys, *FAST, "--max_steps", "4", "--save_every", "2", "--out_dir", base).returncode == 0
    damage = {"truncated state.pt": (lambda d: _truncate(d, "step_000004/state.pt"), "step_000002"),
              "truncated weights": (lambda d: _truncate(d, "step_000004/model.safetensors"), "step_000002"),
              "missing state.pt": (lambda d: os.remove(os.path.join(d, "step_000004", "state.pt")), "step_000002"),
              "truncated shard": (lambda d: _truncate(d, "step_000004/shards/__0_0.distcp"), "step_000002"),
              "missing shard index": (lambda d: os.remove(os.path.join(d, "step_000004/shards/.metadata")), "step_000002"),
              "garbage latest": (lambda d: open(os.path.join(d, "latest"), "wb").write(b"\x00\xffstep_99"), "step_000004"),
              "empty latest": (lambda d: open(os.path.join(d, "latest"), "w").close(), "step_000004")}
    load = lambda path: load_model(path, dtype=torch.float32)
    for what, (hurt, survivor) in damage.items():
        out = str(tmp_path / what.replace(" ", "_"))
        shutil.copytree(base, out)
        hurt(out)
        capsys.readouterr()
        path, _, _, state = checkpoint.find_resumable(out, load, Dist())
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py: warning:")]
        assert path.endswith(survivor) and state["step"] == int(survivor[5:]), what
        assert len(warnings) == 1 and "step_000004" in warnings[0], (what, warnings)  # one line says what happened
    # and end to end: a run resumes past the damaged newest checkpoint, exactly as from the survivor
    r = train_here(capsys, *FAST, "--max_steps", "5", "--save_every", "100", "--out_dir",
                   str(tmp_path / "truncated_state.pt"), "--resume")
    assert r.returncode == 0 and "cannot resume from" in r.stderr, r.stderr[-2000:]
    assert [row["step"] for row in metrics(str(tmp_path / "truncated_state.pt"))] == list(range(6))
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        checkpoint.find_resumable(str(tmp_path / "empty"), load, Dist())


def _truncate(out, name):
    path = os.path.join(out, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow
def test_resume_refuses_a_changed_experiment_and_applies_a_changed_lr(finished_run, capsys, tmp_path):
    out = finished_run  # a finished 2-step run
    for flag, value in (("--method", "grpo"), ("--group_size", "2"), ("--batch_prompts", "2"),
                        ("--data", "builtin:seed=1"), ("--seed", "1")):
        _one_line(train_here(capsys, *FAST, "--max_steps", "3", "--out_dir", out, "--resume", flag, value),
                  ["--resume", flag.lstrip("-"), "mix two experiments"])
    r = train_here(capsys, *FAST, "--max_steps", "3", "--out_dir", out, "--resume", "--lr", "1e-4",
                   "--weight_decay", "0.1")
    assert r.returncode == 0 and "applying --lr 0.0001 (was 0.0005), --weight_decay 0.1 (was 0.0)" in r.stdout
    assert [row.get("train/lr") for row in metrics(out)] == [None, 5e-4, 5e-4, 1e-4]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(os.path.join(out, "step_000003", "shards"), tmp_path / "state.pt")  # the shards as one file
    groups = torch.load(tmp_path / "state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == 1e-4 and groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("flags,words", [
    (["--lr", "-1"], "--lr"), (["--max_new_tokens", "0"], "--max_new_tokens"), (["--chunk_size", "0"], "--chunk_size"),
    (["--eval_every", "0"], "--eval_every"), (["--save_every", "0"], "--save_every"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "0"], "--temperature"), (["--gamma", "1.5"], "--gamma"),
    (["--batch_prompts", "16", "--mini_batches", "5"], "--batch_prompts"),
    (["--eval_problems", "-5"], "--eval_problems"), (["--grad_clip", "-1"], "--grad_clip"),
    (["--method", "ppo"], "--method"), (["--report_to", "mlflow"], "--report_to"),
    (["--pack"], "--pack"), (["--resume", "--overwrite"], "contradict"),
    (["--dist_timeout_min", "0"], "--dist_timeout_min"), (["--save_dtype", "fp16"], "--save_dtype")])
def test_bad_flags_are_one_line_before_any_work(flags, words, capsys):
    import train
    from lib.parallel import Dist
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags, Dist())
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("train.py: error: ") and "\n" not in err and words in err


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    _one_line(train_here(capsys, "--out_dir", str(tmp_path / "f")), ["--out_dir", "is a file"])


def test_metrics_with_a_torn_last_line_are_repaired_on_resume(tmp_path):
    from lib import tracking
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x"')
    inode = os.stat(path).st_ino
    log = tracking.Log(str(tmp_path), True, resume_step=1)
    assert [json.loads(line) for line in open(path)] == [{"step": 0}, {"step": 1, "x": 1}]
    assert os.stat(path).st_ino != inode  # rewritten through a temporary file and a rename
    assert log.notes and "torn" in log.notes[0]


def test_leftovers_of_killed_writes_are_cleaned(tmp_path):
    out = tmp_path / "run"
    (out / "step_000002.tmp4242").mkdir(parents=True)
    (out / "latest.tmp").write_text("step_000002")
    lock = checkpoint.claim(str(out), resume=False, overwrite=False)
    lock.close()
    assert sorted(os.listdir(out)) == ["lock"]


@pytest.mark.slow
def test_eval_leaves_out_an_oversized_prompt_and_says_so(tmp_path, capsys):
    import eval
    import rollout
    from tests.test_eval import ScriptedEngine
    bench = tmp_path / "b.jsonl"
    rows = [{"problem": "1+2=?", "answer": "3"}, {"problem": "9" * 1_000_000 + "+1=?", "answer": "1"},
            {"problem": "2+2=?", "answer": "4"}]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    class Recording(ScriptedEngine):
        def generate(self, prompts, *a, **kw):
            seen.extend(len(p) for p in prompts)
            return super().generate(prompts, *a, **kw)
    old = rollout.make_engine
    rollout.make_engine = lambda kind, model, tok, path, **kw: Recording(tok)
    try:
        summary = eval.main(["--model", "tiny", "--benchmarks", str(bench), "--k", "1", "--max_new_tokens", "8",
                             "--out_dir", str(tmp_path / "o")])
    finally:
        rollout.make_engine = old
    assert summary["b"]["n_problems"] == 2 and summary["b"]["dropped_long_prompt"] == 1
    assert max(seen) < 100
    assert "1 problem(s) with prompts over --max_prompt_tokens 1024 left out" in capsys.readouterr().err
