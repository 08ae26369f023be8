"""One HAPO step: groups of rollouts -> gate and SSI -> advantages -> packed tensors -> loss.

The baselines of the paper are the same step with another gate and teacher loss (SPEC.md's table):

    method  gate                          teacher loss
    grpo    never inject                  -
    luffy   always inject                 shaped, -A p/(p+0.1)
    srft    always inject                 plain SFT, -log p
    hapo    inject when c_i < gamma(t)    shaped, -A p/(p+0.1)
"""

from dataclasses import dataclass

import torch

from gate import gate, ssi
from loss import group_advantages, hapo_loss, sequence_logprobs

METHODS = {  # method -> (when to inject, teacher loss)
    "hapo": ("gated", "shaped"),
    "grpo": ("never", None),
    "luffy": ("always", "shaped"),
    "srft": ("always", "sft"),
}


@dataclass
class Group:
    """One prompt and its N sampled completions (token ids) with their 0/1 rewards (Eq. 4)."""
    prompt_ids: list
    responses: list
    rewards: list
    teacher_ids: list = None  # the verified teacher trajectory tau_*, EOS included
    teacher_reward: float = 0.0  # the teacher scored by the same reward function


@dataclass
class Batch:
    """A rollout batch packed for the trainer: B = M * N trajectories, right-padded to length L."""
    input_ids: torch.Tensor  # [B, L] prompt + response
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1] 1 where position t predicts a response token
    advantages: torch.Tensor  # [B]
    teacher: torch.Tensor  # [B] bool
    old_logp: torch.Tensor = None  # [B, L-1] pi_theta_old, when more than one update uses the batch

    def __len__(self):
        return self.input_ids.shape[0]

    def num_tokens(self):
        return int(self.loss_mask.sum())

    def slice(self, i, j):
        pick = lambda x: None if x is None else x[i:j]
        return Batch(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


# ----------------------------------------------------------------------------
# gate -> SSI -> advantages


def inject(groups, method, gamma):
    """Algorithm 1 with the method's gate, then SSI (Eq. 7) on the groups it opens for.

    Returns (trajectories, metrics): trajectories is a list over groups of N (prompt, response,
    is_teacher, advantage) tuples, advantages by Eq. 2 on each group *after* injection.
    """
    when, _ = check_method(method)
    n = len(groups[0].rewards)
    if any(len(g.rewards) != n or len(g.responses) != n for g in groups):
        raise ValueError("every group must hold the same number of rollouts and rewards")
    opened, conf = gate([g.rewards for g in groups], gamma)  # [M], [M]
    if when != "gated":
        opened = torch.full_like(opened, when == "always")
    out_rewards, flags, injected, teacher_failed = [], [], 0, 0
    for g, is_open in zip(groups, opened.tolist()):
        responses, rewards, j = g.responses, g.rewards, None
        if is_open:
            responses, rewards, j = ssi(g.responses, g.rewards, g.teacher_ids, g.teacher_reward)
            teacher_failed += j is None
            injected += j is not None
        out_rewards.append(rewards)
        flags.append([(responses[k], k == j) for k in range(n)])
    rewards = torch.tensor(out_rewards, dtype=torch.float32)  # [M, N], after SSI
    adv = group_advantages(rewards)  # [M, N]
    trajs = [[(g.prompt_ids, resp, is_t, float(adv[i, k])) for k, (resp, is_t) in enumerate(row)]
             for i, (g, row) in enumerate(zip(groups, flags))]
    sampled = torch.tensor([g.rewards for g in groups], dtype=torch.float32)  # [M, N], before SSI
    lengths = [len(r) for g in groups for r in g.responses]
    metrics = {  # reward and length are over the policy's own samples: teacher excluded (Fig. 2)
        "train/reward": sampled.mean().item(),
        "train/response_len": sum(lengths) / len(lengths),
        "train/teacher_injected": injected,
        "train/teacher_failed": teacher_failed,
        "train/gate_open_frac": opened.float().mean().item(),
        "train/confidence": conf.mean().item(),
        "train/all_fail_frac": (sampled.max(dim=1).values < 0.5).float().mean().item(),
        "train/zero_var_frac": (rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean().item(),
    }
    return trajs, metrics


def pack(trajs, pad_id):
    """Flatten the groups' trajectories into right-padded tensors (a Batch)."""
    rows = [t for group in trajs for t in group]
    L = max(len(p) + len(r) for p, r, _, _ in rows)
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros(B, L, dtype=torch.long)  # [B, L]
    loss_mask = torch.zeros(B, L - 1)  # [B, L-1]
    for b, (prompt, response, _, _) in enumerate(rows):
        P, R = len(prompt), len(response)
        input_ids[b, :P + R] = torch.tensor(list(prompt) + list(response))
        attention_mask[b, :P + R] = 1
        loss_mask[b, P - 1:P + R - 1] = 1  # logits at t predict token t+1: the response starts at P
    advantages = torch.tensor([a for _, _, _, a in rows], dtype=torch.float32)  # [B]
    teacher = torch.tensor([t for _, _, t, _ in rows], dtype=torch.bool)  # [B]
    return Batch(input_ids, attention_mask, loss_mask, advantages, teacher)


def build_batch(groups, method, gamma, pad_id):
    """Groups -> (Batch, metrics): the data side of one HAPO step."""
    trajs, metrics = inject(groups, method, gamma)
    return pack(trajs, pad_id), metrics


# ----------------------------------------------------------------------------
# the loss of one (micro-)batch


def batch_loss(model, batch, method, num_tokens, clip_eps=0.2, shaping_gamma=0.1, chunk_size=1024):
    """Forward the policy on a (micro-)batch and return Eq. 8's loss with the global normaliser.

    With no old_logp the batch is used for exactly one update, so pi_theta_old = pi_theta and the
    ratio is 1 (its gradient still flows through logp).
    """
    _, teacher_loss = check_method(method)
    logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, chunk_size)  # [b, L-1]
    old_logp = logp.detach() if batch.old_logp is None else batch.old_logp  # [b, L-1]
    return hapo_loss(logp, old_logp, batch.advantages, batch.loss_mask, batch.teacher,
                     clip_eps=clip_eps, shaping_gamma=shaping_gamma, num_tokens=num_tokens,
                     teacher_loss=teacher_loss or "shaped")
