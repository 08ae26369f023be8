"""Advantages (Eq. 2), per-token log-probs, and the HAPO objective (Eqs. 3, 8, 9).

Sign convention: every function returns a loss to *minimise*, the negative of the paper's J.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def group_advantages(rewards, eps=1e-6):
    """Eq. 2: A_j = (R_j - mean(R)) / (std(R) + eps) within each group.

    rewards [M, N] -> advantages [M, N]. std is torch's unbiased one, as verl and TRL compute it;
    a group whose rewards are all equal has std 0 and numerator 0, so its advantages are exactly 0.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # [M, N]
    mean = rewards.mean(dim=1, keepdim=True)  # [M, 1]
    std = rewards.std(dim=1, keepdim=True)  # [M, 1]
    return (rewards - mean) / (std + eps)  # [M, N]


# ----------------------------------------------------------------------------
# per-token log-probs, never holding a second [B, T, V] tensor


def token_logprobs(logits, targets, chunk_size=1024):
    """log pi(target | context) from logits [B, T, V] and targets [B, T] -> [B, T].

    log_softmax(logits).gather(target) = logit[target] - logsumexp(logits). Done a chunk of
    positions at a time in fp32, so the extra memory is one [chunk, V] block rather than a full copy
    of the logits (2.5 GB for 4,096 tokens of Qwen's 151,936-token vocabulary).
    """
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)  # [B*T, V], a view
    tgt = targets.reshape(B * T)  # [B*T]
    out = []
    for i in range(0, B * T, chunk_size):
        block = flat[i:i + chunk_size].float()  # [c, V]
        picked = block.gather(1, tgt[i:i + chunk_size, None]).squeeze(1)  # [c]
        out.append(picked - torch.logsumexp(block, dim=1))  # [c]
    return torch.cat(out).view(B, T)  # [B, T]


def _chunk_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()  # [c, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)  # [c]


def hidden_logprobs(hidden, weight, targets, chunk_size=1024):
    """Like token_logprobs, but from the last hidden states [B, T, H] and the LM head weight [V, H].

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so neither
    pass ever holds more than one [chunk, V] block of logits: the full [B, T, V] never exists.
    """
    B, T, H = hidden.shape
    flat, tgt = hidden.reshape(B * T, H), targets.reshape(B * T)  # [B*T, H], [B*T]
    out = []
    for i in range(0, B * T, chunk_size):
        h, t = flat[i:i + chunk_size], tgt[i:i + chunk_size]  # [c, H], [c]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            out.append(checkpoint(_chunk_logprobs, h, weight, t, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(h, weight, t))
    return torch.cat(out).view(B, T)  # [B, T]


def sequence_logprobs(model, input_ids, attention_mask, chunk_size=1024):
    """Per-token log-probs of a causal LM: [B, L] ids -> [B, L-1] log pi(ids[:, t+1] | ids[:, :t+1])."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
    weight = model.get_output_embeddings().weight  # [V, H]
    return hidden_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], chunk_size)  # [B, L-1]


# ----------------------------------------------------------------------------
# the objective


def clipped_surrogate(logp, old_logp, advantages, clip_eps=0.2):
    """Eq. 3, per token, as a loss: -min(r A, clip(r, 1-eps, 1+eps) A), r = pi / pi_old. [B, T]."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    pg_loss1 = -advantages * ratio  # [B, T]
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # [B, T]
    return torch.maximum(pg_loss1, pg_loss2)  # [B, T]


def shaping(p, gamma=0.1):
    """LUFFY's policy shaping f(p) = p / (p + gamma): it lifts the gradient of low-probability tokens."""
    return p / (p + gamma)


def shaped_teacher_loss(logp, advantages, shaping_gamma=0.1):
    """Eq. 9's hindsight-anchored term, per token: -A f(p), p = exp(logp), no ratio and no clip. [B, T]."""
    return -advantages * shaping(torch.exp(logp), shaping_gamma)  # [B, T]


def sft_token_loss(logp):
    """The SRFT-like baseline's teacher term: plain negative log-likelihood, -log p. [B, T]."""
    return -logp


def hapo_loss(logp, old_logp, advantages, mask, teacher, clip_eps=0.2, shaping_gamma=0.1,
              num_tokens=None, teacher_loss="shaped"):
    """Eqs. 8-9: one token mean over every token of every trajectory, teacher and on-policy alike.

    logp, old_logp, mask: [B, T]; advantages: [B]; teacher: bool [B]. Teacher rows take the shaped
    loss (or -log p with teacher_loss="sft"), on-policy rows the clipped surrogate. The sum is divided
    by num_tokens, the token count of the *whole* rollout batch: passing it to every micro-batch (and
    rank) makes their losses add up to exactly the full-batch loss. Defaults to mask.sum().
    """
    mask = mask.to(logp.dtype)  # [B, T]
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    on_policy = clipped_surrogate(logp, old_logp, adv, clip_eps)  # [B, T]
    if teacher_loss == "shaped":
        off_policy = shaped_teacher_loss(logp, adv, shaping_gamma)  # [B, T]
    elif teacher_loss == "sft":
        off_policy = sft_token_loss(logp)  # [B, T]
    else:
        raise ValueError(f"teacher_loss must be 'shaped' or 'sft', got {teacher_loss!r}")
    per_token = torch.where(teacher[:, None], off_policy, on_policy)  # [B, T]
    if num_tokens is None:
        num_tokens = mask.sum()
    return (per_token * mask).sum() / num_tokens
