"""Tier 1: Eq. 4, the reward, case by case: the table in reward_cases.py, extraction, inputs built
to hang or crash it (power towers, huge factorials, 100k-character answers, many threads), the
issue's thresholds on the realistic set in reward_realistic.py, and the math-verify checker.

`python -m tests.test_reward` prints both checkers' agreement on the table and the realistic set
(the figures in docs/REWARD.md)."""

import importlib.util
import os
import subprocess
import sys
import threading
import time

import pytest

from reward import extract_boxed, is_equiv, reward
from lib.symbolic import check_checker
from tests.helpers import ROOT, box
from tests.reward_cases import CASES
from tests.reward_realistic import DEV


@pytest.mark.parametrize("tag,completion,answer,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_reward_table(tag, completion, answer, expected):
    if "boxed" not in completion and "fbox" not in completion and tag != "extract":
        completion = box(completion)
    assert reward(completion, answer) == expected


def test_table_is_large_and_balanced():
    assert len(CASES) >= 150
    assert 0.4 < sum(c[3] for c in CASES) / len(CASES) < 0.6


def test_agrees_with_sympy_on_its_own_latex():
    # sympy's LaTeX printer writes one expression in several forms; all must be equal, and a shifted one not
    sp = pytest.importorskip("sympy")
    x, y = sp.symbols("x y")
    exprs = [(x + 1) ** 3, (x - y) * (x + y) / 3, sp.sqrt(2) * (x - sp.pi), 1 / (x ** 2 - 1),
             sp.Rational(7, 3) * x * y, (sp.sqrt(3) + 1) ** 2 / 4, x ** 2 / (x + sp.sqrt(5)),
             sp.pi * (x + 2) ** 2 - 4 * sp.pi, (2 * x - 3) ** 2 * y]
    for e in exprs:
        forms = [sp.latex(f(e)) for f in (lambda v: v, sp.expand, sp.factor, sp.together, sp.cancel)]
        for f in forms[1:]:
            assert is_equiv(f, forms[0]), (f, forms[0])
        assert not is_equiv(sp.latex(e + sp.Rational(1, 7)), forms[0])
        assert not is_equiv(sp.latex(e * 2), forms[0])


def test_extract_boxed():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{{a}{b{c}}}") == "{a}{b{c}}"
    assert extract_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed("so \\boxed 5.") == "5."
    assert extract_boxed("$\\boxed 5$") == "5"
    assert extract_boxed("\\fbox{3}") == "3"
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxed{}") is None
    assert extract_boxed("\\boxed{ }") is None
    assert extract_boxed("\\boxed{1") is None
    assert extract_boxed(None) is None


def test_is_equiv_helper():
    assert is_equiv("\\frac{1}{2}", "0.5")
    assert not is_equiv("x+1", "x-1")
    assert not is_equiv(None, "1")


@pytest.mark.parametrize("bad", [None, 5, b"\\boxed{5}", ["\\boxed{5}"], 3.0])
def test_non_string_input_scores_zero(bad):
    assert reward(bad, "5") == 0.0
    assert reward("\\boxed{5}", bad) == 0.0


def _timed_in_thread(completion, answer):
    out = {}

    def run():
        t = time.perf_counter()
        out["r"] = reward(completion, answer)
        out["t"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    th.join(10)
    return out["r"], out["t"]


@pytest.mark.parametrize("pred,gold", [
    ("9^{9^{9^{9}}}", "1"),
    ("9^{9^{9^{9}}}", "9^{9^{9^{8}}}"),
    ("100000!", "5"),
    ("(10^{10})!", "2"),
    ("2^{2^{2^{2^{2^{2}}}}} - x", "x"),
    ("\\binom{10^{9}}{10^{8}}", "5"),
    ("x^{10^{12}}", "x"),
    ("\\max(9^{9^{9^{9}}}, 1)", "1"),  # building Max, Mod or floor compares or reduces even unevaluated
    ("2^{10^{12}} \\bmod 7", "5"),
    ("\\lfloor 9^{9^{9^{9}}} \\rfloor", "1"),
    ("\\gcd(9^{9^{9^{9}}}, 3)", "1"),
    ("(10^{100})! \\bmod 2", "1"),
    ("1e99999999999999999999", "1"),
])
def test_explosive_inputs_from_a_thread_return_fast(pred, gold):
    assert reward(box("\\sqrt{4}"), "2") == 1.0  # the first sympy call may wait for the worker to start
    r, t = _timed_in_thread(box(pred), gold)
    assert r == 0.0 and t < 1.5


def test_explosive_input_equal_to_itself():
    assert reward(box("\\sqrt{4}"), "2") == 1.0
    r, t = _timed_in_thread(box("9^{9^{9^{9}}}"), "9^{9^{9^9}}")
    assert r == 1.0 and t < 1.5


def test_slow_sympy_is_cut_off_and_the_worker_recovers():
    # passes every pre-check, but sympy's Sum.doit() looks for a closed form for many seconds (x is no
    # limit, so the sums are not compared as sequences of n): the worker must be killed
    pred, gold = "\\sum_{k=1}^{n} k^{x}", "\\sum_{k=1}^{n} k^{x+1}"
    assert reward(box("\\sqrt{4}"), "2") == 1.0
    r, t = _timed_in_thread(box(pred), gold)
    assert r == 0.0 and 0.5 < t < 1.5
    assert reward(box("\\sqrt{8}"), "2\\sqrt{2}") == 1.0  # a fresh worker takes over


def test_long_inputs():
    t = time.perf_counter()
    assert reward("x" * 100_000 + "\\boxed{5}", "5") == 1.0
    assert reward("\\boxed{" + "1" * 100_000 + "}", "1") == 0.0
    assert reward("\\boxed{" + "{" * 100_000, "1") == 0.0
    assert reward("\\boxed{" + "\\frac{" * 20_000 + "}" * 40_000 + "}", "1") == 0.0
    assert reward("\\boxed{5}" * 20_000, "5") == 1.0
    assert reward("\\boxed{5}", "x+" * 50_000 + "1") == 0.0
    assert time.perf_counter() - t < 3.0


def test_many_threads_at_once():
    results = [None] * 8

    def run(k):
        results[k] = (reward(box("(x+1)^2"), "x^2+2x+1"), reward(box("\\sqrt{8}"), "3"))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert results == [(1.0, 0.0)] * 8
    assert time.perf_counter() - t < 10


def test_worker_is_cleaned_up_at_exit_and_fork_safe():
    script = ("import multiprocessing as mp, reward\nfrom lib import symbolic\n"
              "assert reward.reward('\\\\boxed{\\\\sqrt{8}}', '2\\\\sqrt{2}') == 1.0\n"
              "print(*[w.proc.pid for w in symbolic._live])\n"
              "ctx = mp.get_context('fork'); q = ctx.Queue()\n"  # a forked child gets workers of its own
              "p = ctx.Process(target=lambda: q.put(reward.reward('\\\\boxed{(x+1)^2}', 'x^2+2x+1'))); p.start()\n"
              "assert q.get(timeout=60) == 1.0; p.join()\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    time.sleep(0.2)
    for pid in map(int, out.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the worker went with its parent


def _scored(rows, checker="hapo"):
    """(agreement, wrong accepts, rejected correct answers, slowest call in seconds) of reward over
    rows of (tag, completion, gold, label); a table row's bare answer is wrapped as the table test does."""
    reward(box("\\sqrt{4}"), "2", checker)  # the first sympy call waits for the worker to start
    agree = accepts = rejects = slowest = 0
    for tag, completion, gold, label in rows:
        if "boxed" not in completion and "fbox" not in completion and tag != "extract":
            completion = box(completion)
        t = time.perf_counter()
        r = reward(completion, gold, checker)
        slowest = max(slowest, time.perf_counter() - t)
        agree, accepts, rejects = agree + (r == label), accepts + (r > label), rejects + (r < label)
    return agree / len(rows), accepts, rejects, slowest


def test_realistic_completions_meet_the_issue_thresholds():
    # the issue's goal on its held-out set: >= 97% agreement, <= 2 wrong accepts, no case over 1.5 s
    agreement, wrong_accepts, _, slowest = _scored(DEV)
    assert agreement >= 0.97 and wrong_accepts <= 2 and slowest < 1.5, (agreement, wrong_accepts, slowest)


def test_unknown_or_missing_checker_fails_at_once_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="choose one of hapo, math_verify"):
        check_checker("sympy")
    with pytest.raises(ValueError):
        reward(box("5"), "5", checker="sympy")
    assert check_checker("hapo") == "hapo"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install math-verify") as e:
        check_checker("math_verify")
    assert "\n" not in str(e.value)


def test_math_verify_checker_runs_in_the_workers():
    pytest.importorskip("math_verify")
    assert check_checker("math_verify") == "math_verify"
    assert reward(box("\\frac{1}{2}"), "0.5", checker="math_verify") == 1.0
    assert reward(box("\\frac{1}{3}"), "0.5", checker="math_verify") == 0.0
    assert reward(None, "0.5", checker="math_verify") == reward(box("1"), 5, checker="math_verify") == 0.0
    out = {}  # from a thread, where math-verify's own signal timeouts could not work

    def run():
        t = time.perf_counter()
        out["r"] = (reward(box("\\sqrt{8}"), "2\\sqrt{2}", checker="math_verify"),
                    reward(box("9^{9^{9^{9}}}"), "1", checker="math_verify"))
        out["t"] = time.perf_counter() - t

    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert out["r"] == (1.0, 0.0) and out["t"] < 5.0  # the second overruns: its worker is killed
    assert reward(box("\\sqrt{8}"), "2\\sqrt{2}") == 1.0  # the default checker is unchanged


if __name__ == "__main__":
    for checker in ("hapo", "math_verify"):
        for name, rows in (("case table (tests/reward_cases.py)", CASES),
                           ("realistic set (tests/reward_realistic.py)", DEV)):
            agreement, accepts, rejects, slowest = _scored(rows, checker)
            print(f"{checker:11s} {name:42s} {len(rows)} rows: agreement {100 * agreement:.1f}%, "
                  f"{accepts} wrong accepts, {rejects} correct answers rejected, slowest {slowest:.2f} s")
