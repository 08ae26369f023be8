"""Tier 2: the sampling engines against slow references. HF greedy decoding == an unpadded
full-forward loop; seeded sampling reproduces; weight sync copies every parameter; the vLLM
engine's calls, against a stand-in for vllm (its real tests are in tests/test_vllm.py)."""

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from rollout import HFEngine, VLLMEngine, hf_name, make_engine, resolve_engine, weights_for_sync
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
    engine.sync_weights(sampler)  # its own model: a no-op


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
    with pytest.raises(ImportError, match="pip install vllm.*--rollout hf"):
        make_engine("vllm", None, _tok(), "some/path")
    with pytest.raises(ValueError):
        make_engine("sglang", None, _tok(), "some/path")


# ----------------------------------------------------------------------------
# VLLMEngine against a fake `vllm` module


class _OldFakeLLM:
    """What the tests need of vllm.LLM; no collective_rpc, as in vLLM before 0.7."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.loaded, self.params = kwargs, [], [], None
        model = SimpleNamespace(load_weights=self._load_weights)
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            worker=self.worker)))

    def _load_weights(self, weights):
        self.calls.append("load_weights")
        self.loaded.extend(list(weights))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append("generate")
        self.params = sampling_params
        n = sampling_params.kw["n"]
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            samples = [  # out of index order; j%3: 0 stops on _EOS, 1 stops without _EOS shown, 2 runs out
                SimpleNamespace(index=j, token_ids=[ids[-1], 40 + j] + ([_EOS] if j % 3 == 0 else []),
                                finish_reason="length" if j % 3 == 2 else "stop")
                for j in reversed(range(n))]
            outs.append(SimpleNamespace(outputs=samples))
        return outs

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up{tags or ''}")


class _FakeLLM(_OldFakeLLM):
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append("collective_rpc")
        return [method(self.worker, *args, **(kwargs or {}))]  # a callable gets the worker first


class _FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = _FakeLLM, _FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return mod


def test_vllm_engine_construction(fake_vllm, monkeypatch):
    engine = make_engine("vllm", None, _tok(), "path/to/model", seed=7, enable_sleep_mode=True,
                         max_model_len=256, gpu_memory_utilization=0.4)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the model lives in this process
    kw = engine.llm.kwargs
    assert kw["model"] == "path/to/model" and kw["generation_config"] == "vllm"
    assert kw["enable_prefix_caching"] and kw["enable_sleep_mode"] and kw["seed"] == 7
    assert kw["max_model_len"] == 256 and kw["gpu_memory_utilization"] == 0.4
    assert "distributed_executor_backend" not in kw
    # under torchrun: external launcher, one seed per tensor-parallel group
    kw = VLLMEngine("m", _tok(), seed=7, tensor_parallel_size=2, rank=3, world_size=4).llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["seed"] == 8
    assert kw["tensor_parallel_size"] == 2


def test_vllm_engine_generate(fake_vllm):
    engine = VLLMEngine("m", _tok())
    got = engine.generate([[1, 2], [7]], n=3, max_new_tokens=5, temperature=0.6, top_p=0.95)
    assert got == [[2, 40, _EOS], [2, 41, _EOS], [2, 42],  # prompt order, then sample index
                   [7, 40, _EOS], [7, 41, _EOS], [7, 42]]
    kw = engine.llm.params.kw
    explicit = {"n": 3, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "min_p": 0.0, "max_tokens": 5,
                "min_tokens": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "stop_token_ids": [_EOS], "ignore_eos": False, "seed": None, "logprobs": None}
    assert {k: kw[k] for k in explicit} == explicit


def test_vllm_engine_sync_weights_then_reset_prefix_cache(fake_vllm):
    engine = VLLMEngine("m", _tok(), enable_sleep_mode=True)
    model = _tiny_qwen2(tie=True)
    engine.sleep()  # the trainer's turn: vLLM releases its memory
    engine.sync_weights(model)  # weights memory comes back first, KV cache not yet
    engine.generate([[1]], n=1, max_new_tokens=2, temperature=1.0)
    engine.wake_up()  # already awake: no call
    expected = list(weights_for_sync(model))
    assert [n for n, _ in engine.llm.loaded] == [n for n, _ in expected]
    assert "lm_head.weight" not in dict(engine.llm.loaded)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(engine.llm.loaded, expected))
    # one load_weights call per tensor, then the prefix cache is dropped
    assert engine.llm.calls == (["sleep1", "wake_up['weights']"]
                                + ["collective_rpc", "load_weights"] * len(expected)
                                + ["reset_prefix_cache", "wake_up['kv_cache']", "generate"])
    # an LLM without collective_rpc (old vLLM): the in-process executor path
    engine.llm = _OldFakeLLM()
    engine.sync_weights(model)
    assert engine.llm.calls == ["load_weights"] * len(expected) + ["reset_prefix_cache"]
    assert [n for n, _ in engine.llm.loaded] == [n for n, _ in expected]
    # without sleep mode, sleep() and wake_up() do nothing
    plain = VLLMEngine("m", _tok())
    plain.sleep(), plain.wake_up()
    assert plain.llm.calls == []
