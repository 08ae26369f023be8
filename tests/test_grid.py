"""scripts/grid.py: each row's setting chosen on the validation split (issue 28), on fake run trees (tier 1)."""

import json
import os

import pytest

from tests.helpers import script


def _run(grid, setting, method, accs, wall=60.0, stages=None):
    """A finished one-seed run of `method` under grid/setting with these validation accuracies (every 25 steps)."""
    path = os.path.join(grid, setting, f"{method}_s0")
    parts = [path] if stages is None else [os.path.join(path, s) for s in stages]
    for k, part in enumerate(parts):
        os.makedirs(part)
        rows = [{"step": 25 * i, "eval/accuracy": a} for i, a in enumerate(accs)]
        rows[1:] = [{**r, "train/reward": 0.5, "train/truncated_frac": 0.25} for r in rows[1:]]
        with open(os.path.join(part, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        if wall is not None:
            open(os.path.join(part, "wall_s"), "w").write(f"{wall}\n")


def test_grid_keeps_the_default_unless_beaten_by_the_margin(tmp_path, capsys):
    grid = script("grid")
    g = str(tmp_path / "grid")
    _run(g, "lr5e-4", "hapo", [0.0, 0.30, 0.60])
    _run(g, "lr1.5e-4", "hapo", [0.0, 0.20, 0.64])  # ahead by 0.04: noise, the default stays
    _run(g, "lr5e-4", "luffy", [0.0, 0.10, 0.40])
    _run(g, "lr5e-5", "luffy", [0.0, 0.30, 0.55])  # ahead by 0.15: moves
    _run(g, "lr1.5e-4", "luffy", [0.0, 0.50, 0.70], wall=None)  # still going: not a candidate
    for lr in ("lr5e-4", "lr1.5e-4"):
        _run(g, lr, "grpo", [0.0, 0.0, 0.0])  # every setting ties at 0: the default
    _run(g, "lr1.5e-4_sft0.25", "sft-then-grpo", [0.0, 0.1, 0.8], stages=["1_sft", "2_grpo"])
    _run(g, "lr5e-4_sft0.25", "sft-then-grpo", [0.0, 0.1, 0.0], stages=["1_sft", "2_grpo"])
    chosen = grid.main([g])
    assert chosen == {"hapo": "lr5e-4", "luffy": "lr5e-5", "grpo": "lr5e-4", "sft-then-grpo": "lr1.5e-4_sft0.25"}
    out = capsys.readouterr().out
    assert "| lr5e-5 (chosen) | 0-50 | 0.000 / 0.300 / 0.550 | **0.550** | 0.50 | 0.25 | 1.0 |" in out
    assert "0.700" not in out  # the unfinished run is not listed
    assert grid.main([g, "--margin", "0.0"])["hapo"] == "lr1.5e-4"
    names = ["lr5e-5", "notes", "lr1.5e-4_sft0.5", "lr5e-4", "lr1.5e-4_sft0.25"]
    assert sorted(names, key=grid.order) == ["lr5e-4", "lr1.5e-4_sft0.25", "lr1.5e-4_sft0.5", "lr5e-5", "notes"]


def test_grid_refuses_what_it_cannot_read(tmp_path):
    grid = script("grid")
    with pytest.raises(SystemExit, match="is not a directory"):
        grid.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no finished run"):
        grid.main([str(tmp_path)])
    _run(str(tmp_path / "a"), "lr5e-4", "hapo", [0.0, 0.5])
    _run(str(tmp_path / "b"), "lr5e-4", "hapo", [0.0, 0.6])
    with pytest.raises(SystemExit, match="in two of"):
        grid.main([str(tmp_path / "a"), str(tmp_path / "b")])


def test_the_figure_labels_each_row_with_its_runs_wall_times():
    experiment = script("experiment")
    assert experiment.legend("hapo", [246.0, 234.0, 240.0]) == "hapo (4.1, 3.9, 4.0 min)"
    assert experiment.legend("sft", [0.0, 60.0]) == "sft (1.0 min)"  # a run without wall_s is left out
    assert experiment.legend("grpo", [0.0]) == "grpo"


def test_the_pipeline_runs_at_its_chosen_setting_unless_told_otherwise():
    """experiment.py's defaults are the settings grid.py chose (docs/RESULTS.md, docs/EVIDENCE.md):
    a quarter SFT then lr 1.5e-4 on the built-in task, half SFT on the evidence preset; flags given win."""
    experiment = script("experiment")
    builtin, evidence = experiment.parse_args([]), experiment.parse_args(["--preset", "evidence"])
    assert (builtin.sft_share, builtin.then_args) == (0.25, "--lr 1.5e-4")
    assert (evidence.sft_share, evidence.then_args, evidence.steps) == (0.5, "--lr 1.5e-4", 300)
    untuned = experiment.parse_args(["--preset", "evidence", "--sft_share", "0.25", "--then_args=--lr 5e-4"])
    assert (untuned.sft_share, untuned.then_args) == (0.25, "--lr 5e-4")
    n = [steps for _, steps, _, _ in experiment.stages("out", "sft-then-grpo", evidence.steps, evidence.sft_share)]
    assert n == [150, 150]
