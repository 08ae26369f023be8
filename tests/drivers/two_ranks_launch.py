"""launch.start on two ranks (torchrun, gloo): what every rank must have before any starts vLLM.

    torchrun --nproc_per_node 2 tests/drivers/two_ranks_launch.py OUT_DIR

The model is a hub id whose download is faked (it hands back the built-in model's directory, rank 0's
a second late) and the reward is faked too: on rank 0 every third teacher fails (as a deadline might
have it), on rank 1 none would. --method sft keeps the verified teachers only. Each rank writes
OUT_DIR/rank<R>.json: whether rank 0's download had finished when its own began, the teachers it
scored itself, the verdicts it ended with and the problems it kept.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import huggingface_hub  # noqa: E402
import launch  # noqa: E402
from lib import parallel  # noqa: E402
from lib import tiny  # noqa: E402
import train  # noqa: E402

out = sys.argv[1]
done = os.path.join(out, "rank0_downloaded")
dist = parallel.init(timeout_min=5)
seen = {"downloads": [], "scored": 0}


def snapshot_download(name, allow_patterns):
    seen["downloads"].append({"name": name, "rank0_done": os.path.exists(done)})
    if dist.master:
        time.sleep(1.0)  # a slow download: rank 1 must not overtake it
        open(done, "w").close()
    return tiny.SHIPPED


def reward(completion, answer, checker):
    seen["scored"] += 1
    return 0.0 if dist.master and seen["scored"] % 3 == 0 else 1.0


huggingface_hub.snapshot_download = snapshot_download
launch.reward = reward
cfg, _ = train.parse_args(["--recipe", "laptop", "--model", "someone/tiny-copy", "--rollout", "hf", "--method", "sft", "--out_dir", out,
                           "--batch_prompts", "2"], dist)
run = launch.start(cfg, dist)
json.dump({"rank": dist.rank, **seen, "teacher_ok": run.teacher_ok, "kept": len(run.problems)},
          open(os.path.join(out, f"rank{dist.rank}.json"), "w"))
parallel.close(dist)
