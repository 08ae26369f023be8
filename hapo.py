"""One HAPO step on a batch of groups: gate -> SSI -> advantages -> packed tensors -> loss.

train.py calls these in Figure 1's order; each is a pure function of its arguments:

    opened, conf = gate_groups(groups, method, gamma)   # stage 3: Eqs. 5-6, Algorithm 1
    trained = inject(groups, opened)                    # stage 4: SSI, Eq. 7
    adv = advantages(trained)                           # stage 5: Eq. 2, on the groups after SSI
    batch = pack(trained, adv, pad_id)                  # the trajectories as tensors
    loss = batch_loss(model, batch, method, num_tokens) # stage 6: Eqs. 8-9 (update.py runs it)

The baselines of the paper are the same step with another gate and teacher loss:

    method  gate                          teacher loss
    grpo    never inject                  -
    luffy   always inject                 shaped, -A p/(p+0.1)
    srft    always inject                 plain SFT, -log p
    hapo    inject when c_i < gamma(t)    shaped, -A p/(p+0.1)
"""

import dataclasses
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
    """One prompt and its N completions (token ids) with their 0/1 rewards (Eq. 4)."""
    prompt_ids: list
    responses: list
    rewards: list
    teacher_ids: list = None  # the verified teacher trajectory tau_*, EOS included
    teacher_reward: float = 0.0  # the teacher scored by the same reward function
    teacher_at: int = None  # after SSI: the index of the injected teacher in responses, else None


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
        return Batch(*(None if x is None else x[i:j] for x in self._fields()))

    def to(self, device):
        return Batch(*(None if x is None else x.to(device) for x in self._fields()))

    def _fields(self):
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


# ----------------------------------------------------------------------------
# stages 3-5: gate -> SSI -> advantages


def gate_groups(groups, method, gamma):
    """Algorithm 1 with the method's gate: (open [M] bool, confidence [M]) from the sampled rewards."""
    when, _ = check_method(method)
    n = len(groups[0].rewards)
    if any(len(g.rewards) != n or len(g.responses) != n for g in groups):
        raise ValueError("every group must hold the same number of rollouts and rewards")
    opened, conf = gate([g.rewards for g in groups], gamma)  # [M], [M]
    if when != "gated":
        opened = torch.full_like(opened, when == "always")
    return opened, conf


def inject(groups, opened):
    """SSI (Eq. 7) on every opened group: its worst rollout becomes the teacher trajectory, unless the
    teacher is missing or failed its own verification (then the group stays as sampled)."""
    out = []
    for g, is_open in zip(groups, opened.tolist()):
        responses, rewards, j = g.responses, g.rewards, None
        if is_open:
            responses, rewards, j = ssi(g.responses, g.rewards, g.teacher_ids, g.teacher_reward)
        out.append(dataclasses.replace(g, responses=responses, rewards=rewards, teacher_at=j))
    return out


def advantages(groups):
    """Eq. 2 on each group as trained (after SSI): [M, N]."""
    return group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32))  # [M, N]


def metrics(sampled, trained, opened, conf):
    """A step's metrics as (sums, means): counts add up over ranks, fractions and means average.
    Reward and length are over the policy's own samples, teacher excluded (the paper's Figure 2)."""
    rewards = torch.tensor([g.rewards for g in sampled], dtype=torch.float32)  # [M, N], before SSI
    after = torch.tensor([g.rewards for g in trained], dtype=torch.float32)  # [M, N], after SSI
    lengths = [len(r) for g in sampled for r in g.responses]
    injected = sum(g.teacher_at is not None for g in trained)
    sums = {"train/teacher_injected": injected,
            "train/teacher_failed": int(opened.sum()) - injected}
    means = {"train/reward": rewards.mean().item(),
             "train/response_len": sum(lengths) / len(lengths),
             "train/gate_open_frac": opened.float().mean().item(),
             "train/confidence": conf.mean().item(),
             "train/all_fail_frac": (rewards.max(dim=1).values < 0.5).float().mean().item(),
             "train/zero_var_frac": (after.max(dim=1).values == after.min(dim=1).values).float().mean().item()}
    return sums, means


def pack(groups, adv, pad_id):
    """Flatten the groups' trajectories into right-padded tensors (a Batch); adv is [M, N]."""
    rows = [(g.prompt_ids, r, k == g.teacher_at, float(adv[i, k]))
            for i, g in enumerate(groups) for k, r in enumerate(g.responses)]
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


# ----------------------------------------------------------------------------
# stage 6: the loss of one (micro-)batch


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
