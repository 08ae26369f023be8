"""Two recipes, chosen by the model, and the command line that picks between them.

    laptop  the Config's own defaults (train.py): the built-in tiny model on a CPU, in minutes
    paper   the paper's Section 5 with LUFFY's script for what the paper leaves to it (docs/ALGORITHM.md):
            OpenR1-Math-46k-8192, 128 prompts x 8 samples, constant lr 1e-6, temperature 1.0, 8,192 new
            tokens, 2 optimizer mini-batches, entropy 0.001; token-budget micro-batches and gradient
            checkpointing; held-out MATH-500 at temperature 0.6; a checkpoint every 50 steps

`--recipe auto` (the default) takes the laptop recipe for the built-in model and for a run that starts
from one of ours that used it (SFT-then-RL on the laptop: `--model <sft out_dir>`), the paper's for
every other model. A flag given on the command line always wins over the recipe.
"""

import argparse
import dataclasses
import inspect
import os
import re

PAPER = dict(data="Elliott/Openr1-Math-46k-8192", eval_data="HuggingFaceH4/MATH-500", eval_problems=500,
             eval_every=25, batch_prompts=128, group_size=8, mini_batches=2, lr=1e-6, lr_schedule="constant",
             temperature=1.0, eval_temperature=0.6, max_new_tokens=8192, entropy_coef=0.001,
             micro_batch_tokens=16384, grad_checkpointing=True, vllm_gpu_memory=0.5, save_every=50)
# LUFFY trains a copy of Qwen2.5-Math-7B (4,096 positions) whose RoPE base reaches 16k positions
LUFFY_16K = dict(max_positions=16384, rope_theta=40000.0)
PAPER_MODELS = re.compile(r"qwen2\.5-math", re.I)  # the models the paper trained, which get LUFFY_16K
QWEN_MATH_POSITIONS = 4096  # theirs, for when no config.json can be read (a hub id not yet downloaded)


def saved_config(model):
    """The training config recorded with one of our checkpoints (an out_dir or a step_N directory), or None."""
    from lib import checkpoint
    path = checkpoint.latest(model) if os.path.isfile(os.path.join(model, "latest")) else model
    state = os.path.join(path, "state.pt") if path else ""
    if not os.path.isfile(state):
        return None
    import torch
    try:
        return torch.load(state, weights_only=False, map_location="cpu").get("config")
    except Exception:  # a damaged state.pt: loading the model will say so in its own words
        return None


def positions_of(model):
    """The model's max_position_embeddings from its config.json, if it can be read without a download."""
    from lib.models import resolve_model
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(resolve_model(model), local_files_only=True).max_position_embeddings
    except Exception:
        return None


def choose(model, asked="auto"):
    """('laptop' | 'paper', why) for --model and --recipe."""
    if asked != "auto":
        return asked, "--recipe"
    if model == "tiny":
        return "laptop", "the built-in model"
    saved = saved_config(model)
    if saved:
        used = saved.get("recipe") or ("laptop" if saved.get("model") == "tiny" else "paper")
        return used, f"{model} was trained with it"
    return "paper", f"{model} is not the built-in model"


def paper(model, given, defaults):
    """The paper's values for this model; LUFFY's 16k positions for a Qwen2.5-Math model that has too few."""
    out, run = dict(PAPER), {**defaults, **PAPER, **given}
    need = run["max_prompt_tokens"] + run["max_new_tokens"]
    if PAPER_MODELS.search(model) and (positions_of(model) or QWEN_MATH_POSITIONS) < need:
        out.update(LUFFY_16K)
    return out


def parse(config_cls, argv, error, choices=None):
    """The command line into config_cls (one flag per field, help from the field's comment), the recipe's
    values under the flags given. Returns (config, a line naming the recipe and the flags that differ)."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the usage screen
            error(f"{message} (see --help)")
    docs = dict(re.findall(r"^\s+(\w+): \w+ = .*?# (.*)$", inspect.getsource(config_cls), re.M))
    p = Parser(description=(config_cls.__doc__ or "").split("\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(config_cls):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
        default = f"laptop: {f.default}" + (f"; paper: {PAPER[f.name]}" if f.name in PAPER else "")
        p.add_argument(f"--{f.name}", help=f"{docs.get(f.name)} ({default})", choices=(choices or {}).get(f.name),
                       **kind)
    given = vars(p.parse_args(argv))
    model = given.get("model", config_cls.model)
    recipe, why = choose(model, given.get("recipe", "auto"))
    defaults = dataclasses.asdict(config_cls())
    values = {**defaults, **(paper(model, given, defaults) if recipe == "paper" else {})}
    flag = lambda k, v: f"--{k}" if v is True else f"--no-{k}" if v is False else f"--{k} {v}"
    differ = [flag(k, v) for k, v in given.items() if k not in ("recipe", "model") and values[k] != v]
    note = f"recipe: {recipe} ({why}); " + (f"flags that differ from it: {' '.join(differ)}" if differ else
                                             "no flag differs from it")
    return config_cls(**{**values, **given, "recipe": recipe}), note
