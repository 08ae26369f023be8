"""Distributed state, passed as a value: one process, or several under torchrun with FSDP2.

    dist = parallel.init()          # in main(), once; nothing here runs at import
    parallel.all_sum(dist, x)       # a float or tensor summed over ranks (identity in one process)

Nothing changes when not under torchrun: rank 0 of a world of 1, on cuda:0 or the CPU.
"""

import copy
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:  # rank 0 logs, writes files and prints
        return self.rank == 0


def from_env() -> Dist:
    """Rank, world size and device as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK), without
    starting anything: what argument checks need before the process group exists."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    return Dist(rank, world, torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"))


def ranks_to_start(nproc: int) -> int:
    """How many ranks train.py starts itself: none under torchrun (it started this process), else --nproc,
    where 0 means one per visible GPU (and one process on a CPU)."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return 0
    return nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 1)


def spawn(n: int, script: str, argv: list) -> int:
    """`torchrun --standalone --nproc_per_node n script argv`, through the same elastic launcher in this
    process: the same environment for every rank (RANK, LOCAL_RANK, OMP_NUM_THREADS, ...). Returns the
    exit code of the first rank that failed (its own one-line error is already printed), else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(n), script])
    args.training_script_args = list(argv)  # not parsed by torchrun's parser, which would take --nproc as its own
    try:
        run(args)
    except ChildFailedError as e:
        return next((f.exitcode for _, f in sorted(e.failures.items()) if f.exitcode), 1)
    return 0


def configure_allocator() -> None:
    """Before CUDA starts in this process: the caching allocator's expandable segments, unless the
    user configured the allocator (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF). A segment then
    grows in place instead of a new one being reserved beside the cached free blocks: less
    fragmentation where the margin is thin (7B). vLLM 0.32 turns them off around its own pool in
    sleep mode, and refuses them only with a KV connector, which hapo does not use."""
    if not os.environ.get("PYTORCH_CUDA_ALLOC_CONF") and not os.environ.get("PYTORCH_ALLOC_CONF"):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def init(timeout_min: float = 60) -> Dist:
    """from_env(), and the process group when there are several ranks (NCCL on GPUs, gloo on CPUs).
    A rank waits `timeout_min` minutes in a collective before the job aborts: NCCL's default of 10
    is shorter than a 7B checkpoint takes to write on a slow shared filesystem. The allocator is
    configured first (train.py does so earlier still, before its pre-flight reads the GPU's size)."""
    configure_allocator()
    d = from_env()
    if d.world > 1 and not tdist.is_initialized():
        if d.device.type == "cuda":
            torch.cuda.set_device(d.device)
        tdist.init_process_group("nccl" if d.device.type == "cuda" else "gloo",
                                 timeout=datetime.timedelta(minutes=timeout_min))
    return d


def close(d: Dist) -> None:
    """Tear the process group down, after a barrier: no rank leaves while another still talks to it."""
    if d.world > 1 and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def all_sum(d: Dist, x):
    """Sum a float (or tensor) over ranks; identity in one process."""
    if d.world == 1:
        return x
    t = torch.as_tensor(x, dtype=torch.float64, device=d.device).clone()
    tdist.all_reduce(t)
    return t.item() if t.dim() == 0 else t


def all_max(d: Dist, x: float) -> float:
    """The largest of a float over ranks; identity in one process."""
    if d.world == 1:
        return x
    t = torch.tensor(x, dtype=torch.float64, device=d.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.item()


def all_max_each(d: Dist, xs: list) -> list:
    """Element-wise max of a list of numbers over ranks, in one all_reduce."""
    if d.world == 1:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64, device=d.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [int(v) if float(v).is_integer() else v for v in t.tolist()]


def broadcast(d: Dist, obj):
    """Rank 0's `obj` on every rank (a small picklable value: an error message, a path)."""
    if d.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def peak_memory(d: Dist) -> dict:
    """The CUDA caching allocator's peak reserved memory since the previous call (then reset), in GiB:
    the largest over ranks, and each rank's in rank order (a list: metrics.jsonl only, trackers take
    numbers). Every rank must call it. {} off CUDA."""
    if d.device.type != "cuda":
        return {}
    each = torch.zeros(d.world, dtype=torch.float64)
    each[d.rank] = torch.cuda.max_memory_reserved(d.device) / 2**30
    torch.cuda.reset_peak_memory_stats(d.device)
    each = all_sum(d, each).tolist()  # one all_reduce: the others' entries are 0
    return {"memory/max_reserved_gib": max(each), "memory/max_reserved_gib_ranks": each}


def reduce_metrics(d: Dist, sums: dict, means: dict) -> dict:
    """One all_reduce for a step's metrics: `sums` are counts added over ranks, `means` are averaged
    over ranks (every rank holds as many groups, so the mean of means is the global mean)."""
    if d.world == 1:
        return {**sums, **means}
    total = all_sum(d, torch.tensor([*sums.values(), *means.values()], dtype=torch.float64))
    values = total.tolist()
    return {**dict(zip(sums, values[:len(sums)])), **{k: v / d.world for k, v in zip(means, values[len(sums):])}}


# ----------------------------------------------------------------------------
# FSDP2


class Policy(torch.nn.Module):
    """FSDP2's root module: policy(fn, *args) = fn(model, *args). FSDP2 gathers the root's parameters
    (embeddings, final norm, LM head) around the root's forward, but loss.sequence_logprobs calls
    the decoder (get_decoder()) and reads the LM head itself: the LM's forward never runs, so this
    one wraps the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def wrap(model, d: Dist, grad_checkpointing=False, bf16=None, keep_meta=False) -> Policy:
    """The trained policy: the model on the device, recomputing activations in the backward pass if
    asked (non-reentrant, which FSDP2 composes with), wrapped as FSDP2's root under torchrun.

    Under torchrun the model is sharded before it reaches the device, so no GPU ever holds it whole,
    and it may be on the meta device (models.load_model(meta=True)): its shards are then allocated
    here and filled with rank 0's weights when rank 0 has them (a fresh run: one full copy in host
    RAM, not one per rank), or left for checkpoint.load_state to fill (a resume: meta on every rank)."""
    meta = next(model.parameters()).is_meta
    full = model.state_dict() if d.world > 1 and d.master and not meta else {}  # taken before sharding
    if d.world == 1 and not meta:
        model.to(d.device)
    if grad_checkpointing:  # transformers 5.24 renamed the method (the old name warns); vLLM 0.32 pins <5.20
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    policy = Policy(model)
    if d.world > 1:
        shard(policy, d, bf16)
    if keep_meta:  # the CPU rehearsal (tests/test_scale.py) materialises it under fake tensors itself
        return policy
    if meta:
        materialize(policy, d.device)
    if d.world > 1 and broadcast(d, bool(full)):  # rank 0 read the weights: into every rank's shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return policy


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` on the meta device, made without copying a weight (ties kept): a full copy to
    fill later (materialize, then a weight sync) costs no memory until then, even on rank 0."""
    memo = {id(p): torch.nn.Parameter(p.detach().to("meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.to("meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def materialize(module: torch.nn.Module, device: torch.device) -> None:
    """A meta-device model (or Policy) on `device`, its weights uninitialised for a load to fill; the
    buffers no state dict holds (rotary inv_freq) are recomputed by transformers' own initialiser,
    and the embeddings tied again where to_empty untied them (FSDP2 keeps its own ties)."""
    module.to_empty(device=device)
    hf = module.model if isinstance(module, Policy) else module
    for m in hf.modules():
        if m._non_persistent_buffers_set:
            hf._init_weights(m)
    hf.tie_weights()


def decoder_layers(model) -> list:
    """The blocks FSDP2 shards one by one: the modules of the classes the model lists in
    `_no_split_modules` (transformers' "never split this block across devices": the decoder layers of
    Qwen2, Qwen3, Llama, Gemma ...), whatever attribute path holds them."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} lists no decoder-layer class in _no_split_modules: "
                         f"FSDP2 cannot shard it layer by layer")
    return layers


def shard(policy: Policy, d: Dist, bf16=None) -> None:
    """FSDP2: fully_shard each decoder layer, then the root; bf16 compute with fp32 gradients on GPU
    (bf16=True asks for it elsewhere too: the CPU rehearsal of tests/test_scale.py)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = d.device.type == "cuda" if bf16 is None else bf16
    mp = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}
    for layer in decoder_layers(policy.model):
        fully_shard(layer, mp_policy=MixedPrecisionPolicy(**mp))
    # the root's inputs are the batch (advantages, old log-probs): keep them fp32
    fully_shard(policy, mp_policy=MixedPrecisionPolicy(**mp, cast_forward_inputs=False))
