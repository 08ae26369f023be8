"""GPU check: the trainer's bf16 step and the HF rollout engine on a Qwen2.5-0.5B-shaped policy.

    python benchmarks/gpu_check.py [--micro_batch 16] [--json PATH]

Random weights of Qwen2.5-0.5B's shape (no download), so it runs on a machine without the hub.
It times stages 3-7 of a HAPO step (gate, SSI, advantages, loss, AdamW: hapo.py and update.py) on 16 prompts
x 8 rollouts of random tokens, compares the peak memory of chunked log-probs (loss.py) with plain
log_softmax over the 151,936-token vocabulary, and times HFEngine.generate. Needs CUDA.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
import hapo  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402
import update  # noqa: E402
from hapo import Group  # noqa: E402
from loss import sequence_logprobs  # noqa: E402
from rollout import HFEngine  # noqa: E402

EOS = 151643  # Qwen2.5's <|endoftext|>
QWEN05 = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096,
              tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS)


def random_groups(rng, M=16, N=8, prompt_len=128, max_len=384):
    """M groups of N random responses (max_len/2 to max_len tokens), 0/1 rewards at p=0.2."""
    tokens = lambda n: [rng.randrange(1000, 150000) for _ in range(n)]
    return [Group(tokens(prompt_len), [tokens(rng.randrange(max_len // 2, max_len)) + [EOS] for _ in range(N)],
                  [float(rng.random() < 0.2) for _ in range(N)], tokens(max_len) + [EOS], 1.0)
            for _ in range(M)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN05)).float()  # fp32 master weights, as train.py loads them
    res["params"] = P = sum(p.numel() for p in model.parameters())
    cfg = train.Config(micro_batch=args.micro_batch)
    dist = parallel.init()
    policy = parallel.Policy(model.to(dist.device))  # one process: bf16 autocast in update.optimize
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    rng = random.Random(0)
    for it in range(3):  # the first is warm-up
        groups = random_groups(rng)
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        t = time.time()
        opened, _ = hapo.gate_groups(groups, cfg.method, 0.8)
        trained = hapo.inject(groups, opened)
        update.optimize(policy, opt, hapo.pack(trained, hapo.advantages(trained), EOS).to(dist.device), cfg, dist)
        torch.cuda.synchronize()
        dt = time.time() - t
        tokens = sum(len(g.prompt_ids) * len(g.responses) + sum(map(len, g.responses)) for g in groups)
        print(f"update {it}: {dt:.2f} s, {tokens / dt:,.0f} tokens/s, teacher {sum(g.teacher_at is not None for g in trained)}, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    res.update(update_tokens_per_s=tokens / dt, update_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               update_tflops_6PT=6 * P * tokens / dt / 1e12)  # 6 x params x tokens: a floor on the real count

    # one micro-batch of 16 x 512 tokens, forward + backward of the summed log-probs
    ids = torch.randint(1000, 150000, (16, 512), device="cuda")
    mask = torch.ones_like(ids)
    naive = lambda: torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, :-1] \
        .gather(-1, ids[:, 1:, None])[..., 0]
    chunked = lambda: sequence_logprobs(model, ids, mask, cfg.chunk_size)
    for name, fn in [("naive", naive), ("chunked", chunked)] * 2:  # the first round is warm-up
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        base, t = torch.cuda.memory_allocated(), time.time()
        with torch.autocast("cuda", torch.bfloat16):
            fn().sum().backward()
        torch.cuda.synchronize()
        res[f"logprobs_{name}_s"], res[f"logprobs_{name}_peak_gib"] = \
            time.time() - t, (torch.cuda.max_memory_allocated() - base) / 2**30

    class Tok:  # the engine reads only these
        pad_token_id = eos_token_id = EOS
    engine = HFEngine(Qwen2ForCausalLM(Qwen2Config(**QWEN05)).to("cuda", torch.bfloat16), Tok())
    prompts = [[rng.randrange(1000, 150000) for _ in range(128)] for _ in range(16)]
    engine.generate(prompts[:2], 2, 8, 1.0)  # warm-up
    torch.cuda.synchronize()
    t = time.time()
    out = engine.generate(prompts, 8, 256, 1.0)
    torch.cuda.synchronize()
    res["hf_rollout_tokens_per_s"] = sum(map(len, out)) / (time.time() - t)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
