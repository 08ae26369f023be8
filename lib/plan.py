"""Will a run fit? The memory of one run per GPU, per node and on disk, from the model's config.json alone.

    python train.py <the run's flags> --plan 8x80        # 8 GPUs of 80 GiB; 2x8x80: two such nodes

No weights, no data, no GPU: the figures are arithmetic on the config's shapes and the run's flags,
in the terms FSDP2's memory tracker measures them (tests/test_scale.py checks the trainer's part
against the tracker, on the meta device under a fake process group of 8 and 16 ranks). Per GPU:

    trainer   fp32 parameter, gradient and AdamW shards (16 bytes a parameter / ranks), FSDP2's bf16
              all-gathers (the root's embeddings and head for the whole step, a layer and its prefetch),
              activations of one micro-batch, and the larger of two backward peaks: a decoder
              layer's (recomputed with --grad_checkpointing) and the chunked logits' (loss.py)
    vLLM      --vllm_gpu_memory of the card: bf16 weights, its own overhead, and the rest KV cache

Checkpoints are modelled as the sharded design (torch.distributed.checkpoint: every rank writes its
shard of the fp32 parameters and AdamW state, in parallel) plus one save_pretrained export in
--save_dtype (bf16 by default), and the model as built on the meta device on every rank with rank
0 reading the weights and broadcasting them into the shards: host RAM at start holds one fp32 copy.
"""

import json
import math
import re
from dataclasses import dataclass

GiB = 2 ** 30
RANK_HOST_GIB = 8.0  # host RAM of one rank's process running CUDA and vLLM (measured parts: docs/SCALE.md)
CUDA_RUNTIME_GIB = 1.5  # CUDA context, cuBLAS workspaces, NCCL buffers: outside both allocators
FRAGMENTATION = 0.95  # a plan fits when it stays under this share of the card (the allocator rounds)
VLLM_TOKENS, VLLM_SEQS = 16384, 1024  # vLLM's profiling batch: tokens per step, sampler rows (its defaults)


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus: int  # per node
    gib: float  # per GPU

    @property
    def world(self):
        return self.nodes * self.gpus


def parse_hardware(text):
    """`[NODESx]GPUSxGIB` -> Hardware: `8x80` is one node of 8 GPUs of 80 GiB, `2x8x80` two of them."""
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)x(\d+(?:\.\d+)?)", text.strip().lower())
    if not m or int(m[1] or 1) < 1 or int(m[2]) < 1 or float(m[3]) <= 0:
        raise ValueError(f"--plan '{text}' is not [NODESx]GPUSxGIB (e.g. 8x80, 2x8x80, 1x24)")
    return Hardware(int(m[1] or 1), int(m[2]), float(m[3]))


def plan_name(hw):
    """Hardware -> the --plan value that names it: `8x80`, `2x8x80`, `1x79.2`."""
    return (f"{hw.nodes}x" if hw.nodes > 1 else "") + f"{hw.gpus}x{round(hw.gib, 1):g}"


@dataclass(frozen=True)
class Shape:
    """What the memory depends on, from a Qwen2-style config.json."""
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    positions: int
    tied: bool


def shape_of(config):
    """A transformers config (or anything with its attribute names) -> Shape."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shape(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                 config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 head_dim, config.max_position_embeddings, bool(getattr(config, "tie_word_embeddings", False)))


def layer_shapes(s):
    """A decoder layer's parameters: q, k, v (with biases), o, the SwiGLU MLP, two RMSNorms."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [(q, s.hidden), (q,), (kv, s.hidden), (kv,), (kv, s.hidden), (kv,), (s.hidden, q),
            (s.inter, s.hidden), (s.inter, s.hidden), (s.hidden, s.inter), (s.hidden,), (s.hidden,)]


def root_shapes(s):
    """FSDP2's root: the embeddings, the final norm and (untied) the LM head."""
    return [(s.vocab, s.hidden), (s.hidden,)] + ([] if s.tied else [(s.vocab, s.hidden)])


def numel(shape, world=1):
    """Elements of one rank's FSDP2 shard: dim 0 split in ceil(d0 / world) rows (the last rank's padded)."""
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def parameters(s, world=1):
    """Parameters of the model (world=1), or of one rank's shard."""
    return sum(numel(x, world) for x in layer_shapes(s)) * s.layers + sum(numel(x, world) for x in root_shapes(s))


# ----------------------------------------------------------------------------
# the trainer


def micro_batch(cfg, s, world):
    """(tokens, rows, longest row) of the largest micro-batch: the longest row is a prompt and a
    response or teacher solution; --micro_batch_tokens fills its budget (a longer row goes alone),
    --pack makes it one row; otherwise --micro_batch rows, at most one mini-batch of this rank's."""
    longest = cfg.max_prompt_tokens + max(cfg.max_new_tokens, 0 if cfg.method == "grpo" else cfg.max_solution_tokens)
    longest = min(longest, getattr(cfg, "max_positions", 0) or s.positions)  # longer rows are refused at start
    if cfg.micro_batch_tokens and cfg.pack:
        return max(cfg.micro_batch_tokens, longest), 1, max(cfg.micro_batch_tokens, longest)
    if cfg.micro_batch_tokens:
        tokens = max(cfg.micro_batch_tokens, longest)
        return tokens, tokens / longest, longest
    rows = max(1, min(cfg.micro_batch, cfg.batch_prompts * cfg.group_size // (world * cfg.mini_batches)))
    return rows * longest, rows, longest


def activations(s, cfg, tokens, rows, longest):
    """Bytes autograd keeps for the backward (bf16 compute), as FSDP2's tracker counts them:
    (one decoder layer's, those shared by all layers, the final norm's and head's).

    Per token a layer keeps 24 H + 8 I bytes: its two RMSNorms' fp32 inputs and bf16 outputs (16 H),
    q and the key and value repeated to every head (with a mask sdpa has no GQA kernel), the
    attention output (8 H), and the MLP's gate, up, SiLU and product (8 I). sdpa with a padding
    (or packing) mask keeps it as bf16 per layer and as bool once; flash attention keeps no mask and
    k, v unrepeated; eager attention also keeps its [heads, L, L] probabilities in fp32 and bf16."""
    H, I, kv = s.hidden, s.inter, s.kv_heads * s.head_dim
    flash = cfg.attn.startswith("flash")
    per_token = (20 * H + 4 * kv if flash else 24 * H) + 8 * I
    square = rows * longest * longest  # one [L, L] mask per row
    layer = tokens * per_token + (0 if flash else 2 * square) + (6 * s.heads * square if cfg.attn == "eager" else 0)
    shared = 0 if flash else square  # the bool mask every layer reads
    head = tokens * 8 * H  # the final norm (fp32 in, bf16 out) and the hidden states loss.py keeps
    return layer, shared, head


def trainer(s, cfg, world, cuda=True):
    """The trainer's bytes on one GPU at its peak, by part (a dict). The peak is a micro-batch's
    backward with the AdamW state and the earlier micro-batches' gradients already there. cuda=False:
    the same step on a CPU (the rehearsal's and the pre-flight's), which makes one more copy of the head."""
    tokens, rows, longest = micro_batch(cfg, s, world)
    layer, shared, head = activations(s, cfg, tokens, rows, longest)
    V, H, I = s.vocab, s.hidden, s.inter
    shard = parameters(s, world)
    out = {"parameters": 4 * shard, "gradients": 4 * shard, "optimizer": 8 * shard}  # fp32; AdamW: 2 per param
    if cfg.grad_checkpointing:  # each layer's bf16 input, and one layer recomputed at a time
        saved = s.layers * tokens * 2 * H + layer + shared
    else:
        saved = s.layers * layer + shared
    # the last layer's backward: its gradients of the MLP's three [tokens, I] blocks and of the hidden;
    # under FSDP2 also the layer's unsharded bf16 gradient, alive until its reduce-scatter ends
    layer_params = sum(numel(x) for x in layer_shapes(s))
    layer_backward = tokens * (6 * I + 4 * H) + (2 * layer_params if world > 1 else 0)
    # the fused log-probs' backward (loss.py): a [chunk, V] block in fp32 and bf16, the head's
    # gradient per chunk in bf16 and the fp32 sum (on a CPU also an fp32 copy), the hidden states' gradient
    logits = min(cfg.chunk_size, tokens) * V * 6 + V * H * (6 if cuda else 10) + tokens * 2 * H
    before_layers = saved - layer if cfg.grad_checkpointing else saved  # what the logits' backward sees
    out["activations"] = saved
    out["layer backward"] = layer_backward
    out["logits backward"] = head + logits
    if world > 1:  # FSDP2: the root in bf16 for the whole step, a layer and its prefetch, a layer's fp32 gradient
        out["all-gathers"] = 2 * sum(numel(x) for x in root_shapes(s)) + 2 * 2 * layer_params + 4 * layer_params
    elif cuda:  # autocast keeps a bf16 copy of every weight it casts, and loss.py casts the head once more
        out["all-gathers"] = 2 * parameters(s) + 2 * V * H
    else:  # one CPU process trains in fp32: nothing is cast
        out["all-gathers"] = 0
    out["weight sync"] = 4 * V * H  # one full tensor at a time, the largest the embeddings: after the step
    step = sum(out[k] for k in ("parameters", "gradients", "optimizer", "all-gathers"))
    backward = max(saved + layer_backward, before_layers + head + logits)  # the larger of the two backward peaks
    out["peak"] = max(step + backward, step - out["all-gathers"] + out["weight sync"])
    out["tokens"], out["chunk"], out["checkpointed"] = tokens, min(cfg.chunk_size, tokens), cfg.grad_checkpointing
    return out


# ----------------------------------------------------------------------------
# vLLM, host RAM, disk


def kv_bytes_per_token(s, tp=1, dtype_bytes=2):
    """A KV cache's bytes per token: a key and a value per layer and KV head, split over tensor-parallel ranks."""
    return 2 * s.layers * max(1, s.kv_heads // tp) * s.head_dim * dtype_bytes


def vllm(s, cfg, gib, tp):
    """vLLM's share of one GPU (bytes, by part): --vllm_gpu_memory of the card, of which bf16
    weights, its profiling peak (a batch of VLLM_TOKENS through a layer's MLP, VLLM_SEQS rows of
    fp32 logits) with CUDA graphs (~1 GiB), and the rest KV cache. An estimate to check on the
    first GPU run against vLLM's own "Available KV cache memory" line."""
    total = cfg.vllm_gpu_memory * gib * GiB
    weights = 2 * parameters(s) / tp
    overhead = VLLM_TOKENS * (6 * s.inter + 8 * s.hidden) / tp + VLLM_SEQS * s.vocab * 8 + GiB
    kv = max(0.0, total - weights - overhead)
    return {"total": total, "weights": weights, "overhead": overhead, "kv cache": kv,
            "kv tokens": int(kv // kv_bytes_per_token(s, tp))}


def hf_engine(s, world, rollouts, seq):
    """The HF engine (--rollout hf): under torchrun a full fp32 copy of the model samples, and
    generate() holds the fp32 KV cache of all this rank's rollouts at once."""
    kv = rollouts * seq * kv_bytes_per_token(s, dtype_bytes=4)
    weights = 4 * parameters(s) if world > 1 else 0
    return {"total": weights + kv, "weights": weights, "overhead": 0, "kv cache": kv, "kv tokens": rollouts * seq}


def host_and_disk(s, cfg, hw):
    """Host RAM of the busiest node (node 0) at start and at a save, and the checkpoint on disk.
    torch.distributed.checkpoint streams each rank's shard to its files a few tensors at a time,
    so a save holds in host RAM only the export, gathered on rank 0 in --save_dtype."""
    P = parameters(s)
    save_bytes = 4 if getattr(cfg, "save_dtype", "bf16") in ("fp32", "float32") else 2
    base = hw.gpus * RANK_HOST_GIB * GiB  # --vllm_sleep is level 2: no host copy of vLLM's weights
    state = 12 * P  # fp32 parameters and AdamW's two moments, as torch.distributed.checkpoint shards
    return {"host start": base + 4 * P,  # rank 0 reads the fp32 weights once and broadcasts them
            "host save": base + save_bytes * P,
            "checkpoint": state + save_bytes * P, "per rank write": state / hw.world, "export": save_bytes * P,
            "disk": 3 * (state + save_bytes * P)}  # two kept, and the one being written before the oldest goes


# ----------------------------------------------------------------------------
# the plan


def plan(config, cfg, hw, cuda=True):
    """Everything the table prints, in bytes, with `fits` and the warnings (a dict). --rollout auto
    is taken for vLLM (what it picks on GPUs); --vllm_sleep frees vLLM's KV cache and weights
    during the training step (level 2), so the trainer's peak meets vLLM's overhead only."""
    s = shape_of(config)
    positions = getattr(cfg, "max_positions", 0) or s.positions
    tp = cfg.tensor_parallel if hw.world > 1 and cfg.rollout != "hf" else 1
    n = cfg.group_size - 1 if cfg.method in ("luffy", "srft") else cfg.group_size
    rollouts = cfg.batch_prompts // (hw.world // tp) * n  # what one engine samples per step
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    t, d = trainer(s, cfg, hw.world, cuda), host_and_disk(s, cfg, hw)
    v = hf_engine(s, hw.world, rollouts, seq) if cfg.rollout == "hf" else vllm(s, cfg, hw.gib, tp)
    runtime, card = CUDA_RUNTIME_GIB * GiB, hw.gib * GiB
    resting = t["parameters"] + t["gradients"] + t["optimizer"]  # the trainer while the engine samples
    if cfg.vllm_sleep and cfg.rollout != "hf":
        per_gpu = max(t["peak"] + v["overhead"], resting + v["total"]) + runtime
    else:
        per_gpu = t["peak"] + v["total"] + runtime
    warnings = []
    short = [f"{what} = {need:,}" for what, need in (("--max_new_tokens", seq), ("--max_solution_tokens",
             cfg.max_prompt_tokens + cfg.max_solution_tokens)) if need > positions]
    if short:
        warnings.append(f"positions too short: --max_prompt_tokens + {' and + '.join(short)}, over the model's "
                        f"{positions:,} positions (use a copy with more, e.g. LUFFY's 16k, or "
                        "--rope_theta/--max_positions)")
    if v["kv tokens"] < seq:
        warnings.append(f"the KV cache ({v['kv tokens']:,} tokens) holds no full-length sequence of {seq:,}: "
                        "raise --vllm_gpu_memory")
    elif v["kv tokens"] // seq < rollouts:
        warnings.append(f"vLLM's KV cache holds {v['kv tokens'] // seq} full-length sequences at once, this rank "
                        f"samples {rollouts}: the rest wait their turn (more --vllm_gpu_memory samples faster)")
    room = FRAGMENTATION * card - per_gpu + t["peak"]
    if t["peak"] > room:
        left = f"{room / GiB:.1f} GiB are left" if room > 0 else "nothing is left"
        warnings.append(f"the trainer needs {t['peak'] / GiB:.1f} GiB (a {t['tokens']:,}-token micro-batch) and {left} "
                        "beside the rollout engine (lower --micro_batch_tokens or --vllm_gpu_memory; "
                        "--grad_checkpointing; more GPUs)")
    fits = per_gpu <= FRAGMENTATION * card and v["kv tokens"] >= seq
    if per_gpu > card:
        warnings.append(f"the total per GPU, {per_gpu / GiB:.1f} GiB, is over the card's {hw.gib:g} GiB")
    return {"hardware": hw, "shape": s, "trainer": t, "vllm": v, "disk": d, "per_gpu": per_gpu, "fits": fits,
            "rollouts": rollouts, "seq": seq, "warnings": warnings, "hf": cfg.rollout == "hf",
            "vllm_gpu_memory": cfg.vllm_gpu_memory}


def headroom(config, cfg, hw, cuda=True):
    """(the largest --vllm_gpu_memory, in steps of 0.05, and the largest --micro_batch_tokens, in
    steps of 1,024, that fit with the other flags as given; None where none does)."""
    import dataclasses
    fit = lambda **kw: plan(config, dataclasses.replace(cfg, **kw), hw, cuda)["fits"]
    memory = next((f / 20 for f in range(19, 0, -1) if fit(vllm_gpu_memory=f / 20)), None)
    tokens = next((k * 1024 for k in range(256, 0, -1) if fit(micro_batch_tokens=k * 1024)), None)
    return memory, tokens


def summary(p):
    """The plan's one JSON line (GiB, GB for the disk)."""
    return {"per_gpu_gib": round(p["per_gpu"] / GiB, 2), "trainer_gib": round(p["trainer"]["peak"] / GiB, 2),
            "vllm_gib": round(p["vllm"]["total"] / GiB, 2), "kv_cache_tokens": p["vllm"]["kv tokens"],
            "kv_cache_sequences": p["vllm"]["kv tokens"] // p["seq"], "micro_batch_tokens": p["trainer"]["tokens"],
            "checkpoint_gb": round(p["disk"]["checkpoint"] / 1e9, 1), "disk_gb": round(p["disk"]["disk"] / 1e9, 1),
            "host_ram_gib": round(max(p["disk"]["host start"], p["disk"]["host save"]) / GiB, 1),
            "world": p["hardware"].world, "fits": p["fits"], "warnings": p["warnings"]}


def table(p, room=None):
    """The plan as a person reads it: one line a part, GiB per GPU unless said; `room` is headroom()'s."""
    t, v, d, hw, s = p["trainer"], p["vllm"], p["disk"], p["hardware"], p["shape"]
    line = lambda group, what, x, note="": f"  {group:<10}{what:<24}{x / GiB:7.2f}   {note}".rstrip()
    engine = "HF engine" if p["hf"] else "vLLM"
    rows = [f"plan: {parameters(s) / 1e9:.2f}B parameters, {s.layers} layers; {hw.nodes} node(s) x {hw.gpus} GPU(s) "
            f"x {hw.gib:g} GiB = {hw.world} rank(s)",
            f"per GPU{'':<33}GiB",
            line("trainer", "parameters (fp32)", t["parameters"], f"1/{hw.world} of each" if hw.world > 1 else ""),
            line("", "gradients (fp32)", t["gradients"]),
            line("", "AdamW (2 x fp32)", t["optimizer"]),
            line("", "all-gathers (bf16)" if hw.world > 1 else "autocast copies (bf16)", t["all-gathers"],
                 "FSDP2: embeddings and head, a layer and the next" if hw.world > 1 else ""),
            line("", "activations", t["activations"], f"a {t['tokens']:,}-token micro-batch"
                 + (", checkpointed" if t.get("checkpointed") else ", not checkpointed")),
            line("", "layer backward", t["layer backward"], "the last layer's gradients"),
            line("", "logits backward", t["logits backward"],
                 f"[{t['chunk']:,} x {s.vocab:,}] chunks, the head's gradient"),
            line("", "weight sync", t["weight sync"], "one full tensor, after the step"),
            line("", "peak", t["peak"], "the above with the larger backward"),
            line(engine, "weights", v["weights"], "bf16" if not p["hf"] else "a full fp32 copy"),
            line("", "overhead", v["overhead"], "profiling peak, CUDA graphs (an estimate)" if not p["hf"] else ""),
            line("", "KV cache", v["kv cache"], f"{v['kv tokens']:,} tokens: {v['kv tokens'] // p['seq']} sequences of "
                 f"{p['seq']:,} at once; this rank samples {p['rollouts']}"),
            line("", "total", v["total"], f"--vllm_gpu_memory {p['vllm_gpu_memory']:g}" if not p["hf"] else ""),
            line("CUDA", "runtime", CUDA_RUNTIME_GIB * GiB, "context, NCCL, cuBLAS"),
            line("total", "per GPU", p["per_gpu"], f"of {hw.gib:g} (fits under {FRAGMENTATION:.0%}: "
                 f"{FRAGMENTATION * hw.gib:.1f})"),
            "host RAM, node 0",
            line("", "at start", d["host start"], "rank 0 reads the fp32 weights once, broadcasts them"),
            line("", "at a save", d["host save"], "the export, gathered on rank 0"),
            "disk",
            f"  {'':<10}{'checkpoint':<24}{d['checkpoint'] / 1e9:7.1f}   GB: sharded fp32 state "
            f"{(d['checkpoint'] - d['export']) / 1e9:.1f} + export {d['export'] / 1e9:.1f}",
            f"  {'':<10}{'during a save':<24}{d['disk'] / 1e9:7.1f}   GB: two kept and the one being written",
            f"  {'':<10}{'one save, per rank':<24}{d['per rank write'] / 1e9:7.1f}   GB, all ranks at once "
            f"(rank 0 also the export)"]
    if room:
        memory, tokens = room
        rows.append("headroom: " + ", ".join([f"--vllm_gpu_memory up to {memory:g}" if memory else
                                              "no --vllm_gpu_memory fits",
                                              f"--micro_batch_tokens up to {tokens:,}" if tokens else
                                              "no --micro_batch_tokens fits"])
                    + " (each with the other flags as given)")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    rows.append(verdict + (f"; {len(p['warnings'])} warning(s):" if p["warnings"] else ""))
    rows += [f"  - {w}" for w in p["warnings"]]
    return "\n".join(rows)


def main(cfg, model_path):
    """Print the table and, last, its JSON line, for train.py's --plan; returns the summary."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    hw = parse_hardware(cfg.plan)
    p = plan(config, cfg, hw)
    room = headroom(config, cfg, hw) if cfg.rollout != "hf" else None
    print(table(p, room))
    out = summary(p)
    if room:
        out["max_vllm_gpu_memory"], out["max_micro_batch_tokens"] = room
    print(json.dumps(out))
    return out
