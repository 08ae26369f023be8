"""Tier 1: the built-in world and the data loaders. The task (task.py) and its hygiene, the tiny
tokenizer and model (tiny.py), the shipped base model against its build record, and both file
layouts with bad rows mixed in (data.py)."""

import json
import re
import sys

import pytest
import torch

from lib import data
from lib import task
from lib import tiny
from lib.data import DataError, Problem, builtin_task, encode, load_problems, render_prompt
from reward import reward

def _last_boxed(text):
    """Contents of the last \\boxed{...} (no nested braces needed for these tests), or None."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1] if found else None


# ----------------------------------------------------------------------------
# tiny.py: the tokenizer and the model


def test_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer
    tok = tiny.make_tokenizer()
    text = "47+38=?\n7+8=15 15\n4+3+1=8 85\n\\boxed{85}  Ab{[(|^_<>'\"!?;:)]}~`#$%&@"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and len(tok) == 257
    assert tok.chat_template is None
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "é"  # bytes: nothing is lost
    # A checkpoint directory also holds the model's config.json, and transformers then loads the
    # tokenizer through the model type's class (Qwen2Tokenizer): the ids must not change.
    tok.save_pretrained(tmp_path)
    tiny.make_model(tok).config.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]  # no special tokens added either
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == \
        (tok.eos_token_id, tok.pad_token_id, len(tok))
    assert loaded.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_model_save_load_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    tok = tiny.make_tokenizer()
    model = tiny.make_model(tok).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    x = torch.tensor([tok("12+34=?\n", add_special_tokens=False)["input_ids"]])  # [1, T]
    with torch.no_grad():
        logits = model(x).logits  # [1, T, V]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)
    # Seeded: the same seed gives the same weights, another seed different ones.
    with torch.no_grad():
        assert torch.equal(tiny.make_model(tok, seed=0)(x).logits, logits)
        assert not torch.equal(tiny.make_model(tok, seed=1)(x).logits, logits)
    assert tiny.make_model(tok, num_hidden_layers=1).config.num_hidden_layers == 1


def test_task_disjoint_verified_deterministic():
    train, evaluation = builtin_task(n_train=3000, n_eval=300, seed=0, digits=2)
    assert len(train) == 3000 and len(evaluation) == 300
    pair = lambda p: tuple(map(int, p.prompt[-1]["content"].rstrip("=?").split("+")))
    train_pairs = {pair(p) for p in train}
    eval_pairs = {pair(p) for p in evaluation}
    assert len(train_pairs) == 3000 and len(eval_pairs) == 300
    assert not train_pairs & eval_pairs
    assert not train_pairs & {(b, a) for a, b in eval_pairs}  # nor the swapped problem
    for p in train + evaluation:
        a, b = pair(p)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert p.answer == str(a + b) == _last_boxed(p.solution)
        assert p.solution.endswith("\\boxed{%s}" % p.answer) and len(p.solution) < 40
    again = builtin_task(n_train=3000, n_eval=300, seed=0, digits=2)
    assert again == (train, evaluation)
    assert builtin_task(n_train=3000, n_eval=300, seed=1, digits=2)[1] != evaluation
    assert builtin_task(n_train=10, n_eval=300, seed=0, digits=2)[1] == evaluation  # eval fixed by seed


@pytest.mark.slow
def test_task_never_asks_what_the_base_model_was_pretrained_on():
    tok = tiny.make_tokenizer()
    two, three = tiny.pretraining_corpus(tok)
    seen = task.seen_three_digit_pairs()
    assert len(two) == 100 * 100 and len(three) == len(seen) == 20000
    assert all(100 <= a <= 999 and 100 <= b <= 999 and a + b < 1000 for a, b in seen)
    assert tok.decode(three[0][0]) == "%d+%d=?" % seen[0]  # the rows are those sums
    pair = lambda p: tuple(map(int, p.prompt[-1]["content"].rstrip("=?").split("+")))
    train, evaluation = builtin_task(n_train=4000, n_eval=200)
    asked = {pair(p) for p in train + evaluation}
    assert len(asked) == 4200 and all(a + b >= 1000 for a, b in asked)  # a fourth digit, every time
    assert not asked & ({*seen} | {(b, a) for a, b in seen})


def test_task_format_and_variants():
    assert task.solve(47, 38) == "7+8=15 15\n4+3+1=8 85\n\\boxed{85}"
    assert task.solve(67, 58) == "7+8=15 15\n6+5+1=12 125\n\\boxed{125}"
    assert task.solve(103, 201) == "3+1=4 4\n0+0=0 04\n1+2=3 304\n\\boxed{304}"
    verbose = task.solve(47, 38, teacher="verbose")
    assert _last_boxed(verbose) == "85" and verbose.count("\\boxed") == 1
    assert len(verbose) > 2 * len(task.solve(47, 38))
    train, evaluation = builtin_task(n_train=50, n_eval=20, digits=3, teacher="verbose")
    for p in train + evaluation:
        assert _last_boxed(p.solution) == p.answer and p.solution.startswith("We add")
    with pytest.raises(ValueError):
        builtin_task(n_train=100, n_eval=10, digits=1)  # only 100 one-digit problems


# ----------------------------------------------------------------------------
# data.py: fixtures with bad rows mixed in


FIXTURE_SYSTEM = "Think in <think></think>, then put the answer in \\boxed{}."


def _openr1_rows():
    good = lambda q, a: {
        "prompt": [{"role": "system", "content": FIXTURE_SYSTEM}, {"role": "user", "content": q}],
        "target": [{"role": "assistant", "content": f"<think>\n{q}\n</think>\n\\boxed{{{a}}}"}],
        "reward_model": {"ground_truth": a, "style": "rule"},
        "data_source": "openr1"}
    rows = [good("1+1?", "2"), good("2+2?", "4"), good("Interval?", "[0, 1]")]
    rows.append({**good("3+3?", "6"), "reward_model": {"ground_truth": "", "style": "rule"}})
    rows.append({**good("4+4?", "8"), "target": [{"role": "assistant", "content": ""}]})
    rows.append({**good("5+5?", "10"), "prompt": [{"role": "system", "content": FIXTURE_SYSTEM}]})
    return rows  # 3 good, then: missing answer, missing solution, empty prompt


def _flat_rows():
    return [{"problem": "What is 2+3?", "answer": "5", "solution": "2+3=5 \\boxed{5}"},
            {"problem": "What is 2+4?", "answer": "6", "solution": "\\boxed{6}"},
            {"problem": "What is 2+5?", "answer": None, "solution": "\\boxed{7}"},
            {"problem": "What is 2+6?", "answer": "8"},
            {"problem": "  ", "answer": "9", "solution": "\\boxed{9}"}]


def _write_fixture(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_load_openr1(tmp_path, ext):
    problems, stats = load_problems(_write_fixture(tmp_path, f"train.{ext}", _openr1_rows()))
    assert (stats["rows"], stats["kept"], stats["schema"]) == (6, 3, "openr1")
    assert stats["skipped_missing_answer"] == stats["skipped_missing_solution"] == \
        stats["skipped_empty_prompt"] == 1
    p = problems[0]
    assert p.prompt == [{"role": "system", "content": FIXTURE_SYSTEM},
                        {"role": "user", "content": "1+1?"}]
    assert (p.answer, p.source) == ("2", "openr1")
    assert p.solution.startswith("<think>\n") and _last_boxed(p.solution) == "2"
    assert problems[2].answer == "[0, 1]"  # a bracketed answer stays text
    # Eval files have no teacher: the missing-solution row is kept, solution "".
    problems, stats = load_problems(_write_fixture(tmp_path, f"eval.{ext}", _openr1_rows()),
                                    need_solution=False)
    assert stats["kept"] == 4 and problems[3].solution == ""


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_load_flat(tmp_path, ext):
    problems, stats = load_problems(_write_fixture(tmp_path, f"math.{ext}", _flat_rows()))
    assert (stats["rows"], stats["kept"], stats["schema"]) == (5, 2, "flat")
    assert stats["skipped_missing_answer"] == stats["skipped_missing_solution"] == \
        stats["skipped_empty_prompt"] == 1
    assert problems[0] == Problem([{"role": "user", "content": "What is 2+3?"}], "5",
                                  "2+3=5 \\boxed{5}", "")
    path = _write_fixture(tmp_path, f"e.{ext}", _flat_rows())
    assert load_problems(path, need_solution=False)[1]["kept"] == 3


def test_load_json_strings_and_arrays(tmp_path):
    # Some exports store nested columns as JSON strings (or numpy arrays, via pandas).
    import numpy as np
    row = _openr1_rows()[0]
    row = {k: json.dumps(v) if k != "data_source" else v for k, v in row.items()}
    problems, _ = load_problems(_write_fixture(tmp_path, "s.jsonl", [row]))
    assert problems[0].answer == "2" and len(problems[0].prompt) == 2
    flat = {"problem": "2+4?", "answer": 6, "solution": "\\boxed{6}"}
    problems, _ = load_problems(_write_fixture(tmp_path, "n.jsonl", [flat]))
    assert problems[0].answer == "6"  # numbers become text
    arr = np.empty(1, dtype=object)
    arr[0] = {"role": "assistant", "content": "\\boxed{2}"}
    assert data._row_to_problem({**_openr1_rows()[0], "target": arr}, "openr1", True).solution \
        == "\\boxed{2}"


def _load_error(spec, **kw):
    with pytest.raises(DataError) as e:
        load_problems(spec, **kw)
    msg = str(e.value)
    assert "\n" not in msg  # one line, and no chained traceback from pyarrow or json:
    assert e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__
    return msg


def test_load_errors(tmp_path):
    bad = _openr1_rows()[3:]
    for ext in ("jsonl", "parquet"):
        path = _write_fixture(tmp_path, f"bad.{ext}", bad)
        msg = _load_error(path)
        assert path in msg and "no usable row" in msg and "reward_model.ground_truth" in msg
        assert "data_source" in msg  # the fields found in the first row
    msg = _load_error(str(tmp_path / "missing.jsonl"))
    assert "no such file" in msg and "missing.jsonl" in msg
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_flat_rows()[0]) + "\n\n{not json\n")
    msg = _load_error(str(path))
    assert "line 3" in msg and "not valid JSON" in msg and "broken.jsonl" in msg
    (tmp_path / "latin1.jsonl").write_bytes(b'{"problem": "x"}\n{"problem": "\xe9"}\n')
    assert "line 2 is not UTF-8" in _load_error(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "rows.csv").write_text("problem,answer\n")
    assert "unknown extension '.csv'" in _load_error(str(tmp_path / "rows.csv"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    assert "junk.parquet" in _load_error(str(tmp_path / "junk.parquet"))
    msg = _load_error(_write_fixture(tmp_path, "odd.jsonl", [{"question": "q", "label": "a"}]))
    assert "label" in msg and "question" in msg and "problem" in msg
    (tmp_path / "empty.jsonl").write_text("")
    assert "no rows" in _load_error(str(tmp_path / "empty.jsonl"))
    assert "unknown option" in _load_error("builtin:digits=x")
    assert "'eval'" in _load_error("builtin", split="test")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = _write_fixture(tmp_path, "t.parquet", _flat_rows())
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    assert _load_error(path) == f"reading {path} needs pyarrow: pip install pyarrow"


def test_hub_id(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    msg = _load_error("Elliott/Openr1-Math-46k-8192")
    assert msg == ("reading the hub data set 'Elliott/Openr1-Math-46k-8192' needs the datasets "
                   "package: pip install datasets")

    class FakeDatasets:  # the same rows through the hub path, without the network
        @staticmethod
        def load_dataset(name, split):
            if split != "train":
                raise ValueError(f"Unknown split \"{split}\".\nShould be one of ['train'].")
            return _openr1_rows()
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    problems, stats = load_problems("owner/name")
    assert stats["kept"] == 3 and problems[0].answer == "2"
    assert "Unknown split" in _load_error("owner/name", split="test")


def test_builtin_spec():
    problems, stats = load_problems(task.BUILTIN)
    train, evaluation = builtin_task()
    assert problems == train and stats["kept"] == len(train) and stats["schema"] == "builtin"
    assert load_problems("builtin", split="eval")[0] == evaluation
    problems, _ = load_problems("builtin:verbose,digits=3,n_train=20,n_eval=5,seed=2", "eval")
    assert problems == builtin_task(n_train=20, n_eval=5, seed=2, digits=3,
                                      teacher="verbose")[1]


@pytest.mark.parametrize("easy", [0.0, 0.5])
def test_builtin_validation_split_is_disjoint_and_leaves_the_task_alone(easy):
    """`builtin:val`: settings are chosen on pairs that neither the reported held-out set nor train holds."""
    swaps = lambda pairs: {p for a, b in pairs for p in ((a, b), (b, a))}
    train, evaluation = task.make_pairs(300, 40, 0, 3, easy)
    same_train, val = task.make_pairs(300, 40, 0, 3, easy, val=True)
    assert same_train == train and len(val) == 40 and not swaps(val) & swaps(train + evaluation)
    assert sum(a + b >= 1000 for a, b in val) == sum(a + b >= 1000 for a, b in evaluation)  # the same mix
    assert load_problems("builtin:n_train=300,n_eval=40,val", "eval")[0] == \
        builtin_task(n_train=300, n_eval=40, val=True)[1]


# ----------------------------------------------------------------------------
# render_prompt and encode


def test_render_prompt():
    tok = tiny.make_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2=?"}]
    assert render_prompt(tok, msgs) == "Be brief.\n1+2=?"
    assert render_prompt(tok, msgs[1:]) == "1+2=?"
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render_prompt(tok, msgs) == "<system>Be brief.\n<user>1+2=?\n<assistant>"


def test_encode_drops_and_counts():
    tok = tiny.make_tokenizer()
    eos = tok.eos_token_id
    problems = [Problem([{"role": "user", "content": "1+2=?"}], "3", "\\boxed{3}"),
                Problem([{"role": "user", "content": "11+22=?"}], "33", "\\boxed{33}"),
                Problem([{"role": "user", "content": "1+1=?"}], "2", "1+1=2 2\n\\boxed{2}")]
    encoded, stats = encode(tok, problems, max_prompt_tokens=5, max_solution_tokens=10)
    assert [e.answer for e in encoded] == ["3"]
    assert stats["kept"] == stats["dropped_long_prompt"] == stats["dropped_long_solution"] == 1
    e = encoded[0]
    assert tok.decode(e.prompt_ids) == "1+2=?" and e.problem is problems[0]
    assert e.solution_ids[-1] == eos and tok.decode(e.solution_ids[:-1]) == "\\boxed{3}"
    assert len(e.solution_ids) == 10  # 9 characters + EOS: exactly at the limit is kept
    assert encode(tok, problems, None, None)[1]["kept"] == 3
    with pytest.raises(DataError, match="max_solution_tokens=3"):
        encode(tok, problems, max_prompt_tokens=100, max_solution_tokens=3)
    with pytest.raises(DataError, match="max_prompt_tokens=2"):
        encode(tok, problems, max_prompt_tokens=2, max_solution_tokens=100)


def test_teachers_pass_the_reward():
    """The teachers SSI injects must verify, or HAPO would have nothing to anchor on."""
    train, evaluation = builtin_task(n_train=30, n_eval=10, digits=3)
    verbose, _ = builtin_task(n_train=30, n_eval=10, teacher="verbose")
    for p in train + evaluation + verbose:
        assert reward(p.solution, p.answer) == 1.0
        assert reward(task.solve(1, 1), p.answer) == 0.0


# ----------------------------------------------------------------------------
# the shipped base model (tiny_base/) and its build


def _shipped():
    from lib.models import load_model, resolve_model
    record = json.load(open(f"{tiny.SHIPPED}/build.json"))
    return (*load_model(resolve_model("tiny"), dtype=torch.float32), record)


def test_shipped_base_model_is_what_its_build_recorded():
    model, tok, record = _shipped()
    assert record["recipe"] == tiny.RECIPE and len(record["losses"]) == tiny.RECIPE["steps"]
    assert tiny.weights_sha256(model) == record["sha256"]  # the weights are the build's
    assert tok("47+38=?", add_special_tokens=False)["input_ids"] == \
        tiny.make_tokenizer()("47+38=?", add_special_tokens=False)["input_ids"]
    assert record["losses"][-1] < 0.1 * record["losses"][0]


def test_shipped_base_model_adds_but_never_carries_into_a_fourth_column():
    """What the built-in task relies on: the base model has the format and the skills, not the step."""
    from rollout import HFEngine
    model, tok, _ = _shipped()
    seen = [(a, b) for a, b in task.seen_three_digit_pairs()[:12]] + [(47, 38), (9, 90), (55, 45), (12, 3)]
    asked = task.make_pairs(n_train=1, n_eval=16)[1]
    engine = HFEngine(model, tok)
    out = {}
    for name, pairs in (("seen", seen), ("asked", asked)):
        ids = [tok(task.question(a, b), add_special_tokens=False)["input_ids"] for a, b in pairs]
        texts = tok.batch_decode(engine.generate(ids, 1, 60, 0.0), skip_special_tokens=True)
        out[name] = sum(reward(t, str(a + b)) for t, (a, b) in zip(texts, pairs))
    assert out == {"seen": len(seen), "asked": 0}


@pytest.mark.slow
def test_rebuild_replays_the_recorded_losses():
    """The build is deterministic: its first steps give the losses build.json recorded, so the
    shipped weights are what `python -m lib.tiny` makes. HAPO_FULL_REBUILD=1 replays all 3,000 steps
    (about 10 minutes) and compares the weights themselves."""
    import os
    record = json.load(open(f"{tiny.SHIPPED}/build.json"))
    full = bool(os.environ.get("HAPO_FULL_REBUILD"))
    model, losses = tiny.build(stop=None if full else 40, progress=False)
    assert losses == pytest.approx(record["losses"][:len(losses)], rel=1e-4)
    if full:
        assert tiny.weights_sha256(model) == record["sha256"]
