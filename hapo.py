"""One HAPO step on a batch of groups: gate -> SSI -> advantages -> packed tensors -> loss.

train.py calls these in Figure 1's order; each is a pure function of its arguments:

    opened, conf = gate_groups(groups, method, gamma)   # stage 3: Eqs. 5-6, Algorithm 1
    trained = inject(groups, opened)                    # stage 4: SSI, Eq. 7
    adv = advantages(trained)                           # stage 5: Eq. 2, on the groups after SSI
    batch = pack(trained, adv, pad_id)                  # the trajectories as tensors
    loss = batch_loss(model, batch, method, num_tokens) # stage 6: Eqs. 8-9 (update.py runs it)

The baselines of the paper are the same step with another gate, injection and teacher loss:

    method  gate                          the group trained on              teacher loss
    grpo    never inject                  N sampled                         -
    luffy   always inject                 N-1 sampled + the teacher         shaped, -A p/(p+0.1)
    srft    always inject                 N-1 sampled + the teacher         plain SFT, -log p
    hapo    inject when c_i < gamma(t)    N sampled, the worst replaced     shaped, -A p/(p+0.1)
    sft     no gate, no rollouts          the teacher alone                 plain SFT, -log p

LUFFY samples N-1 rollouts and adds the teacher as the N-th (its `n_prefix=1`); HAPO's SSI (Eq. 7)
replaces the worst of N. A teacher that fails its own verification is never injected: its group
stays as sampled (N-1 rollouts for luffy and srft). sft samples nothing for training: its batch is
each prompt's verified teacher alone (teacher_only), so stages 1-5 reduce to one, and Eq. 8's token
mean runs over the teacher tokens only; a prompt whose teacher fails verification is left out.
"""

import dataclasses
from dataclasses import dataclass

import torch

from gate import gate, ssi
from loss import (clip_stats, correction_weights, group_advantages, hapo_loss, mismatch_stats, rollout_ratio,
                  segment_ids, sequence_logprobs)

METHODS = {  # method -> (when to inject, how, teacher loss)
    "hapo": ("gated", "replace", "shaped"),
    "grpo": ("never", None, None),
    "luffy": ("always", "append", "shaped"),
    "srft": ("always", "append", "sft"),
    "sft": (None, None, "sft"),  # imitation alone: no rollouts, so no gate and no group (teacher_only)
}


@dataclass
class Group:
    """One prompt and its N completions (token ids) with their 0/1 rewards (Eq. 4)."""
    prompt_ids: list
    responses: list
    rewards: list
    teacher_ids: list = None  # the verified teacher trajectory tau_*, EOS included
    teacher_reward: float = 0.0  # the teacher scored by the same reward function
    teacher_at: int = None  # after SSI: the index of the injected teacher in responses, else None
    truncated: list = None  # per response: cut for length without EOS, rollout.truncated (None: none was)
    sampler_logp: list = None  # per response: the sampling engine's log-prob of each token, if given


@dataclass
class Batch:
    """A rollout batch packed for the trainer: B = M * N trajectories, right-padded to length L."""
    input_ids: torch.Tensor  # [B, L] prompt + response
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1] 1 where position t predicts a response token
    advantages: torch.Tensor  # [B]
    teacher: torch.Tensor  # [B] bool
    old_logp: torch.Tensor = None  # [B, L-1] pi_theta_old, when more than one update uses the batch
    sampler_logp: torch.Tensor = None  # [B, L-1] the rollout engine's log-probs of the sampled tokens
    position_ids: torch.Tensor = None  # [B, L] only for packed rows (update.pack_rows)
    group: torch.Tensor = None  # [B] the index of each row's group (mini-batches are cut between groups)

    def __len__(self):
        return self.input_ids.shape[0]

    def num_tokens(self):
        return int(self.loss_mask.sum())

    def rows(self):  # trajectories: one per row, or several in a packed row
        return len(self) if self.position_ids is None else int((self.position_ids == 0).sum())

    def slice(self, i, j):
        return Batch(*(None if x is None else x[i:j] for x in self._fields()))

    def to(self, device):
        return Batch(*(None if x is None else x.to(device) for x in self._fields()))

    def _fields(self):
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def rollouts_per_group(method, group_size):
    """How many rollouts to sample per prompt: N, or N-1 when the teacher is added as the N-th (sft: none)."""
    if method == "sft":
        return 0
    return group_size - 1 if check_method(method)[1] == "append" else group_size


# ----------------------------------------------------------------------------
# sft: stages 1-5 in one


def teacher_only(problems):
    """SFT's batch, sampled from no one: each problem's teacher as its group's one trajectory (.prompt_ids,
    .solution_ids; train.py keeps only verified teachers). Returns (groups, advantages [M, 1]): the
    advantage is 0 because -log p does not read it, and 0 keeps the unused on-policy branch finite."""
    groups = [Group(p.prompt_ids, [p.solution_ids], [1.0], p.solution_ids, 1.0, teacher_at=0) for p in problems]
    return groups, torch.zeros(len(groups), 1)  # [M, 1]


def teacher_metrics(groups):
    """SFT's step metrics as (sums, means): only the teacher count has a meaning without rollouts."""
    return {"train/teacher_injected": sum(g.teacher_at is not None for g in groups)}, {}


# ----------------------------------------------------------------------------
# stages 3-5: gate -> SSI -> advantages


def gate_groups(groups, method, gamma):
    """Algorithm 1 with the method's gate: (open [M] bool, confidence [M]) from the sampled rewards."""
    when, _, _ = check_method(method)
    n = len(groups[0].rewards)
    if any(len(g.rewards) != n or len(g.responses) != n for g in groups):
        raise ValueError("every group must hold the same number of rollouts and rewards")
    opened, conf = gate([g.rewards for g in groups], gamma)  # [M], [M]
    if when != "gated":
        opened = torch.full_like(opened, when == "always")
    return opened, conf


def inject(groups, opened, method="hapo"):
    """The teacher into every opened group: SSI (Eq. 7) replaces the worst rollout (hapo), LUFFY adds
    it to the N-1 sampled (luffy, srft). A missing teacher, or one that failed its own verification,
    is never injected: the group stays as sampled."""
    how = check_method(method)[1]
    out = []
    for g, is_open in zip(groups, opened.tolist()):
        responses, rewards, j = g.responses, g.rewards, None
        if is_open and how == "append":
            if g.teacher_ids is not None and g.teacher_reward >= 0.5:
                responses, rewards, j = [*g.responses, g.teacher_ids], [*g.rewards, float(g.teacher_reward)], len(g.responses)
        elif is_open:
            responses, rewards, j = ssi(g.responses, g.rewards, g.teacher_ids, g.teacher_reward)
        out.append(dataclasses.replace(g, responses=responses, rewards=rewards, teacher_at=j))
    return out


def advantages(groups, scale_by_std=True):
    """Eq. 2 on each group as trained (after SSI): [M, N], or one [N_i] row per group when a failed
    teacher left some groups a rollout short."""
    if len({len(g.rewards) for g in groups}) == 1:
        return group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32),
                                scale_by_std=scale_by_std)  # [M, N]
    return [group_advantages(torch.tensor([g.rewards], dtype=torch.float32), scale_by_std=scale_by_std)[0]
            for g in groups]


def metrics(sampled, trained, opened, conf):
    """A step's metrics as (sums, means): counts add up over ranks, fractions and means average.
    Reward and length are over the policy's own samples, teacher excluded (the paper's Figure 2)."""
    rewards = torch.tensor([g.rewards for g in sampled], dtype=torch.float32)  # [M, N], before SSI
    equal = torch.tensor([max(g.rewards) == min(g.rewards) for g in trained], dtype=torch.float32)  # [M]
    lengths = [len(r) for g in sampled for r in g.responses]
    truncated = [t for g in sampled for t in (g.truncated or [False] * len(g.responses))]
    injected = sum(g.teacher_at is not None for g in trained)
    sums = {"train/teacher_injected": injected,
            "train/teacher_failed": int(opened.sum()) - injected}
    means = {"train/reward": rewards.mean().item(),
             "train/response_len": sum(lengths) / len(lengths),
             "train/gate_open_frac": opened.float().mean().item(),
             "train/confidence": conf.mean().item(),
             "train/all_fail_frac": (rewards.max(dim=1).values < 0.5).float().mean().item(),
             "train/zero_var_frac": equal.mean().item(),
             "train/truncated_frac": sum(truncated) / len(truncated)}
    return sums, means


def pack(groups, adv, pad_id, mask_truncated=False):
    """Flatten the groups' trajectories into right-padded tensors (a Batch); adv[i][k] is the advantage
    of group i's k-th trajectory. mask_truncated leaves the policy's truncated samples out of the loss
    (TRL's mask_truncated_completions): at 8k tokens, scoring them 0 would teach brevity."""
    rows = []
    for i, g in enumerate(groups):
        for k, r in enumerate(g.responses):
            is_teacher = k == g.teacher_at
            cut = bool(g.truncated and not is_teacher and k < len(g.truncated) and g.truncated[k])
            slp = g.sampler_logp[k] if g.sampler_logp is not None and not is_teacher else None
            rows.append((g.prompt_ids, r, is_teacher, float(adv[i][k]), mask_truncated and cut, slp))
    L = max(len(p) + len(r) for p, r, *_ in rows)
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros(B, L, dtype=torch.long)  # [B, L]
    loss_mask = torch.zeros(B, L - 1)  # [B, L-1]
    sampler = torch.zeros(B, L - 1) if any(r[5] is not None for r in rows) else None  # [B, L-1]
    for b, (prompt, response, _, _, masked, slp) in enumerate(rows):
        P, R = len(prompt), len(response)
        input_ids[b, :P + R] = torch.tensor(list(prompt) + list(response))
        attention_mask[b, :P + R] = 1
        loss_mask[b, P - 1:P + R - 1] = 0 if masked else 1  # logits at t predict token t+1: the response starts at P
        if slp is not None:
            sampler[b, P - 1:P + R - 1] = torch.tensor(slp, dtype=torch.float32)
    advantages = torch.tensor([r[3] for r in rows], dtype=torch.float32)  # [B]
    teacher = torch.tensor([r[2] for r in rows], dtype=torch.bool)  # [B]
    group = torch.tensor([i for i, g in enumerate(groups) for _ in g.responses])  # [B]
    return Batch(input_ids, attention_mask, loss_mask, advantages, teacher, sampler_logp=sampler, group=group)


# ----------------------------------------------------------------------------
# stage 6: the loss of one (micro-)batch


def batch_loss(model, batch, method, num_tokens, clip_eps=0.2, shaping_gamma=0.1, chunk_size=1024,
               temperature=1.0, entropy_coef=0.0, clip=True, is_cap=None, is_level="token", is_mode="truncate"):
    """Forward the policy on a (micro-)batch: (Eq. 8's loss with the global normaliser, stats).

    With no old_logp the batch is used for exactly one update, so pi_theta_old = pi_theta and the
    ratio is 1 (its gradient still flows through logp). Log-probs are those of the distribution the
    rollouts were sampled from, logits / temperature. entropy_coef > 0 subtracts that times the
    token mean of the policy's entropy (LUFFY: 0.001). is_cap, with the engine's sampler log-probs in
    the batch, weights each on-policy token by the rollout correction for a sampler whose numerics
    differ from the trainer's: the ratio pi_old / pi_sampler per token or per trajectory (is_level),
    truncated at is_cap or masked above it (is_mode); token + truncate is TIS.
    stats holds detached sums (entropy, tokens, clipping, sampler mismatch) that update.py adds up.
    """
    _, _, teacher_loss = check_method(method)
    logp, entropy = sequence_logprobs(model, batch.input_ids, batch.attention_mask, chunk_size, temperature,
                                      entropy=True, position_ids=batch.position_ids)  # [b, L-1], [b, L-1]
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp  # [b, L-1]
    mask = batch.loss_mask  # [b, L-1]
    teacher = batch.teacher if batch.teacher.dim() == 2 else batch.teacher[:, None].expand_as(mask)  # [b, L-1]
    on_policy = mask * ~teacher  # [b, L-1]
    is_weights = None
    if batch.sampler_logp is not None:
        level = is_level if is_cap is not None else "token"  # without a correction: the token ratio's max
        segments = segment_ids(mask.shape, batch.position_ids)  # [b, L-1]: the trajectory of each position
        ratio = rollout_ratio(old_logp.detach(), batch.sampler_logp, on_policy, level, segments).detach()  # [b, L-1]
        if is_cap is not None:
            is_weights, changed = correction_weights(ratio, is_cap, is_mode)  # [b, L-1], [b, L-1]
    loss = hapo_loss(logp, old_logp, batch.advantages, mask, batch.teacher, clip_eps=clip_eps,
                     shaping_gamma=shaping_gamma, num_tokens=num_tokens, teacher_loss=teacher_loss or "shaped",
                     clip=clip, is_weights=is_weights)
    if entropy_coef:
        loss = loss - entropy_coef * (entropy * mask).sum() / num_tokens
    stats = {"entropy": (entropy.detach() * mask).sum(), "tokens": mask.sum()}
    if batch.old_logp is not None:
        stats.update(zip(("on_tokens", "clipped", "ratio_sum", "ratio_max"),
                         clip_stats(logp, old_logp, batch.advantages, on_policy, clip_eps)))
    if batch.sampler_logp is not None:
        stats["gap_sum"] = ((old_logp - batch.sampler_logp).abs() * on_policy).sum()
        stats["gap_tokens"] = on_policy.sum()
        stats["log_ppl_diff"], stats["trajectories"], stats["kl_k3"] = mismatch_stats(
            old_logp.detach(), batch.sampler_logp, on_policy, segments)
        on = on_policy > 0
        stats["is_ratio_max"] = ratio[on].max() if on.any() else torch.zeros((), device=ratio.device)
        if is_weights is not None:
            stats["is_changed"] = (changed & on).sum()
    return loss, stats
