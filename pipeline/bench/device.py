"""Clocks, memory counters, OOM handling and the device's own ceilings.

On CUDA, times come from CUDA events (no host sync inside a measured region) and memory from
the caching allocator's counters; on a CPU the same code runs with `perf_counter` and without
memory counters, so the whole benchmark can be tested anywhere.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

GB = 1e9


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create modules directly on `device` in `dtype`: a random 7B model is initialised on the
    GPU in bf16 in about a second, instead of in fp32 on the CPU (54 GB and minutes)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------
class Clock:
    """Marks points in the device's stream; `seconds(a, b)` after `sync()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


def cuda_median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event time of `fn` in ms over `repeats` calls after `warmup` untimed ones
    (the benchmarks/ scripts time single kernels and layers with it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def cuda_graph_ms(fn: Callable[[], Any], repeats: int = 20, inner: int = 10) -> float:
    """Median device time of one `fn` call in ms, with `inner` calls captured in one CUDA graph
    and replayed: no launch overhead, as in the CUDA-graph decode loop (a kernel launched from
    Python can take longer to launch than to run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture (allocations, autotuning, compilation)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return cuda_median_ms(graph.replay, repeats=repeats, warmup=2) / inner


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
@dataclass
class Memory:
    """Allocator counters (bytes) on CUDA; None everywhere on a CPU."""

    device: torch.device
    _start: int = field(default=0, init=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def peak_reserved(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None

    def free_and_total(self) -> tuple[int, int] | None:
        return torch.cuda.mem_get_info(self.device) if self.cuda else None


def release() -> None:
    """Drop garbage and hand cached blocks back, so the next cell starts from a clean allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def first_line(exc: BaseException) -> str:
    """An exception's first message line (at most 300 characters), for a report cell."""
    return (str(exc).splitlines() or [""])[0][:300]


def error_text(exc: BaseException) -> str:
    """`Type: first line` of an exception."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def attempt(fn: Callable[[], dict[str, Any]], keep_going: bool = False) -> dict[str, Any]:
    """Run one measurement; an out-of-memory error becomes `{"oom": True}` instead of a crash.

    With `keep_going`, any other error becomes `{"error": ...}` too (one broken measurement
    should not cost a 10-minute GPU run its other results); otherwise it propagates. The
    exception (and every tensor its traceback holds) is dropped before the allocator is
    emptied, so the next measurement sees the memory again.
    """
    result: dict[str, Any] | None = None
    failure: dict[str, Any] = {}
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is an OOM or keep_going
        if is_oom(exc):
            failure = {"oom": True, "error": first_line(exc)}
        elif keep_going:
            import traceback

            where = traceback.extract_tb(exc.__traceback__)[-1]
            failure = {"error": f"{error_text(exc)} ({Path(where.filename).name}:{where.lineno})"}
        else:
            raise
    release()
    return result if result is not None else failure


# ---------------------------------------------------------------------------------------------
# Device description and ceilings
# ---------------------------------------------------------------------------------------------
def describe(device: torch.device) -> dict[str, Any]:
    import platform

    import transformers

    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            memory_gb=round(props.total_memory / GB, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
        try:
            import flash_attn

            info["flash_attn"] = flash_attn.__version__
        except Exception:
            info["flash_attn"] = None
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


@torch.inference_mode()
def measure_ceilings(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> dict[str, float]:
    """The device's achievable matmul TFLOP/s (size^3 in `dtype`) and copy bandwidth (TB/s,
    read + write), the ceilings the benchmark's achieved rates are compared with."""
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 512)
    clock = Clock(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    clock.sync()
    start = clock.mark()
    for _ in range(repeats):
        torch.matmul(a, b)
    end = clock.mark()
    clock.sync()
    matmul_s = clock.seconds(start, end) / repeats
    del a, b
    numel = (1 << 30 if cuda else 1 << 24) // 2  # 1 GiB (GPU) / 16 MiB (CPU) of 2-byte values
    src = torch.empty(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock.sync()
    start = clock.mark()
    for _ in range(repeats):
        dst.copy_(src)
    end = clock.mark()
    clock.sync()
    copy_s = clock.seconds(start, end) / repeats
    del src, dst
    release()
    return {
        "matmul_tflops": float(f"{2 * size**3 / matmul_s / 1e12:.4g}"),
        "matmul_size": size,
        "copy_tb_per_s": float(f"{2 * numel * 2 / copy_s / 1e12:.4g}"),
    }
