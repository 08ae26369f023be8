"""eval.py, the paper's Table 1 on files of both layouts. avg@k and pass@1 by hand, the real
command on the tiny model (in this process), and a scripted engine for what must hold exactly: one score per
benchmark, resume without regenerating finished problems, one-line errors."""

import json
import os
import re

import pytest
import torch


def _write_benchmarks(tmp_path):
    """A flat .jsonl (no data_source: the benchmark is the file stem) and a LUFFY-layout parquet
    holding two benchmarks. Problems are `a+b=?` so a scripted engine can answer them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    flat = tmp_path / "arith.jsonl"
    flat.write_text("".join(json.dumps({"problem": f"{a}+{b}=?", "answer": str(a + b)}) + "\n"
                            for a, b in [(1, 2), (3, 4), (6, 1), (2, 2), (9, 9)]))
    system = {"role": "system", "content": "Think, then put the answer in \\boxed{}."}
    rows = [{"prompt": [system, {"role": "user", "content": f"{a}+{b}=?"}],
             "reward_model": {"ground_truth": str(a + b), "style": "rule"}, "data_source": src}
            for src, a, b in [("toy_a", 3, 1), ("toy_b", 1, 1), ("toy_a", 6, 5), ("toy_b", 2, 7),
                              ("toy_a", 4, 4), ("toy_b", 5, 0), ("toy_b", 3, 3)]]
    luffy = tmp_path / "valid.parquet"
    pq.write_table(pa.Table.from_pylist(rows), luffy)
    return str(flat), str(luffy)


def _right(a, j):
    """The scripted engine's rule: sample j of a problem with first operand a is correct iff this."""
    return (a + j) % 3 == 0


class ScriptedEngine:
    """Answers `a+b=?` with \\boxed{a+b} when _right(a, j), else \\boxed{a+b+1}; counts calls and can
    be told to die (KeyboardInterrupt, like Ctrl-C) on a given call."""

    def __init__(self, tok, die_on_call=None):
        self.tok, self.die_on_call, self.prompts = tok, die_on_call, []

    def generate(self, prompts, n, max_new_tokens, temperature, top_p=1.0, seed=None):
        if self.die_on_call == len(self.prompts) + 1:
            raise KeyboardInterrupt
        self.prompts.append(prompts)
        out = []
        for p in prompts:
            a, b = map(int, re.search(r"(\d+)\+(\d+)=\?", self.tok.decode(p)).groups())
            for j in range(n):
                text = f"so \\boxed{{{a + b if _right(a, j) else a + b + 1}}}"
                out.append(self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])
        return out


@pytest.fixture
def scripted(monkeypatch):
    """Make eval.main build ScriptedEngines; returns the list of engines built."""
    import rollout
    built, die = [], {}
    def fake_make_engine(kind, model, tokenizer, model_path, **kw):
        built.append(ScriptedEngine(tokenizer, die.pop("on_call", None)))
        return built[-1]
    monkeypatch.setattr(rollout, "make_engine", fake_make_engine)
    return built, die


def _samples(out_dir):
    return [json.loads(l) for l in open(os.path.join(out_dir, "samples.jsonl"))]


def _check_summary_matches_samples(out_dir):
    """summary.json is recomputable from samples.jsonl: avg@k = mean reward, pass@1 = mean over
    problems of the fraction correct."""
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    samples = _samples(out_dir)
    for bench, s in summary.items():
        mine = [r for r in samples if r["benchmark"] == bench]
        assert len(mine) == s["n_problems"] * s["k"]
        assert len({(r["problem_id"], r["sample"]) for r in mine}) == len(mine)  # no duplicates
        assert s["avg_at_k"] == pytest.approx(sum(r["reward"] for r in mine) / len(mine))
        per = [[r["reward"] for r in mine if r["problem_id"] == i] for i in range(s["n_problems"])]
        assert s["pass_at_1"] == pytest.approx(sum(sum(p) / len(p) for p in per) / len(per))
    return summary, samples


# ----------------------------------------------------------------------------


def test_metrics_by_hand():
    from eval import avg_at_k, default_k, pass_at_1, summarize
    assert avg_at_k([[1.0, 0.0], [1.0, 1.0]]) == pass_at_1([[1.0, 0.0], [1.0, 1.0]]) == 0.75
    assert avg_at_k([[1.0], [1.0, 0.0, 0.0, 0.0]]) == pytest.approx(0.4)  # only if k differs
    assert pass_at_1([[1.0], [1.0, 0.0, 0.0, 0.0]]) == pytest.approx(0.625)
    assert avg_at_k([]) == pass_at_1([]) == 0.0
    assert [default_k(n) for n in (30, 83, 99, 100, 500, 675)] == [32, 32, 32, 1, 1, 1]
    recs = [{"problem_id": i, "reward": r} for i, r in enumerate([1.0, 0.0, 1.0, 1.0])]
    s = summarize(recs)
    assert s["accuracy"] == s["avg_at_k"] == s["pass_at_1"] == 0.75 and (s["n_problems"], s["k"]) == (4, 1)


def test_cli_tiny_model_both_layouts(tmp_path, capsys):
    """The real command, in this process: tiny model, HF engine, a .jsonl and a two-benchmark parquet."""
    import eval
    from reward import extract_boxed, reward
    flat, luffy = _write_benchmarks(tmp_path)
    out = tmp_path / "out"
    eval.main(["--model", "tiny", "--benchmarks", flat, luffy, "--k", "2", "--max_new_tokens", "8",
               "--out_dir", str(out), "--rollout", "hf"])  # returns: no SystemExit, the exit code 0
    assert "| benchmark | problems | k | avg@k (%) | pass@1 (%) |" in capsys.readouterr().out
    summary, samples = _check_summary_matches_samples(out)
    assert {b: (s["n_problems"], s["k"]) for b, s in summary.items()} == \
        {"arith": (5, 2), "toy_a": (3, 2), "toy_b": (4, 2)}
    assert set(samples[0]) >= {"benchmark", "problem_id", "sample", "completion", "extracted", "reward"}
    for r in samples:  # each line is what reward.py says of its own completion
        assert r["reward"] == reward(r["completion"], r["answer"])
        assert r["extracted"] == extract_boxed(r["completion"])
        assert 1 <= r["n_tokens"] <= 8


def test_cli_scores_benchmarks_separately(tmp_path, scripted, capsys):
    import eval
    flat, luffy = _write_benchmarks(tmp_path)
    operands = {"arith": [1, 3, 6, 2, 9], "toy_a": [3, 6, 4], "toy_b": [1, 2, 5, 3]}
    for k in (1, 3):
        out = str(tmp_path / f"k{k}")
        summary = eval.main(["--model", "tiny", "--benchmarks", flat, luffy, "--k", str(k),
                             "--max_new_tokens", "8", "--out_dir", out])
        assert summary == _check_summary_matches_samples(out)[0]
        for bench, a in operands.items():
            expected = sum(_right(x, j) for x in a for j in range(k)) / (len(a) * k)
            assert summary[bench]["avg_at_k"] == pytest.approx(expected)
            assert summary[bench]["pass_at_1"] == pytest.approx(expected)
    # with k = 1, pass@1 is plain accuracy: arith 3/5 right (a = 3, 6, 9), toy_a 2/3, toy_b 1/4
    k1 = json.load(open(tmp_path / "k1" / "summary.json"))
    assert [k1[b]["pass_at_1"] for b in ("arith", "toy_a", "toy_b")] == \
        pytest.approx([3 / 5, 2 / 3, 1 / 4])
    assert "| toy_a | 3 | 1 | 66.7 | 66.7 |" in capsys.readouterr().out


def _one_line_error(capsys, argv, code=2):
    import eval
    capsys.readouterr()  # drop earlier output (progress bars)
    with pytest.raises(SystemExit) as e:
        eval.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval.py: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(tmp_path, scripted, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    no_answer = tmp_path / "noanswer.jsonl"
    no_answer.write_text(json.dumps({"problem": "1+1=?"}) + "\n" + json.dumps({"problem": "2+2=?"}) + "\n")
    no_gt = tmp_path / "nogt.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "1+1=?"}],
                                          "data_source": "x"}]), no_gt)
    out = str(tmp_path / "out")
    err = _one_line_error(capsys, ["--model", "tiny", "--benchmarks", str(no_answer), "--out_dir", out])
    assert "noanswer.jsonl" in err and "answer" in err
    err = _one_line_error(capsys, ["--model", "tiny", "--benchmarks", str(no_gt), "--out_dir", out])
    assert "nogt.parquet" in err
    missing = str(tmp_path / "no_such_model")
    err = _one_line_error(capsys, ["--model", missing, "--benchmarks", str(no_answer), "--out_dir", out])
    assert err.startswith(f"eval.py: error: model path '{missing}' does not exist")
    _one_line_error(capsys, ["--model", "tiny", "--benchmarks", "builtin", "--out_dir", out, "--bogus", "1"])
    _one_line_error(capsys, ["--model", "./out/step_1", "--benchmarks", "builtin", "--out_dir", out])
    _one_line_error(capsys, ["--model", "tiny", "--benchmarks", str(tmp_path / "nofile.jsonl"), "--out_dir", out])
    assert not scripted[0]  # every error came before an engine was built


def test_resolve_model(tmp_path):
    from lib import tiny
    from lib.models import resolve_model
    assert resolve_model("tiny") == tiny.SHIPPED
    assert resolve_model("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # a hub id, left to from_pretrained
    (tmp_path / "step_000010").mkdir()
    (tmp_path / "step_000010" / "config.json").write_text("{}")
    (tmp_path / "latest").write_text("step_000010\n")  # a training out_dir: its latest checkpoint
    assert resolve_model(str(tmp_path)) == str(tmp_path / "step_000010")
    assert resolve_model(str(tmp_path / "step_000010")) == str(tmp_path / "step_000010")


def test_cli_resume_skips_finished_problems(tmp_path, scripted, capsys):
    import eval
    flat, _ = _write_benchmarks(tmp_path)
    built, die = scripted
    out = str(tmp_path / "out")
    argv = ["--model", "tiny", "--benchmarks", flat, "--k", "2", "--max_new_tokens", "8",
            "--out_dir", out, "--batch_prompts", "1"]
    die["on_call"] = 3  # killed while generating the third problem
    with pytest.raises(KeyboardInterrupt):
        eval.main(argv)
    first = open(os.path.join(out, "samples.jsonl")).read()
    assert len(first.splitlines()) == 4  # problems 0 and 1, two samples each, flushed as they finished
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        f.write('{"benchmark": "arith", "problem_id": 2, "sam')  # a line cut by the kill
    summary = eval.main(argv)
    assert len(built[1].prompts) == 3  # problems 2, 3, 4 only, one generate() call each
    asked = [built[1].tok.decode(p[0]) for p in built[1].prompts]
    assert asked == ["6+1=?", "2+2=?", "9+9=?"]
    assert open(os.path.join(out, "samples.jsonl")).read().startswith(first)  # records unchanged
    _, samples = _check_summary_matches_samples(out)
    assert summary["arith"]["n_problems"] == 5 and len(samples) == 10
    assert summary["arith"]["avg_at_k"] == pytest.approx(
        sum(_right(a, j) for a in (1, 3, 6, 2, 9) for j in range(2)) / 10)
    assert "2 of 5 problems already in" in capsys.readouterr().out
    assert eval.main(argv) == summary and built[2].prompts == []  # nothing left to do
    assert eval.main(argv[:-2] + ["--limit", "2"])["arith"]["n_problems"] == 2  # a subset reuses them too
    # other sampling settings must not be mixed into the same samples
    err = _one_line_error(capsys, argv + ["--temperature", "1.0"])
    assert "temperature 0.6 != 1.0" in err


def test_evaluate_keeps_rng_and_adds_no_bos():
    from lib import tiny
    from lib.data import Problem
    from eval import evaluate
    from rollout import HFEngine
    tok = tiny.make_tokenizer()
    engine = HFEngine(tiny.make_model(tok), tok)
    seen = []
    class Recording:
        def generate(self, prompts, *args, **kw):
            seen.extend(prompts)
            return engine.generate(prompts, *args, **kw)
    problems = [Problem([{"role": "user", "content": f"{a}+{a}=?"}], str(2 * a), "") for a in range(10, 15)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1 = evaluate(Recording(), tok, problems, k=2, max_new_tokens=6, seed=5, batch_prompts=2)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    r2 = evaluate(Recording(), tok, problems, k=2, max_new_tokens=6, seed=5, batch_prompts=2)
    assert [s["completion"] for s in r1["samples"]] == [s["completion"] for s in r2["samples"]]
    assert seen[0] == tok("10+10=?", add_special_tokens=False)["input_ids"] and len(seen[0]) == 7  # no BOS
    assert (r1["n_problems"], r1["k"], len(r1["samples"])) == (5, 2, 10)
    mean = sum(s["reward"] for s in r1["samples"]) / 10
    assert r1["accuracy"] == r1["avg_at_k"] == r1["pass_at_1"] == pytest.approx(mean)
    assert [(s["problem_id"], s["sample"]) for s in r1["samples"][:3]] == [(0, 0), (0, 1), (1, 0)]
