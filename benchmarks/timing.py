"""Wall-clock timing shared by the benchmarks; imports only torch, so the op benchmark stays
free of detectron2."""

import time
from typing import Callable, List

import torch


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of ``fn``, including the device work it queued."""
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def warm_then_time(fn: Callable[[], object], repeat: int, device: str) -> List[float]:
    """Seconds of ``repeat`` calls of ``fn`` after one untimed warm-up call (allocator, lazy
    initialization, optimizer state)."""
    timed(fn, device)
    return [timed(fn, device) for _ in range(repeat)]
