"""GPU check: the trainer's bf16 step on a Qwen2.5-0.5B-shaped policy, with MFU, and the log-prob memory;
and the checks the first GPU run of the 7B recipe must make (docs/SCALE.md).

    python benchmarks/gpu_check.py [--json PATH]      # needs CUDA; about 3 minutes on one H200
    python benchmarks/gpu_check.py --checks scale     # only 4-7, the first GPU run's checks (~2 minutes)

Without CUDA it says so and exits 0: there is nothing to measure.

Random weights of Qwen2.5-0.5B's shape (no download), so it runs on a machine without the hub.
1. The update of one step (gate, SSI, advantages, Eq. 8 loss, AdamW: hapo.py and update.py) on 16
   prompts x 8 rollouts of 128 prompt tokens and a long-tailed response length (median 256, up to
   1,024; the teacher rows 2-3x the group's median), under bf16 autocast: with --micro_batch 16
   rows, and with --micro_batch_tokens (sorted rows, each micro-batch padded to its own longest).
   MFU = 6 x parameters x real tokens / time / the card's measured bf16 matmul peak.
2. One micro-batch of 16 x 512 tokens, forward + backward of the log-probs: loss.sequence_logprobs
   (fused, chunked) against a plain log_softmax over the 151,936-token vocabulary, peak memory.
3. The HF engine's rollout speed (bf16), for comparison with vLLM's.
4. --grad_checkpointing through parallel.wrap: the same update with and without it (loss and
   gradient norm agree, the peak is lower).
5. A checkpoint saved and resumed under NCCL with one rank, the policy FSDP2-sharded: checkpoint.save
   and checkpoint.find_resumable/load_state as train.py calls them; weights and AdamW state come back.
6. plan.py against torch.cuda.max_memory_allocated for a Qwen2.5-Math-1.5B-shaped step on one GPU
   (grad checkpointing, two micro-batches of 16,384 tokens): within 15%, as the CPU rehearsal holds it.
7. The pre-flight against the real card: its memory as CUDA reports it, the 7B recipe's verdict on this
   one GPU (it does not fit, and the line names torchrun with 8 ranks), and this process's peak host RAM
   after checks 4-6 (plan.RANK_HOST_GIB's CUDA part; vLLM is not on the GPU machine).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules
import hapo  # noqa: E402
from lib import parallel  # noqa: E402
import train  # noqa: E402
import update  # noqa: E402
from loss import sequence_logprobs  # noqa: E402
from rollout import HFEngine  # noqa: E402

EOS = 151643  # Qwen2.5's <|endoftext|>
QWEN05 = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096,
              tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS)


def groups(rng, M=16, N=8, prompt_len=128, median=256, longest=1024, vocab=150000, eos=EOS):
    """M groups of N responses of random tokens, the last of each a teacher row 2-3x the median."""
    tokens = lambda n: [rng.randrange(min(1000, vocab // 2), min(150000, vocab)) for _ in range(n)]
    out = []
    for _ in range(M):
        lengths = [min(longest, max(8, int(rng.lognormvariate(math.log(median), 0.7)))) for _ in range(N - 1)]
        rows = [tokens(k) + [eos] for k in lengths] + [tokens(int(statistics.median(lengths) * rng.uniform(2, 3)))]
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
    p.add_argument("--checks", default="all", choices=("all", "speed", "scale"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here; nothing to check (run it where a GPU is lent)")
        return
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    if args.checks in ("all", "speed"):
        speed(res)
    if args.checks in ("all", "scale"):
        for name, check in (("grad_checkpointing", check_grad_checkpointing), ("save_resume", check_save_resume),
                            ("plan_vs_cuda", check_plan), ("preflight", check_preflight)):
            res[name] = run_check(name, check, torch.device("cuda"), small_config())
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if any(isinstance(v, dict) and v.get("ok") is False for v in res.values()):
        sys.exit(1)


def speed(res):
    """Checks 1-3: the update's speed and MFU, the log-probs' memory, the HF engine's speed."""
    res["bf16_matmul_tflops"] = matmul_peak()
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


# ----------------------------------------------------------------------------
# checks 4-6: what the first GPU run of the 7B recipe must see (docs/SCALE.md)


def run_check(name, check, device, config):
    """One check's result dict, with ok False and the error's line when it raises."""
    t = time.time()
    try:
        out = check(device, config)
    except Exception as e:  # a check that breaks is a finding, reported with the others
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    out["seconds"] = round(time.time() - t, 1)
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out


def small_config(**over):
    """Qwen2.5-0.5B's shape cut to 4 layers: the checks of mechanics need no depth (the CPU test
    makes it narrower still)."""
    return Qwen2Config(**{**QWEN05, "num_hidden_layers": 4, **over})


def update_once(policy, opt, batch, cfg, dist):
    """update.optimize on one batch, with its peak memory (GiB above what was allocated before)."""
    if dist.device.type == "cuda":
        torch.cuda.synchronize(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if dist.device.type == "cuda" else 0
    out = update.optimize(policy, opt, batch, cfg, dist, lr=1e-6)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dist.device.type == "cuda" else None
    return out, peak


def check_grad_checkpointing(device, config):
    """4. The same update with and without --grad_checkpointing from the same weights."""
    dist = parallel.Dist(0, 1, device)
    cfg = dataclasses.replace(train.Config(), micro_batch_tokens=4096)
    rng = random.Random(0)
    g = groups(rng, M=4, N=4, prompt_len=64, median=128, longest=512, vocab=config.vocab_size, eos=config.eos_token_id)
    batch = hapo.pack(g, hapo.advantages(g), config.eos_token_id).to(device)
    out = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).float()
        policy = parallel.wrap(model, dist, grad_checkpointing=ckpt)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        out[ckpt] = update_once(policy, opt, batch, cfg, dist)
    (plain, p0), (ckpt, p1) = out[False], out[True]
    same = math.isclose(plain["train/loss"], ckpt["train/loss"], rel_tol=1e-3, abs_tol=1e-6) and \
        math.isclose(plain["train/grad_norm"], ckpt["train/grad_norm"], rel_tol=1e-2)
    return {"ok": bool(same and (p0 is None or p1 < p0)), "loss": [plain["train/loss"], ckpt["train/loss"]],
            "grad_norm": [plain["train/grad_norm"], ckpt["train/grad_norm"]], "peak_gib": [p0, p1]}


def check_save_resume(device, config):
    """5. checkpoint.save, then find_resumable and load_state, as train.py calls them, under a process
    group of one rank (NCCL on a GPU, gloo on the CPU): the policy as train.py builds it for one rank,
    and FSDP2-sharded (the sharded state's code path, as every rank runs it under torchrun)."""
    import torch.distributed as tdist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        plain = round_trip(device, config, sharded=False)
        try:
            sharded = round_trip(device, config, sharded=True)
        except Exception as e:
            sharded = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        tdist.destroy_process_group()
    return {**plain, "ok": plain["ok"] and sharded["ok"], "fsdp2": sharded}


def round_trip(device, config, sharded):
    """One optimizer step, a save, a resume: do the weights and AdamW's second moments come back equal?"""
    import tempfile

    from lib import checkpoint
    from lib import tiny
    from lib.models import load_policy
    from transformers import AutoTokenizer
    dist = parallel.Dist(0, 1, device)
    tok = AutoTokenizer.from_pretrained(tiny.SHIPPED)

    def build(model):
        policy = parallel.wrap(model, dist)
        if sharded:
            parallel.shard(policy, dist)
        return policy, torch.optim.AdamW(policy.parameters(), lr=1e-3)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).float()
    policy, opt = build(model)
    g = groups(random.Random(0), M=2, N=2, prompt_len=16, median=32, longest=64, vocab=config.vocab_size,
               eos=config.eos_token_id)
    update.optimize(policy, opt, hapo.pack(g, hapo.advantages(g), config.eos_token_id).to(device), train.Config(),
                    dist, lr=1e-3)
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()
    with tempfile.TemporaryDirectory() as out_dir:
        checkpoint.save(out_dir, 1, model, tok, opt, dist, {"cursor": 0, "config": {}})
        path, model2, _, state = checkpoint.find_resumable(out_dir, lambda p: load_policy(p, dist, True), dist)
        policy2, opt2 = build(model2)  # as train.py resumes: built on meta, filled from the shards
        checkpoint.load_state(path, state, model2, opt2, dist)
    pairs = zip(model.state_dict().values(), model2.state_dict().values())
    same_w = all(torch.equal(full(a), full(b)) for a, b in pairs)
    moments = zip(opt.state.values(), opt2.state.values())
    same_m = len(opt.state) == len(opt2.state) > 0 and all(
        torch.equal(full(a["exp_avg_sq"]), full(b["exp_avg_sq"])) for a, b in moments)
    return {"ok": bool(same_w and same_m), "weights_equal": bool(same_w), "adamw_equal": bool(same_m)}


def check_plan(device, _config=None):
    """6. plan.trainer's peak against the allocator's for a Qwen2.5-Math-1.5B-shaped step on one GPU."""
    from lib import plan
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "tests", "data", "qwen2.5-math-1.5b"))
    cfg = dataclasses.replace(train.Config(), max_prompt_tokens=512, max_new_tokens=3584, max_solution_tokens=3584,
                              micro_batch_tokens=16384, grad_checkpointing=True)
    dist = parallel.Dist(0, 1, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).float()  # fp32 master weights, as train.py loads them
    policy = parallel.wrap(model, dist, grad_checkpointing=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    L, rows = cfg.max_prompt_tokens + cfg.max_new_tokens, 2 * cfg.micro_batch_tokens // 4096  # two micro-batches
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(1000, 150000) for _ in range(n)]
    g = [hapo.Group(tokens(cfg.max_prompt_tokens), [tokens(cfg.max_new_tokens) for _ in range(rows // 2)],
                    [1.0, 0.0] * (rows // 4)) for _ in range(2)]
    batch = hapo.pack(g, hapo.advantages(g), EOS).to(device)
    assert batch.input_ids.shape == (rows, L)
    update_once(policy, opt, batch, cfg, dist)  # AdamW's state exists from here on, as in a run
    _, peak = update_once(policy, opt, batch, cfg, dist)
    planned = plan.trainer(plan.shape_of(config), cfg, 1)["peak"] / 2**30
    allocated = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"ok": allocated is None or abs(allocated - planned) <= 0.15 * planned, "plan_gib": round(planned, 2),
            "max_memory_allocated_gib": allocated, "step_peak_above_base_gib": peak}


def check_preflight(device, _config=None):
    """7. The pre-flight on this card: the 7B recipe on one GPU must not fit, and say torchrun with 8."""
    from lib import preflight
    from lib.models import load_config
    model = os.path.join(ROOT, "tests", "data", "qwen2.5-math-7b")
    cfg, note = train.parse_args(["--model", model, "--rollout", "vllm"], parallel.Dist(0, 1, device))
    hw = preflight.hardware(1, cuda=device.type == "cuda")
    line = preflight.check(load_config(model, cfg.rope_theta, cfg.max_positions), cfg, hw, device.type == "cuda",
                           torch.cuda.device_count(), f"train.py --model {model}")
    host = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**20  # kB -> GiB
    return {"ok": bool(line) and "torchrun --nproc_per_node 8" in line, "card_gib": round(hw.gib, 2), "recipe": note,
            "line": line, "host_peak_gib": round(host, 2)}


if __name__ == "__main__":
    main()
