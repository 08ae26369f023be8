"""Loading a policy and its tokenizer: a hub id, a local directory, a training out_dir, or `tiny`.

train.py and eval.py both load through here, so a checkpoint means the same thing to both.
Errors are DataError with one line that says what was wrong and where.
"""

import os
import re

import torch

import checkpoint
import tiny
from data import DataError, one_line


def resolve_model(name: str) -> str:
    """The directory (or hub id) to load: `tiny` is the shipped tiny_base/, a training out_dir means
    its latest checkpoint. Raises DataError for a path that does not exist and is no hub id either."""
    if name == tiny.TINY:
        if not os.path.exists(os.path.join(tiny.SHIPPED, "model.safetensors")):
            raise DataError(f"the built-in model is missing from {tiny.SHIPPED}: rebuild it with `python tiny.py`")
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


def load_model(path: str, need_weights: bool = True, dtype=None, attn_implementation=None, meta=False):
    """(model or None, tokenizer) from resolve_model's answer. Weights are skipped when vLLM loads its
    own; the default dtype is bf16 on a GPU and fp32 on a CPU; attn_implementation (sdpa, eager,
    flash_attention_2) defaults to transformers' choice. meta: the model from its config on the meta
    device, shapes without weights, for parallel.wrap to shard and fill. Raises DataError (one line)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = None
        if need_weights and meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype, **kw)
            try:  # what from_pretrained would read too: a checkpoint exports it, vLLM reads its defaults
                model.generation_config = GenerationConfig.from_pretrained(path)
            except OSError:
                pass
        elif need_weights:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except Exception as err:  # a missing, damaged or foreign checkpoint fails in many ways (SafetensorError, ...)
        where = "" if os.path.isdir(path) else " (not a local directory, so tried as a hub id)"
        raise DataError(f"could not load model '{path}'{where}: {one_line(err)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_policy(path: str, dist, from_checkpoint: bool = False, attn_implementation=None):
    """(model, tokenizer) to train, in fp32. The weights are read only where they come from: by rank 0
    of a fresh run (parallel.wrap broadcasts them into every rank's shards), never by the other ranks
    nor on a resume (the checkpoint's shards fill the model); there it is built on the meta device.
    So a node holds one full copy in host RAM at start, not one per rank; one process is unchanged."""
    meta = from_checkpoint or not dist.master
    return load_model(path, dtype=torch.float32, attn_implementation=attn_implementation, meta=meta)

