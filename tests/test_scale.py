"""The scale tier: the 7B and 1.5B recipes rehearsed on the CPU, in seconds, without weights.

torch's fake process group plays rank 0 of 8 (one node) or 16 (two nodes); Qwen2.5-Math's shipped
config.json files (tests/data/) build the model on the meta device; the project's own parallel.wrap
shards it (FSDP2, bf16 compute, grad checkpointing); FakeTensorMode gives the shards storage that
does not exist; and FSDP2's memory tracker counts the bytes of one micro-batch's forward, backward
and AdamW step through hapo.batch_loss, the loss a run computes. plan.py must agree with it within
15%, and the weights the trainer pushes must be what vLLM's Qwen2 loader takes.
"""

import ast
import dataclasses
import os

import pytest
import torch

from tests.helpers import ROOT
from tests.test_vllm import needs_vllm

DATA = os.path.join(ROOT, "tests", "data")
QWEN_7B, QWEN_15B = os.path.join(DATA, "qwen2.5-math-7b"), os.path.join(DATA, "qwen2.5-math-1.5b")
# vLLM 0.32.0, vllm/model_executor/models/qwen2.py, Qwen2Model.hf_to_vllm_mapper: HF name part -> (vLLM's, shard)
VLLM_STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
                ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}


def recipe(**kw):
    """train.py's Config for the 7B recipe's micro-batch: 4 rows of 1,024 + 7,168 tokens under a
    32,768-token budget (rows of this length fill it exactly, so the rehearsal's shape is the plan's)."""
    import train
    base = dict(max_prompt_tokens=1024, max_new_tokens=7168, max_solution_tokens=7168, micro_batch_tokens=32768,
                max_positions=16384,  # LUFFY's 16k copy, as the paper recipe runs it
                batch_prompts=128, group_size=8, grad_checkpointing=True, rollout="vllm")
    return dataclasses.replace(train.Config(), **{**base, **kw})


def fake_world(world):
    """Rank 0 of `world` under torch's fake process group (collectives return at once, unfilled)."""
    import torch.distributed as tdist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return tdist


def fake_policy(path, world, cfg):
    """(policy, model, config): the model of `path` on the meta device, wrapped by parallel.wrap as a
    rank of `world` on a GPU would be (bf16 FSDP2), then given fake storage. Call inside FakeTensorMode
    for the last step; the sharding itself runs outside it (DeviceMesh reads real rank numbers)."""
    from lib import parallel
    from transformers import AutoConfig, Qwen2ForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    policy = parallel.wrap(model, parallel.Dist(0, world, torch.device("cpu")), cfg.grad_checkpointing, bf16=True,
                           keep_meta=True)
    return policy, model, config


def rehearse(path, world, cfg):
    """(tracker's peak by category in bytes, plan.trainer's dict): one micro-batch
    of cfg's shape through forward, backward and AdamW's step on rank 0 of `world`, with AdamW's
    state and an earlier micro-batch's gradients already there (the steady state of a step)."""
    import hapo
    from lib import plan
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    tdist = fake_world(world)
    try:
        policy, model, config = fake_policy(path, world, cfg)
        tokens, rows, longest = plan.micro_batch(cfg, plan.shape_of(config), world)
        rows = int(rows)
        assert rows * longest == tokens, "the rehearsal's micro-batch must be the plan's"
        ids = torch.randint(0, config.vocab_size, (rows, longest))
        mask = torch.ones(rows, longest, dtype=torch.long)
        mask[-1, longest // 2:] = 0  # a padded row, as token-budget micro-batches have
        batch = hapo.Batch(ids, mask, mask[:, 1:].float(), torch.randn(rows), torch.zeros(rows, dtype=torch.bool))
        with FakeTensorMode(allow_non_fake_inputs=True):
            policy.to_empty(device="cpu")
            opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
            for p in policy.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()  # AdamW's two moments exist, and the gradients of an earlier micro-batch
            tracker = FSDPMemTracker(policy, opt)
            with tracker:
                loss, _ = policy(hapo.batch_loss, batch, cfg.method, float(tokens), cfg.clip_eps, cfg.shaping_gamma,
                                 cfg.chunk_size, cfg.temperature, cfg.entropy_coef)
                (loss * world).backward()
                # torch.nn.utils.clip_grad_norm_ is left out: on fake tensors it all-gathers the
                # gradients, which it does not on real ones (test_clip_grad_norm_keeps_shards)
                opt.step()
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    finally:
        tdist.destroy_process_group()
    measured = {getattr(k, "value", k): v for k, v in peak.items()}
    return measured, plan.trainer(plan.shape_of(config), cfg, world, cuda=False)


def _weights(model):
    from lib import weight_sync
    return weight_sync.weights_for_sync(model)


@pytest.mark.slow
@pytest.mark.parametrize("name,world,checkpointing", [("7b", 8, True), ("7b", 16, True), ("1.5b", 8, True),
                                                       ("1.5b", 8, False)])
def test_plan_matches_fsdp2_memory_tracker(name, world, checkpointing):
    """plan.py's trainer figures against FSDP2's memory tracker: the shards exactly, the peak within 15%."""
    path = {"7b": QWEN_7B, "1.5b": QWEN_15B}[name]
    measured, planned = rehearse(path, world, recipe(grad_checkpointing=checkpointing))
    gib = lambda x: round(x / 2 ** 30, 2)
    print(f"{name} x{world} checkpointing={checkpointing}: tracker peak {gib(measured['Total'])} GiB, plan "
          f"{gib(planned['peak'])} GiB; {({k: gib(v) for k, v in measured.items() if v})}")
    assert measured["Sharded Param"] == pytest.approx(planned["parameters"], rel=0.01)  # fp32 shard, padding and all
    assert measured["OptState"] == pytest.approx(planned["optimizer"], rel=0.01)  # AdamW's two fp32 moments
    assert measured["Total"] == pytest.approx(planned["peak"], rel=0.15)


@pytest.mark.slow
def test_plan_would_catch_a_wrong_model():
    """The tolerance is not so wide that a plan without grad checkpointing passes for one with it."""
    from lib import plan
    from transformers import AutoConfig
    s = plan.shape_of(AutoConfig.from_pretrained(QWEN_7B))
    with_ckpt = plan.trainer(s, recipe(), 8, cuda=False)["peak"]
    without = plan.trainer(s, recipe(grad_checkpointing=False), 8, cuda=False)["peak"]
    assert without > 3 * with_ckpt


def vllm_layout(config):
    """{vLLM parameter: rows} of Qwen2ForCausalLM as vLLM 0.32 builds it (fused qkv and gate_up)."""
    hd = config.hidden_size // config.num_attention_heads
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    out = {"model.embed_tokens.weight": config.vocab_size, "model.norm.weight": config.hidden_size}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.qkv_proj.weight": q + 2 * kv, p + "self_attn.qkv_proj.bias": q + 2 * kv,
                    p + "self_attn.o_proj.weight": config.hidden_size, p + "mlp.gate_up_proj.weight": 2 * inter,
                    p + "mlp.down_proj.weight": config.hidden_size, p + "input_layernorm.weight": config.hidden_size,
                    p + "post_attention_layernorm.weight": config.hidden_size})
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = config.vocab_size
    return out


def vllm_load(stream, config, stacked=VLLM_STACKED):
    """What vLLM's loader makes of a weight stream: {vLLM parameter: rows received}, or an error for a
    name it does not know. Tied heads: `lm_head.weight` is an alias of the embeddings and skipped
    (AutoWeightsLoader._filter_skipped), so the embeddings must come."""
    layout, got = vllm_layout(config), {}
    for name, shape in stream:
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        for part, (new, _) in stacked.items():
            if part in name:
                name = name.replace(part, new, 1)
        assert name in layout, f"vLLM's Qwen2 has no parameter {name}"
        got[name] = got.get(name, 0) + shape[0]
    return got


@pytest.mark.slow
@pytest.mark.parametrize("path", [QWEN_7B, QWEN_15B], ids=["7b", "1.5b"])
def test_weight_sync_names_and_shapes_are_what_vllm_loads(path):
    """weight_sync.weights_for_sync over the FSDP2-sharded, checkpointed trainer (rank 0 of 8): every
    vLLM parameter receives exactly its rows, in names vLLM's Qwen2 loader maps."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cfg = recipe()
    tdist = fake_world(8)
    try:
        policy, model, config = fake_policy(path, 8, cfg)
        with FakeTensorMode(allow_non_fake_inputs=True):
            policy.to_empty(device="cpu")
            stream = [(name, tuple(t.shape)) for name, t in _weights(model)]
    finally:
        tdist.destroy_process_group()
    assert vllm_load(stream, config) == vllm_layout(config)
    assert ("lm_head.weight" in dict(stream)) != config.tie_word_embeddings
    with pytest.raises(AssertionError, match="no parameter"):  # the check can fail: an unmapped name
        vllm_load(stream + [("model.layers.0.self_attn.qkv.weight", (8, 8))], config)


@needs_vllm
def test_vllm_qwen2_loader_mapping_is_the_one_rehearsed():
    """VLLM_STACKED is what the installed vLLM's Qwen2 loader maps, read from its source."""
    import vllm.model_executor.models.qwen2 as qwen2
    tree = ast.parse(open(qwen2.__file__).read())
    found = [ast.literal_eval(n.value) for n in ast.walk(tree)
             if isinstance(n, ast.keyword) and n.arg == "orig_to_new_stacked"]
    assert found == [VLLM_STACKED]


@pytest.mark.slow
def test_clip_grad_norm_keeps_shards():
    """Why the rehearsal leaves clipping out: on real tensors under FSDP2, clip_grad_norm_ allocates
    nothing the size of the gradients (a small model, 8 fake ranks, real storage)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from lib import parallel
    tdist = fake_world(8)
    try:
        config = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        policy = parallel.wrap(model, parallel.Dist(0, 8, torch.device("cpu")), bf16=True, keep_meta=True)
        policy.to_empty(device="cpu")
        for p in policy.parameters():
            p.grad = torch.ones_like(p)
        tracker = FSDPMemTracker(policy)
        with tracker:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        peak = {getattr(k, "value", k): v for k, v in next(iter(tracker.get_tracker_snapshot("peak").values())).items()}
    finally:
        tdist.destroy_process_group()
    assert peak["Total"] < 1.01 * (peak["Sharded Param"] + peak["Sharded Grad"])


# ----------------------------------------------------------------------------
# --plan on the command line (fast: arithmetic on a config.json)

README_7B = ["--batch_prompts", "128", "--group_size", "8", "--mini_batches", "2", "--lr", "1e-6", "--max_new_tokens",
             "8192", "--micro_batch_tokens", "32768", "--grad_checkpointing", "--entropy_coef", "0.001", "--rollout",
             "vllm", "--eval_every", "25", "--save_every", "50", "--vllm_gpu_memory", "0.35"]  # vLLM's share before the recipe


def run_plan(capsys, model, *flags):
    """train.py's --plan in this process: (the table, the last line's JSON)."""
    import json
    import train
    train.main(["--model", model, *flags])  # returns: exit status 0 whether or not the run fits
    lines = capsys.readouterr().out.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def test_plan_parameters_and_kv_cache_by_hand():
    from lib import plan
    from transformers import AutoConfig
    s7, s15 = (plan.shape_of(AutoConfig.from_pretrained(p)) for p in (QWEN_7B, QWEN_15B))
    # 7B: 28 x (q 3584^2 + 3584, k and v 512 x 3584 + 512, o 3584^2, MLP 3 x 3584 x 18944, norms 2 x 3584)
    #     + embeddings and head 2 x 152,064 x 3584 + the final norm
    assert plan.parameters(s7) == 28 * 233_057_792 + 2 * 152_064 * 3584 + 3584 == 7_615_616_512
    # 1.5B: 28 x 46,797,824 + the embeddings 151,936 x 1536 (tied: they are the head too) + the final norm
    assert plan.parameters(s15) == 28 * 46_797_824 + 151_936 * 1536 + 1536 == 1_543_714_304
    assert plan.kv_bytes_per_token(s7) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert plan.kv_bytes_per_token(s7, tp=2) == 28_672
    # an FSDP2 shard of 8 pads dim 0: 152,064 rows split 19,008 each; 1,536 split 192
    assert plan.numel((152_064, 3584), 8) == 19_008 * 3584 and plan.numel((1536,), 8) == 192


def test_plan_7b_recipe_fits_on_8x80_not_on_1x80(capsys):
    table, out = run_plan(capsys, QWEN_7B, *README_7B, "--plan", "8x80")
    assert out["fits"] is True and out["world"] == 8
    for part in ("parameters (fp32)", "gradients (fp32)", "AdamW", "all-gathers", "activations", "layer backward",
                 "logits backward", "weight sync", "vLLM", "KV cache", "CUDA", "host RAM", "at start", "at a save",
                 "checkpoint", "one save, per rank", "FITS"):
        assert part in table, part
    assert 30 < out["trainer_gib"] < 45 and out["vllm_gib"] == 28.0 and out["per_gpu_gib"] < 76
    assert 150_000 < out["kv_cache_tokens"] < 200_000 and out["checkpoint_gb"] == pytest.approx(106.6, abs=0.1)
    assert any("sequences at once" in w for w in out["warnings"])  # ~19 of this rank's 128 at a time
    _, one = run_plan(capsys, QWEN_7B, *README_7B, "--plan", "1x80")
    assert one["fits"] is False and one["trainer_gib"] > 100 and any("over the card" in w for w in one["warnings"])
    _, two_nodes = run_plan(capsys, QWEN_7B, *README_7B, "--plan", "2x8x80")
    assert two_nodes["world"] == 16 and two_nodes["trainer_gib"] < out["trainer_gib"]


def test_plan_1_5b_fits_on_one_80gib_gpu(capsys):
    _, out = run_plan(capsys, QWEN_15B, *README_7B, "--plan", "1x80")
    assert out["fits"] is True and out["world"] == 1


def test_plan_warns_of_too_few_positions(capsys):
    _, out = run_plan(capsys, QWEN_7B, *README_7B, "--max_prompt_tokens", "1024", "--max_positions", "4096",
                      "--plan", "8x80")  # the shipped 4,096, not the recipe's 16k copy
    assert any("positions too short" in w and "9,216" in w and "4,096" in w for w in out["warnings"])
    _, short = run_plan(capsys, QWEN_7B, *README_7B, "--max_new_tokens", "3072", "--max_solution_tokens", "3072",
                        "--plan", "8x80")
    assert not any("positions" in w for w in short["warnings"])


def test_plan_needs_grad_checkpointing_for_the_7b_recipe(capsys):
    flags = [f for f in README_7B if f != "--grad_checkpointing"]
    _, out = run_plan(capsys, QWEN_7B, *flags, "--no-grad_checkpointing", "--plan", "8x80")  # the recipe has it
    assert out["fits"] is False and any("the trainer needs" in w for w in out["warnings"])


@pytest.mark.parametrize("bad", ["8", "x80", "0x80", "8x", "8x0", "abc"])
def test_plan_bad_value_is_one_line_and_exit_2(capsys, bad):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--model", QWEN_7B, "--plan", bad])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "--plan" in err and "NODESx" in err


def test_plan_without_a_config_is_one_line_and_exit_2(capsys, tmp_path):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(tmp_path), "--plan", "8x80"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "config.json" in err


# ----------------------------------------------------------------------------
# benchmarks/gpu_check.py's checks for the first GPU run, on the CPU


def gpu_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_says_so_and_exits_0(capsys, monkeypatch):
    module = gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--checks", "scale"])
    module.main()  # returns: no SystemExit
    assert "no CUDA device" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_scale_checks_pass_on_cpu():
    """Checks 4 (grad checkpointing) and 5 (save and resume under a one-rank process group, FSDP2-
    sharded) with gloo on the CPU and a narrow model: what the GPU run repeats with NCCL."""
    module = gpu_check()
    config = module.small_config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=2, vocab_size=512, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    ckpt = module.run_check("grad_checkpointing", module.check_grad_checkpointing, torch.device("cpu"), config)
    assert ckpt["ok"], ckpt
    saved = module.run_check("save_resume", module.check_save_resume, torch.device("cpu"), config)
    assert saved["ok"] and saved["weights_equal"] and saved["adamw_equal"], saved
    assert saved["fsdp2"]["ok"] and saved["fsdp2"]["weights_equal"] and saved["fsdp2"]["adamw_equal"], saved
