"""Rollout: sample N completions per prompt from the current policy (stage 1 of a HAPO step).

Two engines keep one contract, so train.py and eval.py never branch on the backend:

    engine.generate(prompts, n, max_new_tokens, temperature, top_p) -> len(prompts) * n token-id lists
    engine.sync_weights(model)  # after each optimizer step

- `HFEngine` runs transformers' `generate()` on the trainer's own model. It shares the trainer's
  parameters, so weight sync is a no-op, and it samples from the global torch RNG, so a run that
  checkpoints the RNG state resamples the same rollouts on resume. Slow, but runs anywhere (CPU tests).
- `VLLMEngine` runs vLLM inside the training process ("colocated", as TRL's `vllm_mode="colocate"`).
  After every optimizer step the trainer pushes its weights in with `weights_for_sync`.

A completion is the list of generated token ids, cut after the first EOS (EOS kept, as in the teacher
trajectories SSI injects) or exactly `max_new_tokens` long if the model never stopped.
"""
import contextlib
import importlib.util
import os
import sys
from typing import Iterator

import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

# -----------------------------------------------------------------------------
# Weight sync: trainer parameters -> (Hugging Face checkpoint name, full tensor)

# Module names that wrappers insert into parameter names: torch.compile, activation checkpointing, FSDP1.
_WRAPPER_SEGMENTS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


def hf_name(name: str) -> str:
    """`module._orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight` -> the checkpoint's
    `model.layers.0.mlp.up_proj.weight`: drop wrapper segments anywhere and a leading DDP `module.`."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Peel DDP (`.module`) and torch.compile (`._orig_mod`) wrappers to reach the HF model and its config."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def weights_for_sync(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every parameter, in `named_parameters()` order, one full tensor at a time.

    The order is the same on every rank, which FSDP2 needs: `full_tensor()` is a collective all-gather,
    so all ranks must call it for the same parameter at the same time. Only one gathered parameter is
    alive at once if the consumer drops it before asking for the next. With tied embeddings
    `lm_head.weight` is skipped: vLLM ignores it when loading and `model.embed_tokens.weight` carries it.
    Buffers (rotary `inv_freq`) are not weights and are not pushed.
    """
    config = getattr(_unwrap(model), "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for raw_name, param in model.named_parameters():
        name = hf_name(raw_name)
        if tied and name == "lm_head.weight":
            continue
        with torch.no_grad():  # closed before the yield, so grad mode never leaks into the consumer
            if hasattr(param, "full_tensor"):  # FSDP2 DTensor shard
                if param.device.type == "cpu" and torch.cuda.is_available():
                    param = param.to("cuda")  # FSDP2 CPU offload: NCCL gathers only CUDA tensors
                tensor = param.full_tensor()
            else:
                tensor = param
        yield name, tensor.detach()


def _cut_at_eos(ids: list[int], eos_id: int) -> list[int]:  # keep up to and including the first EOS
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


# -----------------------------------------------------------------------------
# transformers backend


@contextlib.contextmanager
def _quiet_transformers():
    """Silence generate()'s per-call notices ("generation flags are not valid ...") that a checkpoint's
    generation_config.json can trigger; they say nothing about our explicitly pinned config."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


class HFEngine:
    """Sampling with transformers' generate() on the trainer's own model (shares its parameters, so weight
    sync is a no-op) or on a full copy of it. Pass the bare HF model, not a DDP wrapper. On an FSDP2-sharded
    model every rank must call generate() with as many prompts: ranks step together (`synced_gpus`)."""

    def __init__(self, model, tokenizer, max_batch: int | None = None):
        self.model = model
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.max_batch = max_batch  # at most this many sequences per generate() call (bounds the KV cache)
        self._configs: dict[tuple, GenerationConfig] = {}

    def _config(self, max_new_tokens: int, temperature: float, top_p: float) -> GenerationConfig:
        """One explicit GenerationConfig per setting, cached. Every sampling field is pinned, because
        generate() fills unset ones from the checkpoint's generation_config.json (Qwen instruct models ship
        top_k=20, repetition_penalty=1.05) and then from library defaults (top_k=50)."""
        key = (max_new_tokens, temperature, top_p)
        if key not in self._configs:
            self._configs[key] = GenerationConfig(
                do_sample=temperature > 0,  # temperature 0 -> greedy
                temperature=temperature if temperature > 0 else 1.0,
                top_p=top_p,
                top_k=0,  # 0 disables top-k
                repetition_penalty=1.0,
                num_beams=1,
                num_return_sequences=1,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                use_cache=True,
            )
        return self._configs[key]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> list[list[int]]:
        """len(prompts) * n completions, grouped by prompt (prompt 0's n samples first). Each is the list of
        generated token ids, cut after the first EOS (the EOS kept), or max_new_tokens long if none was
        produced. No pad ids inside. Random draws come from the global torch RNG only."""
        rows = [list(p) for p in prompts for _ in range(n)]  # [M * N] prompts, grouped by prompt
        step = self.max_batch or max(len(rows), 1)
        config = self._config(max_new_tokens, temperature, top_p)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            completions = []
            for start in range(0, len(rows), step):
                completions += self._generate_chunk(rows[start : start + step], config)
        finally:
            self.model.train(was_training)
        return completions

    def _generate_chunk(self, rows: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        # Left padding: every prompt ends at the same column, so new tokens are appended after it.
        width = max(len(r) for r in rows)
        first_param = next(self.model.parameters())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
        sharded = hasattr(first_param, "full_tensor")  # FSDP2: every forward is a collective
        synced = sharded and torch.distributed.is_available() and torch.distributed.is_initialized()
        with _quiet_transformers():
            sequences = self.model.generate(  # [B, T + new], the prompt included
                input_ids=input_ids.to(first_param.device),
                attention_mask=attention_mask.to(first_param.device),
                generation_config=config,
                synced_gpus=synced,
            )
        # Finished rows are padded up to the longest one; cutting at EOS removes that padding.
        return [_cut_at_eos(row, self.eos_id) for row in sequences[:, width:].tolist()]

    def sync_weights(self, model) -> None:
        """No-op when `model` is the engine's own model. Otherwise (e.g. sampling from a full copy while the
        trainer is FSDP2-sharded) copy the trainer's weights into the copy, one parameter at a time."""
        if _unwrap(model) is self.model:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights_for_sync(model):
                params[name].copy_(tensor)

    def sleep(self, level: int = 1) -> None:  # no-ops, for symmetry with VLLMEngine
        pass

    def wake_up(self, tags: list[str] | None = None) -> None:
        pass


# -----------------------------------------------------------------------------
# vLLM backend


def _load_weights_on_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on the vLLM worker via `LLM.collective_rpc` (a callable gets the worker as first argument)."""
    worker.model_runner.model.load_weights(weights)


class VLLMEngine:
    """vLLM in the training process, fed the trainer's weights after every optimizer step.

    Build it BEFORE the trainer's model and optimizer take GPU memory: vLLM sizes its KV cache when it
    starts, and `gpu_memory_utilization` is a fraction of the whole card. The model must live in this
    process so that `sync_weights` can reach it: single process -> VLLM_ENABLE_V1_MULTIPROCESSING=0;
    under torchrun -> `distributed_executor_backend="external_launcher"`, one vLLM worker per rank.
    Pass the same `seed` on every rank: ranks of one tensor-parallel group must sample identically, so
    the seed is offset here by rank // tensor_parallel_size.
    Every sampling field is passed explicitly and `generation_config="vllm"` stops vLLM from reading the
    checkpoint's generation_config.json, so HF and vLLM rollouts sample the same distribution. (To use
    vLLM's own log-probs one day, also pass logprobs_mode="processed_logprobs": the sampled distribution.)
    """

    def __init__(self, model_path: str, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, enable_sleep_mode: bool = False,
                 tensor_parallel_size: int = 1, rank: int = 0, world_size: int = 1, **llm_kwargs):
        # Set before importing vllm: some versions read it at import time.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm  # lazy: vLLM is optional and heavy

        self._vllm = vllm
        self.eos_id = tokenizer.eos_token_id
        self.sleep_mode = enable_sleep_mode
        self.asleep: set[str] = set()  # which of "weights", "kv_cache" are released
        if world_size > 1:  # under torchrun: one engine per rank, in the rank's own process
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            seed += rank // tensor_parallel_size
        self.llm = vllm.LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            generation_config="vllm",
            enable_prefix_caching=True,  # the N samples of a prompt share its KV blocks
            **llm_kwargs,
        )

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0) -> list[list[int]]:
        """Same contract as HFEngine.generate."""
        self.wake_up()
        params = self._vllm.SamplingParams(
            n=n,
            temperature=temperature,  # 0 -> greedy
            top_p=top_p,
            top_k=-1,  # disabled (-1 is accepted by every vLLM version; newer ones also take 0)
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=max_new_tokens,
            min_tokens=0,
            stop_token_ids=[self.eos_id],  # the tokenizer's EOS, the one HFEngine stops on
            ignore_eos=False,
            seed=None,  # draws from the engine's generator, seeded once in LLM(seed=...)
            logprobs=None,  # the trainer recomputes old log-probs itself
            detokenize=False,  # we only need token ids
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        completions = []
        for request in outputs:  # LLM.generate returns requests in prompt order
            for sample in sorted(request.outputs, key=lambda s: s.index):
                ids = _cut_at_eos([int(t) for t in sample.token_ids], self.eos_id)
                if sample.finish_reason == "stop" and (not ids or ids[-1] != self.eos_id):
                    ids.append(self.eos_id)  # stopped on EOS: keep it, as HFEngine does
                completions.append(ids)
        return completions

    def _load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if hasattr(self.llm, "collective_rpc"):  # public LLM API (vLLM >= 0.7)
            self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        else:  # older vLLM: reach the in-process model directly
            self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights(weights)

    def sync_weights(self, model) -> None:
        """Push the trainer's weights one tensor at a time, then drop KV blocks computed by the old weights.
        A sleeping engine gets its weight memory back first (not its KV cache: generate() does that)."""
        self.wake_up(tags=["weights"])
        for name, tensor in weights_for_sync(model):
            self._load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Release vLLM's GPU memory while the trainer runs. Level 1 keeps a CPU copy of the weights (safe);
        level 2 drops them (fine only if sync_weights runs before the next generate). No-op unless built
        with enable_sleep_mode=True."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo sleep(), for the given parts only ("weights", "kv_cache") or for all of it."""
        todo = self.asleep & set(tags or ["weights", "kv_cache"])
        if not todo:
            return
        if todo == {"weights", "kv_cache"}:
            self.llm.wake_up()
        else:  # wake only the parts still asleep
            self.llm.wake_up(tags=sorted(todo))
        self.asleep -= todo


# -----------------------------------------------------------------------------


def _vllm_installed() -> bool:  # without importing it
    return "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None


def resolve_engine(kind: str) -> tuple[str, str]:
    """kind: "hf", "vllm", or "auto" (vLLM when a GPU and the vllm package are both there, else HF).
    Returns (engine, why); raises a one-line ImportError for "vllm" without vLLM."""
    if kind not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown rollout engine {kind!r}: use 'auto', 'hf' or 'vllm'")
    if kind == "vllm" and not _vllm_installed():
        raise ImportError("--rollout vllm needs vLLM, which is not installed: `pip install vllm` "
                          "(Linux + CUDA), or use --rollout hf")
    if kind != "auto":
        return kind, "asked for"
    if not torch.cuda.is_available():
        return "hf", "auto: no CUDA device"
    if not _vllm_installed():
        return "hf", "auto: vllm is not installed"
    return "vllm", "auto: CUDA device and vllm found"


def make_engine(kind: str, model, tokenizer, model_path: str, max_batch: int | None = None, **vllm_kwargs):
    """The engine resolve_engine(kind) names. `model` and `max_batch` are used by the HF engine only,
    `vllm_kwargs` by VLLMEngine."""
    kind, _ = resolve_engine(kind)
    if kind == "hf":
        return HFEngine(model, tokenizer, max_batch=max_batch)
    return VLLMEngine(model_path, tokenizer, **vllm_kwargs)
