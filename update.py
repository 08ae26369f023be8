"""The policy update of one step (stages 6-7): mini-batches, micro-batches, one optimizer step each.

Eq. 8 divides the summed token losses by the token count of the whole rollout batch (of the whole
mini-batch, with --mini_batches > 1), on every rank. So each micro-batch's loss uses that global
count, and their gradients add up to exactly the full-batch gradient, however the batch is split
over micro-batches and ranks. That is what lets the split follow the hardware: a fixed number of
trajectories (--micro_batch), or trajectories sorted by length and cut under a token budget
(--micro_batch_tokens), each micro-batch padded only to its own longest row, or packed into one
row with no padding at all (--pack). FSDP2 averages gradients over ranks, so each loss is scaled by
the world size to turn that average back into the sum Eq. 8 asks for.
"""

import math

import torch

from hapo import Batch, batch_loss
from loss import sequence_logprobs
from lib.parallel import all_max, all_max_each, all_sum

# ----------------------------------------------------------------------------
# splitting a batch into micro-batches


def plan(batch, mini_batches, micro_batch, micro_batch_tokens=0, pack=False):
    """Row indices of each micro-batch of each mini-batch: [[rows, ...], ...].

    The batch's groups are split into mini_batches runs of equal count (whole groups: a group's
    advantages belong together). Without a token budget, a mini-batch's micro-batches are consecutive
    runs of micro_batch rows; with one, its rows are sorted by length, longest first, and cut where
    the next row would take the micro-batch over budget: rows x longest row when padded, the sum of
    the rows' lengths when packed. A row longer than the budget gets a micro-batch of its own."""
    lengths = batch.attention_mask.sum(dim=1).tolist()  # [B] real tokens per row
    group = batch.group.tolist() if batch.group is not None else list(range(len(batch)))  # [B]
    n_groups = max(group) + 1
    out = []
    for m in range(mini_batches):
        first, end = m * n_groups // mini_batches, (m + 1) * n_groups // mini_batches
        rows = [r for r in range(len(batch)) if first <= group[r] < end]
        if not micro_batch_tokens:
            out.append([rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)])
            continue
        rows.sort(key=lambda r: -lengths[r])
        micro, cost = [[]], 0
        for r in rows:
            if pack:
                new = cost + lengths[r]
            else:  # padded to the micro-batch's first row, its longest
                new = (len(micro[-1]) + 1) * lengths[micro[-1][0] if micro[-1] else r]
            if micro[-1] and new > micro_batch_tokens:
                micro.append([])
                new = lengths[r]
            micro[-1].append(r)
            cost = new
        out.append(micro)
    return out


def select(batch, rows):
    """The batch's rows `rows`, right-padded only to the longest of them."""
    idx = torch.tensor(rows, device=batch.input_ids.device)
    L = int(batch.attention_mask[idx].sum(dim=1).max())
    pick = lambda x, width: None if x is None else x[idx, :width]
    return Batch(pick(batch.input_ids, L), pick(batch.attention_mask, L), pick(batch.loss_mask, L - 1),
                 batch.advantages[idx], batch.teacher[idx], pick(batch.old_logp, L - 1),
                 pick(batch.sampler_logp, L - 1), group=batch.group[idx] if batch.group is not None else None)


def pack_rows(batch):
    """All rows of a (selected) batch as one row without padding: [1, sum of lengths], position ids
    restarting at 0 for each trajectory, and per-token advantages and teacher flags. Position t
    predicts t+1, so the last token of one trajectory "predicts" the first of the next: loss_mask
    is 0 there, as it is over every prompt."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    keep = batch.attention_mask.bool()  # [b, L]
    # the [b, L-1] per-position tensors: a row's positions 0 .. len-1, where position len-1 predicts
    # nothing of its own (it is followed by the next row); its mask entry is 0
    pad_col = lambda x: torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)  # [b, L]
    flat = lambda x: None if x is None else pad_col(x)[keep][None, :-1]  # [1, S-1]
    per_row = lambda v: torch.repeat_interleave(v, torch.tensor(lengths, device=v.device))[None, :-1]
    position_ids = torch.cat([torch.arange(n, device=keep.device) for n in lengths])[None]  # [1, S]
    return Batch(batch.input_ids[keep][None], None, flat(batch.loss_mask), per_row(batch.advantages),
                 per_row(batch.teacher), flat(batch.old_logp), flat(batch.sampler_logp), position_ids)


def empty_like(batch):
    """A micro-batch with nothing to learn: the batch's first row cut to two tokens, loss mask 0. A
    rank with fewer micro-batches than another runs these, so that FSDP2's collectives, one set per
    forward and backward, pair up across ranks."""
    b = select(batch, [0]) if batch.position_ids is None else batch
    return Batch(b.input_ids[:1, :2], None if b.attention_mask is None else b.attention_mask[:1, :2],
                 torch.zeros_like(b.loss_mask[:1, :1]), b.advantages[:1] * 0, b.teacher[:1],
                 None if b.old_logp is None else b.old_logp[:1, :1], None,
                 None if b.position_ids is None else b.position_ids[:1, :2])


def micro_batches(batch, cfg, dist=None):
    """The Batch of every micro-batch, grouped by mini-batch, as plan() cuts them. Under torchrun
    every rank gets as many micro-batches in each mini-batch as the rank with the most (the others
    are empty_like), since ranks cut their own rows by their own lengths."""
    out = []
    for rows_of in plan(batch, cfg.mini_batches, cfg.micro_batch, cfg.micro_batch_tokens, cfg.pack):
        if not (cfg.pack or cfg.micro_batch_tokens):  # consecutive rows: views, no copies
            out.append([batch.slice(rows[0], rows[-1] + 1) for rows in rows_of])
        elif cfg.pack:
            out.append([pack_rows(select(batch, rows)) for rows in rows_of])
        else:
            out.append([select(batch, rows) for rows in rows_of])
    if dist is not None and dist.world > 1:
        counts = all_max_each(dist, [len(mini) for mini in out])
        out = [mini + [empty_like(mini[0])] * (n - len(mini)) for mini, n in zip(out, counts)]
    return out


# ----------------------------------------------------------------------------
# the update

MAXIMA = {"ratio_max", "is_ratio_max"}  # stats whose micro-batches and ranks combine by max, not sum


def autocast(dist):
    """bf16 autocast on one GPU; FSDP2 casts by itself (parallel.shard) and the CPU runs in fp32.
    pi_old and the loss are computed under the same one, so the first ratio is exactly 1."""
    return torch.autocast("cuda", torch.bfloat16, enabled=dist.device.type == "cuda" and dist.world == 1)


def old_logprobs(policy, micros, cfg, dist):
    """pi_theta_old's per-token log-probs for each micro-batch, frozen before the first of several
    updates: the same micro-batches, precision and temperature as the loss will see."""
    with torch.no_grad(), autocast(dist):
        for mini in micros:
            for mb in mini:
                mb.old_logp = policy(sequence_logprobs, mb.input_ids, mb.attention_mask, cfg.chunk_size,
                                     cfg.temperature, position_ids=mb.position_ids).float()


def lr_at(step, cfg):
    """The learning rate of a step: linear warm-up over cfg.warmup_steps, then constant, linear decay
    or cosine decay to 0 at cfg.max_steps (the paper and LUFFY: constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (1 - t if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * t)))


def optimize(policy, opt, batch, cfg, dist, lr):
    """cfg.mini_batches optimizer steps over the batch at learning rate lr. Returns the step's metrics:
    the last mini-batch's loss (Eq. 8 over its tokens, summed over ranks) and gradient norm before
    clipping, the policy's mean entropy, the clipping statistics (when --mini_batches > 1: with one
    update the ratio is 1), the trainer-sampler log-prob gap (when the engine reported log-probs),
    and how many optimizer steps were skipped because the loss or gradient was not finite.

    Reads cfg.method, .mini_batches, .micro_batch, .micro_batch_tokens, .pack, .clip_eps,
    .shaping_gamma, .chunk_size, .grad_clip, .temperature, .entropy_coef, .clip_on_policy,
    .is_correction, .is_cap, .is_level, .is_mode, .loss_norm, .max_new_tokens.
    """
    policy.train()
    micros = micro_batches(batch, cfg, dist)
    if cfg.mini_batches > 1 and cfg.method != "sft":  # several updates per batch: freeze pi_old (sft: no ratio)
        old_logprobs(policy, micros, cfg, dist)
    for group in opt.param_groups:
        group["lr"] = lr
    totals, skipped = {}, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)  # read once: no sync per micro-batch
    for mini in micros:
        if cfg.loss_norm == "constant":  # LUFFY's loss_remove_token_mean: trajectories x longest response
            norm = all_sum(dist, float(sum(mb.rows() for mb in mini) * cfg.max_new_tokens))
        else:  # Eq. 8: all response tokens of the (mini-)batch, on all ranks
            norm = all_sum(dist, float(sum(int(mb.loss_mask.sum()) for mb in mini)))
        opt.zero_grad(set_to_none=True)
        loss_sum.zero_()
        for mb in mini:
            with autocast(dist):
                loss, stats = policy(batch_loss, mb, cfg.method, norm, cfg.clip_eps, cfg.shaping_gamma,
                                     cfg.chunk_size, cfg.temperature, cfg.entropy_coef, cfg.clip_on_policy,
                                     cfg.is_cap if cfg.is_correction else None, cfg.is_level, cfg.is_mode)
            (loss * dist.world).backward()
            loss_sum += loss.detach().double()
            for k, v in stats.items():  # sums, but the ratios' max
                if k in MAXIMA:
                    totals[k] = torch.maximum(totals[k], v) if k in totals else v
                else:
                    totals[k] = totals.get(k, 0) + v.double()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, already reduced over ranks
            grad_norm = grad_norm.full_tensor()
        loss_total = all_sum(dist, loss_sum.item())
        if math.isfinite(loss_total) and bool(torch.isfinite(grad_norm)):
            opt.step()
        else:  # a non-finite loss or gradient would turn every weight into NaN: skip this update
            skipped += 1
        opt.zero_grad(set_to_none=True)  # now, not at the next step: no gradients held through the rollout
    return _metrics(dist, loss_total, float(grad_norm), totals, skipped)


def _metrics(dist, loss, grad_norm, totals, skipped):
    """The step's metrics from the stats summed over micro-batches, reduced over ranks."""
    out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/skipped_updates": skipped}
    sums = {k: all_sum(dist, float(v)) for k, v in totals.items() if k not in MAXIMA}
    out["train/entropy"] = sums["entropy"] / max(sums["tokens"], 1.0)
    if "on_tokens" in sums:
        on = max(sums["on_tokens"], 1.0)
        out.update({"train/clip_frac": sums["clipped"] / on, "train/ratio_mean": sums["ratio_sum"] / on,
                    "train/ratio_max": all_max(dist, float(totals["ratio_max"]))})
    if "gap_sum" in sums:  # the sampler's log-probs came back: how far they are from the trainer's
        on = max(sums["gap_tokens"], 1.0)
        out.update({"train/logprob_gap": sums["gap_sum"] / on, "train/kl_k3": sums["kl_k3"] / on,
                    "train/log_ppl_diff": sums["log_ppl_diff"] / max(sums["trajectories"], 1.0),
                    "train/is_ratio_max": all_max(dist, float(totals["is_ratio_max"]))})
    if "is_changed" in sums:
        out["train/is_corrected_frac"] = sums["is_changed"] / max(sums["gap_tokens"], 1.0)
    return out
