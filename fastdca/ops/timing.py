"""GPU time of a function, by CUDA events: what `fastdca check` reports and what FASTDCA_SDPA_FWD=auto compares."""

from __future__ import annotations


def cuda_time_ms(fn, warmup=5, repeat=15, calls=10) -> float:
    """Median over `repeat` samples of CUDA-event time per call, each sample `calls` back-to-back calls after
    `warmup` calls: the GPU's time per call when the host keeps ahead of it, as in a training loop."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]
