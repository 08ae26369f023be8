"""Advantages (Eq. 2), per-token log-probs and entropy, and the HAPO objective (Eqs. 3, 8, 9).

Sign convention: every function returns a loss to *minimise*, the negative of the paper's J.
"""

import torch

# ----------------------------------------------------------------------------
# Eq. 2


def group_advantages(rewards, eps=1e-6, scale_by_std=True):
    """Eq. 2: A_j = (R_j - mean(R)) / (std(R) + eps) within each group.

    rewards [M, N] -> advantages [M, N]. std is torch's unbiased one, as verl and TRL compute it;
    a group whose rewards are all equal has std 0 and numerator 0, so its advantages are exactly 0.
    scale_by_std=False leaves out the division (LUFFY's released script: grpo_use_std=False).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # [M, N]
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [M, N]
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)  # [M, N]


# ----------------------------------------------------------------------------
# per-token log-probs (and entropy), never holding a [B, T, V] tensor: for 4,096 tokens of Qwen's
# 151,936-token vocabulary the fp32 logits alone would be 2.5 GB


def _chunk_logits(h, weight, temperature):
    """One chunk's logits in fp32, of the sampling distribution: (h W^T) / T. [c, V]."""
    logits = _up(h @ weight.t())  # [c, V]; in bf16 under autocast, then fp32 for the softmax
    return logits if temperature == 1.0 else logits / temperature


def _up(x):
    """bf16/fp16 -> fp32; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _FusedLogprobs(torch.autograd.Function):
    """log p(target) and the entropy at each position, a chunk of positions at a time, from the last
    hidden states and the LM head. The backward recomputes each chunk's logits and turns them into
    their gradient in place, so neither pass holds more than two or three [chunk, V] blocks, and no
    autograd graph is built over the vocabulary at all.

    With z = logits / T, p = softmax(z), for a position with target t and upstream gradients g (of
    log p_t) and g_H (of the entropy H = -sum p log p):
        d log p_t / dz = onehot(t) - p,     dH / dz = -p (log p + H),
    and dz / dlogits = 1 / T; then dh = dlogits W and dW = dlogits^T h, summed over the chunks from
    the last to the first, as autograd would sum them (so the gradients equal the unfused ones).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        dtype = torch.get_autocast_dtype("cuda") if hidden.is_cuda and torch.is_autocast_enabled("cuda") else None
        ctx.chunk_size, ctx.temperature, ctx.dtype = chunk_size, temperature, dtype
        ctx.set_materialize_grads(False)  # an unused entropy output sends no gradient, not zeros
        logp, entropy, lses = [], [], []
        with torch.autocast("cuda", enabled=False):
            w = _cast(weight, dtype)
            for i in range(0, hidden.shape[0], chunk_size):
                z = _chunk_logits(_cast(hidden[i:i + chunk_size], dtype), w, temperature)  # [c, V]
                lse = torch.logsumexp(z, dim=1)  # [c]
                lses.append(lse)
                logp.append(z.gather(1, targets[i:i + chunk_size, None]).squeeze(1) - lse)  # [c]
                z.sub_(lse[:, None])  # log p, in place
                entropy.append(-z.exp().mul_(z).sum(dim=1))  # [c]: -sum p log p, one more [c, V] block
                del z  # before the next chunk's block exists
        entropy = torch.cat(entropy)
        ctx.save_for_backward(hidden, weight, targets, torch.cat(lses), entropy)
        return torch.cat(logp), entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, lses, entropies = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        T, dtype, c = ctx.temperature, ctx.dtype, ctx.chunk_size
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None
        with torch.autocast("cuda", enabled=False):
            w = _cast(weight, dtype)
            for i in reversed(range(0, hidden.shape[0], c)):
                h = _cast(hidden[i:i + c], dtype)  # [c, H]
                z = _chunk_logits(h, w, T)  # [c, V]
                lse = lses[i:i + c, None]  # [c, 1], as the forward computed it
                if g_entropy is None:  # the usual case: the gradient takes the place of the logits
                    grad = z.sub_(lse).exp_().mul_(-g_logp[i:i + c, None])  # -g p
                else:  # -g p - g_H p (log p + H), with H as the forward computed it
                    logp = z.sub_(lse)  # [c, V], in place
                    grad = logp.exp()  # p, [c, V]
                    logp.add_(entropies[i:i + c, None]).mul_(grad).mul_(g_entropy[i:i + c, None])  # g_H p (log p + H)
                    if g_logp is not None:
                        grad.mul_(-g_logp[i:i + c, None]).sub_(logp)
                    else:
                        grad = logp.neg_()
                if g_logp is not None:
                    grad.scatter_add_(1, targets[i:i + c, None], g_logp[i:i + c, None])  # + g onehot(t)
                if T != 1.0:
                    grad.div_(T)
                grad = grad.to(h.dtype)
                if grad_h is not None:
                    grad_h[i:i + c] = grad @ w
                if ctx.needs_input_grad[1]:
                    # summed in fp32: on CUDA add_ casts the chunk's bf16 [V, H] part as it reads it, where an
                    # fp32 copy of the part was one more LM head per chunk (2 GiB for Qwen2.5-7B's); only on
                    # CPU does TensorIterator make that copy inside add_ (CPU runs train in fp32 anyway)
                    if grad_w is None:
                        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(h.dtype, torch.float32),
                                             device=weight.device)
                    grad_w.add_(grad.t() @ h)  # [V, H]
                del z, grad  # before the next chunk's blocks exist
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def _cast(x, dtype):
    return x if dtype is None else x.to(dtype)


def hidden_logprobs(hidden, weight, targets, chunk_size=1024, temperature=1.0, entropy=False):
    """Per-token log-probs [B, T] (and entropy [B, T] with entropy=True) from the last hidden states
    [B, T, H] and the LM head weight [V, H], of the distribution the rollouts were sampled from:
    softmax(logits / temperature). Chunked and fused (_FusedLogprobs): the full [B, T, V] never exists.
    """
    B, T, H = hidden.shape
    logp, ent = _FusedLogprobs.apply(hidden.reshape(B * T, H), weight, targets.reshape(B * T), chunk_size,
                                     float(temperature))  # [B*T], [B*T]
    return (logp.view(B, T), ent.view(B, T)) if entropy else logp.view(B, T)


def sequence_logprobs(model, input_ids, attention_mask, chunk_size=1024, temperature=1.0, entropy=False,
                      position_ids=None):
    """Per-token log-probs of a causal LM: [B, L] ids -> [B, L-1] log pi(ids[:, t+1] | ids[:, :t+1]),
    at the sampling temperature; with entropy=True also the policy's entropy at each position.
    Packed rows (several sequences in one row) pass position_ids restarting at 0 for each sequence
    and attention_mask=None: transformers then masks attention within each sequence.

    Any causal LM: the decoder and the head come from transformers' own accessors (get_decoder,
    get_output_embeddings), tied or untied alike. The logits are computed here, from the head's weight
    alone, so a head with a bias or a final logit soft-cap (Gemma 2) is refused by models.check_family."""
    decoder = model.get_decoder()  # no KV cache below (it would also hide packing)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state  # [B, L, H]
    weight = model.get_output_embeddings().weight  # [V, H]
    return hidden_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], chunk_size, temperature, entropy)


# ----------------------------------------------------------------------------
# the objective


def clipped_surrogate(logp, old_logp, advantages, clip_eps=0.2, clip=True):
    """Eq. 3, per token, as a loss: -min(r A, clip(r, 1-eps, 1+eps) A), r = pi / pi_old. [B, T].
    clip=False is the unclipped -r A (LUFFY's released script: loss_remove_clip=True)."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    pg_loss1 = -advantages * ratio  # [B, T]
    if not clip:
        return pg_loss1
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
              num_tokens=None, teacher_loss="shaped", clip=True, is_weights=None):
    """Eqs. 8-9: one token mean over every token of every trajectory, teacher and on-policy alike.

    logp, old_logp, mask: [B, T]; advantages: [B] (or per token, [B, T]); teacher: bool [B] (or
    [B, T]). Teacher tokens take the shaped loss (or -log p with teacher_loss="sft"), on-policy
    tokens the clipped surrogate (unclipped with clip=False), each on-policy token's loss weighted
    by is_weights [B, T] when given (a truncated importance-sampling correction). The sum is
    divided by num_tokens, the token count of the *whole* rollout batch: passing it to every
    micro-batch (and rank) makes their losses add up to exactly the full-batch loss. Defaults to
    mask.sum().
    """
    mask = mask.to(logp.dtype)  # [B, T]
    adv = advantages.to(logp.dtype)  # [B] or [B, T]
    adv = adv[:, None] if adv.dim() == 1 else adv  # [B, 1] or [B, T]
    teacher = teacher[:, None] if teacher.dim() == 1 else teacher  # [B, 1] or [B, T]
    on_policy = clipped_surrogate(logp, old_logp, adv, clip_eps, clip)  # [B, T]
    if is_weights is not None:
        on_policy = on_policy * is_weights
    if teacher_loss == "shaped":
        off_policy = shaped_teacher_loss(logp, adv, shaping_gamma)  # [B, T]
    elif teacher_loss == "sft":
        off_policy = sft_token_loss(logp)  # [B, T]
    else:
        raise ValueError(f"teacher_loss must be 'shaped' or 'sft', got {teacher_loss!r}")
    per_token = torch.where(teacher, off_policy, on_policy)  # [B, T]
    if num_tokens is None:
        num_tokens = mask.sum()
    return (per_token * mask).sum() / num_tokens


def clip_stats(logp, old_logp, advantages, mask, clip_eps=0.2):
    """Sums over the on-policy tokens in mask: (tokens, tokens where the clip binds and the gradient
    is zero, sum of the ratio, max of the ratio). Divided out over the whole step in update.py."""
    ratio = torch.exp(logp - old_logp).detach()  # [B, T]
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    clipped = (-adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)) > (-adv * ratio)  # [B, T]
    on = mask > 0
    return (on.sum(), (clipped & on).sum(), (ratio * on).sum(),
            ratio[on].max() if on.any() else torch.zeros((), device=ratio.device))


# ----------------------------------------------------------------------------
# rollout correction: the sampler (vLLM) and the trainer compute different log-probs for the same
# tokens; importance weights pi_old / pi_sampler correct the on-policy gradient for it (TRL's
# vllm_importance_sampling_*, verl's rollout_correction). docs/ALGORITHM.md has the table of modes.


def segment_ids(shape, position_ids=None):
    """Which trajectory each [B, T] position belongs to, numbered within its row: all 0 for padded
    rows (one trajectory a row), 0, 1, 2 ... for packed rows, whose position ids restart at 0."""
    if position_ids is None:
        return torch.zeros(shape, dtype=torch.long)
    return (position_ids[:, :shape[1]] == 0).long().cumsum(dim=1) - 1  # [B, T]


def rollout_ratio(old_logp, sampler_logp, mask, level="token", segments=None):
    """The raw importance ratio pi_old / pi_sampler at each position [B, T]: per token, or, at
    level="sequence", the product over the trajectory's tokens in mask (exp of the summed log-ratio),
    the same value at each of its positions (TRL's sequence_* modes, verl's rollout_is=sequence)."""
    log_ratio = (old_logp - sampler_logp) * mask  # [B, T]
    if level == "sequence":
        segments = torch.zeros_like(log_ratio, dtype=torch.long) if segments is None else segments.to(log_ratio.device)
        per_seq = torch.zeros(log_ratio.shape[0], int(segments.max()) + 1, dtype=log_ratio.dtype,
                              device=log_ratio.device).scatter_add_(1, segments, log_ratio)  # [B, S]
        log_ratio = per_seq.gather(1, segments)  # [B, T]
    elif level != "token":
        raise ValueError(f"rollout correction level must be 'token' or 'sequence', got {level!r}")
    return torch.exp(log_ratio)  # [B, T]


def correction_weights(ratio, cap, mode="truncate"):
    """(weights [B, T], changed [B, T] bool). truncate: min(ratio, cap) (TIS); mask: the ratio where
    it is <= cap, 0 where it is above (the token or trajectory leaves the loss). changed marks where
    ratio > cap, the positions the correction truncated or masked."""
    changed = ratio > cap  # [B, T]
    if mode == "truncate":
        return ratio.clamp(max=cap), changed
    if mode == "mask":
        return ratio.masked_fill(changed, 0.0), changed
    raise ValueError(f"rollout correction mode must be 'truncate' or 'mask', got {mode!r}")


def mismatch_stats(old_logp, sampler_logp, mask, segments=None):
    """Sums over the tokens in mask, divided out over the step in update.py: (the trajectories' log
    perplexity differences summed, each the mean over its tokens of log pi_sampler - log pi_old,
    i.e. the trainer's log-perplexity minus the sampler's, as verl's log_ppl_diff; the number of
    trajectories; the k3 estimate of KL(sampler || trainer) summed over tokens, r - 1 - log r with
    r = pi_old / pi_sampler, non-negative at each token)."""
    log_r = (old_logp - sampler_logp) * mask  # [B, T]
    k3 = (torch.expm1(log_r) - log_r) * mask  # [B, T]; expm1: no cancellation when r is near 1
    segments = torch.zeros_like(log_r, dtype=torch.long) if segments is None else segments.to(log_r.device)
    per_seq = lambda x: torch.zeros(x.shape[0], int(segments.max()) + 1, dtype=x.dtype,
                                    device=x.device).scatter_add_(1, segments, x)  # [B, S]
    tokens, diff = per_seq(mask.to(log_r.dtype)), per_seq(-log_r)  # [B, S], [B, S]
    has = tokens > 0
    return (diff[has] / tokens[has]).sum(), has.sum(), k3.sum()
