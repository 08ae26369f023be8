"""Model families beyond Qwen2, and the rollout-correction modes (issue 23).

Tiny random Qwen3 (tied head, q/k norms), Llama (untied head) and, in the fast tier, Gemma 3 (tied,
scaled embeddings), built here from a config with the built-in byte tokenizer: no download. 2 heads
of 32, which vLLM's CPU attention accepts. Fast tier: the log-probs and their gradients against
autograd through the model's own logits, micro-batches == whole batch, the accessors that replace
Qwen2 attribute paths, each rollout-correction mode against a hand-computed value. Slow tier: two
ranks == one, train.py end to end and resumed. vLLM tier: greedy vLLM == greedy HF before and after a
sync, and train.py on vLLM, for the tied and the untied head.
"""

import math
import os
import sys

import pytest
import torch

import hapo
import update
from loss import correction_weights, hapo_loss, mismatch_stats, rollout_ratio, segment_ids, sequence_logprobs
from tests.helpers import DRIVERS, ROOT, TORCHRUN, TRAIN_SMALL, build_batch, metrics, run
from tests.test_vllm import _greedy_and_gap, _prompts, _vllm_env, needs_vllm, perturb_every_parameter, vllm_test_engine

FAMILIES = {"qwen3": True, "llama": False}  # the family and whether its head is tied


def family_model(family, path=None, seed=0, init=0.02, vocab=None):
    """A 2-layer causal LM of `family` (qwen3, llama, gemma3) in fp32, with the built-in tokenizer;
    saved with it to `path` if given. (model, tokenizer)."""
    import transformers
    from lib import tiny
    tok = tiny.make_tokenizer()
    common = dict(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                  initializer_range=init, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=None)
    if family == "qwen3":
        cfg, cls = transformers.Qwen3Config(tie_word_embeddings=True, **common), transformers.Qwen3ForCausalLM
    elif family == "llama":
        cfg, cls = transformers.LlamaConfig(tie_word_embeddings=False, **common), transformers.LlamaForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(tie_word_embeddings=True, sliding_window=8, **common)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float()
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok


def _groups(vocab, n_groups=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    seq = lambda k: torch.randint(2, vocab, (k,), generator=g).tolist()
    return [hapo.Group(seq(rnd(2, 6)), [seq(rnd(1, 9)) for _ in range(n)],
                       (torch.rand(n, generator=g) < 0.3).float().tolist(), seq(rnd(3, 8)), 1.0)
            for _ in range(n_groups)]


# ----------------------------------------------------------------------------
# fast tier: the model through transformers' accessors


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma3"])
def test_family_logprobs_and_gradients_equal_autograd_on_its_own_logits(family):
    """sequence_logprobs (get_decoder + get_output_embeddings, fused) == log_softmax of the model's own
    forward, values and gradients of every parameter: Gemma's scaled embeddings and Qwen3's q/k norms
    are inside the decoder, Llama's untied head is the one get_output_embeddings returns."""
    model, _ = family_model(family, seed=1, init=0.1)
    model = model.double()
    ids = torch.randint(1, 257, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a padded row
    w = torch.randn(3, 10, dtype=torch.float64) * mask[:, 1:]
    got = sequence_logprobs(model, ids, mask, chunk_size=4)  # [3, 10]
    g_got = torch.autograd.grad((got * w).sum(), list(model.parameters()), allow_unused=True)
    ref = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    g_ref = torch.autograd.grad((ref * w).sum(), list(model.parameters()), allow_unused=True)
    keep = mask[:, 1:].bool()
    assert torch.allclose(got[keep], ref[keep], atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_ref):
        assert (a is None) == (b is None), name
        assert a is None or torch.allclose(a, b, atol=1e-10), name


@pytest.mark.parametrize("family", FAMILIES)
def test_family_micro_batches_equal_whole_batch(family):
    """Eq. 8's global normaliser on Qwen3 and Llama: packed micro-batches under a token budget give the
    whole batch's loss and gradient (the position ids of a packed row reach their attention)."""
    model, _ = family_model(family, seed=1, init=0.1)
    model = model.double()
    batch = build_batch(_groups(257), "hapo", 0.8)
    n_tok = batch.num_tokens()
    whole, _ = hapo.batch_loss(model, batch, "hapo", n_tok)
    ref = torch.autograd.grad(whole, list(model.parameters()))
    cfg = type("Cfg", (), dict(mini_batches=1, micro_batch=5, micro_batch_tokens=40, pack=True))
    micros = update.micro_batches(batch, cfg)[0]
    assert len(micros) >= 3 and all(len(mb) == 1 for mb in micros)
    total, grads = 0.0, [torch.zeros_like(p) for p in model.parameters()]
    for mb in micros:
        part, _ = hapo.batch_loss(model, mb, "hapo", n_tok)
        for acc, g in zip(grads, torch.autograd.grad(part, list(model.parameters()))):
            acc += g
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-9)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(ref, grads))


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma3"])
def test_family_layers_head_and_sync_names_come_from_transformers_accessors(family):
    """FSDP2's per-layer units are the _no_split_modules classes; the weights synced to vLLM are the
    checkpoint's names, the LM head's left out exactly when it is tied."""
    from lib.models import check_family
    from lib.parallel import decoder_layers
    from lib.weight_sync import tied_head_names, weights_for_sync
    model, _ = family_model(family)
    layers = decoder_layers(model)
    assert layers == list(model.get_decoder().layers) and type(layers[0]).__name__ in model._no_split_modules
    tied = model.config.tie_word_embeddings
    assert tied_head_names(model) == ({"lm_head.weight"} if tied else set())
    names = [n for n, _ in weights_for_sync(model)]
    want = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
    assert names == want and ("lm_head.weight" in names) != tied
    check_family(model)  # no soft-cap, no head bias: accepted


def test_family_soft_capped_logits_are_refused_in_one_line():
    """Gemma 2 soft-caps its final logits, which loss.py's fused log-probs would leave out."""
    import transformers
    from lib.data import DataError
    from lib.models import check_family
    cfg = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(DataError, match=r"^Gemma2ForCausalLM soft-caps its logits \(final_logit_softcapping=30.0\)"):
        check_family(transformers.Gemma2ForCausalLM(cfg))
    with pytest.raises(ValueError, match="lists no decoder-layer class"):
        from lib.parallel import decoder_layers
        decoder_layers(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------
# fast tier: rollout correction, each mode against hand-computed values

# one row of 4 response tokens: log pi_old - log pi_sampler = 1, -0.5, 0.2, 0 (pi_old = 0 in log space)
_OLD = torch.zeros(1, 4, dtype=torch.float64)
_SAMPLER = torch.tensor([[-1.0, 0.5, -0.2, 0.0]], dtype=torch.float64)
_MASK = torch.ones(1, 4, dtype=torch.float64)


@pytest.mark.parametrize("level,mode,cap,weights,changed", [
    ("token", "truncate", 2.0, [2.0, math.exp(-0.5), math.exp(0.2), 1.0], [1, 0, 0, 0]),  # e^1 = 2.718 > 2
    ("token", "mask", 2.0, [0.0, math.exp(-0.5), math.exp(0.2), 1.0], [1, 0, 0, 0]),
    ("sequence", "truncate", 2.0, [2.0] * 4, [1, 1, 1, 1]),  # the product e^(1 - 0.5 + 0.2) = 2.014 > 2
    ("sequence", "truncate", 1.5, [1.5] * 4, [1, 1, 1, 1]),
    ("sequence", "mask", 1.5, [0.0] * 4, [1, 1, 1, 1]),
    ("sequence", "mask", 3.0, [math.exp(0.7)] * 4, [0, 0, 0, 0]),
])
def test_rollout_correction_modes_by_hand(level, mode, cap, weights, changed):
    ratio = rollout_ratio(_OLD, _SAMPLER, _MASK, level)
    w, c = correction_weights(ratio, cap, mode)
    assert torch.allclose(w, torch.tensor([weights], dtype=torch.float64), atol=1e-12)
    assert c.long().tolist() == [changed]


def test_rollout_correction_sequence_level_in_a_packed_row_is_per_trajectory():
    """Two trajectories packed in one row (position ids restart at 0): each gets its own product, and
    positions outside the mask (the prompt, the teacher) count as ratio 1."""
    old = torch.zeros(1, 6, dtype=torch.float64)
    sampler = torch.tensor([[5.0, -0.3, -0.4, 7.0, -0.1, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.float64)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])  # [1, 7]: the [1, 6] log-probs of a 7-token row
    seg = segment_ids(mask.shape, position_ids)
    assert seg.tolist() == [[0, 0, 0, 1, 1, 1]]
    ratio = rollout_ratio(old, sampler, mask, "sequence", seg)
    assert torch.allclose(ratio, torch.tensor([[math.exp(0.7)] * 3 + [math.exp(-0.5)] * 3], dtype=torch.float64))


def test_mismatch_metrics_by_hand():
    """log-perplexity difference: per trajectory, the mean over its tokens of log pi_sampler - log pi_old
    (verl's log_ppl_diff), summed with the count of trajectories; k3 KL: r - 1 - log r summed over tokens."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    seg = torch.tensor([[0, 0, 0, 1]])  # two trajectories in a packed row; position 2 is a prompt's
    ppl, n, k3 = mismatch_stats(_OLD, _SAMPLER, mask, seg)
    assert n.item() == 2 and ppl.item() == pytest.approx((-1.0 + 0.5) / 2 + 0.0)
    assert k3.item() == pytest.approx(sum(math.exp(x) - 1 - x for x in [1.0, -0.5, 0.0]))
    ppl, n, _ = mismatch_stats(_OLD, _SAMPLER, _MASK)  # one trajectory a row
    assert n.item() == 1 and ppl.item() == pytest.approx(-0.7 / 4)


def test_rollout_correction_reaches_the_loss_and_the_step_metrics():
    """batch_loss with --is_level sequence --is_mode mask == hapo_loss with the hand-built weights, and
    update.optimize reports the mismatch metrics; off, the plain loss."""
    from lib.parallel import Dist, Policy
    from tests.test_options import _batch, _cfg
    from tests.helpers import tiny_qwen2
    model, batch = tiny_qwen2().double(), _batch()
    n = batch.num_tokens()
    with torch.no_grad():
        logp = sequence_logprobs(model, batch.input_ids, batch.attention_mask)  # [B, L-1]
    on = batch.loss_mask * ~batch.teacher[:, None]  # [B, L-1]
    shift = torch.zeros_like(logp)
    shift[0], shift[1] = 0.3, -0.2  # row 0: ratio e^(0.3 x its tokens) > 1.5; row 1 below
    batch.sampler_logp = (logp - shift) * batch.loss_mask
    got, stats = hapo.batch_loss(model, batch, "hapo", n, is_cap=1.5, is_level="sequence", is_mode="mask")
    seq_ratio = torch.exp((shift * on).sum(dim=1, keepdim=True)).expand_as(logp)  # [B, L-1]
    weights = seq_ratio.masked_fill(seq_ratio > 1.5, 0.0)
    assert (weights[0] == 0).all() and (weights[1] > 0).all()
    want = hapo_loss(logp, logp, batch.advantages, batch.loss_mask, batch.teacher, num_tokens=n, is_weights=weights)
    plain, _ = hapo.batch_loss(model, batch, "hapo", n)
    assert got.item() == pytest.approx(want.item(), rel=1e-9) and got.item() != pytest.approx(plain.item())
    m = update.optimize(Policy(model), torch.optim.SGD(model.parameters(), lr=0.0), batch,
                        _cfg(is_correction=True, is_cap=1.5, is_level="sequence", is_mode="mask"), Dist(), lr=0.0)
    changed = ((seq_ratio > 1.5) * on).sum() / on.sum()
    assert m["train/is_corrected_frac"] == pytest.approx(changed.item()) and 0 < changed < 1
    assert m["train/is_ratio_max"] == pytest.approx(seq_ratio.max().item())
    sampled = on.sum(dim=1) > 0  # the teacher's rows have no on-policy token
    per_row = -(shift * on).sum(dim=1)[sampled] / on.sum(dim=1)[sampled]
    assert m["train/log_ppl_diff"] == pytest.approx(per_row.mean().item()) and (~sampled).any()
    assert m["train/kl_k3"] == pytest.approx(((shift.exp() - 1 - shift) * on).sum().item() / on.sum().item())


# ----------------------------------------------------------------------------
# slow tier: two ranks, train.py, resume


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_family_two_ranks_step_equals_one_process(tmp_path, family):
    """FSDP2 over Qwen3's and Llama's decoder layers (found by _no_split_modules): two ranks == one."""
    import json
    family_model(family, tmp_path / "model")
    driver, settings = os.path.join(DRIVERS, "two_ranks_step.py"), "mini,packed"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, driver, str(one), str(tmp_path / "model"), settings], tmp_path)
    run(TORCHRUN + [driver, str(two), str(tmp_path / "model"), settings], tmp_path)
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert one.keys() == two.keys() == {"mini", "packed"}
    for name in one:
        assert len({r["train/loss"] for r in one[name]}) == 3, name  # the weights moved
        for a, b in zip(one[name], two[name]):
            assert a.keys() == b.keys() and a["train/grad_norm"] > 0
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (family, name, k, a[k], b[k])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_train_py_runs_and_resumes_exactly(tmp_path, family):
    """`python train.py --model <dir> --max_steps 3` on the HF engine, and in process: 3 steps ==
    2 steps, saved, resumed for the third."""
    import train
    model_dir = str(tmp_path / "model")
    family_model(family, model_dir)
    common = TRAIN_SMALL + ["--recipe", "laptop", "--model", model_dir, "--save_every", "2", "--eval_every", "3", "--eval_problems", "4"]
    out = str(tmp_path / "cli")
    r = run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--max_steps", "3", "--out_dir", out])
    assert "rollout engine: hf" in r.stdout
    rows = metrics(out)
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and all(row["train/grad_norm"] > 0 for row in rows[1:])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(common + ["--max_steps", "3", "--out_dir", a])
    train.main(common + ["--max_steps", "2", "--out_dir", b])
    train.main(common + ["--max_steps", "3", "--out_dir", b, "--resume"])
    ma, mb = metrics(a), metrics(b)
    assert [row["step"] for row in mb] == [0, 1, 2, 3]
    for ra, rb in zip(ma, mb):
        for k in ra.keys() & rb.keys():
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (family, ra["step"], k)


# ----------------------------------------------------------------------------
# vLLM tier (vLLM's CPU build): one engine per family for the greedy checks


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_engine(request, tmp_path_factory):
    """(family, model, tok, engine): a saved tiny model of the family and a vLLM engine on it."""
    path = tmp_path_factory.mktemp(request.param)
    model, tok = family_model(request.param, path, init=0.2)
    return request.param, model.eval(), tok, vllm_test_engine(path, tok)


@needs_vllm
def test_family_vllm_greedy_matches_hf_before_and_after_sync(family_engine):
    """Qwen3 (tied head: vllm_engine re-processes it after the reload) and Llama (untied: lm_head.weight
    is pushed): vLLM's greedy tokens == an argmax loop over the HF model's forwards, and log-probs agree."""
    family, model, tok, engine = family_engine
    prompts = _prompts()
    agree, gap, before = _greedy_and_gap(engine, model, prompts, tok.eos_token_id)
    assert agree == 16 and gap < 1e-4, (family, agree, gap)
    perturb_every_parameter(model, seed=2)
    engine.sync_weights(model)
    agree, gap, after = _greedy_and_gap(engine, model, prompts, tok.eos_token_id)
    assert sum(a != b for a, b in zip(before, after)) >= 12, family  # the new weights decode differently
    assert agree == 16 and gap < 1e-4, (family, agree, gap)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_train_py_on_vllm(tmp_path, family):
    """`python train.py --model <dir> --max_steps 3 --rollout vllm`: every step syncs every layer, and
    the sampler's log-probs match the trainer's (both fp32) under a sequence-level masking correction."""
    model_dir = str(tmp_path / "model")
    family_model(family, model_dir)
    out = str(tmp_path / "run")
    flags = [a for a in TRAIN_SMALL if a not in ("--rollout", "hf")] + ["--rollout", "vllm", "--eval_problems", "4", "--recipe", "laptop"]
    r = run([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--model", model_dir, "--max_steps", "3",
             "--out_dir", out, "--is_correction", "--is_level", "sequence", "--is_mode", "mask"], env=_vllm_env())
    assert "rollout engine: vllm (asked for)" in r.stdout
    log = r.stdout + r.stderr
    assert log.count("Reloading and processing weights took") == 3
    assert "Failed to load weights" not in log[log.index("Reloading weights inplace"):]
    rows = metrics(out)
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["train/grad_norm"] > 0 and abs(row["train/log_ppl_diff"]) < 1e-3 and row["train/kl_k3"] < 1e-4
        assert row["train/is_corrected_frac"] == 0.0, row  # fp32 on both sides: no trajectory above the cap


# ----------------------------------------------------------------------------
# chat templates: the teacher's tokens are the ones the policy would emit after the generation prompt

# Qwen2's pre-tokenizer split (a fact of its tokenizer.json): newlines, words, digits and punctuation apart
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen_style_tokenizer(corpus):
    """A byte-level BPE with Qwen's split, special tokens and chat template (tests/data/), its merges
    learnt from `corpus` in milliseconds: merges that could cross the prompt/answer boundary exist."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = open(os.path.join(ROOT, "tests", "data", "qwen3_chat_template.jinja")).read()
    return tok


def test_chat_template_teacher_tokens_are_what_the_policy_would_produce_after_the_prompt():
    """data.encode renders the messages through the chat template with its generation prompt and
    tokenizes the teacher's text on its own: those ids, EOS included, are exactly the tokens of the
    whole conversation after the prompt, as the template renders it with the teacher as the
    assistant's turn (so the policy, writing that text after the prompt, emits those ids)."""
    from lib import data
    from tests.helpers import box
    problems = [data.Problem([{"role": "system", "content": "Put the final answer in \\boxed{}."},
                              {"role": "user", "content": f"What is {a} + {b}?"}], str(a + b),
                             f"<think>\nOkay, {a} + {b}: add the units first.\n</think>\n" + box(str(a + b)))
                for a, b in ((12, 30), (7, 5), (100, 23))]
    corpus = [m["content"] for p in problems for m in p.prompt] + [p.solution for p in problems] + ["assistant\n"] * 3
    tok = qwen_style_tokenizer(corpus * 20)
    encoded, _ = data.encode(tok, problems, None, None)
    for p, e in zip(problems, encoded):
        rendered = tok.apply_chat_template(p.prompt + [{"role": "assistant", "content": p.solution}], tokenize=False)
        whole = tok(rendered, add_special_tokens=False)["input_ids"]
        assert rendered.startswith(data.render_prompt(tok, p.prompt)) and e.prompt_ids[-1] != tok.eos_token_id
        assert whole[:len(e.prompt_ids)] == e.prompt_ids  # the prompt is a prefix, token for token
        P = len(e.prompt_ids)
        assert whole[P:P + len(e.solution_ids)] == e.solution_ids  # then the teacher's ids, EOS included
        assert tok.decode(e.solution_ids) == p.solution + "<|im_end|>"
        assert len(e.solution_ids) < len(p.solution.encode()) / 2  # merges happened: not a byte per token
