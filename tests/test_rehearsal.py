"""What the 7B recipe's first GPU run would have hit, checked on CPU (issue 21, items 1-3 and 6).

Some tests here are marked `vllm` without needing vLLM: the vLLM tier runs them in vLLM's environment,
whose transformers is the one vLLM pins (<5.20), older than the main environment's. They run in the
main suite too. Tests that do need vLLM carry test_vllm's `needs_vllm` and share one engine.
"""

import dataclasses
import json

import pytest
import torch

from tests.helpers import TRAIN_SMALL, metrics, tiny_qwen2
from tests.test_vllm import _greedy_and_gap, _prompts, hf_greedy, needs_vllm, vllm_test_engine, vllm_test_model

# ----------------------------------------------------------------------------
# item 1: --grad_checkpointing with both transformers versions


@pytest.mark.vllm  # runs in both environments: transformers 5.24 here, vLLM's pinned 5.19 in the vLLM tier
def test_grad_checkpointing_step_equals_the_plain_step(tmp_path):
    """One train.py step with --grad_checkpointing: it starts (5.19 has no activation_checkpointing_enable)
    and recomputing the activations changes no number of the step."""
    import train
    rows, problems = {}, _small_problems(tmp_path)
    for flag in ("--grad_checkpointing", "--no-grad_checkpointing"):
        out = str(tmp_path / flag)
        train.main(TRAIN_SMALL + ["--data", problems, "--max_steps", "1", "--out_dir", out, flag])
        rows[flag] = metrics(out)[-1]
    assert rows["--grad_checkpointing"]["train/grad_norm"] > 0
    assert rows["--grad_checkpointing"] == pytest.approx(rows["--no-grad_checkpointing"], rel=1e-5)


def test_grad_checkpointing_is_on_after_wrap():
    """parallel.wrap turns checkpointing on in every decoder layer, non-reentrant (FSDP2 composes with it)."""
    from lib import parallel
    model = tiny_qwen2()
    parallel.wrap(model, parallel.Dist(), grad_checkpointing=True)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)


# ----------------------------------------------------------------------------
# item 2: positions. A run whose sequences outgrow the model's positions stops in one line (with either
# engine); --max_positions and --rope_theta reach the trainer and vLLM alike; a cut completion is truncated


def _one_line_exit(capsys, main, argv, prefix):
    """main(argv) exits 2 with one stderr line starting with prefix: that line."""
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(prefix), err
    return err[0]


def _small_problems(tmp_path):
    """Four problems in a .jsonl file: the built-in task takes seconds to generate."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{a}+1=?", "answer": str(a + 1),
                                        "solution": f"so \\boxed{{{a + 1}}}"}) + "\n" for a in range(4)))
    return str(path)


def test_too_few_positions_refused_in_one_line_hf(tmp_path, capsys):
    """The built-in model has 512 positions: 600 new tokens after its prompts do not fit, with the HF engine
    too (which would go on computing past them), in train.py and in eval.py (its default 8,192 new tokens)."""
    import eval
    import train
    problems = _small_problems(tmp_path)
    line = _one_line_exit(capsys, train.main, TRAIN_SMALL + ["--data", problems, "--max_new_tokens", "600",
                                                              "--max_steps", "1", "--out_dir", str(tmp_path / "t")],
                          "train.py: error: ")
    assert "has 512 positions" in line and "+ --max_new_tokens 600" in line
    assert "rope_theta 40,000 and 16,384 positions" in line and "--max_positions" in line and "--rope_theta" in line
    line = _one_line_exit(capsys, eval.main, ["--model", "tiny", "--benchmarks", problems, "--rollout", "hf",
                                              "--out_dir", str(tmp_path / "e")], "eval.py: error: ")
    assert "has 512 positions" in line and "+ --max_new_tokens 8192" in line and "--max_positions" in line


def test_position_overrides_reach_the_trainers_model():
    """--max_positions and --rope_theta change the loaded model (RoPE's frequencies), not only its config:
    transformers 5 drops a plain rope_theta= keyword to from_pretrained without a word."""
    from lib import tiny
    from lib.models import check_positions, load_model, position_overrides
    from lib.data import DataError
    plain, _ = load_model(tiny.SHIPPED, dtype=torch.float32)
    model, _ = load_model(tiny.SHIPPED, dtype=torch.float32, rope_theta=40000, max_positions=1024)
    assert model.config.max_position_embeddings == 1024 and model.config.rope_parameters["rope_theta"] == 40000
    inv_freq = model.model.rotary_emb.inv_freq  # [head_dim / 2]
    d = 2 * len(inv_freq)
    assert torch.allclose(inv_freq, 40000.0 ** (-torch.arange(0, d, 2).float() / d))
    assert not torch.allclose(inv_freq, plain.model.rotary_emb.inv_freq)
    check_positions(model.config, {"long": 1024})
    with pytest.raises(DataError):
        check_positions(plain.config, {"long": 1024})
    assert position_overrides(plain.config) == {}  # no flag, nothing changed (vLLM gets {})


def test_a_completion_without_eos_is_truncated_whatever_its_length():
    """vLLM ends a sample at max_model_len as it does at max_new_tokens (finish reason "length"), shorter than
    max_new_tokens: train.py used to count only completions of max_new_tokens tokens."""
    from rollout import truncated
    assert truncated([5, 6, 7], eos_id=3) and truncated([], eos_id=3)  # cut, at any length
    assert not truncated([5, 3], eos_id=3) and not truncated([3], eos_id=3)


# ----------------------------------------------------------------------------
# item 3: one random stream per sample


def test_every_sample_gets_its_own_seed():
    """VLLMEngine's request seeds, expanded into per-sample seeds by the rule vLLM applies to a request of n
    samples (seed + j, vllm/v1/engine/parallel_sampling.py; test_vllm_seeds_expand_as_vllm_does checks it
    on vLLM's own code): M x N distinct streams, in one call and over evaluate()'s chunks of problems."""
    from types import SimpleNamespace
    from lib import data
    from lib import tiny
    from eval import evaluate
    from rollout import VLLMEngine
    seeds = []

    class LLM:  # what VLLMEngine.generate calls, recording the seed of every sample vLLM would draw
        def generate(self, prompts, params, use_tqdm):
            seeds.extend(p.seed + j for p in params for j in range(p.n))
            return [SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=[5, 3], finish_reason="stop")
                                             for j in range(p.n)]) for p in params]
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM: SamplingParams as a plain record
    engine._vllm, engine.llm = SimpleNamespace(SamplingParams=SimpleNamespace), LLM()
    engine.eos_id, engine.asleep, engine.weights_dropped = 3, set(), False
    engine.generate([[1, 2]] * 16, 8, 4, 1.0, seed=123)  # M = 16 prompts, N = 8 samples
    assert len(set(seeds)) == len(seeds) == 128
    seeds.clear()
    problems = [data.Problem([{"role": "user", "content": f"{a}+1=?"}], str(a + 1), "") for a in range(10)]
    evaluate(engine, tiny.make_tokenizer(), problems, k=4, batch_prompts=3, seed=5)  # 4 chunks
    assert len(set(seeds)) == len(seeds) == 40


# ----------------------------------------------------------------------------
# items 2 and 3 on vLLM itself (its CPU build in CI): one engine for all, on a model of 64 positions that
# --max_positions 256 and --rope_theta 40000 stretch


@needs_vllm
def test_vllm_seeds_expand_as_vllm_does():
    """The rule test_every_sample_gets_its_own_seed assumes, read off vLLM's own code: the j-th of a
    request's n samples is seeded seed + j."""
    from types import SimpleNamespace
    import vllm
    from vllm.v1.engine.parallel_sampling import ParentRequest
    params = vllm.SamplingParams(n=4, seed=100, max_tokens=4)
    parent = ParentRequest(SimpleNamespace(request_id="r", external_req_id="r", params=params))
    assert [parent.get_child_info(j)[1].seed for j in range(4)] == [100, 101, 102, 103]


@needs_vllm
def test_vllm_too_few_positions_refused_in_one_line(tmp_path, capsys):
    """Before vLLM starts (its own refusal is a page): VLLMEngine itself, and train.py with --rollout vllm."""
    import train
    from rollout import VLLMEngine
    _, tok = vllm_test_model(tmp_path, tie=True, max_positions=64)
    with pytest.raises(ValueError) as e:
        VLLMEngine(str(tmp_path), tok, max_model_len=100)
    assert "\n" not in str(e.value) and "has 64 positions" in str(e.value) and "max_model_len 100" in str(e.value)
    line = _one_line_exit(capsys, train.main, [a for a in TRAIN_SMALL if a not in ("--rollout", "hf")] + [
        "--rollout", "vllm", "--recipe", "laptop", "--model", str(tmp_path), "--data", _small_problems(tmp_path), "--max_new_tokens", "100",
        "--out_dir", str(tmp_path / "o")],
        "train.py: error: ")
    assert "has 64 positions" in line and "+ --max_new_tokens 100" in line and "--max_positions" in line


@pytest.fixture(scope="module")
def stretched(tmp_path_factory):
    """(engine, trainer, plain, tok): vLLM and the trainer's model with the same position overrides, built
    through the project's own functions, and the model as saved (64 positions, rope_theta 10000)."""
    from lib.models import load_config, load_model, position_overrides
    path = tmp_path_factory.mktemp("positions")
    plain, tok = vllm_test_model(path, tie=True, max_positions=64)
    overrides = position_overrides(load_config(str(path)), rope_theta=40000, max_positions=256)
    engine = vllm_test_engine(path, tok, max_model_len=100, hf_overrides=overrides)
    trainer, _ = load_model(str(path), dtype=torch.float32, rope_theta=40000, max_positions=256)
    return engine, trainer, plain, tok


@needs_vllm
@pytest.mark.slow
def test_vllm_position_overrides_equal_the_trainers(stretched):
    """Prompts past the saved 64 positions: vLLM decodes what the trainer's model does and reports its
    log-probs, so rope_theta reached both (the saved model, theta 10000, decodes otherwise)."""
    engine, trainer, plain, tok = stretched
    prompts = _prompts(8, seed=21, lo=70, hi=80)
    agree, gap, want = _greedy_and_gap(engine, trainer, prompts, tok.eos_token_id)
    assert agree == 8 and gap < 1e-4, (agree, gap)
    assert hf_greedy(plain, prompts, 12, tok.eos_token_id) != want  # the check has teeth


@needs_vllm
@pytest.mark.slow
def test_vllm_cut_at_max_model_len_is_truncated(stretched):
    """A 90-token prompt asking for 40 new tokens under max_model_len 100: vLLM stops after 10 (finish
    reason "length"), and that completion counts as truncated, though shorter than max_new_tokens."""
    from rollout import truncated
    engine, _, _, tok = stretched
    prompts = _prompts(4, seed=22, lo=90, hi=91)
    got = engine.generate(prompts, 1, 40, 0.0)
    cut = [c for c in got if tok.eos_token_id not in c]
    assert cut and all(len(c) == 10 and truncated(c, tok.eos_token_id) for c in cut), got


@needs_vllm
@pytest.mark.slow
def test_vllm_samples_of_equal_prompts_all_differ(stretched):
    """Four copies of one prompt, four samples each, one seed: sixteen different completions. With the
    seed + i per prompt of before, prompt i's sample j+1 repeated prompt i+1's sample j (9 of 16 repeats)."""
    engine, _, _, _ = stretched
    got = engine.generate(_prompts(1, seed=23) * 4, 4, 12, 1.0, seed=77)
    assert len({tuple(c) for c in got}) == 16, got


# ----------------------------------------------------------------------------
# item 6: memory


def test_optimize_frees_the_gradients_before_the_rollout():
    """After the step no gradient is held (they would sit through the next rollout, a model's worth of
    fp32 per rank): after a taken step, after a skipped one, and with several mini-batches."""
    import update
    from lib.parallel import Dist, Policy
    from tests.helpers import build_batch
    from tests.test_equivalence import _toy_groups
    from tests.test_options import _cfg
    model = tiny_qwen2(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = build_batch(_toy_groups(40, n_groups=4), "hapo", 0.8)
    broken = dataclasses.replace(batch, advantages=batch.advantages * float("nan"))  # a non-finite loss
    for b, mini, taken in ((batch, 1, True), (batch, 2, True), (broken, 1, False)):
        before = [p.detach().clone() for p in model.parameters()]
        m = update.optimize(Policy(model), opt, b, _cfg(mini_batches=mini), Dist(), lr=1e-3)
        assert all(p.grad is None for p in model.parameters()), (mini, taken)
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())) == taken
        assert m["train/skipped_updates"] == (0 if taken else 1)


def test_weights_for_sync_casts_each_shard_before_gathering(tmp_path):
    """weights_for_sync(model, dtype) yields every tensor in dtype; an FSDP2 parameter (a DTensor, here on a
    one-rank gloo group) is gathered already cast: half the all-gather bytes for a bf16 engine."""
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from lib.weight_sync import weights_for_sync
    model = tiny_qwen2(seed=4, tie=False)
    want = {name: p.detach().to(torch.bfloat16) for name, p in model.named_parameters()}
    got = dict(weights_for_sync(model, torch.bfloat16))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(t.dtype == torch.float32 for _, t in weights_for_sync(model))  # no dtype: as trained
    gathered, full_tensor = [], DTensor.full_tensor

    def spy(self, *a, **kw):
        gathered.append(self.dtype)
        return full_tensor(self, *a, **kw)
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(model.model.embed_tokens.weight, DTensor)
        DTensor.full_tensor = spy
        got = dict(weights_for_sync(model, torch.bfloat16))
    finally:
        DTensor.full_tensor = full_tensor
        tdist.destroy_process_group()
    assert gathered == [torch.bfloat16] * len(want)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_fused_logprobs_backward_makes_no_fp32_copy_of_the_head():
    """With a bf16 LM head the backward sums each chunk's [V, H] gradient into one fp32 buffer and asks for
    no fp32 copy of it per chunk (for Qwen2.5-7B's head 2 GiB each): counted over every op the backward
    dispatches. What this saves is GPU memory: the in-place add casts as it reads on CUDA, while on CPU
    TensorIterator still makes a temporary inside it (aten/src/ATen/TensorIterator.cpp, compute_types),
    which no op-level count sees. The gradient is autograd's (test_fused_logprobs_gradient_equals_...)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from loss import hidden_logprobs
    V, H = 301, 16

    class Count(TorchDispatchMode):  # new (not in-place) fp32 tensors of the head's shape
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func._schema.name.endswith("_") and isinstance(out, torch.Tensor) and \
                    out.shape == (V, H) and out.dtype == torch.float32:
                Count.n += 1
            return out
    torch.manual_seed(0)
    hidden = torch.randn(2, 40, H, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.3 * torch.randn(V, H)).to(torch.bfloat16).requires_grad_()
    logp = hidden_logprobs(hidden, weight, torch.randint(0, V, (2, 40)), chunk_size=8)  # 10 chunks
    with Count():
        (grad_w,) = torch.autograd.grad(logp.sum(), weight)
    assert grad_w.dtype == torch.bfloat16
    assert Count.n <= 1, Count.n  # the fp32 accumulator only (it was one copy per chunk: 10)


# ----------------------------------------------------------------------------
# issue 29, part 4: what the review of the CUDA path still flagged (memory, vLLM's startup timeouts,
# evaluation seeds, teacher verification, sleep level)


def test_init_sets_expandable_segments_unless_the_allocator_is_configured(monkeypatch):
    """parallel.init, the first thing train.py does after reading its flags (before CUDA starts), asks
    for expandable segments; a user's own allocator settings, under either name, are left alone."""
    from lib import parallel
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    parallel.init()
    assert parallel.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "max_split_size_mb:512")
        other = "PYTORCH_ALLOC_CONF" if name == "PYTORCH_CUDA_ALLOC_CONF" else "PYTORCH_CUDA_ALLOC_CONF"
        monkeypatch.delenv(other, raising=False)
        parallel.init()
        assert parallel.os.environ[name] == "max_split_size_mb:512" and other not in parallel.os.environ


def test_peak_memory_is_each_ranks_and_the_largest_and_absent_on_cpu(monkeypatch):
    """memory/max_reserved_gib: torch.cuda.max_memory_reserved in GiB, reset after reading (a row's
    peak is its own); on the CPU no key at all. CUDA is faked here: the numbers are the function's."""
    from lib import parallel
    from lib.parallel import Dist
    assert parallel.peak_memory(Dist()) == {}
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    cuda = Dist(device=torch.device("cuda:0"))
    assert parallel.peak_memory(cuda) == {"memory/max_reserved_gib": 3.0, "memory/max_reserved_gib_ranks": [3.0]}
    assert resets == [cuda.device]
    # rank 1 of 3: its entry of the list, the others' come from the all_reduce (here: a fake one)
    monkeypatch.setattr(parallel, "all_sum", lambda d, t: t + torch.tensor([5.0, 0.0, 1.0], dtype=t.dtype))
    got = parallel.peak_memory(Dist(rank=1, world=3, device=torch.device("cuda:1")))
    assert got == {"memory/max_reserved_gib": 5.0, "memory/max_reserved_gib_ranks": [5.0, 3.0, 1.0]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak_memory_sees_an_allocation():
    from lib import parallel
    dist = parallel.from_env()
    parallel.peak_memory(dist)
    x = torch.empty(2**28, dtype=torch.uint8, device=dist.device)  # 256 MiB
    got = parallel.peak_memory(dist)
    assert got["memory/max_reserved_gib"] >= 0.25 and got["memory/max_reserved_gib_ranks"] == [got["memory/max_reserved_gib"]]
    del x


class _FakeLLM:
    """What VLLMEngine calls on vLLM's LLM, recorded: sleep, wake_up, the weight reload, generate."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, fn, args):
        self.calls.append(("reload",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm):
        from types import SimpleNamespace
        self.calls.append(("generate",))
        return [SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=[5, 3], finish_reason="stop")
                                         for j in range(p.n)]) for p in params]


def _fake_vllm_engine(sleep_mode=True):
    from types import SimpleNamespace
    from rollout import VLLMEngine
    engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM: SamplingParams as a plain record
    engine._vllm, engine.llm = SimpleNamespace(SamplingParams=SimpleNamespace), _FakeLLM()
    engine.eos_id, engine.asleep, engine.weights_dropped, engine.sleep_mode = 3, set(), False, sleep_mode
    engine.dtype = torch.float32
    return engine


def test_vllm_sleep_is_level_2_and_sampling_waits_for_a_sync():
    """--vllm_sleep drops vLLM's weights (level 2: level 1 pins a host copy, 15 GB a rank at 7B, that the
    next sync overwrites anyway). Sampling before that sync would read reallocated, unfilled memory:
    VLLMEngine refuses it in one line. After the sync the weights are awake, then generate wakes the rest."""
    engine = _fake_vllm_engine()
    engine.sleep()
    assert engine.llm.calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match="sync_weights first"):
        engine.generate([[1, 2]], 2, 4, 1.0)
    engine.sync_weights(tiny_qwen2())
    engine.generate([[1, 2]], 2, 4, 1.0)
    assert engine.llm.calls[1:] == [("wake_up", ["weights"]), ("reload",), ("reset_prefix_cache",),
                                    ("wake_up", ["kv_cache"]), ("generate",)]
    engine = _fake_vllm_engine()
    engine.sleep(level=1)  # a level-1 sleeper keeps its weights: it may sample without a sync
    engine.generate([[1, 2]], 2, 4, 1.0)
    assert engine.llm.calls == [("sleep", 1), ("wake_up", None), ("generate",)]


class _SpyEngine:
    """train.py's engine, wrapped: every sleep (with its level), weight sync and generate, in order."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def sleep(self, level=None):
        self.calls.append(("sleep", level))

    def sync_weights(self, model):
        self.calls.append(("sync",))
        self.inner.sync_weights(model)

    def generate(self, *args, **kw):
        self.calls.append(("generate",))
        return self.inner.generate(*args, **kw)


@pytest.mark.parametrize("method", ["hapo", "sft"])
def test_train_sleeps_at_level_2_and_syncs_before_every_generate(tmp_path, monkeypatch, method):
    """In train.py's loop a level-2 sleep is always followed by a weight sync before the engine samples
    again: after every optimizer step for the RL methods, and before each evaluation for sft (which
    samples nothing else, and skips the syncs in between)."""
    import rollout
    import train
    calls, real = [], rollout.make_engine
    monkeypatch.setattr(rollout, "make_engine", lambda *a, **kw: _SpyEngine(real(*a, **kw), calls))
    train.main(TRAIN_SMALL + ["--max_steps", "3", "--eval_every", "2", "--eval_problems", "2", "--vllm_sleep",
                              "--method", method, "--out_dir", str(tmp_path / "run"), "--save_every", "100"])
    assert [c for c in calls if c[0] == "sleep"] == [("sleep", 2)] * 3
    asleep = False
    for c in calls:
        assert not (asleep and c[0] == "generate"), calls  # a generate with the weights dropped
        asleep = c[0] == "sleep" or (asleep and c[0] != "sync")
    assert (calls.count(("sync",)), calls.count(("generate",))) == ((2, 3) if method == "sft" else (3, 6)), calls


def test_eval_seeds_differ_by_rank_and_stay_those_of_one_process_on_rank_0(tmp_path, monkeypatch):
    """train.py's evaluation: every data-parallel rank evaluates its own strided share of the held-out
    problems with its own seed (all ranks drew the same one: rank r's problem i sampled rank 0's
    problem i's stream). Rank 0 keeps the seed of a one-process run, whose numbers are published;
    a pure function of (seed, step, rank), so a resumed run evaluates as an uninterrupted one."""
    import eval as eval_module
    import launch
    import train
    seeds, real_start, real_evaluate = {}, launch.start, eval_module.evaluate

    def evaluate(engine, tok, problems, **kw):
        seeds.setdefault(dp_rank, []).append(kw["seed"])
        return real_evaluate(engine, tok, problems, **kw)

    def start(cfg, dist):  # one process playing data-parallel rank `dp_rank` of 2 (the sums are its own)
        run = real_start(cfg, dist)
        run.dp_rank, run.dp_world = dp_rank, 2
        return run
    monkeypatch.setattr(eval_module, "evaluate", evaluate)
    monkeypatch.setattr(launch, "start", start)
    for dp_rank in (0, 1):
        train.main(TRAIN_SMALL + ["--max_steps", "0", "--eval_problems", "4", "--seed", "3",
                                  "--out_dir", str(tmp_path / f"rank{dp_rank}")])
    assert seeds[0] == [3]  # a one-process run's step-0 seed, unchanged
    assert seeds[1] != seeds[0]


def test_hub_weights_download_on_rank_0_first_then_on_the_others(tmp_path, monkeypatch):
    """models.download: rank 0 downloads, then the broadcast that the other ranks wait at (our process
    group's timeout), then they download (from the cache rank 0 filled); rank 0's failure is every rank's
    one line, and they do not try. A local directory is no download."""
    import huggingface_hub
    from lib import models, parallel
    from lib.data import DataError
    from lib.parallel import Dist
    events, fail = [], []
    (tmp_path / "model.safetensors").write_bytes(b"")

    def snapshot_download(name, allow_patterns):
        events.append(("download", name))
        if fail:
            raise OSError("401 gated repository")
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        return str(tmp_path)

    def broadcast(d, obj):
        events.append(("broadcast", obj))
        return "rank 0's error" if d.rank and fail else obj
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(parallel, "broadcast", broadcast)
    assert models.download("owner/model", Dist(0, 2)) == str(tmp_path)
    assert events == [("download", "owner/model"), ("broadcast", None)]
    events.clear()
    assert models.download("owner/model", Dist(1, 2)) == str(tmp_path)
    assert events == [("broadcast", None), ("download", "owner/model")]
    events.clear()
    fail.append(True)
    with pytest.raises(DataError, match="owner/model.*401 gated"):
        models.download("owner/model", Dist(0, 2))
    with pytest.raises(DataError, match="rank 0's error"):
        models.download("owner/model", Dist(1, 2))
    assert events[-1] == ("broadcast", None)  # rank 1 did not download
    events.clear()
    assert models.download(str(tmp_path), Dist(1, 2)) == str(tmp_path) and events == []


def test_train_from_a_hub_id_loads_and_samples_the_downloaded_directory(tmp_path, monkeypatch):
    """launch.start downloads a hub id before it loads anything or builds an engine, and both get the
    local directory; on one rank the teachers are verified there (rank 0), as before."""
    import huggingface_hub
    import rollout
    import train
    from lib import tiny
    downloads, paths, real = [], [], rollout.make_engine
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, allow_patterns: downloads.append(name) or tiny.SHIPPED)
    monkeypatch.setattr(rollout, "make_engine", lambda kind, model, tok, path, **kw: paths.append(path) or
                        real(kind, model, tok, path, **kw))
    train.main(TRAIN_SMALL + ["--max_steps", "0", "--eval_problems", "2", "--recipe", "laptop", "--model", "someone/tiny-copy",
                              "--no-preflight", "--out_dir", str(tmp_path / "run")])  # no hub to read config.json from
    assert downloads == ["someone/tiny-copy"] and paths == [tiny.SHIPPED]


def test_training_set_without_a_score_verifies_no_teacher():
    """The ranks other than 0 load and encode the data but score no teacher: rank 0's verdicts come in a
    broadcast (launch.start; tests/drivers/two_ranks_launch.py checks it on two ranks)."""
    from lib import data
    from lib import tiny
    tok = tiny.make_tokenizer()
    calls = []
    score = lambda completion, answer: calls.append(answer) or 1.0
    problems, ok, held, stats = data.training_set("builtin", "", tok, 1024, 8192, 4, score)
    assert len(calls) == len(problems) == len(ok) and stats["teacher_unverified"] == 0
    calls.clear()
    again, ok, held, stats = data.training_set("builtin", "", tok, 1024, 8192, 4, None)
    assert calls == [] and ok is None and [p.prompt_ids for p in again] == [p.prompt_ids for p in problems]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_launch_downloads_rank_0_first_and_take_its_teacher_verdicts(tmp_path):
    """launch.start under torchrun: rank 1 downloads only after rank 0 has (both before either builds an
    engine), scores no teacher, and ends with rank 0's verdicts, so --method sft keeps the same problems
    on both ranks although rank 1's own reward would have passed every teacher."""
    import os
    from tests.helpers import DRIVERS, TORCHRUN, run
    run(TORCHRUN + [os.path.join(DRIVERS, "two_ranks_launch.py"), str(tmp_path)])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["downloads"] == [{"name": "someone/tiny-copy", "rank0_done": False}]
    assert r1["downloads"] == [{"name": "someone/tiny-copy", "rank0_done": True}]
    assert r0["scored"] == len(r0["teacher_ok"]) > 0 and r1["scored"] == 0
    assert r1["teacher_ok"] == r0["teacher_ok"] and 0.0 in r0["teacher_ok"]
    assert r1["kept"] == r0["kept"] == sum(ok >= 0.5 for ok in r0["teacher_ok"])
