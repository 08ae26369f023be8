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
trajectories SSI injects), or cut for length without one: `max_new_tokens` long, or shorter where vLLM's
`max_model_len` ended it first. So a completion is truncated exactly when it does not end in EOS
(`truncated`; VLLMEngine checks that vLLM's finish reason says the same). With
`logprobs=True`, logprobs[i][t] is log p(completions[i][t]) under the distribution the token was drawn
from: after temperature and top-p, renormalised (at temperature 0, the plain softmax of the logits).
"""
import contextlib

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)
from transformers.utils import logging as hf_logging

from lib.vllm_engine import VLLMEngine, check_vllm_version, cut_at_eos, installed_vllm_version, vllm_requirement
from lib.weight_sync import unwrap, weights_for_sync


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
                 top_p: float = 1.0, logprobs: bool = False, seed: int | None = None):
        """len(prompts) * n completions, grouped by prompt (prompt 0's n samples first). Each is the list of
        generated token ids, cut after the first EOS (the EOS kept), or max_new_tokens long if none was
        produced. No pad ids inside. Random draws come from the global torch RNG only, which checkpoints
        carry (so `seed`, VLLMEngine's per-sample seeds, is not needed here and is ignored). That one
        stream is still one per sample in effect: each decoding step draws every row with one batched
        multinomial, which takes fresh numbers from the stream for each row, so no two samples share a
        draw (vLLM needs seeds per sample because each seeded sample gets its own generator).
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
        completions = [cut_at_eos(row, self.eos_id) for row in sequences[:, width:].tolist()]
        if recorder is None:
            return completions, []
        lps = recorder.finish(sequences[:, -1]).tolist()  # [B, new]
        return completions, [row[:len(c)] for row, c in zip(lps, completions)]

    def sync_weights(self, model) -> None:
        """No-op when `model` is the engine's own model. Otherwise (e.g. sampling from a full copy while the
        trainer is FSDP2-sharded) copy the trainer's weights into the copy, one parameter at a time."""
        if unwrap(model) is self.model:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights_for_sync(model):
                params[name].copy_(tensor)

    def sleep(self, level: int = 2) -> None:  # no-ops, for symmetry with VLLMEngine
        pass

    def wake_up(self, tags: list[str] | None = None) -> None:
        pass


def truncated(completion: list[int], eos_id: int) -> bool:
    """A completion cut for length, not ended by the model: no EOS at its end (either engine, either limit)."""
    return not completion or completion[-1] != eos_id


# -----------------------------------------------------------------------------
# choosing an engine (VLLMEngine itself is in vllm_engine.py)


def resolve_engine(kind: str) -> tuple[str, str]:
    """kind: "hf", "vllm", or "auto" (vLLM when a GPU and a supported vllm are both there, else HF).
    Returns (engine, why); raises a one-line ImportError for "vllm" without a supported vLLM."""
    if kind not in ("auto", "hf", "vllm"):
        raise ValueError(f"unknown rollout engine {kind!r}: use 'auto', 'hf' or 'vllm'")
    version = installed_vllm_version() if kind != "hf" else None
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
