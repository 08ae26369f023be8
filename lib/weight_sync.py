"""The trainer's weights as the rollout engines take them: (checkpoint name, full tensor), one at a time.

Both engines' `sync_weights` read the trainer through `weights_for_sync`, whether it is a plain model,
wrapped by torch.compile or activation checkpointing, or sharded by FSDP2.
"""
from typing import Iterator

import torch

# Module names that wrappers insert into parameter names: torch.compile, activation checkpointing, FSDP1.
_WRAPPER_SEGMENTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


def hf_name(name: str) -> str:
    """`module._orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight` -> the checkpoint's
    `model.layers.0.mlp.up_proj.weight`: drop wrapper segments anywhere and a leading DDP `module.`."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Peel DDP (`.module`) and torch.compile (`._orig_mod`) wrappers to reach the HF model and its config."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def weights_for_sync(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every parameter, in `named_parameters()` order, one full tensor at a time,
    in `dtype` if given (the engine's): an FSDP2 shard is cast before it is gathered, so a bf16 engine's
    all-gathers move half the bytes of the fp32 master weights.

    The order is the same on every rank, which FSDP2 needs: `full_tensor()` is a collective all-gather,
    so all ranks must call it for the same parameter at the same time. Only one gathered parameter is
    alive at once if the consumer drops it before asking for the next. With tied embeddings the LM
    head's weight (`lm_head.weight` in Qwen, Llama and Gemma) is skipped: vLLM ignores it when loading
    and the input embeddings carry it. Buffers (rotary `inv_freq`) are not weights and are not pushed.
    """
    skip = tied_head_names(unwrap(model))
    for raw_name, param in model.named_parameters():
        name = hf_name(raw_name)
        if name in skip:
            continue
        with torch.no_grad():  # closed before the yield, so grad mode never leaks into the consumer
            if hasattr(param, "full_tensor"):  # FSDP2 DTensor shard
                if param.device.type == "cpu" and torch.cuda.is_available():
                    param = param.to("cuda")  # FSDP2 CPU offload: NCCL gathers only CUDA tensors
                tensor = param.to(dtype or param.dtype).full_tensor()  # the local shard cast, then gathered
            else:
                tensor = param.to(dtype or param.dtype)  # no copy when the dtype is already the one asked
        yield name, tensor.detach()


def tied_head_names(model: torch.nn.Module) -> set[str]:
    """The checkpoint names of the LM head's parameters when the config ties them to the input
    embeddings, found through transformers' get_output_embeddings(), not a family's attribute name."""
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None and getattr(config, "tie_word_embeddings", False) else None
    if head is None:
        return set()
    prefix = next(hf_name(n) for n, m in model.named_modules() if m is head)
    return {f"{prefix}.{n}" for n, _ in head.named_parameters()}
