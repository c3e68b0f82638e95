"""The learner's micro-batch from the GPU's free memory (`learner.micro_batch: 0`).

A forward/backward's peak memory grows about linearly with the samples in it (activations), on top of what the
rank always holds (weights, adapters, optimizer state). Two probes, at 1 and 2 samples, give both terms; the
micro-batch is then the size that splits the rank's share into the fewest micro-batches that fit, evened out so
that no micro-batch is mostly padding.
"""

from __future__ import annotations

from typing import Protocol

import torch


class MemoryGauge(Protocol):
    """Peak memory of the work between `reset` and `peak`, and the bytes this rank may plan to use."""

    def reset(self) -> None: ...

    def peak(self) -> int: ...

    def budget(self, fraction: float) -> int: ...


class CudaMemory:
    """The CUDA caching allocator's counters for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def budget(self, fraction: float) -> int:
        """`fraction` of what this process can use: the device's free memory plus what its allocator holds."""
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(fraction * (free + torch.cuda.memory_reserved(self.device)))


def fit_micro_batch(peak_1: int, peak_2: int, budget: int, per_rank: int) -> int:
    """The micro-batch for a rank that trains `per_rank` samples a step, from the peaks measured at 1 and 2 samples.

    The largest size that fits is `(budget - base) // per_sample` (base = peak_1 - per_sample, linear in between);
    the rank then needs `n = ceil(per_rank / largest)` micro-batches, and takes `ceil(per_rank / n)` samples in each
    (12 samples with room for 8: 2 micro-batches of 6, no padding). At least 1: when even one sample does not fit,
    the run shows the out-of-memory error of that size.
    """
    if per_rank < 1:
        raise ValueError(f"per_rank must be >= 1, got {per_rank}")
    per_sample = max(peak_2 - peak_1, 0)
    base = peak_1 - per_sample
    largest = per_rank if per_sample == 0 else max(1, min(per_rank, (budget - base) // per_sample))
    n = -(-per_rank // largest)
    return -(-per_rank // n)
