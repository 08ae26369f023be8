"""The built-in task: sums of two numbers, worked column by column, with a verified teacher.

`python train.py` with no arguments trains on this (`--data builtin`), so the method can be run,
tested and read on a laptop with no download. Everything here is plain Python and seeded; data.py
turns the pairs into Problems and tiny.py pretrains the built-in base model on the sums it may see.

The base model (tiny.py) has worked every sum of numbers below 100 and 20,000 three-digit sums
whose total stays below 1000. The task is three-digit sums whose total reaches 1000: they need one
step the base model has never taken, a carry into a fourth column. It solves none of them, so every
group of 8 fails and plain GRPO sees all-zero advantages, while the teacher solutions SSI injects
show the missing step: the sparse-reward setting of the paper, small enough for a CPU.

Format (digits=2), one line per column, least significant first:

    prompt   47+38=?
    solution 7+8=15 15
             4+3+1=8 85
             \\boxed{85}

A column line is `x+y=s r` or `x+y+1=s r` (the `+1` is the carry in). `s` is the column sum and
`r` the running result: the sum of the columns done so far, (a mod 10^k) + (b mod 10^k) for the k
lowest columns, written with at least k digits. Each line's r is its s followed by the previous r
without its carry digit, so the last r is the answer and the box copies it. The `verbose` teacher is
correct but restates the problem and checks every line twice.
"""

import random

BUILTIN = "builtin"  # train.py --data default (data.load_problems reads `builtin` and `builtin:OPTS`)
TEACHERS = ("standard", "verbose")


def is_builtin(spec: str) -> bool:
    """Is `--data`/`--benchmarks` the built-in task (`builtin` or `builtin:OPTS`), not a file?"""
    return spec == BUILTIN or spec.startswith(BUILTIN + ":")


def question(a: int, b: int) -> str:
    return f"{a}+{b}=?"


def solve(a: int, b: int, teacher: str = "standard") -> str:
    """The worked column-by-column solution of a+b (format in the module docstring)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
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


def seen_three_digit_pairs() -> list[tuple[int, int]]:
    """The 20,000 three-digit sums the base model is pretrained on, all below 1000 (no fourth digit)."""
    rng, pairs = random.Random(12345), []
    while len(pairs) < 20000:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if a + b < 1000:
            pairs.append((a, b))
    return pairs


def make_pairs(n_train: int = 4000, n_eval: int = 200, seed: int = 0, digits: int = 3
               ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, eval) pairs of `digits`-digit numbers whose total has one digit more.

    With digits=3 (the built-in task) that is a+b >= 1000: the base model has added three-digit
    numbers only when the total stayed below 1000, so these ask for the one step it has never taken.
    Eval is drawn first, so it depends only on (seed, n_eval, digits) and stays the same when n_train
    changes. Neither split holds a sum the base model was pretrained on, and train excludes every
    eval pair and its swap (b+a is the same problem to a learner that has seen a+b).
    """
    lo = 10 ** (digits - 1) if digits > 1 else 0
    span = 10**digits - lo  # how many operands have exactly `digits` digits
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
    return draw(n_train, seen | {(b, a) for a, b in eval_pairs}), eval_pairs


def parse_spec(spec: str) -> dict:
    """`builtin:verbose,digits=3,n_train=N,n_eval=N,seed=N` -> keyword arguments; raises ValueError."""
    kwargs = {}
    for opt in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = opt.partition("=")
        if key == "verbose" and not value:
            kwargs["teacher"] = "verbose"
        elif key in ("digits", "n_train", "n_eval", "seed") and value.isdigit():
            kwargs[key] = int(value)
        else:
            raise ValueError(f"unknown option '{opt}': use verbose, digits=N, n_train=N, n_eval=N, seed=N")
    return kwargs
