"""The vLLM tier: rollout.VLLMEngine against vLLM itself (its CPU build in CI, `-m vllm`).

Every test here carries `@needs_vllm`: marked `vllm`, and skipped where vLLM is not installed, so the
main suite (which has no vLLM) skips them cleanly and the vLLM environment runs them. (A module-level
pytestmark would not reach them: test_hapo.py collects these functions into its own namespace.)
"""

import importlib.util

import pytest



def needs_vllm(test):
    """Mark `test` for the vLLM tier and skip it where vLLM is not installed."""
    missing = importlib.util.find_spec("vllm") is None
    return pytest.mark.vllm(pytest.mark.skipif(missing, reason="vLLM is not installed (the vLLM tier runs it)")(test))
