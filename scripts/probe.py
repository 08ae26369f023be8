"""Where does the teacher's signal go? HAPO steps on the built-in task, with held-out teacher log-likelihood.

    python scripts/probe.py                         # full HAPO loss, 100 steps
    python scripts/probe.py --variant teacher_only  # the same steps with the on-policy advantages zeroed
    python scripts/probe.py --temperature 0.7       # rollouts at another temperature
    python scripts/probe.py --group_size 16         # another N

Each step is train.py's (rollout, reward, gate + SSI, advantages, Eq. 8 loss, AdamW) on the tiny
base model, without checkpoints or evaluation by sampling. Every --every steps it prints the summed
log-likelihood of the teacher solutions of 40 held-out problems: it rises when the policy is
learning what the teacher shows, whatever the reward says yet. `teacher_only` keeps the batch, the
normaliser and the teacher's advantage but sets the failures' advantages to 0: the gap between the
two runs is what the on-policy term does to the teacher's signal.
"""

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
from lib import data  # noqa: E402
import hapo  # noqa: E402
from lib import task  # noqa: E402
from loss import sequence_logprobs  # noqa: E402
from lib.models import load_model, resolve_model  # noqa: E402
from reward import reward  # noqa: E402
from rollout import HFEngine  # noqa: E402


def teacher_loglik(model, rows, pad_id):
    """Summed log p(solution | prompt) under `model`, averaged over rows of (prompt ids, solution ids)."""
    groups = [hapo.Group(p, [s], [1.0]) for p, s in rows]
    batch = hapo.pack(groups, torch.zeros(len(rows), 1), pad_id)  # loss_mask: the solution tokens
    with torch.no_grad():
        logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask)  # [B, L-1]
    return ((logp * batch.loss_mask).sum() / len(rows)).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["full", "teacher_only"], default="full")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, tok = load_model(resolve_model("tiny"), dtype=torch.float32)
    train, _ = data.load_problems(task.BUILTIN, "train")
    held, _ = data.load_problems(task.BUILTIN, "eval")
    rows = [(e.prompt_ids, e.solution_ids) for e in data.encode(tok, train, None, None)[0]]
    held_rows = [(e.prompt_ids, e.solution_ids) for e in data.encode(tok, held[:40], None, None)[0]]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    engine = HFEngine(model, tok)
    print(f"step    0 | teacher log-lik {teacher_loglik(model, held_rows, tok.pad_token_id):8.3f}", flush=True)
    for step in range(1, args.steps + 1):
        idx = [rng.randrange(len(rows)) for _ in range(16)]
        N = args.group_size
        outs = engine.generate([rows[i][0] for i in idx], N, 64, args.temperature)
        texts = tok.batch_decode(outs, skip_special_tokens=True)
        groups = [hapo.Group(rows[i][0], outs[N * g:N * g + N],
                             [reward(t, train[i].answer) for t in texts[N * g:N * g + N]], rows[i][1], 1.0)
                  for g, i in enumerate(idx)]
        mean_reward = sum(map(sum, (g.rewards for g in groups))) / (N * len(groups))
        opened, _ = hapo.gate_groups(groups, "hapo", 0.8)
        trained = hapo.inject(groups, opened)
        batch = hapo.pack(trained, hapo.advantages(trained), tok.pad_token_id)
        if args.variant == "teacher_only":
            batch.advantages = torch.where(batch.teacher, batch.advantages, 0.0)  # [B]
        model.train()
        loss, _ = hapo.batch_loss(model, batch, "hapo", float(batch.num_tokens()))
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0:
            print(f"step {step:4d} | teacher log-lik {teacher_loglik(model, held_rows, tok.pad_token_id):8.3f} | "
                  f"reward {mean_reward:.3f} | grad norm {grad_norm:.3f}", flush=True)


if __name__ == "__main__":
    main()
