"""The host a benchmark ran on, named by what it has (ratios differ between CPUs: name the
one they came from)."""

import os
import platform


def cpu() -> str:
    """'<model name>, N CPUs' from /proc/cpuinfo (Linux), else what platform knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"
