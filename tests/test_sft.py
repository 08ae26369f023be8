"""`--method sft` and SFT-then-RL: the loss by hand (tier 1), micro-batches == the whole batch (tier 2),
and train.py end to end (tier 3): no rollouts sampled for training, no rollout metric logged, and an
RL run that starts from the SFT run's out_dir with a fresh optimizer."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import hapo
import update
from hapo import batch_loss, pack, teacher_only
from loss import hapo_loss
from lib.parallel import Dist, Policy
from tests.helpers import TRAIN_SMALL, tiny_qwen2

# metrics that only rollouts give a meaning: an sft row leaves them out rather than logging zeros
ROLLOUT_ONLY = ["train/reward", "train/response_len", "train/gate_open_frac", "train/confidence",
                "train/all_fail_frac", "train/zero_var_frac", "train/truncated_frac", "train/teacher_failed",
                "train/gamma", "train/clip_frac", "train/ratio_mean", "train/ratio_max", "train/logprob_gap",
                "time/tokens_per_s"]


def _problems(seqs):
    """(prompt ids, teacher ids) pairs as the encoded problems train.py hands to teacher_only."""
    return [SimpleNamespace(prompt_ids=p, solution_ids=s) for p, s in seqs]


# ----------------------------------------------------------------------------
# tier 1: by hand


def test_sft_samples_nothing_and_trains_each_teacher_alone():
    assert "sft" in hapo.METHODS and hapo.METHODS["sft"][2] == "sft"
    assert hapo.rollouts_per_group("sft", 8) == 0
    groups, adv = teacher_only(_problems([([5, 6], [7, 8, 3]), ([5, 6, 9], [3])]))
    assert [g.responses for g in groups] == [[[7, 8, 3]], [[3]]] and [g.teacher_at for g in groups] == [0, 0]
    assert adv.shape == (2, 1) and not adv.any()
    assert hapo.teacher_metrics(groups) == ({"train/teacher_injected": 2}, {})


def test_sft_loss_by_hand():
    """-log p averaged over the teacher tokens of the batch, with the normaliser passed in.

    Prompts of 2 and 3 tokens with teachers of 3 and 1: the loss mask holds exactly those 4 teacher
    positions. With log p = ln(1/2), ln(1/4), ln 1 on the first teacher and ln(1/8) on the second,
    the loss is (ln 2 + 2 ln 2 + 0 + 3 ln 2) / 4 = 1.5 ln 2; over a global count of 8 tokens, half that.
    Through the model: a policy whose logits are all 0 gives every token log p = -ln V, so the loss
    is ln V (and ln V / 2 over twice the tokens)."""
    groups, adv = teacher_only(_problems([([5, 6], [7, 8, 3]), ([5, 6, 9], [3])]))
    batch = pack(groups, adv, pad_id=0)
    assert batch.num_tokens() == 4 and batch.teacher.all()
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]  # position t predicts token t+1
    logp = torch.zeros(2, 4)
    logp[0, 1:4] = torch.log(torch.tensor([0.5, 0.25, 1.0]))
    logp[1, 2] = math.log(0.125)
    logp[0, 0] = logp[1, 0] = logp[1, 3] = -7.0  # outside the mask: must not count
    loss = lambda n: hapo_loss(logp, logp, batch.advantages, batch.loss_mask, batch.teacher, num_tokens=n,
                               teacher_loss=hapo.METHODS["sft"][2]).item()
    assert loss(4) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert loss(8) == pytest.approx(0.75 * math.log(2), abs=1e-6)

    model = tiny_qwen2(vocab=40).double()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # last hidden state 0 -> logits 0 -> uniform over 40 tokens
    assert batch_loss(model, batch, "sft", 4)[0].item() == pytest.approx(math.log(40), abs=1e-9)
    assert batch_loss(model, batch, "sft", 8)[0].item() == pytest.approx(math.log(40) / 2, abs=1e-9)


# ----------------------------------------------------------------------------
# tier 2: micro-batches == the whole batch


@pytest.mark.parametrize("split", ["rows", "token_budget", "packed"])
def test_sft_micro_batches_equal_whole_batch(split):
    """Eq. 8's one normaliser over the batch's teacher tokens, passed to every micro-batch: the summed
    micro-batch losses and gradients equal the whole batch's, for rows of 2, an uneven token budget,
    and packed rows; and update.optimize takes the same step as one whole-batch micro-batch."""
    g = torch.Generator().manual_seed(3)
    seq = lambda lo, hi: torch.randint(4, 40, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
    batch = pack(*teacher_only(_problems([(seq(2, 6), seq(1, 12)) for _ in range(7)])), pad_id=0)
    model = tiny_qwen2(seed=2).double()
    n_tok = batch.num_tokens()
    whole, _ = batch_loss(model, batch, "sft", n_tok)
    whole.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    cfg = SimpleNamespace(mini_batches=1, micro_batch=2, micro_batch_tokens=0 if split == "rows" else 30,
                          pack=split == "packed")
    micros = update.micro_batches(batch, cfg)[0]
    assert len(micros) >= 3 and sum(mb.rows() for mb in micros) == len(batch)
    total = 0.0
    for mb in micros:
        part, _ = batch_loss(model, mb, "sft", n_tok)
        part.backward()
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-9)
    for a, b in zip(ref, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-9)

    # the update itself: micro-batched == whole, and with several mini-batches no pi_old is computed
    step = dict(method="sft", clip_eps=0.2, shaping_gamma=0.1, chunk_size=1024, grad_clip=1e9, temperature=1.0,
                entropy_coef=0.0, clip_on_policy=True, is_correction=False, is_cap=2.0, is_level="token",
                is_mode="truncate", loss_norm="token_mean", max_new_tokens=16, micro_batch_tokens=cfg.micro_batch_tokens, pack=cfg.pack)
    after = []
    for micro_batch, mini_batches in ((len(batch), 1), (2, 1), (2, 2)):
        m = tiny_qwen2(seed=2).double()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        out = update.optimize(Policy(m), opt, batch, SimpleNamespace(mini_batches=mini_batches, micro_batch=micro_batch,
                                                                     **step), Dist(), lr=0.1)
        assert not any(k.startswith(("train/clip", "train/ratio")) for k in out) and "train/logprob_gap" not in out
        after.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(after[0], after[1]))
    assert any(not torch.allclose(a, b) for a, b in zip(after[0], after[2]))  # two steps, not one


# ----------------------------------------------------------------------------
# tier 3: train.py


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.slow
def test_train_sft_samples_only_to_evaluate_and_logs_no_rollout_metric(tmp_path, monkeypatch):
    import rollout
    import train
    calls = []
    generate = rollout.HFEngine.generate

    def spy(self, prompts, n, *args, logprobs=False, **kw):  # training asks for log-probs, evaluation does not
        calls.append(("train" if logprobs else "eval", n))
        return generate(self, prompts, n, *args, logprobs=logprobs, **kw)
    monkeypatch.setattr(rollout.HFEngine, "generate", spy)
    out = str(tmp_path / "sft")
    train.main(TRAIN_SMALL + ["--max_steps", "4", "--out_dir", out, "--method", "sft", "--log_completions_every", "2"])
    assert calls and all(kind == "eval" for kind, _ in calls), calls  # step 0, 2, 4: evaluation only
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and all("eval/accuracy" in rows[s] for s in (0, 2, 4))
    for r in rows[1:]:
        assert not [k for k in ROLLOUT_ONLY if k in r], r
        assert r["train/teacher_injected"] == 4 and math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        assert r["train/loss"] > 0  # a mean of -log p
    assert rows[-1]["train/loss"] < rows[1]["train/loss"]  # it imitates
    logged = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    train_rows = [c for c in logged if not c.get("eval")]
    assert train_rows and all(c["teacher"] and c["reward"] == 1.0 for c in train_rows)
    assert open(os.path.join(out, "latest")).read().strip() == "step_000004"


@pytest.mark.slow
def test_train_sft_leaves_out_unverified_teachers(tmp_path, capsys):
    """Teachers that fail their own verification are never trained on: with every one wrong, a one-line error;
    with half wrong, every logged teacher is a verified one."""
    import train
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"{a} + {b} = {a + b + (i % 2)}. \\boxed{{{a + b + (i % 2)}}}"}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 5), (6, 1), (8, 8)])]
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps(r) + "\n" for r in rows[1::2]))
    small = TRAIN_SMALL + ["--batch_prompts", "2"]
    with pytest.raises(SystemExit) as e:
        train.main(small + ["--data", str(wrong), "--eval_data", str(half), "--out_dir", str(tmp_path / "w"),
                            "--method", "sft", "--max_steps", "1"])
    assert e.value.code == 2 and "none of the 4 teacher solutions passes verification" in capsys.readouterr().err
    out = str(tmp_path / "h")
    train.main(small + ["--data", str(half), "--eval_data", str(half), "--out_dir", out, "--method", "sft",
                        "--max_steps", "2", "--log_completions_every", "1"])
    logged = [json.loads(line) for line in open(os.path.join(out, "completions.jsonl"))]
    teachers = [c["completion"] for c in logged if not c.get("eval")]
    assert len(teachers) == 4  # 2 steps x 2 groups
    assert set(teachers) <= {r["solution"] for r in rows[0::2]}, teachers


@pytest.mark.slow
def test_sft_then_grpo_starts_from_the_sft_out_dir_with_a_fresh_optimizer(tmp_path, monkeypatch):
    """SFT-then-RL: `--model <sft out_dir>` loads its latest checkpoint's weights, and the RL run starts at
    step 0 with a fresh optimizer: a new run, not a resumed one."""
    from lib import models
    import train
    sft, rl = str(tmp_path / "sft"), str(tmp_path / "grpo")
    train.main(TRAIN_SMALL + ["--max_steps", "2", "--out_dir", sft, "--method", "sft"])
    loaded = []
    load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, *a, **kw: loaded.append(path) or load(path, *a, **kw))
    train.main(TRAIN_SMALL + ["--max_steps", "2", "--out_dir", rl, "--method", "grpo", "--model", sft])
    assert loaded == [os.path.join(sft, "step_000002")]
    rows = _rows(rl)
    assert [r["step"] for r in rows] == [0, 1, 2] and "train/reward" in rows[1]
    state = torch.load(os.path.join(rl, "step_000002", "state.pt"), weights_only=False)
    assert state["step"] == 2 and state["config"]["model"] == sft and state["config"]["method"] == "grpo"
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(os.path.join(rl, "step_000002", "shards"), tmp_path / "shards.pt")  # the shards as one file
    adam = torch.load(tmp_path / "shards.pt", weights_only=False)["optimizer"]["state"]
    adam_steps = {float(s["step"]) for s in adam.values()}
    assert adam_steps == {2.0}  # AdamW counted this run's 2 steps only: not 2 + the SFT run's 2
    # the same out_dir for both stages would resume the SFT run as GRPO, or delete it: one line each
    with pytest.raises(SystemExit):
        train.main(TRAIN_SMALL + ["--max_steps", "4", "--out_dir", sft, "--method", "grpo", "--model", sft,
                                  "--overwrite"])
    assert os.path.isdir(os.path.join(sft, "step_000002"))
