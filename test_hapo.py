"""Tests: each equation against hand-computed values, equivalences against slow references, and
short end-to-end runs. `pytest test_hapo.py` (about N minutes on 2 CPU cores)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gate import confidence, gate, hoeffding_bound, ssi, threshold, worst_index
from hapo import Group, batch_loss, build_batch, inject
from loss import (clipped_surrogate, group_advantages, hapo_loss, hidden_logprobs, shaping,
                  token_logprobs)

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_qwen2(vocab=40, seed=0, tie=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
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
import resource, sys, torch
sys.path.insert(0, {here!r})
from loss import token_logprobs
torch.manual_seed(0)
logits = torch.randn(2, 256, 151936)  # [B, T, V] fp32: 311 MB
tgt = torch.randint(0, 151936, (2, 256))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if {naive}:
    out = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])
else:
    out = token_logprobs(logits, tgt, chunk_size=32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_chunked_logprobs_peak_memory_far_below_naive():
    peak = {}
    for naive in (True, False):
        code = _PEAK.format(here=HERE, naive=naive)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
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
