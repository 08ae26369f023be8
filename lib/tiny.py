"""The built-in model: a byte-level tokenizer, a ~0.8M-parameter Qwen2, and its pretraining into a base model.

`python train.py` with no arguments trains `--model tiny`: the base model shipped in `tiny_base/`
(3.2 MB), which this file builds. Like a real base model it comes with skills: the random Qwen2 is
trained for 3,000 steps on worked sums (task.py's format): every sum of numbers below 100 and (10%
of rows) 20,000 three-digit sums whose total stays below 1000. It adds those without fault, and has
never carried into a fourth column, which the built-in task asks for.

    python -m lib.tiny                  # rebuild tiny_base/ (about 10 minutes on 2 CPU cores)
    python -m lib.tiny --out DIR        # build elsewhere, and compare with the shipped one

The build is deterministic: it records its loss at every step in `build.json`, and the tests replay
its first steps against that record.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lib import task

TINY = "tiny"  # train.py --model default: the shipped base model below
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_base")

# ----------------------------------------------------------------------------
# Model size and pretraining recipe; the defaults give 801,152 parameters.

HIDDEN = 128  # hidden_size; head_dim = HIDDEN / HEADS = 32
LAYERS = 4  # num_hidden_layers
HEADS = 4  # num_attention_heads
KV_HEADS = 2  # num_key_value_heads (grouped-query attention, as in Qwen2.5)
INTERMEDIATE = 384  # MLP width (3x hidden)
MAX_POSITIONS = 512  # longest prompt + completion; the verbose 3-digit solutions are ~150
RECIPE = dict(steps=3000, batch=64, lr=3e-3, seed=0, three=0.1)  # pretrain()'s arguments
# rope_theta keeps Qwen2Config's default (10000): the sequences are short.

# ----------------------------------------------------------------------------
# Tokenizer

EOS = "<|endoftext|>"  # the Qwen2.5 name; also the pad token, as in Qwen2.5


def make_tokenizer():
    """A byte-level tokenizer with no merges: id 0 is EOS/pad, then one id per byte (257 in all).

    It is Qwen2.5's tokenizer format (byte-level BPE) with the merge list left empty, so every
    character of the task is one token and the model never has to learn how numbers were split,
    while any UTF-8 text still encodes. Being the same format matters: transformers loads a saved
    checkpoint's tokenizer through the class of the model type (Qwen2Tokenizer), which keeps the
    byte-level pieces and would silently drop characters from a tokenizer of another kind.
    No chat template, so data.render_prompt hands the model the bare problem text.
    """
    from transformers import PreTrainedTokenizerFast  # here, not at import: train.py's pre-flight needs none
    vocab = {EOS: 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   model_max_length=MAX_POSITIONS)


# ----------------------------------------------------------------------------
# Model


def make_model(tokenizer, seed: int = 0, **overrides):
    """A randomly initialised fp32 Qwen2 with the sizes above; `overrides` go to Qwen2Config.

    Tied embeddings like Qwen2.5-0.5B/1.5B, so weight sync and checkpoints take the same path as
    the real models. The global RNG is left untouched: the same seed gives the same weights
    whatever ran before.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM
    eos = tokenizer.eos_token_id
    config = dict(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**config))
    return model.float()  # fp32 even if torch's default dtype was changed


# ----------------------------------------------------------------------------
# Pretraining: what a base model brings to RL


def pretraining_corpus(tokenizer):
    """Two lists of (prompt ids, solution ids + EOS): every sum of numbers below 100, and the
    three-digit sums of task.seen_three_digit_pairs(), each worked column by column."""
    def rows(pairs):
        return [(tokenizer(task.question(a, b)).input_ids,
                 tokenizer(task.solve(a, b)).input_ids + [tokenizer.eos_token_id]) for a, b in pairs]
    return rows((a, b) for a in range(100) for b in range(100)), rows(task.seen_three_digit_pairs())


def pretrain(model, tokenizer, steps, batch, lr, seed, three, progress=False, on_step=None, stop=None):
    """Plain next-token training on pretraining_corpus(), a share `three` of each batch drawn from
    the three-digit sums (all below 1000), with 100 warm-up steps and a linear decay to 5% of lr.

    With RECIPE the base model adds numbers below 100, and three-digit numbers whose total stays
    below 1000, without fault (99.9% at temperature 1), and never gets a total of 1000 or more:
    the built-in task. Deterministic given the seed. `on_step(step, loss)` sees every loss; `stop`
    ends the run after that many steps of the same schedule (the tests replay a build's beginning).
    """
    from tqdm import tqdm
    two, three_rows = pretraining_corpus(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    for step in tqdm(range(stop or steps), desc="pretraining the tiny base model", leave=False, disable=not progress):
        pick = [(three_rows if rng.random() < three else two) for _ in range(batch)]
        pick = [rows[rng.randrange(len(rows))] for rows in pick]
        L = max(len(p) + len(r) for p, r in pick)
        ids = torch.full((batch, L), tokenizer.pad_token_id)  # [b, L]
        labels = torch.full((batch, L), -100)  # [b, L] loss on the solution tokens only
        for i, (p, r) in enumerate(pick):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id),
                     labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    return model


def weights_sha256(model) -> str:
    """A digest of every tensor's bytes, in state-dict order: equal digests, identical weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def build(out_dir=None, stop=None, progress=True):
    """make_model + pretrain with RECIPE, saved (when out_dir is given) with its tokenizer and a
    build.json that records the recipe, every step's loss and the weights' digest.
    Returns (model, losses); `stop` ends it early, as pretrain's."""
    recipe, tok, losses, t0 = RECIPE, make_tokenizer(), [], time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = pretrain(make_model(tok, recipe["seed"]), tok, progress=progress, stop=stop,
                         on_step=lambda s, loss: losses.append(loss), **recipe)
    if out_dir:
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        record = {"recipe": recipe, "sha256": weights_sha256(model), "losses": losses,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "seconds": round(time.time() - t0, 1)}
        with open(os.path.join(out_dir, "build.json"), "w") as f:
            json.dump(record, f)
    return model, losses


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the tiny base model (tiny_base/).")
    p.add_argument("--out", default=SHIPPED, help="where to write it (default: the shipped tiny_base/)")
    args = p.parse_args(argv)
    shipped = None
    if os.path.abspath(args.out) != SHIPPED and os.path.exists(os.path.join(SHIPPED, "build.json")):
        shipped = json.load(open(os.path.join(SHIPPED, "build.json")))
    from transformers.utils import logging
    logging.disable_progress_bar()
    build(args.out)
    record = json.load(open(os.path.join(args.out, "build.json")))
    print(f"built {args.out} in {record['seconds']:.0f} s; sha256 {record['sha256']}")
    if shipped:
        same = record["sha256"] == shipped["sha256"]
        drift = max(abs(a - b) for a, b in zip(record["losses"], shipped["losses"]))
        print(f"shipped tiny_base/: {'identical weights' if same else 'different weights'}; largest loss "
              f"difference over {len(record['losses'])} steps {drift:.2e}")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
