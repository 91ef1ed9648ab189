"""Clocks and memory for the benchmarks: medians of interleaved runs, process RSS where a framework keeps no
allocation count, and the machine's own description."""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from pathlib import Path


def timed(backend, fn):
    """(fn(), seconds), the device synchronised before the clock stops."""
    start = time.perf_counter()
    out = fn()
    backend.synchronize(*(out if isinstance(out, tuple) else (out,)))
    return out, time.perf_counter() - start


def _rss_hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def rss_peak(fn):
    """(fn(), {...}): the process's peak resident memory during fn, and its growth (for a CPU, where torch keeps no
    allocation count)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the high-water mark to the current RSS
        before = _rss_hwm_kib()  # the reset mark itself: the high-water mark only grows from here
        out = fn()
        peak = _rss_hwm_kib()
        method = "process peak RSS (VmHWM, reset before the run; interpreter and libraries included)"
    except OSError:  # no /proc: the all-time peak, which a run below it does not move
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "process all-time peak RSS (getrusage ru_maxrss; interpreter and libraries included)"
    return out, {
        "peak_memory_bytes": 1024 * peak,
        "peak_memory_above_start_bytes": 1024 * (peak - before),
        "peak_memory_method": method,
    }


def peak_memory(backend, fn):
    """(fn(), {...}) from the framework's own allocation counter where it has one, else the process's peak RSS."""
    (out, memory), rss = rss_peak(lambda: backend.peak_memory(fn))
    return out, memory or rss


def machine() -> dict:
    out = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor(),
        "load_average_before": load_average(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
        out["cpu"] = re.search(r"model name\s*:\s*(.*)", text).group(1)
        out["cpus"] = text.count("processor\t:")
    except (OSError, AttributeError):
        pass
    return out


def load_average():
    """1-minute load average: other processes' share of the cores during the run (timings are wall clock)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
