"""The whole test suite, in two speeds (docs/TESTING.md):

    python -m pytest -q test_hapo.py          # tiers 1 and 2 and one short train.py run: the check after an edit
    python -m pytest -q test_hapo.py --all    # and tier 3, every test marked `slow`: what CI runs

1. Equations by hand. This file proves each equation of the method against numbers worked out by
   hand (Eqs. 2-9, Algorithm 1, Theorem 4.2); tests/test_reward.py does the same for Eq. 4, the
   reward, over a table of answer forms; tests/test_options.py for the options beyond the
   equations (LUFFY's grouping and script switches, entropy, temperature, truncation, clipping
   statistics, schedules); tests/test_data.py for the data loaders and the built-in task and model.
2. Equivalences against a slow, obvious reference (tests/test_equivalence.py, tests/test_rollout.py):
   micro-batches == the whole batch, chunked log-probs == log_softmax, batched sampling == one
   prompt at a time; and one train.py run of three steps in this process (tests/test_end_to_end.py).
3. `slow` (conftest.py leaves these out without --all): train.py runs that stop, fail and resume
   (tests/test_faults.py), two ranks == one process and a resumed run == an uninterrupted one
   (tests/test_equivalence.py), the scripts' and the experiments' smoke runs, the rebuild of the
   shipped model, and any test over about 3 s or that starts a child process.

Markers (pytest.ini): `slow` (tier 3), `distributed` (torchrun; also slow), `vllm` (runs where vLLM
is installed: CI runs `-m vllm --all` in an environment of its own), `gpu` (skips without CUDA).
Data (the reward's case table), child-process drivers and shared helpers live in tests/.
"""

import math

import pytest

pytest.register_assert_rewrite("tests")  # plain asserts in tests/ report their values too

import torch  # noqa: E402

import hapo  # noqa: E402
from gate import confidence, gate, hoeffding_bound, ssi, threshold, worst_index  # noqa: E402
from hapo import Group  # noqa: E402
from loss import clipped_surrogate, group_advantages, hapo_loss, shaping  # noqa: E402

from tests.test_reward import *  # noqa: E402,F401,F403  tier 1: Eq. 4
from tests.test_options import *  # noqa: E402,F401,F403  tier 1: LUFFY's switches, entropy, schedules
from tests.test_data import *  # noqa: E402,F401,F403  tier 1: data, task, tiny model
from tests.test_equivalence import *  # noqa: E402,F401,F403  tier 2
from tests.test_rollout import *  # noqa: E402,F401,F403  tier 2
from tests.test_end_to_end import *  # noqa: E402,F401,F403  the one train.py run; tier 3: the scripts
from tests.test_eval import *  # noqa: E402,F401,F403  eval.py
from tests.test_faults import *  # noqa: E402,F401,F403  tier 3 mostly: what a run survives
from tests.test_vllm import *  # noqa: E402,F401,F403  tiers 2 and 3 on vLLM itself (-m vllm --all)
from tests.test_rehearsal import *  # noqa: E402,F401,F403  what the 7B recipe's first GPU run would hit (issue 21)
from tests.test_evidence import *  # noqa: E402,F401,F403  Theorem 4.2's numbers, the task variants, the experiment's smoke run
from tests.test_scale import *  # noqa: E402,F401,F403  tier 3: the 7B and 1.5B recipes rehearsed on the CPU (plan.py)
from tests.test_families import *  # noqa: E402,F401,F403  Qwen3, Llama, Gemma 3 in every tier; rollout-correction modes
from tests.test_sft import *  # noqa: E402,F401,F403  --method sft and SFT-then-RL, tiers 1-3
from tests.test_layout import *  # noqa: E402,F401,F403  tier 1: the house (root and lib/), no arrow up, no cycle
from tests.test_recipe import *  # noqa: E402,F401,F403  the card's command: recipes, the pre-flight, one rank per GPU
from tests.test_plot import *  # noqa: E402,F401,F403  tier 1: scripts/plot.py, a picture of any run
from tests.test_grid import *  # noqa: E402,F401,F403  tier 1: scripts/grid.py, each row's setting chosen on validation


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
    opened, conf = hapo.gate_groups(groups, "hapo", 0.8)
    trained = hapo.inject(groups, opened)
    adv = hapo.advantages(trained)  # after SSI the rewards are [1, 0, 0, 0]: mean 1/4, unbiased std 1/2
    assert adv[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert trained[0].teacher_at == 0 and trained[0].responses[0] == [9, 9]
    batch = hapo.pack(trained, adv, pad_id=0)
    assert batch.teacher.tolist() == [True, False, False, False]
    sums, means = hapo.metrics(groups, trained, opened, conf)
    assert sums["train/teacher_injected"] == 1 and means["train/zero_var_frac"] == 0.0
    assert means["train/reward"] == 0.0  # the policy's own samples: the teacher is not counted


def test_methods_gate_differently():
    def groups():  # one all-fail group, one all-success group
        return [Group([1], [[2]] * 8, [0.0] * 8, [7], 1.0), Group([1], [[3]] * 8, [1.0] * 8, [7], 1.0)]
    injected = {}
    for m in ("hapo", "grpo", "luffy", "srft"):
        trained = hapo.inject(groups(), hapo.gate_groups(groups(), m, 0.8)[0])
        injected[m] = sum(g.teacher_at is not None for g in trained)
    assert injected == {"hapo": 1, "grpo": 0, "luffy": 2, "srft": 2}
    opened, conf = hapo.gate_groups(groups(), "grpo", 0.8)
    _, means = hapo.metrics(groups(), hapo.inject(groups(), opened), opened, conf)
    assert means["train/zero_var_frac"] == 1.0 and means["train/reward"] == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        hapo.gate_groups(groups(), "ppo", 0.8)


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


# ----------------------------------------------------------------------------
# the suite itself


def test_every_test_name_is_collected_once():
    """tests/ modules are star-imported here: a test name defined twice would silently hide one."""
    import tests.test_data
    import tests.test_end_to_end
    import tests.test_equivalence
    import tests.test_eval
    import tests.test_evidence
    import tests.test_faults
    import tests.test_families
    import tests.test_options
    import tests.test_reward
    import tests.test_rollout
    import tests.test_scale
    import tests.test_vllm
    names = [n for m in (tests.test_reward, tests.test_options, tests.test_data, tests.test_equivalence, tests.test_rollout,
                         tests.test_end_to_end, tests.test_eval, tests.test_faults, tests.test_vllm, tests.test_evidence,
                         tests.test_scale, tests.test_families)
             for n in vars(m) if n.startswith("test_")]
    names += [n for n, f in globals().items() if n.startswith("test_") and f.__module__ == __name__]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
