"""One VLLMEngine per rank under torchrun (external_launcher), fed from an FSDP2-sharded trainer.

    torchrun --nproc_per_node 2 tests/drivers/vllm_two_ranks.py OUT_DIR MODEL_DIR

MODEL_DIR is a saved model with its tokenizer (tests/test_vllm.py's vllm_test_model). Each rank writes
OUT_DIR/rank<r>.json: greedy completions of its engine and of the HF argmax loop on a full copy of the
same weights, before and after the weights change on the sharded model and sync_weights gathers them
(one parameter at a time, collectively); and a few samples at temperature 1 (each rank has its own seed).
"""
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lib import parallel  # noqa: E402
from tests.test_vllm import _prompts, hf_greedy, perturb_every_parameter, vllm_test_engine  # noqa: E402

out_dir, model_dir = sys.argv[1], sys.argv[2]
dist = parallel.init()  # the gloo process group first: vLLM's external launcher joins it
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(model_dir)
engine = vllm_test_engine(model_dir, tok, rank=dist.rank, world_size=dist.world)
prompts = _prompts(8, seed=11)
record = {"vllm_before": engine.generate(prompts, 1, 12, 0.0),
          "hf_before": hf_greedy(model, prompts, 12, tok.eos_token_id)}
perturb_every_parameter(model, seed=12)  # the same noise on every rank
full = copy.deepcopy(model)  # the reference keeps the full weights
parallel.shard(parallel.Policy(model), dist)  # model's parameters are now DTensor shards
assert all(hasattr(p, "full_tensor") for p in model.parameters())
engine.sync_weights(model)
record.update({"vllm_after": engine.generate(prompts, 1, 12, 0.0),
               "hf_after": hf_greedy(full, prompts, 12, tok.eos_token_id),
               "sampled": engine.generate(prompts[:2], 4, 12, 1.0)})
with open(os.path.join(out_dir, f"rank{dist.rank}.json"), "w") as f:
    json.dump(record, f)
parallel.close(dist)
