"""Device memory in use: allocator stats on accelerators, host RSS on the CPU backend."""

from __future__ import annotations

import os
import resource
import sys

import jax


def device_memory() -> dict[str, int]:
    """Memory in use / peak: the first local device's allocator stats where it has them
    (GPU, TPU), else this process's host RSS (CPU backend)."""
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "bytes_in_use" in stats:
        out = dict(bytes_in_use=int(stats["bytes_in_use"]),
                   peak_bytes_in_use=int(stats.get("peak_bytes_in_use", stats["bytes_in_use"])))
        if "bytes_limit" in stats:
            out["bytes_limit"] = int(stats["bytes_limit"])
        return out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024   # bytes on macOS, KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = peak
    return dict(host_rss_bytes=rss, host_peak_rss_bytes=max(peak, rss))
