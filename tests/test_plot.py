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
