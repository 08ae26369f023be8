"""The gate: Bayesian confidence (Eqs. 5-6), the threshold gamma(t) (Sec. 4.2), Algorithm 1, and SSI (Eq. 7).

Each group of N rollouts for one prompt is N Bernoulli trials of the prompt's unknown success rate
alpha. With a uniform Beta(1, 1) prior, after S successes the posterior is Beta(1 + S, 1 + N - S)
(Eq. 5), whose mean is the confidence c = (1 + S) / (2 + N) (Eq. 6). When c < gamma the gate opens
and Synthetic Success Injection (SSI) swaps the group's worst rollout for the verified teacher
trajectory (Eq. 7). Since c grows with S, "c < gamma" is "S < gamma (2 + N) - 1": with N = 8 and
gamma = 0.8 the gate opens exactly for S <= 6.
"""

import math

import torch

SCHEDULES = ("constant", "sigmoid", "step")


def confidence(successes, n):
    """Eq. 6: posterior mean of Beta(1 + S, 1 + N - S). Works on ints, floats and tensors."""
    if isinstance(successes, torch.Tensor):
        successes = successes.double()  # exact enough that c < gamma matches S < gamma(2+N) - 1
    return (1 + successes) / (2 + n)


def threshold(progress, gamma, schedule="constant", gamma_end=None, sharpness=10.0):
    """gamma(t) for training progress t in [0, 1] (Sec. 4.2: constant, sigmoid or step).

    constant: gamma throughout. sigmoid: a smooth move from gamma (t = 0) to gamma_end (t = 1),
    rescaled so both ends are exact and t = 0.5 is their midpoint. step: gamma before t = 0.5,
    gamma_end from then on. With gamma_end < gamma the teacher is withdrawn on a timetable, on top of
    the withdrawal the confidence already does by itself.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown gamma schedule {schedule!r}; choose one of {SCHEDULES}")
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant" or gamma_end is None:
        return gamma
    if schedule == "step":
        return gamma if t < 0.5 else gamma_end
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))
    lo, hi = sig(-sharpness / 2), sig(sharpness / 2)
    s = (sig(sharpness * (t - 0.5)) - lo) / (hi - lo)  # 0 at t = 0, 1/2 at t = 0.5, 1 at t = 1
    return gamma + (gamma_end - gamma) * s


def gate(rewards, gamma):
    """Algorithm 1: rewards [M, N] of 0/1 -> (open [M] bool, confidence [M]). Open means c < gamma."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)  # [M, N]
    successes = (rewards > 0.5).sum(dim=1)  # [M]
    c = confidence(successes, rewards.shape[1])  # [M]
    return c < gamma, c


def worst_index(rewards):
    """Eq. 7's j* = argmin_j R(tau_j): the first rollout with the lowest reward (deterministic ties)."""
    rewards = [float(r) for r in rewards]
    return rewards.index(min(rewards))


def ssi(group, rewards, teacher, teacher_reward):
    """Eq. 7: the group with its worst rollout replaced by the teacher trajectory.

    Returns (new_group, new_rewards, j) with j the replaced index, or the inputs unchanged and j = None
    when the teacher is missing or fails its own verification (a wrong teacher is never injected).
    """
    if teacher is None or teacher_reward < 0.5:
        return list(group), list(rewards), None
    j = worst_index(rewards)
    group, rewards = list(group), list(rewards)
    group[j], rewards[j] = teacher, float(teacher_reward)
    return group, rewards, j


def hoeffding_bound(mu, gamma, n):
    """Eq. 11: P(c < gamma) <= exp(-2 N (mu - gamma)^2), for a success rate mu > gamma."""
    return math.exp(-2 * n * (mu - gamma) ** 2)


def gate_open_probability(mu, gamma, n):
    """The exact P(c < gamma) for S ~ Binomial(N, mu): the chance the gate opens on a prompt whose
    success rate is mu, i.e. the expected teacher share of such prompts.

    c < gamma is S < gamma (2 + N) - 1, so this is the binomial CDF up to the largest S that opens
    (S <= 6 at N = 8, gamma = 0.8). Eq. 11 bounds it, loosely: at mu = 0.9 the bound is 0.85 and this
    is 0.187. For a fixed N it reaches 0 only at mu = 1; below that the teacher keeps coming back,
    e.g. 0.057 at mu = 0.95 (two failures in eight open it). Eq. 11 is Hoeffding's bound on S/N <= gamma,
    while the gate's event is S/N < gamma + (2 gamma - 1)/N; at N = 8 both are S <= 6.
    """
    opens = [s for s in range(n + 1) if confidence(s, n) < gamma]  # the same comparison as gate()
    return sum(math.comb(n, s) * mu**s * (1 - mu) ** (n - s) for s in opens)
