"""GPU check: the trainer's bf16 step on a Qwen2.5-0.5B-shaped policy, with MFU, and the log-prob memory.

    python benchmarks/gpu_check.py [--json PATH]      # needs CUDA; about 3 minutes on one H200

Random weights of Qwen2.5-0.5B's shape (no download), so it runs on a machine without the hub.
1. The update of one step (gate, SSI, advantages, Eq. 8 loss, AdamW: hapo.py and update.py) on 16
   prompts x 8 rollouts of 128 prompt tokens and a long-tailed response length (median 256, up to
   1,024; the teacher rows 2-3x the group's median), under bf16 autocast: with --micro_batch 16
   rows, and with --micro_batch_tokens (sorted rows, each micro-batch padded to its own longest).
   MFU = 6 x parameters x real tokens / time / the card's measured bf16 matmul peak.
2. One micro-batch of 16 x 512 tokens, forward + backward of the log-probs: loss.sequence_logprobs
   (fused, chunked) against a plain log_softmax over the 151,936-token vocabulary, peak memory.
3. The HF engine's rollout speed (bf16), for comparison with vLLM's.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
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
from loss import sequence_logprobs  # noqa: E402
from rollout import HFEngine  # noqa: E402

EOS = 151643  # Qwen2.5's <|endoftext|>
QWEN05 = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096,
              tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS)


def groups(rng, M=16, N=8, prompt_len=128, median=256, longest=1024):
    """M groups of N responses of random tokens, the last of each a teacher row 2-3x the median."""
    tokens = lambda n: [rng.randrange(1000, 150000) for _ in range(n)]
    out = []
    for _ in range(M):
        lengths = [min(longest, max(8, int(rng.lognormvariate(math.log(median), 0.7)))) for _ in range(N - 1)]
        rows = [tokens(k) + [EOS] for k in lengths] + [tokens(int(statistics.median(lengths) * rng.uniform(2, 3)))]
        rewards = [float(rng.random() < 0.2) for _ in lengths] + [1.0]
        out.append(hapo.Group(tokens(prompt_len), rows, rewards, teacher_at=N - 1))
    return out


def matmul_peak():
    """The card's bf16 matmul throughput, TFLOP/s, measured on 8192^3 products."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.time() - t) / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA device")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "bf16_matmul_tflops": matmul_peak()}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN05)).float()  # fp32 master weights, as train.py loads them
    res["params"] = P = sum(p.numel() for p in model.parameters())
    dist = parallel.init()
    policy = parallel.Policy(model.to(dist.device))  # one process: bf16 autocast in update.optimize
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    rng = random.Random(0)
    batches = [groups(rng) for _ in range(4)]
    for name, kw in (("rows16", dict(micro_batch=16)), ("tokens16k", dict(micro_batch_tokens=16384))):
        cfg = dataclasses.replace(train.Config(), **kw)
        for it, g in enumerate(batches):  # the first is warm-up
            batch = hapo.pack(g, hapo.advantages(g), EOS).to(dist.device)
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            t = time.time()
            update.optimize(policy, opt, batch, cfg, dist, lr=1e-6)
            torch.cuda.synchronize()
            dt, tokens = time.time() - t, int(batch.attention_mask.sum())
            print(f"{name} update {it}: {dt:.2f} s, {tokens / dt:,.0f} tokens/s, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        res[name] = {"tokens_per_s": tokens / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "mfu": 6 * P * tokens / dt / 1e12 / res["bf16_matmul_tflops"]}

    ids = torch.randint(1000, 150000, (16, 512), device="cuda")
    mask = torch.ones_like(ids)
    naive = lambda: torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, :-1] \
        .gather(-1, ids[:, 1:, None])[..., 0]
    fused = lambda: sequence_logprobs(model, ids, mask, 1024)
    for name, fn in [("naive", naive), ("fused", fused)] * 2:  # the first round is warm-up
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
