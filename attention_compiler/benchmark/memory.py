"""Peak memory of one benchmark point: process RSS on CPU, device memory on GPU.

On Linux, writing 5 to /proc/self/clear_refs resets the kernel's high-water mark of resident
memory (VmHWM), so the peak of a stretch of work is exact, not sampled. Where that is refused, a
thread samples VmRSS every millisecond instead, and the figure is a lower bound. Memory an
earlier stretch freed but the C allocator kept would be reused unseen, so glibc's malloc_trim
hands it back first.
"""

from __future__ import annotations

import ctypes
import gc
import math
import threading
import time
from typing import Any


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back
        pass


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.peak``: the most resident memory the process held
    inside the block, and ``peak.growth``: how much of it was beyond what it held on entry (after
    a garbage collection). ``settle=False`` skips the collection (slow with torch loaded), for a
    bound checked many times over: memory freed earlier may then be reused unseen."""

    def __init__(self, settle: bool = True) -> None:
        self.settle = settle
        self.peak = self.growth = 0
        self.exact = True
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> PeakRss:
        if self.settle:
            gc.collect()
            _malloc_trim()
        self.start = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.exact = False
            self._sampled = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        self.peak = peak
        self.growth = max(peak - self.start, 0)


class PeakCuda:
    """Device memory of a block on the current GPU: torch's allocator peak for torch work, and the
    growth of the device's used memory for work that allocates outside torch (ONNX Runtime's CUDA
    arena keeps what it took, so its growth is its peak). ``peak`` and ``growth`` as for PeakRss."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.peak = self.growth = 0
        self.exact = True

    def __enter__(self) -> PeakCuda:
        cuda = self.torch.cuda
        gc.collect()
        cuda.synchronize()
        cuda.empty_cache()
        cuda.reset_peak_memory_stats()
        self._allocated = cuda.memory_allocated()
        free, total = cuda.mem_get_info()
        self._used = total - free
        return self

    def __exit__(self, *exc: object) -> None:
        cuda = self.torch.cuda
        cuda.synchronize()
        torch_peak = cuda.max_memory_allocated() - self._allocated
        free, total = cuda.mem_get_info()
        self.growth = max(torch_peak, (total - free) - self._used, 0)
        self.peak = self._used + self.growth


def available_bytes(torch: Any = None) -> int:
    """Memory a new allocation can still get: MemAvailable on the host, or the current GPU's free memory."""
    if torch is not None:
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def predicted_growth(history: list[tuple[int, int]], length: int) -> float | None:
    """Memory growth at ``length`` extrapolated from (length, growth) points of the same backend:
    a power law through the last two points, its exponent held to [1, 2]; from one point,
    quadratic (the worst attention can do). None without points."""
    points = sorted((n, g) for n, g in history if g > 0 and n < length)
    if not points:
        return None
    if len(points) == 1:
        (n, g), k = points[0], 2.0
    else:
        (n0, g0), (n, g) = points[-2], points[-1]
        k = min(max(math.log(g / g0) / math.log(n / n0), 1.0), 2.0) if g > g0 else 1.0
    return g * (length / n) ** k
