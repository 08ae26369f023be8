"""The vLLM tier: rollout.VLLMEngine against vLLM itself (its CPU build in CI, `-m vllm --all`).

Every test here carries `@needs_vllm`: marked `vllm`, and skipped where vLLM is not installed, so the
main suite (which has no vLLM) skips them cleanly and the vLLM environment runs them. (A module-level
pytestmark would not reach them: test_hapo.py collects these functions into its own namespace.)

The reference is always the trainer's side in fp32: a plain argmax loop over full forwards for greedy
decoding, loss.sequence_logprobs for log-probs. Each check that passes because nothing happened (a
sync that pushed nothing, a cache that was never hit) is guarded by an assertion that it would fail.
vLLM's CPU build needs head_dim in {32, 64, ...}: the models here have 2 heads of 32.
"""

import importlib.util
import json
import os
import sys

import pytest
import torch

from tests.helpers import DRIVERS, ROOT, TORCHRUN, TRAIN_SMALL, metrics, run


def needs_vllm(test):
    """Mark `test` for the vLLM tier and skip it where vLLM is not installed."""
    missing = importlib.util.find_spec("vllm") is None
    return pytest.mark.vllm(pytest.mark.skipif(missing, reason="vLLM is not installed (the vLLM tier runs it)")(test))


_KV_BYTES = 32 << 20  # the KV cache of the test engines: 16k tokens of these models, allocated at start


def vllm_test_model(path, tie, seed=0, max_positions=256, vocab=None):
    """A 2-layer Qwen2 with the built-in byte tokenizer, saved to `path` for vLLM to load: (model, tok).
    initializer_range 0.2 keeps greedy decoding far from argmax ties. `vocab` may exceed the tokenizer's
    257 ids, as Qwen2.5's 151,936 rows exceed its tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from lib import tiny
    tok = tiny.make_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).float().eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def vllm_test_engine(path, tok, **kw):
    """The pinned constructor, fp32 unless `kw` says otherwise, with a small KV cache."""
    from rollout import VLLMEngine
    return VLLMEngine(str(path), tok, **{"dtype": "float32", "seed": 0, "max_model_len": 256,
                                         "kv_cache_memory_bytes": _KV_BYTES, **kw})


def _prompts(count=16, seed=1, lo=2, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 257, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@torch.no_grad()
def hf_greedy(model, prompts, max_new_tokens, eos):
    """Plain argmax over full forwards, one unpadded prompt at a time, cut after EOS (EOS kept)."""
    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                break
        out.append(ids[len(prompt):])
    return out


@torch.no_grad()
def trainer_logprobs(model, prompts, completions, temperature=1.0):
    """The trainer's log p(token) of each completion token in fp32: loss.sequence_logprobs, what update.py
    computes; at another temperature, log_softmax(logits / temperature), the distribution sampled."""
    from loss import sequence_logprobs
    out = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([list(prompt) + list(completion)])  # [1, L]
        if temperature == 1.0:
            lp = sequence_logprobs(model, ids, torch.ones_like(ids))[0]  # [L-1]
        else:
            lp = (model(ids).logits[0, :-1] / temperature).log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        out.append(lp[len(prompt) - 1:].tolist())
    return out


@torch.no_grad()
def perturb_every_parameter(model, seed, scale=0.2):
    """Add noise to every trainer parameter, embeddings and norms included: a parameter that sync_weights
    leaves stale then shows in the log-probs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def _greedy_and_gap(engine, model, prompts, eos):
    """(completions agreeing with the HF loop, max |vLLM - trainer| log-prob of the greedy tokens)."""
    got, lps = engine.generate(prompts, 1, 12, 0.0, logprobs=True)
    want = hf_greedy(model, prompts, 12, eos)
    ref = trainer_logprobs(model, prompts, got)
    gap = max(abs(a - b) for x, y in zip(lps, ref) for a, b in zip(x, y))
    return sum(a == b for a, b in zip(got, want)), gap, want


# ----------------------------------------------------------------------------
# (a), (b): greedy decoding == HF's, before and after a sync of every parameter


@needs_vllm
@pytest.mark.parametrize("tie", [True, False], ids=["tied_head", "untied_head"])
def test_vllm_greedy_matches_hf_before_and_after_sync(tmp_path, tie):
    model, tok = vllm_test_model(tmp_path, tie)
    engine = vllm_test_engine(tmp_path, tok)
    prompts = _prompts()
    agree, gap, before = _greedy_and_gap(engine, model, prompts, tok.eos_token_id)
    assert agree == 16 and gap < 1e-4, (agree, gap)  # (a) same weights
    perturb_every_parameter(model, seed=2)
    engine.sync_weights(model)
    agree, gap, after = _greedy_and_gap(engine, model, prompts, tok.eos_token_id)
    assert sum(a != b for a, b in zip(before, after)) >= 12  # the new weights decode differently
    assert agree == 16 and gap < 1e-4, (agree, gap)  # (b) every parameter reached the engine
    perturb_every_parameter(model, seed=3)  # and again: a second sync is no different from the first
    engine.sync_weights(model)
    agree, gap, _ = _greedy_and_gap(engine, model, prompts, tok.eos_token_id)
    assert agree == 16 and gap < 1e-4, (agree, gap)


@needs_vllm
def test_vllm_sync_streams_tensors_in_the_engine_dtype(tmp_path, monkeypatch):
    """Each tensor reaches vLLM in the engine's dtype, and vLLM lets go of it once its layer is loaded:
    with FSDP2 each is a freshly gathered full tensor, so that bounds what the sync holds at once.
    The vocabulary is a multiple of 64, as Qwen2.5's is: vLLM pads other sizes to one, and then keeps
    the embedding (an incomplete layer to it) until the end of the reload."""
    import weakref
    from lib import vllm_engine
    model, tok = vllm_test_model(tmp_path, tie=True, vocab=320)  # an fp32 trainer
    engine = vllm_test_engine(tmp_path, tok, dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    dtypes, alive, reload = [], [], vllm_engine.reload_on_worker

    def spy(worker, weights):
        def watched():
            held = []  # weak references to every tensor handed over so far
            for name, tensor in weights:
                alive.append(sum(r() is not None for r in held))
                dtypes.append(tensor.dtype)
                tensor = tensor.clone()  # a fresh tensor, as FSDP2's full_tensor() returns
                held.append(weakref.ref(tensor))
                yield name, tensor
        return reload(worker, watched())
    monkeypatch.setattr(vllm_engine, "reload_on_worker", spy)
    perturb_every_parameter(model, seed=2)
    engine.sync_weights(model)
    assert dtypes == [torch.bfloat16] * len(list(model.parameters()))  # tied: embed_tokens carries the head
    assert len(alive) == 26 and max(alive) <= 6  # one layer's: q, k, v's weights and biases for qkv_proj
    got, want = engine.generate(_prompts(), 1, 1, 0.0), hf_greedy(model, _prompts(), 1, tok.eos_token_id)
    assert sum(a == b for a, b in zip(got, want)) >= 13  # first tokens; bf16 rounding may flip a near-tie


# ----------------------------------------------------------------------------
# (c): the prefix cache does not outlive the weights that computed it


@needs_vllm
def test_vllm_sync_resets_prefix_cache(tmp_path):
    model, tok = vllm_test_model(tmp_path, tie=True)
    engine = vllm_test_engine(tmp_path, tok)
    # 140-token prompts: the first 128 (one KV block on CPU) are a prefix that vLLM caches after a call
    shared = _prompts(1, seed=4, lo=130, hi=131)[0]
    prompts = [shared + tail for tail in _prompts(4, seed=5, lo=10, hi=11)]
    assert engine.generate(prompts, 1, 12, 0.0) == hf_greedy(model, prompts, 12, tok.eos_token_id)
    # the check has teeth: with the reset skipped, the cached blocks of the old weights are reused
    reset, engine.llm.reset_prefix_cache = engine.llm.reset_prefix_cache, lambda *a, **k: True
    perturb_every_parameter(model, seed=6)
    engine.sync_weights(model)
    stale = engine.generate(prompts, 1, 12, 0.0)
    want = hf_greedy(model, prompts, 12, tok.eos_token_id)
    assert sum(a != b for a, b in zip(stale, want)) >= 2
    engine.llm.reset_prefix_cache = reset
    perturb_every_parameter(model, seed=7)
    engine.sync_weights(model)  # the real one: resets
    assert engine.generate(prompts, 1, 12, 0.0) == hf_greedy(model, prompts, 12, tok.eos_token_id)


# ----------------------------------------------------------------------------
# (d): the log-probs vLLM reports for its samples are the trainer's


@needs_vllm
def test_vllm_sampled_logprobs_match_trainer(tmp_path):
    model, tok = vllm_test_model(tmp_path, tie=True)
    engine = vllm_test_engine(tmp_path, tok)
    prompts = _prompts(8, seed=8)
    perturb_every_parameter(model, seed=9)  # through a sync, as in training
    engine.sync_weights(model)
    for temperature in (1.0, 0.7):
        got, lps = engine.generate(prompts, 4, 16, temperature, logprobs=True)
        assert [len(x) for x in lps] == [len(c) for c in got]
        ref = trainer_logprobs(model, [p for p in prompts for _ in range(4)], got, temperature)
        diffs = [abs(a - b) for x, y in zip(lps, ref) for a, b in zip(x, y)]
        assert sum(diffs) / len(diffs) < 1e-5 and max(diffs) < 1e-4, (temperature, sum(diffs) / len(diffs))
        assert len({tuple(c) for c in got}) > len(prompts)  # sampled, not greedy
        assert min(min(x) for x in lps) < -1.0  # unlikely tokens were drawn too: the check spans the range


@needs_vllm
def test_vllm_per_prompt_seeds_make_sampling_repeatable(tmp_path):
    """With a seed, what vLLM samples depends on that seed alone, not on what the engine drew
    before: what lets a resumed run (or an evaluation between steps) leave training's draws as they
    were. Without one, draws continue the engine's own stream."""
    _, tok = vllm_test_model(tmp_path, tie=True)
    engine = vllm_test_engine(tmp_path, tok)
    prompts = _prompts(6, seed=3)
    first = engine.generate(prompts, 4, 12, 1.0, seed=1234)
    engine.generate(prompts, 4, 12, 1.0)  # draws from the engine-wide generator in between
    assert engine.generate(prompts, 4, 12, 1.0, seed=1234) == first
    assert engine.generate(prompts, 4, 12, 1.0, seed=999) != first
    assert engine.generate(prompts, 4, 12, 1.0) != engine.generate(prompts, 4, 12, 1.0)


# ----------------------------------------------------------------------------
# sleep mode needs CUDA


@needs_vllm
def test_vllm_sleep_mode_refused_on_cpu_in_one_line(tmp_path):
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        pytest.skip("the CUDA build keeps sleep mode")
    _, tok = vllm_test_model(tmp_path, tie=True)
    with pytest.raises(ValueError, match="sleep mode needs CUDA") as e:
        vllm_test_engine(tmp_path, tok, enable_sleep_mode=True)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------
# (e): train.py and eval.py on the vLLM engine, end to end


_VLLM_SMALL = [a for a in TRAIN_SMALL if a not in ("--rollout", "hf")] + ["--rollout", "vllm"]


def _vllm_env():
    """The tests' one thread per process, and vLLM's KV cache on CPU at its smallest (1 GiB)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@needs_vllm
@pytest.mark.slow
def test_vllm_train_and_eval_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    r = run([sys.executable, os.path.join(ROOT, "train.py"), *_VLLM_SMALL, "--max_steps", "3", "--out_dir", out],
            env=_vllm_env())
    assert "rollout engine: vllm (asked for)" in r.stdout
    log = r.stdout + r.stderr
    assert log.count("Reloading and processing weights took") == 3  # one sync per step
    synced = log[log.index("Reloading weights inplace"):]  # (vLLM's first load of the fp32 file warns)
    assert "Attempted to load weight" not in synced  # pushed in the engine's dtype
    assert "Failed to load weights" not in synced  # nor any layer left out
    rows = metrics(out)
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and "eval/accuracy" in rows[3]
    assert all(row["train/response_len"] > 0 and row["train/grad_norm"] > 0 for row in rows[1:])
    ev = str(tmp_path / "eval")
    r = run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", out, "--benchmarks", "builtin", "--k", "2",
             "--limit", "6", "--max_new_tokens", "24", "--rollout", "vllm", "--out_dir", ev], env=_vllm_env())
    summary = json.load(open(os.path.join(ev, "summary.json")))
    assert [s["n_problems"] for s in summary.values()] == [6] and "| builtin" in r.stdout
    samples = [json.loads(line) for line in open(os.path.join(ev, "samples.jsonl"))]
    assert len(samples) == 12 and all(1 <= s["n_tokens"] <= 24 for s in samples)


# ----------------------------------------------------------------------------
# (f): two ranks under torchrun, one engine each, fed from FSDP2 shards


@needs_vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_vllm_two_ranks_external_launcher(tmp_path):
    model_dir = tmp_path / "model"
    vllm_test_model(model_dir, tie=True)
    run(TORCHRUN + [os.path.join(DRIVERS, "vllm_two_ranks.py"), str(tmp_path), str(model_dir)], env=_vllm_env())
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for rec in ranks:
        assert rec["vllm_before"] == rec["hf_before"]
        assert rec["vllm_after"] == rec["hf_after"]  # the gathered shards reached this rank's engine
        assert sum(a != b for a, b in zip(rec["hf_before"], rec["hf_after"])) >= 6
    assert ranks[0]["sampled"] != ranks[1]["sampled"]  # seed + rank: the ranks draw different rollouts
    out = str(tmp_path / "run")
    r = run(TORCHRUN + [os.path.join(ROOT, "train.py"), *_VLLM_SMALL, "--max_steps", "2", "--out_dir", out],
            env=_vllm_env())
    assert "rollout engine: vllm (asked for)" in r.stdout
    assert [row["step"] for row in metrics(out)] == [0, 1, 2]
