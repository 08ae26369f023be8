"""Tests: each equation against hand-computed values, equivalences against slow references, and
short end-to-end runs. `python -m pytest -q test_hapo.py`: about 2 minutes on 2 CPU cores (99 s measured)."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import types
from types import SimpleNamespace

import pytest
import torch

import data
import tiny
from data import DataError, Problem, encode, load_problems, render_prompt
from gate import confidence, gate, hoeffding_bound, ssi, threshold, worst_index
from hapo import Group, batch_loss, build_batch, inject
from loss import (clipped_surrogate, group_advantages, hapo_loss, hidden_logprobs, shaping,
                  token_logprobs)
from reward import extract_boxed, is_equiv, reward
from rollout import HFEngine, VLLMEngine, hf_name, make_engine, weights_for_sync

HERE = os.path.dirname(os.path.abspath(__file__))
# The built-in base model is pretrained for minutes on first use; the tests need its mechanics, not
# its skill, so they (and the train.py/eval.py processes they start) use a 40-step one.
os.environ.setdefault("HAPO_PRETRAIN_STEPS", "40")


def tiny_qwen2(vocab=40, seed=0, tie=True, init=0.02):
    """A 2-layer Qwen2 for tests. init=0.2 puts logits far from uniform: greedy decoding has no near-ties."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, initializer_range=init)
    return Qwen2ForCausalLM(cfg).float()


# ----------------------------------------------------------------------------
# gate.py: Eqs. 5-7, Algorithm 1, Theorem 4.2


def test_confidence_by_hand():
    assert confidence(0, 8) == pytest.approx(0.1)
    assert confidence(6, 8) == pytest.approx(0.7)
    assert confidence(7, 8) == pytest.approx(0.8)
    assert confidence(8, 8) == pytest.approx(0.9)
    assert confidence(2, 4) == pytest.approx(0.5)
    c = confidence(torch.tensor([0, 3, 8]), 8)
    assert torch.allclose(c, torch.tensor([0.1, 0.4, 0.9], dtype=c.dtype))


def test_gate_opens_exactly_for_s_at_most_6_with_n8_gamma08():
    rewards = torch.tensor([[1.0] * s + [0.0] * (8 - s) for s in range(9)])  # [9, 8], row s has S = s
    opened, c = gate(rewards, 0.8)
    assert opened.tolist() == [True] * 7 + [False] * 2
    assert torch.allclose(c, torch.tensor([(1 + s) / 10 for s in range(9)], dtype=c.dtype))


def test_gamma_schedules_ends_and_midpoints():
    assert [threshold(t, 0.8) for t in (0, 0.5, 1)] == [0.8, 0.8, 0.8]
    sig = [threshold(t, 0.8, "sigmoid", 0.4) for t in (0, 0.25, 0.5, 1)]
    assert sig[0] == pytest.approx(0.8) and sig[2] == pytest.approx(0.6) and sig[3] == pytest.approx(0.4)
    assert 0.6 < sig[1] < 0.8
    assert [threshold(t, 0.8, "step", 0.4) for t in (0, 0.49, 0.5, 1)] == [0.8, 0.8, 0.4, 0.4]
    with pytest.raises(ValueError, match="schedule"):
        threshold(0.1, 0.8, "cosine", 0.4)


def test_ssi_replaces_a_failure_never_a_success():
    group, rewards = ["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.0]
    new, new_r, j = ssi(group, rewards, "T", 1.0)
    assert j == 1 and new == ["a", "T", "c", "d"] and new_r == [1.0, 1.0, 1.0, 0.0]
    for trial in range(50):  # whatever the pattern, while a failure exists, a success survives
        g = torch.Generator().manual_seed(trial)
        r = (torch.rand(8, generator=g) < 0.5).float().tolist()
        if 0.0 in r:
            _, _, j = ssi(list(range(8)), r, "T", 1.0)
            assert r[j] == 0.0
    assert worst_index([0.0, 0.0, 1.0]) == 0  # ties: the first failure, deterministically


def test_ssi_skips_a_teacher_that_fails_verification():
    new, new_r, j = ssi(["a", "b"], [0.0, 0.0], "T", 0.0)
    assert j is None and new == ["a", "b"] and new_r == [0.0, 0.0]
    assert ssi(["a"], [0.0], None, 1.0)[2] is None


def test_injected_group_advantages_by_hand():
    groups = [Group([1], [[2], [3], [4], [5]], [0.0, 0.0, 0.0, 0.0], teacher_ids=[9, 9], teacher_reward=1.0)]
    trajs, m = inject(groups, "hapo", 0.8)
    # after SSI the rewards are [1, 0, 0, 0]: mean 1/4, unbiased std 1/2
    adv = [a for _, _, _, a in trajs[0]]
    assert adv == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert [t for _, _, t, _ in trajs[0]] == [True, False, False, False]
    assert trajs[0][0][1] == [9, 9]
    assert m["train/teacher_injected"] == 1 and m["train/zero_var_frac"] == 0.0


def test_methods_gate_differently():
    def groups():  # one all-fail group, one all-success group
        return [Group([1], [[2]] * 8, [0.0] * 8, [7], 1.0), Group([1], [[3]] * 8, [1.0] * 8, [7], 1.0)]
    injected = {m: inject(groups(), m, 0.8)[1]["train/teacher_injected"] for m in ("hapo", "grpo", "luffy", "srft")}
    assert injected == {"hapo": 1, "grpo": 0, "luffy": 2, "srft": 2}
    _, m = inject(groups(), "grpo", 0.8)
    assert m["train/zero_var_frac"] == 1.0 and m["train/reward"] == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        inject(groups(), "ppo", 0.8)


def test_theorem_4_2_gate_frequency_under_hoeffding_bound():
    gamma = 0.8
    g = torch.Generator().manual_seed(0)
    for mu in (0.85, 0.9, 0.95):
        freqs = []
        for n in (8, 32, 128, 512):
            rewards = (torch.rand(20000, n, generator=g) < mu).float()  # [trials, N]
            freq = gate(rewards, gamma)[0].float().mean().item()
            assert freq <= hoeffding_bound(mu, gamma, n) + 0.01, (mu, n, freq)
            freqs.append(freq)
        assert freqs[-1] < 0.05 and freqs[-1] < freqs[0]
        assert all(a >= b - 0.01 for a, b in zip(freqs, freqs[1:]))  # falls as N grows


# ----------------------------------------------------------------------------
# loss.py: Eq. 2, Eq. 3, LUFFY's shaping, Eqs. 8-9


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.0] * 4])
    a = group_advantages(r)
    s = math.sqrt(3) / 2  # 0.5 / sqrt(1/3)
    expect = torch.tensor([[s, -s, s, -s], [0.0] * 4, [-0.5, -0.5, -0.5, 1.5], [0.0] * 4])
    assert torch.allclose(a, expect, atol=1e-5)
    assert (a[1] == 0).all() and (a[3] == 0).all()


def test_hapo_loss_value_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.9, 0.1]]))
    old = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([False, True])
    # row 0, on-policy, A=2: ratios 1 and 0.5 -> -min(2, 2) = -2 and -min(1, 1.6) = -1
    # row 1, teacher, A=-1: +f(0.9) = 0.9 / 1.0 = 0.9 (second token masked out)
    expect = (-2.0 - 1.0 + 0.9) / 3
    assert hapo_loss(logp, old, adv, mask, teacher).item() == pytest.approx(expect, rel=1e-6)
    assert hapo_loss(logp, old, adv, mask, teacher, num_tokens=6).item() == pytest.approx(expect * 3 / 6, rel=1e-6)
    sft = hapo_loss(logp, old, adv, mask, teacher, teacher_loss="sft").item()
    assert sft == pytest.approx((-3.0 - math.log(0.9)) / 3, rel=1e-6)


def test_teacher_gradient_matches_closed_form():
    p = torch.tensor([[0.02, 0.3, 0.9]], dtype=torch.float64)
    logp = torch.log(p).requires_grad_()
    A, gam, n_tok = 1.7, 0.1, 5.0
    loss = hapo_loss(logp, logp.detach(), torch.tensor([A]), torch.ones(1, 3), torch.tensor([True]),
                     shaping_gamma=gam, num_tokens=n_tok)
    loss.backward()
    closed = -A * gam * p / (p + gam) ** 2 / n_tok  # d loss / d log p
    assert torch.allclose(logp.grad, closed, rtol=1e-10)


def test_on_policy_gradient_at_ratio_one_and_clipping():
    logp = torch.log(torch.tensor([[0.2, 0.6]], dtype=torch.float64)).requires_grad_()
    A = torch.tensor([-0.8], dtype=torch.float64)
    hapo_loss(logp, logp.detach(), A, torch.ones(1, 2), torch.tensor([False]), num_tokens=4).backward()
    assert torch.allclose(logp.grad, torch.full((1, 2), 0.8 / 4, dtype=torch.float64))
    # outside the clip range on the side where clipping binds: ratio 1.5 with A > 0, ratio 0.5 with A < 0
    old = torch.log(torch.tensor([[0.4, 0.4, 0.4, 0.4]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.6, 0.2, 0.6, 0.2]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    clipped_surrogate(new, old, adv).sum().backward()
    g = new.grad[0]
    assert g[0] == 0 and g[1] == 0  # clipped: no gradient
    assert g[2] == pytest.approx(1.5) and g[3] == pytest.approx(-0.5)  # the "right" side still learns


def test_shaping_operator():
    assert shaping(torch.tensor(0.1)).item() == pytest.approx(0.5)
    assert shaping(torch.tensor(0.0)).item() == 0.0


def _toy_groups(vocab, n_groups=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    seq = lambda k: torch.randint(2, vocab, (k,), generator=g).tolist()
    groups = []
    for _ in range(n_groups):
        rewards = (torch.rand(n, generator=g) < 0.3).float().tolist()
        groups.append(Group(seq(rnd(2, 6)), [seq(rnd(1, 9)) for _ in range(n)], rewards, seq(rnd(3, 8)), 1.0))
    return groups


@pytest.mark.parametrize("method", ["hapo", "srft"])
def test_micro_batches_equal_whole_batch(method):
    model = tiny_qwen2(seed=1).double()
    batch, _ = build_batch(_toy_groups(40), method, 0.8, pad_id=0)
    n_tok = batch.num_tokens()
    whole = batch_loss(model, batch, method, n_tok)
    whole.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for i in range(0, len(batch), 5):  # uneven micro-batches of 5, 5, 2 trajectories
        part = batch_loss(model, batch.slice(i, i + 5), method, n_tok)
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-6)
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)


def test_chunked_logprobs_equal_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 301) * 3
    tgt = torch.randint(0, 301, (3, 17))
    ref = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tgt, chunk_size=7), ref, atol=1e-5)
    hidden, w = torch.randn(3, 17, 16, requires_grad=True), torch.randn(301, 16, requires_grad=True)
    ref = torch.log_softmax(hidden @ w.t(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    out = hidden_logprobs(hidden, w, tgt, chunk_size=7)
    assert torch.allclose(out, ref, atol=1e-5)
    ga = torch.autograd.grad(out.sum(), (hidden, w))
    gb = torch.autograd.grad(ref.sum(), (hidden, w))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ga, gb))


_PEAK = """
import sys, torch
sys.path.insert(0, {here!r})
from loss import token_logprobs
status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) / 1024
torch.manual_seed(0)
logits = torch.randn(2, 256, 151936)  # [B, T, V] fp32: 311 MB
tgt = torch.randint(0, 151936, (2, 256))
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
base = status("VmRSS")
if {naive}:
    out = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])
else:
    out = token_logprobs(logits, tgt, chunk_size=32)
print(status("VmHWM") - base)
"""


def test_chunked_logprobs_peak_memory_far_below_naive():
    peak = {}
    for naive in (True, False):
        code = _PEAK.format(here=HERE, naive=naive)
        # glibc keeps freed blocks of up to 32 MB in its heap, which makes peak RSS depend on the
        # allocation history; forcing every large block through mmap makes a free a real free.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        peak[naive] = float(out.stdout.split()[-1])  # MB above the logits themselves
    assert peak[True] > 250, peak  # the naive version holds a second [B, T, V] copy
    assert peak[False] < 0.2 * peak[True], peak


# ----------------------------------------------------------------------------
# train.py end to end: a few steps, exact resume, bad input

TRAIN_SMALL = ["--batch_prompts", "4", "--group_size", "4", "--max_new_tokens", "12", "--eval_problems", "8",
               "--eval_every", "2", "--no-progress", "--rollout", "hf"]


def _metrics(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


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


def test_train_resume_is_exact(tmp_path):
    import train
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = TRAIN_SMALL + ["--method", "hapo", "--save_every", "2", "--eval_every", "3"]
    train.main(common + ["--max_steps", "4", "--out_dir", a])
    train.main(common + ["--max_steps", "2", "--out_dir", b])
    train.main(common + ["--max_steps", "4", "--out_dir", b, "--resume"])
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    for ra, rb in zip(ma, mb):  # b also evaluated at its stop (step 2): compare what both logged
        assert {k for k in ra if k.startswith("train/")} == {k for k in rb if k.startswith("train/")}
        for k in ra.keys() & rb.keys():
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def _run_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=300)


def test_train_bad_input_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1", "result": "2"}\n')
    cases = [(["--bogus_flag", "1"], "unrecognized arguments"),
             (["--model", str(tmp_path / "no_such_model")], "does not exist"),
             (["--data", str(bad)], "bad.jsonl"),
             (["--method", "ppo"], "--method")]
    for args, words in cases:
        r = _run_train(*args, "--out_dir", str(tmp_path / "o"))
        assert r.returncode == 2, (args, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)


# ----------------------------------------------------------------------------
# reward.py: Eq. 4, the answer checker


def box(pred):
    """A realistic completion whose final answer is pred."""
    return ("<think>\nLet me work through this carefully. First we set up the equation, then we solve.\n"
            "</think>\nPutting it together, the final answer is $\\boxed{" + pred + "}$.")


# (category, completion, gold answer, expected reward). Outside "extract", a completion with no box
# is the answer alone, and the test wraps it with box().
CASES = [
    # extraction
    ("extract", "so the answer is \\boxed{5}.", "5", 1.0),
    ("extract", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("extract", "The answer is \\boxed 7 and we are done", "7", 1.0),
    ("extract", "$\\fbox{42}$", "42", 1.0),
    ("extract", "first \\boxed{3}, but correcting: \\boxed{4}", "4", 1.0),
    ("extract", "first \\boxed{4}, but correcting: \\boxed{3}", "4", 0.0),
    ("extract", "the answer is 5", "5", 0.0),
    ("extract", "the answer is \\boxed{}", "5", 0.0),
    ("extract", "the answer is \\boxed{5", "5", 0.0),
    ("extract", "<think>maybe \\boxed{6}</think> The answer is \\boxed{8}.", "8", 1.0),
    ("extract", "<think>maybe \\boxed{8}</think> The answer is \\boxed{6}.", "8", 0.0),
    ("extract", "\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),
    ("gold", "5", "\\boxed{5}", 1.0),
    ("gold", "5", "$5$", 1.0),
    ("gold", "5", "$\\boxed{6}$", 0.0),
    ("gold", "\\frac{1}{2}", "$\\frac{1}{2}$", 1.0),
    # integers and negatives
    ("int", "12", "12", 1.0),
    ("int", "012", "12", 1.0),
    ("int", "+12", "12", 1.0),
    ("int", "12", "21", 0.0),
    ("int", "-3", "-3", 1.0),
    ("int", "-3", "3", 0.0),
    ("int", "3", "-3", 0.0),
    ("int", "- 3", "-3", 1.0),
    ("int", "0", "-0", 1.0),
    ("int", "1267650600228229401496703205376", "2^{100}", 1.0),
    ("int", "1267650600228229401496703205377", "2^{100}", 0.0),
    ("int", "10^{6}", "1000000", 1.0),
    # decimals and fractions
    ("frac", "0.5", "\\frac{1}{2}", 1.0),
    ("frac", "\\frac{1}{2}", "0.5", 1.0),
    ("frac", "\\dfrac{1}{2}", "\\frac12", 1.0),
    ("frac", "\\tfrac{3}{4}", "0.75", 1.0),
    ("frac", "3/4", "\\frac{3}{4}", 1.0),
    ("frac", "\\frac{6}{8}", "\\frac{3}{4}", 1.0),
    ("frac", "-\\frac{2}{3}", "\\frac{-2}{3}", 1.0),
    ("frac", "\\frac{-2}{3}", "\\frac{2}{3}", 0.0),
    ("frac", "1/2", "2", 0.0),
    ("frac", "\\frac{2}{1}", "\\frac{1}{2}", 0.0),
    ("frac", "3", "3.5", 0.0),
    ("frac", "3.50", "3.5", 1.0),
    ("frac", "0.333", "\\frac{1}{3}", 0.0),
    ("frac", "0.33", "\\frac{1}{3}", 0.0),
    ("frac", "2\\frac{1}{2}", "\\frac{5}{2}", 1.0),
    ("frac", "\\frac{5}{2}", "2.5", 1.0),
    ("frac", "\\frac{1}{2}", "\\frac{1}{4}", 0.0),
    ("frac", "\\frac{a}{b}", "a/b", 1.0),
    ("frac", "\\frac{b}{a}", "a/b", 0.0),
    ("frac", ".25", "\\frac14", 1.0),
    ("frac", "0.2", "0.25", 0.0),
    # percentages
    ("percent", "50\\%", "50", 1.0),
    ("percent", "50", "50\\%", 1.0),
    ("percent", "0.5", "50\\%", 1.0),
    ("percent", "50%", "50\\%", 1.0),
    ("percent", "25\\%", "50\\%", 0.0),
    ("percent", "5", "50\\%", 0.0),
    # roots, pi, powers
    ("sqrt", "2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("sqrt", "\\sqrt2", "\\sqrt{2}", 1.0),
    ("sqrt", "\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", 1.0),
    ("sqrt", "\\frac{3\\sqrt{2}}{4}", "\\dfrac{3\\sqrt{2}}{4}", 1.0),
    ("sqrt", "\\frac{3}{\\sqrt{8}}", "\\dfrac{3\\sqrt{2}}{4}", 1.0),
    ("sqrt", "\\frac{3\\sqrt{3}}{4}", "\\dfrac{3\\sqrt{2}}{4}", 0.0),
    ("sqrt", "\\sqrt{3}", "3", 0.0),
    ("sqrt", "\\sqrt[3]{8}", "2", 1.0),
    ("sqrt", "\\sqrt[3]{9}", "3", 0.0),
    ("sqrt", "4+2\\sqrt{3}", "(1+\\sqrt{3})^2", 1.0),
    ("sqrt", "4-2\\sqrt{3}", "(1+\\sqrt{3})^2", 0.0),
    ("pi", "2\\pi", "2\\pi", 1.0),
    ("pi", "\\pi \\cdot 2", "2\\pi", 1.0),
    ("pi", "\\frac{\\pi}{6}", "\\frac{1}{6}\\pi", 1.0),
    ("pi", "\\frac{\\pi}{3}", "\\frac{\\pi}{6}", 0.0),
    ("pi", "6.28", "2\\pi", 0.0),
    ("pi", "\\pi r^2", "r^2\\pi", 1.0),
    ("power", "2^{10}", "1024", 1.0),
    ("power", "2^{10}", "1023", 0.0),
    ("power", "x^{2}", "x^2", 1.0),
    ("power", "x^3", "x^2", 0.0),
    ("power", "e^{2}", "\\mathrm{e}^2", 1.0),
    # algebra
    ("algebra", "2x+2", "2(x+1)", 1.0),
    ("algebra", "x+1", "x-1", 0.0),
    ("algebra", "(x+1)^2", "x^2+2x+1", 1.0),
    ("algebra", "(x-1)^2", "x^2+2x+1", 0.0),
    ("algebra", "x^2-1", "(x-1)(x+1)", 1.0),
    ("algebra", "\\frac{x^2-1}{x-1}", "x+1", 1.0),
    ("algebra", "2xy", "2yx", 1.0),
    ("algebra", "2xy", "2x+y", 0.0),
    ("algebra", "x_1 + x_2", "x_{2}+x_{1}", 1.0),
    ("algebra", "\\frac{1}{x}+\\frac{1}{y}", "\\frac{x+y}{xy}", 1.0),
    ("algebra", "\\frac{1}{x+y}", "\\frac{1}{x}+\\frac{1}{y}", 0.0),
    ("algebra", "3a", "3b", 0.0),
    ("algebra", "\\sin^2 x + \\cos^2 x", "1", 0.0),  # unparsed notation fails safe
    ("algebra", "\\sin(2x)", "2\\sin(x)\\cos(x)", 1.0),
    ("algebra", "\\ln 8", "3\\ln 2", 1.0),
    ("algebra", "|x|", "x", 0.0),
    ("algebra", "|-3|", "3", 1.0),
    ("algebra", "x+\\frac{9\\sqrt{2}\\pi}{2}-\\frac{9\\sqrt{6}}{2}", "x-\\frac{9\\sqrt{2}(\\sqrt{3}-\\pi)}{2}", 1.0),
    ("algebra", "x+\\frac{9\\sqrt{2}\\pi}{2}-\\frac{9\\sqrt{6}}{2}", "x-\\frac{9\\sqrt{2}(\\sqrt{3}+\\pi)}{2}", 0.0),
    # equations and "x ="
    ("eq", "x = 3", "3", 1.0),
    ("eq", "3", "x=3", 1.0),
    ("eq", "x = 4", "3", 0.0),
    ("eq", "y = 2x + 1", "y=2x+1", 1.0),
    ("eq", "2x+1", "y=2x+1", 1.0),
    ("eq", "y = 2x - 1", "y=2x+1", 0.0),
    ("eq", "x^2+y^2-4=0", "x^2+y^2=4", 1.0),
    ("eq", "4 = x^2+y^2", "x^2+y^2=4", 1.0),
    ("eq", "x^2+y^2=5", "x^2+y^2=4", 0.0),
    ("eq", "AB = 5", "5", 1.0),
    ("eq", "f(x) = x^2", "x^2", 1.0),
    ("eq", "\\theta = 30^\\circ", "30", 1.0),
    # text, units and degrees
    ("units", "12\\text{ cm}", "12", 1.0),
    ("units", "12 \\text{cm}^2", "12", 1.0),
    ("units", "12\\text{ cm}", "13", 0.0),
    ("units", "12 \\mbox{ inches}", "12", 1.0),
    ("units", "5 dollars", "5", 1.0),
    ("units", "\\$5", "5", 1.0),
    ("units", "\\$5.50", "5.5", 1.0),
    ("units", "12 cm", "12", 1.0),
    ("units", "4 \\text{ square units}", "4", 1.0),
    ("units", "30^\\circ", "30", 1.0),
    ("units", "30^{\\circ}", "30^\\circ", 1.0),
    ("units", "30^\\circ", "60", 0.0),
    ("units", "45°", "45", 1.0),
    ("units", "\\text{no solution}", "\\text{No solution}", 1.0),
    ("units", "\\text{yes}", "\\text{no}", 0.0),
    ("units", "5 \\text{ and } 7", "5, 7", 1.0),
    ("units", "x=5 \\text{ or } x=7", "5, 7", 1.0),
    ("units", "5 \\text{ or } 8", "5, 7", 0.0),
    # thousands separators
    ("thousands", "1,000", "1000", 1.0),
    ("thousands", "1000", "1,000", 1.0),
    ("thousands", "1{,}000", "1000", 1.0),
    ("thousands", "1\\,000", "1000", 1.0),
    ("thousands", "1,234,567", "1234567", 1.0),
    ("thousands", "(1, 000)", "1000", 0.0),
    ("thousands", "1, 000", "1000", 0.0),
    ("thousands", "1,000", "100", 0.0),
    ("thousands", "10,000", "1000", 0.0),
    # intervals
    ("interval", "(-\\infty, 2]", "(-\\infty,2]", 1.0),
    ("interval", "\\left(-\\infty, 2\\right]", "(-\\infty,2]", 1.0),
    ("interval", "(-\\infty, 2)", "(-\\infty,2]", 0.0),
    ("interval", "[0,1)", "[0,1]", 0.0),
    ("interval", "[0,1]", "[0,1)", 0.0),
    ("interval", "[0, 1]", "[0,1]", 1.0),
    ("interval", "(0, \\frac{1}{2}]", "(0, 0.5]", 1.0),
    ("interval", "(0, \\frac{1}{2}]", "(0, 0.25]", 0.0),
    ("interval", "x \\le 2", "(-\\infty, 2]", 1.0),
    ("interval", "x < 2", "(-\\infty, 2]", 0.0),
    ("interval", "1 \\leq x < 3", "[1, 3)", 1.0),
    ("interval", "x \\geq 1", "[1, \\infty)", 1.0),
    ("interval", "(-\\infty,1)\\cup(2,\\infty)", "(-\\infty, 1) \\cup (2, \\infty)", 1.0),
    ("interval", "(2,\\infty)\\cup(-\\infty,1)", "(-\\infty, 1) \\cup (2, \\infty)", 1.0),
    ("interval", "(-\\infty,1]\\cup(2,\\infty)", "(-\\infty, 1) \\cup (2, \\infty)", 0.0),
    ("interval", "\\mathbb{R}", "(-\\infty, \\infty)", 1.0),
    # tuples, sets and lists of answers
    ("tuple", "(1, 2)", "(1,2)", 1.0),
    ("tuple", "(2, 1)", "(1,2)", 0.0),
    ("tuple", "(1, 2, 3)", "(1,2)", 0.0),
    ("tuple", "(\\frac{1}{2}, -3)", "(0.5, -3)", 1.0),
    ("tuple", "(1, 2)", "[1,2]", 0.0),
    ("tuple", "x=1, y=2", "(1, 2)", 1.0),
    ("tuple", "(3, 4)", "3, 4", 1.0),
    ("set", "\\{1, 2\\}", "\\{2,1\\}", 1.0),
    ("set", "\\{1, 2\\}", "\\{1,3\\}", 0.0),
    ("set", "2, 3", "3, 2", 1.0),
    ("set", "2, 3", "\\{2, 3\\}", 1.0),
    ("set", "2, 3", "2, 3, 4", 0.0),
    ("set", "2", "2, 3", 0.0),
    ("set", "-2, 1", "1,-2", 1.0),
    ("set", "\\pm 2", "2, -2", 1.0),
    ("set", "3 \\pm \\sqrt{2}", "3-\\sqrt{2}, 3+\\sqrt{2}", 1.0),
    ("set", "\\pm 2", "2", 0.0),
    ("set", "\\{5\\}", "5", 1.0),
    ("set", "\\emptyset", "\\varnothing", 1.0),
    ("set", "\\emptyset", "0", 0.0),
    # matrices
    ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
    ("matrix", "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", 0.0),
    ("matrix", "\\begin{pmatrix} \\frac{1}{2} \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix}0.5\\\\3\\end{pmatrix}", 1.0),
    # formatting noise: \left \right \! \, trailing periods, display delimiters
    ("format", "\\left( 1, 2 \\right)", "(1,2)", 1.0),
    ("format", "1\\!000", "1000", 1.0),
    ("format", "\\frac{1}{2}.", "\\frac{1}{2}", 1.0),
    ("format", "7.", "7", 1.0),
    ("format", "\\displaystyle\\frac{1}{2}", "0.5", 1.0),
    ("format", "\\( 7 \\)", "7", 1.0),
    ("format", "\\, 7 \\;", "7", 1.0),
    ("format", "\\mathbf{7}", "7", 1.0),
    ("format", "\\textbf{8}", "7", 0.0),
    ("format", "\u22123", "-3", 1.0),
    # multiple choice
    ("choice", "A", "A", 1.0),
    ("choice", "\\text{(C)}", "C", 1.0),
    ("choice", "(C)", "C", 1.0),
    ("choice", "C", "(C)", 1.0),
    ("choice", "\\textbf{(C) } 12", "C", 1.0),
    ("choice", "\\text{(B)}", "C", 0.0),
    ("choice", "D", "C", 0.0),
    ("choice", "CD", "C", 0.0),
    # rounded decimal golds
    ("rounding", "\\sqrt{2}", "1.41", 1.0),
    ("rounding", "\\frac{1}{3}", "0.33", 1.0),
    ("rounding", "\\frac{12}{25}", "0.5", 0.0),
    ("rounding", "\\frac{12}{25}", "0.49", 0.0),
    ("rounding", "\\sqrt{3}", "1.41", 0.0),
    ("rounding", "1.42", "1.41", 0.0),
    # a mix of realistic answer pairs
    ("mixed", "\\dfrac{3\\sqrt{2}}{4}", "\\frac{3\\sqrt2}{4}", 1.0),
    ("mixed", "\\frac{3}{2\\sqrt{2}}", "\\frac{3\\sqrt2}{4}", 1.0), ("mixed", "(-\\infty, 2]", "(-\\infty,2)", 0.0),
    ("mixed", "x\\in(-\\infty,2]", "(-\\infty,2]", 1.0), ("mixed", "x^2+2x+1", "(x+1)^2", 1.0),
    ("mixed", "x^2+2x+1", "x^2+2x-1", 0.0), ("mixed", "12 \\text{ cm}^2", "12", 1.0),
    ("mixed", "12\\,\\text{cm}", "12", 1.0), ("mixed", "12 \\mathrm{~cm}", "12", 1.0),
    ("mixed", "\\{1,2\\}", "\\{1,2\\}", 1.0), ("mixed", "\\{1,2\\}", "1,2", 1.0),
    ("mixed", "2, 3", "2,3", 1.0), ("mixed", "2, 3", "3,2", 1.0),
    ("mixed", "2,3", "2", 0.0), ("mixed", "\\text{(C)}", "\\text{(C)}", 1.0),
    ("mixed", "\\textbf{(D)}", "C", 0.0), ("mixed", "\\mathrm{(C)}", "C", 1.0),
    ("mixed", "C", "\\text{(C)}", 1.0), ("mixed", "B", "\\text{(C)}", 0.0),
    ("mixed", "\\frac{1}{2}", "\\frac12", 1.0), ("mixed", "0.5", "\\frac12", 1.0),
    ("mixed", "\\frac{2}{4}", "\\frac12", 1.0), ("mixed", "6-5i", "6 - 5i", 1.0),
    ("mixed", "-5i+6", "6-5i", 1.0), ("mixed", "6+5i", "6-5i", 0.0),
    ("mixed", "\\$18.90", "18.90", 1.0), ("mixed", "18.9", "\\$18.90", 1.0),
    ("mixed", "18.99", "\\$18.90", 0.0), ("mixed", "\\text{Evelyn}", "\\text{Evelyn}", 1.0),
    ("mixed", "Evelyn", "\\text{Evelyn}", 1.0), ("mixed", "\\text{Bob}", "\\text{Evelyn}", 0.0),
    ("mixed", "033", "33", 1.0), ("mixed", "33", "330", 0.0),
    ("mixed", "1{,}000{,}000", "1000000", 1.0),
    ("mixed", "\\frac{-1 \\pm \\sqrt{5}}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", 1.0),
    ("mixed", "\\frac{-1 + \\sqrt{5}}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", 0.0),
    ("mixed", "(1,2),(2,1)", "(2,1),(1,2)", 1.0), ("mixed", "(\\frac12,1),(2,1)", "(2,1),(0.5,1)", 1.0),
    ("mixed", "(1,2),(2,2)", "(2,1),(1,2)", 0.0), ("mixed", "\\log_2 8", "3", 1.0),
    ("mixed", "\\log_{2}{9}", "2\\log_2 3", 1.0), ("mixed", "\\log_3 8", "3", 0.0),
    ("mixed", "\\frac{\\pi}{4}", "\\frac{\\pi}{4}", 1.0), ("mixed", "45^\\circ", "45", 1.0),
    ("mixed", "\\frac{\\pi}{4}", "\\frac{\\pi}{3}", 0.0), ("mixed", "\\sqrt{50}", "5\\sqrt2", 1.0),
    ("mixed", "5\\sqrt{3}", "5\\sqrt2", 0.0), ("mixed", "\\frac{\\sqrt{5}+1}{2}", "\\frac{1+\\sqrt{5}}{2}", 1.0),
    ("mixed", "\\frac{\\sqrt{5}-1}{2}", "\\frac{1+\\sqrt{5}}{2}", 0.0),
    ("mixed", "y = \\frac{1}{2}x + 3", "y=\\frac12 x+3", 1.0),
    ("mixed", "y = \\frac{1}{2}x - 3", "y=\\frac12 x+3", 0.0), ("mixed", "(x-1)(x+2)", "x^2+x-2", 1.0),
    ("mixed", "(x-1)(x-2)", "x^2+x-2", 0.0), ("mixed", "10\\%", "10", 1.0),
    ("mixed", "10\\%", "0.1", 1.0), ("mixed", "20\\%", "10", 0.0),
    ("mixed", "\\infty", "\\infty", 1.0), ("mixed", "-\\infty", "\\infty", 0.0),
    ("mixed", "\\dfrac{9}{2}", "4.5", 1.0), ("mixed", "\\dfrac{9}{4}", "4.5", 0.0),
    ("mixed", "x = 2", "2", 1.0), ("mixed", "x=-2", "2", 0.0),
    ("mixed", "a=2, b=3", "a=2,b=3", 1.0), ("mixed", "a=2, b=3", "(2,3)", 1.0),
    ("mixed", "a=3, b=2", "(2,3)", 0.0),
    ("mixed", "(-\\infty, -2) \\cup (3, \\infty)", "(-\\infty,-2)\\cup(3,\\infty)", 1.0),
    ("mixed", "(-\\infty, -2] \\cup (3, \\infty)", "(-\\infty,-2)\\cup(3,\\infty)", 0.0),
    ("mixed", "x<-2 \\text{ or } x>3", "(-\\infty,-2)\\cup(3,\\infty)", 1.0),
    ("mixed", "\\text{odd}", "\\text{Odd}", 1.0), ("mixed", "\\text{even}", "\\text{odd}", 0.0),
    ("mixed", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", 1.0),
    ("mixed", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", 0.0),
    ("mixed", "\\begin{pmatrix} 4/2 \\\\ -1 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}", 1.0),
    ("mixed", "\\left[ -2, 7 \\right]", "[-2,7]", 1.0), ("mixed", "[-2, 7)", "[-2,7]", 0.0),
    ("mixed", "3\\sqrt{2}\\text{ units}", "3\\sqrt2", 1.0), ("mixed", "5 \\text{ hours}", "5", 1.0),
    ("mixed", "\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}", 1.0),
    ("mixed", "\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt3}", 1.0), ("mixed", "2^{2017}", "2^{2017}", 1.0),
    ("mixed", "2^{2016}", "2^{2017}", 0.0), ("mixed", "4^{1008}\\cdot 2", "2^{2017}", 1.0),
    ("mixed", "\\frac{7}{3}", "2\\frac{1}{3}", 1.0), ("mixed", "\\frac{8}{3}", "2\\frac13", 0.0),
    ("mixed", "1\\frac{1}{4}", "\\frac54", 1.0), ("mixed", "k = 4", "4", 1.0),
    ("mixed", "n=10", "10", 1.0), ("mixed", "r = 3", "3", 1.0),
    ("mixed", "m=\\frac{1}{2}", "\\frac12", 1.0), ("mixed", "\\angle ABC = 30^\\circ", "30", 1.0),
    ("mixed", "0.\\overline{3}", "\\frac13", 1.0), ("mixed", "\\frac{1}{3}", "0.\\overline{3}", 1.0),
    ("mixed", "3.14", "\\pi", 0.0), ("mixed", "\\pi", "3.14", 1.0),
    ("mixed", "1.5 \\times 10^{3}", "1500", 1.0), ("mixed", "1.5 \\times 10^{4}", "1500", 0.0),
    ("mixed", "1500", "1.5 \\times 10^3", 1.0), ("mixed", "e^{2}", "e^2", 1.0),
    ("mixed", "\\exp(2)", "e^2", 1.0), ("mixed", "e^3", "e^2", 0.0),
    ("mixed", "\\sqrt{x^2}", "|x|", 1.0), ("mixed", "\\sqrt{x^2}", "x", 0.0),
    ("mixed", "\\frac{x+1}{x-1}", "\\frac{x-1}{x+1}", 0.0), ("mixed", "\\frac{2x+2}{2}", "x+1", 1.0),
    ("mixed", "\\binom{5}{2}", "10", 1.0), ("mixed", "\\binom{5}{3}", "11", 0.0),
    ("mixed", "5!", "120", 1.0), ("mixed", "5!", "24", 0.0),
    ("mixed", "12\\text{ cm}^2", "12 \\text{cm}^2", 1.0), ("mixed", "144", "12^2", 1.0),
    ("mixed", "\\text{None}", "\\text{none}", 1.0),
    ("mixed", "\\text{no real solutions}", "\\text{No real solutions}", 1.0),
    ("mixed", "\\frac{3}{4}\\text{ of the cake}", "\\frac34", 1.0),
    ("mixed", "-\\frac{1}{3}", "-\\dfrac{1}{3}", 1.0), ("mixed", "\\frac{1}{3}", "-\\dfrac{1}{3}", 0.0),
    ("mixed", "-\\frac13", "-0.\\overline{3}", 1.0), ("mixed", "2 \\text{ and } 3", "2,3", 1.0),
    ("mixed", "2 and 3", "2,3", 1.0), ("mixed", "2 or 3", "3, 2", 1.0),
    ("mixed", "\\{-1, 1\\}", "\\pm 1", 1.0), ("mixed", "\\{1\\}", "\\pm 1", 0.0),
    ("mixed", "(0, 1)", "(0,1)", 1.0), ("mixed", "(1, 0)", "(0,1)", 0.0),
    ("mixed", "(0, 1]", "(0,1)", 0.0), ("mixed", "\\$1,000", "1000", 1.0),
    ("mixed", "1,000,000", "10^6", 1.0), ("mixed", "1,000,001", "10^6", 0.0),
    ("mixed", "\\frac{a+b}{2}", "\\frac{b+a}{2}", 1.0), ("mixed", "\\frac{a-b}{2}", "\\frac{b-a}{2}", 0.0),
    ("mixed", "\\sin 30^\\circ", "\\frac12", 0.0), ("mixed", "x^2 + y^2 = 25", "x^2+y^2=25", 1.0),
    ("mixed", "(x-1)^2 + y^2 = 4", "x^2-2x+1+y^2=4", 1.0), ("mixed", "\\pi r^2", "\\pi r^{2}", 1.0),
    ("mixed", "2\\pi r", "\\pi r^{2}", 0.0), ("mixed", "\\text{B}", "B", 1.0),
    ("mixed", "(B) 3", "B", 1.0), ("mixed", "B.", "B", 1.0),
    ("mixed", "\\textbf{(B)}", "B", 1.0), ("mixed", "3 + 2\\sqrt{2}", "(1+\\sqrt2)^2", 1.0),
    ("mixed", "\\sqrt{2}+1", "\\frac{1}{\\sqrt2-1}", 1.0), ("mixed", "2\\sqrt{6}", "\\sqrt{24}", 1.0),
    ("mixed", "\\sqrt{6}", "\\sqrt{24}", 0.0), ("mixed", "-2", "-2", 1.0),
    ("mixed", "-(2)", "-2", 1.0), ("mixed", "--2", "2", 1.0),
    ("mixed", "\\frac{100}{3}", "33\\frac{1}{3}", 1.0), ("mixed", "33.3", "33\\frac{1}{3}", 0.0),
    ("mixed", "33.33", "\\frac{100}{3}", 0.0), ("mixed", "90^\\circ", "90", 1.0),
    ("mixed", "\\frac{\\pi}{2}", "90^\\circ", 0.0), ("mixed", "\\frac{5}{36}", "\\frac{5}{36}", 1.0),
    ("mixed", "\\frac{5}{35}", "\\frac{5}{36}", 0.0), ("mixed", "0.05", "5\\%", 1.0),
    ("mixed", "0.5", "5\\%", 0.0), ("mixed", "\\frac{1}{2}, \\frac{1}{3}", "\\frac13,\\frac12", 1.0),
    ("mixed", "\\left\\{ \\frac{1}{2}, 3 \\right\\}", "\\{0.5, 3\\}", 1.0),
    ("mixed", "x = 1 \\text{ or } x = -3", "1, -3", 1.0), ("mixed", "x=1,x=-3", "-3,1", 1.0),
    ("mixed", "x = 1", "1, -3", 0.0), ("mixed", "1", "1,-3", 0.0),
    ("mixed", "\\text{all real numbers}", "(-\\infty,\\infty)", 0.0), ("mixed", "5\\text{ m}", "5", 1.0),
    ("mixed", "5 m", "5", 1.0), ("mixed", "\\frac{4}{3}\\pi", "\\frac{4\\pi}{3}", 1.0),
    ("mixed", "\\frac{3}{4}\\pi", "\\frac{4\\pi}{3}", 0.0), ("mixed", "1/6", "\\frac{1}{6}", 1.0),
    ("mixed", "\\frac{1}{6}\\approx 0.167", "\\frac16", 1.0),
    # near misses that must stay wrong
    ("near-miss", "-\\frac{3}{4}", "\\frac34", 0.0), ("near-miss", "-12", "12", 0.0),
    ("near-miss", "x-2", "x+2", 0.0), ("near-miss", "(2,-3)", "(2,3)", 0.0),
    ("near-miss", "11", "12", 0.0), ("near-miss", "2^{10}-1", "1024", 0.0),
    ("near-miss", "(1,3]", "[1,3]", 0.0), ("near-miss", "\\{1,2\\}", "(1,2)", 0.0),
    ("near-miss", "\\frac{1}{2}", "\\frac{1}{2}x", 0.0), ("near-miss", "x^2", "2x", 0.0),
    ("near-miss", "\\frac{\\sqrt{2}}{2}", "\\sqrt{2}", 0.0), ("near-miss", "2\\pi", "\\pi^2", 0.0),
    ("near-miss", "25\\%", "0.025", 0.0), ("near-miss", "1,0000", "10000", 0.0),
    ("near-miss", "12.5", "125", 0.0), ("near-miss", "0.125", "\\frac{1}{4}", 0.0),
    ("near-miss", "(3,4)", "(4,3)", 0.0), ("near-miss", "[2,5]", "[2,5)", 0.0),
    ("near-miss", "\\{2\\}", "\\{2,3\\}", 0.0), ("near-miss", "x=2, y=3", "(3,2)", 0.0),
    ("near-miss", "y=2x+3", "y=3x+2", 0.0), ("near-miss", "a+b", "ab", 0.0),
    ("near-miss", "C", "(D)", 0.0), ("near-miss", "\\text{(A)}", "B", 0.0),
    ("near-miss", "60^\\circ", "30^\\circ", 0.0), ("near-miss", "5\\text{ cm}", "50", 0.0),
    ("near-miss", "\\$5.50", "5.05", 0.0), ("near-miss", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}", 0.0),
    ("near-miss", "\\frac{3}{4\\sqrt{2}}", "\\frac{3\\sqrt{2}}{4}", 0.0),
    ("near-miss", "2\\sqrt{2}+1", "2\\sqrt{2}", 0.0), ("near-miss", "x^2+2x+1.0001", "x^2+2x+1", 0.0),
    ("near-miss", "\\frac{n(n-1)}{2}", "\\frac{n(n+1)}{2}", 0.0),
    ("near-miss", "\\binom{10}{4}", "\\binom{10}{3}", 0.0), ("near-miss", "\\log 3", "\\log 2", 0.0),
    ("near-miss", "-i", "i", 0.0), ("near-miss", "1-i", "1+i", 0.0),
    ("near-miss", "0", "\\infty", 0.0), ("near-miss", "(0,\\infty)", "(-\\infty,\\infty)", 0.0),
    ("near-miss", "\\{0\\}", "\\emptyset", 0.0),
    ("near-miss", "\\begin{pmatrix}2\\\\1\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 0.0),
    ("near-miss", "\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 0.0),
    ("near-miss", "0.3", "\\frac13", 0.0), ("near-miss", "1.73", "\\sqrt{3}", 0.0),
    ("near-miss", "3.1416", "\\pi", 0.0), ("near-miss", "\\pi", "3.15", 0.0),
    ("near-miss", "\\sqrt{4}+1", "2", 0.0), ("near-miss", "2\\frac{1}{5}", "\\frac{5}{2}", 0.0),
    ("near-miss", "(3, 2)", "2, 3", 0.0), ("near-miss", "x \\ge 3", "(3,\\infty)", 0.0),
    ("near-miss", "\\frac{1}{2}\\pi", "\\frac{1}{2}", 0.0), ("near-miss", "30\\pi", "30", 0.0),
    ("near-miss", "\\pi", "180", 0.0), ("near-miss", "10!", "10", 0.0),
    ("near-miss", "5i", "5", 0.0), ("near-miss", "2i", "2", 0.0),
    ("near-miss", "\\text{(C) } 15", "B", 0.0), ("near-miss", "-\\sqrt{2}", "\\sqrt{2}", 0.0),
    ("near-miss", "\\sqrt{2}-1", "1-\\sqrt{2}", 0.0), ("near-miss", "2x^2", "(2x)^2", 0.0),
    ("near-miss", "\\frac{x}{2}", "\\frac{2}{x}", 0.0), ("near-miss", "x^{-1}", "-x", 0.0),
    ("near-miss", "e^{x}", "e^{-x}", 0.0), ("near-miss", "\\ln x", "\\ln 2x", 0.0),
    ("near-miss", "\\sin x", "\\cos x", 0.0), ("near-miss", "(x+1)^3", "x^3+1", 0.0),
    ("near-miss", "x^2-4", "(x-2)^2", 0.0), ("near-miss", "4", "4x", 0.0),
    ("near-miss", "y", "x", 0.0), ("near-miss", "2\\pi r", "2\\pi R", 0.0),
    ("near-miss", "x_1", "x_2", 0.0), ("near-miss", "\\frac{1}{6}", "\\frac{1}{5}", 0.0),
    ("near-miss", "0.16", "\\frac16", 0.0), ("near-miss", "0.1666", "\\frac16", 0.0),
    ("near-miss", "16.7\\%", "\\frac16", 0.0), ("near-miss", "100", "99", 0.0),
    ("near-miss", "1000", "1001", 0.0), ("near-miss", "999", "1000", 0.0),
    ("near-miss", "-1", "1", 0.0), ("near-miss", "0", "1", 0.0),
    ("near-miss", "\\frac{0}{1}", "1", 0.0), ("near-miss", "1", "\\frac{1}{0}", 0.0),
    ("near-miss", "7", "\\text{(7)}x", 0.0), ("near-miss", "2\\sqrt{5}", "5\\sqrt{2}", 0.0),
    ("near-miss", "\\sqrt{10}", "10", 0.0), ("near-miss", "3^4", "4^3", 0.0),
    ("near-miss", "2^{-1}", "-2", 0.0), ("near-miss", "(1,2)\\cup(3,4)", "(1,4)", 0.0),
    ("near-miss", "[1,2]\\cup[3,4]", "[1,2]\\cup[3,5]", 0.0), ("near-miss", "(-1,1)", "[-1,1]", 0.0),
    ("near-miss", "\\{1,2,3\\}", "\\{1,2\\}", 0.0), ("near-miss", "1,2,3", "1,2", 0.0),
    ("near-miss", "(1,2,3)", "(1,3,2)", 0.0), ("near-miss", "\\pm 3", "\\pm 2", 0.0),
    ("near-miss", "3", "\\pm 3", 0.0), ("near-miss", "x=\\pm 2", "2", 0.0),
    ("near-miss", "\\text{A}", "\\text{B}", 0.0), ("near-miss", "\\text{(E)}", "E, A", 0.0),
    ("near-miss", "A", "(B)", 0.0), ("near-miss", "45", "45\\sqrt{2}", 0.0),
    ("near-miss", "180^\\circ", "360^\\circ", 0.0), ("near-miss", "12\\text{ inches}", "1\\text{ foot}", 0.0),
    ("near-miss", "3 \\text{ hours}", "180", 0.0), ("near-miss", "\\$20", "\\$2.00", 0.0),
    ("near-miss", "50\\%", "5", 0.0), ("near-miss", "1.5", "\\frac{2}{3}", 0.0),
    ("near-miss", "\\frac{3}{2}", "\\frac23", 0.0), ("near-miss", "0.6", "0.66", 0.0),
    ("near-miss", "\\frac{2}{3}", "6.7\\%", 0.0), ("near-miss", "\\dfrac{\\pi}{2}", "\\dfrac{\\pi}{4}", 0.0),
    ("near-miss", "\\frac{\\pi}{2}", "\\frac{\\pi^2}{2}", 0.0), ("near-miss", "\\sqrt{\\pi}", "\\pi", 0.0),
    ("near-miss", "x^2+y^2=1", "x^2+y^2=2", 0.0), ("near-miss", "x+y=1", "x-y=1", 0.0),
    ("near-miss", "y=x", "y=-x", 0.0), ("near-miss", "f(x)=2x", "3x", 0.0),
    # malformed input is wrong, never an error
    ("malformed", "\\frac{1}{", "\\frac{1}{2}", 0.0),
    ("malformed", "}}}{{{", "5", 0.0),
    ("malformed", "\\unknowncommand{5}", "5", 0.0),
    ("malformed", "__import__('os')", "5", 0.0),
    ("malformed", "(1, 2", "(1,2)", 0.0),
    ("malformed", "5", "", 0.0),
    ("malformed", "", "", 0.0),
    ("malformed", "|x", "x", 0.0),
    ("malformed", "\\sqrt{}", "0", 0.0),
]


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
    # passes every pre-check, but sympy's simplify() needs ~40 s for it: the worker must be killed
    pred, gold = "\\infty x + (x+1)^{300}(x+3)^{300}", "\\infty x + (x+2)^{600}"
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
    script = ("import multiprocessing as mp, reward, symbolic\n"
              "assert reward.reward('\\\\boxed{\\\\sqrt{8}}', '2\\\\sqrt{2}') == 1.0\n"
              "print(*[w.proc.pid for w in symbolic._live])\n"
              "ctx = mp.get_context('fork'); q = ctx.Queue()\n"  # a forked child gets workers of its own
              "p = ctx.Process(target=lambda: q.put(reward.reward('\\\\boxed{(x+1)^2}', 'x^2+2x+1'))); p.start()\n"
              "assert q.get(timeout=60) == 1.0; p.join()\n")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script], cwd=here, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    time.sleep(0.2)
    for pid in map(int, out.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the worker went with its parent


# ----------------------------------------------------------------------------
# tiny.py and data.py: the built-in world and the loaders


def _last_boxed(text):
    """Contents of the last \\boxed{...} (no nested braces needed for these tests), or None."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1] if found else None


# ----------------------------------------------------------------------------
# tiny.py


def test_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer
    tok = tiny.make_tokenizer()
    text = "47+38=?\n7+8=15 15\n4+3+1=8 85\n\\boxed{85}  Ab{[(|^_<>'\"!?;:)]}~`#$%&@"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and len(tok) == 257
    assert tok.chat_template is None
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "é"  # bytes: nothing is lost
    # A checkpoint directory also holds the model's config.json, and transformers then loads the
    # tokenizer through the model type's class (Qwen2Tokenizer): the ids must not change.
    tok.save_pretrained(tmp_path)
    tiny.make_model(tok).config.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]  # no special tokens added either
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == \
        (tok.eos_token_id, tok.pad_token_id, len(tok))
    assert loaded.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_model_save_load_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    x = torch.tensor([tok("12+34=?\n", add_special_tokens=False)["input_ids"]])  # [1, T]
    with torch.no_grad():
        logits = model(x).logits  # [1, T, V]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)
    # Seeded: the same seed gives the same weights, another seed different ones.
    with torch.no_grad():
        assert torch.equal(tiny.make_model(tok, seed=0)(x).logits, logits)
        assert not torch.equal(tiny.make_model(tok, seed=1)(x).logits, logits)
    assert tiny.make_model(tok, num_hidden_layers=1).config.num_hidden_layers == 1


def test_task_disjoint_verified_deterministic():
    train, evaluation = tiny.make_task(n_train=3000, n_eval=300, seed=0, digits=2)
    assert len(train) == 3000 and len(evaluation) == 300
    pair = lambda p: tuple(map(int, p.prompt[-1]["content"].rstrip("=?").split("+")))
    train_pairs = {pair(p) for p in train}
    eval_pairs = {pair(p) for p in evaluation}
    assert len(train_pairs) == 3000 and len(eval_pairs) == 300
    assert not train_pairs & eval_pairs
    assert not train_pairs & {(b, a) for a, b in eval_pairs}  # nor the swapped problem
    for p in train + evaluation:
        a, b = pair(p)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert p.answer == str(a + b) == _last_boxed(p.solution)
        assert p.solution.endswith("\\boxed{%s}" % p.answer) and len(p.solution) < 40
    again = tiny.make_task(n_train=3000, n_eval=300, seed=0, digits=2)
    assert again == (train, evaluation)
    assert tiny.make_task(n_train=3000, n_eval=300, seed=1, digits=2)[1] != evaluation
    assert tiny.make_task(n_train=10, n_eval=300, seed=0, digits=2)[1] == evaluation  # eval fixed by seed


def test_task_never_asks_what_the_base_model_was_pretrained_on():
    tok = tiny.make_tokenizer()
    two, three = tiny.pretraining_corpus(tok)
    seen = tiny.seen_three_digit_pairs()
    assert len(two) == 100 * 100 and len(three) == len(seen) == 20000
    assert all(100 <= a <= 999 and 100 <= b <= 999 and a + b < 1000 for a, b in seen)
    assert tok.decode(three[0][0]) == "%d+%d=?" % seen[0]  # the rows are those sums
    pair = lambda p: tuple(map(int, p.prompt[-1]["content"].rstrip("=?").split("+")))
    train, evaluation = tiny.make_task(n_train=4000, n_eval=200)
    asked = {pair(p) for p in train + evaluation}
    assert len(asked) == 4200 and all(a + b >= 1000 for a, b in asked)  # a fourth digit, every time
    assert not asked & ({*seen} | {(b, a) for a, b in seen})


def test_task_format_and_variants():
    assert tiny.solve(47, 38) == "7+8=15 15\n4+3+1=8 85\n\\boxed{85}"
    assert tiny.solve(67, 58) == "7+8=15 15\n6+5+1=12 125\n\\boxed{125}"
    assert tiny.solve(103, 201) == "3+1=4 4\n0+0=0 04\n1+2=3 304\n\\boxed{304}"
    verbose = tiny.solve(47, 38, teacher="verbose")
    assert _last_boxed(verbose) == "85" and verbose.count("\\boxed") == 1
    assert len(verbose) > 2 * len(tiny.solve(47, 38))
    train, evaluation = tiny.make_task(n_train=50, n_eval=20, digits=3, teacher="verbose")
    for p in train + evaluation:
        assert _last_boxed(p.solution) == p.answer and p.solution.startswith("We add")
    with pytest.raises(ValueError):
        tiny.make_task(n_train=100, n_eval=10, digits=1)  # only 100 one-digit problems


def test_untrained_model_never_answers():
    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok).eval()
    _, evaluation = tiny.make_task(n_train=10, n_eval=4)
    for p in evaluation:
        ids = tok(render_prompt(tok, p.prompt), return_tensors="pt")["input_ids"]  # [1, T]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)  # [1, T + new]
        completion = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert _last_boxed(completion) != p.answer


# ----------------------------------------------------------------------------
# data.py: fixtures with bad rows mixed in


FIXTURE_SYSTEM = "Think in <think></think>, then put the answer in \\boxed{}."


def _openr1_rows():
    good = lambda q, a: {
        "prompt": [{"role": "system", "content": FIXTURE_SYSTEM}, {"role": "user", "content": q}],
        "target": [{"role": "assistant", "content": f"<think>\n{q}\n</think>\n\\boxed{{{a}}}"}],
        "reward_model": {"ground_truth": a, "style": "rule"},
        "data_source": "openr1"}
    rows = [good("1+1?", "2"), good("2+2?", "4"), good("Interval?", "[0, 1]")]
    rows.append({**good("3+3?", "6"), "reward_model": {"ground_truth": "", "style": "rule"}})
    rows.append({**good("4+4?", "8"), "target": [{"role": "assistant", "content": ""}]})
    rows.append({**good("5+5?", "10"), "prompt": [{"role": "system", "content": FIXTURE_SYSTEM}]})
    return rows  # 3 good, then: missing answer, missing solution, empty prompt


def _flat_rows():
    return [{"problem": "What is 2+3?", "answer": "5", "solution": "2+3=5 \\boxed{5}"},
            {"problem": "What is 2+4?", "answer": "6", "solution": "\\boxed{6}"},
            {"problem": "What is 2+5?", "answer": None, "solution": "\\boxed{7}"},
            {"problem": "What is 2+6?", "answer": "8"},
            {"problem": "  ", "answer": "9", "solution": "\\boxed{9}"}]


def _write_fixture(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_load_openr1(tmp_path, ext):
    problems, stats = load_problems(_write_fixture(tmp_path, f"train.{ext}", _openr1_rows()))
    assert (stats["rows"], stats["kept"], stats["schema"]) == (6, 3, "openr1")
    assert stats["skipped_missing_answer"] == stats["skipped_missing_solution"] == \
        stats["skipped_empty_prompt"] == 1
    p = problems[0]
    assert p.prompt == [{"role": "system", "content": FIXTURE_SYSTEM},
                        {"role": "user", "content": "1+1?"}]
    assert (p.answer, p.source) == ("2", "openr1")
    assert p.solution.startswith("<think>\n") and _last_boxed(p.solution) == "2"
    assert problems[2].answer == "[0, 1]"  # a bracketed answer stays text
    # Eval files have no teacher: the missing-solution row is kept, solution "".
    problems, stats = load_problems(_write_fixture(tmp_path, f"eval.{ext}", _openr1_rows()),
                                    need_solution=False)
    assert stats["kept"] == 4 and problems[3].solution == ""


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_load_flat(tmp_path, ext):
    problems, stats = load_problems(_write_fixture(tmp_path, f"math.{ext}", _flat_rows()))
    assert (stats["rows"], stats["kept"], stats["schema"]) == (5, 2, "flat")
    assert stats["skipped_missing_answer"] == stats["skipped_missing_solution"] == \
        stats["skipped_empty_prompt"] == 1
    assert problems[0] == Problem([{"role": "user", "content": "What is 2+3?"}], "5",
                                  "2+3=5 \\boxed{5}", "")
    path = _write_fixture(tmp_path, f"e.{ext}", _flat_rows())
    assert load_problems(path, need_solution=False)[1]["kept"] == 3


def test_load_json_strings_and_arrays(tmp_path):
    # Some exports store nested columns as JSON strings (or numpy arrays, via pandas).
    import numpy as np
    row = _openr1_rows()[0]
    row = {k: json.dumps(v) if k != "data_source" else v for k, v in row.items()}
    problems, _ = load_problems(_write_fixture(tmp_path, "s.jsonl", [row]))
    assert problems[0].answer == "2" and len(problems[0].prompt) == 2
    flat = {"problem": "2+4?", "answer": 6, "solution": "\\boxed{6}"}
    problems, _ = load_problems(_write_fixture(tmp_path, "n.jsonl", [flat]))
    assert problems[0].answer == "6"  # numbers become text
    arr = np.empty(1, dtype=object)
    arr[0] = {"role": "assistant", "content": "\\boxed{2}"}
    assert data._row_to_problem({**_openr1_rows()[0], "target": arr}, "openr1", True).solution \
        == "\\boxed{2}"


def _load_error(spec, **kw):
    with pytest.raises(DataError) as e:
        load_problems(spec, **kw)
    msg = str(e.value)
    assert "\n" not in msg  # one line, and no chained traceback from pyarrow or json:
    assert e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__
    return msg


def test_load_errors(tmp_path):
    bad = _openr1_rows()[3:]
    for ext in ("jsonl", "parquet"):
        path = _write_fixture(tmp_path, f"bad.{ext}", bad)
        msg = _load_error(path)
        assert path in msg and "no usable row" in msg and "reward_model.ground_truth" in msg
        assert "data_source" in msg  # the fields found in the first row
    msg = _load_error(str(tmp_path / "missing.jsonl"))
    assert "no such file" in msg and "missing.jsonl" in msg
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_flat_rows()[0]) + "\n\n{not json\n")
    msg = _load_error(str(path))
    assert "line 3" in msg and "not valid JSON" in msg and "broken.jsonl" in msg
    (tmp_path / "latin1.jsonl").write_bytes(b'{"problem": "x"}\n{"problem": "\xe9"}\n')
    assert "line 2 is not UTF-8" in _load_error(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "rows.csv").write_text("problem,answer\n")
    assert "unknown extension '.csv'" in _load_error(str(tmp_path / "rows.csv"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "junk.parquet" in _load_error(str(tmp_path / "junk.parquet"))
    msg = _load_error(_write_fixture(tmp_path, "odd.jsonl", [{"question": "q", "label": "a"}]))
    assert "label" in msg and "question" in msg and "problem" in msg
    (tmp_path / "empty.jsonl").write_text("")
    assert "no rows" in _load_error(str(tmp_path / "empty.jsonl"))
    assert "unknown option" in _load_error("builtin:digits=x")
    assert "'eval'" in _load_error("builtin", split="test")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = _write_fixture(tmp_path, "t.parquet", _flat_rows())
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    assert _load_error(path) == f"reading {path} needs pyarrow: pip install pyarrow"


def test_hub_id(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    msg = _load_error("Elliott/Openr1-Math-46k-8192")
    assert msg == ("reading the hub data set 'Elliott/Openr1-Math-46k-8192' needs the datasets "
                   "package: pip install datasets")

    class FakeDatasets:  # the same rows through the hub path, without the network
        @staticmethod
        def load_dataset(name, split):
            if split != "train":
                raise ValueError(f"Unknown split \"{split}\".\nShould be one of ['train'].")
            return _openr1_rows()
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    problems, stats = load_problems("owner/name")
    assert stats["kept"] == 3 and problems[0].answer == "2"
    assert "Unknown split" in _load_error("owner/name", split="test")


def test_builtin_spec():
    problems, stats = load_problems(tiny.BUILTIN)
    train, evaluation = tiny.make_task()
    assert problems == train and stats["kept"] == len(train) and stats["schema"] == "builtin"
    assert load_problems("builtin", split="eval")[0] == evaluation
    problems, _ = load_problems("builtin:verbose,digits=3,n_train=20,n_eval=5,seed=2", "eval")
    assert problems == tiny.make_task(n_train=20, n_eval=5, seed=2, digits=3,
                                      teacher="verbose")[1]


# ----------------------------------------------------------------------------
# render_prompt and encode


def test_render_prompt():
    tok = tiny.make_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2=?"}]
    assert render_prompt(tok, msgs) == "Be brief.\n1+2=?"
    assert render_prompt(tok, msgs[1:]) == "1+2=?"
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_prompt(tok, msgs) == "<system>Be brief.\n<user>1+2=?\n<assistant>"


def test_encode_drops_and_counts():
    tok = tiny.make_tokenizer()
    eos = tok.eos_token_id
    problems = [Problem([{"role": "user", "content": "1+2=?"}], "3", "\\boxed{3}"),
                Problem([{"role": "user", "content": "11+22=?"}], "33", "\\boxed{33}"),
                Problem([{"role": "user", "content": "1+1=?"}], "2", "1+1=2 2\n\\boxed{2}")]
    encoded, stats = encode(tok, problems, max_prompt_tokens=5, max_solution_tokens=10)
    assert [e.answer for e in encoded] == ["3"]
    assert stats["kept"] == stats["dropped_long_prompt"] == stats["dropped_long_solution"] == 1
    e = encoded[0]
    assert tok.decode(e.prompt_ids) == "1+2=?" and e.problem is problems[0]
    assert e.solution_ids[-1] == eos and tok.decode(e.solution_ids[:-1]) == "\\boxed{3}"
    assert len(e.solution_ids) == 10  # 9 characters + EOS: exactly at the limit is kept
    assert encode(tok, problems, None, None)[1]["kept"] == 3
    with pytest.raises(DataError, match="max_solution_tokens=3"):
        encode(tok, problems, max_prompt_tokens=100, max_solution_tokens=3)
    with pytest.raises(DataError, match="max_prompt_tokens=2"):
        encode(tok, problems, max_prompt_tokens=2, max_solution_tokens=100)


def test_teachers_pass_the_reward():
    """The teachers SSI injects must verify, or HAPO would have nothing to anchor on."""
    reward = pytest.importorskip("reward").reward
    train, evaluation = tiny.make_task(n_train=30, n_eval=10, digits=3)
    verbose, _ = tiny.make_task(n_train=30, n_eval=10, teacher="verbose")
    for p in train + evaluation + verbose:
        assert reward(p.solution, p.answer) == 1.0
        assert reward(tiny.solve(1, 1), p.answer) == 0.0


# ----------------------------------------------------------------------------
# rollout.py: sampling engines and weight sync


_EOS, _PAD = 3, 0


def _tiny_qwen2(tie=True, seed=0, vocab=50):
    return tiny_qwen2(vocab=vocab, seed=seed, tie=tie, init=0.2)


def _tok(eos=_EOS, pad=_PAD):
    return SimpleNamespace(eos_token_id=eos, pad_token_id=pad)


_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16]]


@torch.no_grad()
def _greedy_reference(model, prompt, max_new_tokens, eos):
    """Slow, obvious greedy decoding: one unpadded prompt, full forward each step, no KV cache."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt):]


# ----------------------------------------------------------------------------
# HFEngine


def test_hf_greedy_matches_unpadded_reference_and_groups_by_prompt():
    model = _tiny_qwen2().eval()
    # make _EOS the token greedy decoding emits third for prompt 0, so at least one completion stops early
    eos = _greedy_reference(model, _PROMPTS[0], 3, eos=-1)[2]
    engine = HFEngine(model, _tok(eos=eos, pad=49))
    got = engine.generate(_PROMPTS, n=2, max_new_tokens=8, temperature=0.0)
    assert len(got) == len(_PROMPTS) * 2
    want = [_greedy_reference(model, p, 8, eos) for p in _PROMPTS]
    assert got == [w for w in want for _ in range(2)]  # left padding right, grouped by prompt
    assert got[0][-1] == eos and len(got[0]) <= 3
    # chunking into small generate() calls changes nothing for greedy decoding
    assert HFEngine(model, _tok(eos=eos, pad=49), max_batch=3).generate(_PROMPTS, 2, 8, 0.0) == got


def test_hf_sampling_contract_and_seed_reproducibility():
    model = _tiny_qwen2()
    engine = HFEngine(model, _tok())
    torch.manual_seed(123)
    a = engine.generate(_PROMPTS, n=4, max_new_tokens=24, temperature=1.0, top_p=1.0)
    torch.manual_seed(123)
    b = engine.generate(_PROMPTS, n=4, max_new_tokens=24, temperature=1.0, top_p=1.0)
    assert a == b  # the global torch RNG is the only source of randomness
    assert len(a) == 16
    for c in a:
        assert 1 <= len(c) <= 24
        assert _EOS not in c[:-1]  # cut after the first _EOS
        assert c[-1] == _EOS or len(c) == 24  # stopped, or ran out of budget
    assert any(c[-1] == _EOS for c in a) and any(len(c) == 24 and _EOS not in c for c in a)
    assert len({tuple(c) for c in a[:4]}) > 1  # the N samples of a prompt differ
    torch.manual_seed(124)
    assert engine.generate(_PROMPTS, 4, 24, 1.0) != a


def test_hf_greedy_deterministic_and_mode_restored():
    model = _tiny_qwen2()
    engine = HFEngine(model, _tok())
    model.train()
    a = engine.generate(_PROMPTS, 3, 10, temperature=0.0)
    assert model.training  # train mode restored
    model.eval()
    b = engine.generate(_PROMPTS, 3, 10, temperature=0.0)
    assert not model.training  # eval mode restored
    assert a == b
    for i in range(len(_PROMPTS)):
        assert a[3 * i] == a[3 * i + 1] == a[3 * i + 2]


def test_hf_sync_weights_into_a_copy():
    import copy
    trainer = _tiny_qwen2()
    sampler = copy.deepcopy(trainer)
    engine = HFEngine(sampler, _tok())
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(1.0)
    engine.sync_weights(trainer)
    for (n1, p1), (n2, p2) in zip(trainer.named_parameters(), sampler.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    engine.sync_weights(sampler)  # its own model: a no-op


# ----------------------------------------------------------------------------
# weights_for_sync


def test_weights_for_sync_tied_and_untied():
    tied = _tiny_qwen2(tie=True)
    got = list(weights_for_sync(tied))
    assert [n for n, _ in got] == [k for k in tied.state_dict() if k != "lm_head.weight"]
    for (name, t), p in zip(got, tied.parameters()):
        assert torch.equal(t, p) and not t.requires_grad
    untied = _tiny_qwen2(tie=False)
    names = [n for n, _ in weights_for_sync(untied)]
    assert names == list(untied.state_dict()) and names[-1] == "lm_head.weight"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch.compile's imports
def test_weights_for_sync_strips_wrapper_prefixes():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    model = _tiny_qwen2()
    want = [k for k in model.state_dict() if k != "lm_head.weight"]
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])

    class DDPLike(torch.nn.Module):  # DDP prefixes every name with `module.`
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = DDPLike(torch.compile(model))  # compile is lazy: only renames to `_orig_mod.`
    raw = [n for n, _ in wrapped.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in raw) and raw[0].startswith("module._orig_mod.")
    assert [n for n, _ in weights_for_sync(wrapped)] == want  # tie detected through the wrappers too
    assert hf_name("_fsdp_wrapped_module.model.norm.weight") == "model.norm.weight"


def test_weights_for_sync_gathers_dtensor_like_parameters():
    model = _tiny_qwen2()
    calls = []
    full = torch.arange(64.0)
    model.model.norm.weight.full_tensor = lambda: calls.append(1) or full  # duck-typed FSDP2 DTensor shard
    got = dict(weights_for_sync(model))
    assert calls == [1] and torch.equal(got["model.norm.weight"], full)


# ----------------------------------------------------------------------------
# make_engine


def test_make_engine_auto_picks_hf_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = make_engine("auto", _tiny_qwen2(), _tok(), "unused")
    assert isinstance(engine, HFEngine)
    assert "rollout engine: hf" in capsys.readouterr().out


def test_make_engine_vllm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install vllm.*--rollout hf"):
        make_engine("vllm", None, _tok(), "some/path")
    with pytest.raises(ValueError):
        make_engine("sglang", None, _tok(), "some/path")


# ----------------------------------------------------------------------------
# VLLMEngine against a fake `vllm` module


class _OldFakeLLM:
    """What the tests need of vllm.LLM; no collective_rpc, as in vLLM before 0.7."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.loaded, self.params = kwargs, [], [], None
        model = SimpleNamespace(load_weights=self._load_weights)
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            worker=self.worker)))

    def _load_weights(self, weights):
        self.calls.append("load_weights")
        self.loaded.extend(list(weights))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append("generate")
        self.params = sampling_params
        n = sampling_params.kw["n"]
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            samples = [  # out of index order; j%3: 0 stops on _EOS, 1 stops without _EOS shown, 2 runs out
                SimpleNamespace(index=j, token_ids=[ids[-1], 40 + j] + ([_EOS] if j % 3 == 0 else []),
                                finish_reason="length" if j % 3 == 2 else "stop")
                for j in reversed(range(n))]
            outs.append(SimpleNamespace(outputs=samples))
        return outs

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up{tags or ''}")


class _FakeLLM(_OldFakeLLM):
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append("collective_rpc")
        return [method(self.worker, *args, **(kwargs or {}))]  # a callable gets the worker first


class _FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = _FakeLLM, _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return mod


def test_vllm_engine_construction(fake_vllm, monkeypatch):
    engine = make_engine("vllm", None, _tok(), "path/to/model", seed=7, enable_sleep_mode=True,
                         max_model_len=256, gpu_memory_utilization=0.4)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the model lives in this process
    kw = engine.llm.kwargs
    assert kw["model"] == "path/to/model" and kw["generation_config"] == "vllm"
    assert kw["enable_prefix_caching"] and kw["enable_sleep_mode"] and kw["seed"] == 7
    assert kw["max_model_len"] == 256 and kw["gpu_memory_utilization"] == 0.4
    assert "distributed_executor_backend" not in kw
    # under torchrun: external launcher, one seed per tensor-parallel group
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    kw = VLLMEngine("m", _tok(), seed=7, tensor_parallel_size=2).llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["seed"] == 8
    assert kw["tensor_parallel_size"] == 2


def test_vllm_engine_generate(fake_vllm):
    engine = VLLMEngine("m", _tok())
    got = engine.generate([[1, 2], [7]], n=3, max_new_tokens=5, temperature=0.6, top_p=0.95)
    assert got == [[2, 40, _EOS], [2, 41, _EOS], [2, 42],  # prompt order, then sample index
                   [7, 40, _EOS], [7, 41, _EOS], [7, 42]]
    kw = engine.llm.params.kw
    explicit = {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "min_p": 0.0, "max_tokens": 5,
                "min_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "stop_token_ids": [_EOS], "ignore_eos": False, "seed": None, "logprobs": None}
    assert {k: kw[k] for k in explicit} == explicit


def test_vllm_engine_sync_weights_then_reset_prefix_cache(fake_vllm):
    engine = VLLMEngine("m", _tok(), enable_sleep_mode=True)
    model = _tiny_qwen2(tie=True)
    engine.sleep()  # the trainer's turn: vLLM releases its memory
    engine.sync_weights(model)  # weights memory comes back first, KV cache not yet
    engine.generate([[1]], n=1, max_new_tokens=2, temperature=1.0)
    engine.wake_up()  # already awake: no call
    expected = list(weights_for_sync(model))
    assert [n for n, _ in engine.llm.loaded] == [n for n, _ in expected]
    assert "lm_head.weight" not in dict(engine.llm.loaded)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(engine.llm.loaded, expected))
    # one load_weights call per tensor, then the prefix cache is dropped
    assert engine.llm.calls == (["sleep1", "wake_up['weights']"]
                                + ["collective_rpc", "load_weights"] * len(expected)
                                + ["reset_prefix_cache", "wake_up['kv_cache']", "generate"])
    # an LLM without collective_rpc (old vLLM): the in-process executor path
    engine.llm = _OldFakeLLM()
    engine.sync_weights(model)
    assert engine.llm.calls == ["load_weights"] * len(expected) + ["reset_prefix_cache"]
    assert [n for n, _ in engine.llm.loaded] == [n for n, _ in expected]
    # without sleep mode, sleep() and wake_up() do nothing
    plain = VLLMEngine("m", _tok())
    plain.sleep(), plain.wake_up()
    assert plain.llm.calls == []


# ----------------------------------------------------------------------------
# eval.py: benchmarks, avg@k and pass@1


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

    def generate(self, prompts, n, max_new_tokens, temperature, top_p=1.0):
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


def test_cli_tiny_model_both_layouts(tmp_path):
    """The real command: tiny model, HF engine, a .jsonl and a two-benchmark parquet."""
    from reward import extract_boxed, reward
    flat, luffy = _write_benchmarks(tmp_path)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "eval.py", "--model", "tiny", "--benchmarks", flat, luffy,
                        "--k", "2", "--max_new_tokens", "8", "--out_dir", str(out), "--rollout", "hf"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| benchmark | problems | k | avg@k (%) | pass@1 (%) |" in p.stdout
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
    from eval import resolve_model
    assert resolve_model("tiny") == "tiny"
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
    import tiny
    from data import Problem
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


# ----------------------------------------------------------------------------
# torchrun + FSDP2 on CPU (gloo): two ranks equal one process, and resume exactly

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RANK_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores: one thread each


def _run(cmd, cwd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=RANK_ENV, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


# ----------------------------------------------------------------------------
# the step on fixed data: loss and grad norm of 2 ranks == 1 process, to 1e-4

DRIVER = r'''
import json, sys
import torch
sys.path.insert(0, {here!r})
import data, tiny, train
from hapo import Group

SETTINGS = {{  # uneven micro-batches; two optimizer mini-batches (pi_old frozen). Activation checkpointing
# is left out: under gloo on 2 busy cores a rank aborted at teardown in 2 of ~8 runs (open issue).
    "micro": ["--micro_batch", "3"],
    "mini": ["--micro_batch", "3", "--mini_batches", "2"],
}}
train.setup_distributed()
tok = tiny.make_tokenizer()
problems, _ = data.encode(tok, tiny.make_task(n_train=12, n_eval=1)[0], None, None)


def global_groups(step, n=4):
    """The whole rollout batch of a step: 4 prompts x 4 rollouts, each rollout either the teacher's
    own solution (reward 1) or random bytes (reward 0), from a generator seeded by the step."""
    g = torch.Generator().manual_seed(1000 + step)
    groups = []
    for p in problems[4 * step:4 * step + 4]:
        right = (torch.rand(n, generator=g) < 0.3).tolist()
        junk = [torch.randint(1, 257, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]
        groups.append(Group(p.prompt_ids, [list(p.solution_ids) if r else j for r, j in zip(right, junk)],
                            [float(r) for r in right], p.solution_ids, 1.0))
    return groups


out = {{}}
for name, extra in SETTINGS.items():
    cfg = train.parse_args(["--batch_prompts", "4", "--group_size", "4", "--lr", "1e-2", *extra])
    policy, opt = train.make_policy(tiny.make_model(tok), cfg)
    rows = []
    for step in range(3):
        mine = global_groups(step)[train.rank::train.world]  # this rank's prompts, as train.py shards them
        rows.append(train.update(policy, opt, mine, cfg, 0.8, tok.pad_token_id))
    out[name] = rows
if train.master:
    json.dump(out, open(sys.argv[1], "w"))
if train.world > 1:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


def test_two_ranks_step_equals_one_process(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(here=HERE))
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(driver), str(one)], tmp_path)
    _run(TORCHRUN + [str(driver), str(two)], tmp_path)
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert one.keys() == two.keys() == {"micro", "mini"}
    for name in one:
        losses = [r["train/loss"] for r in one[name]]
        assert len(set(losses)) == 3, (name, losses)  # the weights moved: later steps test the optimizer too
        for step, (a, b) in enumerate(zip(one[name], two[name])):
            assert a.keys() == b.keys()
            assert a["train/teacher_injected"] > 0 and a["train/grad_norm"] > 0
            for k in a:  # loss, grad norm, and every metric reduced over ranks
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (name, step, k, a[k], b[k])


# ----------------------------------------------------------------------------
# train.py under torchrun: a run, its checkpoints, and an exact resume

DIST_SMALL = TRAIN_SMALL + ["--method", "hapo", "--save_every", "2", "--eval_every", "3"]


def test_two_ranks_train_checkpoint_and_resume_are_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train = TORCHRUN + [os.path.join(HERE, "train.py")] + DIST_SMALL
    _run(train + ["--max_steps", "4", "--out_dir", a], HERE)
    _run(train + ["--max_steps", "2", "--out_dir", b], HERE)
    _run(train + ["--max_steps", "4", "--out_dir", b, "--resume"], HERE)
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [0, 1, 2, 3, 4]  # rank 0 alone writes: one line a step
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    for r in ma[1:]:
        assert r["train/teacher_injected"] == 4  # a sum over ranks: the untrained model fails all 4 groups
        assert r["train/gate_open_frac"] == 1.0 and math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
    assert "eval/accuracy" in ma[0] and "eval/accuracy" in ma[3] and "eval/accuracy" in ma[4]
    for ra, rb in zip(ma, mb):  # b also evaluated at its stop (step 2): compare what both logged
        assert {k for k in ra if k.startswith("train/")} == {k for k in rb if k.startswith("train/")}
        for k in ra.keys() & rb.keys():
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    # the checkpoint is the whole model, gathered from the shards, and loads in transformers
    import torch
    from transformers import AutoModelForCausalLM
    import tiny
    ckpt = os.path.join(a, open(os.path.join(a, "latest")).read().strip())
    assert ckpt.endswith("step_000004") and sorted(os.listdir(a)) == ["latest", "metrics.jsonl", "step_000002",
                                                                       "step_000004"]
    saved = AutoModelForCausalLM.from_pretrained(ckpt)
    init = tiny.make_model(tiny.make_tokenizer())
    assert saved.state_dict().keys() == init.state_dict().keys()
    for (name, p), q in zip(saved.named_parameters(), init.parameters()):
        assert p.shape == q.shape and not torch.equal(p, q), name  # full size, and trained
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    assert state["world"] == 2 and len(state["rng"]) == 2 and state["step"] == 4


# ----------------------------------------------------------------------------
# experiment.py: a smoke run of the Figure 2 script (4 methods, 1 seed, 2 steps)


def test_experiment_script_smoke(tmp_path, capsys):
    import experiment
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
    import probe
    logliks = {}
    for variant in ("full", "teacher_only"):
        probe.main(["--steps", "2", "--every", "1", "--variant", variant])
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
        assert [int(l.split()[1]) for l in lines] == [0, 1, 2]
        logliks[variant] = [float(l.split("teacher log-lik")[1].split()[0]) for l in lines]
        assert all(x < 0 for x in logliks[variant])
    assert logliks["full"][0] == logliks["teacher_only"][0]  # the same base model
    assert logliks["full"][2] != logliks["teacher_only"][2]  # the failures' advantages moved the weights
