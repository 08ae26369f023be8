"""End to end: train.py for a few steps on the built-in model (the fast tier's one run), its one-line
errors on bad input, and (tier 3, slow) smoke runs of the scripts (scripts/experiment.py, probe.py)."""

import importlib.util
import json
import math
import os

import pytest
import torch

from tests.helpers import ROOT, TRAIN_SMALL, script, train_here


def test_train_end_to_end_few_steps(tmp_path, monkeypatch):
    """The loop of train.py, in this process: it steps, logs, evaluates, checkpoints, the weights move,
    and the rollout engine samples from the weights just trained. The engine gets a copy of the policy
    (as under torchrun), so that the weight sync is a copy and not a no-op, and can be checked."""
    import copy
    import rollout
    import train
    engines, real = [], rollout.make_engine

    def engine_on_a_copy(kind, model, *args, **kw):
        engines.append(real(kind, copy.deepcopy(model), *args, **kw))
        return engines[-1]
    monkeypatch.setattr(rollout, "make_engine", engine_on_a_copy)
    out = str(tmp_path / "run")
    train.main(TRAIN_SMALL + ["--max_steps", "3", "--out_dir", out, "--method", "hapo"])
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[3]
    need = ["train/reward", "train/response_len", "train/teacher_injected", "train/gate_open_frac",
            "train/zero_var_frac", "train/loss", "train/grad_norm", "time/step_s", "time/tokens_per_s"]
    for r in rows[1:]:
        assert all(k in r for k in need), r
        assert r["train/teacher_injected"] == 4  # untrained: every group fails, the gate opens for all
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
    ckpt = open(os.path.join(out, "latest")).read().strip()
    assert ckpt == "step_000003"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(out, ckpt)).state_dict()
    AutoTokenizer.from_pretrained(os.path.join(out, ckpt))
    from lib.models import load_model, resolve_model
    base = load_model(resolve_model("tiny"))[0].state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # the optimizer stepped
    sampler = engines[0].model.state_dict()
    assert len(engines) == 1 and all(torch.equal(sampler[k], trained[k]) for k in trained)  # and the engine has it
    if importlib.util.find_spec("matplotlib"):  # the README's picture of a run, of this one
        assert len(script("plot").main([out])) == 6 and os.path.exists(os.path.join(out, "curves.png"))


def test_train_bad_input_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "result": "2"}\n')
    cases = [(["--bogus_flag", "1"], "unrecognized arguments"),
             (["--model", str(tmp_path / "no_such_model")], "does not exist"),
             (["--data", str(bad)], "bad.jsonl"),
             (["--method", "ppo"], "--method")]
    for args, words in cases:
        r = train_here(capsys, *args, "--out_dir", str(tmp_path / "o"))
        assert r.returncode == 2, (args, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)


@pytest.mark.slow
def test_experiment_script_smoke(tmp_path, capsys):
    experiment = script("experiment")
    out = str(tmp_path / "exp")
    table = experiment.main(["--out", out, "--seeds", "1", "--steps", "2", "--eval_every", "2", "--jobs", "2",
                             "--batch_prompts", "2", "--group_size", "2", "--max_new_tokens", "8",
                             "--eval_problems", "4", "--rollout", "hf"])
    assert set(table) == {"hapo", "grpo", "luffy", "srft", "sft", "sft-then-grpo"}
    assert table["grpo"]["teacher_total"] == 0 and table["luffy"]["teacher_total"] == 4  # 2 groups x 2 steps
    assert table["sft"]["teacher_total"] == 4 and table["sft"]["len_start"] is None  # no rollouts: no length
    assert table["sft-then-grpo"]["teacher_total"] == 2  # 1 SFT step of 2 teachers, then 1 GRPO step
    assert table["sft-then-grpo"]["len_end"] > 0  # its GRPO stage's rollouts
    pipeline = os.path.join(out, "sft-then-grpo_s0")
    assert [r["step"] for r in experiment.read_metrics(pipeline, "sft-then-grpo")] == [0, 1, 2]
    state = torch.load(os.path.join(pipeline, "2_grpo", "step_000001", "state.pt"), weights_only=False)
    assert state["config"]["model"] == os.path.join(pipeline, "1_sft") and state["config"]["method"] == "grpo"
    text = capsys.readouterr().out
    assert "| hapo |" in text and "| sft | 0.000 |" in text and "| - / - / - |" in text
    assert json.load(open(os.path.join(out, "summary.json")))["srft"]["seeds"] == 1
    before = os.path.getmtime(os.path.join(out, "hapo_s0", "metrics.jsonl"))
    experiment.main(["--out", out, "--seeds", "1", "--steps", "2", "--eval_every", "2"])  # finished: not rerun
    assert os.path.getmtime(os.path.join(out, "hapo_s0", "metrics.jsonl")) == before


@pytest.mark.slow
def test_probe_script_smoke(capsys):
    probe = script("probe")
    logliks = {}
    for variant in ("full", "teacher_only"):
        probe.main(["--steps", "2", "--every", "1", "--variant", variant])
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
        assert [int(l.split()[1]) for l in lines] == [0, 1, 2]
        logliks[variant] = [float(l.split("teacher log-lik")[1].split()[0]) for l in lines]
        assert all(x < 0 for x in logliks[variant])
    assert logliks["full"][0] == logliks["teacher_only"][0]  # the same base model
    assert logliks["full"][2] != logliks["teacher_only"][2]  # the failures' advantages moved the weights


def test_readme_files_table_and_references_match_the_repository():
    """The README's files table and reading path are scripts/files_table.py's (line counts of today),
    and every file the README and docs/ name exists in the repository (a `vllm/...` path names a file
    of the installed vLLM package, which docs/VLLM.md reads from)."""
    import glob
    import re
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert script("files_table").table() in readme, "run python scripts/files_table.py and paste its table"
    assert script("files_table").reading_path() in readme, "paste the reading path files_table.py prints"
    for doc in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")):
        named = set(re.findall(r"[\w./-]+\.(?:md|py|png|txt)\b", open(doc).read()))
        places = (ROOT, os.path.join(ROOT, "lib"), os.path.join(ROOT, "docs"), os.path.join(ROOT, "scripts"), os.path.join(ROOT, "benchmarks"),
                  os.path.join(ROOT, "tests"))
        missing = {n for n in named if not n.startswith("vllm/")
                   and not any(os.path.exists(os.path.join(p, n)) for p in places)}
        assert not missing, (doc, missing)


@pytest.mark.slow
def test_train_logs_completions_and_mirrors_metrics_to_tensorboard(tmp_path, capsys):
    """completions.jsonl gets a few samples with rewards and teacher flags; --report_to tensorboard
    writes the same scalars as metrics.jsonl at the same steps."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "run")
    r = train_here(capsys, *TRAIN_SMALL, "--max_steps", "2", "--out_dir", out, "--report_to", "tensorboard",
                   "--log_completions_every", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    train_rows = [row for row in rows if not row.get("eval")]
    assert {row["step"] for row in train_rows} == {1, 2} and any(row["teacher"] for row in train_rows)
    assert all(set(row) >= {"prompt", "completion", "reward", "teacher"} for row in train_rows)
    assert any(row.get("eval") for row in rows)  # a few held-out completions at each evaluation
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(row["step"], pytest.approx(row["train/loss"], rel=1e-6)) for row in logged if "train/loss" in row]


def test_report_to_a_missing_tracker_is_one_line(tmp_path, monkeypatch):
    from lib import tracking
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert tracking.check_trackers(["wandb"]) == "--report_to wandb needs the wandb package: pip install wandb"
