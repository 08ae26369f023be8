"""scripts/plot.py: a picture of any run, read from its metrics.jsonl (tier 1: fake runs; the fast
tier's real train.py run is plotted in tests/test_end_to_end.py)."""

import json
import os

import pytest

from tests.helpers import script


def _run(path, rows, tail=""):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(path)


def test_plot_reads_a_run_still_going_and_a_resumed_one(tmp_path):
    plot = script("plot")
    rows = [{"step": s, "train/reward": 0.0} for s in range(4)]
    redone = [{"step": 2, "train/reward": 0.5}, {"step": 3, "train/reward": 0.75}]  # after a resume from step 1
    out = _run(tmp_path / "run", rows + redone, tail='{"step": 4, "train/rew')  # torn: still writing
    assert [(r["step"], r["train/reward"]) for r in plot.read_metrics(out)] == [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.75)]
    assert plot.read_metrics(str(tmp_path / "nothing")) == []


def test_plot_draws_every_panel_of_several_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = script("plot")
    hapo = _run(tmp_path / "hapo", [{"step": 0, "eval/accuracy": 0.0}] +
                [{"step": s, "train/reward": s / 10, "train/teacher_injected": 16 - s, "train/gate_open_frac": 1 - s / 10,
                  "train/response_len": 44.0, "train/truncated_frac": 0.0, **({"eval/accuracy": 0.5} if s == 5 else {})}
                 for s in range(1, 6)])
    sft = _run(tmp_path / "sft", [{"step": s, "train/teacher_injected": 16} for s in range(1, 6)])  # no rollouts
    titles = plot.main([hapo, sft, "--smooth", "2"])
    assert titles == [title for _, title in plot.PANELS] and len(titles) == 6
    png = os.path.join(hapo, "curves.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {png}"


@pytest.mark.parametrize("case", ["missing", "empty", "torn only"])
def test_plot_a_missing_or_empty_out_dir_is_one_line(tmp_path, capsys, case):
    plot = script("plot")
    out = str(tmp_path / "run")
    if case != "missing":
        _run(out, [], tail="" if case == "empty" else '{"step": 0, "ev')
    with pytest.raises(SystemExit) as e:
        plot.main([out])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("plot.py: error: ") and out in err[0]


def test_experiment_gives_the_second_stage_its_own_flags_and_records_wall_time(tmp_path, monkeypatch):
    """--sft_share splits a pipeline's steps, --then_args reach its second stage only and last (train.py's
    argparse keeps the last value), and each stage's wall time lands in its out_dir."""
    import argparse
    experiment = script("experiment")
    assert experiment.stages("r", "sft-then-grpo", 100, 0.5) == [("sft", 50, os.path.join("r", "1_sft"), None),
                                                                  ("grpo", 50, os.path.join("r", "2_grpo"),
                                                                   os.path.join("r", "1_sft"))]
    cmds = []

    class Done:
        returncode = 0

        def poll(self):
            return 0
    monkeypatch.setattr(experiment.subprocess, "Popen", lambda cmd, **kw: cmds.append(cmd) or Done())
    args = argparse.Namespace(out=str(tmp_path), methods=["sft-then-grpo"], seeds=1, steps=8, sft_share=0.25,
                              jobs=1, eval_every=4, train_args=["--lr", "5e-4"], then_args="--lr 5e-5")
    experiment.run_all(args)
    assert [c[c.index("--max_steps") + 1] for c in cmds] == ["2", "6"]
    assert cmds[0][-2:] == ["--lr", "5e-4"] and cmds[1][-4:] == ["--model", os.path.join(args.out, "sft-then-grpo_s0", "1_sft"),
                                                                  "--lr", "5e-5"]
    experiment.add_wall(os.path.join(args.out, "sft-then-grpo_s0", "2_grpo"), 60.0)  # a resumed session adds up
    assert 60.0 <= experiment.wall(os.path.join(args.out, "sft-then-grpo_s0"), "sft-then-grpo") < 70.0
