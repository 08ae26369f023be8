"""What the 7B recipe's first GPU run would have hit, checked on CPU (issue 21, items 1-3 and 6).

Some tests here are marked `vllm` without needing vLLM: the vLLM tier runs them in vLLM's environment,
whose transformers is the one vLLM pins (<5.20), older than the main environment's. They run in the
main suite too. Tests that do need vLLM carry test_vllm's `needs_vllm` and share one engine.
"""

import json
import os

import pytest
import torch

from tests.helpers import TRAIN_SMALL, metrics, tiny_qwen2

# ----------------------------------------------------------------------------
# item 1: --grad_checkpointing with both transformers versions


@pytest.mark.vllm  # runs in both environments: transformers 5.24 here, vLLM's pinned 5.19 in the vLLM tier
@pytest.mark.slow
def test_grad_checkpointing_step_equals_the_plain_step(tmp_path):
    """One train.py step with --grad_checkpointing: it starts (5.19 has no activation_checkpointing_enable)
    and recomputing the activations changes no number of the step."""
    import train
    rows = {}
    for flag in ("--grad_checkpointing", "--no-grad_checkpointing"):
        out = str(tmp_path / flag)
        train.main(TRAIN_SMALL + ["--max_steps", "1", "--eval_problems", "2", "--out_dir", out, flag])
        rows[flag] = metrics(out)[-1]
    assert rows["--grad_checkpointing"]["train/grad_norm"] > 0
    assert rows["--grad_checkpointing"] == pytest.approx(rows["--no-grad_checkpointing"], rel=1e-5)


def test_grad_checkpointing_is_on_after_wrap():
    """parallel.wrap turns checkpointing on in every decoder layer, non-reentrant (FSDP2 composes with it)."""
    import parallel
    model = tiny_qwen2()
    parallel.wrap(model, parallel.Dist(), grad_checkpointing=True)
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)
