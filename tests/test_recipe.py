"""The card's command: `python train.py --model Qwen/Qwen2.5-Math-7B` takes the paper's recipe, checks
that the run fits the machine before any weight is read, and starts one rank per GPU (issue 29).

Tiers 1-2 in this process: the recipes (--print_config), --plan with the recipe's own values, the
pre-flight against faked CUDA devices (monkeypatch: a device count and each card's memory), the
auto-launch's choice of ranks. Tier 3: the CPU refusal as a user meets it (a child process, timed), and
`python train.py --nproc 2` against `torchrun --nproc_per_node 2 train.py` (gloo)."""

import json
import os
import sys
import time

import pytest
import torch

from tests.helpers import ONE_THREAD, ROOT, TORCHRUN, TRAIN_SMALL, metrics, run, train_here

QWEN_7B = os.path.join(ROOT, "tests", "data", "qwen2.5-math-7b")
QWEN_1_5B = os.path.join(ROOT, "tests", "data", "qwen2.5-math-1.5b")
H100_GIB = 79.2  # what CUDA reports of an H100 "80GB"


def config_of(capsys, *args):
    r = train_here(capsys, *args, "--print_config")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# recipes


def test_the_7b_gets_the_papers_recipe_and_the_tiny_model_the_laptops(capsys):
    import train
    paper = config_of(capsys, "--model", QWEN_7B)
    assert paper["recipe"] == "paper" and paper["lr"] == 1e-6 and paper["lr_schedule"] == "constant"
    assert (paper["batch_prompts"], paper["group_size"], paper["mini_batches"]) == (128, 8, 2)
    assert paper["max_new_tokens"] == 8192 and paper["temperature"] == 1.0 and paper["eval_temperature"] == 0.6
    assert paper["data"] == "Elliott/Openr1-Math-46k-8192" and paper["eval_data"] == "HuggingFaceH4/MATH-500"
    assert paper["grad_checkpointing"] and paper["micro_batch_tokens"] > 0 and paper["entropy_coef"] == 0.001
    assert paper["save_every"] == 50
    # 4,096 positions are too few for 1,024 + 8,192: LUFFY's 16k copy's settings
    assert (paper["max_positions"], paper["rope_theta"]) == (16384, 40000.0)
    laptop = config_of(capsys)
    default = {k: v for k, v in vars(train.Config()).items() if k not in ("recipe", "print_config")}
    assert laptop["recipe"] == "laptop" and {k: laptop[k] for k in default} == default


def test_a_flag_given_wins_and_the_first_line_names_it(capsys):
    from lib.parallel import Dist
    import train
    assert config_of(capsys, "--model", QWEN_7B, "--lr", "2e-6")["lr"] == 2e-6
    assert config_of(capsys, "--model", QWEN_7B, "--recipe", "laptop")["lr"] == 5e-4
    assert config_of(capsys, "--recipe", "paper")["batch_prompts"] == 128
    _, note = train.parse_args(["--model", QWEN_7B, "--lr", "2e-6", "--group_size", "8", "--no-grad_checkpointing"],
                               Dist())
    assert note.startswith("recipe: paper (") and "--lr 2e-06" in note and "--no-grad_checkpointing" in note
    assert "--group_size" not in note  # the recipe's own value: no difference


def test_only_the_papers_models_get_luffys_positions(tmp_path, capsys):
    """LUFFY's 16k settings for a Qwen2.5-Math model with too few positions; another model with too few
    is left to the run's one-line refusal, and a Qwen2.5-Math copy with enough needs none."""
    import shutil
    assert config_of(capsys, "--model", QWEN_1_5B)["max_positions"] == 16384
    other = tmp_path / "some-llm"
    shutil.copytree(QWEN_1_5B, other)
    assert config_of(capsys, "--model", str(other))["max_positions"] == 0
    roomy = tmp_path / "qwen2.5-math-32k"
    shutil.copytree(QWEN_1_5B, roomy)
    config = json.load(open(roomy / "config.json"))
    json.dump({**config, "max_position_embeddings": 32768}, open(roomy / "config.json", "w"))
    assert config_of(capsys, "--model", str(roomy))["max_positions"] == 0


def test_a_run_from_a_laptop_checkpoint_keeps_the_laptop_recipe(tmp_path, capsys):
    """SFT-then-RL on the laptop: --model <out_dir> of a run that used it (and of an older run, with no
    recipe in its saved config, that trained the built-in model)."""
    import train
    step = tmp_path / "sft" / "step_000002"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (tmp_path / "sft" / "latest").write_text("step_000002")
    for saved in ({**vars(train.Config()), "recipe": "laptop", "model": "elsewhere"}, {"model": "tiny"}):
        torch.save({"step": 2, "config": saved}, step / "state.pt")
        assert config_of(capsys, "--model", str(tmp_path / "sft"))["recipe"] == "laptop"
    torch.save({"step": 2, "config": {"model": "Qwen/Qwen2.5-Math-7B", "recipe": "paper"}}, step / "state.pt")
    assert config_of(capsys, "--model", str(tmp_path / "sft"))["recipe"] == "paper"


def test_the_recipe_fits_8x80_and_not_1x80(capsys):
    """--plan with no flag but the model's: the paper's values fit eight 80 GiB GPUs, with no warning
    about positions (LUFFY's 16k copy), and do not fit one."""
    for hw, fits in (("8x80", True), ("1x80", False)):
        r = train_here(capsys, "--model", QWEN_7B, "--plan", hw)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert r.returncode == 0 and out["fits"] is fits, out
        assert not any("positions" in w for w in out["warnings"])
    assert out["max_micro_batch_tokens"] is None or out["max_micro_batch_tokens"] > 0  # offered with the plan


# ----------------------------------------------------------------------------
# the pre-flight, against faked CUDA devices


@pytest.fixture
def gpus(monkeypatch):
    """fake(n, gib): n CUDA devices of gib GiB each, as the pre-flight and the auto-launch see them."""
    allocator = []  # PYTORCH_CUDA_ALLOC_CONF when CUDA was first asked a question that starts it

    def fake(n, gib=H100_GIB):
        from types import SimpleNamespace
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: allocator.append(
            os.environ.get("PYTORCH_CUDA_ALLOC_CONF")) or SimpleNamespace(total_memory=gib * 2 ** 30))
        for var in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK",
                    "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
            monkeypatch.delenv(var, raising=False)
        return allocator
    return fake


@pytest.fixture
def vllm_here(monkeypatch):
    """--rollout auto resolves to vLLM, as on a GPU node where it is installed (the pre-flight plans for it)."""
    import train
    monkeypatch.setattr(train, "resolve_engine", lambda kind: ("vllm", "faked"))


@pytest.fixture
def launched(monkeypatch):
    """Where train.py would start ranks: (n, script, argv) recorded instead, and the exit code 0."""
    from lib import parallel
    calls = []
    monkeypatch.setattr(parallel, "spawn", lambda n, script, argv: calls.append((n, script, argv)) or 0)
    return calls


def test_preflight_refuses_one_h100_naming_the_torchrun_line(gpus, vllm_here, launched, capsys):
    allocator = gpus(1)
    r = train_here(capsys, "--model", QWEN_7B)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and not launched, err
    assert err.startswith("train.py: error: does not fit: ") and "GiB per GPU of 79.2" in err
    assert "fits: torchrun --nproc_per_node 8 train.py --model" in err and "--plan 8x79.2" in err
    assert allocator == ["expandable_segments:True"]  # set before the pre-flight started CUDA


def test_preflight_accepts_eight_h100s_and_the_auto_launch_starts_eight(gpus, vllm_here, launched, capsys):
    gpus(8)
    r = train_here(capsys, "--model", QWEN_7B)
    assert r.returncode == 0 and launched and launched[0][0] == 8, r.stderr
    assert r.stdout.startswith("train.py: starting 8 ranks on this node")
    assert launched[0][1] == os.path.join(ROOT, "train.py") and launched[0][2] == ["--model", QWEN_7B]


def test_auto_launch_picks_n(gpus, launched, monkeypatch):
    from lib.parallel import ranks_to_start
    gpus(4)
    assert ranks_to_start(0) == 4 and ranks_to_start(2) == 2 and ranks_to_start(1) == 1
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun started us: it chose the ranks
    assert ranks_to_start(0) == 0
    gpus(0)
    assert ranks_to_start(0) == 1


def test_preflight_offers_a_flag_when_more_ranks_would_not_help(gpus, vllm_here, launched, capsys):
    """All eight GPUs in use, and a 131,072-token micro-batch's activations do not fit beside vLLM; a
    smaller budget does: the line names it."""
    gpus(8)
    r = train_here(capsys, "--model", QWEN_7B, "--micro_batch_tokens", "131072")
    err = r.stderr.strip()
    assert r.returncode == 2 and "does not fit" in err and "--micro_batch_tokens " in err.split("fits:")[1], err


def test_without_vllm_the_preflight_says_to_install_it(gpus, launched, capsys):
    import train
    gpus(8)
    assert train.resolve_engine("auto")[0] == "hf"  # no vLLM in this environment
    err = train_here(capsys, "--model", QWEN_7B).stderr.strip()
    assert "with the HF engine" in err and "fits: vLLM" in err and not launched, err


def test_no_preflight_goes_on_and_the_cpu_refusal_names_the_ram(gpus, capsys, monkeypatch):
    from lib import preflight
    gpus(0)
    r = train_here(capsys, "--model", QWEN_7B)
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "GiB of host RAM" in err, err
    assert f"this machine has {preflight.host_ram_gib():.1f} GiB" in err and "fits: a GPU node: torchrun" in err
    import launch
    monkeypatch.setattr(launch, "start", lambda cfg, dist: sys.exit(7))  # where the weights would be read
    assert train_here(capsys, "--model", QWEN_7B, "--no-preflight").returncode == 7


def test_the_laptop_run_fits_this_machine():
    from lib import preflight
    from lib.models import load_config, resolve_model
    import train
    cfg = train.Config()
    hw = preflight.hardware(1, cuda=False)
    assert preflight.check(load_config(resolve_model("tiny")), cfg, hw, False, 0, "train.py") is None


# ----------------------------------------------------------------------------
# tier 3: as a user meets them


@pytest.mark.slow
def test_cpu_refusal_is_one_line_within_15_s():
    t = time.time()
    r = run([sys.executable, os.path.join(ROOT, "train.py"), "--model", QWEN_7B], check=False, timeout=120)
    took = time.time() - t
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and "host RAM" in err and took < 15, (took, err)


@pytest.mark.distributed
def test_nproc_2_equals_torchrun_with_2_ranks(tmp_path):
    flags = [*TRAIN_SMALL, "--max_steps", "3"]
    a, b = str(tmp_path / "nproc"), str(tmp_path / "torchrun")
    cpu = {**ONE_THREAD, "CUDA_VISIBLE_DEVICES": ""}
    mine = run([sys.executable, os.path.join(ROOT, "train.py"), "--nproc", "2", *flags, "--out_dir", a], env=cpu)
    assert mine.stdout.startswith("train.py: starting 2 ranks on this node"), mine.stdout[:300]
    run([*TORCHRUN, os.path.join(ROOT, "train.py"), *flags, "--out_dir", b], env=cpu)
    assert metrics(a) == metrics(b) and len(metrics(a)) == 4


def test_the_papers_held_out_set_is_read_from_its_test_split(monkeypatch):
    """MATH-500 on the hub has one split, "test": the held-out set of a hub id is read from it."""
    from lib import data, tiny
    asked = []

    def hub(name, split):
        asked.append((name, split))
        return enumerate([{"problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"}], 1)
    monkeypatch.setattr(data, "_hub_rows", hub)
    _, _, held, _ = data.training_set("builtin", "HuggingFaceH4/MATH-500", tiny.make_tokenizer(), 1024, 8192, 500,
                                      lambda completion, answer: 1.0)
    assert asked == [("HuggingFaceH4/MATH-500", "test")] and [p.answer for p in held] == ["2"]
