"""Tier 2: the sampling engines against slow references. HF greedy decoding == an unpadded
full-forward loop; seeded sampling reproduces; the sampler's log-probs == the trainer's; weight sync
copies every parameter; engine choice and vLLM's version range. VLLMEngine itself is tested against
vLLM in tests/test_vllm.py (the vLLM tier)."""

import sys

import pytest
import torch

from rollout import HFEngine, check_vllm_version, make_engine, resolve_engine
from lib.weight_sync import hf_name, weights_for_sync
from tests.helpers import fake_tok, tiny_qwen2


_EOS, _PAD = 3, 0


def _tiny_qwen2(tie=True, seed=0, vocab=50):
    return tiny_qwen2(vocab=vocab, seed=seed, tie=tie, init=0.2)


def _tok(eos=_EOS, pad=_PAD):
    return fake_tok(eos, pad)


_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16]]


@torch.no_grad()
def _greedy_reference(model, prompt, max_new_tokens, eos):
    """Slow, obvious greedy decoding: one unpadded prompt, full forward each step, no KV cache."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt):]


# ----------------------------------------------------------------------------
# HFEngine


def test_hf_greedy_matches_unpadded_reference_and_groups_by_prompt():
    model = _tiny_qwen2().eval()
    # make _EOS the token greedy decoding emits third for prompt 0, so at least one completion stops early
    eos = _greedy_reference(model, _PROMPTS[0], 3, eos=-1)[2]
    engine = HFEngine(model, _tok(eos=eos, pad=49))
    got = engine.generate(_PROMPTS, n=2, max_new_tokens=8, temperature=0.0)
    assert len(got) == len(_PROMPTS) * 2
    want = [_greedy_reference(model, p, 8, eos) for p in _PROMPTS]
    assert got == [w for w in want for _ in range(2)]  # left padding right, grouped by prompt
    assert got[0][-1] == eos and len(got[0]) <= 3
    # chunking into small generate() calls changes nothing for greedy decoding
    assert HFEngine(model, _tok(eos=eos, pad=49), max_batch=3).generate(_PROMPTS, 2, 8, 0.0) == got


def test_hf_sampling_contract_and_seed_reproducibility():
    model = _tiny_qwen2()
    engine = HFEngine(model, _tok())
    torch.manual_seed(123)
    a = engine.generate(_PROMPTS, n=4, max_new_tokens=24, temperature=1.0, top_p=1.0)
    torch.manual_seed(123)
    b = engine.generate(_PROMPTS, n=4, max_new_tokens=24, temperature=1.0, top_p=1.0)
    assert a == b  # the global torch RNG is the only source of randomness
    assert len(a) == 16
    for c in a:
        assert 1 <= len(c) <= 24
        assert _EOS not in c[:-1]  # cut after the first _EOS
        assert c[-1] == _EOS or len(c) == 24  # stopped, or ran out of budget
    assert any(c[-1] == _EOS for c in a) and any(len(c) == 24 and _EOS not in c for c in a)
    assert len({tuple(c) for c in a[:4]}) > 1  # the N samples of a prompt differ
    torch.manual_seed(124)
    assert engine.generate(_PROMPTS, 4, 24, 1.0) != a


def test_hf_greedy_deterministic_and_mode_restored():
    model = _tiny_qwen2()
    engine = HFEngine(model, _tok())
    model.train()
    a = engine.generate(_PROMPTS, 3, 10, temperature=0.0)
    assert model.training  # train mode restored
    model.eval()
    b = engine.generate(_PROMPTS, 3, 10, temperature=0.0)
    assert not model.training  # eval mode restored
    assert a == b
    for i in range(len(_PROMPTS)):
        assert a[3 * i] == a[3 * i + 1] == a[3 * i + 2]


@torch.no_grad()
def _nucleus_logprobs(model, prompt, completion, temperature, top_p):
    """log p(token) under softmax(logits / T) restricted to the top-p nucleus and renormalised, from one
    unpadded full forward: the distribution HFEngine is meant to sample from (greedy: T = 1, no nucleus)."""
    ids = torch.tensor([list(prompt) + list(completion)])  # [1, L]
    logits = model(ids).logits[0, len(prompt) - 1:-1] / (temperature if temperature > 0 else 1.0)  # [C, V]
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)  # [C, V]
        outside = probs.cumsum(-1) - probs >= top_p  # [C, V]: mass before this token already reaches top_p
        logits = logits.scatter(1, order, logits.gather(1, order).masked_fill(outside, float("-inf")))
    return logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None])[:, 0].tolist()  # [C]


def test_hf_logprobs_are_those_of_the_sampled_distribution():
    from loss import sequence_logprobs
    model = _tiny_qwen2().eval()
    engine = HFEngine(model, _tok())
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (0.0, 1.0)):
        torch.manual_seed(5)
        plain = engine.generate(_PROMPTS, 3, 10, temperature, top_p)
        torch.manual_seed(5)
        got, lps = engine.generate(_PROMPTS, 3, 10, temperature, top_p, logprobs=True)
        assert got == plain  # recording draws nothing
        assert [len(x) for x in lps] == [len(c) for c in got]
        rows = [p for p in _PROMPTS for _ in range(3)]
        want = [_nucleus_logprobs(model, p, c, temperature, top_p) for p, c in zip(rows, got)]
        assert torch.allclose(torch.tensor(sum(lps, [])), torch.tensor(sum(want, [])), atol=1e-5)
        if temperature == 1.0:  # the trainer's own function: the trainer-vs-sampler gap is ~0 for HF
            ids = [torch.tensor([p + c]) for p, c in zip(rows, got)]
            ref = [sequence_logprobs(model, i, torch.ones_like(i))[0, len(p) - 1:] for i, p in zip(ids, rows)]
            assert torch.allclose(torch.tensor(sum(lps, [])), torch.cat(ref), atol=1e-5)
        if top_p < 1.0:  # tokens outside the nucleus are never drawn; inside, renormalised log-probs
            assert all(lp > float("-inf") for x in lps for lp in x)
    torch.manual_seed(5)
    greedy = engine.generate(_PROMPTS, 3, 10, 0.0, logprobs=True)[1]
    chunked = HFEngine(model, _tok(), max_batch=5)  # chunks of another size: the same log-probs
    torch.manual_seed(5)
    assert sum(chunked.generate(_PROMPTS, 3, 10, 0.0, logprobs=True)[1], []) == pytest.approx(sum(greedy, []), abs=1e-5)


def test_hf_sync_weights_into_a_copy():
    import copy
    trainer = _tiny_qwen2()
    sampler = copy.deepcopy(trainer)
    engine = HFEngine(sampler, _tok())
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(1.0)
    engine.sync_weights(trainer)
    for (n1, p1), (n2, p2) in zip(trainer.named_parameters(), sampler.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    before = [p.clone() for p in sampler.parameters()]
    engine.sync_weights(sampler)  # its own model: a no-op
    assert all(torch.equal(a, b) for a, b in zip(before, sampler.parameters()))


# ----------------------------------------------------------------------------
# weights_for_sync


def test_weights_for_sync_tied_and_untied():
    tied = _tiny_qwen2(tie=True)
    got = list(weights_for_sync(tied))
    assert [n for n, _ in got] == [k for k in tied.state_dict() if k != "lm_head.weight"]
    for (name, t), p in zip(got, tied.parameters()):
        assert torch.equal(t, p) and not t.requires_grad
    untied = _tiny_qwen2(tie=False)
    names = [n for n, _ in weights_for_sync(untied)]
    assert names == list(untied.state_dict()) and names[-1] == "lm_head.weight"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch.compile's imports
def test_weights_for_sync_strips_wrapper_prefixes():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    model = _tiny_qwen2()
    want = [k for k in model.state_dict() if k != "lm_head.weight"]
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])

    class DDPLike(torch.nn.Module):  # DDP prefixes every name with `module.`
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = DDPLike(torch.compile(model))  # compile is lazy: only renames to `_orig_mod.`
    raw = [n for n, _ in wrapped.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n for n in raw) and raw[0].startswith("module._orig_mod.")
    assert [n for n, _ in weights_for_sync(wrapped)] == want  # tie detected through the wrappers too
    assert hf_name("_fsdp_wrapped_module.model.norm.weight") == "model.norm.weight"


def test_weights_for_sync_gathers_dtensor_like_parameters():
    model = _tiny_qwen2()
    calls = []
    full = torch.arange(64.0)
    model.model.norm.weight.full_tensor = lambda: calls.append(1) or full  # duck-typed FSDP2 DTensor shard
    got = dict(weights_for_sync(model))
    assert calls == [1] and torch.equal(got["model.norm.weight"], full)


# ----------------------------------------------------------------------------
# make_engine


def test_make_engine_auto_picks_hf_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_engine("auto") == ("hf", "auto: no CUDA device")
    assert isinstance(make_engine("auto", _tiny_qwen2(), _tok(), "unused"), HFEngine)


def test_make_engine_vllm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install 'vllm>=0.16,<0.33'.*--rollout hf"):
        make_engine("vllm", None, _tok(), "some/path")
    with pytest.raises(ValueError):
        make_engine("sglang", None, _tok(), "some/path")


def test_vllm_version_range_is_one_clear_line(monkeypatch):
    for ok in ("0.16.0", "0.32.0", "0.32.1.dev3+gabc"):
        check_vllm_version(ok)
    for bad in ("0.15.1", "0.33.0", "1.0.0"):
        with pytest.raises(ImportError, match=rf"^vLLM {bad} is not supported: .*vllm>=0.16,<0.33") as e:
            check_vllm_version(bad)
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "vllm", type(sys)("vllm"))
    sys.modules["vllm"].__version__ = "0.10.2"  # installed but too old: "vllm" refuses, "auto" falls back
    with pytest.raises(ImportError, match="0.10.2 is not supported"):
        resolve_engine("vllm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine("auto") == ("hf", "auto: vllm 0.10.2 is outside the supported range")
    sys.modules["vllm"].__version__ = "0.32.0"
    assert resolve_engine("auto") == ("vllm", "auto: CUDA device and vllm 0.32.0 found")
