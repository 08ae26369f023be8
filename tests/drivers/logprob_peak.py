"""Peak memory of per-token log-probs over [2, 256, 151936] fp32 logits, in MB above the logits.

    python tests/drivers/logprob_peak.py naive|chunked

Its own process, so that VmHWM (peak resident memory) is this computation's alone.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from loss import token_logprobs  # noqa: E402


def status(key):
    return int([line for line in open("/proc/self/status") if line.startswith(key)][0].split()[1]) / 1024


torch.manual_seed(0)
logits = torch.randn(2, 256, 151936)  # [B, T, V] fp32: 311 MB
tgt = torch.randint(0, 151936, (2, 256))  # [B, T]
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
base = status("VmRSS")
if sys.argv[1] == "naive":
    out = torch.log_softmax(logits, -1).gather(-1, tgt[..., None])
else:
    out = token_logprobs(logits, tgt, chunk_size=32)
print(status("VmHWM") - base)
