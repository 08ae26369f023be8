"""Tier 1: the options beyond the paper's equations, by hand. LUFFY's grouping (N-1 sampled + the
teacher) and its script's switches (no std, no clip, a constant normaliser), the entropy and its
bonus, log-probs at the sampling temperature, truncated completions, clipping statistics, the
importance-sampling correction and the learning-rate schedules."""

import math
from types import SimpleNamespace

import pytest
import torch

import hapo
import update
from hapo import Group
from loss import group_advantages, hapo_loss, hidden_logprobs, sequence_logprobs
from tests.helpers import tiny_qwen2


def _groups(n):
    """One all-fail group and one half-success group of n sampled rollouts, each with a teacher."""
    return [Group([1, 2], [[3 + k] for k in range(n)], [0.0] * n, [9, 9], 1.0),
            Group([1, 2], [[3 + k] for k in range(n)], [1.0, 0.0] * (n // 2) + [0.0] * (n % 2), [9, 9], 1.0)]


def test_luffy_and_srft_sample_n_minus_1_and_add_the_teacher():
    assert [hapo.rollouts_per_group(m, 8) for m in ("hapo", "grpo", "luffy", "srft")] == [8, 8, 7, 7]
    for method in ("luffy", "srft"):
        groups = _groups(7)
        trained = hapo.inject(groups, hapo.gate_groups(groups, method, 0.8)[0], method)
        for g, t in zip(groups, trained):
            assert t.responses == g.responses + [[9, 9]] and t.rewards == g.rewards + [1.0] and t.teacher_at == 7
    # a 7-of-8 group: hapo would replace its one failure (all equal: no signal); luffy keeps it
    g = [Group([1], [[3]] * 7, [1.0] * 6 + [0.0], [9], 1.0)]
    luffy = hapo.inject(g, torch.tensor([True]), "luffy")[0]
    hapo_g = hapo.inject(g, torch.tensor([True]), "hapo")[0]
    assert luffy.rewards == [1.0] * 6 + [0.0, 1.0] and hapo_g.rewards == [1.0] * 7
    # a teacher that fails its own verification is never added: the group stays N-1, advantages still work
    bad = [Group([1], [[3]] * 3, [1.0, 0.0, 0.0], [9], 0.0), Group([1], [[3]] * 3, [0.0] * 3, [9], 1.0)]
    trained = hapo.inject(bad, torch.tensor([True, True]), "luffy")
    assert [len(t.responses) for t in trained] == [3, 4] and trained[0].teacher_at is None
    adv = hapo.advantages(trained)
    assert adv[0].tolist() == pytest.approx([2 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3)],
                                            abs=1e-5)
    assert hapo.pack(trained, adv, 0).teacher.tolist() == [False] * 6 + [True]
    sums, means = hapo.metrics(bad, trained, torch.tensor([True, True]), torch.tensor([0.4, 0.2]))
    assert sums == {"train/teacher_injected": 1, "train/teacher_failed": 1}


def test_advantages_without_std_luffy_script():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert group_advantages(r, scale_by_std=False).tolist() == [[0.75, -0.25, -0.25, -0.25], [0.5, 0.5, -0.5, -0.5]]
    assert group_advantages(r)[0, 0].item() == pytest.approx(0.75 / 0.5, rel=1e-5)


def test_loss_without_clip_luffy_script():
    old = torch.log(torch.tensor([[0.4, 0.4]]))
    new = torch.log(torch.tensor([[0.8, 0.1]]))  # ratios 2 and 0.25, outside [0.8, 1.2]
    adv, mask, teacher = torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([False])
    assert hapo_loss(new, old, adv, mask, teacher).item() == pytest.approx(-(1.2 + 0.25) / 2)
    assert hapo_loss(new, old, adv, mask, teacher, clip=False).item() == pytest.approx(-(2.0 + 0.25) / 2)


def test_entropy_against_categorical_and_temperature():
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(11, 6, dtype=torch.float64)
    t = torch.randint(0, 11, (2, 5))
    for temperature in (1.0, 0.6):
        logp, ent = hidden_logprobs(h, w, t, chunk_size=3, temperature=temperature, entropy=True)
        dist = torch.distributions.Categorical(logits=(h @ w.t()) / temperature)
        assert torch.allclose(ent, dist.entropy()) and torch.allclose(logp, dist.log_prob(t))
    # the trainer's log-probs are those of the distribution sampled at T: logits / T, not the raw logits
    model = tiny_qwen2().double().eval()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[:, :-1] / 0.7, -1).gather(-1, ids[:, 1:, None])[..., 0]
        got = sequence_logprobs(model, ids, torch.ones_like(ids), temperature=0.7)
        plain = sequence_logprobs(model, ids, torch.ones_like(ids))
    assert torch.allclose(got, ref) and not torch.allclose(plain, ref)


def _cfg(**kw):
    base = dict(method="hapo", mini_batches=1, micro_batch=64, micro_batch_tokens=0, pack=False, clip_eps=0.2,
                shaping_gamma=0.1, chunk_size=1024, grad_clip=1.0, temperature=1.0, entropy_coef=0.0,
                clip_on_policy=True, is_correction=False, is_cap=2.0, is_level="token", is_mode="truncate",
                loss_norm="token_mean", max_new_tokens=8,
                lr=1e-3, lr_schedule="constant", warmup_steps=0, max_steps=10)
    return SimpleNamespace(**{**base, **kw})


def _batch():
    groups = [Group([1, 2, 3], [[4, 5], [6], [7, 8, 9]], [1.0, 0.0, 0.0], [9, 9], 1.0),
              Group([1, 2], [[5, 5, 5], [6, 7], [8]], [0.0, 0.0, 0.0], [9, 9, 9], 1.0)]
    trained = hapo.inject(groups, hapo.gate_groups(groups, "hapo", 0.8)[0])
    return hapo.pack(trained, hapo.advantages(trained), 0)


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    from lib.parallel import Dist, Policy
    model, batch = tiny_qwen2().double(), _batch()
    n = batch.num_tokens()
    plain, stats = hapo.batch_loss(model, batch, "hapo", n)
    bonus, _ = hapo.batch_loss(model, batch, "hapo", n, entropy_coef=0.5)
    assert bonus.item() == pytest.approx(plain.item() - 0.5 * stats["entropy"].item() / n, rel=1e-9)
    assert 0 < stats["entropy"].item() / n <= math.log(40)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = update.optimize(Policy(model), opt, batch, _cfg(), Dist(), lr=0.0)
    assert m["train/entropy"] == pytest.approx(stats["entropy"].item() / n)


def test_constant_normaliser_luffy_script():
    model, batch = tiny_qwen2().double(), _batch()
    from lib.parallel import Dist, Policy
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    token_mean = update.optimize(Policy(model), opt, batch, _cfg(), Dist(), lr=0.0)["train/loss"]
    constant = update.optimize(Policy(model), opt, batch, _cfg(loss_norm="constant"), Dist(), lr=0.0)["train/loss"]
    assert constant == pytest.approx(token_mean * batch.num_tokens() / (len(batch) * 8), rel=1e-9)


def test_truncated_completions_counted_and_optionally_masked():
    g = [Group([1], [[2, 3], [4, 5]], [0.0, 0.0], [9], 1.0, truncated=[True, False])]
    trained = hapo.inject(g, torch.tensor([True]))  # the teacher replaces the first (truncated) one
    assert trained[0].teacher_at == 0
    _, means = hapo.metrics(g, trained, torch.tensor([True]), torch.tensor([0.25]))
    assert means["train/truncated_frac"] == 0.5
    keep = hapo.pack(g, torch.zeros(1, 2), 0)
    masked = hapo.pack(g, torch.zeros(1, 2), 0, mask_truncated=True)
    assert keep.loss_mask.sum(1).tolist() == [2, 2] and masked.loss_mask.sum(1).tolist() == [0, 2]
    # the teacher is never masked, even where it replaced a truncated sample
    assert hapo.pack(trained, torch.zeros(1, 2), 0, mask_truncated=True).loss_mask.sum(1).tolist() == [1, 2]


def test_clip_statistics_and_importance_weights():
    from loss import clip_stats
    logp = torch.log(torch.tensor([[0.6, 0.2, 0.5, 0.4]]))
    old = torch.log(torch.tensor([[0.4, 0.4, 0.5, 0.4]]))  # ratios 1.5, 0.5, 1, 1
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    tokens, clipped, ratio_sum, ratio_max = clip_stats(logp, old, adv, mask)
    # 1.5 with A > 0 is clipped (gradient 0); 0.5 with A > 0 is not (the min keeps the unclipped term)
    assert (tokens.item(), clipped.item()) == (3, 1)
    assert ratio_sum.item() == pytest.approx(3.0) and ratio_max.item() == pytest.approx(1.5)
    # truncated importance sampling: each on-policy token's loss times min(pi_old / pi_sampler, cap)
    w = torch.tensor([[2.0, 0.5, 1.0, 1.0]])
    base = hapo_loss(logp, old, adv[0, :1].expand(1), mask, torch.tensor([False]), num_tokens=1.0, clip=False)
    weighted = hapo_loss(logp, old, adv[0, :1].expand(1), mask, torch.tensor([False]), num_tokens=1.0, clip=False,
                         is_weights=w)
    assert base.item() == pytest.approx(-(1.5 + 0.5 + 1.0)) and weighted.item() == pytest.approx(-(3.0 + 0.25 + 1.0))


def test_learning_rate_schedules():
    lr = lambda s, **kw: update.lr_at(s, _cfg(lr=1.0, max_steps=11, **kw))
    assert [lr(s) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr(s, warmup_steps=4) for s in (0, 1, 3, 4, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [lr(s, lr_schedule="linear", warmup_steps=1) for s in (0, 1, 6)] == [1.0, 1.0, 0.5]
    cos = [lr(s, lr_schedule="cosine", warmup_steps=1) for s in (1, 6, 11)]
    assert cos == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_importance_sampling_correction_uses_the_samplers_logprobs():
    """--is_correction: each on-policy token's loss times min(pi_old / pi_sampler, cap), from the
    log-probs the engine reported; off, the same batch gives the plain loss."""
    model, batch = tiny_qwen2().double(), _batch()
    n = batch.num_tokens()
    with torch.no_grad():
        logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask)  # [B, L-1]
    shift = torch.linspace(-1.0, 1.0, logp.numel()).view_as(logp).double()
    batch.sampler_logp = (logp - shift) * batch.loss_mask  # pi_old / pi_sampler = exp(shift) on response tokens
    plain, stats = hapo.batch_loss(model, batch, "hapo", n)
    capped, _ = hapo.batch_loss(model, batch, "hapo", n, is_cap=2.0)
    weights = torch.exp(logp - batch.sampler_logp).clamp(max=2.0)  # [B, L-1]
    want = hapo_loss(logp, logp, batch.advantages, batch.loss_mask, batch.teacher, num_tokens=n, is_weights=weights)
    assert capped.item() == pytest.approx(want.item(), rel=1e-9) and capped.item() != pytest.approx(plain.item())
    on = batch.loss_mask * ~batch.teacher[:, None]
    assert stats["gap_sum"].item() / stats["gap_tokens"].item() == pytest.approx(
        ((shift.abs() * on).sum() / on.sum()).item(), rel=1e-6)
