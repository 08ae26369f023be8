"""train.py's model loading under torchrun, measured: rank 0 reads the weights, every rank holds its shard.

    torchrun --nproc_per_node 2 tests/drivers/sharded_load.py MODEL_DIR OUT_DIR

Each rank loads MODEL_DIR as train.py does (models.load_policy, then parallel.wrap) and writes
OUT_DIR/rank<R>.json: whether its model was built on the meta device, how far its peak host memory
grew while loading (ru_maxrss) against the model's full size, and whether its shards, rotary
frequencies, tied embeddings, a forward pass and the HF engine's full copy (train.py's sampler)
equal those of the loading before sharded loading: a full from_pretrained on every rank.
"""
import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lib import models  # noqa: E402
from lib import parallel  # noqa: E402
from rollout import HFEngine  # noqa: E402


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


path, out = sys.argv[1], sys.argv[2]
dist = parallel.init(timeout_min=7)
import transformers.models.qwen2.modeling_qwen2  # noqa: E402,F401  the model's code, outside the measured window
before = peak_mib()
model, tok = models.load_policy(path, dist)  # train.py's loading, then its wrap
built_on_meta = next(model.parameters()).is_meta
sampler = parallel.meta_copy(model)  # train.py's HF engine's copy under torchrun, filled below
policy = parallel.wrap(model, dist)
grown = peak_mib() - before
full_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # numel: the global shape

ref, _ = models.load_model(path, dtype=torch.float32)  # the loading before: every rank reads everything
ref_policy = parallel.Policy(ref)
parallel.shard(ref_policy, dist)
same = lambda a, b: all(torch.equal(x.to_local() if hasattr(x, "to_local") else x,
                                    y.to_local() if hasattr(y, "to_local") else y) for x, y in zip(a, b))
ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
logits = lambda p: p(lambda m, x: m(x).logits, ids)

parallel.materialize(sampler, dist.device)
HFEngine(sampler, tok).sync_weights(model)  # gathers the trainer's shards into the full copy
full_ref = {n: p.full_tensor() for n, p in ref.named_parameters()}
backend = torch.distributed.distributed_c10d._get_default_group()._get_backend(dist.device)
json.dump({"rank": dist.rank, "built_on_meta": built_on_meta, "grown_mib": grown, "full_mib": full_mib,
           "local_mib": sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 2**20,
           "shards_equal": same(model.parameters(), ref.parameters()),
           "buffers_equal": same(model.buffers(), ref.buffers()) and len(list(model.buffers())) > 0,
           "tied": model.lm_head.weight is model.model.embed_tokens.weight,
           "logits_equal": torch.equal(logits(policy), logits(ref_policy)),
           "sampler_equal": all(torch.equal(p, full_ref[n]) for n, p in sampler.named_parameters())
           and same(sampler.buffers(), ref.buffers()),
           "sampler_tied": sampler.lm_head.weight is sampler.model.embed_tokens.weight,
           "timeout_s": backend.options._timeout.total_seconds()},
          open(os.path.join(out, f"rank{dist.rank}.json"), "w"))
parallel.close(dist)
