"""Tier 3: end to end. train.py for a few steps on the built-in model, its one-line errors on bad
input, and smoke runs of the scripts (scripts/experiment.py, scripts/probe.py)."""

import importlib.util
import json
import math
import os

import pytest

from tests.helpers import ROOT, TRAIN_SMALL, run_train


def _script(name):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_end_to_end_few_steps(tmp_path):
    import train
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
    AutoModelForCausalLM.from_pretrained(os.path.join(out, ckpt)), AutoTokenizer.from_pretrained(os.path.join(out, ckpt))


def test_train_bad_input_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "result": "2"}\n')
    cases = [(["--bogus_flag", "1"], "unrecognized arguments"),
             (["--model", str(tmp_path / "no_such_model")], "does not exist"),
             (["--data", str(bad)], "bad.jsonl"),
             (["--method", "ppo"], "--method")]
    for args, words in cases:
        r = run_train(*args, "--out_dir", str(tmp_path / "o"))
        assert r.returncode == 2, (args, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)


def test_experiment_script_smoke(tmp_path, capsys):
    experiment = _script("experiment")
    out = str(tmp_path / "exp")
    table = experiment.main(["--out", out, "--seeds", "1", "--steps", "2", "--eval_every", "2", "--jobs", "2",
                             "--batch_prompts", "2", "--group_size", "2", "--max_new_tokens", "8",
                             "--eval_problems", "4", "--rollout", "hf"])
    assert set(table) == {"hapo", "grpo", "luffy", "srft"}
    assert table["grpo"]["teacher_total"] == 0 and table["luffy"]["teacher_total"] == 4  # 2 groups x 2 steps
    assert "| hapo |" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "summary.json")))["srft"]["seeds"] == 1
    before = os.path.getmtime(os.path.join(out, "hapo_s0", "metrics.jsonl"))
    experiment.main(["--out", out, "--seeds", "1", "--steps", "2", "--eval_every", "2"])  # finished: not rerun
    assert os.path.getmtime(os.path.join(out, "hapo_s0", "metrics.jsonl")) == before


def test_probe_script_smoke(capsys):
    probe = _script("probe")
    logliks = {}
    for variant in ("full", "teacher_only"):
        probe.main(["--steps", "2", "--every", "1", "--variant", variant])
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
        assert [int(l.split()[1]) for l in lines] == [0, 1, 2]
        logliks[variant] = [float(l.split("teacher log-lik")[1].split()[0]) for l in lines]
        assert all(x < 0 for x in logliks[variant])
    assert logliks["full"][0] == logliks["teacher_only"][0]  # the same base model
    assert logliks["full"][2] != logliks["teacher_only"][2]  # the failures' advantages moved the weights
