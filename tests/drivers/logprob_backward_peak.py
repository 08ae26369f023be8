"""Peak memory and time of per-token log-probs, forward AND backward, from hidden states and an LM
head of Qwen's vocabulary: the naive log_softmax over [B, T, V] against loss.hidden_logprobs.

    python tests/drivers/logprob_backward_peak.py naive|fused [T] [V] [chunk]

Prints "MB_above_inputs seconds". Its own process, so that VmHWM (peak resident memory) is this
computation's alone.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from loss import hidden_logprobs  # noqa: E402


def status(key):
    return int([line for line in open("/proc/self/status") if line.startswith(key)][0].split()[1]) / 1024


kind = sys.argv[1]
T, V, chunk = (int(x) for x in (sys.argv[2:] + ["512", "151936", "256"][len(sys.argv) - 2:]))
torch.manual_seed(0)
hidden = torch.randn(2, T, 64, requires_grad=True)  # [B, T, H]
weight = (0.02 * torch.randn(V, 64)).requires_grad_()  # [V, H]
targets = torch.randint(V, (2, T))  # [B, T]
advantages = torch.randn(2, 1)  # [B, 1]
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
base, t0 = status("VmRSS"), time.perf_counter()
if kind == "naive":
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
else:
    logp = hidden_logprobs(hidden, weight, targets, chunk)  # [B, T]
(-(advantages * logp).mean()).backward()
print(status("VmHWM") - base, time.perf_counter() - t0)
