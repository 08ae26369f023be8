"""The evidence experiment (docs/EVIDENCE.md): the exact gate probability behind Theorem 4.2, the
task variant built to test it (easy prompts mixed in, a wordy teacher), and a smoke run of the
experiment's one command."""

import math
import os

import pytest
import torch

from lib import task
from lib.data import builtin_task, load_problems
from gate import gate, gate_open_probability, hoeffding_bound
from reward import reward
from tests.helpers import script


def _pair(p):
    return tuple(map(int, p.prompt[-1]["content"].rstrip("=?").split("+")))


# ----------------------------------------------------------------------------
# gate.py: P(gate open) exactly, against Eq. 11's bound and against simulation


def test_gate_open_probability_exact_values_and_the_loose_bound():
    # N = 8, gamma = 0.8: the gate opens for S <= 6, so P = 1 - P(S = 7) - P(S = 8)
    p = gate_open_probability(0.9, 0.8, 8)
    assert p == pytest.approx(1 - 8 * 0.9**7 * 0.1 - 0.9**8, abs=1e-12)
    assert round(p, 3) == 0.187 and round(hoeffding_bound(0.9, 0.8, 8), 2) == 0.85
    assert gate_open_probability(0.0, 0.8, 8) == 1.0 and gate_open_probability(1.0, 0.8, 8) == 0.0
    mus = [i / 100 for i in range(101)]
    probs = [gate_open_probability(mu, 0.8, 8) for mu in mus]
    assert all(a >= b for a, b in zip(probs, probs[1:]))  # falls as the policy improves
    assert all(q > 0 for q in probs[:-1])  # for a fixed N it vanishes only at mu = 1
    for mu, q in zip(mus, probs):
        if mu > 0.8:
            assert q <= hoeffding_bound(mu, 0.8, 8)  # Eq. 11 holds, and is loose
    assert gate_open_probability(0.99, 0.8, 8) > 0.002  # one prompt in 400 still gets the teacher


def test_gate_open_probability_matches_simulated_gate():
    """The exact binomial value against gate() itself on simulated groups, N = 8 and others."""
    g = torch.Generator().manual_seed(0)
    trials = 40000
    for n in (4, 7, 8, 16):
        for mu in (0.3, 0.6, 0.8, 0.9, 0.95):
            rewards = (torch.rand(trials, n, generator=g) < mu).float()  # [trials, N]
            freq = gate(rewards, 0.8)[0].double().mean().item()
            exact = gate_open_probability(mu, 0.8, n)
            sd = math.sqrt(exact * (1 - exact) / trials)
            assert abs(freq - exact) <= 5 * sd + 1e-9, (n, mu, freq, exact)


# ----------------------------------------------------------------------------
# task.py: the easy/hard mix and the wordy teacher


def test_task_easy_share_mixes_solvable_and_unsolvable_sums():
    train, evaluation = builtin_task(n_train=400, n_eval=40, easy=0.5)
    seen = set(task.seen_three_digit_pairs())
    seen |= {(b, a) for a, b in seen}
    for split, n in ((train, 400), (evaluation, 40)):
        pairs = [_pair(p) for p in split]
        assert len(set(pairs)) == n and sum(a + b < 1000 for a, b in pairs) == n // 2
        assert all(100 <= a <= 999 and 100 <= b <= 999 for a, b in pairs)
        assert not set(pairs) & seen  # never a sum the base model was pretrained on
        assert sum(a + b < 1000 for a, b in pairs[: n // 4]) not in (0, n // 4)  # interleaved
    # the mix holds out prefixes of the pure tasks' eval pairs, and trains on none of either
    hard = [_pair(p) for p in builtin_task(n_train=10, n_eval=40)[1]]
    easy = [_pair(p) for p in builtin_task(n_train=10, n_eval=40, easy=1.0)[1]]
    held = [_pair(p) for p in evaluation]
    assert sorted(x for x in held if sum(x) >= 1000) == sorted(hard[:20])
    assert sorted(x for x in held if sum(x) < 1000) == sorted(easy[:20])
    both = set(hard + easy)
    assert not {_pair(p) for p in train} & (both | {(b, a) for a, b in both})
    assert all(a + b < 1000 for a, b in easy) and all(a + b >= 1000 for a, b in hard)


def test_task_easy_zero_is_the_original_task_and_mixes_are_seeded():
    assert task.make_pairs(300, 30, 0, 3, 0.0) == task.make_pairs(300, 30, 0, 3)
    assert task.make_pairs(300, 30, 1, 3, 0.3) == task.make_pairs(300, 30, 1, 3, 0.3)
    assert task.make_pairs(300, 30, 1, 3, 0.3) != task.make_pairs(300, 30, 2, 3, 0.3)
    train, evaluation = task.make_pairs(300, 30, 0, 2, 0.3)  # other widths: no carry out for easy
    assert sum(a + b < 100 for a, b in train) == 90 and sum(a + b < 100 for a, b in evaluation) == 9
    with pytest.raises(ValueError):
        task.make_pairs(10, 10, 0, 3, 1.5)


def test_task_wordy_teacher_keeps_the_policys_lines_in_one_block():
    short, wordy = task.solve(890, 328), task.solve(890, 328, "wordy")
    assert wordy == "We add 890 and 328 column by column.\n" + short.replace(
        "\\boxed", "so 890+328=1218\n\\boxed")
    assert short.rsplit("\n", 1)[0] in wordy  # the column lines untouched and contiguous
    for teacher in task.TEACHERS:
        train, evaluation = builtin_task(n_train=20, n_eval=10, easy=0.5, teacher=teacher)
        for p in train + evaluation:
            assert reward(p.solution, p.answer) == 1.0 and p.solution.count("\\boxed") == 1
    lengths = {t: len(task.solve(890, 328, t)) for t in task.TEACHERS}
    assert lengths["standard"] < lengths["wordy"] < lengths["verbose"]


def test_task_recap_and_tail_teachers():
    """recap: the standard solution word for word, then text after the box; tail: the same text
    between the column lines and the box. Both right, both about twice as long."""
    short = task.solve(890, 328)
    recap, tail = task.solve(890, 328, "recap"), task.solve(890, 328, "tail")
    assert recap.startswith(short + "\n") and recap.count("\\boxed") == 1
    assert recap.split("\n")[-3:] == ["so 890+328=1218", "and 328+890=1218", "so the answer is 1218"]
    assert tail.startswith(short.rsplit("\n", 1)[0] + "\nso 890+328=1218\n") and tail.endswith("\\boxed{1218}")
    assert reward(recap, "1218") == reward(tail, "1218") == 1.0
    assert 2 * len(short) < len(recap) == len(tail) < 2.5 * len(short)  # the same lines, reordered
    assert reward(recap + "\n\\boxed{5}", "1218") == 0.0  # a second box after the recap would count


def test_task_easy_digits_two_mixes_in_pretrained_two_digit_sums():
    train, evaluation = task.make_pairs(200, 20, 0, 3, 0.25, easy_digits=2)
    small = [(a, b) for a, b in train + evaluation if a < 100]
    assert len(small) == 55 and all(10 <= a <= 99 and 10 <= b <= 99 for a, b in small)
    assert all(a + b >= 1000 for a, b in train + evaluation if a >= 100)
    assert task.parse_spec("builtin:easy=0.25,easy_digits=2") == {"easy": 0.25, "easy_digits": 2}


def test_builtin_spec_easy_and_teacher_options():
    assert task.parse_spec("builtin:easy=0.5,wordy") == {"easy": 0.5, "teacher": "wordy"}
    assert task.parse_spec("builtin:teacher=verbose,easy=1") == {"teacher": "verbose", "easy": 1.0}
    assert task.parse_spec("builtin:verbose,n_eval=5") == {"teacher": "verbose", "n_eval": 5}
    for bad in ("builtin:easy=2", "builtin:easy=x", "builtin:teacher=long", "builtin:wordy=1"):
        with pytest.raises(ValueError, match="unknown option"):
            task.parse_spec(bad)
    problems, _ = load_problems("builtin:easy=0.25,wordy,n_train=40,n_eval=8", "eval")
    assert problems == builtin_task(n_train=40, n_eval=8, easy=0.25, teacher="wordy")[1]
    assert sum(int(p.answer) < 1000 for p in problems) == 2


def test_shipped_base_model_solves_the_easy_share_and_none_of_the_hard():
    """The variant's premise: the base model succeeds on its own on the easy prompts only."""
    from lib.models import load_model, resolve_model
    from rollout import HFEngine
    model, tok = load_model(resolve_model("tiny"), dtype=torch.float32)
    problems = builtin_task(n_train=10, n_eval=16, easy=0.5)[1]
    ids = [tok(task.question(*_pair(p)), add_special_tokens=False)["input_ids"] for p in problems]
    torch.manual_seed(0)
    texts = tok.batch_decode(HFEngine(model, tok).generate(ids, 2, 60, 1.0), skip_special_tokens=True)
    solved = {"easy": [], "hard": []}
    for i, p in enumerate(problems):
        solved["easy" if int(p.answer) < 1000 else "hard"] += [reward(t, p.answer) for t in texts[2 * i:2 * i + 2]]
    assert len(solved["easy"]) == len(solved["hard"]) == 16
    assert sum(solved["easy"]) >= 15 and sum(solved["hard"]) == 0


# ----------------------------------------------------------------------------
# scripts/experiment.py --preset evidence: the one command, cut to seconds


@pytest.mark.slow
def test_evidence_experiment_smoke(tmp_path, capsys):
    """The preset's pipeline end to end at toy size: runs, per-part eval, table, figure, resume."""
    experiment = script("experiment")
    assert "--data" in experiment.PRESETS["evidence"]["train_args"]
    out = str(tmp_path / "ev")
    small = ["--preset", "evidence", "--out", out, "--seeds", "1", "--steps", "2", "--eval_every", "2",
             "--methods", "hapo", "luffy", "sft-then-grpo", "--part_eval", "hard=builtin:n_train=4,n_eval=3",
             "--batch_prompts", "2", "--group_size", "2", "--max_new_tokens", "16", "--eval_problems", "4",
             "--rollout", "hf"]
    table = experiment.main(small)
    assert set(table) == {"hapo", "luffy", "sft-then-grpo"}
    assert table["luffy"]["teacher_total"] == 4 and table["luffy"]["teacher_start"] == 2  # 2 groups x 2 steps
    for t in table.values():
        assert 0 <= t["final_hard_mean"] <= 1 and t["len_start"] > 0 and t["teacher_len"] > 40
    text = capsys.readouterr().out
    assert "| hapo |" in text and "final, hard prompts" in text and "teacher's solutions average" in text
    assert open(os.path.join(out, "table.md")).read().startswith("| method |")
    assert table["sft-then-grpo"]["teacher_total"] == 2  # its SFT step: the 2 teachers; then GRPO: none
    assert os.path.exists(os.path.join(out, "sft-then-grpo_s0", "eval_hard", "summary.json"))  # of its GRPO stage
    samples = os.path.join(out, "hapo_s0", "eval_hard", "samples.jsonl")
    assert sum(1 for _ in open(samples)) == 3
    before = os.path.getmtime(samples)
    experiment.main(small)  # finished runs and evaluations are not redone
    assert os.path.getmtime(samples) == before


def test_experiment_teacher_signal_counts_only_teachers_with_a_gradient():
    experiment = script("experiment")
    row = {"train/teacher_injected": 16, "train/zero_var_frac": 0.25}
    assert experiment.teacher_signal(row, "luffy") == 12  # 4 groups whose 7 samples all succeeded
    assert experiment.teacher_signal(row, "hapo") == 16 and experiment.teacher_signal(row, "srft") == 16


def test_teacher_advantage_table_of_the_write_up():
    """docs/EVIDENCE.md's teacher weights: in a group of 8 holding the teacher and k sampled successes
    (HAPO after SSI with S = k, or LUFFY with k of its 7), Eq. 2 gives the teacher
    A(k) = sqrt(56 (7 - k)) / (8 sqrt(k + 1)); 0 when k = 7 (LUFFY's all-solved groups)."""
    from loss import group_advantages
    expected = [2.475, 1.620, 1.208, 0.935, 0.725, 0.540, 0.354, 0.0]
    for k, want in enumerate(expected):
        rewards = torch.tensor([[1.0] * (k + 1) + [0.0] * (7 - k)])  # the teacher first
        assert group_advantages(rewards)[0, 0].item() == pytest.approx(want, abs=1e-3)

    def mean_teacher_advantage(mu, sampled):  # over k ~ Binomial(sampled, mu), the gate's S <= 6 only
        return sum(math.comb(sampled, k) * mu**k * (1 - mu) ** (sampled - k) * expected[k] for k in range(7))
    assert round(mean_teacher_advantage(0.9, 8), 3) == 0.074  # HAPO
    assert round(mean_teacher_advantage(0.9, 7), 3) == 0.218  # LUFFY
