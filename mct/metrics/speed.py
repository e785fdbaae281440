"""Sampling throughput (samples/s) of a sampler; evaluation measures the one-step student and the teacher's multistep
sampler with it in the same process, on the same device."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor


def _sync(device: torch.device) -> None:
    # CUDA calls return before the kernels finish; without this the clock measures queueing, not work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def samples_per_second(fn: Callable[[int], Tensor], batch_size: int, n_batches: int = 10, warmup: int = 2,
                       device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter) -> float:
    """batch_size * n_batches / wall time of n_batches calls ``fn(batch_size)``, after ``warmup`` untimed calls.
    ``clock`` returns seconds (tests pass a fake one)."""
    if batch_size < 1 or n_batches < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, n_batches >= 1, warmup >= 0; got {batch_size}, {n_batches}, "
                         f"{warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn(batch_size)
    _sync(device)
    start = clock()
    for _ in range(n_batches):
        fn(batch_size)
    _sync(device)
    return batch_size * n_batches / (clock() - start)
