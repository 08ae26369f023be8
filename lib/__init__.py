"""The machinery the loop calls: data, the built-in task and model, loading, FSDP2, checkpoints, the
memory plan, vLLM, weight sync, tracking, and the reward's TeX reader and sympy workers.

Flat, one concept per file, and it never imports from the root (tests/test_layout.py checks): the
paper's method reads at the root (gate.py, loss.py, hapo.py, update.py, train.py), this is what lets it
run on a cluster.
"""
