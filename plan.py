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
RANK_HOST_GIB = 4.0  # host RAM of one rank's process (torch, CUDA, vLLM): an estimate
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


def trainer(s, cfg, world):
    """The trainer's bytes on one GPU at its peak, by part (a dict). The peak is a micro-batch's
    backward with the AdamW state and the earlier micro-batches' gradients already there."""
    tokens, rows, longest = micro_batch(cfg, s, world)
    layer, shared, head = activations(s, cfg, tokens, rows, longest)
    V, H, I = s.vocab, s.hidden, s.inter
    shard = parameters(s, world)
    out = {"parameters": 4 * shard, "gradients": 4 * shard, "optimizer": 8 * shard}  # fp32; AdamW: 2 per param
    if cfg.grad_checkpointing:  # each layer's bf16 input, and one layer recomputed at a time
        saved = s.layers * tokens * 2 * H + layer + shared
    else:
        saved = s.layers * layer + shared
    # the last layer's backward: its gradients of the MLP's three [tokens, I] blocks and of the hidden
    layer_backward = tokens * (6 * I + 4 * H)
    # the fused log-probs' backward (loss.py): a [chunk, V] block in fp32 and bf16, the head's
    # gradient per chunk in bf16, its fp32 copy and the fp32 sum, and the hidden states' gradient
    logits = min(cfg.chunk_size, tokens) * V * 6 + V * H * 10 + tokens * 2 * H
    before_layers = saved - layer if cfg.grad_checkpointing else saved  # what the logits' backward sees
    out["activations"] = saved
    out["layer backward"] = layer_backward
    out["logits backward"] = head + logits
    layer_params = sum(numel(x) for x in layer_shapes(s))
    if world > 1:  # FSDP2: the root gathered in bf16 for the whole step, a layer and its prefetch, a layer's fp32 gradient
        out["all-gathers"] = 2 * sum(numel(x) for x in root_shapes(s)) + 2 * 2 * layer_params + 4 * layer_params
    else:  # autocast keeps a bf16 copy of every weight it casts, and loss.py casts the head once more
        out["all-gathers"] = 2 * parameters(s) + 2 * V * H
    out["weight sync"] = 4 * V * H  # one full tensor at a time, the largest the embeddings: after the step
    step = sum(out[k] for k in ("parameters", "gradients", "optimizer", "all-gathers"))
    backward = max(saved + layer_backward, before_layers + head + logits)  # the larger of the two backward peaks
    out["peak"] = max(step + backward, step - out["all-gathers"] + out["weight sync"])
    out["tokens"] = tokens
    return out


# ----------------------------------------------------------------------------
# vLLM, host RAM, disk


def kv_bytes_per_token(s, tp=1):
    """vLLM's bf16 KV cache: a key and a value per layer and KV head, split over tensor-parallel ranks."""
    return 2 * s.layers * max(1, s.kv_heads // tp) * s.head_dim * 2


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


def host_and_disk(s, cfg, hw):
    """Host RAM of the busiest node (node 0) at start and at a save, and the checkpoint on disk."""
    P, W = parameters(s), hw.world
    save_bytes = 4 if getattr(cfg, "save_dtype", "bf16") in ("fp32", "float32") else 2
    base = hw.gpus * RANK_HOST_GIB * GiB + (hw.gpus * 2 * P / cfg.tensor_parallel if cfg.vllm_sleep else 0)
    state = 12 * P  # fp32 parameters and AdamW's two moments, as torch.distributed.checkpoint shards
    return {"host start": base + 4 * P,  # rank 0 reads the fp32 weights once and broadcasts them
            "host save": base + hw.gpus * state / W + save_bytes * P,  # each rank's shard, and the export
            "checkpoint": state + save_bytes * P, "per rank write": state / W, "export": save_bytes * P}


# ----------------------------------------------------------------------------
# the plan


def plan(config, cfg, hw):
    """Everything the table prints, in bytes, with `fits` and the warnings (a dict)."""
    s = shape_of(config)
    positions = getattr(cfg, "max_positions", 0) or s.positions
    tp = cfg.tensor_parallel if hw.world > 1 else 1
    t, v, d = trainer(s, cfg, hw.world), vllm(s, cfg, hw.gib, tp), host_and_disk(s, cfg, hw)
    n = cfg.group_size - 1 if cfg.method in ("luffy", "srft") else cfg.group_size
    rollouts = cfg.batch_prompts // (hw.world // tp) * n  # what one engine samples per step
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    per_gpu = t["peak"] + v["total"] + CUDA_RUNTIME_GIB * GiB
    card = hw.gib * GiB
    warnings = []
    for what, need in (("--max_new_tokens", seq), ("--max_solution_tokens", cfg.max_prompt_tokens + cfg.max_solution_tokens)):
        if need > positions:
            warnings.append(f"positions too short: --max_prompt_tokens + {what} = {need:,} > the model's {positions:,} "
                            "positions (a 16k copy, or --rope_theta/--max_positions)")
    if v["kv tokens"] < seq:
        warnings.append(f"vLLM's KV cache ({v['kv tokens']:,} tokens) holds no full-length sequence of {seq:,}: "
                        "raise --vllm_gpu_memory")
    elif v["kv tokens"] // seq < rollouts:
        warnings.append(f"vLLM's KV cache holds {v['kv tokens'] // seq} full-length sequences at once, this rank's "
                        f"rollouts are {rollouts}: longer ones wait (raise --vllm_gpu_memory)")
    room = FRAGMENTATION * card - v["total"] - CUDA_RUNTIME_GIB * GiB
    if t["peak"] > room:
        warnings.append(f"the trainer needs {t['peak'] / GiB:.1f} GiB (a {t['tokens']:,}-token micro-batch) beside vLLM's "
                        f"{v['total'] / GiB:.1f}: {room / GiB:.1f} GiB are left (lower --micro_batch_tokens or "
                        "--vllm_gpu_memory, --grad_checkpointing, more GPUs)")
    fits = per_gpu <= FRAGMENTATION * card and v["kv tokens"] >= seq
    if per_gpu > card:
        warnings.append(f"the total per GPU, {per_gpu / GiB:.1f} GiB, is over the card's {hw.gib:g} GiB")
    return {"hardware": hw, "shape": s, "trainer": t, "vllm": v, "disk": d, "per_gpu": per_gpu, "fits": fits,
            "rollouts": rollouts, "seq": seq, "warnings": warnings}


def summary(p):
    """The plan's one JSON line (GiB, GB for the disk)."""
    return {"per_gpu_gib": round(p["per_gpu"] / GiB, 2), "trainer_gib": round(p["trainer"]["peak"] / GiB, 2),
            "vllm_gib": round(p["vllm"]["total"] / GiB, 2), "kv_cache_tokens": p["vllm"]["kv tokens"],
            "kv_cache_sequences": p["vllm"]["kv tokens"] // p["seq"], "micro_batch_tokens": p["trainer"]["tokens"],
            "checkpoint_gb": round(p["disk"]["checkpoint"] / 1e9, 1),
            "host_ram_gib": round(max(p["disk"]["host start"], p["disk"]["host save"]) / GiB, 1),
            "world": p["hardware"].world, "fits": p["fits"], "warnings": p["warnings"]}


def table(p):
    """The plan as a person reads it: one line a part, GiB per GPU unless said."""
    t, v, d, hw = p["trainer"], p["vllm"], p["disk"], p["hardware"]
    g = lambda x: f"{x / GiB:8.2f} GiB"
    rows = [f"plan: {hw.nodes} node(s) x {hw.gpus} GPU(s) x {hw.gib:g} GiB, {p['shape'].layers} layers, "
            f"{parameters(p['shape']) / 1e9:.2f}B parameters",
            "per GPU",
            *(f"  trainer {k:<20}{g(t[k])}" for k in ("parameters", "gradients", "optimizer", "all-gathers",
                                                       "activations", "layer backward", "logits backward",
                                                       "weight sync")),
            f"  trainer peak{'':<16}{g(t['peak'])}   (one {t['tokens']:,}-token micro-batch)",
            f"  vLLM weights{'':<16}{g(v['weights'])}",
            f"  vLLM overhead{'':<15}{g(v['overhead'])}",
            f"  vLLM KV cache{'':<15}{g(v['kv cache'])}   {v['kv tokens']:,} tokens = {v['kv tokens'] // p['seq']} "
            f"sequences of {p['seq']:,} (this rank samples {p['rollouts']})",
            f"  vLLM total{'':<18}{g(v['total'])}",
            f"  CUDA runtime{'':<16}{g(CUDA_RUNTIME_GIB * GiB)}",
            f"  peak{'':<24}{g(p['per_gpu'])}   of {hw.gib:g} GiB",
            "host RAM, node 0",
            f"  at start{'':<20}{g(d['host start'])}",
            f"  at a save{'':<19}{g(d['host save'])}",
            "disk",
            f"  checkpoint{'':<18}{d['checkpoint'] / 1e9:8.1f} GB    (sharded state and the export; 2 are kept)",
            f"  one save per rank{'':<11}{d['per rank write'] / 1e9:8.1f} GB    (rank 0 also {d['export'] / 1e9:.1f} GB)",
            f"{'FITS' if p['fits'] else 'DOES NOT FIT'}" + (f"; {len(p['warnings'])} warning(s):" if p["warnings"] else ""),
            *(f"  - {w}" for w in p["warnings"])]
    return "\n".join(rows)


def main(cfg, model_path):
    """Print the table and its JSON line for train.py's --plan; returns the summary."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    p = plan(config, cfg, parse_hardware(cfg.plan))
    print(table(p))
    out = summary(p)
    print(json.dumps(out))
    return out
