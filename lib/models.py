"""Loading a policy and its tokenizer: a hub id, a local directory, a training out_dir, or `tiny`.

train.py and eval.py both load through here, so a checkpoint means the same thing to both.
Errors are DataError with one line that says what was wrong and where.
"""

import os
import re

import torch

from lib import checkpoint
from lib import parallel
from lib import tiny
from lib.data import DataError, one_line


def resolve_model(name: str) -> str:
    """The directory (or hub id) to load: `tiny` is the shipped tiny_base/, a training out_dir means
    its latest checkpoint. Raises DataError for a path that does not exist and is no hub id either."""
    if name == tiny.TINY:
        if not os.path.exists(os.path.join(tiny.SHIPPED, "model.safetensors")):
            raise DataError(f"the built-in model is missing from {tiny.SHIPPED}: rebuild it with `python -m lib.tiny`")
        return tiny.SHIPPED
    if os.path.isfile(os.path.join(name, "latest")) and not os.path.exists(os.path.join(name, "config.json")):
        found = checkpoint.latest(name)  # a training out_dir: its newest checkpoint
        if found is None:
            raise DataError(f"'{name}' is a training out_dir without a complete checkpoint")
        return found
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise DataError(f"model path '{name}' is not a directory")
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name):  # not `owner/name` either
        raise DataError(f"model path '{name}' does not exist (give a local directory, a hub id, or 'tiny')")
    return name


# what a training run reads of a hub repository: configs, tokenizer files, the safetensors weights
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def download(name: str, dist) -> str:
    """resolve_model's answer as a local directory: a hub id is downloaded by rank 0 first, and by the
    other ranks once it is done (from the cache it filled, on one node or a shared filesystem), so that
    they wait in a broadcast of ours (--dist_timeout_min), not in vLLM's startup groups (torch's default
    30 minutes) while rank 0 downloads 15 GB. A local directory is returned as it is. Raises DataError."""
    if os.path.isdir(name):
        return name
    path, error = None, None
    if dist.master:
        try:
            path = _snapshot(name)
        except Exception as err:  # not found, gated, offline without a copy, a full disk ...
            error = str(_cannot_load(name, err))
    if error := parallel.broadcast(dist, error):  # and the barrier the other ranks wait at
        raise DataError(error)
    return path or _snapshot(name)


def _snapshot(name: str) -> str:
    from huggingface_hub import snapshot_download
    path = snapshot_download(name, allow_patterns=HUB_FILES)
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):  # an older repository: .bin weights
        path = snapshot_download(name, allow_patterns=HUB_FILES + ["*.bin"])
    return path


def position_overrides(config, rope_theta=None, max_positions=None) -> dict:
    """The config fields that --rope_theta and --max_positions change, as one dict: the trainer's config
    takes it at load (load_model) and vLLM the same dict as `hf_overrides`, so both run the same
    positions. transformers 5 keeps theta inside `rope_parameters` (a `rope_theta=` keyword to
    from_pretrained is silently dropped), and vLLM standardises that dict after its overrides."""
    out = {"max_position_embeddings": int(max_positions)} if max_positions else {}
    if rope_theta:
        out["rope_parameters"] = {**(getattr(config, "rope_parameters", None) or {}), "rope_theta": float(rope_theta)}
    return out


def load_config(path: str, rope_theta=None, max_positions=None):
    """The model's config with the position overrides applied. Raises DataError (one line)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # a missing, damaged or foreign checkpoint fails in many ways
        raise _cannot_load(path, err) from None
    config.update(position_overrides(config, rope_theta, max_positions))
    return config


def check_positions(config, need: dict) -> None:
    """Refuse, in one DataError line, a run whose longest sequence (the largest of `need`, {what: tokens})
    is longer than the model's positions: past them a RoPE model still computes, silently out of what
    it was trained on, and vLLM would cut the rollouts there."""
    have = getattr(config, "max_position_embeddings", None)
    what, longest = max(need.items(), key=lambda kv: kv[1])
    if have is not None and longest > have:
        raise DataError(f"the model has {have} positions (max_position_embeddings) but this run makes sequences "
                        f"of {longest} tokens ({what}): use a copy of the model with more positions (LUFFY trains "
                        f"Qwen2.5-Math-7B as one with rope_theta 40,000 and 16,384 positions) or pass --max_positions "
                        f"{longest} or more (and --rope_theta, e.g. 40000), which the trainer and vLLM both apply")


def check_family(model) -> None:
    """Refuse, in one DataError line, a causal LM whose logits are more than hidden @ head.weight^T:
    loss.sequence_logprobs computes them itself. Gemma 2 soft-caps them (final_logit_softcapping);
    a head with a bias would be silently dropped. What else a family needs happens inside its decoder
    (get_decoder()): Qwen3's q/k norms, Gemma's scaled embeddings and attention soft-cap, Llama's
    rope scaling. Untied heads (Llama) and tied ones (Qwen, Gemma) both go through
    get_output_embeddings()."""
    name = type(model).__name__
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        raise DataError(f"{name} soft-caps its logits (final_logit_softcapping={cap}), which hapo's fused "
                        f"log-probs (loss.py) do not compute: not supported")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise DataError(f"{name} has {'no LM head' if head is None else 'an LM head with a bias'}: hapo's "
                        f"fused log-probs (loss.py) take the head's weight alone: not supported")


def load_model(path: str, need_weights: bool = True, dtype=None, attn_implementation=None, rope_theta=None,
               max_positions=None, meta=False):
    """(model or None, tokenizer) from resolve_model's answer. Weights are skipped when vLLM loads its
    own; the default dtype is bf16 on a GPU and fp32 on a CPU; attn_implementation (sdpa, eager,
    flash_attention_2) defaults to transformers' choice; rope_theta and max_positions override the
    config (position_overrides). meta: the model from its config on the meta device, shapes without
    weights, for parallel.wrap to shard and fill. Raises DataError (one line)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    config = load_config(path, rope_theta, max_positions) if need_weights else None
    try:
        tok = AutoTokenizer.from_pretrained(path)
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = None
        if need_weights and meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
            try:  # what from_pretrained would read too: a checkpoint exports it, vLLM reads its defaults
                model.generation_config = GenerationConfig.from_pretrained(path)
            except OSError:
                pass
        elif need_weights:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kw)
    except Exception as err:  # a missing, damaged or foreign checkpoint fails in many ways (SafetensorError, ...)
        raise _cannot_load(path, err) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _cannot_load(path, err) -> DataError:
    where = "" if os.path.isdir(path) else " (not a local directory, so tried as a hub id)"
    return DataError(f"could not load model '{path}'{where}: {one_line(err)}")


def load_policy(path: str, dist, from_checkpoint: bool = False, attn_implementation=None, rope_theta=None,
                max_positions=None):
    """(model, tokenizer) to train, in fp32. The weights are read only where they come from: by rank 0
    of a fresh run (parallel.wrap broadcasts them into every rank's shards), never by the other ranks
    nor on a resume (the checkpoint's shards fill the model); there it is built on the meta device.
    So a node holds one full copy in host RAM at start, not one per rank; one process is unchanged."""
    meta = from_checkpoint or not dist.master
    return load_model(path, dtype=torch.float32, attn_implementation=attn_implementation, rope_theta=rope_theta,
                      max_positions=max_positions, meta=meta)

