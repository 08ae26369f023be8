"""Shared by the test modules: small models, fake tokenizers, and running the project's commands."""

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS = os.path.join(ROOT, "tests", "drivers")

# train.py flags for a run of seconds: 4 prompts x 4 rollouts of 12 tokens, 8 held-out problems
TRAIN_SMALL = ["--batch_prompts", "4", "--group_size", "4", "--max_new_tokens", "12", "--eval_problems", "8",
               "--eval_every", "2", "--no-progress", "--rollout", "hf"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores: one thread each


def script(name):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_qwen2(vocab=40, seed=0, tie=True, init=0.02):
    """A 2-layer Qwen2 for tests. init=0.2 puts logits far from uniform: greedy decoding has no near-ties."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, initializer_range=init)
    return Qwen2ForCausalLM(cfg).float()


def fake_tok(eos=3, pad=0):
    """What the engines read of a tokenizer."""
    return SimpleNamespace(eos_token_id=eos, pad_token_id=pad)


def box(pred):
    """A realistic completion whose final answer is pred."""
    return ("<think>\nLet me work through this carefully. First we set up the equation, then we solve.\n"
            "</think>\nPutting it together, the final answer is $\\boxed{" + pred + "}$.")


def metrics(out_dir):
    """metrics.jsonl without the wall-clock fields, which differ between any two runs."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def run(cmd, cwd=ROOT, env=ONE_THREAD, timeout=300, check=True):
    """Run a command; on failure show the ends of its output."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def train_here(capsys, *args):
    """train.main(args) in this process, read as a child process would be: a CompletedProcess of the exit
    code (SystemExit's; 0 when main returns) and what the run printed (capsys, pytest's fixture)."""
    import train
    capsys.readouterr()  # what came before is not this run's
    code = 0
    try:
        train.main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        traceback.clear_frames(e.__traceback__)  # main's locals go now, its out_dir lock with them, as at an exit
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["train.py", *args], code, out, err)


def build_batch(groups, method, gamma, pad_id=0):
    """Stages 3-5 and the packing, as train.py runs them: groups -> Batch."""
    import hapo
    trained = hapo.inject(groups, hapo.gate_groups(groups, method, gamma)[0], method)
    return hapo.pack(trained, hapo.advantages(trained), pad_id)
