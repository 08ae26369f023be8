"""The policy update of one step (stages 6-7): mini-batches, micro-batches, one optimizer step each.

Eq. 8 divides the summed token losses by the token count of the whole rollout batch (of the whole
mini-batch, with --mini_batches > 1), on every rank. So each micro-batch's loss uses that global
count, and their gradients add up to exactly the full-batch gradient, however the batch is split
over micro-batches and ranks. FSDP2 averages gradients over ranks, so each loss is scaled by the
world size to turn that average back into the sum Eq. 8 asks for.
"""

import math

import torch

from hapo import batch_loss
from loss import sequence_logprobs
from parallel import all_sum


def old_logprobs(policy, batch, micro_batch, chunk_size):
    """pi_theta_old's per-token log-probs [B, L-1], frozen before the first of several updates."""
    with torch.no_grad():
        return torch.cat([policy(sequence_logprobs, batch.input_ids[i:i + micro_batch],
                                 batch.attention_mask[i:i + micro_batch], chunk_size)
                          for i in range(0, len(batch), micro_batch)])


def optimize(policy, opt, batch, cfg, dist):
    """cfg.mini_batches optimizer steps over the batch, each over micro-batches of cfg.micro_batch
    trajectories. Returns (loss, grad_norm) of the last optimizer step: Eq. 8's loss over its
    mini-batch, summed over ranks, and the gradient norm before clipping.

    Reads cfg.method, .mini_batches, .micro_batch, .clip_eps, .shaping_gamma, .chunk_size, .grad_clip.
    """
    policy.train()
    bf16 = dist.device.type == "cuda" and dist.world == 1  # FSDP2 casts by itself (parallel.shard)
    if cfg.mini_batches > 1:  # several updates per batch: freeze pi_theta_old first
        batch.old_logp = old_logprobs(policy, batch, cfg.micro_batch, cfg.chunk_size)
    num_tokens = all_sum(dist, float(batch.num_tokens()))  # Eq. 8's normaliser: all tokens on all ranks
    per = math.ceil(len(batch) / cfg.mini_batches)
    total = torch.zeros((), dtype=torch.float64, device=dist.device)  # read once: no sync per micro-batch
    for m in range(0, len(batch), per):
        mini = batch.slice(m, m + per)
        mini_tokens = all_sum(dist, float(mini.num_tokens())) if cfg.mini_batches > 1 else num_tokens
        opt.zero_grad(set_to_none=True)
        total.zero_()
        for i in range(0, len(mini), cfg.micro_batch):
            micro = mini.slice(i, i + cfg.micro_batch)
            with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                loss = policy(batch_loss, micro, cfg.method, mini_tokens, cfg.clip_eps, cfg.shaping_gamma,
                              cfg.chunk_size)
            (loss * dist.world).backward()
            total += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already reduced over ranks
            grad_norm = grad_norm.full_tensor()
        opt.step()
    return all_sum(dist, total.item()), float(grad_norm)
