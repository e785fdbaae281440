"""Sampling throughput: the one-step student against the teacher's multistep sampler, same process and device."""

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
                       device: str | torch.device = "cpu") -> float:
    """batch_size * n_batches / wall time of n_batches calls ``fn(batch_size)``, after ``warmup`` untimed calls."""
    if batch_size < 1 or n_batches < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, n_batches >= 1, warmup >= 0; got {batch_size}, {n_batches}, "
                         f"{warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn(batch_size)
    _sync(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        fn(batch_size)
    _sync(device)
    return batch_size * n_batches / (time.perf_counter() - start)


def speed_comparison(student_fn: Callable[[int], Tensor], teacher_fn: Callable[[int], Tensor], teacher_nfe: int,
                     batch_size: int = 64, n_batches: int = 10, warmup: int = 2,
                     device: str | torch.device = "cpu") -> dict[str, float | int | str]:
    """Samples/s of both samplers measured back to back; ``speedup`` should approach ``teacher_nfe`` when one
    network evaluation dominates the cost, so ``speedup_over_nfe`` near 1 means nothing else costs much."""
    if teacher_nfe < 1:
        raise ValueError(f"teacher_nfe must be >= 1, got {teacher_nfe}")
    student = samples_per_second(student_fn, batch_size, n_batches, warmup, device)
    teacher = samples_per_second(teacher_fn, batch_size, n_batches, warmup, device)
    return {
        "student_samples_per_s": student,
        "teacher_samples_per_s": teacher,
        "teacher_nfe": teacher_nfe,
        "speedup": student / teacher,
        "speedup_over_nfe": student / teacher / teacher_nfe,
        "batch_size": batch_size,
        "device": str(torch.device(device)),
    }
