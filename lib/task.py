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
without its carry digit, so the last r is the answer and the box copies it.

Variants (`builtin:OPTS`, parse_spec), made to test Theorem 4.2 (docs/EVIDENCE.md). Teachers, all
correct and verified, in solve(): `verbose` restates the problem and checks every line (3.3x as
long); `wordy` puts a restatement before the column lines and a summary after them (2.2x); `tail`
keeps the lines and adds a summary between them and the box (2.2x); `recap` is the standard solution,
box included, followed by a recap (2.2x): the only one whose opening is exactly what the policy must
write to succeed. Prompts: `easy=F` mixes in a share F of sums the base model solves, three-digit sums
below 1000 it was not pretrained on, or with `easy_digits=2` two-digit sums (all pretrained on).
"""

import random

BUILTIN = "builtin"  # train.py --data default (data.load_problems reads `builtin` and `builtin:OPTS`)
TEACHERS = ("standard", "verbose", "wordy", "tail", "recap")  # solve()'s solution styles, all correct


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
    recap = [f"so {a}+{b}={a + b}", f"and {b}+{a}={a + b}", f"so the answer is {a + b}"]  # tail's and recap's
    if teacher == "verbose":
        # Same arithmetic, needlessly long: a restatement, every line checked, a closing summary.
        lines = [f"We add {a} and {b} column by column."] + \
                [ln for line in lines for ln in (line, f"check: {line}")] + \
                [f"so {a}+{b}={a + b}"]
    elif teacher == "tail":
        # The policy's own column lines, word for word, then a restatement before the box: the
        # missing step is shown exactly where the policy writes it, and the rest is only longer.
        lines = lines + recap
    elif teacher == "recap":
        # The standard solution, box included, then a recap after the answer: exactly what the policy
        # would need to write to succeed, followed by text that changes nothing but the length.
        return "\n".join(lines + [f"\\boxed{{{a + b}}}"] + recap)
    elif teacher == "wordy":
        # The policy's own column lines, untouched and in one block, between a restatement and a
        # summary: longer for nothing, without changing the procedure the policy runs.
        lines = [f"We add {a} and {b} column by column."] + lines + [f"so {a}+{b}={a + b}"]
    return "\n".join(lines + [f"\\boxed{{{a + b}}}"])


def seen_three_digit_pairs() -> list[tuple[int, int]]:
    """The 20,000 three-digit sums the base model is pretrained on, all below 1000 (no fourth digit)."""
    rng, pairs = random.Random(12345), []
    while len(pairs) < 20000:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if a + b < 1000:
            pairs.append((a, b))
    return pairs


def _drawer(rng: random.Random, digits: int, carry_out, excluded: set):
    """draw(n, also_excluded) -> n new `digits`-digit pairs with (carry_out True) or without (False) a
    carry out of the top column, or either (None), by rejection from `rng`; never the same pair twice,
    nor one in `excluded`."""
    lo = 10 ** (digits - 1) if digits > 1 else 0
    span = 10**digits - lo  # how many operands have exactly `digits` digits
    total, tried = span * span, set()

    def draw(n, also_excluded=frozenset()):
        out = []
        while len(out) < n and len(tried) < total:
            i = rng.randrange(total)  # indices, not pairs: digits=6 is fine too
            if i not in tried:
                tried.add(i)
                a, b = lo + i // span, lo + i % span
                fresh = (a, b) not in excluded and (a, b) not in also_excluded  # not `excluded | also`: a copy per draw
                if carry_out in (None, a + b >= 10**digits) and fresh:
                    out.append((a, b))
        if len(out) < n:
            raise ValueError(f"too few {digits}-digit sums of this kind for {n} more (held out with their swaps)")
        return out
    return draw


def make_pairs(n_train: int = 4000, n_eval: int = 200, seed: int = 0, digits: int = 3, easy: float = 0.0,
               easy_digits: int = 0, val: bool = False) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, eval) pairs of `digits`-digit numbers: hard ones, whose total has one digit more, and a
    share `easy` of easy ones, whose total does not.

    With digits=3 (the built-in task) hard is a+b >= 1000: the base model has added three-digit
    numbers only when the total stayed below 1000, so these ask for the one step it has never taken
    (it solves none). Easy is a three-digit sum below 1000 that it was not pretrained on: the kind it
    has seen, which it solves every time; with `easy_digits=2` it is a two-digit sum instead (any, all
    pretrained on). A mix (`easy=0.5`) lets a policy succeed on its own on part of the prompts from the
    first step, so HAPO's gate can close there (docs/EVIDENCE.md).

    Each kind has its own random stream and its eval pairs are drawn first, n_eval of each kind; a mix
    holds out the first round(n_eval * easy) easy and the rest hard ones. So easy=0 is the original
    task pair for pair, easy=0 and easy=1 hold out the hard and easy pairs a mix is evaluated on (and
    more), and eval depends only on (seed, n_eval, digits, easy). Neither split holds a sum the base
    model was pretrained on, and train excludes every held-out pair of either kind and its swap (b+a
    is the same problem to a learner that has seen a+b). The mix's order is shuffled, seeded.

    `val` returns a validation split in place of eval: as many pairs of each kind, drawn after train
    (which stays pair for pair the same), so disjoint from both, swaps included. Settings chosen on
    it have never seen the reported held-out set.
    """
    if not 0.0 <= easy <= 1.0:
        raise ValueError(f"easy must be a share in [0, 1], got {easy}")
    seen = {p for a, b in seen_three_digit_pairs() if digits == 3 for p in ((a, b), (b, a))}
    n_easy_eval, n_easy_train = round(n_eval * easy), round(n_train * easy)
    train, evaluation = [], []
    for carry_out, n_ev, n_tr in ((True, n_eval - n_easy_eval, n_train - n_easy_train),
                                  (False, n_easy_eval, n_easy_train)):
        if carry_out and easy == 1.0 or not carry_out and easy == 0.0:
            continue  # a kind that is not asked for is not drawn
        stream = random.Random(seed) if carry_out else random.Random(f"easy-{seed}")
        if carry_out or easy_digits in (0, digits):
            draw = _drawer(stream, digits, carry_out, seen)
        else:  # easy_digits-digit sums of any total (for 2: every one was pretrained on)
            draw = _drawer(stream, easy_digits, None, set())
        held = draw(n_eval)  # all n_eval, so a mix holds out a prefix of the pure task's eval pairs
        fresh = draw(n_tr, {p for a, b in held for p in ((a, b), (b, a))})
        train += fresh
        if val:
            evaluation += draw(n_ev, {p for a, b in held + fresh for p in ((a, b), (b, a))})
        else:
            evaluation += held[:n_ev]
    if 0.0 < easy < 1.0:  # interleave the kinds, so any prefix of either split is a mix
        random.Random(seed).shuffle(train)
        random.Random(seed + 1).shuffle(evaluation)
    return train, evaluation


def parse_spec(spec: str) -> dict:
    """`builtin:OPTS` -> keyword arguments of data.builtin_task; raises ValueError.

    OPTS, comma-separated: a teacher's name from TEACHERS (also `teacher=NAME`), `easy=F` (the share
    of easy prompts, 0 to 1), `easy_digits=N`, `digits=N`, `n_train=N`, `n_eval=N`, `seed=N`, and
    `val` (the eval split is the validation pairs, make_pairs).
    """
    kwargs = {}
    for opt in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = opt.partition("=")
        if key in TEACHERS and not value:
            kwargs["teacher"] = key
        elif key == "val" and not value:
            kwargs["val"] = True
        elif key == "teacher" and value in TEACHERS:
            kwargs["teacher"] = value
        elif key in ("digits", "n_train", "n_eval", "seed", "easy_digits") and value.isdigit():
            kwargs[key] = int(value)
        elif key == "easy" and _is_share(value):
            kwargs[key] = float(value)
        else:
            raise ValueError(f"unknown option '{opt}': use {', '.join(TEACHERS[1:])}, teacher=NAME, "
                             "easy=F (0 to 1), easy_digits=N, digits=N, n_train=N, n_eval=N, seed=N, val")
    return kwargs


def _is_share(value: str) -> bool:
    try:
        return 0.0 <= float(value) <= 1.0
    except ValueError:
        return False
