"""Tier 2: equivalences against a slow, obvious reference.

Micro-batches under the global token count == the whole batch (Eq. 8's normaliser); chunked
log-probs == log_softmax, at a fraction of its memory; two ranks under torchrun == one process;
a run stopped and resumed == an uninterrupted one (also with two ranks).
"""

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import update
from hapo import Group, batch_loss
from loss import hidden_logprobs
from tests.helpers import DRIVERS, ROOT, TORCHRUN, TRAIN_SMALL, build_batch, metrics, run, tiny_qwen2


def _toy_groups(vocab, n_groups=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    seq = lambda k: torch.randint(2, vocab, (k,), generator=g).tolist()
    groups = []
    for _ in range(n_groups):
        rewards = (torch.rand(n, generator=g) < 0.3).float().tolist()
        groups.append(Group(seq(rnd(2, 6)), [seq(rnd(1, 9)) for _ in range(n)], rewards, seq(rnd(3, 8)), 1.0))
    return groups


@pytest.mark.parametrize("split", ["rows", "token_budget", "packed"])
@pytest.mark.parametrize("method", ["hapo", "srft"])
def test_micro_batches_equal_whole_batch(method, split):
    """Eq. 8's global normaliser makes the loss and its gradient independent of the split: runs of
    5 rows, rows sorted by length and cut under a 40-token budget (uneven), or those packed into
    one row each with no padding at all."""
    model = tiny_qwen2(seed=1).double()
    batch = build_batch(_toy_groups(40), method, 0.8)
    n_tok = batch.num_tokens()
    whole, _ = batch_loss(model, batch, method, n_tok)
    whole.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cfg = SimpleNamespace(mini_batches=1, micro_batch=5, micro_batch_tokens=0 if split == "rows" else 40,
                          pack=split == "packed")
    micros = update.micro_batches(batch, cfg)[0]
    assert len(micros) >= 3 and sum(mb.rows() for mb in micros) == len(batch)
    if split != "rows":
        assert len({mb.rows() for mb in micros}) > 1  # uneven
    if split == "packed":
        assert all(len(mb) == 1 for mb in micros)
        assert sum(mb.input_ids.shape[1] for mb in micros) == int(batch.attention_mask.sum())  # no padding
    total = 0.0
    for mb in micros:
        part, _ = batch_loss(model, mb, method, n_tok)
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-9)
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.slow
def test_fused_logprobs_forward_and_backward_peak_memory_far_below_naive():
    """The fused function never holds the [B, T, V] logits or their gradient: at Qwen's vocabulary
    (2 x 512 positions, 622 MB of fp32 logits) its peak is a fraction of the naive one's."""
    peak = {}
    for kind in ("naive", "fused"):
        # glibc keeps freed blocks of up to 32 MB in its heap, which makes peak RSS depend on the
        # allocation history; forcing every large block through mmap makes a free a real free.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = run([sys.executable, os.path.join(DRIVERS, "logprob_backward_peak.py"), kind], env=env)
        peak[kind] = float(out.stdout.split()[0])
    assert peak["naive"] > 1200, peak  # the logits, their log_softmax and their gradient
    assert peak["fused"] < 0.25 * peak["naive"], peak  # measured: 1,789 MB naive, 306 MB fused


def test_optimizer_step_is_the_same_however_the_batch_is_cut():
    """update.optimize divides each micro-batch's loss by the token count of the whole batch (Eq. 8),
    not by its own: cut into runs of 3 rows, under a token budget, or packed, one SGD step moves the
    weights as the whole batch in one piece does, and logs the whole batch's loss and gradient norm."""
    from tests.test_options import _cfg
    from lib.parallel import Dist, Policy
    batch = build_batch(_toy_groups(40, n_groups=4), "hapo", 0.8)
    whole, _ = batch_loss(tiny_qwen2(seed=4).double(), batch, "hapo", batch.num_tokens())
    ref = None
    for kw in ({}, {"micro_batch": 3}, {"micro_batch_tokens": 30}, {"micro_batch_tokens": 30, "pack": True}):
        cfg = _cfg(grad_clip=1e9, **kw)  # no clipping: the step is the gradient itself
        assert (len(update.micro_batches(batch, cfg)[0]) > 1) == bool(kw)  # {}: one piece, the others: several
        model = tiny_qwen2(seed=4).double()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        m = update.optimize(Policy(model), opt, batch, cfg, Dist(), lr=1.0)
        weights = [p.detach().clone() for p in model.parameters()]
        ref = ref or (m, weights)
        assert m["train/loss"] == pytest.approx(whole.item(), abs=1e-9), kw
        assert m["train/grad_norm"] == pytest.approx(ref[0]["train/grad_norm"], rel=1e-9), kw
        assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(weights, ref[1])), kw


def test_first_of_several_updates_has_ratio_exactly_one():
    """pi_old is computed on the same micro-batches, at the same precision and temperature, as the
    loss: with lr 0 every update's ratio is exactly 1 (no spurious clipping)."""
    from tests.test_options import _cfg
    from lib.parallel import Dist, Policy
    model = tiny_qwen2(seed=2)
    batch = build_batch(_toy_groups(40, n_groups=4), "hapo", 0.8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    for kw in ({}, {"micro_batch": 3}, {"micro_batch_tokens": 30}, {"micro_batch_tokens": 30, "pack": True},
               {"temperature": 0.7}):
        m = update.optimize(Policy(model), opt, batch, _cfg(mini_batches=2, **kw), Dist(), lr=0.0)
        assert (m["train/ratio_mean"], m["train/ratio_max"], m["train/clip_frac"]) == (1.0, 1.0, 0.0), kw


def test_fused_logprobs_gradient_equals_autograd_fp32_and_bf16():
    """loss._FusedLogprobs against autograd through log_softmax, for log-probs and entropy."""
    torch.manual_seed(0)
    B, T, H, V = 3, 37, 16, 301
    targets = torch.randint(0, V, (B, T))
    a, b = torch.randn(B, T), torch.randn(B, T)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        hidden = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
        weight = (0.3 * torch.randn(V, H)).to(dtype).requires_grad_()
        logp, ent = hidden_logprobs(hidden, weight, targets, chunk_size=16, entropy=True)
        got = torch.autograd.grad((logp * a + ent * b).sum(), (hidden, weight))
        logits = (hidden @ weight.t()).float()
        ref_lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        ref_ent = torch.distributions.Categorical(logits=logits).entropy()
        want = torch.autograd.grad((ref_lp * a + ref_ent * b).sum(), (hidden, weight))
        assert torch.allclose(logp, ref_lp, atol=tol, rtol=tol) and torch.allclose(ent, ref_ent, atol=tol, rtol=tol)
        for g, w in zip(got, want):
            assert g.dtype == dtype
            assert (g.float() - w.float()).abs().max() <= tol * max(1.0, w.float().abs().max()), dtype


def test_chunked_logprobs_equal_log_softmax():
    """Chunks of 7 positions (a last, short one) give log_softmax's values and gradients."""
    torch.manual_seed(0)
    tgt = torch.randint(0, 301, (3, 17))
    hidden, w = torch.randn(3, 17, 16, requires_grad=True), torch.randn(301, 16, requires_grad=True)
    ref = torch.log_softmax(hidden @ w.t(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    out = hidden_logprobs(hidden, w, tgt, chunk_size=7)
    assert torch.allclose(out, ref, atol=1e-5)
    ga = torch.autograd.grad(out.sum(), (hidden, w))
    gb = torch.autograd.grad(ref.sum(), (hidden, w))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ga, gb))


@pytest.mark.slow
def test_train_resume_is_exact(tmp_path):
    """b exports its policy in bf16 and resumes exactly all the same: resume reads the fp32 shards."""
    import train
    from transformers import AutoModelForCausalLM
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = TRAIN_SMALL + ["--method", "hapo", "--save_every", "2", "--eval_every", "3"]
    train.main(common + ["--max_steps", "4", "--out_dir", a])
    train.main(common + ["--max_steps", "2", "--out_dir", b, "--save_dtype", "bf16"])
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(b, "step_000002"))  # dtype: the config's
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
    train.main(common + ["--max_steps", "4", "--out_dir", b, "--resume", "--save_dtype", "bf16"])
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    for ra, rb in zip(ma, mb):  # b also evaluated at its stop (step 2): compare what both logged
        assert {k for k in ra if k.startswith("train/")} == {k for k in rb if k.startswith("train/")}
        for k in ra.keys() & rb.keys():
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    # on a CPU the export is fp32 by default: the very weights that the shards hold
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(os.path.join(a, "step_000004")).parameters()} \
        == {torch.float32}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_step_equals_one_process(tmp_path):
    driver = os.path.join(DRIVERS, "two_ranks_step.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run([sys.executable, driver, str(one)], tmp_path)
    run(TORCHRUN + [driver, str(two)], tmp_path)
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    assert one.keys() == two.keys() == {"micro", "mini", "packed", "uneven"}
    for name in one:
        losses = [r["train/loss"] for r in one[name]]
        assert len(set(losses)) == 3, (name, losses)  # the weights moved: later steps test the optimizer too
        for step, (a, b) in enumerate(zip(one[name], two[name])):
            assert a.keys() == b.keys()
            assert a["train/teacher_injected"] > 0 and a["train/grad_norm"] > 0
            for k in a:  # loss, grad norm, and every metric reduced over ranks
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (name, step, k, a[k], b[k])


DIST_SMALL = TRAIN_SMALL + ["--method", "hapo", "--save_every", "2", "--eval_every", "3"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_train_checkpoint_and_resume_are_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train = TORCHRUN + [os.path.join(ROOT, "train.py")] + DIST_SMALL
    run(train + ["--max_steps", "4", "--out_dir", a])
    run(train + ["--max_steps", "2", "--out_dir", b])
    run(train + ["--max_steps", "4", "--out_dir", b, "--resume"])
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [0, 1, 2, 3, 4]  # rank 0 alone writes: one line a step
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    for r in ma[1:]:
        assert r["train/teacher_injected"] == 4  # a sum over ranks: the untrained model fails all 4 groups
        assert r["train/gate_open_frac"] == 1.0 and math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
    assert "eval/accuracy" in ma[0] and "eval/accuracy" in ma[3] and "eval/accuracy" in ma[4]
    for ra, rb in zip(ma, mb):  # b also evaluated at its stop (step 2): compare what both logged
        assert {k for k in ra if k.startswith("train/")} == {k for k in rb if k.startswith("train/")}
        for k in ra.keys() & rb.keys():
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    # the exported policy is the whole model, gathered from the shards, and loads in transformers
    import torch
    from transformers import AutoModelForCausalLM
    from lib import tiny
    ckpt = os.path.join(a, open(os.path.join(a, "latest")).read().strip())
    assert ckpt.endswith("step_000004") and sorted(os.listdir(a)) == ["completions.jsonl", "latest", "lock",
                                                                       "metrics.jsonl", "step_000002", "step_000004"]
    saved = AutoModelForCausalLM.from_pretrained(ckpt)
    init = tiny.make_model(tiny.make_tokenizer())
    assert saved.state_dict().keys() == init.state_dict().keys()
    for (name, p), q in zip(saved.named_parameters(), init.parameters()):
        assert p.shape == q.shape and not torch.equal(p, q), name  # full size, and trained
    # the training state: each rank wrote its own shard file, about half of model + AdamW each
    shards = {f: os.path.getsize(os.path.join(ckpt, "shards", f)) for f in os.listdir(os.path.join(ckpt, "shards"))}
    assert shards.keys() == {".metadata", "__0_0.distcp", "__1_0.distcp"}, shards
    whole = 3 * sum(p.numel() * 4 for p in init.parameters())  # fp32 weights and AdamW's two moments
    assert all(0.4 * whole < shards[f"__{r}_0.distcp"] < 0.6 * whole for r in (0, 1)), (shards, whole)
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    assert state["world"] == 2 and len(state["rng"]) == 2 and state["step"] == 4 and "optimizer" not in state
    # and one rank may not resume what two wrote: one line
    r = run([sys.executable, os.path.join(ROOT, "train.py"), *DIST_SMALL, "--max_steps", "5", "--out_dir", a,
             "--resume"], check=False)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "written by 2 rank(s), not 1" in lines[0], r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_load_the_weights_once_into_shards_equal_to_a_full_load(tmp_path):
    """train.py's loading under torchrun (models.load_policy, parallel.wrap): rank 1 builds the model
    on the meta device and its host memory never grows by a full copy; rank 0 reads the weights and
    broadcasts them. Every shard, buffer and forward pass equals a full load on every rank."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from lib import tiny
    tok = tiny.make_tokenizer()
    torch.manual_seed(0)  # 41M parameters, 157 MiB in fp32: far above the noise of a process's memory
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
                                         max_position_embeddings=256, tie_word_embeddings=True)).float()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run(TORCHRUN + [os.path.join(DRIVERS, "sharded_load.py"), str(tmp_path / "model"), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["shards_equal"] and r["buffers_equal"] and r["tied"] and r["logits_equal"], r
        assert r["sampler_equal"] and r["sampler_tied"], r  # the HF engine's full copy, from the shards
        assert r["local_mib"] == pytest.approx(r["full_mib"] / 2, rel=0.01), r
        assert r["timeout_s"] == 7 * 60, r  # parallel.init's timeout reached the process group
    assert not ranks[0]["built_on_meta"] and ranks[0]["grown_mib"] > ranks[0]["full_mib"], ranks[0]
    assert ranks[1]["built_on_meta"] and ranks[1]["grown_mib"] < ranks[1]["full_mib"], ranks[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_step_matches_the_fp32_reference():
    """On a GPU the update runs under bf16 autocast with token-budget micro-batches: its loss and
    gradient stay within bf16 rounding of the same step in fp32 on the CPU."""
    from tests.test_options import _cfg
    from lib.parallel import Dist, Policy
    batch = build_batch(_toy_groups(40, n_groups=4), "hapo", 0.8)
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_qwen2(seed=3).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dist = Dist(device=torch.device(device))
        m = update.optimize(Policy(model), opt, batch.to(device), _cfg(micro_batch_tokens=40), dist, lr=0.0)
        out[device] = (m["train/loss"], m["train/grad_norm"])
    assert out["cuda"] == pytest.approx(out["cpu"], rel=2e-2)
