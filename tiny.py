"""The built-in world: a byte-level tokenizer, a ~0.8M-parameter Qwen2 and an addition task.

`python train.py` with no arguments trains on this, so the whole method can be run, tested and
read on a laptop with no downloads. Everything is built in code and seeded.

The base model (base_model) is the random Qwen2 after some minutes of next-token training on
worked sums: every sum of numbers below 100, and (10% of rows) 20,000 three-digit sums whose
total stays below 1000. Like a real base model it has the format and the skills: it adds such
sums without fault. The task is three-digit sums whose total reaches 1000 or more, which need
one step it has never taken: a carry into a fourth column. It gets none of them right, so every
group of 8 fails and plain GRPO sees all-zero advantages, while the teacher solutions injected by
SSI show the missing step. That is the sparse-reward setting of the paper, small enough for a CPU.

Format (digits=2), one line per column, least significant first:

    prompt   47+38=?
    solution 7+8=15 15
             4+3+1=8 85
             \\boxed{85}

A column line is `x+y=s r` or `x+y+1=s r` (the `+1` is the carry in). `s` is the column sum
and `r` the running result: the sum of the columns done so far, (a mod 10^k) + (b mod 10^k) for
the k lowest columns, written with at least k digits. Each line's r is its s followed by the
previous r without its carry digit, so the last r is the answer and the box copies it.
The `verbose` teacher is correct but restates the problem and checks every line twice.
"""

import os
import random
import shutil

import torch
from tqdm import tqdm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from data import Problem

TINY = "tiny"        # train.py --model default: build this model and tokenizer in code
BUILTIN = "builtin"  # train.py --data default: the addition task below (see data.load_problems)

# ----------------------------------------------------------------------------
# Model size. Tune these for learning speed; the defaults give 801,152 parameters.

HIDDEN = 128          # hidden_size; head_dim = HIDDEN / HEADS = 32
LAYERS = 4            # num_hidden_layers
HEADS = 4             # num_attention_heads
KV_HEADS = 2          # num_key_value_heads (grouped-query attention, as in Qwen2.5)
INTERMEDIATE = 384    # MLP width (3x hidden)
PRETRAIN_STEPS = 3000  # base_model(): steps of next-token training on worked sums
PRETRAIN_THREE = 0.1  # share of those sums that have three digits (and a total below 1000)
MAX_POSITIONS = 512   # longest prompt + completion; the verbose 3-digit solutions are ~150
# rope_theta keeps Qwen2Config's default (10000): the sequences are short.

# ----------------------------------------------------------------------------
# Tokenizer

EOS = "<|endoftext|>"  # the Qwen2.5 name; also the pad token, as in Qwen2.5


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: id 0 is EOS/pad, then one id per byte (257 in all).

    It is Qwen2.5's tokenizer format (byte-level BPE) with the merge list left empty, so every
    character of the task is one token and the model never has to learn how numbers were split,
    while any UTF-8 text still encodes. Being the same format matters: transformers loads a saved
    checkpoint's tokenizer through the class of the model type (Qwen2Tokenizer), which keeps the
    byte-level pieces and would silently drop characters from a tokenizer of another kind.
    No chat template, so data.render_prompt hands the model the bare problem text.
    """
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


def make_model(tokenizer, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A randomly initialised fp32 Qwen2 with the sizes above; `overrides` go to Qwen2Config.

    Tied embeddings like Qwen2.5-0.5B/1.5B, so weight sync and checkpoints take the same path as
    the real models. The global RNG is left untouched: the same seed gives the same weights
    whatever ran before.
    """
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


def seen_three_digit_pairs() -> list[tuple[int, int]]:
    """The 20,000 three-digit sums the base model is pretrained on, all below 1000 (no fourth digit)."""
    rng, pairs = random.Random(12345), []
    while len(pairs) < 20000:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if a + b < 1000:
            pairs.append((a, b))
    return pairs


def pretraining_corpus(tokenizer):
    """Two lists of (prompt ids, solution ids + EOS): every sum of numbers below 100, and the
    three-digit sums of seen_three_digit_pairs(), each worked column by column."""
    def rows(pairs):
        return [(tokenizer(f"{a}+{b}=?").input_ids, tokenizer(solve(a, b)).input_ids + [tokenizer.eos_token_id])
                for a, b in pairs]
    return rows((a, b) for a in range(100) for b in range(100)), rows(seen_three_digit_pairs())


def pretrain(model, tokenizer, steps=PRETRAIN_STEPS, batch=64, lr=3e-3, seed=0, three=PRETRAIN_THREE):
    """Give the random model what a base model brings to RL: column addition without a fourth column.

    Plain next-token training on pretraining_corpus(), a share `three` of each batch drawn from the
    three-digit sums (all below 1000), with 100 warm-up steps and a linear decay to 5% of lr. With
    the defaults the base model adds numbers below 100, and three-digit numbers whose total stays
    below 1000, without fault (99.9% at temperature 1), and never gets a total of 1000 or more:
    the built-in task. Deterministic given the seed.
    """
    two, three_rows = pretraining_corpus(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    for _ in tqdm(range(steps), desc="pretraining the tiny base model (once; cached)", leave=False,
                  disable=os.environ.get("RANK", "0") != "0"):
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
    return model


def base_model(tokenizer, seed=0):
    """make_model + pretrain, cached on disk ($HAPO_CACHE, default ~/.cache/hapo) after the first call.

    The first call takes several minutes on 2 CPU cores; $HAPO_PRETRAIN_STEPS overrides the length.
    """
    from transformers import AutoModelForCausalLM
    root = os.environ.get("HAPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hapo"))
    steps = int(os.environ.get("HAPO_PRETRAIN_STEPS", PRETRAIN_STEPS))  # the tests use fewer
    path = os.path.join(root, f"tiny-base-L{LAYERS}-H{HIDDEN}-s{steps}-t{PRETRAIN_THREE}-seed{seed}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = pretrain(make_model(tokenizer, seed), tokenizer, steps=steps, seed=seed)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: a concurrent or killed run never sees half a model
    except OSError:  # another process (a torchrun rank) got there first with the same weights
        shutil.rmtree(tmp, ignore_errors=True)
    return model


# ----------------------------------------------------------------------------
# Task


def solve(a: int, b: int, teacher: str = "standard") -> str:
    """The worked column-by-column solution of a+b (format in the module docstring)."""
    if teacher not in ("standard", "verbose"):
        raise ValueError(f"teacher must be 'standard' or 'verbose', got {teacher!r}")
    width = max(len(str(a)), len(str(b)))
    lines, carry = [], 0
    for k in range(width):
        x, y = a // 10**k % 10, b // 10**k % 10
        s = x + y + carry
        low = 10 ** (k + 1)
        running = str(a % low + b % low).zfill(k + 1)  # the k+1 lowest columns, carry included
        lines.append(f"{x}+{y}{'+1' if carry else ''}={s} {running}")
        carry = s // 10
    if teacher == "verbose":
        # Same arithmetic, needlessly long: a restatement, every line checked, a closing summary.
        lines = [f"We add {a} and {b} column by column."] + \
                [ln for line in lines for ln in (line, f"check: {line}")] + \
                [f"so {a}+{b}={a + b}"]
    return "\n".join(lines + [f"\\boxed{{{a + b}}}"])


def make_problem(a: int, b: int, teacher: str = "standard") -> Problem:
    """One task instance as a chat-format Problem."""
    return Problem(prompt=[{"role": "user", "content": f"{a}+{b}=?"}], answer=str(a + b),
                   solution=solve(a, b, teacher), source=BUILTIN)


def make_task(n_train: int = 4000, n_eval: int = 200, seed: int = 0, digits: int = 3,
              teacher: str = "standard") -> tuple[list[Problem], list[Problem]]:
    """(train, eval) lists of sums of two `digits`-digit numbers whose total has one digit more.

    With digits=3 (the built-in task) that is a+b >= 1000: the base model has added three-digit
    numbers only when the total stayed below 1000, so these ask for the one step it has never
    taken, carrying into a fourth column. Eval is drawn first, so it depends only on (seed,
    n_eval, digits) and stays the same when n_train changes. Neither split holds a sum the base
    model was pretrained on, and train excludes every eval pair and its swap (b+a is the same
    problem to a learner that has seen a+b). Deterministic given the seed.
    """
    lo = 10 ** (digits - 1) if digits > 1 else 0
    span = 10**digits - lo                  # how many operands have exactly `digits` digits
    total = span * span
    seen = {p for a, b in seen_three_digit_pairs() if digits == 3 for p in ((a, b), (b, a))}
    rng, tried = random.Random(seed), set()

    def draw(n, excluded):  # n new pairs with a carry out of the top column, by rejection
        out = []
        while len(out) < n and len(tried) < total:
            i = rng.randrange(total)  # indices, not pairs: digits=6 is fine too
            if i not in tried:
                tried.add(i)
                a, b = lo + i // span, lo + i % span
                if a + b >= 10**digits and (a, b) not in excluded:
                    out.append((a, b))
        if len(out) < n:
            raise ValueError(f"too few {digits}-digit sums with {digits + 1}-digit totals for "
                             f"n_train={n_train} and n_eval={n_eval} (held out with their swaps)")
        return out

    eval_pairs = draw(n_eval, seen)
    train_pairs = draw(n_train, seen | {(b, a) for a, b in eval_pairs})
    return ([make_problem(a, b, teacher) for a, b in train_pairs],
            [make_problem(a, b, teacher) for a, b in eval_pairs])
