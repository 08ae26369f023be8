"""Problems with a gold answer and a teacher solution, from files, the hub or the built-in task.

`load_problems(spec)` reads one of:
  - `builtin`, or `builtin:OPTS`, OPTS comma-separated: a teacher style of task.TEACHERS, `easy=F`,
    `easy_digits=N`, `digits=N`, `n_train=N`, `n_eval=N`, `seed=N`, `val` (task.py's task; split "train" or "eval");
  - a `.jsonl` or `.parquet` file;
  - a hub data set id `owner/name` (needs the `datasets` package).

Two row layouts are accepted, detected from a file's first row:
  - flat: `problem` (text), `answer`, `solution` (optional `data_source`);
  - OpenR1 (OpenR1-Math-46k-8192 as LUFFY uses it): `prompt` (chat messages), `target` (a list
    holding one assistant message: the teacher solution), `reward_model.ground_truth`,
    `data_source`. LUFFY's eval files have the same layout without `target`.
Nested fields may be lists, tuples, numpy arrays or JSON strings.

Bad rows are skipped and counted, never fatal, because one malformed row in 46k should not stop
a run: an empty prompt (`skipped_empty_prompt`), an empty answer (`skipped_missing_answer`), or
no solution when `need_solution` (`skipped_missing_solution`); the first reason found counts.
Problems with the data itself (no such file, bad extension, bad JSON, no usable row) raise
DataError with one line naming the file and row, which train.py prints before exiting.

`encode` tokenizes; it drops (and counts) problems whose prompt or solution exceeds its limit.
"""

import json
import os
import re
from dataclasses import dataclass, field

from lib import task


class DataError(Exception):
    """A problem with the user's data; the message is one line that says what and where."""


@dataclass
class Problem:
    prompt: list[dict]  # chat messages, [{"role": "system"|"user", "content": str}, ...]
    answer: str         # gold final answer, compared by reward.reward
    solution: str       # teacher trajectory; ends in \boxed{...} for verified data ("" if none)
    source: str = ""    # data_source when known


@dataclass
class Encoded:
    prompt_ids: list[int]    # the rendered prompt (render_prompt), no special tokens added
    solution_ids: list[int]  # the teacher trajectory followed by EOS: EOS is part of tau_*
    answer: str
    solution: str
    problem: Problem = field(repr=False)


# The fields each layout needs, the solution's last (eval files may lack it).
FIELDS = {"flat": ("problem", "answer", "solution"),
          "openr1": ("prompt", "reward_model.ground_truth", "target")}

# ----------------------------------------------------------------------------
# Field normalisation: every layout seen in the wild becomes str or list[dict].


def one_line(err: Exception) -> str:
    """An exception as one line for a user: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _unpack(x):
    """numpy arrays -> lists, JSON strings of lists/objects -> Python values, else unchanged."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, str) and x.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(x)
        except json.JSONDecodeError:
            pass  # text that merely starts with a bracket
    return x


def _text(x, strip: bool = True) -> str:
    """A scalar (answer, solution) as text; a one-element list is its element.

    Never parsed as JSON: "[0, 1]" is an answer (an interval), not a list.
    """
    if hasattr(x, "tolist") and not isinstance(x, str):
        x = x.tolist()  # numpy scalars and arrays
    if isinstance(x, (list, tuple)) and len(x) == 1:
        x = x[0]
    if x is None or isinstance(x, (list, tuple, dict)):
        return ""
    return str(x).strip() if strip else str(x)


def _messages(x) -> list[dict]:
    """Chat messages as [{"role", "content"}]; a string that is not JSON messages is one user
    message."""
    parsed = _unpack(x)
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not any(isinstance(m, dict) for m in parsed):
        parsed = [{"role": "user", "content": x}] if isinstance(x, str) else []
    msgs = [{"role": str(m.get("role") or "user"), "content": str(m.get("content") or "")}
            for m in parsed if isinstance(m, dict)]
    return msgs if any(m["content"].strip() for m in msgs) else []


def _detect(row: dict, where: str) -> str:
    if "problem" in row:
        return "flat"
    if "prompt" in row and ("reward_model" in row or "target" in row):
        return "openr1"
    raise DataError(f"{where}: the first row has fields {sorted(row)}; expected "
                    f"{list(FIELDS['flat'])} or the OpenR1 layout {list(FIELDS['openr1'])}")


def _row_to_problem(row: dict, schema: str, need_solution: bool) -> Problem | str:
    """The Problem in `row`, or the name of the stats counter that says why it was skipped."""
    # The solution keeps its exact text: it is the teacher trajectory the policy is trained on.
    if schema == "flat":
        prompt, answer = _messages(row.get("problem")), _text(row.get("answer"))
        solution = _text(row.get("solution"), strip=False)
    else:
        prompt = _messages(row.get("prompt"))
        reward_model = _unpack(row.get("reward_model"))
        answer = _text(reward_model.get("ground_truth")) if isinstance(reward_model, dict) else ""
        target = _messages(row.get("target"))  # [the one assistant message]
        solution = target[0]["content"] if target else ""
    if not any(m["content"].strip() for m in prompt if m["role"] != "system"):
        return "skipped_empty_prompt"  # a system prompt alone has no problem in it
    if not answer:
        return "skipped_missing_answer"
    if need_solution and not solution.strip():
        return "skipped_missing_solution"
    return Problem(prompt=prompt, answer=answer, solution=solution,
                   source=_text(row.get("data_source")))


def _collect(rows, where: str, unit: str, need_solution: bool) -> tuple[list[Problem], dict]:
    """Turn an iterator of row dicts into Problems plus stats; `unit` is "line" or "row"."""
    stats = {"rows": 0, "kept": 0, "skipped_empty_prompt": 0, "skipped_missing_answer": 0,
             "skipped_missing_solution": 0}
    problems, schema, first = [], None, None
    for n, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: {unit} {n} is a {type(row).__name__}, expected an object")
        if schema is None:
            schema, first = _detect(row, where), row
        stats["rows"] += 1
        p = _row_to_problem(row, schema, need_solution)
        if isinstance(p, str):
            stats[p] += 1
        else:
            problems.append(p)
    if schema is None:
        raise DataError(f"{where}: no rows")
    stats["kept"], stats["schema"] = len(problems), schema
    if not problems:
        needed = list(FIELDS[schema][:3 if need_solution else 2])
        skipped = ", ".join(f"{v} {k}" for k, v in stats.items() if k.startswith("skipped") and v)
        raise DataError(f"{where}: no usable row of {stats['rows']} ({skipped}); the {schema} "
                        f"layout needs non-empty {needed}, {unit} 1 has fields {sorted(first)}")
    return problems, stats


# ----------------------------------------------------------------------------
# Readers: each yields (row number, row dict) from 1.


def _jsonl_rows(path: str):
    # Bytes, decoded line by line, so a bad byte is reported at its own line number.
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    yield n, json.loads(line)
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {n} is not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno})") \
                    from None


def _parquet_rows(path: str):
    try:
        import pyarrow.parquet as pq  # lazily: only parquet users need it
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        # Batches, not the whole table: the 46k-row OpenR1 file is large once in Python objects.
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except Exception as e:  # pyarrow's errors have no common public base class
        raise DataError(f"{path}: cannot read as parquet ({one_line(e)})") from None


def _hub_rows(name: str, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the hub data set '{name}' needs the datasets package: "
                        "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing split, unknown id: all one line for the user
        raise DataError(f"cannot load hub data set '{name}' split '{split}' ({one_line(e)})") \
            from None
    yield from enumerate(ds, 1)


def builtin_task(n_train: int = 4000, n_eval: int = 200, seed: int = 0, digits: int = 3,
                 teacher: str = "standard", easy: float = 0.0, easy_digits: int = 0, val: bool = False
                 ) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) Problems of the built-in addition task (task.py); deterministic given the seed."""
    def problem(a, b):
        return Problem(prompt=[{"role": "user", "content": task.question(a, b)}], answer=str(a + b),
                       solution=task.solve(a, b, teacher), source=task.BUILTIN)
    if teacher not in task.TEACHERS:
        raise ValueError(f"teacher must be one of {task.TEACHERS}, got {teacher!r}")
    train, evaluation = task.make_pairs(n_train, n_eval, seed, digits, easy, easy_digits, val)
    return [problem(a, b) for a, b in train], [problem(a, b) for a, b in evaluation]


def _builtin(spec: str, split: str) -> tuple[list[Problem], dict]:
    if split not in ("train", "eval"):
        raise DataError(f"the built-in task has splits 'train' and 'eval', not '{split}'")
    try:
        train, evaluation = builtin_task(**task.parse_spec(spec))
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from None
    problems = train if split == "train" else evaluation
    return problems, {"rows": len(problems), "kept": len(problems), "skipped_empty_prompt": 0,
                      "skipped_missing_answer": 0, "skipped_missing_solution": 0,
                      "schema": "builtin"}


def load_problems(spec: str, split: str = "train", need_solution: bool = True
                  ) -> tuple[list[Problem], dict]:
    """Problems and stats from `spec` (see the module docstring). Raises DataError."""
    if task.is_builtin(spec):
        return _builtin(spec, split)
    ext = os.path.splitext(spec)[1].lower()
    if os.path.isfile(spec):
        if ext == ".jsonl":
            return _collect(_jsonl_rows(spec), spec, "line", need_solution)
        if ext == ".parquet":
            return _collect(_parquet_rows(spec), spec, "row", need_solution)
        raise DataError(f"{spec}: unknown extension '{ext}', expected .jsonl or .parquet")
    if os.path.exists(spec):
        raise DataError(f"{spec} is not a file")
    if ext not in (".jsonl", ".parquet", ".json") and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return _collect(_hub_rows(spec, split), f"hub data set '{spec}'", "row", need_solution)
    raise DataError(f"no such file: {spec}")


# ----------------------------------------------------------------------------
# From messages to token ids


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The exact text the policy is conditioned on.

    With a chat template (the Qwen models) it is applied with the generation prompt; without one
    (the tiny model's tokenizer) the contents are joined by newlines, in order: system, then user.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def encode(tokenizer, problems: list[Problem], max_prompt_tokens: int | None,
           max_solution_tokens: int | None) -> tuple[list[Encoded], dict]:
    """Token ids for each problem; limits of None mean no limit.

    A problem whose prompt, or whose solution plus EOS, is longer than its limit is dropped and
    counted (`dropped_long_prompt`, checked first, then `dropped_long_solution`) rather than
    truncated: a truncated teacher would lose its boxed answer. If every problem is dropped, a
    DataError says which limit to raise.
    """
    prompts = [render_prompt(tokenizer, p.prompt) for p in problems]
    # add_special_tokens=False: a chat template already wrote its special tokens as text.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if problems else []
    solution_ids = tokenizer([p.solution for p in problems],
                             add_special_tokens=False)["input_ids"] if problems else []
    stats = {"problems": len(problems), "kept": 0, "dropped_long_prompt": 0,
             "dropped_long_solution": 0, "longest_prompt": 0, "longest_solution": 0}
    out = []
    for p, pid, sid in zip(problems, prompt_ids, solution_ids):
        sid = sid + [tokenizer.eos_token_id]
        stats["longest_prompt"] = max(stats["longest_prompt"], len(pid))
        stats["longest_solution"] = max(stats["longest_solution"], len(sid))
        if max_prompt_tokens is not None and len(pid) > max_prompt_tokens:
            stats["dropped_long_prompt"] += 1
        elif max_solution_tokens is not None and len(sid) > max_solution_tokens:
            stats["dropped_long_solution"] += 1
        else:
            out.append(Encoded(pid, sid, p.answer, p.solution, p))
    stats["kept"] = len(out)
    if problems and not out:
        raise DataError(
            f"all {len(problems)} problems were dropped as too long: "
            f"{stats['dropped_long_prompt']} prompts over max_prompt_tokens={max_prompt_tokens} "
            f"(longest {stats['longest_prompt']}), {stats['dropped_long_solution']} solutions "
            f"over max_solution_tokens={max_solution_tokens} (longest {stats['longest_solution']}"
            " with EOS); raise the limit")
    return out, stats


# ----------------------------------------------------------------------------
# What train.py trains on


def training_set(spec, eval_spec, tokenizer, max_prompt_tokens, max_solution_tokens, eval_problems, score):
    """(encoded train problems, each teacher's own reward, held-out problems, stats) for train.py.
    Each teacher is scored once here by `score` (Eq. 4's reward): one that fails is never injected.
    score None: no teacher is scored (teacher rewards None), as on the ranks that take rank 0's.
    The held-out set defaults to the built-in task's eval split when training on the built-in task."""
    train, stats = load_problems(spec, "train")
    held_spec = eval_spec or (spec if task.is_builtin(spec) else "")
    split = "eval" if task.is_builtin(held_spec) else "test"  # a hub benchmark's (MATH-500 has only "test")
    held = load_problems(held_spec, split, need_solution=False)[0] if held_spec else []
    enc, enc_stats = encode(tokenizer, train, max_prompt_tokens, max_solution_tokens)
    teacher_ok = [score(e.solution, e.answer) for e in enc] if score else None
    stats = {**stats, **enc_stats, "teacher_unverified": sum(r < 0.5 for r in teacher_ok) if score else None}
    return enc, teacher_ok, held[:eval_problems or None], stats


def batch_indices(n_problems, cursor, size, seed):
    """Indices of the next `size` problems: a fresh permutation each epoch, position = cursor."""
    import torch
    orders, out = {}, []  # one permutation per epoch the batch touches, not one per index
    for c in range(cursor, cursor + size):
        epoch, i = divmod(c, n_problems)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n_problems, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(int(orders[epoch][i]))
    return out
